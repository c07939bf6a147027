"""``xbt eval``: the cross-model retrieval matrix, the backfill curve and their report, in one command.

Examples::

    # an evaluation set (image folder + metadata.jsonl, parquet, save_to_disk, Hub), an adapter, two saved baselines
    xbt eval --old_model open_clip:ViT-B-32/openai --new_model hf:/models/new --adapter runs/adapter \\
             --baselines procrustes=runs/stage1/baselines/procrustes ridge=runs/stage1/baselines/ridge \\
             --eval_set data/eval --output_dir runs/eval

    # peer baselines fitted on 20% of the set (left out of every measured cell): SLERP, Drift-Adapter's maps
    xbt eval --old_model ... --new_model ... --adapter runs/adapter --eval_set data/eval \\
             --baselines slerp procrustes low_rank+diag mlp --rank 64 --support_fraction 0.2 --output_dir runs/eval

    # the production gallery as it is stored (ids = the evaluation set's image ids: file names, UUIDs, ...)
    xbt eval --old_model ... --new_model ... --adapter ... --eval_set data/eval \\
             --galleries old=prod/gallery.faiss --gallery_ids prod/ids.txt \\
             --index_factory IVF4096,Flat --search_parameters nprobe=32 --output_dir runs/eval

    # stored embeddings only: queries embedded elsewhere, ids = the relevant gallery ids
    xbt eval --galleries old=old_gallery.npy --gallery_ids ids.txt \\
             --queries old=old_queries.npy xbt=xbt_queries.npy --query_ids query_ids.txt --output_dir out

Spaces this command defines (the names stored files refer to): ``old`` (the old model: its
gallery is the lower bound and the one adapters write into), ``new`` (the new model in its own
space: the upper bound), ``xbt`` (the adapter), ``xbt-full`` (a BT²/OCA adapter's full vectors in its
own space), ``xbt+old`` (adapter text queries blended with the old model's), ``old-denoised`` (one
mean old caption query per image) and every baseline by its name. Baselines named without a folder
are fitted here (:mod:`xbt.evaluation.fitted`) on a support split of the evaluation set, which every
measured cell then leaves out. Which cells are evaluated follows from the spaces' ids (see
:mod:`xbt.evaluation.plan`).

This module imports no torch, faiss or model code at import time (``xbt eval --help`` stays fast).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import parse_configs
from .data.tables import SplitRows
from .errors import InputError
from .evaluation.plan import ADAPTER, DEFAULT_KS, EXACT, FULL_SPACE, MODALITIES, NEW_MODEL, OLD_MODEL, SLERP, TEXT, check_fit_on

if TYPE_CHECKING:  # torch-heavy; only for the annotation
    from .evaluation.encode import EvalSet

OLD, NEW, XBT, XBT_FULL, BLEND, DENOISED_NAME = "old", "new", "xbt", "xbt-full", "xbt+old", "old-denoised"
RESERVED = (OLD, NEW, XBT, XBT_FULL, BLEND, DENOISED_NAME)
# any other stored name: an adapter writing into the old space
STORED_KINDS = {OLD: OLD_MODEL, NEW: NEW_MODEL, XBT_FULL: FULL_SPACE}


@dataclass
class EvalArguments(SplitRows):
    """Options of ``xbt eval`` (``--config FILE.yaml`` gives any of them; flags override the file)."""

    output_dir: str = field(metadata={"help": "folder for metrics.json, report.md, report.html and the PNG plots"})
    old_model: str | None = field(default=None, metadata={
        "help": "old model reference (its space holds the gallery), e.g. open_clip:ViT-B-32/openai, or an "
                "xbt: adapter that writes into it (a chained upgrade)"})
    new_model: str | None = field(default=None, metadata={
        "help": "new model reference (evaluated in its own space: the upper bound)"})
    adapter: str | None = field(default=None, metadata={
        "help": "xbt adapter folder or Hub id: adds the spaces xbt (the adapter) and xbt+old (blended queries)"})
    baselines: list[str] = field(default_factory=list, metadata={
        "help": "baselines, space-separated after one --baselines: NAME=DIR for a saved Projection folder "
                "(Procrustes, ridge, the stage-1 ψ), or a name fitted here on the --support_fraction split: "
                "procrustes, ridge, low_rank (rank --rank), mlp (residual MLP), each optionally +diag "
                "(diagonal scaling), and slerp (training-free SLERP: Procrustes-aligned new query and old query "
                "interpolated on the sphere, α fitted per direction; it runs the OLD encoder on every query)"})
    support_fraction: float = field(default=0.2, metadata={
        "help": "share of the evaluation images (drawn by --seed) the named baselines are fitted on; they and "
                "their captions are left out of every measured cell (used only when a baseline is fitted on it)"})
    fit_on: list[str] = field(default_factory=lambda: [TEXT], metadata={
        "help": "support pairs the fitted maps learn from: text (caption pairs, as stage 1) and/or image"})
    rank: int = field(default=64, metadata={"help": "rank of the low_rank baseline's weight"})
    support_cache: str | None = field(default=None, metadata={
        "help": "stage-1 embedding cache folder (its manifest.json; sources 'new' and 'old'): the fitted maps "
                "learn from its (new, old) caption pairs, the support the adapter's ψ learnt from, instead of the "
                "support split (slerp still fits α on the split)"})
    blend_alpha: float | None = field(default=None, metadata={
        "help": "weight of the old encoder's query in xbt+old, in [0, 1] (default: the adapter's weights fitted "
                "on held-out pairs, text and image queries, else 0.5 for text queries); xbt+old runs the old "
                "encoder on every query"})
    eval_set: str | None = field(default=None, metadata={
        "help": "image-text pairs: image folder with metadata.jsonl/.csv, parquet, save_to_disk folder or Hub "
                "dataset (the training loaders' sources)"})
    id_column: str | None = field(default=None, metadata={
        "help": "column of the evaluation set holding the image ids that a stored gallery's ids refer to "
                "(any strings); default: the image file names (folders) or row numbers (tables)"})
    split: str = field(default="test", metadata={"help": "split of a Hub or save_to_disk evaluation set "
                                                         "('a+b' reads both)"})
    caption_column: str | None = field(default=None, metadata={
        "help": "caption column of the evaluation set (default: captions, caption or text); COLUMN.FIELD reads a "
                "field of a struct column, e.g. sentences.raw"})
    reference_numbers: str | None = field(default=None, metadata={
        "help": "print published numbers beside the run's (and add them to metrics.json): a PROTOCOL of "
                "the reference_numbers.yaml shipped with xbt (xbt/evaluation/), e.g. flickr30k, or "
                "FILE.yaml:PROTOCOL"})
    galleries: list[str] = field(default_factory=list, metadata={
        "help": "stored galleries as SPACE=FILE (an xbt embed folder, .npy, .safetensors, .faiss/.index), e.g. "
                "old=prod/gallery.faiss; "
                "space-separated after one --galleries"})
    gallery_ids: str | None = field(default=None, metadata={
        "help": "ids of the stored galleries' rows: a text file with one id per line (file names, UUIDs, "
                "integers) or a 1-D .npy; default: ids stored in the file, else row numbers"})
    gallery_modality: str = field(default="image", metadata={
        "help": "what stored galleries hold: image or text; stored queries are the other modality"})
    queries: list[str] = field(default_factory=list, metadata={
        "help": "stored query embeddings as SPACE=FILE, ids = their relevant gallery ids; space-separated"})
    query_ids: str | None = field(default=None, metadata={
        "help": "ids of the stored query rows (a text file, one per line, or a 1-D .npy)"})
    index_factory: str = field(default=EXACT, metadata={
        "help": "faiss index factory, e.g. IVF1024,Flat or HNSW32 (approximate ones are reported next to exact)"})
    search_parameters: str | None = field(default=None, metadata={
        "help": "faiss search parameters, e.g. nprobe=32 or efSearch=128"})
    shard_rows: int | None = field(default=None, metadata={"help": "gallery rows per search shard (default: 1 GiB)"})
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS), metadata={"help": "K of Recall@K, space-separated"})
    seed: int = field(default=0, metadata={
        "help": "seeds the random ordering of the backfill curves and the support split"})
    orderings: list[str] | None = field(default=None, metadata={
        "help": "backfill orderings compared (xbt.backfill.ORDERINGS), space-separated (default: random hubness "
                "density oracle, and uncertainty when the adapter has an uncertainty head); oracle reads the "
                "evaluation queries and is for reference only"})
    device: str = field(default="cpu", metadata={"help": "device the models encode on, e.g. cpu or cuda"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "root of the embedding cache the evaluation vectors go through (default: OUTPUT_DIR/cache)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(k < 1 for k in self.ks) or not self.ks:
            raise InputError(f"--ks must be positive integers, got {self.ks}.")
        from .backfill import ORDERINGS

        unknown = [name for name in self.orderings or () if name not in ORDERINGS]
        if unknown or self.orderings == []:
            raise InputError(f"--orderings: unknown {unknown or 'none given'}; allowed: {', '.join(ORDERINGS)}.")
        if self.gallery_modality not in MODALITIES:
            raise InputError(f"--gallery_modality must be one of {MODALITIES}, got {self.gallery_modality!r}.")
        if self.blend_alpha is not None and not 0.0 <= self.blend_alpha <= 1.0:
            raise InputError(f"--blend_alpha must lie in [0, 1], got {self.blend_alpha}.")
        if self.shard_rows is not None and self.shard_rows < 1:
            raise InputError(f"--shard_rows must be at least 1, got {self.shard_rows}.")
        for name in [*named(saved_baselines(self.baselines), "--baselines"), *fitted_baselines(self.baselines)]:
            if name in RESERVED:
                raise InputError(f"--baselines name {name!r} is the name of a space of xbt eval "
                                 f"({', '.join(RESERVED)}); pick another, e.g. 'procrustes'.")
        if fitted_baselines(self.baselines):
            from .baselines import check_baseline_name  # torch: only once the options are parsed, never for --help

            for name in fitted_baselines(self.baselines):
                if name != SLERP:
                    check_baseline_name(name)
            if not 0.0 < self.support_fraction < 1.0:
                raise InputError(f"--support_fraction must lie strictly between 0 and 1, got {self.support_fraction}.")
            check_fit_on(self.fit_on)
            if self.rank < 1:
                raise InputError(f"--rank must be at least 1, got {self.rank}.")
        named(self.galleries, "--galleries")
        named(self.queries, "--queries")
        if self.eval_set is None and not (self.galleries and self.queries):
            raise InputError("Give --eval_set (with --old_model and --new_model), or stored --galleries and "
                             "--queries embeddings.")
        if self.eval_set is not None and not (self.old_model and self.new_model):
            raise InputError(f"--eval_set {self.eval_set!r} needs both --old_model and --new_model references.")
        if (self.adapter or self.baselines) and self.eval_set is None:
            raise InputError("--adapter and --baselines encode the evaluation set: give --eval_set too.")


def saved_baselines(values: Sequence[str]) -> list[str]:
    """The ``NAME=DIR`` values of ``--baselines`` (saved projection folders)."""
    return [value for value in values if "=" in value]


def fitted_baselines(values: Sequence[str]) -> list[str]:
    """The bare names of ``--baselines`` (baselines fitted on the support split)."""
    return [value for value in values if "=" not in value]


def named(values: Sequence[str], flag: str) -> dict[str, str]:
    """``NAME=PATH`` values as a mapping; :class:`InputError` naming ``flag`` for a malformed or repeated name."""
    result = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{flag} expects NAME=PATH values, got {value!r}.")
        if name in result:
            raise InputError(f"{flag} names {name!r} twice.")
        result[name] = path
    return result


def uses_support_split(args: EvalArguments) -> bool:
    """Whether a baseline is fitted on the support split: SLERP always, the maps unless a --support_cache is given."""
    fitted = fitted_baselines(args.baselines)
    return SLERP in fitted or bool(fitted and args.support_cache is None)


def open_support_cache(folder: str):
    """The stage-1 :class:`~xbt.cache.EmbeddingCache` of ``--support_cache``, checked to hold 'new' and 'old'."""
    from .cache import EmbeddingCache

    if not (Path(folder) / "manifest.json").is_file():
        raise InputError(f"--support_cache {folder!r} is no embedding cache folder (it has no manifest.json).")
    cache = EmbeddingCache(folder)
    if not {"new", "old"} <= set(cache.names):
        raise InputError(f"--support_cache {folder!r} holds {list(cache.names)}; a stage-1 cache holds 'new' and "
                         f"'old' caption embeddings.")
    return cache


def support_cache_pairs(cache, new, old) -> tuple:
    """The cache's (new, old) arrays, memory-mapped, after checking they were made in the spaces of ``new`` and
    ``old`` (caches without recorded space ids: their model ids, as stage 1 reads them)."""
    from .spaces import check_same_space

    for space, name in ((new, "new"), (old, "old")):
        recorded = cache.space_ids.get(name) or cache.fingerprints[name].removesuffix(":text")
        check_same_space(space.space_id, recorded, f"The {name!r} embeddings of --support_cache {cache.path}",
                         "Give the stage-1 cache of these --old_model and --new_model.")
    return cache["new"], cache["old"]


def model_spaces(args: EvalArguments, support_cache=None) -> list:
    """The spaces of the models: old, new (native), the adapter and its blend, the baselines, old-denoised;
    ``support_cache``: the opened ``--support_cache`` (:func:`open_support_cache`), if any."""
    from .backbones import load_backbone
    from .encoders import load_encoder
    from .evaluation.encode import (
        adapter_space,
        blended_space,
        denoised_space,
        encoder_space,
        full_space,
        native_space,
        projected_space,
    )
    from .spaces import check_same_space

    old_encoder = load_encoder(args.old_model, device=args.device)  # a backbone, or an adapter of a chain
    new_encoder = load_backbone(args.new_model, device=args.device)
    old = encoder_space(OLD, OLD_MODEL, old_encoder, {"reference": args.old_model})
    spaces = [old]
    adapter = None
    if args.adapter is not None:
        from .model import XBTModel

        model = XBTModel.from_pretrained(args.adapter, backbone=new_encoder, device=args.device)
        check_same_space(old.space_id, model.space_id, f"The adapter {args.adapter!r} (--adapter)",
                         "Pass the --old_model it was trained against.")
        # LoRA now sits in the new backbone; its native space is the same model with the adapters off.
        new = native_space(NEW, model, {"reference": str(new_encoder.reference)})
        adapter = adapter_space(XBT, model, {"adapter": str(args.adapter)})
    else:
        new = encoder_space(NEW, NEW_MODEL, new_encoder, {"reference": str(new_encoder.reference)})
    spaces.append(new)
    if adapter is not None:
        spaces += [adapter, blended_space(BLEND, adapter, old, blend_weights(args.blend_alpha, model))]
        if model.full_space_id:  # a BT²/OCA ψ: the adapter's own full space, re-indexed (xbt-full→xbt-full)
            spaces.append(full_space(XBT_FULL, model, {"adapter": str(args.adapter)}))
    spaces += [projected_space(name, projection, new, old.space_id, {"projection": folder})
               for name, (folder, projection) in load_baselines(saved_baselines(args.baselines), new, old).items()]
    spaces += fitted_spaces(args, new, old, support_cache)
    spaces.append(denoised_space(DENOISED_NAME, old))
    return spaces


def fitted_spaces(args: EvalArguments, new, old, support_cache=None) -> list:
    """The baselines ``--baselines`` names without a folder: SLERP, and the registry's maps fitted on the
    ``support_cache``'s pairs when there is one, else on the support split of the ``--fit_on`` modalities."""
    from .baselines import check_baseline_name
    from .evaluation.fitted import fitted_space, pairs_space, slerp_space

    cache_pairs = support_cache_pairs(support_cache, new, old) if support_cache is not None else None
    spaces = []
    for name in fitted_baselines(args.baselines):
        if name == SLERP:
            spaces.append(slerp_space(name, new, old))
            continue
        options = {"rank": args.rank} if check_baseline_name(name) == "low_rank" else {}
        if cache_pairs is not None:
            spaces.append(pairs_space(name, name, new, old, cache_pairs, f"stage-1 cache {args.support_cache}",
                                      **options))
        else:
            spaces.append(fitted_space(name, name, new, old, args.fit_on, **options))
    return spaces


def blend_weights(given: float | None, model) -> float | dict[str, float]:
    """``--blend_alpha`` for text queries when given; else the adapter's fitted weights (text and image queries),
    else 0.5 for text queries."""
    if given is not None:
        return given
    if model.query_blending:
        return {modality: model.fitted_blend(modality) for modality in ("text", "image")}
    return 0.5


def load_baselines(values: Sequence[str], new, old) -> dict:
    """``{name: (folder, Projection)}`` of ``--baselines``, each checked to map ``new``'s space into ``old``'s."""
    from .projection import Projection

    projections = {}
    for name, folder in named(values, "--baselines").items():
        if not Path(folder).is_dir():
            raise InputError(f"--baselines: projection folder {folder!r} (for {name!r}) does not exist.")
        projection = Projection.from_pretrained(folder).eval()
        projection.check_spaces(source=new.space_id, target=old.space_id)
        projections[name] = (folder, projection)
    return projections


def stored_spaces(galleries: dict, queries: dict) -> list:
    """Spaces known only from stored files: ``old`` and ``new`` as such, any other name an adapter writing into
    the old space. A file's recorded space id wins; unrecorded ones get a placeholder id per space."""
    from .evaluation.encode import stored_space

    names = list(dict.fromkeys([*galleries, *queries]))
    recorded = {name: next((v.space_id for v in (galleries.get(name), queries.get(name)) if v is not None
                            and v.space_id), None) for name in names}
    old_space = recorded.get(OLD) or f"stored:{OLD}"
    spaces = []
    for name in names:
        kind = STORED_KINDS.get(name, ADAPTER)
        space_id = recorded[name] or (old_space if kind in (OLD_MODEL, ADAPTER) else f"stored:{name}")
        spaces.append(stored_space(name, kind, space_id, (galleries.get(name) or queries.get(name)).dim))
    return spaces


def open_eval_set(args: EvalArguments) -> EvalSet:
    """The ``--eval_set`` with its split, columns and ids, opened and checked (no model is loaded)."""
    from .evaluation import load_eval_set

    return load_eval_set(args.eval_set, args.id_column, args.split, caption_column=args.caption_column,
                         split_column=args.split_column, split_values=args.split_values)


LIST_FLAGS = ("--baselines", "--galleries", "--queries", "--ks", "--orderings", "--fit_on")


def backfill_orderings(given: Sequence[str] | None, spaces) -> tuple[str, ...]:
    """The orderings to compare: ``given``, or the defaults plus ``uncertainty`` when an adapter has its head.
    An ordering whose input no space provides is refused before anything is encoded."""
    from .evaluation import EvalConfig
    from .evaluation.plan import uncertainty_heads

    heads = uncertainty_heads(spaces)
    if given is None:
        return EvalConfig.orderings + (("uncertainty",) if heads else ())
    if "uncertainty" in given and not heads:
        raise InputError("--orderings uncertainty: no adapter given here has an uncertainty head (uncertainty/ in "
                         "its folder); stage 2 trains one when it has stored old image embeddings.")
    return tuple(given)


def _check_list_flags_once(argv: Sequence[str]) -> None:
    """A list option takes all its values after one flag; argparse would silently keep only the last repeat."""
    for flag in LIST_FLAGS:
        given = [arg for arg in argv if arg == flag or arg.startswith(f"{flag}=")]
        if len(given) > 1:
            raise InputError(f"{flag} is given {len(given)} times; give it once with all its values, "
                             f"e.g. {flag} A=PATH B=PATH.")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or [])
    _check_list_flags_once(argv)
    (args,) = parse_configs([EvalArguments], argv, prog="xbt eval", description=__doc__)
    from .evaluation import EvalConfig, evaluate
    from .evaluation.published import attach_published, describe, load_published
    from .report import write_report
    from .retrieval import SearchConfig, load_embeddings

    # Everything cheap to check is read and checked before any model is loaded or anything encoded.
    published = load_published(args.reference_numbers) if args.reference_numbers else None
    eval_set = open_eval_set(args) if args.eval_set else None
    galleries = {name: load_embeddings(path, args.gallery_ids)
                 for name, path in named(args.galleries, "--galleries").items()}
    queries = {name: load_embeddings(path, args.query_ids) for name, path in named(args.queries, "--queries").items()}
    support_cache = open_support_cache(args.support_cache) if args.support_cache else None
    spaces = model_spaces(args, support_cache) if eval_set is not None else stored_spaces(galleries, queries)
    config = EvalConfig(ks=tuple(args.ks), seed=args.seed, orderings=backfill_orderings(args.orderings, spaces),
                        support_fraction=args.support_fraction if uses_support_split(args) else 0.0,
                        search=SearchConfig(args.index_factory, args.search_parameters, args.shard_rows))
    output = Path(args.output_dir)
    report = evaluate(eval_set, spaces, galleries, queries, args.gallery_modality, config,
                      args.cache_dir or output / "cache")
    if published is not None:
        attach_published(report, published, args.old_model, args.new_model)

    paths = write_report(report, output)
    from .html_report import thumbnails, write_html

    paths["html"] = write_html(report, output, paths, thumbnails(eval_set) if eval_set is not None else None)
    k = str(args.ks[0])
    if published is not None:
        print(describe(report))
    for cell in report["cells"]:
        compatible = "" if cell["compatible"] is None else (
            "  compatible" if cell["compatible"][k] else "  NOT compatible")
        reference = f"  published {cell['published'][k]:5.2f}" if k in cell.get("published", {}) else ""
        print(f"{cell['direction']:>11} {cell['name']:<24} {cell['role']:<14} R@{k} {cell['recall'][k]:5.1f}"
              f"{reference}{compatible}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0

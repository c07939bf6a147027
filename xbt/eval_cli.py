"""``xbt eval``: the cross-model retrieval matrix, the backfill curve and their report, in one command.

Examples::

    # generated or real evaluation set (image folder + metadata.jsonl), adapter and a baseline
    xbt eval --old open_clip:ViT-B-32/openai --new hf:/models/new --adapter runs/adapter \\
             --projection procrustes=runs/procrustes --eval-set data/eval --output runs/eval

    # the production gallery as it is stored (ids = the evaluation set's image ids), approximate search
    xbt eval --old ... --new ... --adapter ... --eval-set data/eval \\
             --gallery old=prod/gallery.faiss --index-factory IVF4096,Flat --search-parameters nprobe=32 ...

    # stored embeddings only: queries embedded elsewhere, ids = the relevant gallery ids
    xbt eval --gallery old=old_gallery.npy --gallery-ids ids.npy \\
             --queries old=old_queries.npy --queries xbt=xbt_queries.npy --query-ids query_ids.npy --output out
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError
from .evaluation import BlendedText, EvalConfig, NativeSpace, Space, evaluate, load_eval_set
from .retrieval import DEFAULT_KS, EXACT, SearchConfig, load_embeddings

RESERVED = ("old", "new", "xbt", "xbt+old", "old-denoised")


def _named(values: Sequence[str], flag: str) -> dict[str, str]:
    named = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{flag} expects NAME=PATH, got {value!r}.")
        if name in named:
            raise InputError(f"{flag} names {name!r} twice.")
        named[name] = path
    return named


def model_spaces(old: str, new: str, adapter: str | None, blend_alpha: float, device: str) -> list[Space]:
    """Spaces for the old and new backbones and, with an adapter (folder or Hub id), ``xbt`` and ``xbt+old``."""
    from .backbones import load_backbone

    encoders = {name: load_backbone(reference, device=device) for name, reference in (("old", old), ("new", new))}
    spaces = {name: Space(name, encoder, encoder.fingerprint,
                          info={"reference": str(encoder.reference), "embed_dim": encoder.embed_dim})
              for name, encoder in encoders.items()}
    if adapter is not None:
        from .model import XBTModel

        model = XBTModel.from_pretrained(adapter, backbone=encoders["new"], device=device)
        # LoRA now sits in the new backbone; its native space is the same model with the adapters off.
        spaces["new"] = Space("new", NativeSpace(model), encoders["new"].fingerprint, info=spaces["new"].info)
        model.use_old_encoder(encoders["old"])  # refuses an old model ψ was not made for
        info = {"adapter": str(adapter), "fingerprint_of": "new backbone + ψ + LoRA weights"}
        spaces["xbt"] = Space("xbt", model, model.fingerprint, info=info)
        spaces["xbt+old"] = Space("xbt+old", BlendedText("xbt", "old", blend_alpha),
                                  f"{model.fingerprint}+old@{blend_alpha}", ("text",),
                                  info={**info, "blend_alpha": blend_alpha})
    return list(spaces.values())


def load_projections(named: dict[str, str], spaces: list[Space]) -> dict:
    """Baseline projections (saved :class:`~xbt.projection.Projection` folders), checked against the models."""
    if not named:
        return {}
    from .projection import Projection

    fingerprints = {space.name: space.fingerprint for space in spaces}
    projections = {}
    for name, folder in named.items():
        if name in RESERVED:
            raise InputError(f"--projection name {name!r} is reserved for a space; pick another (e.g. 'procrustes').")
        if not Path(folder).is_dir():
            raise InputError(f"Projection folder {folder!r} (for {name!r}) does not exist.")
        projection = Projection.from_pretrained(folder).eval()
        projection.check_spaces(source=fingerprints.get("new"), target=fingerprints.get("old"))
        projections[name] = projection
    return projections


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xbt eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = p.add_argument_group("models and evaluation set")
    models.add_argument("--old", help="old model reference (its space holds the gallery)")
    models.add_argument("--new", help="new model reference (native new space)")
    models.add_argument("--adapter", help="xbt adapter folder (or Hub snapshot) for the xbt and xbt+old spaces")
    models.add_argument("--projection", action="append", default=[], metavar="NAME=DIR",
                        help="a baseline projection folder (Procrustes, least squares, stage-1 ψ); repeatable")
    models.add_argument("--blend-alpha", type=float, default=0.5, help="weight of the old text encoder in xbt+old")
    models.add_argument("--eval-set", help="image-text pairs: image folder with metadata.jsonl/.csv, parquet, "
                                           "save_to_disk folder or Hub dataset (the training loaders' sources)")
    models.add_argument("--id-column", help="integer image ids of the evaluation set (to line up with a stored "
                                            "gallery's ids); default: positions")
    models.add_argument("--split", default="test", help="split of a Hub or save_to_disk evaluation set")
    stored = p.add_argument_group("stored embeddings (.npy, .safetensors, faiss index)")
    stored.add_argument("--gallery", action="append", default=[], metavar="SPACE=FILE",
                        help="an existing gallery of that space (e.g. old=prod.faiss); repeatable")
    stored.add_argument("--gallery-ids", help="ids of the stored galleries' rows (.npy or one integer per line)")
    stored.add_argument("--gallery-modality", choices=("image", "text"), default="image",
                        help="what stored galleries hold; stored queries are the other modality")
    stored.add_argument("--queries", action="append", default=[], metavar="NAME=FILE",
                        help="stored query embeddings, ids = their relevant gallery ids; repeatable")
    stored.add_argument("--query-ids", help="ids for the stored query rows (.npy or one integer per line)")
    search = p.add_argument_group("search and metrics")
    search.add_argument("--index-factory", default=EXACT, help="faiss index factory, e.g. IVF1024,Flat or HNSW32")
    search.add_argument("--search-parameters", help="faiss parameters, e.g. nprobe=32 or efSearch=128")
    search.add_argument("--shard-rows", type=int, help="gallery rows per search shard (default: 1 GiB)")
    search.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    search.add_argument("--seed", type=int, default=0, help="picks the re-embedded items of the backfill curve")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", help="embedding cache (default OUTPUT/cache)")
    p.add_argument("--output", required=True, help="folder for metrics.json, report.md and the plots")
    return p


def _check_options(options: argparse.Namespace) -> None:
    if options.eval_set is None and not (options.gallery and options.queries):
        raise InputError("Give --eval-set (with --old and --new), or stored --gallery and --queries embeddings.")
    if options.eval_set is not None and not (options.old and options.new):
        raise InputError("--eval-set needs both --old and --new model references.")
    if (options.adapter or options.projection) and options.eval_set is None:
        raise InputError("--adapter and --projection encode the evaluation set: give --eval-set too.")
    if any(k < 1 for k in options.ks):
        raise InputError(f"--ks must be positive, got {options.ks}.")


def main(argv: Sequence[str] | None = None) -> int:
    options = parser().parse_args(argv)
    _check_options(options)
    # Everything cheap to check is read and checked before any model is loaded or anything encoded.
    eval_set = load_eval_set(options.eval_set, options.id_column, options.split) if options.eval_set else None
    galleries = {name: load_embeddings(path, options.gallery_ids)
                 for name, path in _named(options.gallery, "--gallery").items()}
    queries = {name: load_embeddings(path, options.query_ids)
               for name, path in _named(options.queries, "--queries").items()}
    projection_dirs = _named(options.projection, "--projection")
    spaces = model_spaces(options.old, options.new, options.adapter, options.blend_alpha, options.device) \
        if eval_set is not None else []
    config = EvalConfig(ks=tuple(options.ks), seed=options.seed,
                        search=SearchConfig(options.index_factory, options.search_parameters, options.shard_rows))
    output = Path(options.output)
    report = evaluate(eval_set, spaces, load_projections(projection_dirs, spaces), galleries, queries,
                      options.gallery_modality, config, options.cache_dir or output / "cache")

    from .report import write_report

    paths = write_report(report, output)
    k = str(options.ks[0])
    for cell in report["cells"]:
        compatible = "" if cell["compatible"] is None else ("  compatible" if cell["compatible"][k] else "  NOT compatible")
        print(f"{cell['direction']:>11} {cell['name']:<24} R@{k} {cell['recall'][k]:5.1f}{compatible}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0

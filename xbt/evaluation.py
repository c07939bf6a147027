"""Orchestration of an evaluation: encode each space once (cached on disk), build every cell, write the report.

A *space encoder* is any object with ``encode_text(list[str]) -> Tensor`` and
``encode_image(list[PIL.Image | path]) -> Tensor`` (a :class:`~xbt.backbones.DualEncoder`,
an ``XBTModel``). A *baseline* is a callable mapping new-space embeddings to old-space
ones (a :class:`~xbt.projection.Projection`); it is applied to the cached ``new``
embeddings, never by re-encoding.

Spaces: ``old``, ``new``, ``xbt``, ``xbt+old`` (text queries only), every baseline by its
name, ``old-denoised`` (text→image only: the mean of the old embeddings of an image's
captions, the best an old text query could do against the old image gallery), and any
stored query set or gallery the user brings. Cells (when both spaces exist and their
dimensions agree): ``s→s`` for every space with both modalities, ``s→old`` for every
space of the old dimension, ``old→xbt`` and ``xbt+old→xbt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from .data.pairs import FolderImages, PairDataConfig, PairSource, open_pairs
from .errors import InputError
from .report import cells_to_json
from .retrieval import (
    DEFAULT_KS,
    DIRECTIONS,
    Labeled,
    SearchConfig,
    backfill_curve,
    check_pair,
    check_vectors,
    evaluate_cell,
    score_against_reference,
    uses_gpu,
)

logger = logging.getLogger(__name__)

MODALITIES = ("text", "image")
QUERY_MODALITY = {"text→image": "text", "image→text": "image"}
GALLERY_MODALITY = {"text→image": "image", "image→text": "text"}
QUERY_ONLY = {"xbt+old", "old-denoised"}  # text query spaces with no gallery of their own
ENCODE_CHUNK = 512  # items per encoder call: bounds memory (images are opened per chunk) and drives the bar


class SpaceEncoder(Protocol):
    def encode_text(self, texts: list[str]) -> torch.Tensor: ...

    def encode_image(self, images: list) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------
# Evaluation set: any map-style image-text source of xbt.data.pairs (folder, parquet, save_to_disk, Hub)
# ---------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """Images with one or more captions each, read through the training pair loader.

    ``ids`` are the integer labels of the images: the source's ids when they are all integers (e.g.
    ``--id-column`` naming the ids of the stored old gallery), else the images' positions.
    """

    source: PairSource
    ids: np.ndarray

    @property
    def captions(self) -> list[list[str]]:
        return self.source.captions

    @property
    def texts(self) -> list[str]:
        return [caption for captions in self.captions for caption in captions]

    @property
    def caption_ids(self) -> np.ndarray:
        """The id of the image each caption (in :attr:`texts` order) describes."""
        return np.repeat(self.ids, [len(captions) for captions in self.captions])

    def load_images(self, positions: Sequence[int]) -> list:
        return [self.source.images.load(int(position)) for position in positions]

    @cached_property
    def fingerprint(self) -> str:
        """Hash of ids, captions and image content: cached embeddings are reused only for this exact set."""
        digest = hashlib.sha256(json.dumps([self.ids.tolist(), self.captions]).encode())
        images = self.source.images
        if isinstance(images, FolderImages):
            for name in images.file_names:
                digest.update(hashlib.sha256((images.root / name).read_bytes()).digest())
        else:  # a datasets table: its own content fingerprint
            digest.update(str(getattr(images.table, "_fingerprint", self.source.description)).encode())
        return digest.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source.description, "images": len(self.ids), "captions": len(self.texts),
                "skipped_without_caption": len(self.source.skipped), "fingerprint": self.fingerprint}


def load_eval_set(source: str | Path, id_column: str | None = None, split: str = "test",
                  data_format: str = "auto") -> EvalSet:
    """Open an evaluation set with :func:`xbt.data.pairs.open_pairs` and check it before anything is encoded
    (for image folders: that every listed file exists)."""
    pairs = open_pairs(PairDataConfig(source=str(source), format=data_format, split=split, id_column=id_column,
                                      shuffle=False))
    if pairs.streamed:
        raise InputError(f"{pairs.description}: evaluation needs every image by position; tar shards are streamed. "
                         f"Use an image folder, parquet or save_to_disk copy of the set.")
    if isinstance(pairs.images, FolderImages):
        missing = [name for name in pairs.images.file_names if not (pairs.images.root / name).is_file()]
        if missing:
            raise InputError(f"{pairs.description}: {len(missing)} image files listed in the metadata do not exist "
                             f"(e.g. {missing[:3]}); fix the metadata or restore the files.")
    try:
        ids = np.array([int(value) for value in pairs.ids], dtype=np.int64)
    except ValueError:
        if id_column is not None:
            raise InputError(f"{pairs.description}: the id column {id_column!r} must hold integers (the ids of the "
                             f"stored gallery), e.g. {pairs.ids[:3]}.") from None
        ids = np.arange(len(pairs.ids), dtype=np.int64)  # file names: positions label the images
    return EvalSet(pairs, ids)


# ---------------------------------------------------------------------------------
# Spaces and the embedding cache
# ---------------------------------------------------------------------------------
@dataclass
class Space:
    """A named embedding space: how to encode into it, and the fingerprint that keys its cache."""

    name: str
    encoder: SpaceEncoder
    fingerprint: str | None  # None: never cached
    modalities: tuple[str, ...] = MODALITIES
    info: dict[str, Any] = field(default_factory=dict)


class BlendedText:
    """Text queries of the ``adapted`` space blended with the ``old`` space's at ``alpha``.

    The same as ``XBTModel.encode_text(texts, blend_old=alpha)``, but computed from both spaces'
    embeddings of the evaluation captions, which are encoded anyway: nothing is encoded twice.
    """

    def __init__(self, adapted: str, old: str, alpha: float):
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"The blend weight alpha must lie in [0, 1], got {alpha}.")
        self.adapted, self.old, self.alpha = adapted, old, alpha

    def blend(self, adapted: np.ndarray, old: np.ndarray) -> np.ndarray:
        from .model import blend_embeddings

        return blend_embeddings(torch.from_numpy(adapted), torch.from_numpy(old), self.alpha).numpy()


class NativeSpace:
    """The new model's own space from an XBTModel (adapters off), so the new backbone is loaded once."""

    def __init__(self, model):
        self.model = model

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(texts, space="new")

    def encode_image(self, images: list) -> torch.Tensor:
        return self.model.encode_image(images, space="new")


def _encode(function: Callable[[list], torch.Tensor], items: list, desc: str) -> np.ndarray:
    chunks = []
    with tqdm(total=len(items), desc=desc, unit="item") as bar:
        for start in range(0, len(items), ENCODE_CHUNK):
            chunk = items[start:start + ENCODE_CHUNK]
            chunks.append(torch.as_tensor(function(chunk)).detach().float().cpu().numpy())
            bar.update(len(chunk))
    return np.concatenate(chunks)


def encode_space(space: Space, eval_set: EvalSet, modality: str, cache_dir: Path | None) -> np.ndarray:
    """Embeddings of the set's captions or images in ``space``, read from the cache when the
    space's and the set's fingerprints match what the cache file records."""
    key = None if space.fingerprint is None else f"{space.fingerprint}/{eval_set.fingerprint}"
    path = None if cache_dir is None else cache_dir / f"{space.name.replace('+', '_')}-{modality}.safetensors"
    if path is not None and key is not None and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "np") as handle:
            if (handle.metadata() or {}).get("key") == key:
                logger.info("Using cached %s %s embeddings from %s", space.name, modality, path)
                return load_file(str(path))["embeddings"]
    if modality == "text":
        items, function = eval_set.texts, space.encoder.encode_text
    else:  # positions: images are decoded one chunk at a time
        items = list(range(len(eval_set.ids)))
        function = lambda positions: space.encoder.encode_image(eval_set.load_images(positions))  # noqa: E731
    vectors = _encode(function, items, f"encode {space.name} {modality}")
    if vectors.shape[0] != len(items):
        raise InputError(f"The {space.name} encoder returned {vectors.shape[0]} vectors for {len(items)} {modality}s.")
    if path is not None and key is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file({"embeddings": np.ascontiguousarray(vectors)}, str(partial), metadata={"key": key})
        partial.replace(path)  # a killed run never leaves a half-written cache file
    return vectors


def _restricted(labeled: Labeled, ids: np.ndarray) -> Labeled:
    """The rows whose label is one of ``ids`` (all of them when nothing else is there)."""
    keep = np.isin(labeled.labels, ids)
    return labeled if keep.all() else Labeled(np.asarray(labeled.vectors[keep]), labeled.labels[keep])


def _denoised(old_texts: Labeled, image_ids: np.ndarray) -> Labeled:
    """One query per image: the normalised mean of the old embeddings of its captions."""
    rows = {image_id: row for row, image_id in enumerate(image_ids.tolist())}
    sums = np.zeros((len(image_ids), old_texts.dim), dtype=np.float64)
    np.add.at(sums, [rows[i] for i in old_texts.labels.tolist()], old_texts.vectors)
    return Labeled((sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32), image_ids)


# ---------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------
def plan_cells(queries: dict[str, Labeled], galleries: dict[str, Labeled]) -> list[tuple[str, str]]:
    """(query, gallery) pairs that make sense, in report order: self-space, against old, against xbt."""
    def fits(q: str, g: str) -> bool:
        return q in queries and g in galleries and queries[q].dim == galleries[g].dim

    pairs = [(s, s) for s in ("old", "new") if fits(s, s)]
    pairs += [(q, "old") for q in queries if q != "old" and fits(q, "old")]
    pairs += [(s, s) for s in galleries if s not in ("old", "new") and fits(s, s)]
    pairs += [(q, "xbt") for q in ("old", "xbt+old") if fits(q, "xbt")]
    return list(dict.fromkeys(pairs))


@dataclass
class EvalConfig:
    """What to measure. ``fractions`` is the backfill grid; ``seed`` picks the re-embedded items."""

    ks: tuple[int, ...] = DEFAULT_KS
    fractions: tuple[float, ...] = tuple(i / 10 for i in range(11))
    seed: int = 0
    search: SearchConfig = field(default_factory=SearchConfig)


def _check_dims(queries: dict[str, int], galleries: dict[str, int], what: str) -> None:
    """Every query space except ``new`` lives in the old space; a space with its own gallery matches it."""
    problems = [f"{q} queries are {dim}-d but the {g} gallery is {galleries[g]}-d"
                for q, dim in queries.items() for g in {q, "old"}
                if g in galleries and galleries[g] != dim and not (q == "new" and g == "old")]
    if problems:
        raise InputError(f"{what}: {'; '.join(problems)}. Queries and gallery must come from the same "
                         f"embedding space (was a file made with another model?).")


def _replaceable_rows(gallery: Labeled, items: Labeled) -> np.ndarray | None:
    """Rows of ``gallery`` holding ``items`` (by id), or None when they cannot be matched one to one."""
    if np.array_equal(gallery.labels, items.labels):
        return np.arange(len(items))
    unique, first = np.unique(gallery.labels, return_index=True)
    if len(unique) != len(gallery) or len(np.unique(items.labels)) != len(items):
        return None  # caption galleries repeat ids: no one-to-one match with a stored gallery
    position = np.minimum(np.searchsorted(unique, items.labels), len(unique) - 1)
    return first[position] if np.array_equal(unique[position], items.labels) else None


def _check_inputs(eval_set: EvalSet | None, spaces: Sequence[Space], baselines: dict,
                  stored_galleries: dict[str, Labeled], stored_queries: dict[str, Labeled], stored_modality: str) -> None:
    """Everything that can be checked before the first encoding: vectors, dimensions, ids."""
    if stored_modality not in MODALITIES:
        raise InputError(f"stored_modality must be 'image' or 'text', got {stored_modality!r}.")
    if eval_set is None and not (stored_galleries and stored_queries):
        raise InputError("Nothing to evaluate: give an evaluation set, or stored galleries and stored queries.")
    if baselines and not any(s.name == "new" for s in spaces):
        raise InputError("Baseline projections map new-space embeddings: the 'new' space is needed too.")
    for name, stored in {**stored_galleries, **stored_queries}.items():
        check_vectors(stored.vectors, f"stored {name}")
    model_dims = {s.name: getattr(s.encoder, "embed_dim", None) for s in spaces}
    for name, stored in stored_galleries.items():
        if model_dims.get(name) and model_dims[name] != stored.dim:
            raise InputError(f"The stored {name} gallery has dimension {stored.dim}, but the {name} model embeds "
                             f"into {model_dims[name]}; it was made with another model.")
    gallery_dims = {**{n: d for n, d in model_dims.items() if d}, **{n: v.dim for n, v in stored_galleries.items()}}
    _check_dims({n: v.dim for n, v in stored_queries.items()}, gallery_dims, "Stored queries")
    known_ids = np.concatenate([eval_set.ids if eval_set is not None else np.zeros(0, np.int64)]
                               + [v.labels for v in stored_galleries.values()])
    for name, stored in stored_queries.items():
        missing = np.setdiff1d(stored.labels, known_ids)
        if missing.size:
            raise InputError(f"{missing.size} ids of the stored {name} queries are in no gallery (e.g. "
                             f"{missing[:5].tolist()}); the ids of the queries must line up with the gallery's ids.")
    for name, stored in stored_galleries.items() if eval_set is not None else ():
        missing = np.setdiff1d(eval_set.ids, stored.labels)
        if missing.size:
            raise InputError(f"{missing.size} evaluation image ids are not in the stored {name} gallery (e.g. "
                             f"{missing[:5].tolist()}); the set's ids must line up with the gallery's ids.")


def _encode_all(eval_set: EvalSet, spaces: Sequence[Space], baselines: dict, skip_images: set[str],
                cache: Path | None) -> tuple[dict[str, Labeled], dict[str, Labeled]]:
    """Text and image embeddings of the set in every space; baselines applied to the cached ``new`` ones."""
    owners = eval_set.caption_ids
    text: dict[str, Labeled] = {}
    image: dict[str, Labeled] = {}
    for space in spaces:
        if isinstance(space.encoder, BlendedText):
            blend = space.encoder
            if blend.adapted not in text or blend.old not in text:
                raise InputError(f"Space {space.name!r} blends {blend.adapted!r} with {blend.old!r}: list both "
                                 f"spaces before it.")
            text[space.name] = Labeled(blend.blend(text[blend.adapted].vectors, text[blend.old].vectors), owners)
            continue
        if "text" in space.modalities:
            text[space.name] = Labeled(encode_space(space, eval_set, "text", cache), owners)
        if "image" in space.modalities and space.name not in skip_images:
            image[space.name] = Labeled(encode_space(space, eval_set, "image", cache), eval_set.ids)
    with torch.no_grad():
        for name, projection in baselines.items():
            for encoded in (text, image):
                if "new" in encoded:
                    new = encoded["new"]
                    encoded[name] = Labeled(projection(torch.from_numpy(new.vectors)).float().numpy(), new.labels)
    return text, image


def _direction_pools(eval_set: EvalSet | None, text: dict[str, Labeled], image: dict[str, Labeled],
                     stored_queries: dict[str, Labeled], stored_modality: str) -> dict[str, tuple[dict, dict]]:
    """(query spaces, gallery spaces) per direction. Query-only spaces never serve as galleries; stored
    galleries serve as queries only for the evaluation set's items (distractors have no captions or images)."""
    pools = {}
    for direction in DIRECTIONS:
        if eval_set is None and GALLERY_MODALITY[direction] != stored_modality:
            continue
        source = text if QUERY_MODALITY[direction] == "text" else image
        queries = {k: v if eval_set is None else _restricted(v, eval_set.ids) for k, v in source.items()}
        galleries = {k: v for k, v in (image if GALLERY_MODALITY[direction] == "image" else text).items()
                     if k not in QUERY_ONLY}
        if direction == "text→image" and "old" in queries and eval_set is not None:
            queries["old-denoised"] = _denoised(queries["old"], eval_set.ids)
        if GALLERY_MODALITY[direction] == stored_modality:
            queries.update(stored_queries)
        pools[direction] = (queries, galleries)
    return pools


def _backfill_curves(pools: dict[str, tuple[dict, dict]], config: EvalConfig) -> dict[str, dict]:
    """The backfill curve per direction where xbt queries, the old gallery and its xbt re-embedding exist."""
    curves = {}
    for direction, (queries, galleries) in pools.items():
        if not {"xbt", "old"} <= set(galleries) or "xbt" not in queries:
            continue
        rows = _replaceable_rows(galleries["old"], galleries["xbt"])
        if rows is None:
            logger.warning("No backfill curve for %s: the old gallery cannot be matched item by item with the xbt "
                           "one.", direction)
            continue
        curves[direction] = {"query": "xbt", **backfill_curve(
            queries["xbt"], galleries["old"], galleries["xbt"].vectors, rows, config.fractions, config.seed,
            config.ks, config.search, validate=False)}  # every vector was checked before the first search
    return curves


def evaluate(
    eval_set: EvalSet | None = None,
    spaces: Sequence[Space] = (),
    baselines: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    stored_galleries: dict[str, Labeled] | None = None,
    stored_queries: dict[str, Labeled] | None = None,
    stored_modality: str = "image",
    config: EvalConfig | None = None,
    cache_dir: str | Path | None = None,
) -> dict:
    """Encode, search and score; returns the report dict (see :mod:`xbt.report`).

    ``stored_galleries`` are the user's existing embeddings (``stored_modality`` ``image``: galleries for
    text→image, the queries in ``stored_queries`` are text; ``text``: the other way round). A stored
    gallery replaces the encoded gallery of the same space (that space's encoder does not run on that
    modality), and may hold more items (distractors) as long as every evaluation item's id is in it.
    """
    config = config or EvalConfig()
    baselines = baselines or {}
    stored_galleries, stored_queries = stored_galleries or {}, stored_queries or {}
    _check_inputs(eval_set, spaces, baselines, stored_galleries, stored_queries, stored_modality)

    text: dict[str, Labeled] = {}
    image: dict[str, Labeled] = {}
    if eval_set is not None:
        skip_images = set(stored_galleries) if stored_modality == "image" else set()
        text, image = _encode_all(eval_set, spaces, baselines, skip_images,
                                  Path(cache_dir) if cache_dir is not None else None)
    (image if stored_modality == "image" else text).update(stored_galleries)
    pools = _direction_pools(eval_set, text, image, stored_queries, stored_modality)

    # Every pair is checked before the first search.
    plan = [(d, q, g) for d, (queries, galleries) in pools.items() for q, g in plan_cells(queries, galleries)]
    if not plan:
        raise InputError("No query space fits any gallery (dimensions or names differ); nothing to evaluate.")
    for modality, encoded in (("text", text), ("image", image)):
        for name, labeled in encoded.items():
            if name not in stored_galleries:  # stored ones were checked on arrival
                check_vectors(labeled.vectors, f"{name} {modality} embeddings")
    for direction, (queries, galleries) in pools.items():
        _check_dims({n: v.dim for n, v in queries.items()}, {n: v.dim for n, v in galleries.items()}, direction)
    for direction, q, g in plan:
        check_pair(pools[direction][0][q], pools[direction][1][g], f"{direction} {q}→{g}", vectors=False)

    cells = [evaluate_cell(d, q, g, pools[d][0][q], pools[d][1][g], config.ks, config.search, validate=False)
             for d, q, g in plan]
    score_against_reference(cells)

    dataset: dict[str, Any] = eval_set.describe() if eval_set is not None else {}
    dataset["stored"] = {f"{name} ({kind})": {"items": len(v), "dim": v.dim}
                         for kind, stored in (("gallery", stored_galleries), ("queries", stored_queries))
                         for name, v in stored.items()}
    from . import __version__

    return {
        "xbt_version": __version__,
        "models": {s.name: {"fingerprint": s.fingerprint, **s.info} for s in spaces},
        "baselines": sorted(baselines),
        "dataset": dataset,
        "search": {"index_factory": config.search.index_factory, "search_parameters": config.search.search_parameters,
                   "shard_rows": config.search.shard_rows, "gpu": uses_gpu(config.search)},
        "ks": list(config.ks),
        "cells": cells_to_json(cells),
        "backfill": _backfill_curves(pools, config),
    }

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
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from .errors import InputError
from .report import cells_to_json
from .retrieval import (
    DEFAULT_KS,
    DIRECTIONS,
    CellResult,
    Labeled,
    SearchConfig,
    backfill_curve,
    check_pair,
    check_vectors,
    evaluate_cell,
    score_against_reference,
)

logger = logging.getLogger(__name__)

MODALITIES = ("text", "image")
QUERY_MODALITY = {"text→image": "text", "image→text": "image"}
GALLERY_MODALITY = {"text→image": "image", "image→text": "text"}
ENCODE_CHUNK = 512  # items per encoder call: bounds memory (images are opened per chunk) and drives the bar


class SpaceEncoder(Protocol):
    def encode_text(self, texts: list[str]) -> torch.Tensor: ...

    def encode_image(self, images: list) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------
# Evaluation set (image folder + metadata). The stage-2 pair loader (xbt/data) will replace this reader.
# ---------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """Images with one or more captions each; ``ids`` label images (default: their row)."""

    root: Path
    files: list[Path]
    captions: list[list[str]]
    ids: np.ndarray

    @property
    def texts(self) -> list[str]:
        return [caption for captions in self.captions for caption in captions]

    @property
    def caption_ids(self) -> np.ndarray:
        """The id of the image each caption (in :attr:`texts` order) describes."""
        return np.repeat(self.ids, [len(captions) for captions in self.captions])

    def fingerprint(self) -> str:
        """Hash of ids, captions and image bytes: cached embeddings are reused only for this exact set."""
        digest = hashlib.sha256()
        for image_id, path, captions in zip(self.ids.tolist(), self.files, self.captions):
            digest.update(json.dumps([image_id, path.name, captions]).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.root), "images": len(self.files), "captions": len(self.texts),
                "fingerprint": self.fingerprint()}


def _metadata_rows(folder: Path) -> list[dict]:
    jsonl, csv_path = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file():
        rows = []
        for number, line in enumerate(jsonl.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise InputError(f"{jsonl}:{number} is not valid JSON ({error}).") from error
        return rows
    if csv_path.is_file():
        import csv

        with csv_path.open(newline="") as handle:  # one row per caption; rows of one file_name are grouped
            grouped: dict[str, dict] = {}
            for row in csv.DictReader(handle):
                entry = grouped.setdefault(row.get("file_name") or "", {"file_name": row.get("file_name"),
                                                                        "captions": [], "id": row.get("id")})
                entry["captions"].append(row.get("caption"))
        return [{k: v for k, v in entry.items() if v is not None} for entry in grouped.values()]
    raise InputError(f"Evaluation set {str(folder)!r} has no metadata.jsonl or metadata.csv; write one line "
                     f'per image: {{"file_name": "00001.png", "captions": ["...", "..."]}}.')


def load_eval_set(folder: str | Path) -> EvalSet:
    """Read an image folder with ``metadata.jsonl`` (``file_name``, ``captions`` or ``caption``, optional
    integer ``id``) or ``metadata.csv`` (columns ``file_name``, ``caption``, optional ``id``; one row per
    caption). Every problem is reported before anything is encoded."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"Evaluation set folder {str(root)!r} does not exist.")
    files, captions, ids = [], [], []
    for number, row in enumerate(_metadata_rows(root), 1):
        name = row.get("file_name")
        texts = row.get("captions", row.get("caption"))
        texts = [texts] if isinstance(texts, str) else texts
        where = f"{root.name} metadata entry {number} ({name!r})"
        if not name or not (root / name).is_file():
            raise InputError(f"{where}: image file missing; every entry needs an existing file_name.")
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise InputError(f"{where}: needs at least one non-empty caption, got {texts!r}.")
        try:
            ids.append(int(row.get("id", number - 1)))
        except (TypeError, ValueError) as error:
            raise InputError(f"{where}: id {row.get('id')!r} is not an integer.") from error
        files.append(root / name)
        captions.append(list(texts))
    if not files:
        raise InputError(f"Evaluation set {str(root)!r} is empty; it needs at least one captioned image.")
    ids_array = np.asarray(ids, dtype=np.int64)
    if len(np.unique(ids_array)) != len(ids_array) or len({f.name for f in files}) != len(files):
        raise InputError(f"Evaluation set {str(root)!r} lists an image id or file twice; ids and files must be unique.")
    return EvalSet(root, files, captions, ids_array)


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
    """Text queries of an adapter blended with the old text encoder's (``encode_text(texts, blend_old=alpha)``)."""

    def __init__(self, model, alpha: float):
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"The blend weight alpha must lie in [0, 1], got {alpha}.")
        self.model, self.alpha = model, alpha

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(texts, blend_old=self.alpha)


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
    key = None if space.fingerprint is None else f"{space.fingerprint}/{eval_set.fingerprint()}"
    path = None if cache_dir is None else cache_dir / f"{space.name.replace('+', '_')}-{modality}.safetensors"
    if path is not None and key is not None and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "np") as handle:
            if (handle.metadata() or {}).get("key") == key:
                logger.info("Using cached %s %s embeddings from %s", space.name, modality, path)
                return load_file(str(path))["embeddings"]
    items = eval_set.texts if modality == "text" else [str(f) for f in eval_set.files]
    function = space.encoder.encode_text if modality == "text" else space.encoder.encode_image
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


def _replaceable_rows(gallery: Labeled, items: Labeled) -> np.ndarray | None:
    """Rows of ``gallery`` holding ``items`` (by id), or None when they cannot be matched one to one."""
    if np.array_equal(gallery.labels, items.labels):
        return np.arange(len(items))
    unique, first = np.unique(gallery.labels, return_index=True)
    if len(unique) != len(gallery) or len(np.unique(items.labels)) != len(items):
        return None  # caption galleries repeat ids: no one-to-one match with a stored gallery
    position = np.searchsorted(unique, items.labels)
    return first[position]


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
    gallery replaces the encoded gallery of the same space, and may hold more items (distractors) as
    long as every evaluation item's id is in it.
    """
    config = config or EvalConfig()
    baselines = baselines or {}
    stored_galleries, stored_queries = stored_galleries or {}, stored_queries or {}
    if stored_modality not in MODALITIES:
        raise InputError(f"stored_modality must be 'image' or 'text', got {stored_modality!r}.")
    if eval_set is None and not (stored_galleries and stored_queries):
        raise InputError("Nothing to evaluate: give an evaluation set, or stored galleries and stored queries.")
    if baselines and not any(s.name == "new" for s in spaces):
        raise InputError("Baseline projections map new-space embeddings: the 'new' space is needed too.")
    for name, stored in {**stored_galleries, **stored_queries}.items():
        check_vectors(stored.vectors, f"stored {name}")
    expected = {s.name: getattr(s.encoder, "embed_dim", None) for s in spaces}
    for name, stored in stored_galleries.items():
        if expected.get(name) and expected[name] != stored.dim:
            raise InputError(f"The stored {name} gallery has dimension {stored.dim}, but the {name} model embeds "
                             f"into {expected[name]}; it was made with another model.")
    if eval_set is not None and stored_modality == "image":
        for name, stored in stored_galleries.items():
            missing = np.setdiff1d(eval_set.ids, stored.labels)
            if missing.size:
                raise InputError(f"{missing.size} evaluation image ids are not in the stored {name} gallery (e.g. "
                                 f"{missing[:5].tolist()}); the set's ids must line up with the gallery's ids.")

    # Encode every space once (skipping encodings a stored gallery replaces).
    cache = Path(cache_dir) if cache_dir is not None else None
    text: dict[str, Labeled] = {}
    image: dict[str, Labeled] = {}
    encoded_images: dict[str, Labeled] = {}
    if eval_set is not None:
        owners = eval_set.caption_ids
        for space in spaces:
            if "text" in space.modalities:
                text[space.name] = Labeled(encode_space(space, eval_set, "text", cache), owners)
            if "image" in space.modalities and not (stored_modality == "image" and space.name in stored_galleries):
                encoded_images[space.name] = Labeled(encode_space(space, eval_set, "image", cache), eval_set.ids)
        if "new" in text:
            for name, projection in baselines.items():
                with torch.no_grad():
                    text[name] = Labeled(projection(torch.from_numpy(text["new"].vectors)).float().numpy(), owners)
                    if "new" in encoded_images:
                        encoded_images[name] = Labeled(
                            projection(torch.from_numpy(encoded_images["new"].vectors)).float().numpy(), eval_set.ids)
        image.update(encoded_images)
    stored_query_modality = "text" if stored_modality == "image" else "image"
    (image if stored_modality == "image" else text).update(stored_galleries)

    # Queries and galleries per direction; query-only spaces never serve as galleries. Stored galleries
    # serve as queries only for the evaluation set's items (distractors have no captions or images).
    query_only = {"xbt+old", "old-denoised"}
    directions = {}
    for direction in DIRECTIONS:
        if eval_set is None and GALLERY_MODALITY[direction] != stored_modality:
            continue
        pool = text if QUERY_MODALITY[direction] == "text" else image
        query_pool = {k: v if eval_set is None else _restricted(v, eval_set.ids) for k, v in pool.items()}
        gallery_pool = {k: v for k, v in (image if GALLERY_MODALITY[direction] == "image" else text).items()
                        if k not in query_only}
        if direction == "text→image" and "old" in text and eval_set is not None:
            query_pool["old-denoised"] = _denoised(query_pool["old"], eval_set.ids)
        if QUERY_MODALITY[direction] == stored_query_modality:
            query_pool.update(stored_queries)
        directions[direction] = (query_pool, gallery_pool)

    # Validate every pair before the first search.
    plan = [(d, q, g) for d, (queries, galleries) in directions.items() for q, g in plan_cells(queries, galleries)]
    if not plan:
        raise InputError("No query space fits any gallery (dimensions or names differ); nothing to evaluate.")
    for name, labeled in {**{f"{k} text": v for k, v in text.items()}, **{f"{k} image": v for k, v in image.items()}}.items():
        check_vectors(labeled.vectors, name)
    for direction, q, g in plan:
        queries, galleries = directions[direction]
        check_pair(queries[q], galleries[g], f"{direction} {q}→{g}", vectors=False)

    cells: list[CellResult] = []
    for direction, q, g in plan:
        queries, galleries = directions[direction]
        cells.append(evaluate_cell(direction, q, g, queries[q], galleries[g], config.ks, config.search, validate=False))
    score_against_reference(cells)

    backfill = {}
    for direction, (queries, galleries) in directions.items():
        reembedded = galleries.get("xbt")
        if "xbt" not in queries or "old" not in galleries or reembedded is None:
            continue
        rows = _replaceable_rows(galleries["old"], reembedded)
        if rows is None:
            logger.warning("No backfill curve for %s: the stored old gallery cannot be matched item by item.", direction)
            continue
        backfill[direction] = {"query": "xbt", **backfill_curve(
            queries["xbt"], galleries["old"], reembedded.vectors, rows, config.fractions, config.seed, config.ks,
            config.search)}

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
                   "shard_rows": config.search.shard_rows},
        "ks": list(config.ks),
        "cells": cells_to_json(cells),
        "backfill": backfill,
    }

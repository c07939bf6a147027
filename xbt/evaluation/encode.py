"""The evaluation set, space entries built from encoders and derivations, and encoding through the embedding cache.

Every encoder space is encoded once per modality through :func:`xbt.cache.build_cache`
(the package's one embedding cache), keyed by the encoder's ``model_id`` and ``space_id``
and the evaluation set's fingerprint; derived spaces (baselines, blends, the denoised
reference) are computed from those vectors, never by encoding again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import EmbeddingSource, build_cache
from ..data.pairs import FolderImages, PairDataConfig, PairSource, open_pairs
from ..errors import InputError
from ..io import check_unique_ids
from ..model import SOURCE
from ..retrieval import Labeled
from ..spaces import check_same_space
from .plan import (
    ADAPTER,
    BASELINE,
    BLENDED,
    DENOISED,
    FULL_SPACE,
    NEW_MODEL,
    TEXT,
    Derivation,
    Space,
)

ENCODE_CHUNK = 512  # images decoded per encoder call: bounds memory whatever the cache's shard size
CACHE_DTYPE = "float32"  # evaluation vectors are cached exactly as the encoders return them


# ---------------------------------------------------------------------------------
# Evaluation set: any map-style image-text source of xbt.data.pairs (folder, parquet, save_to_disk, Hub)
# ---------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """Images with one or more captions each, read through the training pair loader.

    ``ids`` are the images' string ids, as in training: the source's id column when one is
    named (e.g. the ids of the stored old gallery), else the image file names of a folder or
    the row numbers of a table.
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
                  data_format: str = "auto", **options: Any) -> EvalSet:
    """Open an evaluation set with :func:`xbt.data.pairs.open_pairs` and check it before anything is encoded
    (for image folders: that every listed file exists; ids: that each names one image). ``options``: other
    :class:`~xbt.data.config.PairSourceConfig` options (``caption_column``, ``split_column``, ``split_values``)."""
    pairs = open_pairs(PairDataConfig(source=str(source), format=data_format, split=split, id_column=id_column,
                                      shuffle=False, **options))
    if pairs.streamed:
        raise InputError(f"{pairs.description}: evaluation needs every image by position; tar shards are streamed. "
                         f"Use an image folder, parquet or save_to_disk copy of the set.")
    if isinstance(pairs.images, FolderImages):
        missing = [name for name in pairs.images.file_names if not (pairs.images.root / name).is_file()]
        if missing:
            raise InputError(f"{pairs.description}: {len(missing)} image files listed in the metadata do not exist "
                             f"(e.g. {missing[:3]}); fix the metadata or restore the files.")
    ids = [str(value) for value in pairs.ids]
    check_unique_ids(ids, pairs.description)
    return EvalSet(pairs, np.asarray(ids, dtype=str))


# ---------------------------------------------------------------------------------
# Space entries
# ---------------------------------------------------------------------------------
def encoder_space(name: str, kind: str, encoder: Any, info: dict[str, Any] | None = None) -> Space:
    """A space embedded by an :class:`~xbt.spaces.Encoder`: its space id, dimension and model id are the encoder's."""
    return Space(name, kind, encoder.space_id, int(encoder.dim), encoder=encoder, model_id=encoder.model_id,
                 info=dict(info or {}))


class NativeEncoder:
    """The new model's own space from an ``XBTModel`` (adapters off), so the new backbone is loaded once."""

    def __init__(self, model: Any):
        self.model = model

    @property
    def dim(self) -> int:
        return int(self.model.backbone.dim)

    @property
    def space_id(self) -> str:
        return self.model.source_space_id

    @property
    def model_id(self) -> str:
        return self.model.backbone.model_id

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(texts, space=SOURCE)

    def encode_image(self, images: Sequence[Any]) -> torch.Tensor:
        return self.model.encode_image(images, space=SOURCE)


def native_space(name: str, model: Any, info: dict[str, Any] | None = None) -> Space:
    """The ``new model`` space of an ``XBTModel``'s backbone with its adapters switched off."""
    return encoder_space(name, NEW_MODEL, NativeEncoder(model), info)


def adapter_space(name: str, model: Any, info: dict[str, Any] | None = None) -> Space:
    """An adapter (``XBTModel``): writes into ``model.space_id`` (its target's space)."""
    return encoder_space(name, ADAPTER, model, info)


def apply_projection(projection: torch.nn.Module, vectors: Labeled, space_id: str) -> Labeled:
    """``projection`` (new-space vectors to ``space_id`` vectors) applied to ``vectors``, labels kept."""
    with torch.no_grad():
        mapped = projection(torch.from_numpy(np.asarray(vectors.vectors, dtype=np.float32))).float().numpy()
    return Labeled(mapped, vectors.labels, space_id)


def full_space(name: str, model: Any, info: dict[str, Any] | None = None) -> Space:
    """An adapter's full vectors (old dims + extra dims of a BT²/OCA ψ), in its own space
    :attr:`~xbt.model.XBTModel.full_space_id`."""
    return encoder_space(name, FULL_SPACE, model.full_encoder(), info)


def projected_space(name: str, projection: torch.nn.Module, source: Space, space_id: str,
                    info: dict[str, Any] | None = None) -> Space:
    """A ``baseline``: ``projection`` applied to ``source``'s vectors (both modalities), landing in ``space_id``."""
    def project(modality: str, vectors: Labeled) -> Labeled:
        return apply_projection(projection, vectors, space_id)

    return Space(name, BASELINE, space_id, int(projection.old_dim), derive=Derivation((source.name,), project),
                 model_id=None, info=dict(info or {}))


def blended_space(name: str, adapter: Space, old: Space, alpha: float | dict[str, float]) -> Space:
    """Queries of ``adapter`` blended on the sphere with ``old``'s at weight ``alpha``, as
    ``XBTModel.encode_text/encode_image(blend_old=alpha)`` do, from vectors that are encoded anyway.

    ``alpha``: one weight for text queries, or ``{modality: weight}`` (the adapter's fitted weights: text
    queries with the old text encoder, image queries with the old image encoder)."""
    weights = {TEXT: alpha} if not isinstance(alpha, dict) else dict(alpha)
    if any(not 0.0 <= value <= 1.0 for value in weights.values()):
        raise InputError(f"The blend weight alpha must lie in [0, 1], got {alpha}.")
    check_same_space(old.space_id, adapter.space_id, f"The adapter {adapter.name!r} blended with {old.name!r}")

    def blend(modality: str, adapted: Labeled, original: Labeled) -> Labeled:
        from ..model import blend_embeddings

        mixed = blend_embeddings(torch.from_numpy(np.asarray(adapted.vectors)),
                                 torch.from_numpy(np.asarray(original.vectors)), weights[modality]).numpy()
        return Labeled(mixed, adapted.labels, adapter.space_id)

    return Space(name, BLENDED, adapter.space_id, adapter.dim, derive=Derivation((adapter.name, old.name), blend),
                 modalities=tuple(weights), info={"blend_alpha": alpha if not isinstance(alpha, dict) else weights,
                                                   "blends": [adapter.name, old.name]})


def denoised_space(name: str, old: Space) -> Space:
    """One text query per image: the normalised mean of ``old``'s embeddings of its captions (the best an old
    text query could do against the old image gallery)."""
    def denoise(modality: str, texts: Labeled) -> Labeled:
        ids, first, owner = np.unique(texts.labels, return_index=True, return_inverse=True)
        sums = np.zeros((len(ids), texts.dim), dtype=np.float64)
        np.add.at(sums, owner.reshape(-1), np.asarray(texts.vectors, dtype=np.float64))
        order = np.argsort(first)  # images in the order their first caption appears
        means = sums[order] / np.linalg.norm(sums[order], axis=1, keepdims=True)
        return Labeled(means.astype(np.float32), ids[order], old.space_id)

    return Space(name, DENOISED, old.space_id, old.dim, derive=Derivation((old.name,), denoise), modalities=(TEXT,))


def stored_space(name: str, kind: str, space_id: str, dim: int) -> Space:
    """A space known only from stored vectors (no model runs)."""
    return Space(name, kind, space_id, dim)


# ---------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------
def _source(space: Space, eval_set: EvalSet, modality: str) -> EmbeddingSource:
    encoder = space.encoder
    if modality == TEXT:
        def encode(texts: Sequence[str]) -> torch.Tensor:
            return torch.as_tensor(encoder.encode_text(list(texts)))
    else:  # items are positions: images are decoded one chunk at a time
        def encode(positions: Sequence[int]) -> torch.Tensor:
            return torch.cat([torch.as_tensor(encoder.encode_image(eval_set.load_images(positions[i:i + ENCODE_CHUNK])))
                              for i in range(0, len(positions), ENCODE_CHUNK)])
    return EmbeddingSource(modality, f"{space.model_id}:{modality}", space.dim, encode, space.space_id)


def encode_space(space: Space, eval_set: EvalSet, modality: str, cache_dir: str | Path | None) -> Labeled:
    """The set's captions or images embedded in ``space``: read from the embedding cache under ``cache_dir`` when
    this encoder (model id, space id) already embedded this exact set, else encoded and cached."""
    items: list = eval_set.texts if modality == TEXT else list(range(len(eval_set.ids)))
    labels = eval_set.caption_ids if modality == TEXT else eval_set.ids
    source = _source(space, eval_set, modality)
    if cache_dir is None or space.model_id is None:
        vectors = source.encode(items).detach().float().cpu().numpy()
        if vectors.shape != (len(items), space.dim):
            raise InputError(f"The {space.name} encoder returned {vectors.shape} vectors for {len(items)} "
                             f"{modality}s of dimension {space.dim}.")
    else:
        cache = build_cache(cache_dir, [source], items, items_fingerprint=f"{eval_set.fingerprint}:{modality}",
                            dtype=CACHE_DTYPE, metadata={"evaluation_set": eval_set.source.description,
                                                         "space": space.name, "modality": modality})
        vectors = cache[modality].numpy()
    return Labeled(vectors, labels, space.space_id)


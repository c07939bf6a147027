"""Old-space vectors of the training data, for stage 2's old-space loss terms.

- Old TEXT embeddings of every training caption: computed once with the old model's
  text encoder through the embedding cache (:mod:`xbt.cache`), then read from it. The
  old model is loaded only when the cache has to be built.
- Old IMAGE embeddings of the training images: the user's gallery file (.npy,
  .safetensors or faiss), matched to the training images by id. The old image encoder
  is never run here.

Both are returned aligned with the pair source: row ``i`` of the image bank and of the
caption-mean bank belong to the source's image ``i``; caption rows are addressed by
(image position, caption index).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ..cache import EmbeddingSource, ProcessGroup, build_cache
from ..data.config import CacheConfig
from ..encoders import load_encoder, recorded_model_id
from ..errors import FingerprintMismatchError, InputError
from ..io import read_ids
from ..retrieval import load_embeddings
from ..spaces import check_same_space

logger = logging.getLogger(__name__)


@dataclass
class OldSpaceTargets:
    """Old-space vectors aligned with a pair source (all L2-normalised float32).

    Attributes:
        captions: ``(total captions, d_old)``, captions of image ``i`` at rows ``offsets[i]...``.
        offsets: ``(images + 1,)`` start row of each image's captions.
        caption_means: ``(images, d_old)`` normalised mean of each image's old caption embeddings.
        images: ``(images, d_old)`` stored old image embeddings, or ``None`` without a gallery.
    """

    captions: torch.Tensor
    offsets: torch.Tensor
    caption_means: torch.Tensor
    images: torch.Tensor | None = None

    def caption_rows(self, positions: torch.Tensor, caption_indices: torch.Tensor) -> torch.Tensor:
        return self.offsets[positions] + caption_indices

    def to(self, device: torch.device) -> OldSpaceTargets:
        move = (lambda t: None if t is None else t.to(device))
        return OldSpaceTargets(move(self.captions), move(self.offsets), move(self.caption_means), move(self.images))


def old_model_id(reference: str, space_id: str, encoder=None) -> str:
    """The old encoder's model id without loading it: a backbone's is its space id, an adapter's is recorded."""
    return encoder.model_id if encoder is not None else recorded_model_id(reference) or space_id


def old_text_source(reference: str, model_id: str, space_id: str, dim: int, device, batch_size: int = 256,
                    encoder=None) -> EmbeddingSource:
    """Cache source (keyed by ``model_id``) for the old encoder's text embeddings in ``space_id``.

    ``reference`` names a backbone or an adapter (a chained upgrade). ``encoder``: the old
    encoder when the caller has it loaded already; otherwise it is loaded only if something
    must be encoded, and must write into ``space_id`` (ψ's target space).
    """
    checked = False

    def encode(texts: Sequence[str]) -> torch.Tensor:
        nonlocal encoder, checked
        if encoder is None:
            encoder = load_encoder(reference, device=device)
        if not checked:
            checked = True
            if encoder.space_id != space_id:
                raise FingerprintMismatchError(
                    f"The old model {reference} writes into space {encoder.space_id}, but ψ was trained for space "
                    f"{space_id}. Pass the old model ψ was trained with."
                )
        return encoder.encode_text(texts, batch_size=batch_size, progress=False)

    return EmbeddingSource("old", f"{model_id}:text", dim, encode, space_id)


def build_targets(
    ids: Sequence[str],
    captions: Sequence[Sequence[str]],
    old_text: EmbeddingSource,
    cache: CacheConfig,
    gallery: str | None = None,
    gallery_ids: str | None = None,
    process: ProcessGroup | None = None,
) -> OldSpaceTargets:
    """Old caption embeddings (cached) and, with ``gallery``, the stored old image embeddings."""
    flat = [caption for image_captions in captions for caption in image_captions]
    stored = build_cache(cache.cache_dir, [old_text], flat, dtype=cache.cache_dtype, shard_size=cache.shard_size,
                         process=process, metadata={"purpose": "stage-2 old text embeddings of training captions"})
    caption_vectors = F.normalize(stored.tensor("old").float(), dim=-1)
    counts = torch.tensor([len(c) for c in captions])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    owner = torch.repeat_interleave(torch.arange(len(captions)), counts)
    sums = torch.zeros(len(captions), caption_vectors.shape[1]).index_add_(0, owner, caption_vectors)
    images = load_gallery(gallery, ids, old_text.dim, gallery_ids, old_text.space_id) if gallery else None
    return OldSpaceTargets(caption_vectors, offsets, F.normalize(sums, dim=-1), images)


def load_gallery(path: str, ids: Sequence[str], dim: int, ids_path: str | None = None,
                 space_id: str | None = None) -> torch.Tensor:
    """The user's stored old image embeddings, reordered to the training images' order.

    Ids come from ``ids_path`` (a text file with one id per line, or a 1-D .npy), else
    from the file itself (safetensors ``ids`` / faiss ``IndexIDMap``), else they are the
    row numbers. They are compared as strings with the pair source's ids (file names for
    an image folder, row numbers for tables, keys for tar shards).

    Raises :class:`InputError` when the count, the ids or the dimension do not match, and
    :class:`FingerprintMismatchError` when the file records a space other than ``space_id``.
    """
    stored = load_embeddings(path)
    check_same_space(space_id, stored.space_id, f"Old image embeddings {path!r}",
                     "They must be the stored gallery of the space ψ maps into (the old model's).")
    vectors = np.asarray(stored.vectors, dtype=np.float32)
    gallery_ids = read_ids(ids_path) if ids_path else [str(label) for label in stored.labels]
    where = f"Old image embeddings {path!r}"
    if vectors.shape[1] != dim:
        raise InputError(f"{where} have dimension {vectors.shape[1]}, but the old model's space has {dim}. "
                         f"They must come from the old model ψ maps into.")
    if len(gallery_ids) != vectors.shape[0]:
        raise InputError(f"{where}: {vectors.shape[0]} vectors but {len(gallery_ids)} ids in {ids_path!r}.")
    if len(set(gallery_ids)) != len(gallery_ids):
        raise InputError(f"{where}: ids repeat; each training image needs exactly one stored embedding.")
    if len(gallery_ids) != len(ids):
        raise InputError(f"{where} hold {len(gallery_ids)} vectors, but the training data has {len(ids)} images. "
                         f"Store exactly one old embedding per training image.")
    row_of = {identifier: row for row, identifier in enumerate(gallery_ids)}
    missing = [identifier for identifier in ids if identifier not in row_of]
    if missing:
        extra = sorted(set(gallery_ids) - set(ids))
        raise InputError(f"{where}: {len(missing)} training images have no stored embedding (e.g. {missing[:3]}); "
                         f"ids without a training image: {extra[:3]}. Ids must equal the data's ids "
                         f"(file names for an image folder; give them with an ids file, one per line).")
    order = np.array([row_of[identifier] for identifier in ids])
    logger.info("Matched %d stored old image embeddings to the training images by id", len(order))
    return F.normalize(torch.from_numpy(vectors[order]), dim=-1)

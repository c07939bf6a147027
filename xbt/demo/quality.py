"""Exact brute-force Recall@K of one model on one image–caption split (both directions).

Used by the demo and its tests to check that trained models retrieve what they should;
the search and the metric are :mod:`xbt.retrieval`'s, as in ``xbt eval``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..backbones import DualEncoder
from ..images import ImageLike
from ..retrieval import DIRECTIONS, Labeled
from ..retrieval import recall_at_k as retrieval_recall


def recall_at_k(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, caption_owner: torch.Tensor,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, float]]:
    """Recall@K in percent, both directions, through :func:`xbt.retrieval.recall_at_k` (DESIGN.md's definition).

    ``caption_owner[j]`` is the index of the image caption ``j`` describes.
    """
    images = Labeled(image_embeddings.numpy(), np.arange(len(image_embeddings)))
    captions = Labeled(text_embeddings.numpy(), caption_owner.numpy())
    return {direction: {k: round(value, 2) for k, value in retrieval_recall(queries, gallery, ks).items()}
            for direction, (queries, gallery) in zip(DIRECTIONS, ((captions, images), (images, captions)))}


def flatten_captions(captions: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """All captions in one list, and the index of the image each belongs to."""
    flat = [caption for group in captions for caption in group]
    owner = torch.tensor([image for image, group in enumerate(captions) for _ in group])
    return flat, owner


def evaluate_model(encoder: DualEncoder, images: Sequence[ImageLike] | torch.Tensor,
                   captions: Sequence[Sequence[str]], ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, float]]:
    """Recall@K of ``encoder`` against itself on ``images`` (paths, PIL or pixels) and their captions."""
    flat, owner = flatten_captions(captions)
    return recall_at_k(encoder.encode_image(images), encoder.encode_text(flat), owner, ks)

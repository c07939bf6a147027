"""Exact brute-force Recall@K of one model on one image–caption split (both directions).

A small stand-in used by the demo and its tests to check that trained models retrieve
what they should; the pipeline's evaluation (gallery caches, faiss, compatibility
matrix) lives in :mod:`xbt.retrieval`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backbones import DualEncoder
from ..images import ImageLike

DIRECTIONS = ("text→image", "image→text")


def recall_at_k(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, caption_owner: torch.Tensor,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, float]]:
    """Recall@K in percent, as DESIGN.md defines it.

    text→image: a caption query hits if its image is among the top K images.
    image→text: an image query hits if ANY of its captions is among the top K captions.
    ``caption_owner[j]`` is the index of the image caption ``j`` describes.
    """
    scores = text_embeddings @ image_embeddings.T  # (captions, images)
    top_images = scores.topk(max(ks), dim=1).indices
    top_captions = scores.T.topk(max(ks), dim=1).indices
    image_hits = top_images == caption_owner[:, None]
    caption_hits = caption_owner[top_captions] == torch.arange(len(image_embeddings))[:, None]
    return {
        direction: {k: round(100.0 * hits[:, :k].any(dim=1).float().mean().item(), 2) for k in ks}
        for direction, hits in zip(DIRECTIONS, (image_hits, caption_hits))
    }


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

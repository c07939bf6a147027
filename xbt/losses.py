"""Losses shared by both training stages. All inputs are L2-normalised embeddings.

- :func:`info_nce`: symmetric (or one-way) contrastive loss; positives on the diagonal,
  or given by index into a larger key bank (a gallery of stored vectors as negatives).
- :func:`cosine_loss`, :func:`mse_loss`: pull paired vectors together.
- :func:`add_noise`: Gaussian noise on normalised embeddings, renormalised, so that a
  projection trained on text transfers to images across the modality gap.
- :class:`Temperature`: fixed or learnable softmax temperature.
- :class:`WeightedLoss`: named terms with weights, reporting each term for logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

LOSS_KINDS = ("infonce", "cosine", "mse")


class Temperature(nn.Module):
    """Softmax temperature as a log-scale (CLIP style); learnable or fixed, clamped to ``max_scale``."""

    def __init__(self, initial: float = 0.07, learnable: bool = True, max_scale: float = 100.0):
        super().__init__()
        log_scale = torch.tensor(math.log(1.0 / initial))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        """The logit scale (1 / temperature)."""
        return self.log_scale.exp().clamp(max=self.max_scale)


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor | float,
    positives: torch.Tensor | None = None,
    symmetric: bool = True,
) -> torch.Tensor:
    """Contrastive cross-entropy between ``queries`` (N, d) and ``keys`` (M, d).

    Without ``positives``, N == M and query i matches key i; the symmetric form also
    scores keys against queries. With ``positives`` (N,), query i matches key
    ``positives[i]`` among all M keys (one-way: a bank of stored vectors as negatives).
    """
    logits = logit_scale * queries @ keys.T
    if positives is None:
        if queries.shape[0] != keys.shape[0]:
            raise ValueError(f"Paired InfoNCE needs as many keys as queries ({keys.shape[0]} != {queries.shape[0]}).")
        targets = torch.arange(queries.shape[0], device=queries.device)
        loss = F.cross_entropy(logits, targets)
        return (loss + F.cross_entropy(logits.T, targets)) / 2 if symmetric else loss
    if symmetric:
        raise ValueError("A key bank with explicit positives is one-way; pass symmetric=False.")
    return F.cross_entropy(logits, positives.to(queries.device))


def cosine_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean (1 − cosine similarity) of paired normalised vectors."""
    return (1.0 - (predictions * targets).sum(dim=-1)).mean()


def mse_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of paired vectors, summed over dimensions."""
    return (predictions - targets).pow(2).sum(dim=-1).mean()


def paired_loss(kind: str, predictions: torch.Tensor, targets: torch.Tensor, logit_scale) -> torch.Tensor:
    """One of :data:`LOSS_KINDS` between paired vectors."""
    if kind == "infonce":
        return info_nce(predictions, targets, logit_scale)
    if kind == "cosine":
        return cosine_loss(predictions, targets)
    if kind == "mse":
        return mse_loss(predictions, targets)
    raise ValueError(f"Unknown loss {kind!r}; choose from {LOSS_KINDS}.")


def add_noise(embeddings: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add N(0, std²) noise to normalised embeddings and renormalise (no-op for std 0)."""
    if std <= 0:
        return embeddings
    # Drawn on the CPU (where the seeded generator lives), so a run gives the same noise on any device.
    noise = torch.randn(embeddings.shape, generator=generator, dtype=embeddings.dtype).to(embeddings.device)
    return F.normalize(embeddings + std * noise, dim=-1)


class WeightedLoss:
    """Sum of named loss terms, each with its weight; terms weighted 0 are never computed."""

    def __init__(self, weights: Mapping[str, float]):
        negative = {name: weight for name, weight in weights.items() if weight < 0}
        if negative:
            raise ValueError(f"Loss weights must be non-negative, got {negative}.")
        self.weights = {name: float(weight) for name, weight in weights.items() if weight > 0}
        if not self.weights:
            raise ValueError(f"At least one loss weight must be positive, got {dict(weights)}.")

    def __call__(self, terms: Mapping[str, Callable[[], torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
        """Evaluate the weighted terms (given as thunks); returns (total, {name: value})."""
        missing = set(self.weights) - set(terms)
        if missing:
            raise ValueError(f"No way to compute loss terms {sorted(missing)}; available: {sorted(terms)}.")
        values = {name: terms[name]() for name in self.weights}
        total = sum(self.weights[name] * value for name, value in values.items())
        return total, {name: float(value.detach()) for name, value in values.items()}

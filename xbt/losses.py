"""Losses of every training stage, and the registries of stage-1 loss kinds and stage-2 loss terms.

All inputs are L2-normalised embeddings.

- :func:`info_nce`: symmetric (or one-way) contrastive loss; positives on the diagonal,
  or given by index into a larger key bank (a gallery of stored vectors as negatives).
- :func:`cosine_loss`, :func:`mse_loss`: pull paired vectors together.
- :func:`gaussian_nll`: heteroscedastic regression (FastFill's uncertainty head, :mod:`xbt.uncertainty`).
- :func:`add_noise`: Gaussian noise on normalised embeddings, renormalised, so that a
  projection trained on text transfers to images across the modality gap.
- :class:`Temperature`: fixed or learnable softmax temperature.
- :data:`TEXT_LOSSES` (stage 1's ``loss`` kinds) and :data:`PAIR_TERMS` (stage 2's terms):
  one :class:`LossTerm` each, declaring what it needs from the data, whether it anchors
  the old space, whether it uses the temperature, and its default weight given what the
  data provides. :func:`resolve_weights` turns a user's weights (a mapping by name) into
  the weight of every term. Adding a term is one :func:`register` call below.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError

logger = logging.getLogger(__name__)


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


def gaussian_nll(mean: torch.Tensor, log_variance: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over items of the isotropic Gaussian NLL of ``target`` under ``(mean, exp(log_variance))``, per dim."""
    squared = (target - mean).pow(2).sum(-1)
    return 0.5 * (squared * torch.exp(-log_variance) / target.shape[-1] + log_variance).mean()


def add_noise(embeddings: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add N(0, std²) noise to normalised embeddings and renormalise (no-op for std 0)."""
    if std <= 0:
        return embeddings
    # Drawn on the CPU (where the seeded generator lives), so a run gives the same noise on any device.
    noise = torch.randn(embeddings.shape, generator=generator, dtype=embeddings.dtype).to(embeddings.device)
    return F.normalize(embeddings + std * noise, dim=-1)


# ---------------------------------------------------------------------------------
# registries
# ---------------------------------------------------------------------------------
# What a stage's data or ψ can provide to a term (the key of LossTerm.needs), and how a user provides it.
NEEDS = {
    "old_captions": "old text embeddings of the training captions (cached from the old model's text encoder)",
    "old_images": "stored old image embeddings of the training images (--old_image_embeddings)",
    "extra_dims": "a ψ with extra dimensions (stage 1 with --kind orthogonal --extra_dims K > 0)",
}


@dataclass(frozen=True)
class LossTerm:
    """One loss term: ``compute(inputs, logit_scale) -> scalar``; ``inputs`` is the stage's batch view.

    ``needs`` names what the data must provide (keys of :data:`NEEDS`); ``old_space``: the
    term ties the output to the old space (without any, stage 2 drifts out of it);
    ``uses_temperature``: the term reads ``logit_scale`` (the temperature trains only if a
    weighted term does); ``default(provided)`` is its weight when the user names none.
    """

    name: str
    compute: Callable[[Any, torch.Tensor], torch.Tensor]
    help: str
    needs: frozenset[str] = frozenset()
    old_space: bool = False
    uses_temperature: bool = False
    default: Callable[[frozenset[str]], float] = lambda provided: 0.0


TEXT_LOSSES: dict[str, LossTerm] = {}
"""Stage 1's loss kinds; inputs: ``.predictions`` (ψ(new)) and ``.targets`` (old), paired by row."""
PAIR_TERMS: dict[str, LossTerm] = {}
"""Stage 2's loss terms; inputs: :class:`xbt.train.pair_stage.PairInputs`."""


def register(registry: dict[str, LossTerm], term: LossTerm) -> LossTerm:
    if term.name in registry:
        raise ValueError(f"Loss term {term.name!r} is registered twice.")
    unknown = term.needs - set(NEEDS)
    if unknown:
        raise ValueError(f"Loss term {term.name!r} needs {sorted(unknown)}, which no data provides ({sorted(NEEDS)}).")
    registry[term.name] = term
    return term


def resolve_weights(registry: Mapping[str, LossTerm], given: Mapping[str, float],
                    provided: frozenset[str]) -> dict[str, float]:
    """The weight of every term: ``given`` ones, the others their default for what the data ``provided``.

    Raises :class:`InputError` naming the term for an unknown name, a negative weight, a
    weighted term whose needs the data does not meet, or no positive weight at all.
    """
    unknown = sorted(set(given) - set(registry))
    if unknown:
        raise InputError(f"loss_weights: unknown term(s) {unknown}; allowed: {', '.join(registry)}.")
    weights = {name: float(given[name]) if name in given else term.default(provided)
               for name, term in registry.items()}
    for name, weight in weights.items():
        if weight < 0:
            raise InputError(f"loss_weights: {name}={weight}; allowed: a weight >= 0.")
        missing = registry[name].needs - provided
        if weight > 0 and missing:
            raise InputError(f"loss_weights: the term {name} needs {'; '.join(NEEDS[m] for m in sorted(missing))}, "
                             f"which this run does not have. Provide it, or set {name}=0.")
    if not any(weight > 0 for weight in weights.values()):
        raise InputError(f"loss_weights: every term has weight 0 ({weights}); give at least one a positive weight.")
    if not any(weight > 0 and registry[name].old_space for name, weight in weights.items()):
        logger.warning("No old-space loss term (%s): the output will drift out of the old space (only useful as a "
                       "negative control).", ", ".join(name for name, term in registry.items() if term.old_space))
    return weights


def uses_temperature(registry: Mapping[str, LossTerm], weights: Mapping[str, float]) -> bool:
    """Whether any weighted term reads the temperature (else it must not train: DDP refuses unused parameters)."""
    return any(weight > 0 and registry[name].uses_temperature for name, weight in weights.items())


# Stage 1: ψ(new caption) against the old embedding of the same caption.
register(TEXT_LOSSES, LossTerm("infonce", lambda x, scale: info_nce(x.predictions, x.targets, scale),
                               "symmetric InfoNCE over the batch", old_space=True, uses_temperature=True))
register(TEXT_LOSSES, LossTerm("cosine", lambda x, scale: cosine_loss(x.predictions, x.targets),
                               "1 - cosine of each pair", old_space=True))
register(TEXT_LOSSES, LossTerm("mse", lambda x, scale: mse_loss(x.predictions, x.targets),
                               "squared distance of each pair", old_space=True))

# Stage 2: defaults measured on the generated benchmark: with stored old image embeddings, new_new + both
# cross terms (no anchor) was best; without them, new_new + anchor.
register(PAIR_TERMS, LossTerm(
    "new_new", lambda x, scale: info_nce(x.image, x.text, scale),
    "symmetric InfoNCE between ψ(new image) and ψ(new text) of the batch",
    uses_temperature=True, default=lambda provided: 1.0))
register(PAIR_TERMS, LossTerm(
    "anchor", lambda x, scale: cosine_loss(x.text, x.old_caption()),
    "1 - cos(ψ(new text), old text embedding of the same caption)",
    needs=frozenset({"old_captions"}), old_space=True,
    default=lambda provided: 0.0 if "old_images" in provided else 1.0))
register(PAIR_TERMS, LossTerm(
    "text_to_old_image", lambda x, scale: info_nce(x.text, x.old_images(), scale, positives=x.bank_positives,
                                                   symmetric=False),
    "InfoNCE of ψ(new text) against the stored old image embeddings (the text→image compatibility cell)",
    needs=frozenset({"old_images"}), old_space=True, uses_temperature=True,
    default=lambda provided: 1.0 if "old_images" in provided else 0.0))
register(PAIR_TERMS, LossTerm(
    "image_to_old_text", lambda x, scale: info_nce(x.image, x.old_caption_means(), scale,
                                                   positives=x.bank_positives, symmetric=False),
    "InfoNCE of ψ(new image) against every training image's mean old caption embedding (image→text cell)",
    needs=frozenset({"old_captions"}), old_space=True, uses_temperature=True,
    default=lambda provided: 1.0 if "old_images" in provided else 0.0))
# BT²/OCA: the new model's own objective on the full vectors (compatible part + extra dims), so the extra
# dims learn what the old space cannot hold; on by default whenever ψ has them (else they are never trained).
register(PAIR_TERMS, LossTerm(
    "full_new", lambda x, scale: info_nce(x.full_image, x.full_text, scale),
    "symmetric InfoNCE between the full normalised vectors (old dims + extra dims) of new image and new text",
    needs=frozenset({"extra_dims"}), uses_temperature=True,
    default=lambda provided: 1.0 if "extra_dims" in provided else 0.0))
# FastFill: a side head on the stored old image vectors learns how unsure it is of the adapter's vector of each item
# (xbt.uncertainty); the target is detached, so it never changes the adapter. On whenever stored vectors exist: the
# `uncertainty` backfill ordering reads it.
register(PAIR_TERMS, LossTerm(
    "uncertainty", lambda x, scale: gaussian_nll(*x.uncertainty, x.image.detach()),
    "Gaussian NLL of the (detached) ψ(new image) under the uncertainty head's prediction from the stored old image "
    "vector (FastFill; trains only the head, which orders backfilling)",
    needs=frozenset({"old_images"}), default=lambda provided: 1.0 if "old_images" in provided else 0.0))

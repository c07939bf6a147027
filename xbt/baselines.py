"""Training-free ψ baselines fitted in closed form on cached (new, old) text pairs.

- :func:`fit_procrustes`: the orthogonal map that best sends new embeddings onto old
  ones (orthogonal Procrustes). When the dims differ, both sides are zero-padded to
  the larger dim and the top-left ``(old_dim, new_dim)`` block of the square solution
  is kept.
- :func:`fit_ridge`: affine least squares with an L2 penalty on the weight (ridge).

Both stream over the pairs in chunks (they accept memory-mapped cache arrays), so a
cache larger than RAM fits too, and both return a ``linear``
:class:`~xbt.projection.Projection` (``Projection.from_linear_map``): saved, loaded and
applied exactly like a trained ψ, so reports can put them side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .errors import InputError
from .projection import Projection

logger = logging.getLogger(__name__)

CHUNK_ROWS = 8192  # rows per streamed chunk: 8192 x 512 float64 = 32 MiB per side


def _chunks(new, old) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if len(new) != len(old):
        raise InputError(f"Baselines need paired embeddings: {len(new)} new vs {len(old)} old rows.")
    if len(new) == 0:
        raise InputError("Baselines need at least one (new, old) pair.")
    for start in range(0, len(new), CHUNK_ROWS):
        yield (np.asarray(new[start:start + CHUNK_ROWS], dtype=np.float64),
               np.asarray(old[start:start + CHUNK_ROWS], dtype=np.float64))


def fit_procrustes(new, old, **spaces) -> Projection:
    """Orthogonal W (zero-padded when dims differ) minimising ‖new·Wᵀ − old‖; ``new`` (N, d_new), ``old`` (N, d_old)."""
    new_dim, old_dim = new.shape[1], old.shape[1]
    size = max(new_dim, old_dim)
    cross = np.zeros((size, size))  # old_padded.T @ new_padded
    for new_chunk, old_chunk in _chunks(new, old):
        cross[:old_dim, :new_dim] += old_chunk.T @ new_chunk
    left, _, right = np.linalg.svd(cross)
    rotation = left @ right  # (size, size) orthogonal; old_padded ≈ new_padded @ rotation.T
    weight = torch.from_numpy(rotation[:old_dim, :new_dim]).float()
    return Projection.from_linear_map(weight, **spaces)


def fit_ridge(new, old, alpha: float = 1e-3, **spaces) -> Projection:
    """Affine W, b minimising ‖new·Wᵀ + b − old‖² + alpha·N·‖W‖² (the penalty scales with the number of pairs)."""
    if alpha < 0:
        raise InputError(f"Ridge alpha must be >= 0, got {alpha}.")
    new_dim, old_dim = new.shape[1], old.shape[1]
    count, new_sum, old_sum = 0, np.zeros(new_dim), np.zeros(old_dim)
    gram, cross = np.zeros((new_dim, new_dim)), np.zeros((new_dim, old_dim))
    for new_chunk, old_chunk in _chunks(new, old):
        count += len(new_chunk)
        new_sum += new_chunk.sum(0)
        old_sum += old_chunk.sum(0)
        gram += new_chunk.T @ new_chunk
        cross += new_chunk.T @ old_chunk
    new_mean, old_mean = new_sum / count, old_sum / count
    # centred statistics: the bias absorbs the means and is not penalised
    gram -= count * np.outer(new_mean, new_mean)
    cross -= count * np.outer(new_mean, old_mean)
    solution = np.linalg.solve(gram + alpha * count * np.eye(new_dim), cross)  # (new_dim, old_dim)
    bias = old_mean - new_mean @ solution
    return Projection.from_linear_map(torch.from_numpy(solution.T).float(), torch.from_numpy(bias).float(),
                                      **spaces)


BASELINES: dict[str, Callable[..., Projection]] = {"procrustes": fit_procrustes, "ridge": fit_ridge}


def fit_baseline(name: str, new, old, **kwargs) -> Projection:
    """Fit the baseline called ``name`` (one of :data:`BASELINES`)."""
    if name not in BASELINES:
        raise InputError(f"Unknown baseline {name!r}; choose from {sorted(BASELINES)}.")
    logger.info("Fitting the %s baseline on %d pairs", name, len(new))
    return BASELINES[name](new, old, **kwargs)

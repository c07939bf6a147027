"""Training-free and post-hoc ψ baselines fitted on (new, old) embedding pairs: one registry, one interface.

:data:`BASELINES` maps a name to a fit function ``fit(new, old, **options) -> Projection``
(``new`` (N, d_new), ``old`` (N, d_old), NumPy or memory-mapped cache arrays); the result
maps new-space vectors into the old space and is saved, loaded and applied exactly like a
trained ψ, so stage 1 and ``xbt eval`` can put every baseline beside XBT. Adding a baseline
is one function and one registry entry.

- ``procrustes`` (:func:`fit_procrustes`): the orthogonal map that best sends new embeddings onto
  old ones. When the dims differ, both sides are zero-padded to the larger dim and the top-left
  ``(old_dim, new_dim)`` block of the square solution is kept.
- ``ridge`` (:func:`fit_ridge`): affine least squares with an L2 penalty on the weight.
- ``low_rank`` (:func:`fit_low_rank`): the best affine map whose weight has rank ``rank``
  (reduced-rank ridge regression), one of Drift-Adapter's post-hoc adapters.
- ``mlp`` (:func:`fit_mlp`): the ridge map plus a residual MLP trained by gradient descent
  (Drift-Adapter's residual MLP; the ``mlp`` ψ kind).

Any name may end in ``+diag`` (:func:`fit_baseline`): a per-dimension scale fitted after the map
(Drift-Adapter's optional diagonal scaling), folded into the map's weights.

The closed-form fits stream over the pairs in chunks, so a cache larger than RAM fits too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

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


def _centred_moments(new, old) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Count, means, centred Gram ``newᵀnew`` and centred cross ``newᵀold`` of the pairs, in one streamed pass."""
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
    return count, new_mean, old_mean, gram, cross


def _affine(solution: np.ndarray, new_mean: np.ndarray, old_mean: np.ndarray, **spaces) -> Projection:
    """The ``linear`` ψ ``x ↦ x·solution + bias`` whose bias maps the new mean onto the old mean."""
    bias = old_mean - new_mean @ solution
    return Projection.from_linear_map(torch.from_numpy(solution.T).float(), torch.from_numpy(bias).float(),
                                      **spaces)


def _check_alpha(alpha: float) -> None:
    if alpha < 0:
        raise InputError(f"Ridge alpha must be >= 0, got {alpha}.")


def fit_ridge(new, old, alpha: float = 1e-3, **spaces) -> Projection:
    """Affine W, b minimising ‖new·Wᵀ + b − old‖² + alpha·N·‖W‖² (the penalty scales with the number of pairs)."""
    _check_alpha(alpha)
    count, new_mean, old_mean, gram, cross = _centred_moments(new, old)
    solution = np.linalg.solve(gram + alpha * count * np.eye(len(gram)), cross)  # (new_dim, old_dim)
    return _affine(solution, new_mean, old_mean, **spaces)


def fit_low_rank(new, old, rank: int = 64, alpha: float = 1e-3, **spaces) -> Projection:
    """Affine W, b with rank(W) <= ``rank`` minimising the ridge objective ‖new·Wᵀ + b − old‖² + alpha·N·‖W‖².

    Reduced-rank ridge regression (Mukherjee & Zhu, 2011): the ridge solution B with its fitted values
    projected onto their top ``rank`` principal directions, B·V_r·V_rᵀ, V_r from Bᵀ(G + alpha·N·I)B (G: the
    centred Gram matrix), is the exact minimiser among rank-``rank`` maps; alpha 0 is plain reduced-rank
    regression. The penalty matters: fitted on text pairs, an unpenalised map blows up the directions text
    hardly varies in, and images (another region of the space) land there. One streamed pass, like ridge.
    """
    _check_alpha(alpha)
    if rank < 1:
        raise InputError(f"The low_rank baseline needs rank >= 1, got {rank}.")
    count, new_mean, old_mean, gram, cross = _centred_moments(new, old)
    penalised = gram + alpha * count * np.eye(len(gram))
    solution = np.linalg.solve(penalised, cross)
    _, directions = np.linalg.eigh(solution.T @ penalised @ solution)  # ascending eigenvalues
    top = directions[:, ::-1][:, :rank]
    return _affine(solution @ top @ top.T, new_mean, old_mean, **spaces)


def fit_mlp(new, old, hidden_dim: int | None = None, steps: int = 500, batch_size: int = 4096,
            learning_rate: float = 1e-3, alpha: float = 1e-3, seed: int = 0, **spaces) -> Projection:
    """An ``mlp`` ψ: the ridge map plus a residual MLP trained with Adam on the squared error of the
    unnormalised output (its last layer starts at zero, so training starts from the ridge solution)."""
    if steps < 1 or batch_size < 1:
        raise InputError(f"The mlp baseline needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}.")
    count = len(new)
    with torch.random.fork_rng():  # seeded initial weights without touching the caller's RNG
        torch.manual_seed(seed)
        projection = Projection(new.shape[1], old.shape[1], kind="mlp", hidden_dim=hidden_dim, **spaces)
    projection.linear.load_state_dict(fit_ridge(new, old, alpha).linear.state_dict())
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(projection.parameters(), lr=learning_rate)
    for _ in range(steps):
        rows = np.sort(torch.randint(count, (min(batch_size, count),), generator=generator).numpy())
        inputs = torch.from_numpy(np.asarray(new[rows], dtype=np.float32))
        targets = torch.from_numpy(np.asarray(old[rows], dtype=np.float32))
        loss = (projection.extended(inputs) - targets).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logger.info("mlp baseline: final batch squared error %.4g", loss.item())
    return projection.eval()


def with_diagonal_scaling(projection: Projection, new, old) -> Projection:
    """``projection`` followed by the per-dimension scale s minimising ‖s ⊙ ψ̃(new) − old‖² (ψ̃: the
    unnormalised output), folded into its layers (s ⊙ (Wx + b + r(x)) = (sW)x + sb + s·r(x))."""
    numerator, denominator = np.zeros(projection.old_dim), np.zeros(projection.old_dim)
    with torch.no_grad():
        for new_chunk, old_chunk in _chunks(new, old):
            output = projection.extended(torch.from_numpy(new_chunk).float())[:, :projection.old_dim].double().numpy()
            numerator += (output * old_chunk).sum(0)
            denominator += (output * output).sum(0)
        scale = torch.from_numpy(numerator / np.maximum(denominator, 1e-12)).float()
        last_layers = [projection.linear] + ([projection.residual[-1]] if projection.residual is not None else [])
        for layer in last_layers:
            layer.weight.mul_(scale[:, None])
            layer.bias.mul_(scale)
    return projection


BASELINES: dict[str, Callable[..., Projection]] = {
    "procrustes": fit_procrustes, "ridge": fit_ridge, "low_rank": fit_low_rank, "mlp": fit_mlp}
DIAGONAL = "+diag"  # suffix of a baseline name: add the diagonal scaling
LINEAR_BASELINES = ("procrustes", "ridge", "low_rank")
"""The baselines that fit a single linear map: stage 1 can start ψ's linear part from one (``init``)."""


def check_baseline_name(name: str) -> str:
    """The registry name of ``name`` (``+diag`` removed); :class:`InputError` for an unknown one."""
    base = name.removesuffix(DIAGONAL)
    if base not in BASELINES:
        raise InputError(f"Unknown baseline {name!r}; choose from {sorted(BASELINES)}, each optionally "
                         f"followed by {DIAGONAL} (diagonal scaling).")
    return base


def fit_baseline(name: str, new, old, **kwargs: Any) -> Projection:
    """Fit the baseline called ``name`` (one of :data:`BASELINES`, optionally ending in ``+diag``)."""
    base = check_baseline_name(name)
    logger.info("Fitting the %s baseline on %d pairs", name, len(new))
    projection = BASELINES[base](new, old, **kwargs)
    return with_diagonal_scaling(projection, new, old) if name.endswith(DIAGONAL) else projection

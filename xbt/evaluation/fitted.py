"""Peer baselines fitted while evaluating, on a support split of the evaluation set.

* :func:`fitted_space`: a post-hoc map of :mod:`xbt.baselines` (Procrustes, ridge, low-rank affine,
  residual MLP, each optionally ``+diag``; the Drift-Adapter family) fitted on (new, old) pairs of
  the support items and applied to the new model's vectors, like a saved ψ; :func:`pairs_space`
  fits one on given pairs instead (the (new, old) caption pairs of a stage-1 cache: the support
  the adapter's ψ learnt from).
* :func:`slerp_space`: training-free SLERP (Ricci, Biondi, Pernici): Procrustes fitted on the
  support captions aligns the new query with the old space, and the query is the point at α along
  the great circle from the old model's query (α = 0) to the aligned new one (α = 1), α fitted per
  direction on the support split. It runs the OLD encoder on every query (text queries for
  text→image, image queries for image→text), which an XBT adapter never does.

The support split (:func:`support_ids`): a fraction of the evaluation set's images, drawn with the
evaluation seed, whose vectors fit the baselines; those images and all their captions are then
removed from every query set and every gallery (:func:`xbt.evaluation.evaluate`), so every row
of the report, bounds and XBT included, is measured on the same held-out items and nothing fitted
has seen a measured query or its target. Why a split and not a separate support source: it
needs no second data set of the same distribution, it is how SLERP chooses α (a support split of
the target benchmark), and the support vectors are encoded anyway, so fitting encodes nothing
extra. The price, a smaller measured set, is recorded in metrics.json (``dataset.support``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..baselines import check_baseline_name, fit_baseline, fit_procrustes
from ..errors import InputError
from ..retrieval import Labeled, SearchConfig, recall_at_k
from .encode import apply_projection, projected_space
from .plan import (
    BASELINE,
    BLENDED_BASELINE,
    DIRECTIONS,
    GALLERY_MODALITY,
    QUERY_MODALITY,
    SLERP,
    TEXT,
    Derivation,
    Space,
    check_fit_on,
)

ALPHAS = tuple(round(step / 20, 2) for step in range(21))  # SLERP's α grid: 0, 0.05, ..., 1


def support_ids(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The ids of the ``fraction`` of images (at least one, never all) split off as support, drawn by ``seed``."""
    count = int(round(fraction * len(ids)))
    if not 0.0 < fraction < 1.0 or not 1 <= count < len(ids):
        raise InputError(f"The support fraction must leave at least one support and one measured image; "
                         f"got {fraction} of {len(ids)} images.")
    return np.sort(np.asarray(ids)[np.random.default_rng(seed).permutation(len(ids))[:count]])


def paired(new: Labeled, old: Labeled) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``new`` and the rows of ``old`` holding the same items, in ``new``'s order: a stored old
    gallery may hold the items in another order, and distractors, which pair with nothing."""
    if np.array_equal(new.labels, old.labels):
        return np.asarray(new.vectors), np.asarray(old.vectors)
    rows = {label: row for row, label in enumerate(old.labels)}
    if len(rows) != len(old) or len(set(new.labels)) != len(new) or any(label not in rows for label in new.labels):
        raise InputError("Baselines pair new and old vectors by item id; the old vectors' ids are not unique or "
                         "miss some of the new ones.")
    return np.asarray(new.vectors), np.asarray(old.vectors)[[rows[label] for label in new.labels]]


def _pairs(support: dict[str, dict[str, Labeled]], modalities: Sequence[str], new: str,
           old: str) -> tuple[np.ndarray, np.ndarray]:
    """(new, old) vectors of the support items of ``modalities``, rows paired."""
    new_rows, old_rows = zip(*(paired(support[m][new], support[m][old]) for m in modalities))
    return np.concatenate(new_rows), np.concatenate(old_rows)


def timed_fit(baseline: str, new_vectors, old_vectors, new: Space, old: Space,
              **options: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The registry baseline fitted on (new, old) pairs, mapping ``new``'s space into ``old``'s, and its fit record."""
    started = time.perf_counter()
    projection = fit_baseline(baseline, new_vectors, old_vectors, source_space=new.space_id,
                              target_space=old.space_id, **options).eval()
    return projection, {"fit_seconds": time.perf_counter() - started, "fit_pairs": len(new_vectors)}


def pairs_space(name: str, baseline: str, new: Space, old: Space, pairs: tuple[Any, Any], source: str,
                **options: Any) -> Space:
    """The registry baseline fitted now on ``pairs`` (new, old; e.g. a stage-1 cache's memory-mapped arrays,
    described by ``source``) and applied to ``new``'s vectors; it needs no support split."""
    check_baseline_name(baseline)
    projection, record = timed_fit(baseline, *pairs, new, old, **options)
    return projected_space(name, projection, new, old.space_id,
                           {"baseline": baseline, "fit_on": [source], **options, **record})


def fitted_space(name: str, baseline: str, new: Space, old: Space, fit_on: Sequence[str] = (TEXT,),
                 **options: Any) -> Space:
    """The registry baseline ``baseline`` fitted on the support pairs (new, old) of the ``fit_on`` modalities
    (text: the caption pairs stage 1 also uses; image: image pairs) and applied to ``new``'s vectors."""
    check_baseline_name(baseline)
    check_fit_on(fit_on)
    fitted: dict[str, torch.nn.Module] = {}

    def fit(support: dict[str, dict[str, Labeled]], config: Any) -> dict[str, Any]:
        fitted["map"], record = timed_fit(baseline, *_pairs(support, fit_on, new.name, old.name), new, old, **options)
        return record

    def project(modality: str, vectors: Labeled) -> Labeled:
        return apply_projection(fitted["map"], vectors, old.space_id)

    return Space(name, BASELINE, old.space_id, old.dim, derive=Derivation((new.name,), project), fit=fit,
                 info={"baseline": baseline, "fit_on": list(fit_on), **options})


def slerp(start: np.ndarray, end: np.ndarray, alpha: float) -> np.ndarray:
    """Row by row, the point at fraction ``alpha`` of the great-circle arc from unit vector ``start``
    (``alpha`` 0) to ``end`` (1)."""
    from ..model import blend_embeddings  # its weight is the share of its second argument

    return blend_embeddings(torch.from_numpy(np.asarray(end, dtype=np.float32)),
                            torch.from_numpy(np.asarray(start, dtype=np.float32)), 1.0 - alpha, "slerp").numpy()


def alpha_curve(old_queries: Labeled, aligned_queries: Labeled, gallery: Labeled, alphas: Sequence[float],
                ks: Sequence[int], search_config: SearchConfig | None = None) -> dict[int, list[float]]:
    """Recall@K (percent) of slerp(old query, aligned query, α) against ``gallery``, for each α."""
    curve: dict[int, list[float]] = {int(k): [] for k in ks}
    for alpha in alphas:
        mixed = Labeled(slerp(old_queries.vectors, aligned_queries.vectors, alpha), old_queries.labels,
                        gallery.space_id)
        for k, value in recall_at_k(mixed, gallery, ks, search_config, f"slerp α={alpha}", validate=False).items():
            curve[k].append(value)
    return curve


def best_alpha(alphas: Sequence[float], curve: dict[int, list[float]]) -> float:
    """The α with the highest recall at the first K of ``curve``; ties go to the higher mean over all K, then to
    the smaller α (the one nearer the old query)."""
    ks = list(curve)

    def score(index: int) -> tuple[float, float, float]:
        return curve[ks[0]][index], float(np.mean([curve[k][index] for k in ks])), -alphas[index]

    return alphas[max(range(len(alphas)), key=score)]


def slerp_space(name: str, new: Space, old: Space, alphas: Sequence[float] = ALPHAS) -> Space:
    """Training-free SLERP queries (see the module docstring) in ``old``'s space, against its gallery."""
    fitted: dict[str, Any] = {}

    def fit(support: dict[str, dict[str, Labeled]], config: Any) -> dict[str, Any]:
        started = time.perf_counter()
        fitted["map"] = fit_procrustes(*_pairs(support, (TEXT,), new.name, old.name), source_space=new.space_id,
                                       target_space=old.space_id).eval()
        curves = {}
        for direction in DIRECTIONS:
            modality = QUERY_MODALITY[direction]
            old_queries, aligned = ends(support[modality][new.name], support[modality][old.name])
            curve = alpha_curve(old_queries, aligned, support[GALLERY_MODALITY[direction]][old.name], alphas,
                                config.ks, config.search)
            fitted[modality] = best_alpha(alphas, curve)
            curves[direction] = {"alphas": list(alphas), "recall": {str(k): values for k, values in curve.items()}}
        return {"fit_seconds": time.perf_counter() - started, "fit_pairs": len(support[TEXT][new.name]),
                "alpha": {d: fitted[QUERY_MODALITY[d]] for d in DIRECTIONS}, "alpha_curve": curves}

    def ends(new_vectors: Labeled, old_vectors: Labeled) -> tuple[Labeled, Labeled]:
        """The old model's queries and the aligned new ones, row by row the same items."""
        new_rows, old_rows = paired(new_vectors, old_vectors)
        aligned = apply_projection(fitted["map"], Labeled(new_rows, new_vectors.labels), old.space_id)
        return Labeled(old_rows, new_vectors.labels, old.space_id), aligned

    def blend(modality: str, new_vectors: Labeled, old_vectors: Labeled) -> Labeled:
        old_queries, aligned = ends(new_vectors, old_vectors)
        return Labeled(slerp(old_queries.vectors, aligned.vectors, fitted[modality]), old_queries.labels,
                       old.space_id)

    return Space(name, BLENDED_BASELINE, old.space_id, old.dim, derive=Derivation((new.name, old.name), blend),
                 fit=fit, info={"baseline": SLERP, "runs_old_encoder_on_queries": True,
                                "alpha_is": "weight of the Procrustes-aligned new query (0: the old model's query)"})

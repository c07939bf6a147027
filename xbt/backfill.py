"""Backfill: which stored items to re-embed first, and what a half-backfilled gallery is worth.

Backfilling re-embeds stored gallery items with a better encoder. Three pieces:

* **Orderings** (:data:`ORDERINGS`, name -> function): the order items are re-embedded in,
  as nested prefixes (a larger fraction re-embeds a superset). ``random``, ``hubness``
  and ``density`` need only the stored old-space vectors, ``uncertainty`` those and the
  adapter's small FastFill head, so ``xbt plan`` computes them over a production gallery
  without running any model; ``oracle`` needs the evaluation
  queries before and after and exists for reference only. Adding one = one decorated
  function.
* **Merge rules.** When the re-embedded part lives in the same space as the rest (an xbt
  adapter writes old-space vectors), one index holds both and scores compare: *score
  merge*. When it lives in another space (the new model's own), the two parts are two
  indexes searched with a query of each space and their results merged by rank: *rank
  merge* (untrained; after Seo et al., WACV 2025). A score merge across spaces compares
  incomparable numbers and is refused (:func:`check_same_space`).
* **Curves and AUC**: Recall@K at each fraction p, and the area under it (trapezoids over
  p in [0, 1], in percent), per ordering and direction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .errors import InputError
from .retrieval import (
    Labeled,
    PartlyReplaced,
    SearchConfig,
    SearchResult,
    check_pair,
    check_vectors,
    first_hit_rank,
    recall_from_ranks,
    search,
)
from .spaces import check_same_space

NEIGHBOURS = 10  # k of the old-space kNN graph behind hubness and density
SCORE, RANK = "score", "rank"
DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))

Ordering = Callable[..., np.ndarray]
ORDERINGS: dict[str, Ordering] = {}
NEEDS_QUERIES = {"oracle"}  # orderings that read evaluation queries: reference only, not for `xbt plan`


def ordering(name: str) -> Callable[[Ordering], Ordering]:
    """Register an ordering ``f(vectors, seed, **context) -> permutation of range(len(vectors))``."""
    def register(function: Ordering) -> Ordering:
        ORDERINGS[name] = function
        return function
    return register


def order_items(name: str, vectors: np.ndarray, seed: int = 0, **context) -> np.ndarray:
    """The re-embedding order ``name`` gives the items ``vectors`` (rows of the stored old-space gallery)."""
    if name not in ORDERINGS:
        raise InputError(f"Unknown backfill ordering {name!r}; allowed: {', '.join(ORDERINGS)}.")
    order = np.asarray(ORDERINGS[name](np.asarray(vectors, dtype=np.float32), seed, **context), dtype=np.int64)
    if not np.array_equal(np.sort(order), np.arange(len(vectors))):
        raise AssertionError(f"ordering {name!r} did not return a permutation")  # a programming error
    return order


def _by_score(score: np.ndarray) -> np.ndarray:
    """Highest score first; ties in row order (a stable sort keeps the order deterministic)."""
    return np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")


def neighbours(vectors: np.ndarray, k: int = NEIGHBOURS, config: SearchConfig | None = None) -> SearchResult:
    """Each item's ``k`` nearest other items in its own space (itself excluded)."""
    k = min(k, len(vectors) - 1)
    if k < 1:
        raise InputError("A backfill ordering from the gallery needs at least 2 stored items.")
    result = search(vectors, vectors, k + 1, config, "kNN graph")
    own = result.rows == np.arange(len(vectors))[:, None]
    keep = np.where(own.any(1, keepdims=True), ~own, np.arange(k + 1) < k)  # drop itself, else the last
    return SearchResult(result.scores[keep].reshape(-1, k), result.rows[keep].reshape(-1, k))


@ordering("random")
def random_order(vectors: np.ndarray, seed: int, **_) -> np.ndarray:
    """A seeded permutation: the baseline every other ordering must beat."""
    return np.random.default_rng(seed).permutation(len(vectors))


@ordering("hubness")
def hubness_order(vectors: np.ndarray, seed: int, k: int = NEIGHBOURS, config: SearchConfig | None = None,
                  **_) -> np.ndarray:
    """Hubs first: items that are among the k nearest neighbours of the most others (k-occurrence).
    In a weak space hubs crowd many queries' top K; replacing them first frees the most rankings."""
    rows = neighbours(vectors, k, config).rows.ravel()
    counts = np.bincount(rows[rows >= 0], minlength=len(vectors))  # an approximate index may find fewer than k
    return _by_score(counts)


@ordering("density")
def density_order(vectors: np.ndarray, seed: int, k: int = NEIGHBOURS, config: SearchConfig | None = None,
                  **_) -> np.ndarray:
    """Crowded regions first: the mean similarity to the k nearest neighbours, where the old space confuses
    items most."""
    found = neighbours(vectors, k, config)
    scores = np.where(found.rows >= 0, found.scores, np.nan)  # an approximate index may find fewer than k
    return _by_score(np.nan_to_num(np.nanmean(scores, axis=1), nan=-np.inf))


@ordering("uncertainty")
def uncertainty_order(vectors: np.ndarray, seed: int, head=None, **_) -> np.ndarray:
    """FastFill (Jaeckle et al., ICLR 2023): the items the adapter's uncertainty head is least sure of first
    (largest predicted σ from the stored vector alone, :mod:`xbt.uncertainty`)."""
    if head is None:
        raise InputError("The uncertainty ordering needs the adapter's uncertainty head (uncertainty/ in the adapter "
                         "folder): train stage 2 with stored old image embeddings, which trains it by default.")
    return _by_score(head.log_variance(vectors))


@ordering("oracle")
def oracle_order(vectors: np.ndarray, seed: int, gain: np.ndarray | None = None, **_) -> np.ndarray:
    """Reference only: the measured gain of re-embedding each item (how much its own queries' ranks improve
    between nothing and everything re-embedded), largest first. Needs the evaluation queries."""
    if gain is None:
        raise InputError("The oracle ordering needs evaluation queries (it is computed by xbt eval only).")
    return _by_score(gain)


def item_gain(ranks_before: np.ndarray, ranks_after: np.ndarray, query_labels: np.ndarray,
              gallery_labels: np.ndarray, k: int) -> np.ndarray:
    """Per gallery row: the Recall@k hits its queries gain (hits after minus before), divided among the rows
    sharing its label. The input of :func:`oracle_order`."""
    gained = (np.asarray(ranks_after) < k).astype(np.float64) - (np.asarray(ranks_before) < k)
    labels, owner = np.unique(np.asarray(gallery_labels), return_inverse=True)
    position = np.searchsorted(labels, query_labels)
    valid = (position < len(labels)) & (labels[np.minimum(position, len(labels) - 1)] == query_labels)
    per_label = np.bincount(position[valid], weights=gained[valid], minlength=len(labels))
    rows_per_label = np.bincount(owner.ravel(), minlength=len(labels))
    return per_label[owner.ravel()] / rows_per_label[owner.ravel()]


def rank_merge(first: SearchResult, second: SearchResult, k: int) -> SearchResult:
    """Interleave two ranked lists by rank: second[0], first[0], second[1], first[1], ... (the second list is
    the re-embedded part, from the better encoder, so it wins ties of rank). Rows keep their own numbering;
    scores are the rank (negated) because the two lists' scores are not comparable."""
    width = max(first.rows.shape[1], second.rows.shape[1])
    rows = np.full((len(first.rows), 2 * width), -1, dtype=np.int64)
    rows[:, 0:2 * second.rows.shape[1]:2] = second.rows
    rows[:, 1:2 * first.rows.shape[1]:2] = first.rows
    present = rows >= 0
    order = np.argsort(~present, axis=1, kind="stable")  # missing entries to the end, order kept otherwise
    rows = np.take_along_axis(rows, order, 1)[:, :k]
    return SearchResult(-np.broadcast_to(np.arange(rows.shape[1], dtype=np.float32), rows.shape).copy(), rows)


def auc(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Area under a backfill curve over p in [0, 1] (trapezoids); in the curve's unit (percent)."""
    p, v = np.asarray(fractions, dtype=np.float64), np.asarray(values, dtype=np.float64)
    return float(np.sum((p[1:] - p[:-1]) * (v[1:] + v[:-1]) / 2.0))


def _check_fractions(fractions: Sequence[float]) -> None:
    bad = [p for p in fractions if not 0.0 <= p <= 1.0]
    if bad:
        raise InputError(f"Backfill fractions must lie in [0, 1]; got {bad}.")


def backfill_ranks(queries: Labeled, old_gallery: Labeled, reembedded: Labeled, rows: np.ndarray,
                   chosen: np.ndarray, k: int, config: SearchConfig | None = None,
                   reembedded_queries: Labeled | None = None) -> np.ndarray:
    """First-hit ranks when gallery rows ``rows[chosen]`` hold their re-embedded vectors.

    Score merge when ``reembedded`` is in the old gallery's space (one index); rank merge of two indexes when
    it is not, which needs ``reembedded_queries`` (the same queries embedded into the re-embedded space).
    """
    if reembedded.space_id == old_gallery.space_id or reembedded_queries is None:
        check_same_space(old_gallery.space_id, reembedded.space_id, "The re-embedded gallery items",
                         "A score merge compares scores of one space only; pass the queries of the re-embedded "
                         "space for a rank merge of the two indexes.")
        mixed = PartlyReplaced(old_gallery.vectors, rows[chosen], reembedded.vectors[chosen])
        return first_hit_rank(search(queries.vectors, mixed, k, config, "backfill"), queries.labels,
                              old_gallery.labels)
    check_same_space(reembedded.space_id, reembedded_queries.space_id, "The queries of the re-embedded part")
    kept = np.ones(len(old_gallery), dtype=bool)
    kept[rows[chosen]] = False

    def part(query: Labeled, vectors: np.ndarray, picked: np.ndarray, gallery_rows: np.ndarray) -> SearchResult:
        """``query`` searched over ``vectors[picked]``, its hits numbered as the gallery rows ``gallery_rows``."""
        if len(picked) == 0:
            return SearchResult(np.zeros((len(query), 0), np.float32), np.zeros((len(query), 0), np.int64))
        found = search(query.vectors, np.asarray(vectors)[picked], k, config, "backfill")
        return SearchResult(found.scores, np.where(found.rows >= 0, gallery_rows[found.rows.clip(0)], -1))

    old_rows = np.flatnonzero(kept)
    old_part = part(queries, old_gallery.vectors, old_rows, old_rows)
    new_part = part(reembedded_queries, reembedded.vectors, chosen, rows[chosen])
    return first_hit_rank(rank_merge(old_part, new_part, k), queries.labels, old_gallery.labels)


def backfill_curve(queries: Labeled, old_gallery: Labeled, reembedded: Labeled,
                   replaceable_rows: np.ndarray | None = None, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   order: np.ndarray | None = None, ks: Sequence[int] = (1, 5, 10),
                   config: SearchConfig | None = None, validate: bool = True,
                   reembedded_queries: Labeled | None = None) -> dict:
    """Recall@K when a fraction p of the replaceable gallery rows has been re-embedded (the rest left old).

    ``reembedded.vectors[i]`` is the re-embedded vector of gallery row ``replaceable_rows[i]`` (default: every
    row, in order); ``order`` (default: row order) says which are re-embedded first, so for each p the first
    ``round(p · n)`` of it are. The merge rule follows the spaces (see :func:`backfill_ranks`).
    """
    rows = np.arange(len(old_gallery)) if replaceable_rows is None else np.asarray(replaceable_rows)
    order = np.arange(len(rows)) if order is None else np.asarray(order)
    if len(reembedded) != len(rows) or len(order) != len(rows):
        raise InputError(f"Backfill: {len(reembedded)} re-embedded vectors and an order of {len(order)} for "
                         f"{len(rows)} replaceable gallery rows.")
    _check_fractions(fractions)
    if validate:  # callers that checked the vectors already skip a full pass over a large gallery
        check_vectors(np.asarray(reembedded.vectors), "Backfill: re-embedded gallery")
        check_pair(queries, old_gallery, "Backfill")
    recall: dict[int, list[float]] = {int(k): [] for k in ks}
    for p in fractions:
        chosen = order[:int(math.floor(p * len(rows) + 0.5))]
        ranks = backfill_ranks(queries, old_gallery, reembedded, rows, chosen, max(ks), config, reembedded_queries)
        for k, value in recall_from_ranks(ranks, ks).items():
            recall[k].append(value)
    merge = SCORE if reembedded.space_id == old_gallery.space_id or reembedded_queries is None else RANK
    return {"fractions": [float(p) for p in fractions], "replaceable": int(len(rows)), "merge": merge,
            "recall": recall, "auc": {k: auc(fractions, values) for k, values in recall.items()}}


def curves_by_ordering(queries: Labeled, old_gallery: Labeled, reembedded: Labeled, rows: np.ndarray | None,
                       orderings: Sequence[str], seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                       ks: Sequence[int] = (1, 5, 10), config: SearchConfig | None = None,
                       reembedded_queries: Labeled | None = None, neighbours: int = NEIGHBOURS,
                       head=None) -> dict[str, dict]:
    """:func:`backfill_curve` for each ordering, computed from the stored old vectors of the replaceable rows
    (``neighbours``: k of their neighbour graph; ``head``: the adapter's uncertainty head, for that ordering;
    the oracle from the measured per-item gain at R@min(ks))."""
    rows = np.arange(len(old_gallery)) if rows is None else np.asarray(rows)
    stored = np.asarray(old_gallery.vectors)[rows]
    if head is not None:
        head.check_space(old_gallery.space_id)
    context: dict = {"k": neighbours, "config": config, "head": head}
    if any(name in NEEDS_QUERIES for name in orderings):
        k = min(ks)
        everything = np.arange(len(rows))
        before, after = (backfill_ranks(queries, old_gallery, reembedded, rows, chosen, k, config,
                                        reembedded_queries) for chosen in (everything[:0], everything))
        context["gain"] = item_gain(before, after, queries.labels, np.asarray(old_gallery.labels)[rows], k)
    return {name: backfill_curve(queries, old_gallery, reembedded, rows, fractions,
                                 order_items(name, stored, seed, **context), ks, config, validate=False,
                                 reembedded_queries=reembedded_queries)
            for name in orderings}


__all__ = ["ORDERINGS", "auc", "backfill_curve", "curves_by_ordering", "item_gain", "order_items",
           "rank_merge"]

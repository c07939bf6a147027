"""One evaluation: vectors for every space, the planned cells searched and scored, the backfill curve, the report."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..retrieval import (
    DEFAULT_KS,
    CellResult,
    Labeled,
    SearchConfig,
    check_pair,
    evaluate_cell,
    uses_gpu,
)
from ..spaces import check_same_space
from .encode import EvalSet, encode_space
from .examples import example_queries
from .fitted import support_ids
from .plan import (
    COMPATIBILITY,
    DIRECTIONS,
    GALLERY_MODALITY,
    MODALITIES,
    QUERY_MODALITY,
    REINDEXED,
    UPPER_BOUND,
    PlannedCell,
    Space,
    plan_cells,
    score_cells,
    uncertainty_heads,
)

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What to measure. ``fractions`` is the backfill grid, ``orderings`` the re-embedding orders compared
    (:data:`xbt.backfill.ORDERINGS`); ``seed`` seeds the random one and the support split;
    ``support_fraction``: the share of the evaluation set's images split off to fit the fitted spaces
    (:mod:`xbt.evaluation.fitted`) and left out of every measured cell (0: no split)."""

    ks: tuple[int, ...] = DEFAULT_KS
    fractions: tuple[float, ...] = tuple(i / 10 for i in range(11))
    orderings: tuple[str, ...] = ("random", "hubness", "density", "oracle")
    seed: int = 0
    support_fraction: float = 0.0
    search: SearchConfig = field(default_factory=SearchConfig)


def _check_spaces(spaces: Sequence[Space], eval_set: EvalSet | None, support: np.ndarray | None) -> None:
    names = [space.name for space in spaces]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"Space names must be distinct; {repeated} given more than once.")
    for position, space in enumerate(spaces):
        if space.derive is not None:
            missing = [name for name in space.derive.inputs if name not in names[:position]]
            if missing:
                raise InputError(f"Space {space.name!r} is derived from {list(space.derive.inputs)}: list "
                                 f"{missing} before it.")
        elif space.encoder is not None and eval_set is None:
            raise InputError(f"Space {space.name!r} has an encoder but there is no evaluation set to encode.")
        if space.fit is not None and support is None:
            raise InputError(f"Space {space.name!r} is fitted on a support split of the evaluation set; give an "
                             f"evaluation set and a support fraction above 0.")


def _check_stored(spaces: dict[str, Space], eval_set: EvalSet | None, galleries: dict[str, Labeled],
                  queries: dict[str, Labeled], stored_modality: str) -> None:
    """Stored vectors against the spaces they claim: names, space ids, dimensions, vectors, ids."""
    if stored_modality not in MODALITIES:
        raise InputError(f"stored_modality must be 'image' or 'text', got {stored_modality!r}.")
    for kind, stored in (("gallery", galleries), ("queries", queries)):
        for name, labeled in stored.items():
            if name not in spaces:
                raise InputError(f"Stored {kind} {name!r} names no space of this evaluation; spaces: {sorted(spaces)}.")
            space = spaces[name]
            check_same_space(space.space_id, labeled.space_id, f"The stored {name} {kind}",
                             f"Give the {kind} made in the space of {name!r}, or another name.")
            if labeled.dim != space.dim:
                raise InputError(f"The stored {name} {kind} has dimension {labeled.dim}, but space {name!r} "
                                 f"({space.space_id}) has {space.dim}; it was made with another model.")
            labeled.check(f"stored {name} {kind}")
    known = np.concatenate([eval_set.ids if eval_set is not None else np.zeros(0, str)]
                           + [v.labels for v in galleries.values()])
    for name, stored in queries.items():
        missing = np.setdiff1d(stored.labels, known)
        if missing.size:
            raise InputError(f"{missing.size} ids of the stored {name} queries are in no gallery (e.g. "
                             f"{missing[:5].tolist()}); the ids of the queries must line up with the gallery's ids.")
    for name, stored in galleries.items() if eval_set is not None else ():
        missing = np.setdiff1d(eval_set.ids, stored.labels)
        if missing.size:
            raise InputError(f"{missing.size} evaluation image ids are not in the stored {name} gallery (e.g. "
                             f"{missing[:5].tolist()}); the set's ids must line up with the gallery's ids.")


def _vectors(spaces: Sequence[Space], eval_set: EvalSet | None, galleries: dict[str, Labeled],
             stored_modality: str, cache_dir: str | Path | None, support: np.ndarray | None,
             config: EvalConfig) -> dict[str, dict[str, Labeled]]:
    """``{modality: {space name: vectors}}``: stored galleries, then encodings and derivations in space order;
    a fitted space is fitted on the support items' vectors of the spaces before it, then derived."""
    vectors: dict[str, dict[str, Labeled]] = {modality: {} for modality in MODALITIES}
    for space in spaces:
        if space.fit is not None:
            space.info.update(space.fit({modality: {name: _restricted(v, support) for name, v in named.items()}
                                         for modality, named in vectors.items()}, config))
        for modality in space.modalities:
            if modality == stored_modality and space.name in galleries:
                vectors[modality][space.name] = galleries[space.name]  # the stored gallery, never re-encoded
            elif space.encoder is not None:
                vectors[modality][space.name] = encode_space(space, eval_set, modality, cache_dir)
            elif space.derive is not None and all(n in vectors[modality] for n in space.derive.inputs):
                derived = space.derive.function(modality, *(vectors[modality][n] for n in space.derive.inputs))
                vectors[modality][space.name] = derived
    for modality, named in vectors.items():
        for name, labeled in named.items():
            labeled.check(f"{name} {modality} embeddings")  # stored galleries were checked on arrival: no-op
    return vectors


def _rows(labeled: Labeled, keep: np.ndarray) -> Labeled:
    return labeled if keep.all() else Labeled(np.asarray(labeled.vectors[keep]), labeled.labels[keep],
                                              labeled.space_id)


def _restricted(labeled: Labeled, ids: np.ndarray) -> Labeled:
    """The rows whose label is one of ``ids``."""
    return _rows(labeled, np.isin(labeled.labels, ids))


def _without(labeled: Labeled, ids: np.ndarray | None) -> Labeled:
    """The rows whose label is not one of ``ids`` (all of them for None)."""
    return labeled if ids is None else _rows(labeled, ~np.isin(labeled.labels, ids))


def _pools(eval_set: EvalSet | None, vectors: dict[str, dict[str, Labeled]], queries: dict[str, Labeled],
           stored_modality: str, support: np.ndarray | None) -> dict[str, tuple[dict, dict]]:
    """(query vectors, gallery vectors) by space name, per direction. Stored galleries serve as queries only
    for the evaluation set's items (distractors have no captions or images); stored queries join the
    direction whose galleries are stored. The ``support`` items are in no query set and no gallery."""
    pools = {}
    for direction in DIRECTIONS:
        if eval_set is None and GALLERY_MODALITY[direction] != stored_modality:
            continue
        as_queries = {name: v if eval_set is None else _restricted(v, eval_set.ids)
                      for name, v in vectors[QUERY_MODALITY[direction]].items()}
        if GALLERY_MODALITY[direction] == stored_modality:
            as_queries.update(queries)
        pools[direction] = ({name: _without(v, support) for name, v in as_queries.items()},
                            {name: _without(v, support) for name, v in vectors[GALLERY_MODALITY[direction]].items()})
    return pools


def _replaceable_rows(gallery: Labeled, items: Labeled) -> np.ndarray | None:
    """Rows of ``gallery`` holding ``items`` (by id), or None when they cannot be matched one to one."""
    if np.array_equal(gallery.labels, items.labels):
        return np.arange(len(items))
    unique, first = np.unique(gallery.labels, return_index=True)
    if len(unique) != len(gallery) or len(np.unique(items.labels)) != len(items):
        return None  # caption galleries repeat ids: no one-to-one match with a stored gallery
    position = np.minimum(np.searchsorted(unique, items.labels), len(unique) - 1)
    return first[position] if np.array_equal(unique[position], items.labels) else None


def _backfill_curves(plan: list[PlannedCell], pools: dict, config: EvalConfig, reembed_role: str,
                     heads: dict[str, Any]) -> dict[str, dict]:
    """Per direction, the backfill curves (one per ordering) from the first compatibility cell ``adapter→old``
    (p = 0) to the self cell of the re-embedding space whose role is ``reembed_role`` (p = 1): the adapter
    itself (``REINDEXED``: one index, score merge) or the new model (``UPPER_BOUND``: two indexes, rank merge)."""
    from ..backfill import curves_by_ordering

    curves: dict[str, dict] = {}
    # several spaces may re-index their own gallery (the adapter, fitted baselines): keep every (direction, space)
    selves = {(c.direction, c.query) for c in plan if c.role == reembed_role and c.query == c.gallery}
    for cell in plan:
        if cell.role != COMPATIBILITY or cell.direction in curves:
            continue
        # score merge: the gallery re-embedded by this very adapter; rank merge: by the new model
        target = cell.query if reembed_role == REINDEXED else next(
            (space for direction, space in sorted(selves) if direction == cell.direction), None)
        if (cell.direction, target) not in selves:
            continue
        queries, galleries = pools[cell.direction]
        rows = _replaceable_rows(galleries[cell.gallery], galleries[target])
        if rows is None:
            logger.warning("No backfill curve for %s: the %s gallery cannot be matched item by item with the %s one.",
                           cell.direction, cell.gallery, target)
            continue
        cross = galleries[target].space_id != galleries[cell.gallery].space_id
        curves[cell.direction] = {
            "query": cell.query, "gallery": cell.gallery, "reembedded_by": target, "seed": config.seed,
            "orderings": curves_by_ordering(queries[cell.query], galleries[cell.gallery], galleries[target], rows,
                                            config.orderings, config.seed, config.fractions, config.ks, config.search,
                                            reembedded_queries=queries[target] if cross else None,
                                            head=heads.get(cell.query))}
    return curves


def evaluate(
    eval_set: EvalSet | None = None,
    spaces: Sequence[Space] = (),
    stored_galleries: dict[str, Labeled] | None = None,
    stored_queries: dict[str, Labeled] | None = None,
    stored_modality: str = "image",
    config: EvalConfig | None = None,
    cache_dir: str | Path | None = None,
) -> dict:
    """Encode, search and score every cell the ``spaces`` make; returns the report dict (see :mod:`xbt.report`).

    ``spaces`` are :class:`~xbt.evaluation.plan.Space` entries (build them with
    :mod:`xbt.evaluation.encode`'s constructors); a derived space comes after the spaces it is derived from.
    ``stored_galleries`` / ``stored_queries`` are the user's existing vectors, keyed by the name of the space
    they belong to (``stored_modality`` ``image``: galleries for text→image and text queries; ``text``: the
    other way round). A stored gallery replaces that space's encoded gallery (its encoder does not run on that
    modality), may hold more items (distractors) as long as every evaluation item's id is in it, and is
    refused when it records another space id than its space's. ``cache_dir``: root of the embedding cache
    (None: nothing cached).
    """
    config = config or EvalConfig()
    stored_galleries, stored_queries = dict(stored_galleries or {}), dict(stored_queries or {})
    if eval_set is None and not (stored_galleries and stored_queries):
        raise InputError("Nothing to evaluate: give an evaluation set, or stored galleries and stored queries.")
    by_name = {space.name: space for space in spaces}
    support = None
    if config.support_fraction:
        if eval_set is None:
            raise InputError("A support split is drawn from an evaluation set; give one, or support fraction 0.")
        support = support_ids(eval_set.ids, config.support_fraction, config.seed)
    _check_spaces(spaces, eval_set, support)
    _check_stored(by_name, eval_set, stored_galleries, stored_queries, stored_modality)

    vectors = _vectors(spaces, eval_set, stored_galleries, stored_modality, cache_dir, support, config)
    pools = _pools(eval_set, vectors, stored_queries, stored_modality, support)
    plan = plan_cells(spaces, {d: (set(q), set(g)) for d, (q, g) in pools.items()})
    if not plan:
        raise InputError("No query space shares a space id with any gallery; nothing to evaluate.")
    for cell in plan:  # every pair is checked before the first search
        check_pair(pools[cell.direction][0][cell.query], pools[cell.direction][1][cell.gallery],
                   f"{cell.direction} {cell.name}", vectors=False)

    cells: list[CellResult] = []
    for planned in plan:
        queries, galleries = pools[planned.direction]
        cell = evaluate_cell(planned.direction, planned.query, planned.gallery, queries[planned.query],
                             galleries[planned.gallery], config.ks, config.search, validate=False, role=planned.role)
        cell.query_space_id, cell.gallery_space_id = planned.query_space_id, planned.gallery_space_id
        cells.append(cell)
    score_cells(cells)
    heads = uncertainty_heads(spaces)

    dataset: dict[str, Any] = eval_set.describe() if eval_set is not None else {}
    dataset["stored"] = {f"{name} ({kind})": {"items": len(v), "dim": v.dim, "space_id": v.space_id}
                         for kind, stored in (("gallery", stored_galleries), ("queries", stored_queries))
                         for name, v in stored.items()}
    if support is not None:
        dataset["support"] = {"fraction": config.support_fraction, "seed": config.seed, "images": len(support),
                              "captions": int(np.isin(eval_set.caption_ids, support).sum()),
                              "measured_images": len(eval_set.ids) - len(support)}
    from .. import __version__
    from ..report import cells_to_json

    return {
        "xbt_version": __version__,
        "spaces": {space.name: space.describe() for space in spaces},
        "dataset": dataset,
        "search": {"index_factory": config.search.index_factory, "search_parameters": config.search.search_parameters,
                   "shard_rows": config.search.shard_rows, "gpu": uses_gpu(config.search)},
        "ks": list(config.ks),
        "cells": cells_to_json(cells),
        "backfill": _backfill_curves(plan, pools, config, REINDEXED, heads),
        "backfill_new_model": _backfill_curves(plan, pools, config, UPPER_BOUND, heads),
        "examples": example_queries(plan, pools, eval_set),
    }

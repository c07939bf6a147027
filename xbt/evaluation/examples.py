"""Example queries for the visual report: a few queries' top results under old→old, adapter→old and new→new.

The queries are evenly spaced over the evaluation set (not picked by outcome, so the page
shows typical results, not flattering ones). Each hit records the gallery item's id, its
caption text when the gallery is the evaluation set's captions, and whether it is relevant.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..retrieval import search
from .encode import EvalSet
from .plan import COMPATIBILITY, GALLERY_MODALITY, LOWER_BOUND, QUERY_MODALITY, TEXT, UPPER_BOUND, PlannedCell

EXAMPLE_ROLES = (LOWER_BOUND, COMPATIBILITY, UPPER_BOUND)  # old→old, the first adapter→old, new→new


def _texts(eval_set: EvalSet | None, labels: np.ndarray) -> list[str] | None:
    """The captions behind a pool of caption vectors, when the pool is the evaluation set's captions in order."""
    if eval_set is None or len(labels) != len(eval_set.texts) or not np.array_equal(labels, eval_set.caption_ids):
        return None
    return eval_set.texts


def example_queries(plan: list[PlannedCell], pools: dict, eval_set: EvalSet | None, count: int = 4,
                    k: int = 5) -> dict[str, list[dict[str, Any]]]:
    """``{direction: [{"query": {"id", "text"}, "hits": {cell name: [{"id", "text", "relevant"}]}}]}``."""
    examples: dict[str, list[dict[str, Any]]] = {}
    for direction, (queries, galleries) in pools.items():
        cells = []
        for role in EXAMPLE_ROLES:
            cell = next((c for c in plan if c.direction == direction and c.role == role), None)
            if cell is not None:
                cells.append(cell)
        if not cells:
            continue
        labels = np.asarray(queries[cells[0].query].labels)
        if any(not np.array_equal(np.asarray(queries[c.query].labels), labels) for c in cells):
            continue  # the cells' query sets differ (stored queries): no common examples
        rows = np.unique(np.linspace(0, len(labels) - 1, min(count, len(labels))).round().astype(int))
        query_texts = _texts(eval_set, labels) if QUERY_MODALITY[direction] == TEXT else None
        entries = [{"query": {"id": str(labels[row]), "text": query_texts[row] if query_texts else None}, "hits": {}}
                   for row in rows]
        for cell in cells:
            gallery = galleries[cell.gallery]
            gallery_labels = np.asarray(gallery.labels)
            gallery_texts = _texts(eval_set, gallery_labels) if GALLERY_MODALITY[direction] == TEXT else None
            found = search(np.asarray(queries[cell.query].vectors)[rows], gallery.vectors, k)
            for entry, hit_rows, query_label in zip(entries, found.rows, labels[rows], strict=True):
                entry["hits"][cell.name] = [
                    {"id": str(gallery_labels[r]), "text": gallery_texts[r] if gallery_texts else None,
                     "relevant": bool(gallery_labels[r] == query_label)} for r in hit_rows if r >= 0]
        examples[direction] = entries
    return examples

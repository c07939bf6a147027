"""``xbt plan``: the order to backfill a stored gallery in, what it is predicted to give, and what it costs.

    xbt plan --gallery runs/gallery --ordering hubness --embed_manifest runs/new_items \\
             --eval_dir runs/eval --output_dir runs/plan

Writes ``order.txt`` (the gallery's ids, the first to re-embed first) and ``plan.json``:
the ordering, the gallery's count and space id, the embedding rate and the hours the whole
backfill takes at it, and, from an ``xbt eval`` output, the predicted backfill curves of
this ordering (Recall@K against the fraction re-embedded, with the adapter and with the new
model). The orderings read only the stored vectors (no model runs here; ``uncertainty``
also the adapter's small FastFill head, ``--adapter``); see
:mod:`xbt.backfill`. Over a very large gallery the neighbour graph of ``hubness`` and
``density`` is best searched with an approximate index (``--index_factory``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

logger = logging.getLogger(__name__)

ORDER_FILE, PLAN_FILE = "order.txt", "plan.json"


@dataclass
class PlanConfig:
    """Options of ``xbt plan``."""

    gallery: str = field(metadata={"help": "the stored OLD-space gallery: an xbt embed folder, .npy, .safetensors "
                                           "or faiss index"})
    output_dir: str = field(metadata={"help": "folder for order.txt and plan.json"})
    ordering: str = field(default="hubness", metadata={
        "help": "re-embedding order: random, hubness (k-occurrence in the old space), density, or uncertainty "
                "(FastFill: the adapter's uncertainty head, largest σ first; needs --adapter)"})
    adapter: str | None = field(default=None, metadata={
        "help": "the adapter folder whose uncertainty head orders the gallery (--ordering uncertainty); only the "
                "small head is loaded"})
    gallery_ids: str | None = field(default=None, metadata={
        "help": "ids of the gallery rows, one per line (default: the ids stored with it, else row numbers)"})
    seed: int = field(default=0, metadata={"help": "seed of the random ordering"})
    neighbours: int = field(default=10, metadata={"help": "k of the old-space neighbour graph (hubness, density)"})
    index_factory: str = field(default="Flat", metadata={
        "help": "faiss index of the neighbour search, e.g. IVF4096,Flat for a very large gallery"})
    items_per_second: float | None = field(default=None, metadata={
        "help": "measured re-embedding rate; or give --embed_manifest"})
    embed_manifest: str | None = field(default=None, metadata={
        "help": "an `xbt embed` output folder (or its manifest.json): its last run's items/s is the rate"})
    eval_dir: str | None = field(default=None, metadata={
        "help": "an `xbt eval` output folder: its backfill curves of this ordering are the predicted curves"})

    def __post_init__(self) -> None:
        from .backfill import NEEDS_QUERIES, ORDERINGS

        allowed = [name for name in ORDERINGS if name not in NEEDS_QUERIES]
        if self.ordering not in allowed:
            raise InputError(f"--ordering {self.ordering!r}: allowed {', '.join(allowed)} (the oracle needs "
                             f"evaluation queries and exists in xbt eval only).")
        if self.neighbours < 1:
            raise InputError(f"--neighbours must be at least 1, got {self.neighbours}.")
        if self.items_per_second is not None and self.items_per_second <= 0:
            raise InputError(f"--items_per_second must be positive, got {self.items_per_second}.")
        if (self.ordering == "uncertainty") != (self.adapter is not None):
            raise InputError("--ordering uncertainty reads the adapter's uncertainty head: give --adapter DIR with "
                             "it (and only with it).")
        if self.items_per_second is not None and self.embed_manifest is not None:
            raise InputError("Give --items_per_second or --embed_manifest, not both.")


def measured_rate(path: str | Path) -> float:
    """items/s of the last run recorded in an ``xbt embed`` manifest (folder or file)."""
    path = Path(path)
    manifest = path / "manifest.json" if path.is_dir() else path
    if not manifest.is_file():
        raise InputError(f"--embed_manifest {str(path)!r}: no manifest.json there; pass an `xbt embed` output.")
    runs = json.loads(manifest.read_text()).get("runs") or []
    rate = runs[-1].get("items_per_second") if runs else None
    if not rate:
        raise InputError(f"--embed_manifest {str(manifest)!r} records no items_per_second for its last run.")
    return float(rate)


def predicted_curves(eval_dir: str | Path, ordering: str) -> dict[str, dict[str, Any]]:
    """``{"backfill"|"backfill_new_model": {direction: curve of ordering}}`` from an ``xbt eval`` output."""
    path = Path(eval_dir) / "metrics.json"
    if not path.is_file():
        raise InputError(f"--eval_dir {str(eval_dir)!r}: no metrics.json there; pass an `xbt eval` output folder.")
    report = json.loads(path.read_text())
    curves = {key: {direction: {"query": curve["query"], "reembedded_by": curve["reembedded_by"],
                                **curve["orderings"][ordering]}
                    for direction, curve in report.get(key, {}).items() if ordering in curve.get("orderings", {})}
              for key in ("backfill", "backfill_new_model")}
    if not any(curves.values()):
        raise InputError(f"--eval_dir {str(eval_dir)!r} holds no backfill curve of ordering {ordering!r}; run "
                         f"xbt eval with --orderings {ordering}.")
    return curves


def plan(config: PlanConfig) -> dict[str, Any]:
    """Order the gallery, write order.txt and plan.json; returns the plan."""
    import numpy as np

    from .backfill import order_items
    from .io import atomic_write_json, atomic_write_text
    from .retrieval import SearchConfig, load_embeddings

    rate = measured_rate(config.embed_manifest) if config.embed_manifest else config.items_per_second
    curves = predicted_curves(config.eval_dir, config.ordering) if config.eval_dir else None
    gallery = load_embeddings(config.gallery, config.gallery_ids)
    head = None
    if config.adapter is not None:
        from .uncertainty import load_head

        head = load_head(config.adapter)
        head.check_space(gallery.space_id)
    order = order_items(config.ordering, np.asarray(gallery.vectors), config.seed, k=config.neighbours,
                        config=SearchConfig(index_factory=config.index_factory), head=head)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / ORDER_FILE, "\n".join(str(label) for label in np.asarray(gallery.labels)[order]) + "\n")
    result = {"ordering": config.ordering, "seed": config.seed, "neighbours": config.neighbours,
              "adapter": config.adapter,
              "gallery": str(config.gallery), "count": len(gallery), "space_id": gallery.space_id,
              "items_per_second": rate, "hours": None if rate is None else len(gallery) / rate / 3600.0,
              "predicted": curves}
    atomic_write_json(output / PLAN_FILE, result)
    return result


def run(argv: Sequence[str]) -> int:
    """``xbt plan``: parse the options, order the gallery, print where the plan went."""
    from .config import parse_configs

    (config,) = parse_configs((PlanConfig,), argv, prog="xbt plan", description=__doc__.split("\n\n")[0])
    result = plan(config)
    cost = "rate unknown (give --embed_manifest)" if result["hours"] is None else f"{result['hours']:.2f} h at " \
        f"{result['items_per_second']:.1f} items/s"
    print(f"{result['count']} items ordered by {result['ordering']}; full backfill: {cost}; "
          f"{Path(config.output_dir) / PLAN_FILE}")
    return 0

"""Batching image-text examples and keeping count of the ones that had to be skipped.

Workers cannot share counters with the main process, so :func:`collate_pairs` drops
bad examples from a batch and hands them along *in* the batch (``batch["bad"]``);
:class:`DataQuality` in the main process adds them up, logs a summary and stops the
run with :class:`~xbt.errors.InputError` once more than ``max_bad_fraction`` of the
data is unusable, so a broken dataset fails loudly instead of training on scraps.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from .examples import BadExample

logger = logging.getLogger(__name__)


def collate_pairs(items: list[dict | BadExample]) -> dict[str, Any]:
    """Batch the usable examples; skipped ones travel in ``batch["bad"]`` to be counted.

    Keys: ``images`` (a stacked tensor when the transform returns tensors, else a list
    of PIL images; possibly empty), ``captions``, ``caption_indices``, ``ids``,
    ``indices`` (position in a map-style source, -1 in a stream) and ``bad``
    (list of :class:`~xbt.data.examples.BadExample`).
    """
    good = [item for item in items if not isinstance(item, BadExample)]
    images: Any = [item["image"] for item in good]
    if images and all(isinstance(image, torch.Tensor) for image in images):
        images = torch.stack(images)
    return {
        "images": images,
        "captions": [item["caption"] for item in good],
        "caption_indices": torch.tensor([item["caption_index"] for item in good], dtype=torch.long),
        "ids": [item["id"] for item in good],
        "indices": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "bad": [item for item in items if isinstance(item, BadExample)],
    }


@dataclass
class DataQuality:
    """Counts of used and skipped examples over one pass; enforces ``max_bad_fraction``.

    Feed every batch to :meth:`update`; call :meth:`finish` after the pass. With
    ``expected_total`` known (map-style sources), the run stops as soon as the bad
    examples exceed the allowance for the whole pass; otherwise at :meth:`finish`.
    """

    max_bad_fraction: float = 0.01
    expected_total: int | None = None
    kept: int = 0
    bad: Counter = field(default_factory=Counter)
    examples: list[BadExample] = field(default_factory=list)
    max_examples: int = 20

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise InputError(f"max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}.")

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    @property
    def seen(self) -> int:
        return self.kept + self.bad_total

    @property
    def bad_fraction(self) -> float:
        return self.bad_total / self.seen if self.seen else 0.0

    def record_bad(self, bad: list[BadExample]) -> None:
        for example in bad:
            self.bad[example.reason] += 1
            if len(self.examples) < self.max_examples:
                self.examples.append(example)
            logger.debug("skipped %s (%s): %s", example.id, example.reason, example.message)

    def update(self, batch: dict[str, Any]) -> None:
        """Count one collated batch; raises :class:`InputError` once too much is bad."""
        self.kept += len(batch["ids"])
        self.record_bad(batch["bad"])
        if self.expected_total and self.bad_total > self.max_bad_fraction * self.expected_total:
            raise InputError(self._too_many(self.expected_total))

    def finish(self) -> DataQuality:
        """Log the summary of the pass; raises :class:`InputError` if the bad fraction is too high."""
        (logger.warning if self.bad_total else logger.info)("%s", self.summary())
        if self.bad_fraction > self.max_bad_fraction:
            raise InputError(self._too_many(self.seen))
        return self

    def summary(self) -> str:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.bad.items())) or "none"
        return (f"image-text pairs: {self.kept} used, {self.bad_total} skipped of {self.seen} "
                f"({100 * self.bad_fraction:.2f}%; skipped: {reasons})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable counts (for training summaries)."""
        return {"kept": self.kept, "skipped": self.bad_total, "skipped_by_reason": dict(self.bad),
                "bad_fraction": self.bad_fraction, "max_bad_fraction": self.max_bad_fraction,
                "examples": [{"id": e.id, "reason": e.reason, "message": e.message} for e in self.examples]}

    def _too_many(self, total: int) -> str:
        shown = "; ".join(f"{e.id}: {e.message.rstrip('.')}" for e in self.examples[:5])
        return (f"{self.bad_total} of {total} image-text pairs are unusable, more than the allowed "
                f"{100 * self.max_bad_fraction:g}% ({self.summary()}). First problems: {shown}. "
                "Fix or remove these files, or raise max_bad_fraction if losing them is acceptable.")

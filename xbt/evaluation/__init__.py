"""Evaluation: the cross-model retrieval matrix built from the spaces it is given, the backfill curve, the report.

* :mod:`~xbt.evaluation.plan` (pure Python): :class:`Space` entries, cell roles, which cells exist
  (equal space ids), scoring against the bound cells.
* :mod:`~xbt.evaluation.encode`: the evaluation set, space constructors (encoders, the new model's native
  space, baselines, blends, the denoised reference), encoding through :mod:`xbt.cache`.
* :mod:`~xbt.evaluation.matrix`: :func:`evaluate`.

Names resolve lazily, so ``import xbt.evaluation.plan`` (e.g. from the CLI or the report) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate": "matrix", "EvalConfig": "matrix",
    "EvalSet": "encode", "load_eval_set": "encode", "encoder_space": "encode", "native_space": "encode",
    "adapter_space": "encode", "projected_space": "encode", "blended_space": "encode", "denoised_space": "encode",
    "stored_space": "encode", "encode_space": "encode",
    "Space": "plan", "Derivation": "plan", "PlannedCell": "plan", "plan_cells": "plan", "cell_role": "plan",
    "score_cells": "plan", "ROLES": "plan", "KINDS": "plan",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

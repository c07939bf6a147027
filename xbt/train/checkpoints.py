"""Training checkpoints shared by both stages.

A checkpoint is ``OUTPUT/checkpoints/step-NNNNNNNN/``: Accelerate's ``save_state``
(trainable weights as safetensors; optimizer, scheduler and RNG states) plus
``progress.json``, the stage's own position record (step, data position, metric
history). It is written under a temporary name and renamed once complete, so a run
killed mid-save never leaves a checkpoint that looks usable. Nothing here goes
through ``register_for_checkpointing``, whose loader unpickles without restriction.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import atomic_write_json

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
PROGRESS_FILE = "progress.json"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporaries never count)."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / PROGRESS_FILE).is_file())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``None``/empty -> none; ``"latest"`` -> newest (none yet: start afresh)."""
    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            logger.info("No checkpoint in %s yet: starting from scratch", Path(output_dir) / CHECKPOINT_DIR)
        return found
    path = Path(resume)
    if not (path / PROGRESS_FILE).is_file():
        raise InputError(f"--resume {resume}: not a complete checkpoint (no {PROGRESS_FILE}); pass 'latest' or a "
                         f"folder under {Path(output_dir) / CHECKPOINT_DIR}.")
    return path


def read_progress(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / PROGRESS_FILE).read_text())


def save_checkpoint(accelerator, output_dir: str | Path, progress: dict[str, Any], keep: int) -> Path:
    """Save Accelerate's state and ``progress`` (JSON) as ``step-N``; keep the newest ``keep`` (0: all).

    Every process must call it (``save_state`` synchronises them).
    """
    final = checkpoint_path(output_dir, progress["step"])
    temporary = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)  # left behind by a killed run
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(temporary / PROGRESS_FILE, progress)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final

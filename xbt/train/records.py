"""Skip a step whose record shows it already finished with the same inputs: the one helper for it.

``xbt fit`` (stage 1, stage 2) and the demo (its from-scratch models, its stored gallery)
run their steps through :func:`run_step`. A step's folder holds ``xbt_step.json``: a
hash of the step's identity (options, models' fingerprints, input digests), whether it
finished, and its JSON-able result. Written atomically, by the main process only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import atomic_write_json

logger = logging.getLogger(__name__)

RECORD_FILE = "xbt_step.json"


def digest(payload: Any) -> str:
    """Stable short hash of a JSON-able payload."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def files_digest(folder: Path, pattern: str) -> str:
    """Hash of the names and bytes of ``folder``'s files matching ``pattern``."""
    hasher = hashlib.sha256()
    for path in sorted(Path(folder).glob(pattern)):
        hasher.update(path.name.encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()[:24]


def run_step(name: str, folder: str | Path, identity: dict[str, Any], run: Callable[[], Any], *,
             done: Path | None = None, on_change: str = "refuse", main_process: bool = True) -> tuple[bool, Any]:
    """``run()`` unless ``folder``'s record shows it finished with this ``identity``; returns (ran, result).

    ``done``: a file the step's output must contain for a record to count (default: none).
    ``on_change``: what to do when the folder holds a step made from another identity (or
    output without a record): ``"refuse"`` (an InputError: never overwrite someone's
    results) or ``"redo"`` (run again, for reproducible by-products such as demo models).
    """
    folder = Path(folder)
    record_path = folder / RECORD_FILE
    key = digest(identity)
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    output_exists = done is None or done.exists()
    if record and record.get("key") == key and record.get("finished") and output_exists:
        logger.info("%s: already done in %s with these inputs, skipping", name, folder)
        return False, record.get("result")
    if on_change == "refuse":
        if record and record.get("key") != key:
            raise InputError(f"{folder} holds a {name} made with other options or models (record {record_path}). "
                             f"Delete that folder, or choose another run_dir, to train again.")
        if record is None and done is not None and done.exists():
            raise InputError(f"{folder} already holds a {name} that xbt did not record; choose another run_dir.")
    entry = {"key": key, "name": name, "identity": identity, "finished": False}
    if main_process:
        atomic_write_json(record_path, entry)
    result = run()
    if main_process:
        atomic_write_json(record_path, {**entry, "finished": True, "result": result})
    return True, result

"""Small file helpers every module shares: atomic writes and string ids.

Atomic: a file is written under a temporary name, flushed to disk and renamed, so a
process killed mid-write never leaves a file that looks complete.

Ids are strings everywhere in xbt (training, evaluation, stored galleries): an ids
file is a text file with one id per line, or a 1-D ``.npy`` array (integers or
strings), and every value is read as its string form. A production gallery keyed by
UUIDs and a demo gallery keyed by file names go through the same reader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InputError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_ids(path: str | Path) -> list[str]:
    """Ids from a text file (one per line, blank lines ignored) or a 1-D ``.npy`` array, as strings."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Ids file {str(path)!r} does not exist; give a text file with one id per line "
                         f"or a 1-D .npy array.")
    if path.suffix == ".npy":
        import numpy as np

        try:
            values = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise InputError(f"Ids file {str(path)!r} is not a plain .npy array ({error}).") from error
        if values.ndim != 1:
            raise InputError(f"Ids file {str(path)!r} must hold a 1-D array, got shape {values.shape}.")
        return [str(value) for value in values.tolist()]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_unique_ids(ids: Sequence[str], where: str) -> None:
    """Raise :class:`InputError` naming a repeated id: one id names one vector."""
    seen: set[str] = set()
    for identifier in ids:
        if identifier in seen:
            raise InputError(f"{where}: id {identifier!r} occurs more than once; each id must name one item.")
        seen.add(identifier)

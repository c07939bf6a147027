"""One image-text example: its captions, the caption a step sees, and what makes it unusable.

Shared by every pair source (folders, tables, tar shards), so an example is cleaned,
decoded and judged the same way wherever it comes from. Decoding runs in DataLoader
workers; anything that goes wrong becomes a :class:`BadExample` that the collate
function counts instead of an exception that would kill the worker.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import InputError

# Reasons an example is skipped (keys of the quality counts).
MISSING, CORRUPT, TOO_LARGE, NO_CAPTION = "missing_image", "corrupt_image", "oversized_image", "no_caption"

Transform = Callable[[Image.Image], Any]


@dataclass(frozen=True)
class BadExample:
    """An example that was skipped: its id, why (one of the reason constants) and the details."""

    id: str
    reason: str
    message: str


def clean_captions(value: Any, *, separator: str | None = None, json_list: bool = False) -> list[str]:
    """Captions from one metadata cell, stripped, empty ones dropped.

    ``value`` is a string (one caption), a list of strings, or None. A string is split
    on ``separator`` when one is given, or parsed as a JSON list when ``json_list``
    (how a CSV cell holds several captions). Raises :class:`InputError` for a cell
    that claims to be a JSON list but is not one.
    """
    if value is None:
        return []
    if isinstance(value, str):
        if separator is not None:
            value = value.split(separator)
        elif json_list:
            if not value.strip():
                return []
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise InputError(f"A captions cell is not a JSON list of strings ({error}): {value[:80]!r}. "
                                 "Write it as [\"first caption\", \"second\"], or set caption_separator.") from error
            if not isinstance(value, list):
                raise InputError(f"A captions cell holds {type(value).__name__}, not a JSON list: {str(value)[:80]!r}.")
        else:
            value = [value]
    if not isinstance(value, Sequence):
        raise InputError(f"A caption must be a string or a list of strings, got {type(value).__name__}.")
    return [caption.strip() for caption in value if isinstance(caption, str) and caption.strip()]


def caption_choice(seed: int, epoch: int, example_id: str, count: int) -> int:
    """Index of the caption an example shows in ``epoch``: fixed by (seed, epoch, id), uniform over ``count``.

    A hash rather than a random generator so that any worker, process or resumed run
    picks the same caption without sharing state.
    """
    digest = hashlib.blake2b(f"{seed}\x00{epoch}\x00{example_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def classify(error: InputError) -> str:
    """The skip reason for an image that failed to load."""
    if isinstance(error.__cause__, Image.DecompressionBombError):
        return TOO_LARGE
    if "does not exist" in str(error):
        return MISSING
    return CORRUPT


def make_example(example_id: str, captions: list[str], load_image: Callable[[], Image.Image],
                 transform: Transform | None, *, seed: int, epoch: int, index: int = -1) -> dict | BadExample:
    """Decode one example and pick its caption for ``epoch``; a :class:`BadExample` if unusable.

    Returns ``{"id", "index", "caption", "caption_index", "image"}`` where ``image`` is
    ``transform(rgb_image)`` (or the RGB PIL image when no transform is given).
    """
    if not captions:
        return BadExample(example_id, NO_CAPTION, "no non-empty caption")
    try:
        image = load_image()
    except InputError as error:
        return BadExample(example_id, classify(error), str(error))
    choice = caption_choice(seed, epoch, example_id, len(captions))
    return {
        "id": example_id,
        "index": index,
        "caption": captions[choice],
        "caption_index": choice,
        "image": transform(image) if transform is not None else image,
    }

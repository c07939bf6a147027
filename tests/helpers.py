"""Helpers shared by several test modules (import them from here, never from another test module).

pytest puts this folder on ``sys.path`` (it holds the rootdir's ``conftest.py``), so
``from helpers import ...`` works in every test; a test's subprocess adds the folder
to ``sys.path`` itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

_CAPTION_COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
_CAPTION_SHAPES = ["square", "circle", "triangle", "star", "cross", "ring"]
_CAPTION_PLACES = ["on grass", "in the snow", "on a table", "under a tree", "near a wall"]
_SQUARE_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
TINY_IMAGE_SIZE = 8  # side of the images tiny_preprocess makes


def captions(count: int) -> list[str]:
    """Distinct generated captions, deterministic."""
    out = []
    for i in range(count):
        colour = _CAPTION_COLOURS[i % 8]
        shape, place = _CAPTION_SHAPES[(i // 8) % 6], _CAPTION_PLACES[(i // 48) % 5]
        out.append(f"a {colour} {shape} {place} number {i // 240}")
    return out


def write_pairs(folder: Path, count: int) -> list[str]:
    """Coloured squares on noise with two captions each, plus one corrupt and one missing image."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        colour, size = list(_SQUARE_COLOURS)[i % 4], ("small", "large")[(i // 4) % 2]
        pixels = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
        side = 8 if size == "small" else 20
        pixels[6:6 + side, 6:6 + side] = _SQUARE_COLOURS[colour]
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "captions": [f"a {size} {colour} square", f"{colour} block, {size}"]})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    rows.append({"file_name": "corrupt.png", "captions": ["a broken file"]})
    rows.append({"file_name": "missing.png", "captions": ["a file that is not there"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [row["file_name"] for row in rows]


def tiny_preprocess(image: Image.Image) -> torch.Tensor:
    """A picklable stand-in for a CLIP preprocess: fixed size, CHW uint8."""
    return pil_to_tensor(image.resize((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)))


def read_all(loader) -> list[tuple[str, str]]:
    """(id, caption) of every example a pair loader yields, in order."""
    return [(example_id, caption) for batch in loader for example_id, caption in zip(batch["ids"], batch["captions"])]


Z = 3.0
"""Paired effects must clear Z standard errors of the mean difference (fixed up front, about 0.1 % one-sided)."""


def separated(better: np.ndarray, worse: np.ndarray) -> tuple[bool, float]:
    """Whether ``better`` exceeds ``worse`` (paired per query) by at least :data:`Z` standard errors; and that z."""
    difference = np.asarray(better, dtype=np.float64) - np.asarray(worse, dtype=np.float64)
    error = difference.std(ddof=1) / np.sqrt(len(difference))
    z = float(difference.mean() / error) if error > 0 else float("inf") * np.sign(difference.mean())
    return z >= Z, z


def hits_at_5(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per query: 1.0 when an item of its label is among the 5 nearest of ``gallery`` (exact inner product)."""
    from xbt.retrieval import first_hit_rank, search

    return (first_hit_rank(search(queries, gallery, 5), query_labels, labels) < 5).astype(np.float64)

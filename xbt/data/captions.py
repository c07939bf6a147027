"""Caption corpora for stage 1, read through 🤗 ``datasets``.

A corpus comes from one of:

- a plain text file (``.txt``): one caption per line;
- a JSONL / JSON, CSV or Parquet file: the captions are the column named by ``column``;
- a ``save_to_disk`` folder or a Hub dataset name (anything that is not an existing file): ``split``
  and ``column``, optionally rows kept by ``split_column`` / ``split_values`` (see :mod:`xbt.data.tables`).

A cell holding a list of captions contributes each of them.

Captions are stripped; empty or whitespace-only ones are dropped and counted, exact
duplicates are removed (first occurrence kept, counted), and a seeded, held-out
validation slice is chosen. Every problem (missing file, unreadable file, missing
column, non-text column, empty corpus) is an :class:`~xbt.errors.InputError` raised
before any encoding starts.

Public API::

    config = CaptionConfig(captions="captions.jsonl", column="caption", validation_size=0.05)
    corpus = load_captions(config)          # -> CaptionCorpus
    corpus.texts                            # all kept captions, in source order
    corpus.train_indices, corpus.validation_indices   # disjoint, sorted
    corpus.fingerprint                      # hash of the texts (keys the embedding cache)

:func:`split_indices` recomputes the split from (count, validation_size, seed) alone,
so a trainer that reads only the embedding cache gets the very same split.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .config import CaptionConfig
from .tables import filter_split, read_column, select_split

logger = logging.getLogger(__name__)

# file suffix -> datasets builder
FILE_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class CaptionCorpus:
    """Deduplicated captions with a held-out validation slice and what was dropped."""

    texts: list[str]
    train_indices: np.ndarray
    validation_indices: np.ndarray
    source: str
    dropped_empty: int
    dropped_duplicates: int

    @property
    def fingerprint(self) -> str:
        return texts_fingerprint(self.texts)

    @property
    def train(self) -> list[str]:
        return [self.texts[i] for i in self.train_indices]

    @property
    def validation(self) -> list[str]:
        return [self.texts[i] for i in self.validation_indices]

    def summary(self) -> dict:
        return {"source": self.source, "captions": len(self.texts), "train": len(self.train_indices),
                "validation": len(self.validation_indices), "dropped_empty": self.dropped_empty,
                "dropped_duplicates": self.dropped_duplicates, "fingerprint": self.fingerprint}


def texts_fingerprint(texts: Sequence[str]) -> str:
    """Order-sensitive hash of a list of texts (length-prefixed, so no two lists collide by joining)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return f"texts-{len(texts)}-{digest.hexdigest()[:16]}"


def split_indices(count: int, validation_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) index arrays, both sorted; validation_size is a fraction (< 1) or a count."""
    if validation_size < 0:
        raise InputError(f"validation_size must be >= 0, got {validation_size}.")
    size = int(round(validation_size * count)) if validation_size < 1 else int(validation_size)
    if validation_size > 0:
        size = max(size, 1)
    if size >= count:
        raise InputError(f"A validation slice of {size} leaves no training captions out of {count}; "
                         f"lower validation_size or provide more captions.")
    permutation = np.random.default_rng(seed).permutation(count)
    return np.sort(permutation[size:]), np.sort(permutation[:size])


def read_raw_captions(config: CaptionConfig) -> list:
    """The raw caption column of a file, saved dataset or Hub dataset, as a list (no cleaning).

    Rows are first kept by ``config.split_column`` / ``split_values`` (a protocol split held in a column);
    ``config.column`` may name a struct field (``sentences.raw``). Cells may be strings or lists of them.
    """
    import datasets

    source, column, split = config.captions, config.column, config.split
    if not source:
        raise InputError("No caption corpus given: pass a .txt/.jsonl/.csv/.parquet file, a save_to_disk folder or "
                         "a Hub dataset name.")
    path = Path(source).expanduser()
    saved = path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))
    if path.is_dir() and not saved:
        raise InputError(f"{source!r} is a directory; pass one caption file (.txt, .jsonl, .json, .csv, .parquet) "
                         "or a save_to_disk folder.")
    if saved:
        name, kwargs, where = None, {}, f"saved dataset {source!r} (split {split!r})"
    elif path.exists() or path.suffix.lower() in FILE_FORMATS:
        if not path.is_file():
            raise InputError(f"Caption file {str(path)!r} does not exist.")
        builder = FILE_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise InputError(f"Caption file {str(path)!r} has an unknown format; use one of "
                             f"{', '.join(sorted(FILE_FORMATS))}.")
        kwargs = {"data_files": {"train": str(path.resolve())}, "split": "train"}
        if builder == "text":
            column, kwargs["keep_linebreaks"] = "text", False
        name, where = builder, f"file {str(path)!r}"
    else:
        name, kwargs, where = source, {"split": split}, f"Hub dataset {source!r} (split {split!r})"
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(name, **kwargs)
    except Exception as error:  # datasets raises many types for unreadable data
        raise InputError(f"Could not read captions from {where}: {type(error).__name__}: {error}") from error
    dataset = filter_split(select_split(dataset, split, where), config.split_column, config.split_values, where)
    return read_column(dataset, column, where)


def clean_captions(raw: Sequence) -> tuple[list[str], int, int]:
    """Strip, drop empty ones, drop exact duplicates: (texts, dropped_empty, dropped_duplicates)."""
    seen: set[str] = set()
    texts: list[str] = []
    empty = duplicates = 0
    for index, value in enumerate(raw):
        if value is None:
            empty += 1
            continue
        if not isinstance(value, str):
            raise InputError(f"Caption #{index} is a {type(value).__name__} ({value!r}), not text; "
                             f"is the caption column the right one?")
        text = value.strip()
        if not text:
            empty += 1
        elif text in seen:
            duplicates += 1
        else:
            seen.add(text)
            texts.append(text)
    return texts, empty, duplicates


def load_captions(config: CaptionConfig) -> CaptionCorpus:
    """Read, clean and split a caption corpus; raises :class:`InputError` on any unusable input."""
    # A nested cell (nlphuji/flickr30k's list of five captions per image) contributes each of its captions.
    raw = [text for cell in read_raw_captions(config) for text in (cell if isinstance(cell, list) else [cell])]
    texts, empty, duplicates = clean_captions(raw)
    if config.max_captions is not None:
        texts = texts[: config.max_captions]
    if not texts:
        raise InputError(f"The caption corpus {config.captions!r} holds no usable captions "
                         f"({len(raw)} rows, {empty} empty); check the file and the column {config.column!r}.")
    train, validation = split_indices(len(texts), config.validation_size, config.split_seed)
    corpus = CaptionCorpus(texts, train, validation, config.captions, empty, duplicates)
    logger.info("Captions from %s: %d kept (%d train, %d validation), %d empty and %d duplicates dropped",
                config.captions, len(texts), len(train), len(validation), empty, duplicates)
    return corpus

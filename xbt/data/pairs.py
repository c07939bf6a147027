"""Image-text pairs for stage 2 and evaluation, read through `datasets`.

Sources (``PairDataConfig.source``; ``format="auto"`` tells them apart):

- ``folder``: a folder of images with ``metadata.jsonl`` or ``metadata.csv``: a
  ``file_name`` column (path relative to the folder) and captions: ``caption`` or
  ``text`` (one string) or ``captions`` (a list; in CSV a JSON-encoded list, or any
  caption column split on ``caption_separator``). Id = ``id_column`` if given (e.g.
  the id of the image's stored old embedding), else ``file_name``.
- ``disk`` (a ``Dataset.save_to_disk`` folder), ``parquet`` (file, folder or glob)
  and ``hub`` (a dataset name for ``datasets.load_dataset``): a table with an image
  column (an ``Image`` feature, encoded bytes, or file paths) and a caption column.
  Id = ``id_column`` if given, else the row index. ``split`` may join splits (``train+validation``),
  ``split_column`` / ``split_values`` keep the rows of a split held in a column, and a caption column
  may be a struct field (``sentences.raw``): see :mod:`xbt.data.tables`.
- ``webdataset``: tar shards of ``{key}.jpg|png|...`` + ``{key}.txt|json`` (a folder,
  a file or a glob), streamed; see :mod:`xbt.data.webdataset`. Id = key.

Rows that share an id are one image (a table's first such row) with all their captions.

API, in the order a training script uses it::

    source = open_pairs(PairDataConfig(source="photos/", num_workers=2))  # validates; decodes nothing
    ids_and_captions = list(iter_captions(source))     # (id, [captions]) without touching images
    loader = make_pair_loader(source, transform=encoder.preprocess)
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch)                # this epoch's order and captions
        quality = source.new_quality()                 # new_quality(world_size) on each of several ranks
        for batch in loader:
            quality.update(batch)                      # raises InputError once too much is bad
            ...
        quality.finish()                               # logs the summary, enforces max_bad_fraction

A batch (:func:`~xbt.data.quality.collate_pairs`) holds ``images`` (stacked
``transform`` outputs), ``captions`` (the caption each example shows this step),
``caption_indices`` (its position in the example's caption list: the key for cached
per-caption embeddings), ``ids`` (to match stored old image embeddings), ``indices``
and ``bad``. Skipped examples make batches smaller, possibly empty.

Determinism: the order of a map-style source is a permutation fixed by (seed, epoch);
each example's caption is fixed by (seed, epoch, id), so a resumed run sees the same
pairs. Resume mid-epoch: ``set_loader_epoch(loader, epoch)`` then
``accelerate.skip_first_batches(loader, n)`` (plain or prepared loaders; a tar stream
is read and dropped up to the resume point). Tar order also depends on the worker
count and world size. Several processes: build a map-style loader with the defaults
and ``accelerator.prepare`` it, OR pass ``rank``/``world_size`` and do not prepare it;
tar-shard loaders always take ``rank``/``world_size`` (never prepare them: accelerate
would split or dispatch the stream a second time).

Bad data: missing, corrupt, truncated or oversized images and examples without a
non-empty caption are skipped and counted (:class:`~xbt.data.quality.DataQuality`);
empty captions are dropped one by one.
"""

from __future__ import annotations

import csv
import glob
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import InputError
from ..images import decode_image, load_image
from .examples import NO_CAPTION, BadExample, Transform, clean_captions, make_example
from .config import PairDataConfig
from .packed import PackedCaptions, PackedStrings
from .quality import DataQuality, collate_pairs
from .tables import filter_split, has_column, read_column, select_split
from .webdataset import SHARD_SUFFIXES, WebDatasetPairs, find_shards, iter_shard_captions

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
LOCAL_SUFFIXES = {".tar", ".gz", ".tgz", ".parquet", ".jsonl", ".json", ".csv", ".arrow"}
CAPTION_COLUMNS = ("captions", "caption", "text")  # looked for in this order when caption_column is None


# ----------------------------------------------------------------------------- images by position

@dataclass
class FolderImages:
    """Images of a folder source, by position: files named in the metadata."""

    root: Path
    file_names: PackedStrings

    def load(self, position: int):
        return load_image(self.root / self.file_names[position])


@dataclass
class TableImages:
    """Images of a table source, by position: an ``Image`` cell ({bytes, path}), bytes, or a path."""

    table: Any  # datasets.Dataset with its image column not decoded
    column: str
    rows: np.ndarray  # table row of each position
    root: Path | None  # where relative paths point (a local source), else None

    def load(self, position: int):
        row = int(self.rows[position])
        cell = self.table[row][self.column]
        name = f"row {row}"
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return decode_image(cell["bytes"], cell.get("path") or name)
            cell = cell.get("path")
        if isinstance(cell, (bytes, bytearray)):
            return decode_image(bytes(cell), name)
        if isinstance(cell, str) and cell:
            path = Path(cell)
            return load_image(path if path.is_absolute() or self.root is None else self.root / path)
        raise InputError(f"Image cell of {name} holds no image (got {type(cell).__name__}).")


# ----------------------------------------------------------------------------- opening and validation

@dataclass
class PairSource:
    """A validated pair source. Map-style sources know every (id, captions) up front."""

    config: PairDataConfig
    format: str
    description: str
    ids: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    images: FolderImages | TableImages | None = None
    shards: list[Path] = field(default_factory=list)
    skipped: list[BadExample] = field(default_factory=list)  # found unusable while opening

    @property
    def streamed(self) -> bool:
        return self.format == "webdataset"

    def __len__(self) -> int:
        if self.streamed:
            raise TypeError("A tar-shard source has no length until it is read; use iter_captions().")
        return len(self.ids)

    def new_quality(self, world_size: int = 1) -> DataQuality:
        """A fresh :class:`DataQuality` for one pass (of one of ``world_size`` ranks).

        It starts with the examples skipped while opening; for map-style sources it knows
        the pass's size, so it stops the run as soon as the allowance is exceeded.
        """
        expected = None if self.streamed else math.ceil(len(self) / world_size) + len(self.skipped)
        quality = DataQuality(max_bad_fraction=self.config.max_bad_fraction, expected_total=expected)
        quality.record_bad(self.skipped)
        return quality


def open_pairs(config: PairDataConfig) -> PairSource:
    """Find, read and check the source's metadata; no image is decoded.

    Raises :class:`InputError` for a missing path, a folder without metadata, a missing
    column, or a source with no usable example.
    """
    kind = config.format if config.format != "auto" else detect_format(config.source)
    if kind == "webdataset":
        if config.split_column is not None:
            raise InputError(f"split_column {config.split_column!r}: tar shards have no columns; keep one split "
                             "per set of shards.")
        shards = find_shards(config.source)
        return PairSource(config, kind, f"{len(shards)} tar shard(s) at {config.source}", shards=shards)
    if kind == "folder":
        source = _open_folder(config)
    else:
        source = _open_table(config, kind)
    if not source.ids:
        raise InputError(f"{source.description} holds no image with a non-empty caption "
                         f"({len(source.skipped)} rows without one). Check the caption column.")
    if source.skipped:
        logger.warning("%s: %d of %d images have no non-empty caption and are skipped", source.description,
                       len(source.skipped), len(source.ids) + len(source.skipped))
    logger.info("opened %s: %d images, %d captions", source.description, len(source.ids),
                sum(map(len, source.captions)))
    return source


def detect_format(source: str) -> str:
    """The source format from what is on disk; a name that is no local path is a Hub dataset."""
    path = Path(source)
    if path.is_dir():
        if any((path / name).is_file() for name in METADATA_FILES):
            return "folder"
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "disk"
        if any(path.glob("*.parquet")):
            return "parquet"
        if any(child.name.endswith(SHARD_SUFFIXES) for child in path.iterdir()):
            return "webdataset"
        raise InputError(f"Folder {source!r} holds no metadata.jsonl / metadata.csv, saved dataset, parquet "
                         "files or tar shards. For an image folder write metadata.jsonl with lines like "
                         '{"file_name": "a.jpg", "caption": "a dog on a beach"}.')
    matches = sorted(glob.glob(source)) if glob.has_magic(source) else ([source] if path.is_file() else [])
    if matches:
        if all(name.endswith(".parquet") for name in matches):
            return "parquet"
        if all(name.endswith(SHARD_SUFFIXES) for name in matches):
            return "webdataset"
        raise InputError(f"Cannot tell the format of {source!r}: expected .parquet or .tar files; "
                         "set format explicitly.")
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).suffix in LOCAL_SUFFIXES
    if glob.has_magic(source) or looks_local:
        raise InputError(f"Pair source {source!r} does not exist. Give an image folder, a saved dataset, "
                         "parquet or tar files, or a Hub dataset name like 'org/name'.")
    return "hub"


def _open_folder(config: PairDataConfig) -> PairSource:
    import datasets

    root = Path(config.source)
    if not root.is_dir():
        raise InputError(f"Image folder {str(root)!r} does not exist.")
    metadata = next((root / name for name in METADATA_FILES if (root / name).is_file()), None)
    if metadata is None:
        raise InputError(f"Image folder {str(root)!r} has no metadata.jsonl or metadata.csv; write one with "
                         "a file_name column and a caption (or captions) column.")
    try:
        if metadata.suffix == ".csv":
            with metadata.open(newline="", encoding="utf-8") as handle:
                header = next(csv.reader(handle), [])
            # Every column as a string: a caption "1984" must not become a number, "" not NaN.
            features = datasets.Features({name: datasets.Value("string") for name in header})
            table = datasets.Dataset.from_csv(str(metadata), features=features, keep_default_na=False)
        else:
            table = datasets.Dataset.from_json(str(metadata))
    except Exception as error:  # datasets/pyarrow raise many types for malformed files
        raise InputError(f"Cannot read {str(metadata)!r}: {type(error).__name__}: {error}") from error
    table = filter_split(table, config.split_column, config.split_values, str(metadata))
    caption_column = _caption_column(config, table.column_names, str(metadata))
    if "file_name" not in table.column_names:
        raise InputError(f"{str(metadata)!r} has no 'file_name' column (columns: {table.column_names}).")
    if any(not name for name in table["file_name"]):
        raise InputError(f"{str(metadata)!r} has a row with an empty file_name.")
    json_list = metadata.suffix == ".csv" and caption_column == "captions"
    captions = (clean_captions(cell, separator=config.caption_separator, json_list=json_list)
                for cell in read_column(table, caption_column, str(metadata)))
    ids = _ids(config, table, str(metadata)) or table["file_name"]
    source = PairSource(config, "folder", f"image folder {str(root)!r}")
    file_names = _group(source, zip(ids, table["file_name"], captions), same_image_required=True)
    source.images = FolderImages(root, PackedStrings(file_names))
    return source


def _open_table(config: PairDataConfig, kind: str) -> PairSource:
    import datasets

    try:
        if kind == "disk":
            table = datasets.load_from_disk(config.source)
        elif kind == "parquet":
            path = Path(config.source)
            files = sorted(map(str, path.glob("*.parquet"))) if path.is_dir() else config.source
            table = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            table = datasets.load_dataset(config.source, split=config.split)
    except FileNotFoundError as error:
        raise InputError(f"Cannot find pair dataset {config.source!r}: {error}") from error
    except (ValueError, OSError) as error:
        raise InputError(f"Cannot load pair dataset {config.source!r} ({kind}): {error}") from error
    table = select_split(table, config.split, f"Dataset {config.source!r}")
    where = f"{kind} dataset {config.source!r}"
    table = filter_split(table, config.split_column, config.split_values, where)
    if config.image_column not in table.column_names:
        raise InputError(f"{where} has no image column {config.image_column!r} (columns: {table.column_names}); "
                         "set image_column.")
    caption_column = _caption_column(config, table.column_names, where)
    ids = _ids(config, table, where) or map(str, range(len(table)))
    if isinstance(table.features[config.image_column], datasets.Image):
        table = table.cast_column(config.image_column, datasets.Image(decode=False))
    source = PairSource(config, kind, where)
    captions = (clean_captions(cell, separator=config.caption_separator)
                for cell in read_column(table, caption_column, where))
    rows = _group(source, zip(ids, range(len(table)), captions), same_image_required=False)
    local = Path(config.source)
    # Workers get only the image column: other columns may be large and are not needed there.
    images = table.select_columns([config.image_column])
    root = local if local.is_dir() else local.parent if local.is_file() else None  # for relative image paths
    source.images = TableImages(images, config.image_column, np.asarray(rows, dtype=np.int64), root)
    return source


def _caption_column(config: PairDataConfig, columns: list[str], where: str) -> str:
    if config.caption_column is not None:
        if not has_column(config.caption_column, columns):
            raise InputError(f"{where} has no caption column {config.caption_column!r} (columns: {columns}).")
        return config.caption_column
    found = next((name for name in CAPTION_COLUMNS if name in columns), None)
    if found is None:
        raise InputError(f"{where} has none of the caption columns {CAPTION_COLUMNS} (columns: {columns}); "
                         "set caption_column.")
    return found


def _ids(config: PairDataConfig, table, where: str) -> list[str] | None:
    """The id column's values as strings, or None when ids are not taken from a column."""
    if config.id_column is None:
        return None
    if config.id_column not in table.column_names:
        raise InputError(f"{where} has no id column {config.id_column!r} (columns: {table.column_names}).")
    return [str(value) for value in table[config.id_column]]


def _group(source: PairSource, rows, same_image_required: bool) -> list:
    """Fill ``source`` from (id, image, captions) rows; rows sharing an id are one image with all their captions.

    Returns the image (file name or first row) of each kept example. With ``same_image_required``
    (file names, which can be compared), an id naming two different images is an error.
    """
    images: dict[str, Any] = {}
    captions: dict[str, list[str]] = {}
    for example_id, image, row_captions in rows:
        if images.setdefault(example_id, image) != image and same_image_required:
            raise InputError(f"{source.description}: id {example_id!r} names two images ({images[example_id]!r} "
                             f"and {image!r}); ids must identify one image.")
        captions.setdefault(example_id, []).extend(row_captions)
    for example_id, example_captions in captions.items():
        if example_captions:
            source.ids.append(example_id)
            source.captions.append(example_captions)
        else:
            source.skipped.append(BadExample(example_id, NO_CAPTION, "no non-empty caption in the metadata"))
    return [images[example_id] for example_id in source.ids]


def iter_captions(source: PairSource) -> Iterator[tuple[str, list[str]]]:
    """Every usable example's (id, captions), in source order, without decoding any image."""
    if source.streamed:
        for shard in source.shards:
            yield from iter_shard_captions(shard)
    else:
        yield from zip(source.ids, source.captions)


# ----------------------------------------------------------------------------- map-style dataset

class PairDataset(Dataset):
    """Map-style pairs of a folder or table source; decoding and ``transform`` run in the worker.

    ``dataset[(epoch, position)]`` (what :class:`PairSampler` yields) or ``dataset[position]``
    (epoch 0) is an example dict or a :class:`~xbt.data.examples.BadExample`.
    """

    def __init__(self, source: PairSource, transform: Transform | None = None):
        if source.streamed or source.images is None:
            raise InputError("PairDataset needs a folder or table source; tar shards stream (WebDatasetPairs).")
        # Packed: forked workers then share them instead of copying them page by page (see packed.py).
        self.ids, self.captions = PackedStrings(source.ids), PackedCaptions(source.captions)
        self.images = source.images
        self.transform, self.seed = transform, source.config.seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | BadExample:
        epoch, position = key if isinstance(key, tuple) else (0, key)
        return make_example(self.ids[position], self.captions[position], partial(self.images.load, position),
                            self.transform, seed=self.seed, epoch=epoch, index=position)


class PairSampler(Sampler):
    """Seeded order over a map-style source: a permutation fixed by (seed, epoch), split by rank.

    Yields ``(epoch, position)`` so the dataset picks each caption from the epoch without
    shared state. With ``world_size > 1`` every rank gets ``ceil(n / world_size)``
    positions (the permutation wraps around to even them out, as DistributedSampler does).
    """

    def __init__(self, size: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise InputError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}.")
        self.size, self.seed, self.shuffle, self.rank, self.world_size = size, seed, shuffle, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        padded = len(self) * self.world_size
        order = (order * math.ceil(padded / max(self.size, 1)))[:padded]
        return iter([(self.epoch, position) for position in order[self.rank::self.world_size]])


# ----------------------------------------------------------------------------- loaders

def make_pair_loader(source: PairSource, transform: Transform | None = None, *, rank: int = 0,
                     world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``source`` with the config's batch size, workers, seed and shuffling.

    ``transform`` (e.g. ``DualEncoder.preprocess``) must be picklable when num_workers > 0.
    Workers are not persistent, so :func:`set_loader_epoch` reaches them at every epoch.
    """
    config = source.config
    common = dict(batch_size=config.batch_size, num_workers=config.num_workers, collate_fn=collate_pairs,
                  drop_last=config.drop_last, pin_memory=pin_memory)
    if source.streamed:
        dataset = WebDatasetPairs(source.shards, transform, seed=config.seed, shuffle=config.shuffle,
                                  shuffle_buffer=config.shuffle_buffer, rank=rank, world_size=world_size)
        return DataLoader(dataset, **common)
    sampler = PairSampler(len(source), seed=config.seed, shuffle=config.shuffle, rank=rank, world_size=world_size)
    return DataLoader(PairDataset(source, transform), sampler=sampler, **common)


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Select ``epoch``'s order and captions on a loader from :func:`make_pair_loader` (prepared or not)."""
    if hasattr(loader, "set_epoch"):  # accelerate's prepared loaders forward to sampler and dataset
        loader.set_epoch(epoch)
        return
    for holder in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None),
                   loader.dataset):
        if hasattr(holder, "set_epoch"):
            holder.set_epoch(epoch)

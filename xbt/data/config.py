"""Configuration of data sources and caches (torch-free, so ``xbt CMD --help`` starts fast).

- :class:`CaptionConfig`: a caption corpus for stage 1 and how its validation slice is held out;
- :class:`PairSourceConfig`: where image-text pairs come from and how they are read (the options
  a training command exposes; its batch size and seed are the run's, see ``xbt.train.config``);
- :class:`PairDataConfig`: a source plus the loader's own batch size and seed, for library users
  (evaluation, ``xbt check-pairs``, benchmarks) and what stage 2 builds per process;
- :class:`CacheConfig`: where embedding caches live and how they are stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from .tables import SplitRows

PAIR_FORMATS = ("auto", "folder", "disk", "parquet", "hub", "webdataset")
CACHE_DTYPES = ("float16", "float32")  # the storage dtypes xbt.cache writes


@dataclass
class CaptionConfig(SplitRows):
    """Where the captions come from and how the validation slice is held out."""

    captions: str = field(default="", metadata={
        "help": "caption corpus: a .txt (one caption per line), .jsonl/.json/.csv/.parquet file, a save_to_disk "
                "folder, or a Hub dataset name"})
    column: str = field(default="text", metadata={
        "help": "column holding the captions: strings or lists of strings; COLUMN.FIELD reads a field of a struct "
                "column (ignored for .txt)"})
    split: str = field(default="train", metadata={"help": "split of a Hub or save_to_disk dataset ('a+b' reads both)"})
    validation_size: float = field(default=0.05, metadata={
        "help": "held-out validation captions: a fraction (< 1) or a count (>= 1)"})
    max_captions: int | None = field(default=None, metadata={"help": "keep only the first N usable captions"})
    split_seed: int = field(default=0, metadata={"help": "seed of the validation split"})

    def __post_init__(self) -> None:
        if self.validation_size < 0:
            raise InputError(f"validation_size must be >= 0 (a fraction or a count), got {self.validation_size}.")
        if self.max_captions is not None and self.max_captions < 1:
            raise InputError(f"max_captions must be >= 1 (or unset for all), got {self.max_captions}.")
        super().__post_init__()


@dataclass(kw_only=True)
class PairSourceConfig(SplitRows):
    """Where image-text pairs come from and how they are read."""

    source: str = field(metadata={"help": "image folder, save_to_disk folder, parquet file/folder/glob, "
                                          "tar shard folder/file/glob, or a Hub dataset name"})
    format: str = field(default="auto", metadata={"help": f"one of {', '.join(PAIR_FORMATS)}"})
    split: str = field(default="train", metadata={"help": "split of a Hub or save_to_disk dataset ('a+b' reads both)"})
    image_column: str = field(default="image", metadata={"help": "image column of a table source"})
    caption_column: str | None = field(default=None, metadata={
        "help": "default: captions, caption or text; COLUMN.FIELD reads a field of a struct column (sentences.raw)"})
    id_column: str | None = field(default=None, metadata={"help": "id column (default: file_name, row index)"})
    caption_separator: str | None = field(default=None, metadata={"help": "split caption strings on this"})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "stop when more than this fraction of the pairs is unusable"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes that decode images"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle the order every epoch (seeded)"})
    drop_last: bool = field(default=False, metadata={"help": "drop a last incomplete batch"})
    shuffle_buffer: int = field(default=1000, metadata={"help": "tar shards: examples held for shuffling"})

    def __post_init__(self) -> None:
        if self.format not in PAIR_FORMATS:
            raise InputError(f"format: unknown pair data format {self.format!r}; use one of "
                             f"{', '.join(PAIR_FORMATS)}.")
        if self.num_workers < 0:
            raise InputError(f"num_workers must be >= 0, got {self.num_workers}.")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise InputError(f"max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}.")
        if self.shuffle_buffer < 1:
            raise InputError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}.")
        super().__post_init__()


@dataclass(kw_only=True)
class PairDataConfig(PairSourceConfig):
    """A pair source and the batch size and seed of ONE loader over it (per process)."""

    batch_size: int = field(default=64, metadata={"help": "examples per batch of this loader"})
    seed: int = field(default=0, metadata={"help": "seed of the order and of each example's caption choice"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.")


@dataclass
class CacheConfig:
    """Where embedding caches live and how they are stored."""

    cache_dir: str = field(default="runs/cache", metadata={"help": "root folder of embedding caches"})
    cache_dtype: str = field(default="float16", metadata={"help": f"storage dtype: {' or '.join(CACHE_DTYPES)}"})
    shard_size: int = field(default=16384, metadata={"help": "rows per shard (the unit of resumption)"})
    encode_batch_size: int = field(default=256, metadata={"help": "items per encoder call"})

    def __post_init__(self) -> None:
        if self.cache_dtype not in CACHE_DTYPES:
            raise InputError(f"cache_dtype must be one of {list(CACHE_DTYPES)}, got {self.cache_dtype!r}.")
        if self.shard_size < 1 or self.encode_batch_size < 1:
            raise InputError(f"shard_size and encode_batch_size must be positive, got {self.shard_size} and "
                             f"{self.encode_batch_size}.")

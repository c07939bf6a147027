"""Options of ``xbt embed`` (torch-free, so ``xbt embed --help`` starts fast; the work is in :mod:`xbt.embed`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .data.tables import SplitRows
from .errors import InputError

MODALITIES = ("image", "text")
DTYPES = ("float32", "float16")
EMBED_SPACES = ("target", "full")  # an adapter's target (old) space, or its own full space (extra dims)
# "images": a plain folder of image files (no metadata); "lines": a text file, one text per line;
# the others are the pair sources of xbt.data.pairs.
SOURCE_FORMATS = ("auto", "images", "lines", "folder", "disk", "parquet", "hub", "webdataset")


@dataclass
class EmbedConfig(SplitRows):
    """What to encode, with which encoder, and where the vectors go."""

    model: str = field(metadata={"help": "a model reference (open_clip:..., hf:...) or an xbt adapter "
                                         "(xbt:/path, or a folder holding xbt_config.json); its vectors are "
                                         "in the space it writes into (an adapter: its target space)"})
    source: str = field(metadata={"help": "a plain image folder, an image folder with metadata.jsonl/.csv, a "
                                          "save_to_disk folder, parquet file/folder/glob, tar shards, a Hub "
                                          "dataset name, or (texts) a text file with one text per line"})
    modality: str = field(metadata={"help": f"what to encode: one of {', '.join(MODALITIES)}"})
    output_dir: str | None = field(default=None, metadata={
        "help": "folder for the shards and manifest.json (default with --append_to an embed folder: that folder)"})
    format: str = field(default="auto", metadata={"help": f"source format: one of {', '.join(SOURCE_FORMATS)}"})
    split: str = field(default="train", metadata={"help": "split of a Hub or save_to_disk dataset"})
    image_column: str = field(default="image", metadata={"help": "image column of a table source"})
    caption_column: str | None = field(default=None, metadata={
        "help": "caption column of a pair source (default: captions, caption or text); texts get ids IMAGEID#k"})
    text_column: str | None = field(default=None, metadata={
        "help": "texts: a table column with one text per row (ids: --id_column or the row index) instead of "
                "a pair source's captions"})
    id_column: str | None = field(default=None, metadata={"help": "id column of a table source "
                                                                  "(default: file_name, row index)"})
    per_device_batch_size: int = field(default=64, metadata={
        "help": "items per forward pass on each process; forward batches are fixed chunks of each shard, so "
                "the vectors are the same for any number of processes"})
    shard_size: int = field(default=8192, metadata={"help": "items per output shard (item i goes to shard "
                                                            "i // shard_size); a shard is the unit of resume"})
    dtype: str = field(default="float32", metadata={"help": f"stored vector type: one of {', '.join(DTYPES)}"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes decoding images"})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "stop with an error when more than this fraction of the items is unusable"})
    faiss_index: bool = field(default=False, metadata={
        "help": "also write index.faiss (IndexIDMap2 over IndexFlatIP, ids = row numbers) and index_ids.txt"})
    append_to: str | None = field(default=None, metadata={
        "help": "add the new vectors to an existing gallery of the same space: an xbt embed folder (new "
                "shards, manifest and index updated) or a faiss IndexIDMap2 file (integer ids)"})
    space: str = field(default="target", metadata={
        "help": f"adapters: one of {', '.join(EMBED_SPACES)}: the space it writes into (default), or the full "
                "vectors of a BT²/OCA adapter (ψ with extra dims) in the adapter's own space"})
    merge: bool = field(default=True, metadata={"help": "adapters: merge LoRA into the backbone first "
                                                        "(how serving runs; same vectors up to rounding)"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even when an accelerator is present"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (main process only)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {"modality": (self.modality, MODALITIES), "dtype": (self.dtype, DTYPES),
                   "format": (self.format, SOURCE_FORMATS), "space": (self.space, EMBED_SPACES)}
        for option, (value, allowed) in choices.items():
            if value not in allowed:
                raise InputError(f"--{option} {value!r} is not supported; use one of {', '.join(allowed)}.")
        for option in ("per_device_batch_size", "shard_size"):
            if getattr(self, option) < 1:
                raise InputError(f"--{option} must be at least 1, got {getattr(self, option)}.")
        if self.num_workers < 0:
            raise InputError(f"--num_workers must be 0 or more, got {self.num_workers}.")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise InputError(f"--max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}.")
        if self.modality == "image" and (self.format == "lines" or self.text_column):
            raise InputError("--modality image cannot read texts (--format lines / --text_column); "
                             "use --modality text.")
        if self.output_dir is None and self.append_to is None:
            raise InputError("Give --output_dir (or --append_to an existing xbt embed folder).")

"""Image-text pairs streamed from WebDataset-style tar shards, for data too large for one folder.

A shard is a plain tar (optionally gzipped) whose members are grouped by key:
``{key}.jpg`` (or png, jpeg, webp, bmp, gif, tif, tiff) holds the image, and
``{key}.txt`` (one caption) and/or ``{key}.json`` (a list of captions, or an object
with ``captions``, ``caption`` or ``text``) the captions. The key is the member path
up to the first dot of its file name; a sample's members are consecutive, as the
WebDataset tools write them. Read with :mod:`tarfile`: no extra dependency.

Shards are shuffled per (seed, epoch) and dealt round-robin to the
``world_size * num_workers`` readers (rank-major), so each shard is read once per
epoch by exactly one worker of one process; within a worker a seeded shuffle buffer
mixes examples across shards. The order is reproducible for a fixed seed, epoch,
world size and worker count. With fewer shards than readers some readers idle: write
at least ``world_size * num_workers`` shards of similar size (ranks that get fewer
batches would stall a DDP step).
"""

from __future__ import annotations

import glob
import json
import logging
import random
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from ..errors import InputError
from ..images import decode_image
from .examples import MISSING, BadExample, Transform, clean_captions, make_example

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
CAPTION_EXTENSIONS = {"txt", "json"}
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CORRUPT_SHARD = "corrupt_shard"

Sample = tuple[str, dict[str, bytes | None]]  # key, extension -> member bytes (None when not read)


def find_shards(spec: str) -> list[Path]:
    """The shard files named by a folder, a file or a glob, sorted; each checked to be a tar archive."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.name.endswith(SHARD_SUFFIXES))
    elif glob.has_magic(spec):
        shards = sorted(Path(name) for name in glob.glob(spec))
    elif path.is_file():
        shards = [path]
    else:
        raise InputError(f"Tar shards {spec!r} do not exist.")
    if not shards:
        raise InputError(f"No tar shards ({', '.join(SHARD_SUFFIXES)}) found at {spec!r}.")
    for shard in shards:
        if not tarfile.is_tarfile(shard):
            raise InputError(f"{str(shard)!r} is not a readable tar archive.")
    return shards


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000123.seg.jpg"`` -> ``("dir/000123", "seg.jpg")`` (key, lower-case extension)."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def iter_samples(shard: Path, read: Callable[[str], bool], stream: bool = True) -> Iterator[Sample]:
    """Group a shard's members by key; the bytes of members whose extension ``read`` accepts are read.

    ``stream`` reads the archive front to back (any file object, compressed or not);
    otherwise tarfile seeks over the members it does not read.
    """
    with tarfile.open(shard, "r|*" if stream else "r:*") as archive:
        key, parts = None, {}
        for member in archive:
            if not member.isfile():
                continue
            member_key, extension = split_member_name(member.name)
            if member_key != key:
                if key is not None:
                    yield key, parts
                key, parts = member_key, {}
            parts[extension] = archive.extractfile(member).read() if read(extension) else None
        if key is not None:
            yield key, parts


def sample_captions(key: str, parts: dict[str, bytes | None]) -> list[str]:
    """Captions of one sample: the JSON's list (or caption/text field), else the .txt."""
    captions: list[str] = []
    if parts.get("json"):
        try:
            value = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            logger.debug("%s.json is not valid JSON: %s", key, error)
            value = None
        if isinstance(value, dict):
            value = next((value[name] for name in ("captions", "caption", "text") if name in value), None)
        if isinstance(value, (str, list)):
            captions = clean_captions(value)
    if not captions and parts.get("txt"):
        captions = clean_captions(parts["txt"].decode("utf-8", errors="replace"))
    return captions


def image_extension(parts: dict[str, bytes | None]) -> str | None:
    return next((extension for extension in parts if extension in IMAGE_EXTENSIONS), None)


def iter_shard_captions(shard: Path) -> Iterator[tuple[str, list[str]]]:
    """(key, captions) of every sample with an image and a caption, without reading image bytes."""
    for key, parts in iter_samples(shard, CAPTION_EXTENSIONS.__contains__, stream=False):
        captions = sample_captions(key, parts)
        if captions and image_extension(parts):
            yield key, captions


class WebDatasetPairs(IterableDataset):
    """Streamed examples (dicts or :class:`~xbt.data.examples.BadExample`) from tar shards."""

    def __init__(self, shards: list[Path], transform: Transform | None = None, *, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise InputError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}.")
        self.shards, self.transform, self.seed, self.shuffle = list(shards), transform, seed, shuffle
        self.shuffle_buffer, self.rank, self.world_size = max(1, shuffle_buffer), rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self, worker: int, num_workers: int) -> list[Path]:
        """The shards one reader (this rank's ``worker``) reads this epoch."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        return order[slot::slots]

    def __iter__(self) -> Iterator[dict | BadExample]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.my_shards(worker, num_workers)
        if not shards:
            logger.warning("rank %d worker %d got no tar shard (%d shards for %d readers)", self.rank, worker,
                           len(self.shards), self.world_size * num_workers)
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
        buffer: list = []
        for sample in self._read(shards):
            if not self.shuffle or isinstance(sample, BadExample):
                yield self._example(sample)
                continue
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                pick = rng.randrange(len(buffer))
                buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                yield self._example(buffer.pop())
        rng.shuffle(buffer)
        for sample in buffer:
            yield self._example(sample)

    def _read(self, shards: list[Path]) -> Iterator[tuple[Path, Sample] | BadExample]:
        wanted = (IMAGE_EXTENSIONS | CAPTION_EXTENSIONS).__contains__
        for shard in shards:
            try:
                for sample in iter_samples(shard, wanted):
                    yield shard, sample
            except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
                # The samples read so far were used; the rest of this shard is lost and counted once.
                yield BadExample(shard.name, CORRUPT_SHARD, f"tar shard {str(shard)!r} is damaged: {error}")

    def _example(self, item: tuple[Path, Sample] | BadExample) -> dict | BadExample:
        if isinstance(item, BadExample):
            return item
        shard, (key, parts) = item
        extension = image_extension(parts)
        captions = sample_captions(key, parts)
        if extension is None:
            return BadExample(key, MISSING, f"sample {key!r} in {shard.name} has no image member")
        return make_example(key, captions, lambda: decode_image(parts[extension], f"{shard.name}:{key}.{extension}"),
                            self.transform, seed=self.seed, epoch=self.epoch)

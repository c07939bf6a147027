"""Embedding cache: encode a list of items ONCE with one or more frozen encoders, keep the vectors on disk.

Stage 1 caches (old, new) text embeddings of its captions; stage 2 caches old text
embeddings of its training captions; evaluation caches each space's embeddings. All
of them use this module the same way:

    from xbt.cache import build_cache, text_source, image_source, EmbeddingCache

    sources = [text_source("old", old_encoder), text_source("new", new_encoder)]
    cache = build_cache("runs/cache", sources, captions, dtype="float16")   # encodes or reuses
    cache.count, cache.names, cache.dims          # N, ("new", "old"), {"new": 96, "old": 32}
    cache["old"][[3, 1, 2]]                       # np.ndarray rows, read from a memory map
    cache.tensor("new", indices)                  # float32 torch tensor of those rows
    cache.subset("old", train_indices)            # lazy view of some rows (len, shape, [slice|array])
    cache.fingerprints                            # {"old": "<model id>:text", ...}
    cache.space_ids                               # {"old": "<old space id>", "new": "<new space id>"}

    EmbeddingCache.open(path, sources=..., items_fingerprint=...)   # refuses a mismatch

An :class:`EmbeddingSource` is a name, a fingerprint, a dimension, the space id its
vectors live in and an ``encode`` function (a batch of items -> ``(n, dim)`` tensor).
:func:`text_source` and :func:`image_source` wrap any :class:`~xbt.spaces.Encoder` (a
backbone, an ``XBTModel``); anything else (e.g. a stored gallery) can be a source too.
The manifest records every source's space id, so a cache says which space it holds.

Keying: a cache lives in ``ROOT/<key>/`` where the key hashes every source's name,
fingerprint, dim and space id, the fingerprint of the items (for texts: a hash of the texts,
see :func:`xbt.data.captions.texts_fingerprint`; other items must pass their own) and
the storage dtype. A changed model, corpus or dtype gives another key, so a stale
cache is never silently reused; :meth:`EmbeddingCache.open` on an explicit path
checks the recorded fingerprints and raises :class:`FingerprintMismatchError`.

On disk::

    ROOT/<key>/manifest.json            written last: its presence means "complete"
    ROOT/<key>/plan.json                what is being built (shard size, sources, count)
    ROOT/<key>/shard-00000.safetensors  rows [0, shard_size) of every source, one tensor per source

Writing is resumable and atomic: each shard is written to a temporary file, fsynced
and renamed, so a shard file is either complete or absent; a killed build continues
from the shards that exist. Shard ``i`` always covers the same rows, so under
``accelerate launch`` (pass ``process=accelerator``; on CPU create it as
``Accelerator(cpu=True)`` or set ``ACCELERATE_USE_CPU=true``, see ENVIRONMENT.md) process
``r`` encodes the shards ``i % num_processes == r`` and the main process writes the
manifest once all shards exist, whatever the number of processes was before a resume.

Reading is memory-mapped: shards are safetensors files (nothing is unpickled) whose
tensor data is mapped read-only (one ``mmap`` per shard, advised for random access, viewed
as numpy arrays without copying), so a cache larger than RAM works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.numpy import save as safetensors_bytes
from tqdm.auto import tqdm

from .errors import FingerprintMismatchError, InputError
from .io import atomic_write_bytes, atomic_write_json
from .spaces import check_same_space

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32}
MANIFEST, PLAN = "manifest.json", "plan.json"


@dataclass
class CacheConfig:
    """Where embedding caches live and how they are stored."""

    cache_dir: str = field(default="runs/cache", metadata={"help": "root folder of embedding caches"})
    cache_dtype: str = field(default="float16", metadata={"help": "storage dtype: float16 or float32"})
    shard_size: int = field(default=16384, metadata={"help": "rows per shard (the unit of resumption)"})
    encode_batch_size: int = field(default=256, metadata={"help": "items per encoder call"})

    def __post_init__(self):
        if self.cache_dtype not in DTYPES:
            raise InputError(f"cache_dtype must be one of {sorted(DTYPES)}, got {self.cache_dtype!r}.")
        if self.shard_size < 1 or self.encode_batch_size < 1:
            raise InputError("shard_size and encode_batch_size must be positive.")


@dataclass(frozen=True)
class EmbeddingSource:
    """Something that turns a batch of items into ``(n, dim)`` embeddings, with a stable identity."""

    name: str
    fingerprint: str
    dim: int
    encode: Callable[[Sequence[Any]], torch.Tensor] = field(compare=False, repr=False)
    space_id: str | None = None  # the space the vectors live in (None: not recorded)


def text_source(name: str, encoder, batch_size: int = 256) -> EmbeddingSource:
    """Normalised text embeddings of an :class:`~xbt.spaces.Encoder`, keyed by its model id and space id."""
    return EmbeddingSource(name, f"{encoder.model_id}:text", encoder.dim,
                           lambda texts: encoder.encode_text(texts, batch_size=batch_size, progress=False),
                           encoder.space_id)


def image_source(name: str, encoder, batch_size: int = 128) -> EmbeddingSource:
    """Normalised image embeddings (items: PIL images or paths) of an :class:`~xbt.spaces.Encoder`."""
    return EmbeddingSource(name, f"{encoder.model_id}:image", encoder.dim,
                           lambda images: encoder.encode_image(images, batch_size=batch_size, progress=False),
                           encoder.space_id)


class ProcessGroup(Protocol):
    """What the cache needs from ``accelerate.Accelerator`` / ``PartialState``."""

    process_index: int
    num_processes: int
    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


class _SingleProcess:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def cache_key(sources: Iterable[EmbeddingSource], items_fingerprint: str, dtype: str) -> str:
    """Directory name of the cache of these sources over these items in this dtype."""
    identity = {"version": FORMAT_VERSION, "items": items_fingerprint, "dtype": dtype,
                "sources": sorted([s.name, s.fingerprint, int(s.dim), s.space_id or ""] for s in sources)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def items_fingerprint_of(items: Sequence[Any]) -> str:
    """Fingerprint of a list of texts; other items need an explicit ``items_fingerprint``."""
    from .data.captions import texts_fingerprint

    if not all(isinstance(item, str) for item in items):
        raise InputError("Only a list of texts can be fingerprinted automatically; pass items_fingerprint= "
                         "(e.g. a hash of the image files) for other items.")
    return texts_fingerprint(items)


# ----------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------
def _read_header(path: Path) -> tuple[int, dict]:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return 8 + length, json.loads(handle.read(length))


def _memmap_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map every tensor of a safetensors file (read-only arrays over one mmap); returns (arrays, metadata)."""
    data_start, header = _read_header(path)
    metadata = header.pop("__metadata__", {}) or {}
    with path.open("rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        # training gathers scattered rows: kernel read-ahead would read ~100x more than is used
        mapping.madvise(mmap.MADV_RANDOM)
    arrays = {}
    for name, entry in header.items():
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise InputError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, not float16/float32.")
        begin, _ = entry["data_offsets"]
        shape = tuple(entry["shape"])
        array = np.frombuffer(mapping, dtype=dtype, count=int(np.prod(shape)), offset=data_start + begin)
        arrays[name] = array.reshape(shape)
    return arrays, metadata


class ShardedArray:
    """One source's rows across all shards, indexed like a 2-D array without loading it."""

    def __init__(self, shards: Sequence[np.ndarray], starts: Sequence[int]):
        self.shards = list(shards)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.shape = (int(self.starts[-1] + len(self.shards[-1])) if self.shards else 0,
                      self.shards[0].shape[1] if self.shards else 0)
        self.dtype = self.shards[0].dtype if self.shards else np.float32

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        """Rows by int, slice or integer array (any order, repeats allowed) -> in-memory array."""
        if isinstance(index, (int, np.integer)):
            return self[np.array([index])][0]
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"Row index out of range for {len(self)} cached rows.")
        index = index % max(len(self), 1)
        out = np.empty((len(index), self.shape[1]), dtype=self.dtype)
        shard_of = np.searchsorted(self.starts, index, side="right") - 1
        for shard in np.unique(shard_of):
            selected = shard_of == shard
            out[selected] = self.shards[shard][index[selected] - self.starts[shard]]
        return out

    def numpy(self) -> np.ndarray:
        """All rows, in memory."""
        return self[:]


class RowSubset:
    """A lazy view of some rows (e.g. the training split) of a :class:`ShardedArray`, indexed the same way."""

    def __init__(self, array: ShardedArray, rows: np.ndarray):
        self.array, self.rows = array, np.asarray(rows, dtype=np.int64)
        self.shape, self.dtype = (len(self.rows), array.shape[1]), array.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        return self.array[self.rows[index]]


class EmbeddingCache:
    """A complete cache directory: manifest + memory-mapped shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise InputError(f"{self.path} is not a complete embedding cache (no {MANIFEST}); build it with "
                             f"build_cache, or resume the run that was building it.")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("version") != FORMAT_VERSION:
            raise InputError(f"{self.path}: cache format {self.manifest.get('version')} is not {FORMAT_VERSION}; "
                             f"delete it and re-encode.")

    @classmethod
    def open(cls, path: str | Path, sources: Iterable[EmbeddingSource] | Mapping[str, str] | None = None,
             items_fingerprint: str | None = None) -> EmbeddingCache:
        """Open a cache and check it was made by these sources (or {name: fingerprint}) over these items."""
        cache = cls(path)
        expected = ({s.name: s.fingerprint for s in sources} if sources is not None and not isinstance(sources, Mapping)
                    else dict(sources or {}))
        for name, fingerprint in expected.items():
            recorded = cache.fingerprints.get(name)
            if recorded is None:
                raise FingerprintMismatchError(f"Cache {cache.path} has no embeddings named {name!r} "
                                               f"(it has {sorted(cache.fingerprints)}).")
            if recorded != fingerprint:
                raise FingerprintMismatchError(
                    f"Cache {cache.path} holds {name!r} embeddings from model {recorded}, not {fingerprint}: the "
                    f"model changed since it was built. Build a new cache for this model.")
        for source in sources if sources is not None and not isinstance(sources, Mapping) else ():
            check_same_space(source.space_id, cache.space_ids.get(source.name),
                             f"Cached {source.name!r} embeddings in {cache.path}",
                             "Build a new cache for the model of this space.")
        if items_fingerprint is not None and items_fingerprint != cache.items_fingerprint:
            raise FingerprintMismatchError(
                f"Cache {cache.path} was built over items {cache.items_fingerprint}, not {items_fingerprint}: the "
                f"corpus changed since it was built. Build a new cache for this corpus.")
        return cache

    @classmethod
    def find(cls, root: str | Path, sources: Iterable[EmbeddingSource], items_fingerprint: str,
             dtype: str = "float16") -> EmbeddingCache | None:
        """The complete cache of these sources over these items under ``root``, or None."""
        path = Path(root) / cache_key(sources, items_fingerprint, dtype)
        return cls(path) if (path / MANIFEST).is_file() else None

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.manifest["sources"]))

    @property
    def dims(self) -> dict[str, int]:
        return {name: int(info["dim"]) for name, info in self.manifest["sources"].items()}

    @property
    def fingerprints(self) -> dict[str, str]:
        return {name: info["fingerprint"] for name, info in self.manifest["sources"].items()}

    @property
    def space_ids(self) -> dict[str, str | None]:
        """The space each source's vectors live in, as recorded when the cache was built."""
        return {name: info.get("space_id") for name, info in self.manifest["sources"].items()}

    @property
    def items_fingerprint(self) -> str:
        return self.manifest["items_fingerprint"]

    @property
    def metadata(self) -> dict:
        return self.manifest.get("metadata", {})

    @cached_property
    def _arrays(self) -> dict[str, ShardedArray]:
        per_source: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
        for shard in self.manifest["shards"]:
            arrays, _ = _memmap_tensors(self.path / shard["file"])
            for name in self.names:
                per_source[name].append(arrays[name])
        starts = [shard["start"] for shard in self.manifest["shards"]]
        return {name: ShardedArray(shards, starts) for name, shards in per_source.items()}

    def __getitem__(self, name: str) -> ShardedArray:
        if name not in self.manifest["sources"]:
            raise KeyError(f"No embeddings named {name!r} in cache {self.path}; it has {list(self.names)}.")
        return self._arrays[name]

    def subset(self, name: str, rows) -> RowSubset:
        """Lazy view of rows ``rows`` of source ``name`` (nothing is read until indexed)."""
        return RowSubset(self[name], rows)

    def tensor(self, name: str, indices=slice(None)) -> torch.Tensor:
        """float32 tensor of rows ``indices`` of source ``name``."""
        return torch.from_numpy(self[name][indices].astype(np.float32))

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.path)!r}, count={self.count}, dims={self.dims})"


# ----------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------
def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _shard_is_complete(path: Path, key: str, start: int, stop: int, sources: Sequence[EmbeddingSource]) -> bool:
    """A shard from an earlier (killed) run counts only if it is exactly what this build would write."""
    if not path.is_file():
        return False
    try:
        _, header = _read_header(path)
    except (OSError, struct.error, json.JSONDecodeError):
        return False
    metadata = header.get("__metadata__") or {}
    return (metadata.get("key") == key and metadata.get("start") == str(start) and metadata.get("stop") == str(stop)
            and all(header.get(s.name, {}).get("shape") == [stop - start, s.dim] for s in sources))


def _encode_shard(sources: Sequence[EmbeddingSource], items: Sequence[Any], dtype) -> dict[str, np.ndarray]:
    arrays = {}
    for source in sources:
        embeddings = source.encode(items)
        if tuple(embeddings.shape) != (len(items), source.dim):
            raise InputError(f"Source {source.name!r} returned shape {tuple(embeddings.shape)} for {len(items)} "
                             f"items; expected ({len(items)}, {source.dim}).")
        array = embeddings.detach().cpu().float().numpy()
        if not np.isfinite(array).all():
            raise InputError(f"Source {source.name!r} produced non-finite embeddings; check the model.")
        arrays[source.name] = np.ascontiguousarray(array.astype(dtype))
    return arrays


def build_cache(
    root: str | Path,
    sources: Sequence[EmbeddingSource],
    items: Sequence[Any],
    items_fingerprint: str | None = None,
    dtype: str = "float16",
    shard_size: int = 16384,
    process: ProcessGroup | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> EmbeddingCache:
    """Encode ``items`` with every source into ``root/<key>/``, or reuse a complete cache there.

    Resumes from the shards an interrupted build left. With ``process`` (an ``Accelerator``
    or ``PartialState``) every process must call this with the same arguments; each
    encodes its share of the shards and all return the same complete cache.
    ``metadata`` (JSON) is stored in the manifest, e.g. where the corpus came from.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if not items:
        raise InputError("Nothing to cache: the list of items is empty.")
    names = [source.name for source in sources]
    if not names or len(set(names)) != len(names):
        raise InputError(f"Cache sources need distinct names, got {names}.")
    process = process or _SingleProcess()
    items_fingerprint = items_fingerprint or items_fingerprint_of(items)
    key = cache_key(sources, items_fingerprint, dtype)
    path = Path(root) / key
    if (path / MANIFEST).is_file():
        logger.info("Reusing embedding cache %s", path)
        return EmbeddingCache.open(path, sources, items_fingerprint)

    plan = {"version": FORMAT_VERSION, "key": key, "count": len(items), "items_fingerprint": items_fingerprint,
            "dtype": dtype, "shard_size": shard_size,
            "sources": {s.name: {"fingerprint": s.fingerprint, "dim": int(s.dim), "space_id": s.space_id}
                        for s in sources}}
    if process.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        if (path / PLAN).is_file():
            previous = json.loads((path / PLAN).read_text())
            if previous.get("shard_size") != shard_size:
                logger.warning("Resuming %s with its original shard size %s (asked for %s)",
                               path, previous.get("shard_size"), shard_size)
            plan["shard_size"] = previous.get("shard_size", shard_size)
        else:
            atomic_write_json(path / PLAN, plan)
    process.wait_for_everyone()
    shard_size = json.loads((path / PLAN).read_text())["shard_size"]

    bounds = [(start, min(start + shard_size, len(items))) for start in range(0, len(items), shard_size)]
    mine = [i for i in range(len(bounds)) if i % process.num_processes == process.process_index]
    todo = [i for i in mine if not _shard_is_complete(path / _shard_name(i), key, *bounds[i], sources)]
    if len(todo) < len(mine):
        logger.info("Resuming %s: %d of this process's %d shards already written", path, len(mine) - len(todo), len(mine))
    started, encoded = time.perf_counter(), 0
    with tqdm(total=sum(stop - start for start, stop in (bounds[i] for i in todo)), unit="item", desc="cache",
              disable=not (progress and process.is_main_process)) as bar:
        for index in todo:
            start, stop = bounds[index]
            arrays = _encode_shard(sources, items[start:stop], DTYPES[dtype])
            shard_metadata = {"key": key, "start": str(start), "stop": str(stop)}
            atomic_write_bytes(path / _shard_name(index), safetensors_bytes(arrays, metadata=shard_metadata))
            encoded += stop - start
            bar.update(stop - start)
    if encoded:
        seconds = time.perf_counter() - started
        logger.info("Encoded %d items with %d source(s) in %.1f s (%.0f items/s)", encoded, len(sources), seconds,
                    encoded / max(seconds, 1e-9))
    process.wait_for_everyone()

    if process.is_main_process:
        missing = [i for i in range(len(bounds)) if not _shard_is_complete(path / _shard_name(i), key, *bounds[i], sources)]
        if missing:
            raise InputError(f"Cache {path}: shards {missing} are missing after encoding; rerun to resume.")
        manifest = {**plan, "shard_size": shard_size, "metadata": dict(metadata or {}),
                    "shards": [{"file": _shard_name(i), "start": start, "stop": stop}
                               for i, (start, stop) in enumerate(bounds)]}
        atomic_write_json(path / MANIFEST, manifest)
        for leftover in path.glob("*.tmp"):  # xbt.io's temporaries (".NAME.tmp") of a killed write
            leftover.unlink()
        logger.info("Embedding cache complete: %s (%d items, %s)", path, len(items), dtype)
    process.wait_for_everyone()
    return EmbeddingCache.open(path, sources, items_fingerprint)

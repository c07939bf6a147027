"""``xbt embed``: encode images or texts into a space, at scale, resumably, on N processes.

The encoder is a native model reference (``open_clip:...``, ``hf:...``: its own space) or
an xbt adapter (``xbt:/path``, a folder holding ``xbt_config.json``, or ``xbt:org/repo[@rev]``:
its TARGET space, so new items land beside the old gallery). Adapters are merged first
(``--merge``, how serving runs).

Output folder (``--output_dir``)::

    shard-00000.safetensors   tensor "embeddings" (rows, dim), L2-normalised, float32 or float16;
    shard-00001.safetensors   header metadata "xbt_embed": JSON {"key", "ids", "skipped"}
    ...
    manifest.json             space, models, dim, dtype, count, shards, skipped items, sources, runs
    index.faiss               (--faiss_index) IndexIDMap2(IndexFlatIP), int64 ids = row numbers
    index_ids.txt             (--faiss_index) the string id of each index row, one per line

Ids are strings (the package's id model, :func:`xbt.io.read_ids`). They live in each
shard's safetensors header as a JSON list rather than in a companion uint8 tensor: the
header is read without touching the vectors, it is JSON already (no offsets to encode and
decode), and ids and vectors are one file written atomically, so they cannot disagree.

Determinism: item ``i`` of a source always lands in shard ``first_shard + i // shard_size``
and is encoded in the forward batch of its shard's fixed chunk of ``per_device_batch_size``
items (forward batches are not split by the process count: CLIP outputs depend in the last
bits on the batch they were computed in). Under ``accelerate launch --num_processes N`` the
shards still to be written are dealt round-robin to the processes; rank 0 writes the
manifest after all finish. Whatever N is, the ids, their order, the shard layout and the
manifest are identical and the vectors agree to float32 rounding: measured on CPU, a
forward batch of ONE item differs by 1 ulp (6e-8) between a single process and a process
of an ``accelerate launch`` run, while batches of 2 or more match bit for bit.

Resume: a shard is written atomically with its key (model id, space id, modality, dtype,
source fingerprint, shard number and item range) in its header; a rerun keeps every shard
whose key matches and encodes only the others (``runs[-1].encoded_shards`` in the manifest).

Bad items (missing, corrupt or oversized images, empty texts) are skipped, counted and
listed in the manifest; more than ``--max_bad_fraction`` stops the run with an InputError.

Read the output with :func:`read_embeddings_dir`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tarfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import parse_configs
from .data.examples import MISSING, BadExample, classify
from .data.packed import PackedStrings
from .embed_config import EmbedConfig
from .data.tables import filter_split, select_split
from .encoders import load_encoder
from .errors import FingerprintMismatchError, InputError, XBTError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_unique_ids
from .references import parse_reference
from .spaces import check_same_space

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
INDEX_IDS_FILE = "index_ids.txt"
INDEX_KIND = "IndexIDMap2(IndexFlatIP)"
SHARD_NAME = "shard-{:05d}.safetensors"
METADATA_KEY = "xbt_embed"
MANIFEST_FORMAT = "xbt-embeddings"
FORMAT_VERSION = 1
EMPTY_TEXT = "empty_text"


# ----------------------------------------------------------------------------- the encoder

def image_transform(encoder):
    """PIL image -> pixel tensor of ``encoder`` (an adapter preprocesses as its new backbone does)."""
    from .model import XBTModel

    return encoder.backbone.preprocess if isinstance(encoder, XBTModel) else encoder.preprocess


def full_space_encoder(encoder, model: str):
    """``--space full``: the full space of an adapter with extra dims (one-line InputError for anything else)."""
    from .model import XBTModel

    if not isinstance(encoder, XBTModel):
        raise InputError(f"--space full: {model} is a backbone; only an xbt adapter with extra dims (a BT²/OCA ψ) "
                         f"has a full space. Drop --space or pass such an adapter.")
    return encoder.full_encoder()


def _encoder_info(encoder, model: str, merged: bool) -> dict[str, Any]:
    adapter = parse_reference(model).is_adapter
    info = {"model_reference": model, "model_id": encoder.model_id, "kind": "adapter" if adapter else "backbone"}
    if adapter:
        info.update(merged=merged, source_space_id=encoder.source_space_id)
    return info


# ----------------------------------------------------------------------------- sources as items

@dataclass
class TarMembers:
    """Images inside tar shards by position (shard, member name); a process opens each shard once."""

    shards: list[Path]
    shard_of: np.ndarray
    names: PackedStrings
    _open: dict = field(default_factory=dict, repr=False)

    def load(self, position: int):
        from .images import decode_image

        shard, name = self.shards[int(self.shard_of[position])], self.names[position]
        try:
            data = self._member(shard, name)
        except (tarfile.TarError, OSError, EOFError, zlib.error, KeyError) as error:
            raise InputError(f"Image {shard.name}:{name} cannot be read from its tar shard ({error}).") from error
        return decode_image(data, f"{shard.name}:{name}")

    def _member(self, shard: Path, name: str) -> bytes:
        # Keyed by process: a forked DataLoader worker must not share the parent's file offset.
        key = (os.getpid(), shard)
        if key not in self._open:
            archive = tarfile.open(shard, "r:*")
            self._open[key] = (archive, {member.name: member for member in archive.getmembers()})
        archive, members = self._open[key]
        return archive.extractfile(members[name]).read()


@dataclass
class Items:
    """What one run encodes: ids by position, a loader by position, and what was unusable on opening."""

    ids: PackedStrings
    load: Any  # position -> str (a text) or PIL image; raises InputError for a bad item
    description: str
    format: str
    skipped: list[BadExample]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def total(self) -> int:
        """Items the source holds, usable or not (what ``max_bad_fraction`` is a fraction of)."""
        return len(self.ids) + len(self.skipped)


def _fingerprint(kind: str, modality: str, ids: Sequence[str], texts: Sequence[str] | None) -> str:
    """The source's identity as far as the output depends on it: format, modality, ids (and texts)."""
    digest = hashlib.sha256(f"{kind}\0{modality}\0".encode())
    for position, identifier in enumerate(ids):
        digest.update(identifier.encode() + b"\0")
        if texts is not None:
            digest.update(texts[position].encode() + b"\0")
    return digest.hexdigest()[:24]


def _text_items(kind: str, description: str, rows: list[tuple[str, str]], skipped: list[BadExample]) -> Items:
    ids, texts = PackedStrings(i for i, _ in rows), PackedStrings(t for _, t in rows)
    return Items(ids, texts.__getitem__, description, kind, skipped, _fingerprint(kind, "text", ids, texts))


def _image_items(kind: str, description: str, ids: Sequence[str], loader, skipped: list[BadExample]) -> Items:
    packed = PackedStrings(ids)
    return Items(packed, loader, description, kind, skipped, _fingerprint(kind, "image", packed, None))


def source_format(config: EmbedConfig) -> str:
    """The source format from ``--format`` or from what is on disk."""
    from .data.pairs import detect_format

    if config.format != "auto":
        return config.format
    path = Path(config.source)
    if config.modality == "text" and path.is_file() and not path.name.endswith((".parquet", ".tar", ".tar.gz", ".tgz")):
        return "lines"
    try:
        return detect_format(config.source)
    except InputError:
        if config.modality == "image" and path.is_dir() and _image_files(path):
            return "images"
        raise


def _image_files(root: Path) -> list[str]:
    """Image files under ``root`` (recursively) as sorted relative POSIX paths."""
    from .data.webdataset import IMAGE_EXTENSIONS

    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS)


def open_items(config: EmbedConfig) -> Items:
    """Read the source's listing (ids, texts, image locations) and check it; no image is decoded."""
    kind = source_format(config)
    if kind == "lines":
        return _open_lines(Path(config.source))
    if config.text_column is not None:
        return _open_text_column(config, kind)
    if kind == "images":
        return _open_image_folder(Path(config.source))
    if kind == "webdataset" and config.modality == "image":
        return _open_tar_images(config.source)
    return _open_pair_source(config, kind)


def _open_lines(path: Path) -> Items:
    if not path.is_file():
        raise InputError(f"Text file {str(path)!r} does not exist.")
    rows, skipped = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            rows.append((str(number), line.strip()))
        else:
            skipped.append(BadExample(str(number), EMPTY_TEXT, f"line {number} is empty"))
    return _text_items("lines", f"text file {str(path)!r} (ids: line numbers)", rows, skipped)


def _open_image_folder(root: Path) -> Items:
    from .data.pairs import FolderImages
    from .data.webdataset import IMAGE_EXTENSIONS

    if not root.is_dir():
        raise InputError(f"Image folder {str(root)!r} does not exist.")
    names = _image_files(root)
    if not names:
        raise InputError(f"Image folder {str(root)!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return _image_items("images", f"image folder {str(root)!r} (ids: relative file names)", names,
                        FolderImages(root, PackedStrings(names)).load, [])


def _open_tar_images(spec: str) -> Items:
    from .data.webdataset import find_shards, image_extension, iter_samples

    shards = find_shards(spec)
    ids, names, shard_of, skipped = [], [], [], []
    for number, shard in enumerate(shards):
        for key, parts in iter_samples(shard, lambda _: False, stream=False):  # names only, no bytes read
            extension = image_extension(parts)
            if extension is None:
                skipped.append(BadExample(key, MISSING, f"sample {key!r} in {shard.name} has no image member"))
                continue
            ids.append(key)
            names.append(f"{key}.{extension}")
            shard_of.append(number)
    members = TarMembers(shards, np.asarray(shard_of, dtype=np.int32), PackedStrings(names))
    return _image_items("webdataset", f"{len(shards)} tar shard(s) at {spec!r} (ids: sample keys)", ids,
                        members.load, skipped)


def _pair_config(config: EmbedConfig, kind: str):
    from .data.pairs import PairDataConfig

    return PairDataConfig(source=config.source, format=kind, split=config.split, image_column=config.image_column,
                          caption_column=config.caption_column, id_column=config.id_column,
                          max_bad_fraction=config.max_bad_fraction, split_column=config.split_column,
                          split_values=config.split_values)


def _open_pair_source(config: EmbedConfig, kind: str) -> Items:
    """An image-text source: its images (ids = image ids) or its captions (ids = IMAGEID#k)."""
    from .data.pairs import iter_captions, open_pairs

    source = open_pairs(_pair_config(config, kind))
    if config.modality == "text":
        rows = [(f"{image_id}#{k}", caption) for image_id, captions in iter_captions(source)
                for k, caption in enumerate(captions)]
        return _text_items(source.format, f"captions of {source.description} (ids: IMAGEID#k)", rows, [])
    # The pair reader drops images without a caption; they are listed as skipped, not silently lost.
    return _image_items(source.format, f"{source.description} (ids: image ids)", source.ids, source.images.load,
                        list(source.skipped))


def _open_text_column(config: EmbedConfig, kind: str) -> Items:
    table = _load_table(config, kind)
    where = f"{kind} dataset {config.source!r}"
    for option, column in (("text_column", config.text_column), ("id_column", config.id_column)):
        if column is not None and column not in table.column_names:
            raise InputError(f"{where} has no column {column!r} (--{option}); columns: {table.column_names}.")
    ids = table[config.id_column] if config.id_column else range(len(table))
    rows, skipped = [], []
    for identifier, text in zip(map(str, ids), table[config.text_column]):
        if isinstance(text, str) and text.strip():
            rows.append((identifier, text.strip()))
        else:
            skipped.append(BadExample(identifier, EMPTY_TEXT, f"row {identifier} holds no text ({text!r})"))
    return _text_items(kind, f"column {config.text_column!r} of {where}", rows, skipped)


def _load_table(config: EmbedConfig, kind: str):
    import datasets

    if kind not in ("disk", "parquet", "hub"):
        raise InputError(f"--text_column reads a table (save_to_disk folder, parquet, Hub dataset); "
                         f"{config.source!r} is a {kind} source.")
    try:
        if kind == "disk":
            table = datasets.load_from_disk(config.source)
        elif kind == "parquet":
            path = Path(config.source)
            files = sorted(map(str, path.glob("*.parquet"))) if path.is_dir() else config.source
            table = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            table = datasets.load_dataset(config.source, split=config.split)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise InputError(f"Cannot load dataset {config.source!r} ({kind}): {error}") from error
    where = f"Dataset {config.source!r}"
    return filter_split(select_split(table, config.split, where), config.split_column, config.split_values, where)


def check_ids(ids: Sequence[str], where: str) -> None:
    """Ids must be unique and survive a one-per-line ids file (:func:`xbt.io.read_ids`)."""
    check_unique_ids(ids, where)
    for identifier in ids:
        if not identifier or identifier != identifier.strip() or "\n" in identifier or "\r" in identifier:
            raise InputError(f"{where}: id {identifier!r} is empty, has surrounding whitespace or a line break; "
                             f"ids are written one per line. Rename the item or set --id_column.")


def _too_many_bad(bad: Sequence[BadExample], total: int, limit: float) -> InputError:
    shown = "; ".join(f"{e.id}: {e.message.rstrip('.')}" for e in bad[:5])
    return InputError(f"{len(bad)} of {total} items are unusable, more than --max_bad_fraction {limit:g}. "
                      f"First problems: {shown}. Fix or remove them, or raise --max_bad_fraction.")


# ----------------------------------------------------------------------------- shards

@dataclass(frozen=True)
class Shard:
    """One output file: item positions ``[start, stop)`` of the run's source."""

    number: int
    start: int
    stop: int

    @property
    def file(self) -> str:
        return SHARD_NAME.format(self.number)


def plan_shards(count: int, shard_size: int, first_shard: int = 0) -> list[Shard]:
    """Item ``i`` goes to shard ``first_shard + i // shard_size``."""
    return [Shard(first_shard + k, k * shard_size, min((k + 1) * shard_size, count))
            for k in range(math.ceil(count / shard_size))]


def shard_key(shard: Shard, run: dict[str, Any]) -> dict[str, Any]:
    """What a shard's vectors depend on; a stored shard with another key is encoded again."""
    return {**run, "shard": shard.number, "positions": [shard.start, shard.stop]}


def read_shard_header(path: Path) -> dict[str, Any] | None:
    """The ``xbt_embed`` metadata of a shard file, or None when the file is absent or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "np") as handle:
            return json.loads((handle.metadata() or {})[METADATA_KEY])
    except Exception:  # a foreign or damaged file is not one of ours: encode the shard again
        return None


def write_shard(path: Path, vectors: np.ndarray, ids: list[str], skipped: list[BadExample],
                key: dict[str, Any]) -> None:
    from safetensors.numpy import save

    header = {"key": key, "ids": ids, "skipped": [_bad_dict(b) for b in skipped]}
    data = save({"embeddings": np.ascontiguousarray(vectors)},
                metadata={METADATA_KEY: json.dumps(header, sort_keys=True, ensure_ascii=False)})
    atomic_write_bytes(path, data)


def _bad_dict(bad: BadExample) -> dict[str, str]:
    return {"id": bad.id, "reason": bad.reason, "message": bad.message}


# ----------------------------------------------------------------------------- encoding

class _ItemDataset:
    """Position -> {"id", "position", "value"} or a BadExample; decoding and preprocessing run in workers."""

    def __init__(self, items: Items, transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict | BadExample:
        identifier = self.items.ids[position]
        try:
            value = self.items.load(position)
        except InputError as error:
            return BadExample(identifier, classify(error), str(error))
        return {"id": identifier, "position": position,
                "value": self.transform(value) if self.transform is not None else value}


def _collate(items: list[dict | BadExample]) -> dict[str, Any]:
    import torch

    good = [item for item in items if not isinstance(item, BadExample)]
    values = [item["value"] for item in good]
    if values and isinstance(values[0], torch.Tensor):
        values = torch.stack(values)
    return {"ids": [item["id"] for item in good], "values": values,
            "bad": [item for item in items if isinstance(item, BadExample)]}


def _forward_batches(shards: Sequence[Shard], batch_size: int) -> list[list[int]]:
    """Fixed chunks of each shard: the same forward batches whatever the number of processes."""
    return [list(range(start, min(start + batch_size, shard.stop)))
            for shard in shards for start in range(shard.start, shard.stop, batch_size)]


def encode_shards(encoder, items: Items, shards: Sequence[Shard], config: EmbedConfig, output: Path,
                  run_key: dict[str, Any], show_progress: bool) -> int:
    """Encode and write ``shards``; returns the number of items encoded."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if not shards:
        return 0
    transform = image_transform(encoder) if config.modality == "image" else None
    loader = DataLoader(_ItemDataset(items, transform), batch_sampler=_forward_batches(shards, config.per_device_batch_size),
                        num_workers=config.num_workers if config.modality == "image" else 0, collate_fn=_collate)
    encode = encoder.encode_image if config.modality == "image" else encoder.encode_text
    dtype = np.float16 if config.dtype == "float16" else np.float32
    allowed = config.max_bad_fraction * items.total
    bad_seen, encoded = list(items.skipped), 0
    pending = iter(shards)
    shard = next(pending)
    vectors: list[np.ndarray] = []
    ids: list[str] = []
    skipped: list[BadExample] = []
    done = 0
    with tqdm(total=sum(s.stop - s.start for s in shards), unit="item", desc=f"embed {config.modality}",
              disable=not show_progress, dynamic_ncols=True) as bar:
        for batch in loader:
            if batch["ids"]:
                vectors.append(encode(batch["values"], batch_size=len(batch["ids"]), progress=False).numpy())
                ids.extend(batch["ids"])
                encoded += len(batch["ids"])
            skipped.extend(batch["bad"])
            bad_seen.extend(batch["bad"])
            if len(bad_seen) > allowed:  # this process alone is past the allowance of the whole source
                raise _too_many_bad(bad_seen, items.total, config.max_bad_fraction)
            count = len(batch["ids"]) + len(batch["bad"])
            done += count
            bar.update(count)
            if done == shard.stop - shard.start:  # the shard's last forward batch
                stacked = np.concatenate(vectors) if vectors else np.zeros((0, encoder.dim), np.float32)
                write_shard(output / shard.file, stacked.astype(dtype), ids, skipped, shard_key(shard, run_key))
                vectors, ids, skipped, done = [], [], [], 0
                shard = next(pending, None)
    return encoded


# ----------------------------------------------------------------------------- galleries

@dataclass
class Target:
    """Where this run's vectors go, and the gallery they join."""

    output: Path
    manifest: dict[str, Any] | None  # the output folder's existing manifest
    first_shard: int
    faiss_file: Path | None = None  # a foreign faiss index to append to


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{str(path)!r} is not valid JSON ({error}).") from error
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{str(path)!r} is not an xbt embed manifest (format {manifest.get('format')!r}).")
    return manifest


def check_gallery(gallery_space: str | None, gallery_dim: int, encoder, model: str, where: str) -> None:
    """Refuse an encoder whose vectors are of another space or dimension than the gallery's."""
    try:
        check_same_space(gallery_space, encoder.space_id, f"The encoder {model} (model {encoder.model_id})",
                         f"The gallery {where} holds vectors of space {gallery_space}; use an encoder that writes "
                         f"into it (the old model, or an adapter trained for it).")
    except FingerprintMismatchError as error:
        raise InputError(str(error)) from error
    if gallery_dim != encoder.dim:
        raise InputError(f"The gallery {where} holds {gallery_dim}-d vectors, but the encoder {model} writes "
                         f"{encoder.dim}-d vectors.")


def _same_part(part: dict[str, Any], items: Items, model_id: str) -> bool:
    return part["fingerprint"] == items.fingerprint and part["model_id"] == model_id


def resolve_target(config: EmbedConfig, encoder, items: Items) -> Target:
    """Check ``--output_dir`` / ``--append_to`` against the encoder and the items; nothing is written."""
    append = Path(config.append_to) if config.append_to else None
    if append is not None and not append.exists():
        raise InputError(f"--append_to {str(append)!r} does not exist; give an xbt embed folder or a faiss index.")
    if append is not None and append.is_file():
        return _faiss_target(config, encoder, items, append)
    output = append if append is not None else Path(config.output_dir)
    if append is not None and config.output_dir and Path(config.output_dir).resolve() != append.resolve():
        raise InputError(f"--append_to {str(append)!r} adds shards to that folder; leave out --output_dir "
                         f"({config.output_dir!r}) or give the same folder.")
    manifest = read_manifest(output) if output.is_dir() else None
    if append is not None and manifest is None:
        raise InputError(f"--append_to {str(append)!r} holds no {MANIFEST_FILE}; it is not an xbt embed folder.")
    if manifest is None:
        return Target(output, None, 0)
    where = str(output)
    check_gallery(manifest["space_id"], manifest["dim"], encoder, config.model, where)
    for option, value in (("modality", config.modality), ("dtype", config.dtype), ("shard_size", config.shard_size)):
        if manifest[option] != value:
            raise InputError(f"The gallery {where} was written with --{option} {manifest[option]!r}; "
                             f"this run has {value!r}.")
    part = next((p for p in manifest["parts"] if _same_part(p, items, encoder.model_id)), None)
    if part is not None:  # the same source by the same model: a rerun, resumed where it stopped
        return Target(output, manifest, part["first_shard"])
    if append is None:
        raise InputError(f"--output_dir {where!r} already holds other embeddings ({manifest['count']} vectors of "
                         f"{', '.join(p['source'] for p in manifest['parts'])}); pass --append_to {where} to add "
                         f"these, or choose another folder.")
    existing = set(_stored_ids(output, manifest))
    clash = next((i for i in items.ids if i in existing), None)
    if clash is not None:
        raise InputError(f"Id {clash!r} of {items.description} is already in the gallery {where}; "
                         f"ids must name one vector.")
    return Target(output, manifest, len(manifest["shards"]))


def _faiss_target(config: EmbedConfig, encoder, items: Items, path: Path) -> Target:
    if config.output_dir is None:
        raise InputError(f"--append_to a faiss index ({str(path)!r}) needs --output_dir for the new shards.")
    sibling = read_manifest(path.parent)
    if sibling is not None and (sibling.get("index") or {}).get("file") == path.name:
        raise InputError(f"{str(path)!r} is the index of the xbt embed folder {str(path.parent)!r}; pass "
                         f"--append_to {str(path.parent)!r} so its shards, ids and index are updated together.")
    index = _read_index(path)
    check_gallery(None, index.d, encoder, config.model, str(path))
    logger.warning("The faiss index %s records no space; make sure it holds vectors of space %s.", path,
                   encoder.space_id)
    _index_tail_state(index, _integer_ids(items.ids, path), str(path))
    target = resolve_target(dataclasses.replace(config, append_to=None), encoder, items)
    target.faiss_file = path
    return target


def _integer_ids(ids: Sequence[str], path: Path) -> np.ndarray:
    try:
        return np.array([int(i) for i in ids], dtype=np.int64)
    except ValueError as error:
        raise InputError(f"The faiss index {str(path)!r} is keyed by integers, but the new items have ids that "
                         f"are not integers ({error}); set --id_column to an integer id column.") from error


def _read_index(path: Path):
    import faiss

    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        raise InputError(f"{str(path)!r} is not a faiss index ({error}).") from error
    if not isinstance(index, faiss.IndexIDMap2):
        raise InputError(f"The faiss index {str(path)!r} is a {type(index).__name__}; appending needs an "
                         f"IndexIDMap2 (faiss.IndexIDMap2(index)), whose ids can be added and read back.")
    return index


def _index_tail_state(index, new_ids: np.ndarray, where: str) -> bool:
    """True when ``new_ids`` are already the last rows of ``index`` (appended before a crash); raise on a clash."""
    import faiss

    stored = faiss.vector_to_array(index.id_map).astype(np.int64)
    if len(new_ids) and len(stored) >= len(new_ids) and np.array_equal(stored[-len(new_ids):], new_ids):
        return True
    clash = np.intersect1d(stored, new_ids)
    if len(clash):
        raise InputError(f"Id {int(clash[0])} is already in the faiss index {where}; ids must name one vector.")
    return False


def _append_to_index(path: Path, vectors: np.ndarray, ids: np.ndarray) -> None:
    """``add_with_ids`` to an IndexIDMap2 file, written atomically; a repeat of a finished append does nothing."""
    index = _read_index(path)
    if _index_tail_state(index, ids, str(path)):
        logger.info("%s already ends with these %d vectors", path, len(ids))
        return
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
    _write_index(path, index)


def _write_index(path: Path, index) -> None:
    import faiss

    atomic_write_bytes(path, faiss.serialize_index(index).tobytes())


# ----------------------------------------------------------------------------- reading

def _stored_ids(folder: Path, manifest: dict[str, Any]) -> list[str]:
    ids: list[str] = []
    for shard in manifest["shards"]:
        header = read_shard_header(folder / shard["file"])
        if header is None:
            raise InputError(f"Shard {shard['file']} listed in {str(folder / MANIFEST_FILE)!r} is missing or damaged.")
        ids.extend(header["ids"])
    return ids


def read_embeddings_dir(path: str | Path) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """The vectors (float32, rows in shard order), their string ids and the manifest of an ``xbt embed`` folder.

    Every shard listed in the manifest must be present with the key the manifest records.
    """
    folder = Path(path)
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        raise InputError(f"{str(folder)!r} is not an xbt embed folder (no {MANIFEST_FILE}).")
    ids: list[str] = []
    for shard in manifest["shards"]:
        header = read_shard_header(folder / shard["file"])
        if header is None or header["key"] != shard["key"]:
            raise InputError(f"Shard {shard['file']} of {str(folder)!r} is missing or does not match "
                             f"{MANIFEST_FILE}; rerun the xbt embed command that wrote it.")
        ids.extend(header["ids"])
    files = [shard["file"] for shard in manifest["shards"]]
    vectors = _shard_vectors(folder, files) if files else np.zeros((0, manifest["dim"]), np.float32)
    return vectors, ids, manifest


# ----------------------------------------------------------------------------- the run

def _shard_records(folder: Path, shards: Sequence[Shard], run_key: dict[str, Any], part: int):
    """Manifest rows, ids and skipped items of the finished shards (each checked against its key)."""
    records, ids, skipped = [], [], []
    for shard in shards:
        header = read_shard_header(folder / shard.file)
        if header is None or header["key"] != shard_key(shard, run_key):
            raise XBTError(f"Shard {shard.file} in {folder} was not written by this run; a process failed.")
        records.append({"file": shard.file, "part": part, "count": len(header["ids"]),
                        "skipped": len(header["skipped"]), "key": header["key"]})
        ids.extend(header["ids"])
        skipped.extend(header["skipped"])
    return records, ids, skipped


def _shard_vectors(folder: Path, files: Sequence[str]) -> np.ndarray:
    """The float32 vectors of the named shard files, concatenated in that order."""
    from safetensors import safe_open

    blocks = []
    for name in files:
        with safe_open(str(folder / name), "np") as handle:
            blocks.append(handle.get_tensor("embeddings").astype(np.float32, copy=False))
    return np.concatenate(blocks)


def embed(config: EmbedConfig) -> Path:
    """Run ``xbt embed``; returns the output folder (rank 0 has written its manifest when this returns)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    from . import __version__

    items = open_items(config)
    check_ids(items.ids, items.description)
    if len(items.skipped) > config.max_bad_fraction * items.total:
        raise _too_many_bad(items.skipped, items.total, config.max_bad_fraction)
    if not len(items):
        raise InputError(f"{items.description} holds no usable item.")
    # Accelerator reads ACCELERATE_USE_CPU (what `accelerate launch --cpu` sets); PartialState alone does not.
    state = PartialState(cpu=config.cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    encoder = load_encoder(config.model, device=state.device, merge=config.merge)
    if config.space == "full":
        encoder = full_space_encoder(encoder, config.model)
    target = resolve_target(config, encoder, items)
    run_key = {"model_id": encoder.model_id, "space_id": encoder.space_id, "modality": config.modality,
               "dtype": config.dtype, "source": items.fingerprint}
    shards = plan_shards(len(items), config.shard_size, target.first_shard)
    missing = [s for s in shards
               if (read_shard_header(target.output / s.file) or {}).get("key") != shard_key(s, run_key)]
    target.output.mkdir(parents=True, exist_ok=True)
    # Every process decides what is missing before any of them writes a shard.
    state.wait_for_everyone()
    mine = missing[state.process_index::state.num_processes]
    started = time.perf_counter()
    encoded = encode_shards(encoder, items, mine, config, target.output, run_key,
                            show_progress=config.progress and state.is_main_process)
    seconds = time.perf_counter() - started
    ranks = gather_object([{"rank": state.process_index, "pid": os.getpid(), "encoded_shards": [s.number for s in mine],
                            "encoded_items": encoded, "seconds": round(seconds, 3)}])
    state.wait_for_everyone()
    if state.is_main_process:
        slowest = max(r["seconds"] for r in ranks)
        run = {"processes": state.num_processes, "ranks": ranks, "xbt_version": __version__,
               "encoded_shards": sorted(s.number for s in missing),
               "reused_shards": sorted(s.number for s in shards if s not in missing),
               "items_per_second": round(sum(r["encoded_items"] for r in ranks) / slowest, 2) if slowest else None}
        _finish(config, encoder, items, target, shards, run_key, run)
    return target.output


def _finish(config: EmbedConfig, encoder, items: Items, target: Target, shards: list[Shard],
            run_key: dict[str, Any], run: dict[str, Any]) -> None:
    """Rank 0, after every shard is written: the index, the append to a foreign index, the manifest (last)."""
    output, manifest = target.output, target.manifest or {"parts": [], "shards": [], "skipped": [], "runs": []}
    parts = list(manifest["parts"])
    number = next((n for n, p in enumerate(parts) if _same_part(p, items, encoder.model_id)), len(parts))
    rerun = number < len(parts)
    records, ids, skipped = _shard_records(output, shards, run_key, number)
    bad = [_bad_dict(b) for b in items.skipped] + skipped
    if len(bad) > config.max_bad_fraction * items.total:  # each process judged only its own shards
        raise _too_many_bad([BadExample(**b) for b in bad], items.total, config.max_bad_fraction)
    parts[number:number + 1] = [{
        "source": items.description, "format": items.format, "fingerprint": items.fingerprint,
        **_encoder_info(encoder, config.model, config.merge), "items": items.total,
        "first_shard": target.first_shard, "shards": len(shards), "count": len(ids), "skipped_count": len(bad)}]
    all_shards = sorted([s for s in manifest["shards"] if s["part"] != number] + records,
                        key=lambda record: record["key"]["shard"])
    all_skipped = [s for s in manifest["skipped"] if s["part"] != number] + [{**b, "part": number} for b in bad]
    index = manifest.get("index")
    if config.faiss_index or index:
        new_files = [r["file"] for r in records]
        if index is None:  # a new index over the whole folder
            _build_index(output / INDEX_FILE, _shard_vectors(output, [s["file"] for s in all_shards]))
        elif not rerun:  # the new part's rows follow the existing ones
            start = sum(s["count"] for s in all_shards if s["key"]["shard"] < target.first_shard)
            _append_to_index(output / INDEX_FILE, _shard_vectors(output, new_files),
                             np.arange(start, start + len(ids), dtype=np.int64))
        all_ids = _stored_ids(output, {"shards": all_shards})
        atomic_write_text(output / INDEX_IDS_FILE, "".join(f"{i}\n" for i in all_ids))
        index = {"file": INDEX_FILE, "ids_file": INDEX_IDS_FILE, "kind": INDEX_KIND, "count": len(all_ids)}
    result = {
        "format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION,
        "space_id": encoder.space_id, "dim": encoder.dim, "modality": config.modality, "dtype": config.dtype,
        "normalization": "l2" if config.dtype == "float32" else "l2 (in float32, then stored as float16)",
        "model_ids": sorted({p["model_id"] for p in parts}), "count": sum(s["count"] for s in all_shards),
        "skipped_count": len(all_skipped), "shard_size": config.shard_size, "shards": all_shards, "parts": parts,
        "skipped": all_skipped, "index": index, "runs": manifest["runs"] + [run],
    }
    if target.faiss_file is not None:
        _append_to_index(target.faiss_file, _shard_vectors(output, [r["file"] for r in records]),
                         _integer_ids(ids, target.faiss_file))
        result["appended_to"] = str(target.faiss_file)
    atomic_write_json(output / MANIFEST_FILE, result)
    logger.info("%s: %d vectors in %d shards (%d skipped); this run encoded %d shard(s)", output, result["count"],
                len(all_shards), len(all_skipped), len(run["encoded_shards"]))


def _build_index(path: Path, vectors: np.ndarray) -> None:
    import faiss

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.arange(len(vectors), dtype=np.int64))
    _write_index(path, index)


def run(argv: Sequence[str]) -> int:
    """``xbt embed``: parse flags and/or ``--config FILE``, encode, print the output folder."""
    (config,) = parse_configs((EmbedConfig,), argv, prog="xbt embed",
                              description="Encode images or texts into a space (a model's own, or an adapter's "
                                          "target space): sharded safetensors + manifest, optionally a faiss "
                                          "index; resumable, and runs under accelerate launch.")
    output = embed(config)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(output)
    return 0


def main() -> int:
    """Entry point of ``scripts/embed.py`` (plain python or ``accelerate launch``)."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(sys.argv[1:])
    except XBTError as error:
        print(f"embed: error: {error}", file=sys.stderr)
        return 2

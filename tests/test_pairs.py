"""Image-text pairs from real files: folders, saved/parquet datasets, tar shards, real DataLoader workers."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from PIL import Image

from xbt import InputError
from xbt import images as xbt_images
from xbt.data.examples import caption_choice, clean_captions
from xbt.data.packed import PackedCaptions, PackedStrings
from xbt.data.pairs import (PairDataConfig, PairSampler, detect_format, iter_captions, make_pair_loader, open_pairs,
                            set_loader_epoch)

from helpers import TINY_IMAGE_SIZE as SIZE
from helpers import read_all, tiny_preprocess

REPO = Path(__file__).resolve().parents[1]


def image_bytes(index: int, mode: str = "RGB", fmt: str = "PNG", size: int = 12) -> bytes:
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write_folder(root: Path, count: int, captions_per_image: int = 3, metadata: str = "jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        name = f"img_{index:03d}.{'jpg' if index % 2 else 'png'}"
        (root / name).write_bytes(image_bytes(index, fmt="JPEG" if index % 2 else "PNG"))
        rows.append({"file_name": name, "captions": [f"caption {c} of image {index}" for c in range(captions_per_image)]})
    if metadata == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    else:
        lines = ["file_name,captions"] + [f'{r["file_name"]},"{json.dumps(r["captions"]).replace(chr(34), 2 * chr(34))}"'
                                          for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


# ----------------------------------------------------------------------------- folders and metadata

def test_folder_jsonl_groups_rows_drops_empty_captions_and_lists_without_decoding(tmp_path):
    root = write_folder(tmp_path / "f", 4)
    with (root / "metadata.jsonl").open("a") as handle:
        handle.write("\n" + json.dumps({"file_name": "img_000.png", "captions": ["one more", "  "]}))
        handle.write("\n" + json.dumps({"file_name": "blank.png", "captions": ["", " "]}))
    (root / "img_001.jpg").write_bytes(b"not an image")  # listing captions must not decode it
    source = open_pairs(PairDataConfig(source=str(root)))
    assert source.format == "folder"
    listed = dict(iter_captions(source))
    assert sorted(listed) == [f"img_{i:03d}.{'jpg' if i % 2 else 'png'}" for i in range(4)]
    assert listed["img_000.png"] == ["caption 0 of image 0", "caption 1 of image 0", "caption 2 of image 0", "one more"]
    assert [(bad.id, bad.reason) for bad in source.skipped] == [("blank.png", "no_caption")]

    # Ids from a column (e.g. the ids of stored old image embeddings); one id must name one image.
    rows = [{"file_name": f"img_00{i}.{'jpg' if i % 2 else 'png'}", "caption": f"c{i}", "gallery_id": 100 + i}
            for i in range(4)]
    (root / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    source = open_pairs(PairDataConfig(source=str(root), id_column="gallery_id", shuffle=False))
    assert source.ids == ["100", "101", "102", "103"]
    assert next(iter(make_pair_loader(source, transform=tiny_preprocess)))["ids"][0] == "100"
    rows[3]["gallery_id"] = 100
    (root / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(InputError, match="id '100' names two images"):
        open_pairs(PairDataConfig(source=str(root), id_column="gallery_id"))
    with pytest.raises(InputError, match="no id column 'uid'"):
        open_pairs(PairDataConfig(source=str(root), id_column="uid"))


def test_folder_csv_single_captions_json_lists_and_separator(tmp_path):
    root = tmp_path / "csv"
    root.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (root / name).write_bytes(image_bytes(1))
    (root / "metadata.csv").write_text('file_name,text\na.png,1984\nb.png,"a dog, running"\nc.png,\n')
    source = open_pairs(PairDataConfig(source=str(root)))
    assert dict(iter_captions(source)) == {"a.png": ["1984"], "b.png": ["a dog, running"]}
    assert [bad.id for bad in source.skipped] == ["c.png"]

    json_root = write_folder(tmp_path / "json_csv", 3, metadata="csv")
    assert dict(iter_captions(open_pairs(PairDataConfig(source=str(json_root)))))["img_002.png"][2] == \
        "caption 2 of image 2"

    (root / "metadata.csv").write_text("file_name,caption\na.png,red car|blue car||\n")
    source = open_pairs(PairDataConfig(source=str(root), caption_separator="|"))
    assert dict(iter_captions(source)) == {"a.png": ["red car", "blue car"]}


def test_packed_strings_round_trip():
    lists = [["a dog", "ein Hund 🐕"], [], ["", "x" * 1000]]
    packed = PackedCaptions(lists)
    assert [packed[i] for i in range(len(packed))] == lists
    flat = PackedStrings(["é", "", "z"])
    assert list(flat) == ["é", "", "z"] and len(PackedStrings([])) == 0


def test_clean_captions_rejects_a_broken_json_list():
    assert clean_captions('["a", " ", "b"]', json_list=True) == ["a", "b"]
    with pytest.raises(InputError, match="JSON list"):
        clean_captions("[not json", json_list=True)
    with pytest.raises(InputError, match="not a JSON list"):
        clean_captions('{"a": 1}', json_list=True)


def test_opening_reports_what_is_wrong(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_pairs(PairDataConfig(source=str(tmp_path / "nowhere")))
    (tmp_path / "only_images").mkdir()
    (tmp_path / "only_images" / "a.png").write_bytes(image_bytes(0))
    with pytest.raises(InputError, match="metadata.jsonl"):
        open_pairs(PairDataConfig(source=str(tmp_path / "only_images")))
    with pytest.raises(InputError, match="metadata.jsonl"):
        open_pairs(PairDataConfig(source=str(tmp_path / "only_images"), format="folder"))
    root = write_folder(tmp_path / "f", 2)
    with pytest.raises(InputError, match="no caption column 'alt'"):
        open_pairs(PairDataConfig(source=str(root), caption_column="alt"))
    (root / "metadata.jsonl").write_text(json.dumps({"path": "img_000.png", "caption": "x"}))
    with pytest.raises(InputError, match="no 'file_name' column"):
        open_pairs(PairDataConfig(source=str(root)))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "img_000.png", "label": 3}))
    with pytest.raises(InputError, match="none of the caption columns"):
        open_pairs(PairDataConfig(source=str(root)))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "img_000.png", "caption": " "}))
    with pytest.raises(InputError, match="no image with a non-empty caption"):
        open_pairs(PairDataConfig(source=str(root)))
    (root / "metadata.jsonl").write_text("{broken json")
    with pytest.raises(InputError, match="Cannot read"):
        open_pairs(PairDataConfig(source=str(root)))
    with pytest.raises(InputError, match="unknown pair data format"):
        PairDataConfig(source=str(root), format="zip")
    with pytest.raises(InputError, match="does not exist"):
        detect_format(str(tmp_path / "shards-*.tar"))
    with pytest.raises(InputError, match="does not exist"):
        detect_format("data/train/part.parquet")
    assert detect_format("someorg/some-dataset") == "hub"


# ----------------------------------------------------------------------------- bad images

def test_bad_images_are_skipped_counted_and_enforced(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "f", 12)
    truncated = (root / "img_002.png").read_bytes()
    (root / "img_002.png").write_bytes(truncated[: len(truncated) // 2])
    garbled = bytearray((root / "img_003.jpg").read_bytes())
    garbled[2:40] = b"\x00" * 38  # destroys the JPEG headers
    (root / "img_003.jpg").write_bytes(bytes(garbled))
    (root / "img_004.png").unlink()
    (root / "img_005.jpg").write_bytes(image_bytes(5, fmt="JPEG", size=40))  # 1600 px: over the lowered limit
    monkeypatch.setattr(xbt_images, "MAX_IMAGE_PIXELS", 1000)

    tolerant = open_pairs(PairDataConfig(source=str(root), batch_size=5, max_bad_fraction=0.5))
    quality = tolerant.new_quality()
    batches = list(make_pair_loader(tolerant, transform=tiny_preprocess))
    for batch in batches:
        quality.update(batch)
        assert batch["images"].shape == (len(batch["ids"]), 3, SIZE, SIZE)
    quality.finish()
    assert quality.kept == 8 and dict(quality.bad) == {"corrupt_image": 2, "missing_image": 1, "oversized_image": 1}
    assert {example.id for example in quality.examples} == {"img_002.png", "img_003.jpg", "img_004.png", "img_005.jpg"}
    assert quality.to_dict()["skipped"] == 4 and "8 used, 4 skipped of 12" in quality.summary()

    strict = open_pairs(PairDataConfig(source=str(root), batch_size=5, shuffle=False))  # default: 1%
    quality = strict.new_quality()
    with pytest.raises(InputError, match="unusable") as caught:
        for batch in make_pair_loader(strict, transform=tiny_preprocess):
            quality.update(batch)
    assert "img_002.png" in str(caught.value) and quality.seen == 5  # stopped at the first batch


def test_every_image_mode_becomes_three_channels(tmp_path):
    root = tmp_path / "modes"
    root.mkdir()
    rows = []
    for mode, fmt in [("RGBA", "PNG"), ("L", "PNG"), ("CMYK", "JPEG"), ("P", "PNG"), ("I;16", "PNG"), ("1", "PNG")]:
        name = f"{mode.replace(';', '')}.{fmt.lower()}"
        image = Image.fromarray(np.full((10, 10), 30000, np.uint16)) if mode == "I;16" else \
            Image.open(io.BytesIO(image_bytes(3))).convert(mode)
        image.save(root / name, fmt)
        rows.append({"file_name": name, "caption": f"a {mode} picture"})
    (root / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    source = open_pairs(PairDataConfig(source=str(root), batch_size=10, max_bad_fraction=0.0))
    batch = next(iter(make_pair_loader(source, transform=tiny_preprocess)))
    assert batch["images"].shape == (6, 3, SIZE, SIZE) and batch["bad"] == []
    untransformed = next(iter(make_pair_loader(source)))
    assert all(image.mode == "RGB" for image in untransformed["images"])


# ----------------------------------------------------------------------------- order, captions, resume

def test_order_and_captions_are_deterministic_across_runs_workers_and_epochs(tmp_path):
    root = write_folder(tmp_path / "f", 24, captions_per_image=5)
    config = dict(source=str(root), batch_size=4, seed=7)
    source = open_pairs(PairDataConfig(**config))
    first = read_all(make_pair_loader(source, transform=tiny_preprocess))
    again = read_all(make_pair_loader(open_pairs(PairDataConfig(**config, num_workers=2)), transform=tiny_preprocess))
    assert first == again and len(first) == 24  # same pairs with 0 and 2 worker processes
    assert [example_id for example_id, _ in first] != sorted(example_id for example_id, _ in first)

    loader = make_pair_loader(source, transform=tiny_preprocess)
    set_loader_epoch(loader, 1)
    second_epoch = read_all(loader)
    assert [i for i, _ in second_epoch] != [i for i, _ in first] and sorted(second_epoch) != sorted(first)
    other_seed = read_all(make_pair_loader(open_pairs(PairDataConfig(**{**config, "seed": 8}))))
    assert [i for i, _ in other_seed] != [i for i, _ in first]
    # Every caption of an image is used across epochs, with the choice fixed by (seed, epoch, id).
    choices = {caption_choice(7, epoch, "img_000.png", 5) for epoch in range(40)}
    assert choices == set(range(5))
    caption_of = dict(first)
    assert caption_of["img_000.png"] == f"caption {caption_choice(7, 0, 'img_000.png', 5)} of image 0"


def test_resume_with_skip_first_batches_plain_and_prepared(tmp_path):
    source = open_pairs(PairDataConfig(source=str(write_folder(tmp_path / "f", 20)), batch_size=3, seed=1))
    loader = make_pair_loader(source, transform=tiny_preprocess)
    set_loader_epoch(loader, 2)
    full = [batch["ids"] for batch in loader]
    resumed = make_pair_loader(source, transform=tiny_preprocess)
    set_loader_epoch(resumed, 2)
    assert [batch["ids"] for batch in skip_first_batches(resumed, 4)] == full[4:]

    prepared = Accelerator(cpu=True).prepare(make_pair_loader(source, transform=tiny_preprocess))
    set_loader_epoch(prepared, 2)
    assert [batch["ids"] for batch in prepared] == full
    set_loader_epoch(prepared, 2)
    assert [batch["ids"] for batch in skip_first_batches(prepared, 5)] == full[5:]


def test_ranks_split_the_permutation_evenly():
    ranks = [list(PairSampler(11, seed=3, rank=rank, world_size=2)) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    positions = [position for rank in ranks for _, position in rank]
    assert set(positions) == set(range(11)) and len(positions) == 12  # one wrap-around to even out
    with pytest.raises(InputError, match="rank"):
        PairSampler(4, rank=2, world_size=2)


def test_dual_encoder_preprocess_runs_in_workers(tmp_path, tiny_encoders):
    encoder = tiny_encoders["open_clip"]
    source = open_pairs(PairDataConfig(source=str(write_folder(tmp_path / "f", 6)), batch_size=3, num_workers=2))
    batches = list(make_pair_loader(source, transform=encoder.preprocess))
    assert [batch["images"].shape for batch in batches] == [(3, 3, encoder.image_size, encoder.image_size)] * 2
    embeddings = encoder.encode_image(batches[0]["images"])
    assert embeddings.shape == (3, encoder.embed_dim)


# ----------------------------------------------------------------------------- table sources

def table_dataset(count: int) -> datasets.Dataset:
    cells = [{"bytes": image_bytes(i), "path": None} for i in range(count)]
    cells[1] = {"bytes": b"garbage", "path": None}
    texts = [f"a photo number {i}" for i in range(count)]
    texts[2] = ""
    return datasets.Dataset.from_dict(
        {"picture": cells, "alt": texts, "uid": [f"u{i}" for i in range(count)]},
        features=datasets.Features({"picture": datasets.Image(), "alt": datasets.Value("string"),
                                    "uid": datasets.Value("string")}))


def test_saved_parquet_and_hub_branch_tables(tmp_path):
    table = table_dataset(6)
    table.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    table.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    common = dict(image_column="picture", caption_column="alt", batch_size=10, max_bad_fraction=0.5, shuffle=False)
    for source_path, fmt in [(tmp_path / "saved", "auto"), (tmp_path / "pq", "auto"),
                             (tmp_path / "pq" / "part-0.parquet", "auto"), (tmp_path / "pq", "hub")]:
        source = open_pairs(PairDataConfig(source=str(source_path), format=fmt, **common))
        assert source.format == {"saved": "disk"}.get(source_path.name, "parquet" if fmt == "auto" else "hub")
        assert [example_id for example_id, _ in iter_captions(source)] == ["0", "1", "3", "4", "5"]
        quality = source.new_quality()
        batch = next(iter(make_pair_loader(source, transform=tiny_preprocess)))
        quality.update(batch)
        assert batch["ids"] == ["0", "3", "4", "5"] and batch["captions"][1] == "a photo number 3"
        assert torch.equal(batch["images"][0], tiny_preprocess(Image.open(io.BytesIO(image_bytes(0))).convert("RGB")))
        assert dict(quality.bad) == {"corrupt_image": 1, "no_caption": 1}

    with_ids = open_pairs(PairDataConfig(source=str(tmp_path / "saved"), id_column="uid", **common))
    assert with_ids.ids[:2] == ["u0", "u1"]
    # One row per caption (COCO style): rows sharing an id are one image, the first row's.
    per_caption = datasets.concatenate_datasets([table, table.map(lambda row: {"alt": row["alt"] + " again"})])
    per_caption.save_to_disk(str(tmp_path / "per_caption"))
    grouped = open_pairs(PairDataConfig(source=str(tmp_path / "per_caption"), id_column="uid", **common))
    assert len(grouped) == 6 and grouped.captions[0] == ["a photo number 0", "a photo number 0 again"]
    assert grouped.captions[2] == ["again"] and grouped.images.rows.tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(InputError, match="no image column 'image'"):
        open_pairs(PairDataConfig(source=str(tmp_path / "saved"), caption_column="alt"))
    with pytest.raises(InputError, match="no id column"):
        open_pairs(PairDataConfig(source=str(tmp_path / "saved"), id_column="key", **{**common}))
    datasets.DatasetDict({"validation": table}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(InputError, match="no split 'train'"):
        open_pairs(PairDataConfig(source=str(tmp_path / "dict"), **common))
    assert len(open_pairs(PairDataConfig(source=str(tmp_path / "dict"), split="validation", **common))) == 5
    with pytest.raises(InputError, match="Cannot load"):
        open_pairs(PairDataConfig(source="someorg/not-here", **common))


def test_table_with_image_paths(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.png").write_bytes(image_bytes(i))
    table = datasets.Dataset.from_dict({"image": [f"images/{i}.png" for i in range(3)] + ["images/gone.png"],
                                        "caption": ["a", "b", "c", "d"]})
    table.to_parquet(str(tmp_path / "rows.parquet"))
    for where in (tmp_path, tmp_path / "rows.parquet"):  # paths are relative to the parquet file's folder
        source = open_pairs(PairDataConfig(source=str(where), max_bad_fraction=0.5, shuffle=False))
        assert source.format == "parquet"
        batch = next(iter(make_pair_loader(source, transform=tiny_preprocess)))
        assert batch["ids"] == ["0", "1", "2"] and [bad.reason for bad in batch["bad"]] == ["missing_image"]


# ----------------------------------------------------------------------------- tar shards

def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(root: Path, shards: int, per_shard: int) -> list[str]:
    """Good samples (png+txt, jpg+json list, png+json object) keyed s{shard}_{i}; returns their keys."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(shards):
        with tarfile.open(root / f"shard-{shard:03d}.tar", "w") as archive:
            for i in range(per_shard):
                key = f"s{shard}_{i:03d}"
                keys.append(key)
                kind = i % 3
                add_member(archive, f"{key}.{'jpg' if kind == 1 else 'png'}",
                           image_bytes(shard * 1000 + i, fmt="JPEG" if kind == 1 else "PNG"))
                if kind == 0:
                    add_member(archive, f"{key}.txt", f"text caption {key}".encode())
                elif kind == 1:
                    add_member(archive, f"{key}.json", json.dumps([f"first {key}", "", f"second {key}"]).encode())
                else:
                    add_member(archive, f"{key}.json", json.dumps({"caption": f"json caption {key}", "w": 12}).encode())
    return keys


def test_tar_shards_are_split_across_workers_and_ranks_exactly_once(tmp_path):
    keys = write_shards(tmp_path / "shards", shards=4, per_shard=6)
    config = dict(source=str(tmp_path / "shards"), batch_size=4, seed=5, shuffle_buffer=5)
    source = open_pairs(PairDataConfig(**config))
    assert source.format == "webdataset" and len(source.shards) == 4
    listed = dict(iter_captions(source))
    assert sorted(listed) == sorted(keys) and listed["s0_001"] == ["first s0_001", "second s0_001"]
    assert listed["s1_002"] == ["json caption s1_002"] and listed["s2_000"] == ["text caption s2_000"]

    two_workers = open_pairs(PairDataConfig(**config, num_workers=2))
    seen = []
    for rank in range(2):
        seen += read_all(make_pair_loader(two_workers, transform=tiny_preprocess, rank=rank, world_size=2))
    assert sorted(example_id for example_id, _ in seen) == sorted(keys)
    assert all(caption in listed[example_id] for example_id, caption in seen)


def test_tar_order_is_deterministic_and_resumable(tmp_path):
    write_shards(tmp_path / "shards", shards=3, per_shard=7)
    config = PairDataConfig(source=str(tmp_path / "shards" / "shard-*.tar"), batch_size=3, seed=2, num_workers=2,
                            shuffle_buffer=4)
    source = open_pairs(config)
    first = read_all(make_pair_loader(source, transform=tiny_preprocess))
    assert first == read_all(make_pair_loader(open_pairs(config), transform=tiny_preprocess))
    loader = make_pair_loader(source, transform=tiny_preprocess)
    set_loader_epoch(loader, 1)
    second_epoch = read_all(loader)
    assert sorted(i for i, _ in second_epoch) == sorted(i for i, _ in first) and second_epoch != first
    set_loader_epoch(loader, 1)
    resumed = [pair for batch in skip_first_batches(loader, 2) for pair in zip(batch["ids"], batch["captions"])]
    assert resumed == second_epoch[6:]


def test_damaged_tar_samples_and_shards_are_counted(tmp_path):
    root = tmp_path / "shards"
    write_shards(root, shards=1, per_shard=3)
    with tarfile.open(root / "shard-001.tar", "w") as archive:
        add_member(archive, "no_image.txt", b"caption without image")
        add_member(archive, "no_caption.png", image_bytes(1))
        add_member(archive, "empty_caption.png", image_bytes(2))
        add_member(archive, "empty_caption.txt", b"   ")
        add_member(archive, "broken.jpg", b"\xff\xd8\xff garbage")
        add_member(archive, "broken.txt", b"a broken picture")
        add_member(archive, "good.png", image_bytes(3))
        add_member(archive, "good.txt", b"a fine picture")
    data = (root / "shard-000.tar").read_bytes()
    # Cut inside the second sample's image: the first sample survives, the rest of the shard is lost.
    (root / "shard-000.tar").write_bytes(data[:2800])
    source = open_pairs(PairDataConfig(source=str(root), batch_size=4, max_bad_fraction=0.9, shuffle=False))
    quality = source.new_quality()
    ids = []
    for batch in make_pair_loader(source, transform=tiny_preprocess):
        quality.update(batch)
        ids += batch["ids"]
    quality.finish()
    assert "good" in ids and "s0_000" in ids
    assert dict(quality.bad) == {"corrupt_shard": 1, "missing_image": 1, "no_caption": 2, "corrupt_image": 1}
    strict = open_pairs(PairDataConfig(source=str(root), batch_size=4))
    quality = strict.new_quality()
    for batch in make_pair_loader(strict, transform=tiny_preprocess):
        quality.update(batch)  # a stream's size is unknown: it is judged at the end
    with pytest.raises(InputError, match="unusable"):
        quality.finish()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="No tar shards"):
        open_pairs(PairDataConfig(source=str(tmp_path / "empty"), format="webdataset"))
    (tmp_path / "gz").mkdir()
    with tarfile.open(tmp_path / "gz" / "part.tar.gz", "w:gz") as archive:
        add_member(archive, "zipped.png", image_bytes(4))
        add_member(archive, "zipped.txt", b"a compressed picture")
    gzipped = open_pairs(PairDataConfig(source=str(tmp_path / "gz")))
    assert gzipped.format == "webdataset" and list(iter_captions(gzipped)) == [("zipped", ["a compressed picture"])]
    assert read_all(make_pair_loader(gzipped, transform=tiny_preprocess)) == [("zipped", "a compressed picture")]
    (tmp_path / "fake.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InputError, match="not a readable tar"):
        open_pairs(PairDataConfig(source=str(tmp_path / "fake.tar")))


def test_check_pairs_command(tmp_path, capsys):
    from xbt.cli import main

    root = write_folder(tmp_path / "f", 5)
    assert main(["check-pairs", "--source", str(root), "--batch_size", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 5
    (root / "img_001.jpg").write_bytes(b"broken")
    assert main(["check-pairs", "--source", str(root)]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped_by_reason"] == {"corrupt_image": 1}
    assert "img_001.jpg" in captured.err and "max_bad_fraction" in captured.err


# Run under `accelerate launch` with two real processes (test harness): every rank writes the pairs it saw.
RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    from accelerate import Accelerator
    sys.path.insert(0, {tests!r})
    from helpers import read_all, tiny_preprocess
    from xbt.data.pairs import PairDataConfig, make_pair_loader, open_pairs, set_loader_epoch

    folder, shards, out = sys.argv[1:4]
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    source = open_pairs(PairDataConfig(source=folder, batch_size=3, seed=4))
    prepared = accelerator.prepare(make_pair_loader(source, transform=tiny_preprocess))
    set_loader_epoch(prepared, 1)
    by_rank = make_pair_loader(source, transform=tiny_preprocess, rank=rank, world_size=world)
    set_loader_epoch(by_rank, 1)
    stream = open_pairs(PairDataConfig(source=shards, batch_size=3, seed=4, num_workers=2))
    seen = {{"world": world, "prepared": read_all(prepared), "by_rank": read_all(by_rank),
             "tar": read_all(make_pair_loader(stream, transform=tiny_preprocess, rank=rank, world_size=world))}}
    with open(f"{{out}}/rank{{rank}}.json", "w") as handle:
        json.dump(seen, handle)
""")


@pytest.mark.slow
def test_two_accelerate_processes_share_the_data(tmp_path):
    folder = write_folder(tmp_path / "f", 12, captions_per_image=4)
    keys = write_shards(tmp_path / "shards", shards=4, per_shard=5)
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT.format(tests=str(REPO / "tests")))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(script), str(folder), str(tmp_path / "shards"), str(tmp_path)]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [seen["world"] for seen in ranks] == [2, 2]

    single = make_pair_loader(open_pairs(PairDataConfig(source=str(folder), batch_size=3, seed=4)))
    set_loader_epoch(single, 1)
    expected = sorted(map(tuple, read_all(single)))
    for way in ("prepared", "by_rank"):  # each rank gets half; together the same pairs as one process
        assert len(ranks[0][way]) == len(ranks[1][way]) == 6
        assert sorted(tuple(pair) for seen in ranks for pair in seen[way]) == expected
    tar_ids = [example_id for seen in ranks for example_id, _ in seen["tar"]]
    assert sorted(tar_ids) == sorted(keys) and all(seen["tar"] for seen in ranks)

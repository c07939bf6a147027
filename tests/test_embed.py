"""``xbt embed`` with real tiny models, real files, real faiss and real (sub)processes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from xbt import load_backbone
from xbt.demo.models import BUILDERS, TinyClipConfig
from xbt.embed import INDEX_FILE, INDEX_IDS_FILE, MANIFEST_FILE, read_embeddings_dir, run
from xbt.errors import InputError
from xbt.io import read_ids
from xbt.model import XBTModel
from xbt.projection import Projection, ProjectionConfig

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num_workers", "0", "--progress", "false"]


def write_images(folder: Path, names: list[str], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def embed(*args: str) -> Path:
    assert run([*args, *FAST]) == 0
    return Path(args[args.index("--output_dir") + 1]) if "--output_dir" in args else Path(args[args.index("--append_to") + 1])


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_refs) -> tuple[Path, str]:
    """A saved adapter: tiny hf new model + LoRA (non-zero) + linear ψ into a 24-d open_clip old model."""
    root = tmp_path_factory.mktemp("adapter")
    old_ref = BUILDERS["open_clip"](root / "old", TinyClipConfig(embed_dim=24, width=32, seed=1))
    new, old = load_backbone(tiny_refs["hf"]), load_backbone(old_ref)
    torch.manual_seed(0)
    psi = Projection.build(new.dim, old.dim, ProjectionConfig(kind="linear"), source_space=new.space_id,
                           target_space=old.space_id)
    model = XBTModel(new, psi, old_reference=old_ref, old_model_id=old.model_id)
    with torch.no_grad():
        for parameter in model.lora_parameters():
            parameter.normal_(0, 0.05)
    model.save_pretrained(root / "adapter")
    return root / "adapter", old_ref


# ----------------------------------------------------------------------------- sources and layout

def test_plain_image_folder_gives_sharded_vectors_with_file_name_ids_and_lists_bad_files(tiny_refs, backend, tmp_path):
    names = [f"{i:02d}.png" for i in range(7)] + [f"sub/{i}.jpg" for i in range(4)]
    write_images(tmp_path / "images", names)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    out = embed("--model", tiny_refs[backend], "--source", str(tmp_path / "images"), "--modality", "image",
                "--output_dir", str(tmp_path / "out"), "--shard_size", "4", "--per_device_batch_size", "3",
                "--max_bad_fraction", "0.1", "--faiss_index", "true")
    vectors, ids, manifest = read_embeddings_dir(out)
    expected_ids = sorted(names + ["broken.png"])  # sorted relative paths: the shard of item i is i // 4
    assert ids == [i for i in expected_ids if i != "broken.png"]
    shard_ids = [safe_open(str(out / s["file"]), "np").metadata() for s in manifest["shards"]]
    assert [json.loads(m["xbt_embed"])["ids"] for m in shard_ids][0] == [i for i in expected_ids[:4] if i != "broken.png"]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{k}.safetensors" for k in range(3)]
    assert [(s["id"], s["reason"]) for s in manifest["skipped"]] == [("broken.png", "corrupt_image")]
    encoder = load_backbone(tiny_refs[backend])
    direct = encoder.encode_image([tmp_path / "images" / i for i in ids]).numpy()
    np.testing.assert_allclose(vectors, direct, atol=1e-6)
    assert manifest["space_id"] == encoder.space_id and manifest["model_ids"] == [encoder.model_id]
    assert (manifest["dim"], manifest["count"], manifest["dtype"], manifest["normalization"]) == (32, 11, "float32", "l2")
    index = faiss.read_index(str(out / INDEX_FILE))
    assert read_ids(out / INDEX_IDS_FILE) == ids
    _, rows = index.search(vectors[[5]], 1)
    assert ids[int(rows[0, 0])] == ids[5]


def test_texts_from_captions_lines_and_a_dataset_column(tiny_refs, tmp_path):
    import datasets

    ref = tiny_refs["open_clip"]
    encoder = load_backbone(ref)
    folder = tmp_path / "pairs"
    write_images(folder, ["a.png", "b.png"])
    rows = [{"file_name": "a.png", "captions": ["a red square", "red block"]}, {"file_name": "b.png", "captions": ["blue"]}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "corpus.txt").write_text("first text\n\nthird text\n")
    datasets.Dataset.from_dict({"text": ["one", "", "three"], "key": ["k1", "k2", "k3"]}).save_to_disk(tmp_path / "table")
    cases = [  # (extra options, ids, texts, skipped)
        (["--source", str(folder)], ["a.png#0", "a.png#1", "b.png#0"], ["a red square", "red block", "blue"], []),
        (["--source", str(tmp_path / "corpus.txt")], ["1", "3"], ["first text", "third text"], [("2", "empty_text")]),
        (["--source", str(tmp_path / "table"), "--text_column", "text", "--id_column", "key"], ["k1", "k3"],
         ["one", "three"], [("k2", "empty_text")]),
    ]
    for number, (options, ids, texts, skipped) in enumerate(cases):
        out = embed("--model", ref, "--modality", "text", "--output_dir", str(tmp_path / f"out{number}"),
                    "--max_bad_fraction", "0.5", *options)
        vectors, got_ids, manifest = read_embeddings_dir(out)
        assert got_ids == ids, options
        np.testing.assert_allclose(vectors, encoder.encode_text(texts).numpy(), atol=1e-6)
        assert [(s["id"], s["reason"]) for s in manifest["skipped"]] == skipped


def test_tar_shards_are_read_by_dataloader_workers_with_sample_keys_as_ids(tiny_refs, tmp_path):
    ref = tiny_refs["hf"]
    images = write_images(tmp_path / "raw", [f"{i}.png" for i in range(6)])
    (tmp_path / "shards").mkdir()
    for number in range(2):
        with tarfile.open(tmp_path / "shards" / f"part-{number}.tar", "w") as archive:
            for i in range(number * 3, number * 3 + 3):
                for name, data in ((f"s{i:03d}.png", images[i].read_bytes()), (f"s{i:03d}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert run(["--model", ref, "--source", str(tmp_path / "shards"), "--modality", "image", "--output_dir", str(out),
                "--num_workers", "2", "--shard_size", "4", "--per_device_batch_size", "2", "--progress", "false"]) == 0
    vectors, ids, _ = read_embeddings_dir(out)
    assert ids == [f"s{i:03d}" for i in range(6)]
    np.testing.assert_allclose(vectors, load_backbone(ref).encode_image(images).numpy(), atol=1e-6)
    texts = embed("--model", ref, "--source", str(tmp_path / "shards"), "--modality", "text",
                  "--output_dir", str(tmp_path / "texts"))
    assert read_embeddings_dir(texts)[1] == [f"s{i:03d}#0" for i in range(6)]


def test_an_image_table_is_read_through_the_pair_reader_with_row_ids(tiny_refs, tmp_path):
    import datasets

    ref = tiny_refs["open_clip"]
    paths = write_images(tmp_path / "raw", ["a.png", "b.png", "c.png"])
    table = datasets.Dataset.from_dict({"image": [str(p) for p in paths], "caption": ["x", "y", "z"]})
    table.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "table")
    out = embed("--model", ref, "--source", str(tmp_path / "table"), "--modality", "image",
                "--output_dir", str(tmp_path / "out"))
    vectors, ids, manifest = read_embeddings_dir(out)
    assert ids == ["0", "1", "2"] and manifest["parts"][0]["format"] == "disk"
    np.testing.assert_allclose(vectors, load_backbone(ref).encode_image(paths).numpy(), atol=1e-6)


def test_only_the_rows_of_the_named_split_are_embedded(tiny_refs, tmp_path):
    """A benchmark table holding its splits in a column (Karpathy's `split`), images and a text column."""
    import datasets

    ref = tiny_refs["open_clip"]
    paths = write_images(tmp_path / "raw", [f"{i}.png" for i in range(4)])
    table = datasets.Dataset.from_dict({"image": [str(p) for p in paths], "caption": ["w", "x", "y", "z"],
                                        "id": ["a", "b", "c", "d"], "split": ["train", "test", "val", "test"]})
    table.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "table")
    common = ["--model", ref, "--source", str(tmp_path / "table"), "--id_column", "id", "--split_column", "split",
              "--split_values", "test", "val"]
    images = embed(*common, "--modality", "image", "--output_dir", str(tmp_path / "images"))
    vectors, ids, _ = read_embeddings_dir(images)
    assert ids == ["b", "c", "d"]
    np.testing.assert_allclose(vectors, load_backbone(ref).encode_image(paths[1:]).numpy(), atol=1e-6)
    texts = embed(*common, "--modality", "text", "--text_column", "caption", "--output_dir", str(tmp_path / "texts"))
    assert read_embeddings_dir(texts)[1] == ["b", "c", "d"]
    with pytest.raises(InputError, match="split_values .* need split_column"):
        run(["--model", ref, "--source", str(tmp_path / "table"), "--modality", "image", "--split_values", "test",
             "--output_dir", str(tmp_path / "x")])


def test_an_adapter_writes_merged_vectors_into_its_target_space(adapter, tmp_path):
    folder, old_ref = adapter
    paths = write_images(tmp_path / "images", [f"{i}.png" for i in range(5)])
    model = XBTModel.from_pretrained(folder)
    unmerged = model.encode_image(paths).numpy()
    merged = model.merge().encode_image(paths).numpy()
    for number, reference in enumerate((f"xbt:{folder}", str(folder))):  # the xbt: prefix and a bare folder
        out = embed("--model", reference, "--source", str(tmp_path / "images"), "--modality", "image",
                    "--output_dir", str(tmp_path / f"out{number}"), "--dtype", "float16")
        vectors, ids, manifest = read_embeddings_dir(out)
        assert manifest["space_id"] == load_backbone(old_ref).space_id == model.space_id
        assert manifest["parts"][0]["kind"] == "adapter" and manifest["parts"][0]["merged"] is True
        assert manifest["dim"] == 24 and manifest["dtype"] == "float16"
        with safe_open(str(out / manifest["shards"][0]["file"]), "np") as handle:
            assert handle.get_tensor("embeddings").dtype == np.float16
        np.testing.assert_allclose(vectors, merged, atol=2e-3)  # float16 storage
    assert np.abs(merged - unmerged).max() < 1e-4  # merging is how serving runs: same vectors up to rounding


def test_space_full_writes_an_extra_dims_adapters_full_vectors_into_its_own_space(adapter, tiny_refs, tmp_path):
    folder, old_ref = adapter
    new, old = load_backbone(tiny_refs["hf"]), load_backbone(old_ref)
    torch.manual_seed(1)
    psi = Projection.build(new.dim, old.dim, ProjectionConfig(kind="orthogonal", extra_dims=5),
                           source_space=new.space_id, target_space=old.space_id)
    model = XBTModel(new, psi, old_reference=old_ref, old_model_id=old.model_id)
    with torch.no_grad():
        for parameter in model.lora_parameters():
            parameter.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "bt2")
    paths = write_images(tmp_path / "images", [f"{i}.png" for i in range(4)])
    out = embed("--model", f"xbt:{tmp_path / 'bt2'}", "--source", str(tmp_path / "images"), "--modality", "image",
                "--space", "full", "--output_dir", str(tmp_path / "full"))
    vectors, ids, manifest = read_embeddings_dir(out)
    # Merged for serving, yet in the unmerged adapter's own full space: what xbt eval and a full gallery expect.
    assert manifest["space_id"] == model.full_space_id and manifest["dim"] == 24 + 5
    np.testing.assert_allclose(vectors, model.encode_image(paths, space="full").numpy(), atol=1e-4)
    for reference, pattern in ((str(folder), "space='full' needs a ψ with extra dims"),
                               (old_ref, "--space full: .* is a backbone")):
        with pytest.raises(InputError, match=pattern):
            run(["--model", reference, "--source", str(tmp_path / "images"), "--modality", "image", "--space", "full",
                 "--output_dir", str(tmp_path / "refused"), *FAST])


# ----------------------------------------------------------------------------- resume

def test_a_rerun_encodes_only_missing_or_stale_shards_and_leaves_the_others_untouched(tiny_refs, tmp_path):
    write_images(tmp_path / "images", [f"{i:02d}.png" for i in range(10)])
    args = ["--model", tiny_refs["open_clip"], "--source", str(tmp_path / "images"), "--modality", "image",
            "--output_dir", str(tmp_path / "out"), "--shard_size", "3"]
    out = embed(*args)
    reference = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    (out / "shard-00001.safetensors").unlink()
    stale = dict(json.loads(safe_open(str(out / "shard-00002.safetensors"), "np").metadata()["xbt_embed"]))
    from safetensors.numpy import save_file

    stale["key"]["model_id"] = "another-model"  # a shard from another run: it must be encoded again
    save_file({"embeddings": np.zeros((3, 32), np.float32)}, str(out / "shard-00002.safetensors"),
              metadata={"xbt_embed": json.dumps(stale)})
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*")}
    embed(*args)
    run_record = manifest_of(out)["runs"][-1]
    assert run_record["encoded_shards"] == [1, 2] and run_record["reused_shards"] == [0, 3]
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == reference
    for name in ("shard-00000.safetensors", "shard-00003.safetensors"):
        assert (out / name).stat().st_ino == before[name][0] and (out / name).stat().st_mtime_ns == before[name][1]


# ----------------------------------------------------------------------------- appending

def test_append_to_an_embed_folder_keeps_old_vectors_and_extends_the_index(adapter, tmp_path):
    folder, old_ref = adapter
    write_images(tmp_path / "old_items", [f"old{i}.png" for i in range(5)])
    write_images(tmp_path / "new_items", [f"new{i}.png" for i in range(4)], seed=1)
    gallery = embed("--model", old_ref, "--source", str(tmp_path / "old_items"), "--modality", "image",
                    "--output_dir", str(tmp_path / "gallery"), "--shard_size", "2", "--faiss_index", "true")
    old_vectors, old_ids, _ = read_embeddings_dir(gallery)
    old_index = faiss.read_index(str(gallery / INDEX_FILE))
    embed("--model", f"xbt:{folder}", "--source", str(tmp_path / "new_items"), "--modality", "image",
          "--append_to", str(gallery), "--shard_size", "2")
    vectors, ids, manifest = read_embeddings_dir(gallery)
    assert ids == old_ids + [f"new{i}.png" for i in range(4)]
    assert np.array_equal(vectors[:5], old_vectors)  # old ids keep their vectors exactly
    assert [p["kind"] for p in manifest["parts"]] == ["backbone", "adapter"] and manifest["count"] == 9
    assert [s["file"] for s in manifest["shards"]][3:] == ["shard-00003.safetensors", "shard-00004.safetensors"]
    index = faiss.read_index(str(gallery / INDEX_FILE))
    assert index.ntotal == 9 and read_ids(gallery / INDEX_IDS_FILE) == ids
    assert np.array_equal(index.index.reconstruct_n(0, 5), old_index.index.reconstruct_n(0, 5))
    np.testing.assert_allclose(index.index.reconstruct_n(5, 4), vectors[5:], atol=0)
    embed("--model", f"xbt:{folder}", "--source", str(tmp_path / "new_items"), "--modality", "image",
          "--append_to", str(gallery), "--shard_size", "2")  # a repeat is a resumed run, not a second copy
    assert faiss.read_index(str(gallery / INDEX_FILE)).ntotal == 9 and manifest_of(gallery)["count"] == 9


def test_append_to_a_faiss_index_adds_with_ids_once(tiny_refs, tmp_path):
    ref = tiny_refs["open_clip"]
    stored = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    index.add_with_ids(stored, np.array([100, 101, 102], dtype=np.int64))
    faiss.write_index(index, str(tmp_path / "prod.faiss"))
    (tmp_path / "new.txt").write_text("a new caption\nanother one\n")
    args = ["--model", ref, "--source", str(tmp_path / "new.txt"), "--modality", "text",
            "--append_to", str(tmp_path / "prod.faiss"), "--output_dir", str(tmp_path / "new")]
    embed(*args)
    embed(*args)  # rerun: the index already ends with these ids
    grown = faiss.read_index(str(tmp_path / "prod.faiss"))
    assert faiss.vector_to_array(grown.id_map).tolist() == [100, 101, 102, 1, 2]
    assert np.array_equal(grown.index.reconstruct_n(0, 3), stored)
    np.testing.assert_allclose(grown.index.reconstruct_n(3, 2), load_backbone(ref).encode_text(["a new caption", "another one"]).numpy(), atol=1e-6)
    with pytest.raises(InputError, match="Id 1 is already in the faiss index"):
        (tmp_path / "other.txt").write_text("clashing line one\n")
        run(["--model", ref, "--source", str(tmp_path / "other.txt"), "--modality", "text",
             "--append_to", str(tmp_path / "prod.faiss"), "--output_dir", str(tmp_path / "other"), *FAST])


# ----------------------------------------------------------------------------- errors

def test_input_errors_are_one_input_error_each(tiny_refs, adapter, tmp_path):
    folder, old_ref = adapter
    write_images(tmp_path / "images", ["a.png", "b.png"])
    write_images(tmp_path / "more", ["a.png", "c.png"], seed=2)
    gallery = embed("--model", tiny_refs["open_clip"], "--source", str(tmp_path / "images"), "--modality", "image",
                    "--output_dir", str(tmp_path / "gallery"))
    old_gallery = embed("--model", old_ref, "--source", str(tmp_path / "images"), "--modality", "image",
                        "--output_dir", str(tmp_path / "old_gallery"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"broken")
    write_images(tmp_path / "bad", ["y.png"])
    base = ["--modality", "image", "--output_dir", str(tmp_path / "o")]
    space = load_backbone(tiny_refs["open_clip"]).space_id
    cases = [  # (arguments, message pattern)
        (["--model", old_ref, "--source", str(tmp_path / "missing"), *base], "does not exist"),
        (["--model", old_ref, "--source", str(tmp_path / "images"), "--modality", "audio", "--output_dir", "o"],
         "--modality 'audio' is not supported"),
        (["--model", f"xbt:{folder}", "--source", str(tmp_path / "images"), "--modality", "image",
          "--append_to", str(gallery)], f"space {space} is expected"),
        (["--model", f"xbt:{folder}", "--source", str(tmp_path / "more"), "--modality", "image",
          "--append_to", str(old_gallery)], "Id 'a.png' .* is already in the gallery"),
        (["--model", old_ref, "--source", str(tmp_path / "bad"), *base], "1 of 2 items are unusable"),
        (["--model", tiny_refs["open_clip"], "--source", str(tmp_path / "more"), "--modality", "image",
          "--output_dir", str(gallery)], "already holds other embeddings"),
    ]
    for arguments, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            run([*arguments, *FAST])
    with pytest.raises(InputError, match=XBTModel.from_pretrained(folder).space_id):  # both space ids are named
        run(cases[2][0] + FAST)


# ----------------------------------------------------------------------------- processes

def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _script(*args: str) -> list[str]:
    return [str(ROOT / "scripts" / "embed.py"), *args, "--progress", "false"]


@pytest.mark.slow
def test_two_processes_write_what_one_writes(tiny_refs, tmp_path):
    write_images(tmp_path / "images", [f"{i:03d}.png" for i in range(30)])
    (tmp_path / "images" / "bad.png").write_bytes(b"broken")
    args = ["--model", tiny_refs["hf"], "--source", str(tmp_path / "images"), "--modality", "image",
            "--shard_size", "4", "--per_device_batch_size", "3", "--num_workers", "1", "--max_bad_fraction", "0.05",
            "--faiss_index", "true"]
    single = subprocess.run([sys.executable, *_script(*args, "--output_dir", str(tmp_path / "one"))], env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = subprocess.run([*launch, *_script(*args, "--output_dir", str(tmp_path / "two"))],
                            env={**_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = manifest_of(tmp_path / "one"), manifest_of(tmp_path / "two")
    ranks = two["runs"][-1]["ranks"]
    assert two["runs"][-1]["processes"] == 2 and len({r["pid"] for r in ranks}) == 2
    assert sorted(s for r in ranks for s in r["encoded_shards"]) == list(range(8)) and all(r["encoded_shards"] for r in ranks)
    files = sorted(p.name for p in (tmp_path / "one").iterdir() if p.name != MANIFEST_FILE)
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir() if p.name != MANIFEST_FILE)
    # ids, order and layout exactly; vectors to float32 rounding (a batch of one item, here the last of
    # each 4-item shard, can differ by 1 ulp between a plain and a launched process on CPU)
    vectors = {run: read_embeddings_dir(tmp_path / run) for run in ("one", "two")}
    assert vectors["one"][1] == vectors["two"][1] and len(vectors["one"][1]) == 30
    np.testing.assert_allclose(vectors["two"][0], vectors["one"][0], rtol=0, atol=1e-6)
    assert (tmp_path / "one" / INDEX_IDS_FILE).read_text() == (tmp_path / "two" / INDEX_IDS_FILE).read_text()
    indexes = {run: faiss.read_index(str(tmp_path / run / INDEX_FILE)) for run in ("one", "two")}
    assert indexes["one"].ntotal == indexes["two"].ntotal == 30
    np.testing.assert_array_equal(faiss.vector_to_array(indexes["one"].id_map),
                                  faiss.vector_to_array(indexes["two"].id_map))
    np.testing.assert_allclose(indexes["two"].index.reconstruct_n(0, 30), vectors["one"][0], rtol=0, atol=1e-6)
    assert {k: v for k, v in one.items() if k != "runs"} == {k: v for k, v in two.items() if k != "runs"}


@pytest.mark.slow
def test_kill_minus_9_then_rerun_gives_the_same_output_encoding_only_missing_shards(tiny_refs, tmp_path):
    write_images(tmp_path / "images", [f"{i:03d}.png" for i in range(400)])
    args = ["--model", tiny_refs["hf"], "--source", str(tmp_path / "images"), "--modality", "image",
            "--shard_size", "8", "--per_device_batch_size", "4", "--num_workers", "0"]
    straight = subprocess.run([sys.executable, *_script(*args, "--output_dir", str(tmp_path / "straight"))],
                              env=_env(), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, *_script(*args, "--output_dir", str(out))], env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("shard-*.safetensors")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.safetensors")}
    assert written and len(written) < 50 and not (out / MANIFEST_FILE).exists()  # it died mid-way

    resumed = subprocess.run([sys.executable, *_script(*args, "--output_dir", str(out))], env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = manifest_of(out)["runs"][-1]
    reused = sorted(int(name[6:11]) for name in written)
    assert record["reused_shards"] == reused and sorted(record["encoded_shards"] + reused) == list(range(50))
    for name, (inode, mtime) in written.items():  # complete shards were not written again
        assert (out / name).stat().st_ino == inode and (out / name).stat().st_mtime_ns == mtime
    for path in (tmp_path / "straight").glob("shard-*"):
        assert (out / path.name).read_bytes() == path.read_bytes()
    one, two = manifest_of(tmp_path / "straight"), manifest_of(out)
    assert {k: v for k, v in one.items() if k != "runs"} == {k: v for k, v in two.items() if k != "runs"}

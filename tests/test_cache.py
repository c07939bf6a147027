"""Embedding cache with tiny real models of both backends: exact round trip, keying, atomic resumable writes."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xbt.cache import EmbeddingCache, EmbeddingSource, build_cache, cache_key, text_source
from xbt.data.captions import texts_fingerprint
from xbt.errors import FingerprintMismatchError, InputError

from helpers import captions

REPO = Path(__file__).resolve().parents[1]


def counting(source: EmbeddingSource, calls: list) -> EmbeddingSource:
    def encode(items):
        calls.append(len(items))
        return source.encode(items)

    return EmbeddingSource(source.name, source.fingerprint, source.dim, encode, source.space_id)


@pytest.fixture(scope="module")
def sources(tiny_encoders):
    return [text_source("old", tiny_encoders["open_clip"], batch_size=32),
            text_source("new", tiny_encoders["hf"], batch_size=32)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_is_exact(tmp_path, tiny_encoders, sources, dtype):
    texts = captions(150)
    cache = build_cache(tmp_path, sources, texts, dtype=dtype, shard_size=64, progress=False)
    assert cache.count == 150 and cache.dims == {"old": 32, "new": 32} and len(cache.manifest["shards"]) == 3
    for name, backend in (("old", "open_clip"), ("new", "hf")):
        direct = torch.cat([tiny_encoders[backend].encode_text(texts[i:i + 32]) for i in range(0, 150, 32)])
        stored = cache[name].numpy()
        assert stored.dtype == np.dtype(dtype)
        assert np.array_equal(stored, direct.numpy().astype(dtype))
        rows = np.array([149, 0, 64, 63, 64, 5])  # across shards, unsorted, repeated
        assert np.array_equal(cache[name][rows], stored[rows])
        assert torch.equal(cache.tensor(name, rows), torch.from_numpy(stored[rows].astype(np.float32)))
    shard = cache["old"].shards[0]  # a read-only view of the mapped file, not a copy
    assert not shard.flags.owndata and not shard.flags.writeable and isinstance(shard.base.base.obj, mmap.mmap)
    assert cache.fingerprints["old"] == tiny_encoders["open_clip"].fingerprint + ":text"
    assert cache.items_fingerprint == texts_fingerprint(texts)


def test_complete_cache_is_reused_without_encoding(tmp_path, sources):
    texts = captions(40)
    first = build_cache(tmp_path, sources, texts, shard_size=16, progress=False, metadata={"corpus": "x"})
    calls: list = []
    again = build_cache(tmp_path, [counting(s, calls) for s in sources], texts, shard_size=16, progress=False)
    assert calls == [] and again.path == first.path and again.metadata == {"corpus": "x"}
    assert EmbeddingCache.find(tmp_path, sources, texts_fingerprint(texts)).path == first.path


def test_the_manifest_records_each_sources_space_and_refuses_another(tmp_path, tiny_encoders, sources):
    texts = captions(20)
    cache = build_cache(tmp_path, sources, texts, shard_size=16, progress=False)
    assert cache.space_ids == {"old": tiny_encoders["open_clip"].space_id, "new": tiny_encoders["hf"].space_id}
    assert json.loads((cache.path / "manifest.json").read_text())["sources"]["old"]["space_id"] == cache.space_ids["old"]
    moved = EmbeddingSource("old", sources[0].fingerprint, sources[0].dim, sources[0].encode, "another-space")
    with pytest.raises(FingerprintMismatchError, match="another-space") as refused:
        EmbeddingCache.open(cache.path, [moved])
    assert cache.space_ids["old"] in str(refused.value)
    # The space id is part of the key: vectors of another space never share a cache directory.
    assert cache_key([moved, sources[1]], texts_fingerprint(texts), "float16") != cache.path.name


def test_changed_model_or_corpus_is_never_reused(tmp_path, tiny_refs, sources):
    from xbt import load_backbone
    from xbt.demo.models import TinyClipConfig, build_open_clip

    texts = captions(40)
    cache = build_cache(tmp_path, sources, texts, shard_size=16, progress=False)
    other_old = load_backbone(build_open_clip(tmp_path / "other_old", TinyClipConfig(seed=1)))
    changed = [text_source("old", other_old), sources[1]]
    assert changed[0].fingerprint != sources[0].fingerprint
    assert EmbeddingCache.find(tmp_path, changed, texts_fingerprint(texts)) is None
    assert EmbeddingCache.find(tmp_path, sources, texts_fingerprint(texts[:-1] + ["a new caption"])) is None
    assert EmbeddingCache.find(tmp_path, sources, texts_fingerprint(texts), dtype="float32") is None
    with pytest.raises(FingerprintMismatchError, match="the model changed"):
        EmbeddingCache.open(cache.path, changed)
    with pytest.raises(FingerprintMismatchError, match="the corpus changed"):
        EmbeddingCache.open(cache.path, sources, texts_fingerprint(texts + ["one more"]))
    with pytest.raises(FingerprintMismatchError, match="no embeddings named 'xbt'"):
        EmbeddingCache.open(cache.path, {"xbt": "anything"})
    rebuilt = build_cache(tmp_path, changed, texts, shard_size=16, progress=False)
    assert rebuilt.path != cache.path
    assert not np.array_equal(rebuilt["old"].numpy(), cache["old"].numpy())


def test_half_written_and_foreign_shards_are_never_read(tmp_path, sources):
    texts = captions(48)
    reference = build_cache(tmp_path / "reference", sources, texts, shard_size=16, progress=False)
    root = tmp_path / "interrupted"
    folder = root / cache_key(sources, texts_fingerprint(texts), "float16")
    # what a killed writer can leave: a temporary file, and a stray complete-looking file of another build
    folder.mkdir(parents=True)
    (folder / ".shard-00000.safetensors.tmp").write_bytes(b"\x00" * 100)
    (folder / "shard-00001.safetensors").write_bytes((reference.path / "shard-00000.safetensors").read_bytes())
    with pytest.raises(InputError, match="not a complete embedding cache"):
        EmbeddingCache(folder)
    calls: list = []
    cache = build_cache(root, [counting(s, calls) for s in sources], texts, shard_size=16, progress=False)
    assert calls == [16] * 6  # all three shards encoded by both sources: nothing was trusted
    for name in ("old", "new"):
        assert np.array_equal(cache[name].numpy(), reference[name].numpy())
    assert not list(folder.glob("*.tmp"))


def test_bad_inputs(tmp_path, sources):
    with pytest.raises(InputError, match="empty"):
        build_cache(tmp_path, sources, [], progress=False)
    with pytest.raises(InputError, match="distinct names"):
        build_cache(tmp_path, [sources[0], sources[0]], ["a"], progress=False)
    with pytest.raises(InputError, match="items_fingerprint"):
        build_cache(tmp_path, sources, [1, 2, 3], progress=False)
    broken = EmbeddingSource("old", "broken", 32, lambda items: torch.zeros(len(items), 8))
    with pytest.raises(InputError, match="expected"):
        build_cache(tmp_path, [broken], ["a", "b"], progress=False)


# A writer run as a real separate process (the test harness, not production code): builds the cache of
# the tiny old/new models over generated captions, alone or under `accelerate launch`.
WRITER = textwrap.dedent("""
    import json, sys
    from accelerate import Accelerator
    from xbt import load_backbone
    from xbt.cache import build_cache, text_source
    sys.path.insert(0, {tests!r})
    from helpers import captions

    old_ref, new_ref, root, count, shard_size = sys.argv[1:6]
    state = Accelerator()
    sources = [text_source("old", load_backbone(old_ref), 32), text_source("new", load_backbone(new_ref), 32)]
    cache = build_cache(root, sources, captions(int(count)), shard_size=int(shard_size), process=state,
                        progress=False)
    if state.is_main_process:
        print(json.dumps({{"processes": state.num_processes, "path": str(cache.path)}}))
""")


def writer_command(tmp_path, tiny_refs, root, count, shard_size, launcher=()):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(REPO / "tests")))
    return [*launcher, str(script), tiny_refs["open_clip"], tiny_refs["hf"], str(root), str(count), str(shard_size)]


def environment():
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_kill_during_writing_then_resume_matches_uninterrupted(tmp_path, tiny_refs, sources):
    count, shard_size = 1200, 40
    texts = captions(count)
    root = tmp_path / "killed"
    folder = root / cache_key(sources, texts_fingerprint(texts), "float16")
    process = subprocess.Popen([sys.executable, *writer_command(tmp_path, tiny_refs, root, count, shard_size)],
                               env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(folder.glob("shard-*.safetensors"))) < 3:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(list(folder.glob("shard-*.safetensors")))
    assert not (folder / "manifest.json").exists() and written < count // shard_size

    calls: list = []
    resumed = build_cache(root, [counting(s, calls) for s in sources], texts, shard_size=shard_size, progress=False)
    assert sum(calls) == 2 * (count - written * shard_size)  # only the missing shards were encoded
    uninterrupted = build_cache(tmp_path / "clean", sources, texts, shard_size=shard_size, progress=False)
    for name in ("old", "new"):
        assert np.array_equal(resumed[name].numpy(), uninterrupted[name].numpy())


@pytest.mark.slow
def test_two_processes_split_the_encoding(tmp_path, tiny_refs, sources):
    count, shard_size = 200, 32
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = writer_command(tmp_path, tiny_refs, tmp_path / "two", count, shard_size, launcher)
    result = subprocess.run([sys.executable, *command], env={**environment(), "ACCELERATE_USE_CPU": "true"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["processes"] == 2
    split = EmbeddingCache(report["path"])
    single = build_cache(tmp_path / "one", sources, captions(count), shard_size=shard_size, progress=False)
    assert len(split.manifest["shards"]) == 7
    for name in ("old", "new"):
        assert np.array_equal(split[name].numpy(), single[name].numpy())

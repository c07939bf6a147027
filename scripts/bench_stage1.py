"""Stage-1 benchmark: what the embedding cache buys, measured side by side in one run.

1. Cache write throughput (captions/s, both text encoders) on a generated corpus.
2. One epoch of stage 1 reading the cache versus the same epoch (same batches, same ψ,
   same optimizer) re-encoding every batch's captions with both text encoders.
3. Peak memory of ``xbt pretrain-text --cache_path`` (a subprocess) training one epoch
   from a memory-mapped cache several times larger than the private memory the
   process is allowed (``RLIMIT_DATA``; file-backed mappings do not count against it,
   anonymous allocations do). Random batches over all rows touch pages across the
   whole file; ``--big_steps`` caps the steps and ``--init random`` skips the ridge
   fit (a full streamed pass) so the run stays short on a small CPU.
   The shards are dropped from the page cache first (a cold start). Reported: cache
   size, the limit, peak RSS (VmHWM) and its anonymous and file-backed parts
   (file-backed pages are page cache the kernel can drop).

    python scripts/bench_stage1.py --sizes tiny:2048,base:512 --output runs/bench_stage1

``tiny`` is the test-sized CLIP (width 64, 2 layers); ``base`` has a ViT-B/32-sized text
tower (width 512, 12 layers, 77 tokens, 512-d embeddings), random weights; the number
after the colon is the corpus size for that model size (a base-sized text tower encodes
only a few captions per second on a small CPU). Nothing is downloaded. Results go to
OUTPUT/bench_stage1.json and are printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from xbt.backbones import load_backbone
from xbt.cache import EmbeddingSource, build_cache, text_source
from xbt.demo.models import TinyClipConfig, build_hf_clip, build_open_clip
from xbt.losses import TEXT_LOSSES, Temperature
from xbt.train.text_stage import PairedVectors
from xbt.projection import Projection
from xbt.train.text_stage import epoch_batches

SIZES = {
    "tiny": TinyClipConfig(),
    "base": TinyClipConfig(embed_dim=512, width=512, layers=12, heads=8, context_length=77, image_size=32,
                           patch_size=8),
}
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "grey", "pink"]
THINGS = ["dog", "cat", "car", "bicycle", "house", "tree", "boat", "bird", "horse", "chair", "cup", "lamp"]
PLACES = ["on the beach", "in a park", "on a busy street", "next to a river", "in the snow", "inside a kitchen",
          "under a bridge", "at night", "in a field of flowers", "near the mountains"]


def generated_captions(count: int, seed: int = 0) -> list[str]:
    """Distinct, varied-length captions from a small grammar."""
    rng = np.random.default_rng(seed)
    captions = set()
    while len(captions) < count:
        words = [f"a {rng.choice(COLOURS)} {rng.choice(THINGS)} {rng.choice(PLACES)}"]
        words += [f"with a {rng.choice(COLOURS)} {rng.choice(THINGS)}" for _ in range(rng.integers(0, 4))]
        captions.add(" ".join(words) + f" photo {rng.integers(10_000)}")
    return sorted(captions)


def one_epoch(batches: np.ndarray, dims: tuple[int, int], fetch) -> float:
    """Seconds for one epoch of stage-1 training steps; ``fetch(rows) -> (new, old)`` supplies each batch."""
    torch.manual_seed(0)
    projection, temperature = Projection(*dims, kind="mlp"), Temperature()
    optimizer = torch.optim.AdamW([*projection.parameters(), *temperature.parameters()], lr=1e-3)

    def train_step(rows):
        new, old = fetch(np.sort(rows))
        loss = TEXT_LOSSES["infonce"].compute(PairedVectors(projection(new), old), temperature())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step(batches[0])  # warm-up (lazy initialisation), not timed
    started = time.perf_counter()
    for rows in batches:
        train_step(rows)
    return time.perf_counter() - started


def cache_versus_encoding(size: str, captions: list[str], work: Path, batch_size: int) -> dict:
    config = SIZES[size]
    old = load_backbone(build_open_clip(work / size / "old", config))
    new = load_backbone(build_hf_clip(work / size / "new", TinyClipConfig(**{**config.__dict__, "seed": 1})))
    sources = [text_source("old", old, batch_size), text_source("new", new, batch_size)]

    started = time.perf_counter()
    cache = build_cache(work / size / "cache", sources, captions, shard_size=512, progress=True)
    write_seconds = time.perf_counter() - started

    batches = epoch_batches(np.arange(len(captions)), batch_size, seed=0, epoch=0)
    dims = (new.embed_dim, old.embed_dim)
    from_cache = one_epoch(batches, dims, lambda rows: (cache.tensor("new", rows), cache.tensor("old", rows)))
    re_encoding = one_epoch(batches, dims, lambda rows: (
        new.encode_text([captions[i] for i in rows], batch_size=batch_size, progress=False),
        old.encode_text([captions[i] for i in rows], batch_size=batch_size, progress=False)))
    return {
        "size": size, "text_width": config.width, "text_layers": config.layers, "context": config.context_length,
        "embed_dim": config.embed_dim, "captions": len(captions), "batch_size": batch_size,
        "cache_write_seconds": round(write_seconds, 2),
        "cache_write_captions_per_s": round(len(captions) / write_seconds, 1),
        "epoch_from_cache_seconds": round(from_cache, 3), "epoch_re_encoding_seconds": round(re_encoding, 2),
        "speedup": round(re_encoding / from_cache, 1),
    }


def synthetic_source(name: str, dim: int, seed: int) -> EmbeddingSource:
    """Random normalised vectors standing in for an encoder (row i is the same on every call)."""

    def encode(items):
        rows = torch.tensor([int(item) for item in items])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(rows[0]))
        return torch.nn.functional.normalize(torch.randn(len(rows), dim, generator=generator), dim=-1)

    return EmbeddingSource(name, f"synthetic-{name}-{seed}", dim, encode)


def memory_while_training(work: Path, rows: int, dim: int, limit_gib: float, batch_size: int, steps: int) -> dict:
    """Train from a memory-mapped cache of ``rows`` rows in a subprocess with limited private memory."""
    started = time.perf_counter()
    cache = build_cache(work / f"big-{rows}", [synthetic_source("new", dim, 1), synthetic_source("old", dim, 2)],
                        [str(i) for i in range(rows)], items_fingerprint=f"synthetic-rows-{rows}", shard_size=65536)
    write_seconds = time.perf_counter() - started
    shards = list(cache.path.glob("shard-*.safetensors"))
    cache_bytes = sum(p.stat().st_size for p in shards)
    for shard in shards:  # start cold: drop the just-written shards from the page cache
        descriptor = os.open(shard, os.O_RDONLY)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(descriptor)
    limit = int(limit_gib * 2**30)
    command = [sys.executable, "-m", "xbt", "pretrain-text", "--cache_path", str(cache.path),
               "--output_dir", str(work / f"big_run-{rows}"), "--epochs", "1", "--max_steps", str(steps),
               "--batch_size", str(batch_size), "--kind", "linear", "--init", "random",
               "--validation_size", "2000", "--baselines", "", "--save_steps", "0", "--cpu"]

    def limit_private_memory():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    process = subprocess.Popen(command, preexec_fn=limit_private_memory, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0, "VmData": 0}

    def sample():
        status = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
            except (FileNotFoundError, ProcessLookupError, ValueError):
                break
            for key in peaks:
                if key in fields:
                    peaks[key] = max(peaks[key], int(fields[key].split()[0]) * 1024)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    train_started = time.perf_counter()
    _, stderr = process.communicate()
    train_seconds = time.perf_counter() - train_started
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"training from the big cache failed:\n{stderr[-3000:]}")
    summary = json.loads((work / f"big_run-{rows}" / "training_summary.json").read_text())
    gib = 2**30
    return {
        "rows": rows, "dim": dim, "train_batch_size": batch_size, "dtype": "float16", "cache_gib": round(cache_bytes / gib, 2),
        "synthetic_write_seconds": round(write_seconds, 1),
        "private_memory_limit_gib": limit_gib, "cache_to_limit_ratio": round(cache_bytes / limit, 2),
        "peak_rss_gib": round(peaks["VmHWM"] / gib, 3), "peak_rss_anon_gib": round(peaks["RssAnon"] / gib, 3),
        "peak_rss_file_gib": round(peaks["RssFile"] / gib, 3), "peak_vm_data_gib": round(peaks["VmData"] / gib, 3),
        "train_steps": summary["steps"],
        "train_wall_seconds": round(train_seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny:2048,base:512",
                        help="comma-separated SIZE:CAPTIONS (sizes: tiny, base) for the cache-vs-encode epochs")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--big_rows", type=int, default=3_000_000, help="rows of the big memory-mapped cache")
    parser.add_argument("--big_dim", type=int, default=512)
    parser.add_argument("--memory_limit_gib", type=float, default=1.5, help="RLIMIT_DATA of the training process")
    parser.add_argument("--big_steps", type=int, default=300, help="training steps (batch 1024) on the big cache")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (oversubscribed cores distort timings)")
    parser.add_argument("--output", default="runs/bench_stage1")
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("xbt").setLevel(logging.INFO)
    torch.set_num_threads(options.threads)

    work = Path(options.output)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpu_threads": torch.get_num_threads(), "load_average": list(os.getloadavg())},
               "cache_vs_encoding": []}
    for item in filter(None, options.sizes.split(",")):
        size, count = item.split(":")
        results["cache_vs_encoding"].append(
            cache_versus_encoding(size, generated_captions(int(count)), work, options.batch_size))
    if options.big_rows:  # the same training from a cache 10x smaller, then from the big one
        results["memory"] = [memory_while_training(work, rows, options.big_dim, options.memory_limit_gib, 1024,
                                                   options.big_steps)
                             for rows in (options.big_rows // 10, options.big_rows)]
    (work / "bench_stage1.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

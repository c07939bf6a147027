"""Benchmark of the evaluation's moving parts, measured side by side in one run.

1. faiss exact search (xbt.retrieval.search, with its deterministic tie handling) versus torch
   matmul + topk (whole and chunked) on the same 100k × 512 gallery with 1k queries, top 10:
   wall time and whether the results are identical. Also an IVF index and its recall loss.
2. Encode throughput per space (tiny old and new models, a projection baseline on cached
   new embeddings) on generated images and captions.
3. Peak memory of a 1M × 512 gallery stored as .npy and searched memory-mapped in shards,
   next to the 2 GB the gallery takes in memory (measured in a fresh subprocess).

    PYTHONPATH=. python scripts/bench_retrieval.py --output runs/bench_retrieval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch


def _best_of(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def clustered(count: int, dim: int, seed: int, centres: int = 1000) -> np.ndarray:
    """Unit vectors around random centres (denser than uniform noise, like real embeddings)."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, dim)).astype(np.float32)
    vectors = middle[rng.integers(0, centres, count)] + 0.7 * rng.normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def search_speed(gallery_size: int, queries_count: int, dim: int, k: int, repeats: int) -> dict:
    from xbt.retrieval import SearchConfig, search

    gallery = clustered(gallery_size, dim, 0)
    queries = clustered(queries_count, dim, 1)
    gallery_t, queries_t = torch.from_numpy(gallery), torch.from_numpy(queries)

    def torch_whole():
        return torch.topk(queries_t @ gallery_t.T, k, dim=1)

    def torch_chunked(chunk: int = 16384):
        best_scores, best_rows = None, None
        for start in range(0, gallery_size, chunk):
            scores, rows = torch.topk(queries_t @ gallery_t[start:start + chunk].T, k, dim=1)
            rows = rows + start
            if best_scores is not None:
                scores, order = torch.topk(torch.cat([best_scores, scores], 1), k, dim=1)
                rows = torch.gather(torch.cat([best_rows, rows], 1), 1, order)
            best_scores, best_rows = scores, rows
        return best_scores, best_rows

    import faiss

    faiss_seconds, exact = _best_of(lambda: search(queries, gallery, k), repeats)
    flat = faiss.IndexFlatIP(dim)
    flat.add(gallery)
    raw_seconds, _ = _best_of(lambda: flat.search(queries, k), repeats)  # search() adds ties, sharding, checks
    whole_seconds, (whole_scores, whole_rows) = _best_of(torch_whole, repeats)
    chunked_seconds, (_, chunked_rows) = _best_of(torch_chunked, repeats)
    ivf = SearchConfig("IVF1024,Flat", "nprobe=16")
    start = time.perf_counter()
    approximate = search(queries, gallery, k, ivf)
    ivf_seconds = time.perf_counter() - start
    truth = exact.rows[:, 0]  # recall loss of IVF, with the exact nearest neighbour as the relevant item
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact.rows, approximate.rows)]))
    nearest_found = float(np.mean(np.any(approximate.rows == truth[:, None], axis=1)))
    return {
        "gallery": [gallery_size, dim], "queries": queries_count, "k": k, "threads": torch.get_num_threads(),
        "faiss_exact_s": faiss_seconds, "faiss_raw_index_search_s": raw_seconds, "torch_matmul_topk_s": whole_seconds, "torch_chunked_topk_s": chunked_seconds,
        "speedup_vs_torch": whole_seconds / faiss_seconds, "speedup_vs_torch_chunked": chunked_seconds / faiss_seconds,
        "identical_rows_torch": bool(np.array_equal(exact.rows, whole_rows.numpy())),
        "identical_rows_torch_chunked": bool(np.array_equal(exact.rows, chunked_rows.numpy())),
        "max_score_difference": float(np.abs(exact.scores - whole_scores.numpy()).max()),
        "ivf1024_nprobe16_s_including_training": ivf_seconds,
        "ivf_top10_overlap_with_exact": overlap, "ivf_finds_exact_nearest": nearest_found,
    }


def encode_throughput(count: int, workdir: Path) -> dict:
    from xbt import load_backbone
    from xbt.demo.models import TinyClipConfig, build_hf_clip, build_open_clip
    from xbt.demo.scenes import generate
    from xbt.projection import Projection

    images, caption_lists = generate("shapes", count, seed=0)
    captions = [group[0] for group in caption_lists]  # one caption per image
    folder = workdir / "images"
    folder.mkdir()
    paths = []
    for number, image in enumerate(images):
        paths.append(folder / f"{number:05d}.png")
        image.save(paths[-1])
    encoders = {"old": load_backbone(build_open_clip(workdir / "old", TinyClipConfig(seed=0))),
                "new": load_backbone(build_hf_clip(workdir / "new", TinyClipConfig(width=96, layers=3, embed_dim=48,
                                                                                   seed=1)))}
    projection = Projection(48, 32, kind="mlp").eval()
    try:  # the adapter space needs stage 2
        from xbt.model import XBTModel

        encoders["xbt"] = XBTModel(load_backbone(encoders["new"].reference), projection)
    except ImportError:
        logging.warning("xbt.model (stage 2) is not available: no xbt / xbt+old throughput")
    out = {"items": count}
    new_text = new_image = None
    for name, encoder in encoders.items():
        encoder.encode_text(captions[:8])
        text_s, text = _best_of(lambda: encoder.encode_text(captions), 1)
        out[name] = {"captions_per_s": count / text_s}
        if hasattr(encoder, "encode_image"):
            image_s, image = _best_of(lambda: encoder.encode_image(paths), 1)
            out[name]["images_per_s_from_png"] = count / image_s
        if name == "new":
            new_text, new_image = text, image
    with torch.no_grad():
        seconds, _ = _best_of(lambda: (projection(new_text), projection(new_image)), 3)
    out["baseline_projection_on_cached_new"] = {"vectors_per_s": 2 * count / seconds}
    return out


def _peak_child(path: str, queries_count: int, shard_rows: int, k: int) -> None:
    """Runs in a fresh process: search a memory-mapped gallery in shards, sampling anonymous memory."""
    from xbt.retrieval import SearchConfig, search

    peak = {"anon_kb": 0}

    def anon_kb() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["anon_kb"] = max(peak["anon_kb"], anon_kb())
            time.sleep(0.01)

    gallery = np.load(path, mmap_mode="r")
    queries = clustered(queries_count, gallery.shape[1], 1)
    baseline = anon_kb()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    result = search(queries, gallery, k, SearchConfig(shard_rows=shard_rows))
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    print(json.dumps({"peak_anon_mb_during_search": (peak["anon_kb"] - baseline) / 1024, "search_s": seconds,
                      "gallery_mb": gallery.nbytes / 2**20, "shard_rows": shard_rows,
                      "shard_mb": shard_rows * gallery.shape[1] * 4 / 2**20, "first_rows": result.rows[0, :3].tolist()}))


def sharded_memory(count: int, dim: int, queries_count: int, shard_rows: int, k: int, workdir: Path,
                   threads: int | None) -> dict:
    path = workdir / "gallery.npy"
    gallery = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, dim))
    for start in range(0, count, 100_000):
        gallery[start:start + 100_000] = clustered(min(100_000, count - start), dim, seed=10 + start)
    gallery.flush()
    del gallery
    command = [sys.executable, __file__, "--child", str(path), str(queries_count), str(shard_rows), str(k)]
    output = subprocess.run(command + (["--threads", str(threads)] if threads else []),
                            capture_output=True, text=True, check=True)
    return {"gallery": [count, dim], "queries": queries_count, **json.loads(output.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encode_items", type=int, default=1024)
    parser.add_argument("--big_gallery", type=int, default=1_000_000)
    parser.add_argument("--shard_rows", type=int, default=100_000)
    parser.add_argument("--threads", type=int, help="threads for both faiss and torch (default: all cores)")
    parser.add_argument("--output", help="also write the figures to this JSON file")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.threads:  # the same thread count for both, or the comparison is not fair
        import faiss

        faiss.omp_set_num_threads(options.threads)
        torch.set_num_threads(options.threads)
    if options.child:
        path, queries, shard_rows, k = options.child
        _peak_child(path, int(queries), int(shard_rows), int(k))
        return
    figures = {"search": search_speed(options.gallery, options.queries, options.dim, options.k, options.repeats)}
    print(json.dumps(figures["search"], indent=2), flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        figures["encode"] = encode_throughput(options.encode_items, Path(workdir))
        print(json.dumps(figures["encode"], indent=2), flush=True)
        figures["sharded"] = sharded_memory(options.big_gallery, options.dim, options.queries, options.shard_rows,
                                            options.k, Path(workdir), options.threads)
        print(json.dumps(figures["sharded"], indent=2), flush=True)
    if options.output:
        Path(options.output).parent.mkdir(parents=True, exist_ok=True)
        Path(options.output).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

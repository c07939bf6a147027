"""Encode throughput of tiny models of both backends, side by side in one run.

    python scripts/bench_encode.py [--items 2048] [--repeats 3]

Builds the tiny open_clip and transformers CLIPs of xbt.demo.models (and the demo's
bigger NEW size), then times encode_text / encode_image on the same generated
captions and images. Reports the best of ``--repeats`` runs, as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from xbt import load_backbone
from xbt.demo.models import BUILDERS, TinyClipConfig
from xbt.demo.scenes import generate

SIZES = {"tiny": TinyClipConfig(), "demo-new": TinyClipConfig(width=96, layers=3)}


def best_rate(function, count: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return count / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()

    images, caption_lists = generate("shapes", options.items, seed=0)
    captions = [group[0] for group in caption_lists]  # one caption per image
    results = {"torch_threads": torch.get_num_threads(), "items": options.items, "runs": []}
    with tempfile.TemporaryDirectory() as root:
        for size_name, config in SIZES.items():
            for backend, build in BUILDERS.items():
                encoder = load_backbone(build(Path(root) / f"{backend}-{size_name}", config))
                pixels = encoder.preprocess_images(images)
                encoder.encode_text(captions[:64])  # warm-up
                results["runs"].append({
                    "backend": backend, "size": size_name,
                    "captions_per_s": best_rate(lambda: encoder.encode_text(captions, progress=False),
                                                len(captions), options.repeats),
                    "images_per_s_from_pil": best_rate(lambda: encoder.encode_image(images, progress=False),
                                                       len(images), options.repeats),
                    "images_per_s_preprocessed": best_rate(lambda: encoder.encode_image(pixels, progress=False),
                                                           len(images), options.repeats),
                })
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

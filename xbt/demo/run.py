"""``xbt demo``: the embedded default, end to end on generated data and tiny models.

Nothing is downloaded: the demo builds an OLD model (open_clip) and a NEW model
(transformers), loads both back through model references, encodes generated
captions and images with each, and writes a summary JSON with fingerprints and
encode throughput.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..backbones import DualEncoder, load_backbone
from .models import TinyClipConfig, build_hf_clip, build_open_clip

logger = logging.getLogger(__name__)

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


@dataclass
class DemoConfig:
    output: str = "runs/demo"
    num_items: int = 512
    seed: int = 0


def generated_pairs(count: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """Solid-colour squares on noise, each with a caption naming its colour."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    images, captions = [], []
    for _ in range(count):
        name = names[rng.integers(len(names))]
        canvas = rng.integers(0, 60, (48, 48, 3), dtype=np.uint8)
        top, left = rng.integers(0, 24, size=2)
        canvas[top:top + 24, left:left + 24] = COLOURS[name]
        images.append(Image.fromarray(canvas))
        captions.append(f"a {name} square")
    return images, captions


def _throughput(encoder: DualEncoder, images, captions) -> dict[str, float]:
    encoder.encode_text(captions[:8])  # warm-up
    start = time.perf_counter()
    encoder.encode_text(captions, batch_size=256)
    text_seconds = time.perf_counter() - start
    start = time.perf_counter()
    encoder.encode_image(images, batch_size=128)
    image_seconds = time.perf_counter() - start
    return {"captions_per_s": len(captions) / text_seconds, "images_per_s": len(images) / image_seconds}


def run(config: DemoConfig) -> dict:
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    references = {
        "old": build_open_clip(output / "models" / "old", TinyClipConfig(seed=config.seed)),
        "new": build_hf_clip(output / "models" / "new", TinyClipConfig(width=96, layers=3, seed=config.seed + 1)),
    }
    images, captions = generated_pairs(config.num_items, config.seed)
    summary: dict = {"config": asdict(config), "models": {}}
    for role, reference in references.items():
        encoder = load_backbone(reference)
        summary["models"][role] = {
            "reference": reference,
            "fingerprint": encoder.fingerprint,
            "embed_dim": encoder.embed_dim,
            **_throughput(encoder, images, captions),
        }
        logger.info("%s model %s: %s", role, reference, summary["models"][role])
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xbt demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=DemoConfig.output, help="folder for models and results")
    parser.add_argument("--num-items", type=int, default=DemoConfig.num_items)
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    options = parser.parse_args(argv)
    summary = run(DemoConfig(output=options.output, num_items=options.num_items, seed=options.seed))
    for role, info in summary["models"].items():
        print(f"{role:>4}: {info['reference']}\n      fingerprint {info['fingerprint']}, "
              f"{info['images_per_s']:.0f} images/s, {info['captions_per_s']:.0f} captions/s")
    print(f"summary: {Path(options.output) / 'summary.json'}")
    return 0

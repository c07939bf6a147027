"""``xbt demo``: the embedded default, end to end on generated data and tiny models.

Nothing is downloaded. The demo is a sequence of steps, each cached in the output
folder (a step whose output exists with the same configuration is skipped):

1. data     generated image–caption benchmark: DIR/data/{train,test}/ + corpus.txt
2. old      a small OLD CLIP (open_clip) trained from scratch: DIR/models/old
3. new      a bigger NEW CLIP (transformers) trained longer:   DIR/models/new
4. evaluate old→old and new→new Recall@K on the test split, both directions

and writes DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..backbones import load_backbone
from .pretrain import DEMO, FAST, make_preset, train_model
from .quality import DIRECTIONS, evaluate_model
from .scenes import DOMAINS, read_split, write_benchmark

logger = logging.getLogger(__name__)

PRESETS = {"demo": DEMO, "fast": FAST}


@dataclass
class DemoConfig:
    output: str = "runs/demo"
    domain: str = "shapes"
    preset: str = "demo"
    seed: int = 0


def run(config: DemoConfig) -> dict:
    """Run every step (skipping the cached ones); returns the summary written to ``output/summary.json``."""
    output = Path(config.output)
    preset = make_preset(PRESETS[config.preset], config.domain, config.seed)
    summary: dict = {"config": asdict(config), "seconds": {}, "models": {}, "retrieval": {}}

    def step(name: str, function, *args):
        start = time.perf_counter()
        result = function(*args)
        summary["seconds"][name] = round(time.perf_counter() - start, 1)
        logger.info("step %s done in %.1f s", name, summary["seconds"][name])
        return result

    data = step("data", write_benchmark, output / "data", preset.data)
    references = {
        "old": step("old", train_model, output / "models" / "old", preset.old, data["train"]),
        "new": step("new", train_model, output / "models" / "new", preset.new, data["train"]),
    }
    test_images, test_captions = read_split(data["test"])
    for role, reference in references.items():
        encoder = load_backbone(reference)
        summary["models"][role] = {"reference": reference, "fingerprint": encoder.fingerprint,
                                   "embed_dim": encoder.embed_dim,
                                   "parameters": sum(p.numel() for p in encoder.model.parameters())}
        summary["retrieval"][f"{role}→{role}"] = step(f"evaluate {role}", evaluate_model, encoder, test_images,
                                                      test_captions)
    summary["data"] = {name: str(path) for name, path in data.items()}
    (output / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def _print_summary(summary: dict, output: str) -> None:
    for role, info in summary["models"].items():
        print(f"{role:>4}: {info['reference']}")
        print(f"      {info['parameters']:,} parameters, fingerprint {info['fingerprint']}")
    ks = next(iter(next(iter(summary["retrieval"].values())).values())).keys()
    print("\nRecall@K (%) on the test split:")
    print(f"{'cell':<10}{'direction':<13}" + "".join(f"{'R@' + str(k):>8}" for k in ks))
    for cell, directions in summary["retrieval"].items():
        for direction in DIRECTIONS:
            print(f"{cell:<10}{direction:<13}" + "".join(f"{value:>8.1f}" for value in directions[direction].values()))
    print("\nseconds per step: " + ", ".join(f"{name} {value}" for name, value in summary["seconds"].items()))
    print(f"summary: {Path(output) / 'summary.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xbt demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=DemoConfig.output, help="folder for data, models and results")
    parser.add_argument("--domain", default=DemoConfig.domain, choices=sorted(DOMAINS), help="generated visual domain")
    parser.add_argument("--preset", default=DemoConfig.preset, choices=sorted(PRESETS),
                        help="'demo': full size (a few minutes on 2 cores); 'fast': the test suite's (≈ 20–30 s)")
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is much faster on an oversubscribed machine)")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    summary = run(DemoConfig(output=options.output, domain=options.domain, preset=options.preset, seed=options.seed))
    _print_summary(summary, options.output)
    return 0

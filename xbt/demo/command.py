"""``xbt demo``: the embedded default, end to end on generated data and tiny models.

Nothing is downloaded. The demo is a sequence of steps, each cached in the output
folder (a step whose output exists with the same configuration is skipped):

1. data     generated image–caption benchmark: DIR/data/{train,test}/ + corpus.txt
2. old      a small OLD CLIP (open_clip) trained from scratch: DIR/models/old
3. new      a bigger NEW CLIP (transformers) trained longer:   DIR/models/new
4. evaluate old→old and new→new Recall@K on the test split, both directions
5. gallery  the OLD model's embeddings of the training images: DIR/gallery/ (what a
            deployed service already stores; the old image encoder is not run again)
6. fit      `xbt fit DIR/fit.yaml`: caption cache, stage 1 (ψ from captions), stage 2
            (gallery-aware LoRA on the new model): DIR/xbt/stage2/adapter
7. eval     `xbt eval` of old, new, the adapter (plain and blended with the old text
            encoder), stage-1 ψ and the training-free baselines: DIR/eval/

and writes DIR/summary.json.

This module holds the options and the entry point and imports torch only once the options
are valid (``xbt demo --help`` stays fast); :mod:`xbt.demo.run` runs the steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..config import parse_configs
from .scenes import DOMAINS

PRESET_NAMES = ("demo", "fast")


@dataclass
class DemoConfig:
    """What the demo generates and trains."""

    output: str = field(default="runs/demo", metadata={"help": "folder for data, models and results"})
    domain: str | None = field(default=None, metadata={
        "help": "generated visual domain (default: the preset's, patterns for demo and shapes for fast)",
        "choices": sorted(DOMAINS)})
    preset: str = field(default="demo", metadata={
        "help": "'demo': full size (a few minutes on 2 cores); 'fast': the test suite's (≈ 20–30 s)",
        "choices": PRESET_NAMES})
    seed: int = field(default=0, metadata={"help": "seed of the data, the models and the training"})


@dataclass
class DemoRuntime:
    """How the demo runs (not part of what it makes)."""

    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (default: torch's; 1 is much faster on an oversubscribed machine)"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo (cached steps skipped) and print its summary."""
    config, runtime = parse_configs([DemoConfig, DemoRuntime], argv or [], prog="xbt demo",
                                    description=__doc__)
    import torch

    from .run import print_summary, run

    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    print_summary(run(config), config.output)
    return 0

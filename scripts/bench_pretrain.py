"""Step time of tiny-CLIP pretraining, variants side by side in one run (CPU).

    PYTHONPATH=. python scripts/bench_pretrain.py [--steps 20] [--batch-size 128]

Compares, for both backends at the demo's OLD and NEW sizes:
- the compact token embedding (only the rows the captions use are trained) against
  the full 49,408-row table;
- fp32 against bf16 autocast;
- 1 against 2 intra-op threads.
Variants are interleaved round-robin so that load from other processes hits all alike;
the median step time of each is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from xbt import load_backbone
from xbt.demo.models import BUILDERS, TinyClipConfig
from xbt.demo.pretrain import compact_token_embedding, parameter_groups
from xbt.demo.quality import flatten_captions
from xbt.demo.scenes import generate
from xbt.losses import info_nce

SIZES = {"old": TinyClipConfig(width=64, layers=2, heads=2, context_length=20),
         "new": TinyClipConfig(width=96, layers=3, heads=3, context_length=20)}
VARIANTS = {  # name -> (compact embedding, bf16 autocast, threads)
    "compact fp32 2 threads": (True, False, 2),
    "full-vocab fp32 2 threads": (False, False, 2),
    "compact bf16 2 threads": (True, True, 2),
    "compact fp32 1 thread": (True, False, 1),
}


class Trainer:
    """One model + optimiser for one variant, stepping on fixed prepared data."""

    def __init__(self, reference: str, compact: bool, bf16: bool, threads: int, images, captions, batch_size: int):
        self.encoder = load_backbone(reference)
        self.bf16, self.threads, self.batch_size = bf16, threads, batch_size
        self.pixels = self.encoder.preprocess_images(images)
        flat, _ = flatten_captions([group[:1] for group in captions])
        self.tokens = self.encoder.tokenize(flat)
        model = self.encoder.model.train()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        self.context = compact_token_embedding(model, self.tokens["input_ids"]) if compact else nullcontext()
        self.context.__enter__()
        self.optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3)
        self.times: list[float] = []

    def step(self, index: int) -> None:
        torch.set_num_threads(self.threads)
        batch = torch.arange(index * self.batch_size, (index + 1) * self.batch_size) % len(self.pixels)
        start = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            images = self.encoder.image_features(self.pixels[batch])
            texts = self.encoder.text_features({k: v[batch] for k, v in self.tokens.items()})
            loss = info_nce(F.normalize(images, dim=-1), F.normalize(texts, dim=-1),
                            self.encoder.model.logit_scale.exp())
        self.optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        self.optimizer.step()
        self.times.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    options = parser.parse_args()
    images, captions = generate("shapes", 512, seed=0)
    with tempfile.TemporaryDirectory() as root:
        for backend, build in BUILDERS.items():
            for size, config in SIZES.items():
                reference = build(Path(root) / f"{backend}-{size}", config)
                trainers = {name: Trainer(reference, *flags, images, captions, options.batch_size)
                            for name, flags in VARIANTS.items()}
                for index in range(options.steps + 2):
                    for trainer in trainers.values():
                        trainer.step(index)
                for name, trainer in trainers.items():
                    median = statistics.median(trainer.times[2:]) * 1000  # the first two steps warm up
                    print(f"{backend:>9} {size} (width {config.width}, {config.layers} layers) {name:<26} "
                          f"{median:7.1f} ms/step")


if __name__ == "__main__":
    main()

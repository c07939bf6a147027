"""Stage-2 speed and memory, side by side in one run, for tiny models of both backends.

For each backend as the NEW model (the old one on the other backend):

- stage-2 training steps/s (forward + backward + AdamW on LoRA + ψ, full loss with the
  gallery-aware terms) and the process's peak memory (CUDA: peak allocated);
- encode time of the plain new model, the merged XBTModel and the unmerged one, on the
  same preprocessed images and the same captions, interleaved and repeated; the fastest
  repeat counts (as timeit does: on a shared machine slower repeats measure other
  processes). Target: merged / plain ≤ 1.02.

    PYTHONPATH=. python scripts/bench_stage2.py [--steps 30] [--batch 64] [--encode 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from xbt import load_backbone
from xbt.demo.models import BUILDERS, TinyClipConfig
from xbt.losses import Temperature
from xbt.adapter_config import AdapterConfig
from xbt.model import XBTModel
from xbt.projection import Projection, ProjectionConfig
from xbt.train.config import PairStageConfig
from xbt.train.pair_stage import PairTask
from xbt.train.targets import OldSpaceTargets

CAPTIONS = ["a small red circle on the left", "two large blue squares", "a green triangle above a star",
            "a yellow square in the corner"]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build(root: Path, backend: str, device: torch.device) -> tuple[XBTModel, XBTModel, object]:
    """(unmerged XBTModel, merged XBTModel, plain new backbone) with random LoRA B so adapters do work."""
    old_backend = "hf" if backend == "open_clip" else "open_clip"
    new_ref = BUILDERS[backend](root / backend, TinyClipConfig(seed=0))
    old_ref = BUILDERS[old_backend](root / f"old-{old_backend}", TinyClipConfig(embed_dim=24, width=32, seed=1))
    old = load_backbone(old_ref)
    models = []
    for _ in range(2):
        backbone = load_backbone(new_ref, device=device)
        torch.manual_seed(0)
        projection = Projection.build(backbone.embed_dim, old.embed_dim, ProjectionConfig(),
                                      source_space=backbone.fingerprint, target_space=old.fingerprint)
        model = XBTModel(backbone, projection, AdapterConfig(), old_reference=old_ref).to(device)
        with torch.no_grad():
            for parameter in model.lora_parameters():
                parameter.normal_(0, 0.05)
        models.append(model.eval())
    return models[0], models[1].merge(), load_backbone(new_ref, device=device)


def train_steps_per_second(model: XBTModel, steps: int, batch: int, device: torch.device) -> float:
    old_dim = model.projection.old_dim
    bank = torch.nn.functional.normalize(torch.randn(4096, old_dim), dim=-1).to(device)
    targets = OldSpaceTargets(captions=bank, offsets=torch.arange(4097, device=device), caption_means=bank,
                              images=bank)
    weights = {"new_new": 1.0, "anchor": 0.0, "text_to_old_image": 1.0, "image_to_old_text": 1.0}
    config = PairStageConfig(new_model="", old_model="", projection="", output_dir="")
    task = PairTask(model, weights, Temperature(), targets, config).to(device).train()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4)
    size = model.backbone.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    captions = (CAPTIONS * batch)[:batch]
    batch_dict = {"images": pixels, "captions": captions, "indices": torch.randint(0, 4096, (batch,)),
                  "caption_indices": torch.zeros(batch, dtype=torch.long), "ids": [str(i) for i in range(batch)]}

    def step():
        terms = task(batch_dict, 0)
        loss = sum(weights[name] * value for name, value in terms.items())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_times(candidates: dict[str, object], count: int, repeats: int, device: torch.device) -> dict[str, dict]:
    """Fastest seconds per full pass over ``count`` images and ``count`` captions, candidates interleaved."""
    size = next(iter(candidates.values()))
    size = getattr(size, "image_size", None) or size.backbone.image_size
    pixels = torch.randn(count, 3, size, size)
    texts = (CAPTIONS * count)[:count]
    times: dict[str, dict[str, list[float]]] = {name: {"image": [], "text": []} for name in candidates}
    for repeat in range(repeats + 1):
        for name, model in candidates.items():
            for kind, run in (("image", lambda m=model: m.encode_image(pixels, batch_size=128)),
                              ("text", lambda m=model: m.encode_text(texts, batch_size=256))):
                _sync(device)
                start = time.perf_counter()
                run()
                _sync(device)
                if repeat:  # the first round warms up
                    times[name][kind].append(time.perf_counter() - start)
    return {name: {kind: min(values) for kind, values in kinds.items()}
            for name, kinds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--encode", type=int, default=512, help="images and captions per encode pass")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    options = parser.parse_args()
    device = torch.device("cuda" if options.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if options.device == "auto" else options.device))
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for backend in sorted(BUILDERS):
            unmerged, merged, plain = build(Path(folder), backend, device)
            before = peak_memory_mb(device)
            steps_per_second = train_steps_per_second(unmerged, options.steps, options.batch, device)
            unmerged.eval()
            times = encode_times({"plain new": plain, "merged xbt": merged, "unmerged xbt": unmerged},
                                 options.encode, options.repeats, device)
            base = times["plain new"]
            results[backend] = {
                "train_steps_per_s": steps_per_second, "train_batch": options.batch,
                "peak_memory_mb": peak_memory_mb(device), "peak_memory_before_training_mb": before,
                "encode_s": times,
                "ratio_to_plain": {name: {k: t[k] / base[k] for k in t} for name, t in times.items()},
            }
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, encode {options.encode} items, "
          f"fastest of {options.repeats} interleaved repeats")
    print(f"{'new backend':<12}{'steps/s':>9}{'peak MB':>9}  {'encode':<7}{'plain s':>9}{'merged s':>10}"
          f"{'unmerged s':>12}{'merged/plain':>14}{'unmerged/plain':>16}")
    for backend, r in results.items():
        for kind in ("image", "text"):
            t, q = r["encode_s"], r["ratio_to_plain"]
            print(f"{backend:<12}{r['train_steps_per_s']:>9.1f}{r['peak_memory_mb']:>9.0f}  {kind:<7}"
                  f"{t['plain new'][kind]:>9.4f}{t['merged xbt'][kind]:>10.4f}{t['unmerged xbt'][kind]:>12.4f}"
                  f"{q['merged xbt'][kind]:>14.3f}{q['unmerged xbt'][kind]:>16.3f}")
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Evidence over seeds: the headline cells, the data-efficiency curve, and the controls.

    python scripts/bench_evidence.py --output runs/evidence [--preset fast] [--seeds 0 1 2]
                                     [--fractions 0.05 0.1 0.25 0.5 1.0]

For each seed, on the demo's generated data and tiny OLD/NEW models (``--preset``):

- **headline**: ``xbt fit`` (stage 1 + stage 2, gallery-aware, all training pairs), then
  ``xbt eval``: R@1 of old→old, xbt→old and new→new, and the gap recovered;
- **data efficiency**: stage 2 on the first fraction f of the training pairs, starting from
  stage 1's ψ ("with stage 1") or from a random ψ ("without"): the paper's claim that text-only
  pretraining cuts the pairs needed;
- **controls**: stage 1 alone (ψ on the frozen new model, no LoRA) and stage 2 without any
  old-space term (``new_new`` only: the adapter drifts out of the old space).

Writes ``evidence.json`` (every number), ``evidence.md`` (mean ± standard deviation over the
seeds) and ``data_efficiency.png``. Every run is cached in ``--output`` and skipped when done.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np

from xbt import eval_cli
from xbt.backbones import load_backbone
from xbt.data.config import CacheConfig
from xbt.demo.pretrain import make_preset, train_pair
from xbt.demo.run import PRESETS, XBT_RECIPES, embed_gallery, write_fit_config
from xbt.demo.scenes import METADATA
from xbt.model import XBTModel
from xbt.projection import Projection
from xbt.train import engine
from xbt.train.fit import fit, parse_section, section_types
from xbt.train.pair_stage import train as train_pair_stage

DIRECTIONS = ("text→image", "image→text")


def subset(train: Path, fraction: float, folder: Path) -> Path:
    """The first ``fraction`` of the training images as an image folder (symlinks, the same metadata lines)."""
    lines = (train / METADATA).read_text().splitlines()
    keep = lines[:max(1, round(fraction * len(lines)))]
    folder.mkdir(parents=True, exist_ok=True)
    for line in keep:
        name = json.loads(line)["file_name"]
        if not (folder / name).exists():
            os.symlink((train / name).resolve(), folder / name)
    (folder / METADATA).write_text("\n".join(keep) + "\n")
    return folder


def evaluate(root: Path, pair, adapter: Path, name: str, cache: Path) -> dict:
    """R@1 and gap recovered of ``adapter`` against the old gallery, and R@K of every cell, both directions (cached
    in root/name)."""
    output = root / "eval" / name
    if not (output / "metrics.json").is_file():
        eval_cli.main(["--old_model", pair.old, "--new_model", pair.new, "--adapter", str(adapter),
                       "--eval_set", str(pair.test), "--output_dir", str(output), "--cache_dir", str(cache),
                       "--orderings", "random"])
    cells = json.loads((output / "metrics.json").read_text())["cells"]
    found = {}
    for direction in DIRECTIONS:
        by_name = {c["name"]: c for c in cells if c["direction"] == direction}
        found[direction] = {"old→old": by_name["old→old"]["recall"]["1"], "xbt→old": by_name["xbt→old"]["recall"]["1"],
                            "new→new": by_name["new→new"]["recall"]["1"],
                            "gap": by_name["xbt→old"]["gap_recovered"]["1"],
                            "recall": {name: cell["recall"] for name, cell in by_name.items()}}
    return found


def stage2(root: Path, pair, projection: Path, source: Path, name: str, recipe: dict, seed: int, cache: Path,
           gallery: dict | None, weights: str = "", accelerator=None) -> Path:
    """Stage 2 as the headline's (``recipe``: the preset's XBT_RECIPES), on ``source`` from ``projection``."""
    folder = root / "stage2" / name
    adapter = folder / "adapter"
    if not (adapter / "xbt_config.json").is_file():
        options = dict(old_image_embeddings=str(gallery["embeddings"]), old_image_ids=str(gallery["ids"])) \
            if gallery else {}
        config, data, lora = parse_section(
            "stage2", section_types()["stage2"],
            {**recipe["stage2"], "source": str(source), "seed": seed, "loss_weights": weights, **options},
            {"new_model": pair.new, "old_model": pair.old, "projection": str(projection), "output_dir": str(folder)})
        train_pair_stage(config, data, accelerator, lora, CacheConfig(cache_dir=str(cache)))
    return adapter


def random_projection(root: Path, seed: int) -> Path:
    """A ψ of stage 1's shape with its initial (untrained) weights: stage 2 "without stage 1"."""
    import torch

    folder = root / "psi_random"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(seed)
        stage1 = Projection.from_pretrained(root / "xbt" / "stage1")  # its dims and spaces: no model to load
        Projection(stage1.new_dim, stage1.old_dim, kind=stage1.kind, source_space=stage1.source_space,
                   target_space=stage1.target_space).save_pretrained(folder)
    return folder


def stage1_only(root: Path, pair) -> Path:
    folder = root / "stage1_only"
    if not (folder / "xbt_config.json").is_file():
        XBTModel(load_backbone(pair.new), Projection.from_pretrained(root / "xbt" / "stage1"),
                 old_reference=pair.old).save_pretrained(folder)
    return folder


def one_seed(root: Path, preset_name: str, seed: int, fractions: list[float], accelerator) -> dict:
    preset = make_preset(PRESETS[preset_name], seed=seed)
    pair = train_pair(root, preset, accelerator)
    cache = root / "cache"
    gallery = embed_gallery(root / "gallery", pair.old, load_backbone(pair.old).fingerprint, pair.train)
    recipe = XBT_RECIPES[preset_name]
    adapter = fit(write_fit_config(root, {"old": pair.old, "new": pair.new},
                                   {"train": pair.train, "test": pair.test, "corpus": pair.corpus}, gallery, recipe,
                                   seed),
                  accelerator)
    result = {"headline": evaluate(root, pair, adapter, "headline", cache),
              "stage 1 only": evaluate(root, pair, stage1_only(root, pair), "stage1_only", cache)}
    drift = stage2(root, pair, root / "xbt" / "stage1", pair.train, "no_old_term", recipe, seed, cache, None,
                   "new_new=1,anchor=0", accelerator)
    result["no old-space term"] = evaluate(root, pair, drift, "no_old_term", cache)
    curve = {"with stage 1": {}, "without stage 1": {}}
    for fraction in fractions:
        source = subset(pair.train, fraction, root / "subsets" / f"{fraction:g}")
        # the stored gallery holds every training image; the subset's are found by id
        kept = {json.loads(line)["file_name"] for line in (source / METADATA).read_text().splitlines()}
        ids = gallery["ids"].read_text().split()
        rows = [i for i, name in enumerate(ids) if name in kept]
        part = {"embeddings": root / "subsets" / f"gallery-{fraction:g}.npy",
                "ids": root / "subsets" / f"ids-{fraction:g}.txt"}
        np.save(part["embeddings"], np.load(gallery["embeddings"])[rows])
        part["ids"].write_text("\n".join(ids[i] for i in rows) + "\n")
        for label, projection in (("with stage 1", root / "xbt" / "stage1"),
                                  ("without stage 1", random_projection(root, seed))):
            name = f"{'with' if label == 'with stage 1' else 'without'}-{fraction:g}"
            adapter = stage2(root, pair, projection, source, name, recipe, seed, cache, part, "", accelerator)
            curve[label][fraction] = evaluate(root, pair, adapter, name, cache)
    result["data efficiency"] = curve
    return result


def _stats(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.2f}"


def summarise(results: dict[int, dict], fractions: list[float]) -> str:
    seeds = sorted(results)
    lines = [f"Seeds {seeds}; R@1 (%) and gap recovered at R@1, mean ± sd over seeds.", ""]
    for direction in DIRECTIONS:
        lines += [f"### {direction}", "", "| run | old→old | xbt→old | new→new | gap recovered |", "|---|---|---|---|---|"]
        for run in ("headline", "stage 1 only", "no old-space term"):
            lines.append(f"| {run} | " + " | ".join(_stats([results[s][run][direction][c] for s in seeds])
                                                   for c in ("old→old", "xbt→old", "new→new", "gap")) + " |")
        lines += ["", "| stage-2 pairs | gap, with stage 1 | gap, without stage 1 |", "|---|---|---|"]
        for fraction in fractions:
            lines.append(f"| {fraction:.0%} | " + " | ".join(
                _stats([results[s]["data efficiency"][label][fraction][direction]["gap"] for s in seeds])
                for label in ("with stage 1", "without stage 1")) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[int, dict], fractions: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, direction in zip(axes, DIRECTIONS, strict=True):
        for label, style in (("with stage 1", "-o"), ("without stage 1", "--s")):
            values = np.array([[results[s]["data efficiency"][label][f][direction]["gap"] for f in fractions]
                               for s in sorted(results)], dtype=float)
            axis.errorbar([100 * f for f in fractions], values.mean(0), yerr=values.std(0), fmt=style, capsize=3,
                          label=label)
        axis.set_xscale("log")
        axis.set_xlabel("stage-2 image–text pairs (% of the training set)")
        axis.set_ylabel("gap recovered at R@1")
        axis.set_title(direction)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/evidence")
    parser.add_argument("--preset", default="fast", choices=sorted(PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 1.0])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    output = Path(args.output)
    accelerator = engine.make_accelerator(cpu=True)
    results = {seed: one_seed(output / f"seed{seed}", args.preset, seed, args.fractions, accelerator)
               for seed in args.seeds}
    (output / "evidence.json").write_text(json.dumps({"preset": args.preset, "results": results}, indent=2,
                                                     ensure_ascii=False, default=str))
    (output / "evidence.md").write_text(summarise(results, args.fractions))
    plot(results, args.fractions, output / "data_efficiency.png")
    print((output / "evidence.md").read_text())


if __name__ == "__main__":
    main()

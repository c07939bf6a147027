"""The demo's steps (see :mod:`xbt.demo.command` for what they are and the options)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from .. import eval_cli
from ..backbones import load_backbone
from ..io import atomic_write_text
from ..train import engine
from ..train.config import FitConfig
from ..train.fit import config_from, fit
from ..train.records import digest, run_step
from .command import PRESET_NAMES, DemoConfig
from .pretrain import DEMO, FAST, make_preset, train_model
from .quality import DIRECTIONS, evaluate_model
from .scenes import read_split, write_benchmark

logger = logging.getLogger(__name__)

PRESETS = dict(zip(PRESET_NAMES, (DEMO, FAST), strict=True))
# The XBT recipe per preset: `xbt fit` options of its two stages (stage 2 sees all training pairs). Demo:
# measured over 3 seeds with scripts/bench_recipe.py (README, "What lifts the adapter"): stage 2 was under-trained
# at 800 steps, lr 1e-3, LoRA rank 8; 1600 steps at lr 2e-3 with rank 32 lifts every cell (image→text gap
# recovered 0.32 → ≥ 0.85 on every seed) for about a minute more; loss weights and the temperature changed nothing
# beyond seed spread. The orthogonal ψ, which `xbt export` folds into a plain checkpoint, was as good as the mlp one
# (+0.8 / +1.8 R@1, within spread).
XBT_RECIPES = {"demo": {"stage1": {"epochs": 4, "kind": "orthogonal"},
                        "stage2": {"max_steps": 1600, "learning_rate": 2e-3, "lora_rank": 32, "lora_alpha": 64.0}},
               "fast": {"stage1": {"epochs": 2}, "stage2": {"max_steps": 60, "learning_rate": 5e-4}}}


def run(config: DemoConfig) -> dict:
    """Run every step (skipping the cached ones); returns the summary written to ``output/summary.json``."""
    output = Path(config.output)
    preset = make_preset(PRESETS[config.preset], config.domain, config.seed)
    accelerator = engine.make_accelerator()  # the run's one
    summary: dict = {"config": asdict(config), "seconds": {}, "models": {}, "retrieval": {}}

    def step(name: str, function, *args):
        start = time.perf_counter()
        result = function(*args)
        summary["seconds"][name] = round(time.perf_counter() - start, 1)
        logger.info("step %s done in %.1f s", name, summary["seconds"][name])
        return result

    data = step("data", write_benchmark, output / "data", preset.data)
    references = {
        "old": step("old", train_model, output / "models" / "old", preset.old, data["train"], accelerator),
        "new": step("new", train_model, output / "models" / "new", preset.new, data["train"], accelerator),
    }
    test_images, test_captions = read_split(data["test"])
    for role, reference in references.items():
        encoder = load_backbone(reference)
        summary["models"][role] = {"reference": reference, "fingerprint": encoder.fingerprint,
                                   "embed_dim": encoder.embed_dim,
                                   "parameters": sum(p.numel() for p in encoder.model.parameters())}
        summary["retrieval"][f"{role}→{role}"] = step(f"evaluate {role}", evaluate_model, encoder, test_images,
                                                      test_captions)
    gallery = step("gallery", embed_gallery, output / "gallery", references["old"],
                   summary["models"]["old"]["fingerprint"], data["train"])
    adapter = step("fit", fit, write_fit_config(output, references, data, gallery, XBT_RECIPES[config.preset],
                                                config.seed), accelerator)
    stage1 = adapter.parent.parent / "stage1"
    step("eval", eval_cli.main, ["--old_model", references["old"], "--new_model", references["new"],
                                 "--adapter", str(adapter), "--baselines", f"stage1={stage1}",
                                 *[f"{name}={stage1 / 'baselines' / name}" for name in ("procrustes", "ridge")],
                                 "--eval_set", str(data["test"]), "--output_dir", str(output / "eval")])
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    summary["compatibility"] = {f"{c['direction']} {c['name']}": {"recall": c["recall"], "compatible": c["compatible"],
                                                                  "gap_recovered": c["gap_recovered"]}
                                for c in metrics["cells"] if c["gallery"] == "old"}
    summary["adapter"] = str(adapter)
    summary["report"] = str(output / "eval" / "report.html")
    summary["data"] = {name: str(path) for name, path in data.items()}
    atomic_write_text(output / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def embed_gallery(folder: Path, old_reference: str, old_fingerprint: str, train: Path) -> dict[str, Path]:
    """The old model's image embeddings of the training images, with their ids (file names), once."""
    paths = {"embeddings": folder / "old_images.npy", "ids": folder / "ids.txt"}
    image_paths, _ = read_split(train)
    ids = "\n".join(path.name for path in image_paths) + "\n"

    def embed() -> None:
        np.save(paths["embeddings"], load_backbone(old_reference).encode_image(image_paths).numpy())
        atomic_write_text(paths["ids"], ids)

    folder.mkdir(parents=True, exist_ok=True)
    run_step("stored gallery", folder, {"old": old_fingerprint, "ids": digest(ids)}, embed, done=paths["embeddings"],
             on_change="redo")
    return paths


def write_fit_config(output: Path, references: dict[str, str], data: dict[str, Path], gallery: dict[str, Path],
                     recipe: dict[str, dict], seed: int) -> FitConfig:
    """DIR/fit.yaml, a real `xbt fit` config a user can read and rerun (``recipe``: a preset's XBT_RECIPES)."""
    values = {
        "old_model": references["old"], "new_model": references["new"], "run_dir": str(output / "xbt"),
        "stage1": {"captions": str(data["corpus"]), **recipe["stage1"], "seed": seed},
        "stage2": {"source": str(data["train"]), "old_image_embeddings": str(gallery["embeddings"]),
                   "old_image_ids": str(gallery["ids"]), **recipe["stage2"], "seed": seed},
    }
    path = output / "fit.yaml"
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
    return config_from(path)


def print_summary(summary: dict, output: str) -> None:
    for role, info in summary["models"].items():
        print(f"{role:>4}: {info['reference']}")
        print(f"      {info['parameters']:,} parameters, fingerprint {info['fingerprint']}")
    ks = next(iter(next(iter(summary["retrieval"].values())).values())).keys()
    print("\nRecall@K (%) on the test split:")
    print(f"{'cell':<10}{'direction':<13}" + "".join(f"{'R@' + str(k):>8}" for k in ks))
    for cell, directions in summary["retrieval"].items():
        for direction in DIRECTIONS:
            print(f"{cell:<10}{direction:<13}" + "".join(f"{value:>8.1f}" for value in directions[direction].values()))
    if summary.get("compatibility"):
        print("\nAgainst the OLD gallery (compatible = beats old→old at that K; gap = share of old→new gap recovered):")
        for cell, values in summary["compatibility"].items():
            recall = " ".join(f"R@{k} {v:5.1f}" for k, v in values["recall"].items())
            flags = "" if values["compatible"] is None else "  compatible@K: " + "".join(
                "✓" if ok else "✗" for ok in values["compatible"].values())
            gap = "" if values["gap_recovered"] is None else "  gap@1 " + (
                "–" if values["gap_recovered"]["1"] is None else f"{values['gap_recovered']['1']:.2f}")
            print(f"  {cell:<30}{recall}{flags}{gap}")
        print(f"adapter: {summary['adapter']}")
        print(f"visual report (open in a browser): {summary['report']}")
    print("\nseconds per step: " + ", ".join(f"{name} {value}" for name, value in summary["seconds"].items()))
    print(f"summary: {Path(output) / 'summary.json'}")

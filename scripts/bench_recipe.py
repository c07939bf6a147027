"""What lifts the adapter's cells: variants of the `xbt fit` recipe, side by side over seeds on the demo pair.

    python scripts/bench_recipe.py --output runs/evidence [--seeds 0 1 2] [--variants NAME ...] [--report_only]

Each variant is the demo's `xbt fit` config (stage 1 + gallery-aware stage 2, all training pairs)
as it was before this sweep (:data:`BASE`) with a few options changed (:data:`VARIANTS`); each
runs in its own run folder and is evaluated with `xbt eval` on the test split. The seed's pair, data and stored gallery are
those of ``scripts/bench_evidence.py`` (the same folders: an ``--output`` shared with it
trains nothing twice).

Writes ``recipe.json`` (every R@K) and ``recipe.md``: per variant and direction, xbt→old
R@1/5/10 and the gap recovered at R@1 (mean ± sd over seeds), its paired difference from the
base at R@1, and at how many (seed, K) it beats old→old; and the re-indexed cell (the gallery
re-embedded with the adapter: its full space for a ψ with extra dims, BT²/OCA).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from bench_evidence import DIRECTIONS, evaluate

from xbt.backbones import load_backbone
from xbt.demo.pretrain import make_preset, train_pair
from xbt.demo.run import PRESETS, embed_gallery, write_fit_config
from xbt.train import engine
from xbt.train.fit import fit

PRESET = "demo"
# The demo recipe the sweep started from (XBT_RECIPES["demo"] before it); each variant changes a few of its options.
# Its winner, "lr 2e-3 + LoRA rank 32, 1600 steps, ψ orthogonal", is now XBT_RECIPES["demo"].
BASE = {"stage1": {"epochs": 4}, "stage2": {"max_steps": 800, "learning_rate": 1e-3}}
VARIANTS: dict[str, dict[str, dict]] = {
    "base": {},
    "stage 2 lr 2e-3": {"stage2": {"learning_rate": 2e-3}},
    "stage 2 1600 steps": {"stage2": {"max_steps": 1600}},
    "LoRA rank 32": {"stage2": {"lora_rank": 32, "lora_alpha": 64.0}},
    "LoRA on the text tower only": {"stage2": {"lora_towers": ["text"]}},
    "ψ lr 5e-3": {"stage2": {"projection_learning_rate": 5e-3}},
    "temperature fixed 0.05": {"stage2": {"temperature": 0.05, "learn_temperature": False}},
    "image_to_old_text ×2": {"stage2": {"loss_weights": {"image_to_old_text": 2.0}}},
    "text_to_old_image ×2": {"stage2": {"loss_weights": {"text_to_old_image": 2.0}}},
    "without new_new": {"stage2": {"loss_weights": {"new_new": 0.0}}},
    "with anchor": {"stage2": {"loss_weights": {"anchor": 1.0}}},
    "stage 1 noise 0.1": {"stage1": {"noise_std": 0.1}},
    "lr 2e-3 + LoRA rank 32": {"stage2": {"learning_rate": 2e-3, "lora_rank": 32, "lora_alpha": 64.0}},
    "lr 2e-3 + LoRA rank 32, 1600 steps": {"stage2": {"learning_rate": 2e-3, "lora_rank": 32, "lora_alpha": 64.0,
                                                       "max_steps": 1600}},
    "ψ linear": {"stage1": {"kind": "linear"}},
    "lr 2e-3 + LoRA rank 32, 1600 steps, ψ orthogonal": {"stage1": {"kind": "orthogonal"},
                                                          "stage2": {"learning_rate": 2e-3, "lora_rank": 32,
                                                                     "lora_alpha": 64.0, "max_steps": 1600}},
    "ψ orthogonal, k=0": {"stage1": {"kind": "orthogonal"}},
    "ψ orthogonal, k=32 (BT²/OCA)": {"stage1": {"kind": "orthogonal", "extra_dims": 32}},
}
# the adapter's own space re-indexed: its full space when ψ has extra dims
REINDEXED = ("xbt-full→xbt-full", "xbt→xbt")
KS = ("1", "5", "10")


def variant_folder(root: Path, name: str) -> Path:
    return root / "recipe" / name.replace(" ", "_").replace("/", "-")


def evaluated(root: Path, name: str) -> dict | None:
    """The variant's cells when it has been evaluated already (nothing is loaded), else None."""
    folder = variant_folder(root, name)
    return evaluate(folder, None, None, "eval", None) if (folder / "eval" / "eval" / "metrics.json").is_file() \
        else None


def run_variant(root: Path, pair, gallery: dict, seed: int, name: str, accelerator) -> dict:
    done = evaluated(root, name)
    if done is not None:
        return done
    folder = variant_folder(root, name)
    recipe = {section: {**BASE[section], **VARIANTS[name].get(section, {})} for section in BASE}
    config = write_fit_config(folder, {"old": pair.old, "new": pair.new},
                              {"train": pair.train, "test": pair.test, "corpus": pair.corpus}, gallery, recipe, seed)
    return evaluate(folder, pair, fit(config, accelerator), "eval", root / "cache")


def one_seed(root: Path, seed: int, names: list[str], accelerator) -> dict:
    pair = train_pair(root, make_preset(PRESETS[PRESET], seed=seed), accelerator)
    gallery = embed_gallery(root / "gallery", pair.old, load_backbone(pair.old).fingerprint, pair.train)
    return {name: run_variant(root, pair, gallery, seed, name, accelerator) for name in names}


def finished(root: Path, names: list[str]) -> dict:
    """The variants of one seed already evaluated (nothing is trained)."""
    return {name: cells for name in names if (cells := evaluated(root, name)) is not None}


def _stats(values: list[float], digits: int = 1) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.{digits}f}"


def summarise(results: dict[int, dict], names: list[str]) -> str:
    seeds = sorted(s for s in results if "base" in results[s])
    names = [name for name in names if any(name in results[s] for s in seeds)]
    lines = [f"Seeds {seeds}; mean ± sd over the seeds a variant ran on (n). Δ R@1: paired difference from "
             "`base` (same seed). Beats old→old: (seed, K) cells where xbt→old > old→old, of all.", ""]
    for direction in DIRECTIONS:
        old = [results[s]["base"][direction]["recall"]["old→old"]["1"] for s in seeds]
        new = [results[s]["base"][direction]["recall"]["new→new"]["1"] for s in seeds]
        lines += [f"### {direction} (old→old R@1 {_stats(old)}, new→new R@1 {_stats(new)})", "",
                  "| variant | n | R@1 | R@5 | R@10 | gap recovered @1 | Δ R@1 vs base | beats old→old |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in names:
            ran = [s for s in seeds if name in results[s]]
            cells = [results[s][name][direction] for s in ran]
            recall = [c["recall"]["xbt→old"] for c in cells]
            delta = [c["xbt→old"] - results[s]["base"][direction]["xbt→old"] for c, s in zip(cells, ran)]
            beats = sum(c["recall"]["xbt→old"][k] > c["recall"]["old→old"][k] for c in cells for k in KS)
            lines.append(f"| {name} | {len(ran)} | " + " | ".join(_stats([r[k] for r in recall]) for k in KS)
                         + f" | {_stats([c['gap'] for c in cells], 2)}"
                         + f" | {'–' if name == 'base' else _stats(delta)} | {beats}/{len(cells) * len(KS)} |")
        lines.append("")
    lines += ["### Re-indexed: the gallery re-embedded with the adapter itself (R@1 / R@10)", "",
              "| variant | cell | " + " | ".join(f"{d} R@1 | {d} R@10" for d in DIRECTIONS) + " |",
              "|---|---|" + "---|---|" * len(DIRECTIONS)]
    for name in names:
        ran = [s for s in seeds if name in results[s]]
        cell = next(c for c in REINDEXED if c in results[ran[0]][name][DIRECTIONS[0]]["recall"])
        lines.append(f"| {name} | {cell} | " + " | ".join(
            _stats([results[s][name][d]["recall"][cell][k] for s in ran]) for d in DIRECTIONS for k in ("1", "10"))
            + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/evidence")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing: summarise the (seed, variant) runs already evaluated")
    args = parser.parse_args()
    names = ["base", *(name for name in args.variants if name != "base")]
    logging.basicConfig(level=logging.WARNING)
    output = Path(args.output)
    if args.report_only:
        results = {seed: finished(output / f"seed{seed}", names) for seed in args.seeds}
    else:
        accelerator = engine.make_accelerator(cpu=True)
        results = {seed: one_seed(output / f"seed{seed}", seed, names, accelerator) for seed in args.seeds}
    record = {"preset": PRESET, "base": BASE, "variants": VARIANTS, "results": results}
    (output / "recipe.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    (output / "recipe.md").write_text(summarise(results, names))
    print((output / "recipe.md").read_text())


if __name__ == "__main__":
    main()

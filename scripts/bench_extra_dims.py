"""BT²/OCA extra dims (k > 0) against none (k = 0), over seeds, on the demo's FAST pair.

For each seed and each k: ``xbt fit`` (stage 1 with an orthogonal ψ onto old + k dims, stage 2 with
the stored old gallery; ``full_new`` is on by default when k > 0) and ``xbt eval`` on the test
split. Reported (R@1 and R@10, mean ± standard deviation over seeds, both directions):

- the compatible cell ``xbt→old`` (must not fall beyond the seed spread with k > 0);
- the re-indexed cell: ``xbt-full→xbt-full`` for k > 0 (the adapter's full space), ``xbt→xbt``
  for k = 0 (its only space); ``new→new`` beside it, the native new model.

The trained OLD/NEW pair is shared by all runs (:func:`xbt.demo.pretrain.tiny_pair`, seed 0).

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bench_extra_dims.py [--seeds 0 1 2] [--extra_dims K]
        [--root DIR] [--stage2_steps 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from xbt import eval_cli, load_backbone
from xbt.demo.pretrain import tiny_pair
from xbt.demo.run import embed_gallery
from xbt.train import engine
from xbt.train.fit import config_from, fit

DIRECTIONS = ("text→image", "image→text")
KS = ("1", "10")


def run_one(root: Path, pair, gallery: dict[str, Path], extra_dims: int, full_new: bool, seed: int, steps: int,
            accelerator) -> dict:
    """Fit and evaluate one (k, seed), with the default loss weights or with ``full_new`` switched off; returns R@1
    and R@10 of the compatible, re-indexed and upper-bound cells."""
    folder = root / f"k{extra_dims}{'' if full_new else '-no-full-new'}-seed{seed}"
    values = {
        "old_model": pair.old, "new_model": pair.new, "run_dir": str(folder / "xbt"),
        "stage1": {"captions": str(pair.corpus), "epochs": 2, "seed": seed, "kind": "orthogonal",
                   "extra_dims": extra_dims},
        "stage2": {"source": str(pair.train), "old_image_embeddings": str(gallery["embeddings"]),
                   "old_image_ids": str(gallery["ids"]), "max_steps": steps, "seed": seed,
                   **({} if full_new else {"loss_weights": {"full_new": 0.0}})},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fit.yaml").write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
    adapter = fit(config_from(folder / "fit.yaml"), accelerator)
    eval_cli.main(["--old_model", pair.old, "--new_model", pair.new, "--adapter", str(adapter),
                   "--eval_set", str(pair.test), "--output_dir", str(folder / "eval")])
    cells = {(c["direction"], c["name"]): c["recall"]
             for c in json.loads((folder / "eval" / "metrics.json").read_text())["cells"]}
    reindexed = "xbt-full→xbt-full" if extra_dims else "xbt→xbt"
    return {f"{d} {name} R@{k}": cells[(d, cell)][k] for k in KS for d in DIRECTIONS
            for name, cell in (("xbt→old", "xbt→old"), ("re-indexed", reindexed), ("new→new", "new→new"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--extra_dims", type=int, default=None,
                        help="k > 0 (default: new_dim - old_dim, BT²'s square basis transformation, at least 8)")
    parser.add_argument("--stage2_steps", type=int, default=60, help="stage-2 steps (the demo's fast preset: 60)")
    parser.add_argument("--root", default="/tmp/xbt-bench-extra-dims")
    parser.add_argument("--ablate", action="store_true",
                        help="also run k > 0 with full_new=0: the extra dims untrained (what the term itself adds)")
    args = parser.parse_args()
    root = Path(args.root)
    started = time.perf_counter()
    pair = tiny_pair(root / "pair", domain="shapes", seed=0)
    old, new = load_backbone(pair.old), load_backbone(pair.new)
    extra = args.extra_dims or max(new.embed_dim - old.embed_dim, 8)
    gallery = embed_gallery(root / "gallery", pair.old, old.fingerprint, pair.train)
    print(f"pair ready in {time.perf_counter() - started:.0f} s: old {old.embed_dim}-d, new {new.embed_dim}-d, k={extra}")
    accelerator = engine.make_accelerator(cpu=True)
    runs = {"k=0": (0, True), f"k={extra}": (extra, True)} | (
        {f"k={extra}, full_new=0": (extra, False)} if args.ablate else {})
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for seed in args.seeds:
        for name, (k, full_new) in runs.items():
            began = time.perf_counter()
            results[name].append(run_one(root, pair, gallery, k, full_new, seed, args.stage2_steps, accelerator))
            print(f"{name} seed={seed}: {time.perf_counter() - began:.0f} s  {results[name][-1]}", flush=True)
    print(f"\nRecall (%), mean ± std over seeds {args.seeds}; {time.perf_counter() - started:.0f} s in all")
    print("| cell | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for cell in results["k=0"][0]:
        row = []
        for runs in results.values():
            values = [run[cell] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            row.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        print(f"| {cell} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

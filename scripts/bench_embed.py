"""``xbt embed`` images/s against a bare forward loop of the same merged model, and 2 processes against 1.

    python scripts/bench_embed.py [--images 384] [--per_device_batch_size 32] [--workers 0 1 2] [--rounds 3] [--cpu]

Builds a generated NEW model (transformers CLIP), an OLD one (open_clip) and an adapter
(LoRA + linear ψ) onto the old space; writes ``--images`` PNG files. Then, side by side:

- ``bare``: the merged adapter's ``encode_image`` over preprocessed tensors held in memory
  (decoding and preprocessing not timed), in batches of ``--per_device_batch_size``;
- ``embed``: ``xbt embed --model xbt:ADAPTER`` (merged, as serving runs) in the same process on
  the same files with the same batch size, for each ``--workers`` value (DataLoader decoding
  workers). Its rate is the manifest's ``runs[-1].items_per_second``: the encoding phase
  (reading, decoding, preprocessing, forward, writing shards), without model loading;
- processes: ``scripts/embed.py`` as 1 process and under ``accelerate launch --num_processes 2``
  (CPU processes, the best worker count), with wall times including start-up.

Variants run interleaved for ``--rounds`` rounds and the best of each is reported, so load
from other jobs on the machine hits them alike. Prints one JSON object. On a machine with
few cores, two processes share them with the DataLoader workers, so they are not 2x there.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xbt import load_backbone
from xbt.demo.models import BUILDERS, TinyClipConfig
from xbt.model import XBTModel
from xbt.projection import Projection, ProjectionConfig

ROOT = Path(__file__).resolve().parents[1]
NEW = TinyClipConfig(embed_dim=128, width=256, layers=4, heads=4, image_size=64, patch_size=8, seed=0)
OLD = TinyClipConfig(embed_dim=64, width=64, seed=1)


def build(root: Path, images: int, side: int) -> tuple[Path, Path]:
    """The adapter folder and an image folder of ``images`` PNGs (``side`` pixels, like stored photos)."""
    new_ref, old_ref = BUILDERS["hf"](root / "new", NEW), BUILDERS["open_clip"](root / "old", OLD)
    new, old = load_backbone(new_ref), load_backbone(old_ref)
    torch.manual_seed(0)
    psi = Projection.build(new.dim, old.dim, ProjectionConfig(kind="linear"), source_space=new.space_id,
                           target_space=old.space_id)
    model = XBTModel(new, psi, old_reference=old_ref, old_model_id=old.model_id)
    with torch.no_grad():
        for parameter in model.lora_parameters():
            parameter.normal_(0, 0.02)
    model.save_pretrained(root / "adapter")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(images):
        pixels = rng.integers(0, 255, (side, side, 3)).astype(np.uint8)
        pixels[side // 4: side // 2, side // 4: side // 2] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return root / "adapter", folder


def bare_pass(model: XBTModel, pixels: torch.Tensor, batch_size: int) -> float:
    """Images/s of one pass of the merged model's forward over tensors preprocessed beforehand."""
    start = time.perf_counter()
    for offset in range(0, len(pixels), batch_size):
        model.encode_image(pixels[offset:offset + batch_size], batch_size=batch_size, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(pixels) / (time.perf_counter() - start)


def embed_pass(arguments: list[str], output: Path) -> float:
    """Images/s of one in-process ``xbt embed`` run (the manifest's rate of its encoding phase)."""
    from xbt.embed import run

    with contextlib.redirect_stdout(io.StringIO()):  # run() prints the output folder; stdout is the JSON
        run([*arguments, "--output_dir", str(output), "--progress", "false"])
    return json.loads((output / "manifest.json").read_text())["runs"][-1]["items_per_second"]


def launched_pass(command: list[str], output: Path, env: dict[str, str]) -> dict[str, float]:
    """One ``xbt embed`` run in fresh processes: its encoding rate, process count and wall time."""
    start = time.perf_counter()
    result = subprocess.run([*command, "--output_dir", str(output), "--progress", "false"], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    record = json.loads((output / "manifest.json").read_text())["runs"][-1]
    return {"images_per_s": record["items_per_second"], "processes": record["processes"],
            "wall_s": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--side", type=int, default=160, help="stored image side in pixels")
    parser.add_argument("--per_device_batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to try")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every process (accelerate launch gives each process 1)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with an accelerator")
    options = parser.parse_args()
    device = "cpu" if options.cpu or not torch.cuda.is_available() else "cuda"
    # The same thread count everywhere: on a loaded machine 2 threads can be slower than 1.
    torch.set_num_threads(options.threads)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(options.threads),
           "ACCELERATE_USE_CPU": "true"}  # the process comparison runs on CPU processes everywhere
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        adapter, folder = build(root, options.images, options.side)
        common = ["--model", f"xbt:{adapter}", "--source", str(folder), "--modality", "image",
                  "--per_device_batch_size", str(options.per_device_batch_size), "--shard_size", "128"]
        model = XBTModel.from_pretrained(adapter, device=device).merge()
        pixels = model.backbone.preprocess_images(sorted(folder.glob("*.png")))
        bare_pass(model, pixels[:options.per_device_batch_size], options.per_device_batch_size)  # warm-up
        here = [*common, *(["--cpu", "true"] if device == "cpu" else [])]
        script = [sys.executable, str(ROOT / "scripts" / "embed.py"), *common, "--cpu", "true"]
        launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  str(ROOT / "scripts" / "embed.py"), *common, "--cpu", "true"]
        bare, embedded, one, two = [], {w: [] for w in options.workers}, [], []
        for number in range(options.rounds):  # interleaved, so load from other jobs hits every variant alike
            bare.append(bare_pass(model, pixels, options.per_device_batch_size))
            for workers in options.workers:
                embedded[workers].append(embed_pass([*here, "--num_workers", str(workers)],
                                                    root / f"embed-{number}-{workers}"))
        workers = max(options.workers, key=lambda w: max(embedded[w]))
        for number in range(options.rounds):
            one.append(launched_pass([*script, "--num_workers", str(workers)], root / f"one-{number}", env))
            two.append(launched_pass([*launch, "--num_workers", str(workers)], root / f"two-{number}", env))
        best_one = max(one, key=lambda r: r["images_per_s"])
        best_two = max(two, key=lambda r: r["images_per_s"])
        print(json.dumps({
            "device": device, "cpu_cores": os.cpu_count(), "torch_threads_per_process": options.threads,
            "images": options.images, "stored_side": options.side, "model_input": NEW.image_size,
            "per_device_batch_size": options.per_device_batch_size, "rounds": options.rounds,
            "bare_forward_images_per_s": round(max(bare), 2),
            "embed_images_per_s_by_workers": {w: round(max(r), 2) for w, r in embedded.items()},
            "embed_over_bare": round(max(embedded[workers]) / max(bare), 3),
            "cpu_processes": {"workers": workers, "1": best_one, "2": best_two,
                              "2_over_1": round(best_two["images_per_s"] / best_one["images_per_s"], 3)},
        }, indent=2))


if __name__ == "__main__":
    main()

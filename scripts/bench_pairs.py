"""Throughput of the image-text loaders: images/s through a DataLoader, 0 vs N worker processes.

Writes N generated JPEGs once as an image folder and as tar shards, then times whole
epochs (worker start-up included) side by side. The preprocess is tiny (resize to
32 px + tensor) so the figure is the loader's own cost: decoding and batching.
Then the private memory one forked worker ends up with after reading every caption
of a large source, held as Python lists vs packed (xbt.data.packed).

    PYTHONPATH=$PWD python scripts/bench_pairs.py --images 2000 --size 256 --workers 2 --captions 1000000
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from xbt.data.packed import PackedCaptions
from xbt.data.pairs import PairDataConfig, make_pair_loader, open_pairs


def tiny_preprocess(image: Image.Image):
    return pil_to_tensor(image.resize((32, 32)))


def write_data(root: Path, count: int, size: int, shards: int) -> None:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    folder = root / "folder"
    folder.mkdir()
    rows, encoded = [], []
    for index in range(count):
        base = (ramp[None, :, None] + ramp[:, None, None] * rng.random(3)) / 2
        pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
        (folder / f"{index:06d}.jpg").write_bytes(encoded[-1])
        rows.append({"file_name": f"{index:06d}.jpg", "captions": [f"picture {index}", f"image number {index}"]})
    (folder / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (root / "shards").mkdir()
    for shard in range(shards):
        with tarfile.open(root / "shards" / f"{shard:04d}.tar", "w") as archive:
            for index in range(shard, count, shards):
                for extension, data in (("jpg", encoded[index]), ("txt", f"picture {index}".encode())):
                    info = tarfile.TarInfo(f"{index:06d}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))


def images_per_second(source_path: Path, workers: int, batch_size: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        source = open_pairs(PairDataConfig(source=str(source_path), batch_size=batch_size, num_workers=workers))
        start = time.perf_counter()
        seen = sum(len(batch["ids"]) for batch in make_pair_loader(source, transform=tiny_preprocess))
        best = min(best, time.perf_counter() - start)
    return seen / best


class CaptionReader(Dataset):
    """Reads one example's captions per item; reports the worker's private memory (USS) in MiB."""

    def __init__(self, captions):
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> float:
        self.captions[index]
        return psutil.Process().memory_full_info().uss / 2**20 if index % 50_000 == 0 else 0.0


def worker_private_mib(captions) -> float:
    loader = DataLoader(CaptionReader(captions), batch_size=1000, num_workers=1, collate_fn=max)
    return max(loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many epochs")
    parser.add_argument("--captions", type=int, default=1_000_000, help="examples (5 captions each) for the memory test")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        write_data(root, options.images, options.size, options.shards)
        print(f"{options.images} JPEGs {options.size}x{options.size}, batch {options.batch_size}, "
              f"best of {options.repeats} epochs (worker start-up included)")
        print("| source | workers | images/s |\n|---|---|---|")
        for kind in ("folder", "shards"):
            for workers in (0, options.workers):
                rate = images_per_second(root / kind, workers, options.batch_size, options.repeats)
                print(f"| {kind} | {workers} | {rate:,.0f} |")
    lists = [[f"caption {c} of example number {index}" for c in range(5)] for index in range(options.captions)]
    print(f"\nworker private memory after reading {options.captions:,} examples x 5 captions:")
    print(f"| captions held as | worker USS (MiB) |\n|---|---|\n| Python lists | {worker_private_mib(lists):,.0f} |")
    print(f"| packed | {worker_private_mib(PackedCaptions(lists)):,.0f} |")


if __name__ == "__main__":
    main()


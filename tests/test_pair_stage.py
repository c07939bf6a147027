"""Stage 2 training with real tiny models, real image files and real (sub)processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from xbt import load_backbone
from xbt.cache import CacheConfig
from xbt.data.pairs import PairDataConfig
from xbt.demo.models import BUILDERS, TinyClipConfig
from xbt.errors import InputError
from xbt.model import XBTModel
from xbt.projection import Projection, ProjectionConfig
from xbt.train.pair_stage import PairStageConfig, TrainingDivergedError, train
from xbt.train.targets import load_gallery

from helpers import write_pairs

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 40


@dataclass
class Setup:
    new_ref: str
    old_ref: str
    projection: Path
    data: Path
    gallery: Path
    gallery_ids: Path
    cache: Path
    ids: list[str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("stage2")
    new_ref = BUILDERS["hf"](root / "new", TinyClipConfig(seed=0))
    old_ref = BUILDERS["open_clip"](root / "old", TinyClipConfig(embed_dim=24, width=32, seed=1))
    new, old = load_backbone(new_ref), load_backbone(old_ref)
    torch.manual_seed(0)
    Projection.build(new.embed_dim, old.embed_dim, ProjectionConfig(kind="mlp"), source_space=new.fingerprint,
                     target_space=old.fingerprint).save_pretrained(root / "psi")
    ids = write_pairs(root / "data", IMAGES)
    # The user's stored old image gallery, in a shuffled order, with its ids in a text file.
    good = old.encode_image([root / "data" / name for name in ids[:IMAGES]]).numpy()
    vectors = np.concatenate([good, np.random.default_rng(1).normal(size=(2, old.embed_dim))]).astype(np.float32)
    order = np.random.default_rng(2).permutation(len(ids))
    np.save(root / "gallery.npy", vectors[order])
    (root / "gallery_ids.txt").write_text("\n".join(ids[i] for i in order) + "\n")
    return Setup(new_ref, old_ref, root / "psi", root / "data", root / "gallery.npy", root / "gallery_ids.txt",
                 root / "cache", ids)


def configs(setup: Setup, output: Path, **overrides) -> tuple[PairStageConfig, PairDataConfig, None, CacheConfig]:
    data_options = {k: overrides.pop(k) for k in ("batch_size",) if k in overrides}
    options = {"max_steps": 6, "save_steps": 3, "warmup_steps": 1, "learning_rate": 1e-3, **overrides}
    stage = PairStageConfig(new_model=setup.new_ref, old_model=setup.old_ref, projection=str(setup.projection),
                            output_dir=str(output), **options)
    data = PairDataConfig(source=str(setup.data), max_bad_fraction=0.1, **{"batch_size": 8, **data_options})
    return stage, data, None, CacheConfig(cache_dir=str(setup.cache))


def trainable_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(folder / "adapter_model.safetensors")),
            **{f"psi.{k}": v for k, v in load_file(str(folder / "projection" / "model.safetensors")).items()}}


def test_train_writes_a_loadable_adapter_and_leaves_the_base_untouched(setup, tmp_path):
    folder = train(*configs(setup, tmp_path / "run", old_image_embeddings=str(setup.gallery),
                            old_image_ids=str(setup.gallery_ids)))
    summary = json.loads((folder / "xbt_config.json").read_text())["training"]
    assert summary["steps"] == 6 and summary["gallery_aware"] and summary["processes"] == 1
    assert summary["loss_weights"] == {"new_new": 1.0, "anchor": 0.0, "text_to_old_image": 1.0,
                                       "image_to_old_text": 1.0}
    assert set(summary["final_loss_terms"]) == {"new_new", "text_to_old_image", "image_to_old_text"}
    # The corrupt and the missing image were skipped and counted (not fatal under max_bad_fraction).
    assert summary["data_quality"]["skipped"] == 2 and summary["data_quality"]["kept"] == IMAGES

    model = XBTModel.from_pretrained(folder)
    fresh = load_backbone(setup.new_ref)
    assert model.backbone.fingerprint == fresh.fingerprint
    base = {k.replace(".base_layer", ""): v for k, v in model.backbone.model.state_dict().items() if "lora_" not in k}
    assert base.keys() == fresh.model.state_dict().keys()
    assert all(torch.equal(base[k], v) for k, v in fresh.model.state_dict().items())  # bit-identical
    assert any(v.abs().sum() > 0 for k, v in trainable_weights(folder).items() if "lora_B" in k)  # it trained
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000003", "step-00000006"]
    # Checkpoints hold only what trains, never the frozen backbone.
    saved = load_file(str(next((tmp_path / "run" / "checkpoints" / "step-00000006").glob("model*.safetensors"))))
    assert saved and all("lora_" in k or k.startswith(("model.projection.", "temperature.")) for k in saved)


def test_gallery_is_matched_by_id_and_refused_when_it_does_not_fit(setup, tmp_path):
    old = load_backbone(setup.old_ref)
    matched = load_gallery(str(setup.gallery), setup.ids, old.embed_dim, str(setup.gallery_ids))
    expected = old.encode_image([setup.data / setup.ids[5]])[0]
    assert torch.allclose(matched[5], expected, atol=1e-5)  # row 5 is image 5 although the file was shuffled

    vectors = np.load(setup.gallery)
    np.save(tmp_path / "short.npy", vectors[:-1])
    with pytest.raises(InputError, match="41 vectors, but the training data has 42"):
        load_gallery(str(tmp_path / "short.npy"), setup.ids, old.embed_dim,
                     str(_write_ids(tmp_path / "short.txt", setup.gallery_ids, drop_last=True)))
    with pytest.raises(InputError, match="dimension 24, but the old model's space has 32"):
        load_gallery(str(setup.gallery), setup.ids, 32, str(setup.gallery_ids))
    renamed = tmp_path / "renamed.txt"
    renamed.write_text(setup.gallery_ids.read_text().replace("007.png", "seven.png"))
    with pytest.raises(InputError, match=r"1 training images have no stored embedding \(e.g. \['007.png'\]\)"):
        load_gallery(str(setup.gallery), setup.ids, old.embed_dim, str(renamed))
    with pytest.raises(InputError, match="no stored embedding"):  # row numbers are no file names
        load_gallery(str(setup.gallery), setup.ids, old.embed_dim)


def _write_ids(path: Path, source: Path, drop_last: bool) -> Path:
    lines = source.read_text().split()
    path.write_text("\n".join(lines[:-1] if drop_last else lines))
    return path


def test_a_batch_of_only_bad_examples_is_skipped(setup, tmp_path):
    # Batch size 1: the corrupt and the missing image each make a batch with nothing usable.
    folder = train(*configs(setup, tmp_path / "run", batch_size=1, max_steps=IMAGES, save_steps=1000))
    summary = json.loads((folder / "xbt_config.json").read_text())["training"]
    assert summary["steps"] == IMAGES and summary["data_quality"]["skipped"] == 2


def test_divergence_stops_with_the_last_good_checkpoint_kept(setup, tmp_path):
    with pytest.raises(TrainingDivergedError) as caught:
        train(*configs(setup, tmp_path / "run", max_steps=40, save_steps=1, learning_rate=1e7, max_grad_norm=0,
                       warmup_steps=0))
    message = str(caught.value)
    assert "NaN" in message or "nan" in message or "inf" in message
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints and f"last good checkpoint is {checkpoints[-1]}" in message
    assert all((c / "progress.json").is_file() for c in checkpoints)
    assert not list(checkpoints[-1].glob("custom_checkpoint_*"))  # nothing that loads with weights_only=False
    kept = load_file(str(next(checkpoints[-1].glob("model*.safetensors"))))
    assert all(torch.isfinite(v).all() for v in kept.values())
    assert not (tmp_path / "run" / "adapter").exists()


def _script(setup: Setup, output: Path, *extra: str) -> list[str]:
    return [str(ROOT / "scripts" / "train_adapter.py"), "--new_model", setup.new_ref, "--old_model", setup.old_ref,
            "--projection", str(setup.projection), "--source", str(setup.data), "--output_dir", str(output),
            "--cache_dir", str(setup.cache), "--max_bad_fraction", "0.1", "--warmup_steps", "1",
            "--learning_rate", "1e-3", "--old_image_embeddings", str(setup.gallery),
            "--old_image_ids", str(setup.gallery_ids), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_kill_minus_9_then_resume_latest_reaches_the_same_weights(setup, tmp_path):
    steps = ["--max_steps", "12", "--save_steps", "4", "--batch_size", "8"]
    reference = subprocess.run([sys.executable, *_script(setup, tmp_path / "straight", *steps)], env=_env(),
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, *_script(setup, interrupted, *steps)], env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = interrupted / "checkpoints" / "step-00000004" / "progress.json"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "no checkpoint appeared"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "adapter").exists()  # it really died before the end

    resumed = subprocess.run([sys.executable, *_script(setup, interrupted, *steps, "--resume", "latest")],
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr
    expected, got = trainable_weights(tmp_path / "straight" / "adapter"), trainable_weights(interrupted / "adapter")
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(setup, tmp_path):
    steps = ["--max_steps", "4", "--save_steps", "4", "--num_workers", "0"]
    single = subprocess.run([sys.executable, *_script(setup, tmp_path / "one", *steps, "--batch_size", "8")],
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = subprocess.run([*launch, *_script(setup, tmp_path / "two", *steps, "--batch_size", "4")],
                            env={**_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                            timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "adapter" / "xbt_config.json").read_text())["training"]
    assert summary["processes"] == 2 and summary["global_batch_size"] == 8
    assert summary["replicas_identical"] is True  # every rank held the same weights at the end
    one, two = trainable_weights(tmp_path / "one" / "adapter"), trainable_weights(tmp_path / "two" / "adapter")
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    # Under DDP too, checkpoints hold only the trained weights, not the frozen backbone.
    saved = [load_file(str(next((tmp_path / run / "checkpoints").glob("step-*/model*.safetensors"))))
             for run in ("one", "two")]
    assert len(saved[0]) == len(saved[1]) and all("lora_" in k or "projection" in k or "temperature" in k
                                                  for k in saved[1])
    assert any(not torch.equal(one[k], torch.zeros_like(one[k])) for k in one if "lora_B" in k)


def test_gradient_checkpointing_gives_the_same_weights(setup, tmp_path):
    plain = train(*configs(setup, tmp_path / "plain", max_steps=2, save_steps=2))
    recomputed = train(*configs(setup, tmp_path / "recomputed", max_steps=2, save_steps=2,
                                gradient_checkpointing=True))
    expected, got = trainable_weights(plain), trainable_weights(recomputed)
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


def test_cli_reads_a_config_file_and_flags_override_it(setup, tmp_path, capsys):
    import yaml

    from xbt.cli import main as cli

    options = {"new_model": setup.new_ref, "old_model": setup.old_ref, "projection": str(setup.projection),
               "output_dir": str(tmp_path / "run"), "source": str(setup.data), "max_bad_fraction": 0.1,
               "cache_dir": str(setup.cache), "max_steps": 50, "batch_size": 8, "lora_rank": 2}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(options))
    assert cli(["train", "--config", str(tmp_path / "train.yaml"), "--max_steps", "1"]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])  # the adapter folder is printed last
    config = json.loads((folder / "xbt_config.json").read_text())
    assert config["training"]["steps"] == 1 and config["lora"]["lora_rank"] == 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**options, "lora_rnak": 4}))
    assert cli(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown options ['lora_rnak']" in capsys.readouterr().err


def test_sampled_bank_keeps_every_positive_and_is_the_same_on_every_process():
    from xbt.losses import Temperature
    from xbt.train.pair_stage import PairObjective
    from xbt.train.targets import OldSpaceTargets

    bank = torch.nn.functional.normalize(torch.randn(500, 8), dim=-1)
    targets = OldSpaceTargets(captions=bank, offsets=torch.arange(501), caption_means=bank, images=bank)
    objective = PairObjective(torch.nn.Linear(1, 1), {"new_new": 1.0}, Temperature(), targets, bank_negatives=64)
    positions = torch.tensor([3, 499, 3, 120])
    rows, positives = objective.bank_rows(positions, step=7)
    assert torch.equal(bank[rows][positives], bank[positions])
    assert 64 <= len(rows) <= 68 and torch.equal(rows, objective.bank_rows(positions, step=7)[0])
    assert not torch.equal(rows, objective.bank_rows(positions, step=8)[0])  # a new sample every step
    everything = PairObjective(torch.nn.Linear(1, 1), {"new_new": 1.0}, Temperature(), targets)
    rows, positives = everything.bank_rows(positions, 0)
    assert rows == slice(None) and positives is positions

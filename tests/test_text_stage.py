"""Stage 1 with tiny real models of both backends: training from the cache, checkpoints, resume, CLI, accelerate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from xbt.cache import build_cache, text_source
from xbt.data.captions import split_indices
from xbt.errors import InputError
from xbt.projection import Projection, ProjectionConfig
from xbt.train.checkpoints import latest_checkpoint
from xbt.train.config import TextStageConfig
from xbt.train.engine import make_accelerator
from xbt.train.text_stage import evaluate, train_text_stage

from helpers import captions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator(cpu=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_encoders):
    # old and new differ in backend (and so in weights and tokeniser padding): distinct, unaligned spaces
    sources = [text_source("old", tiny_encoders["open_clip"], 128), text_source("new", tiny_encoders["hf"], 128)]
    return build_cache(tmp_path_factory.mktemp("cache"), sources, captions(1200), shard_size=512, progress=False)


def test_training_lowers_validation_loss_and_raises_recall(tmp_path, cache, accelerator):
    train, validation = split_indices(cache.count, 200, seed=0)
    config = TextStageConfig(output_dir=str(tmp_path / "run"), epochs=6, batch_size=100, learning_rate=3e-3,
                             init="random", save_steps=0)
    summary = train_text_stage(cache, train, validation, config, accelerator)
    untrained, trained = summary["untrained"], summary["validation"]
    assert trained["loss"] < untrained["loss"] - 0.5
    assert trained["R@1"] > untrained["R@1"] + 5
    assert [entry["epoch"] for entry in summary["history"]] == list(range(7))
    assert summary["processes"] == 1 and summary["train_captions"] == 1000

    run = Path(config.output_dir)
    saved = json.loads((run / "training_summary.json").read_text())
    assert saved["validation"] == trained
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 7
    psi = Projection.from_pretrained(run)
    assert psi.kind == "mlp" and psi.target_space == cache.fingerprints["old"].removesuffix(":text")
    for name in ("procrustes", "ridge"):
        baseline = Projection.from_pretrained(run / "baselines" / name)
        assert baseline.kind == "linear"
        assert summary["baselines"][name]["R@1"] > untrained["R@1"]  # fitted maps beat a random ψ
    assert latest_checkpoint(run).name == f"step-{summary['steps']:08d}"


@pytest.mark.parametrize("kind", ["linear", "orthogonal"])
def test_other_projection_kinds_and_losses_train(tmp_path, cache, accelerator, kind):
    train, validation = split_indices(cache.count, 100, seed=1)
    config = TextStageConfig(output_dir=str(tmp_path / kind), epochs=2, batch_size=100, loss="cosine",
                             noise_std=0.05, baselines="", init="random", save_steps=0)
    extra = 8 if kind == "orthogonal" else 0
    summary = train_text_stage(cache, train, validation, config, accelerator,
                               ProjectionConfig(kind=kind, extra_dims=extra))
    assert summary["validation"]["loss"] < summary["untrained"]["loss"]
    assert Projection.from_pretrained(tmp_path / kind).extra_dims == extra and summary["baselines"] == {}


def test_initialising_from_the_ridge_fit_starts_where_the_baseline_is(tmp_path, cache, accelerator):
    train, validation = split_indices(cache.count, 200, seed=0)
    config = TextStageConfig(output_dir=str(tmp_path), epochs=10, batch_size=100, learning_rate=3e-3,
                             baselines="ridge", save_steps=0)
    summary = train_text_stage(cache, train, validation, config, accelerator)  # init 'auto': ridge for the mlp ψ
    recalls = [f"R@{k}" for k in (1, 5, 10)]
    assert [summary["untrained"][k] for k in recalls] == [summary["baselines"]["ridge"][k] for k in recalls]
    assert summary["validation"]["R@1"] > summary["untrained"]["R@1"]  # and training improves on it
    with pytest.raises(InputError, match="use init='random' for 'orthogonal'"):
        train_text_stage(cache, train, validation, TextStageConfig(output_dir=str(tmp_path / "o"), init="procrustes"),
                         accelerator, ProjectionConfig(kind="orthogonal"))


def test_max_steps_stops_mid_epoch_and_still_validates(tmp_path, cache, accelerator):
    train, validation = split_indices(cache.count, 100, seed=0)
    config = TextStageConfig(output_dir=str(tmp_path), epochs=5, max_steps=3, batch_size=100, baselines="")
    summary = train_text_stage(cache, train, validation, config, accelerator)
    assert summary["steps"] == 3 and len(summary["history"]) == 1  # only the untrained entry: no epoch ended
    assert summary["validation"]["loss"] < summary["untrained"]["loss"]  # three steps already lower it
    assert latest_checkpoint(tmp_path).name == "step-00000003"


def test_bad_configurations_are_clear_errors(tmp_path, cache, accelerator):
    bad = [({"loss": "hinge"}, "loss: got 'hinge'; allowed: infonce, cosine, mse"),
           ({"init": "zeros"}, "init: got 'zeros'"),
           ({"init": "mlp"}, "init: got 'mlp'; allowed: auto, random, procrustes, ridge, low_rank"),  # not linear
           ({"baselines": "procrustes,pca"}, r"baselines: unknown \['pca'\]"),
           ({"learning_rate": -1.0}, "learning_rate: got -1.0"),
           ({"max_steps": -1}, "max_steps: got -1"),
           ({"mixed_precision": "fp8"}, "mixed_precision: got 'fp8'; allowed: one of no, fp16, bf16"),
           ({"batch_size": 1}, "batch_size: got 1"),
           ({"report_to": "mlflow"}, "report_to: got 'mlflow'"),
           ({"epochs": 0}, "epochs: got 0")]
    for options, message in bad:
        with pytest.raises(InputError, match=message):
            TextStageConfig(**options)
    train, _ = split_indices(cache.count, 100, seed=0)
    with pytest.raises(InputError, match="at least 2 validation"):
        train_text_stage(cache, train, train[:1], TextStageConfig(output_dir=str(tmp_path)), accelerator)
    with pytest.raises(InputError, match="not a complete checkpoint"):
        train_text_stage(cache, train, train[:10], TextStageConfig(output_dir=str(tmp_path), resume=str(tmp_path)),
                         accelerator)


# ----------------------------------------------------------------------------------
# the real command line, in subprocesses
# ----------------------------------------------------------------------------------
def environment(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "captions.txt"
    path.write_text("\n".join(captions(1200)) + "\n\n" + captions(1)[0] + "\n")  # one blank, one duplicate
    return path


def cli_args(tiny_refs, corpus_file, cache_dir, output_dir, *extra):
    return ["--captions", str(corpus_file), "--old_model", tiny_refs["open_clip"], "--new_model", tiny_refs["hf"],
            "--cache_dir", str(cache_dir), "--output_dir", str(output_dir), "--validation_size", "200",
            "--batch_size", "50", "--cpu", "--seed", "3", *extra]


def test_config_file_with_flag_overrides_and_cli_errors(tmp_path, tiny_refs, corpus_file, capsys):
    from xbt.cli import main

    config = tmp_path / "stage1.yaml"
    config.write_text(f"captions: {corpus_file}\nold_model: {tiny_refs['open_clip']}\nnew_model: {tiny_refs['hf']}\n"
                      f"cache_dir: {tmp_path / 'cache'}\noutput_dir: {tmp_path / 'out'}\nepochs: 5\n"
                      f"validation_size: 200\nbatch_size: 100\nkind: linear\ncpu: true\nbaselines: ridge\n")
    assert main(["pretrain-text", "--config", str(config), "--epochs", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["config"]["epochs"] == 1 and summary["projection"]["kind"] == "linear"
    assert sorted(report["baselines"]) == ["ridge"]
    assert summary["cache"]["corpus"]["dropped_empty"] == 1 and summary["cache"]["corpus"]["dropped_duplicates"] == 1

    (tmp_path / "bad.yaml").write_text("epochs: 1\nlearning_rat: 0.1\n")
    assert main(["pretrain-text", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown options ['learning_rat']" in capsys.readouterr().err
    assert main(["pretrain-text", "--captions", str(corpus_file)]) == 2
    assert "--old_model and --new_model" in capsys.readouterr().err
    assert main(["pretrain-text", "--captions", str(tmp_path / "missing.txt"), "--old_model", "x", "--new_model",
                 "y"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_during_training_then_resume_matches_uninterrupted(tmp_path, tiny_refs, corpus_file):
    command = [sys.executable, "-m", "xbt", "pretrain-text"]
    options = ("--epochs", "30", "--save_steps", "20", "--noise_std", "0.05")
    clean = subprocess.run(command + cli_args(tiny_refs, corpus_file, tmp_path / "cache", tmp_path / "clean", *options),
                           env=environment(), capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    args = cli_args(tiny_refs, corpus_file, tmp_path / "cache", killed_dir, *options, "--resume", "latest")
    process = subprocess.Popen(command + args, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while latest_checkpoint(killed_dir) is None:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "training_summary.json").exists()
    interrupted_at = int(latest_checkpoint(killed_dir).name.split("-")[1])
    assert interrupted_at < 600

    resumed = subprocess.run(command + args, env=environment(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {interrupted_at} of 600" in resumed.stderr
    weights, reference = load_file(killed_dir / "model.safetensors"), load_file(tmp_path / "clean" / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name in weights:
        assert torch.equal(weights[name], reference[name]), name
    history = json.loads((killed_dir / "training_summary.json").read_text())["history"]
    assert history == json.loads((tmp_path / "clean" / "training_summary.json").read_text())["history"]


@pytest.mark.slow
def test_accelerate_launch_with_two_processes(tmp_path, tiny_refs, corpus_file):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(REPO / "scripts" / "pretrain_text.py")]
    extra = ["--epochs", "4", "--shard_size", "300", "--learning_rate", "3e-3", "--init", "random"]
    args = cli_args(tiny_refs, corpus_file, tmp_path / "cache", tmp_path / "out", *extra)
    result = subprocess.run(launch + args, env=environment(ACCELERATE_USE_CPU="true"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["validation"]["R@1"] > summary["untrained"]["R@1"]
    assert summary["validation"]["loss"] < summary["untrained"]["loss"]
    cache_dir = Path(summary["cache"]["path"])
    assert len(list(cache_dir.glob("shard-*.safetensors"))) == 4  # 1200 captions, encoded by both processes
    # The loss is the global batch's: one process with the same batch size follows the same trajectory.
    single = subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain_text.py"),
                             *cli_args(tiny_refs, corpus_file, tmp_path / "cache", tmp_path / "one", *extra)],
                            env=environment(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    one, two = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "out"))
    assert all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)


def test_validation_recall_is_evaluations_metric_with_its_tie_rule():
    from xbt.retrieval import Labeled, recall_at_k

    identity = torch.nn.Linear(4, 4, bias=False)
    torch.nn.init.eye_(identity.weight)
    # Eight captions whose old embeddings are all the same vector: every query ties with every item.
    old = torch.nn.functional.normalize(torch.ones(8, 4), dim=-1)
    metrics = evaluate(identity, old.clone(), old, "cosine", 1.0, batch_size=4)
    labels = np.arange(8)
    expected = recall_at_k(Labeled(old.numpy(), labels), Labeled(old.numpy(), labels), (1, 5, 10), validate=False)
    assert [metrics[f"R@{k}"] for k in (1, 5, 10)] == [round(expected[k], 4) for k in (1, 5, 10)]
    assert metrics["R@1"] < 100.0  # a tie is not a hit for every query (the old stage-1 rule counted it as one)

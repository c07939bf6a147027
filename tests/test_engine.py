"""The one training loop, on a small real task: resume, precision, NaN guard, trackers, config checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from xbt.errors import InputError
from xbt.train import engine
from xbt.train.checkpoints import list_checkpoints
from xbt.train.config import PairStageConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]


class Regression(nn.Module):
    """A linear map fitted to a fixed target map: the smallest task the engine can train."""

    def __init__(self, rows: int = 64, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(rows, 8, generator=generator)
        self.targets = self.inputs @ torch.randn(8, 4, generator=generator)
        self.linear = nn.Linear(8, 4)
        self.loss_weights = {"mse": 1.0, "half": 0.5}
        self.seen: list[list[int]] = []
        self.dtypes: set[torch.dtype] = set()

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.parameters())}]

    def batches(self, epoch: int, start: int):
        order = torch.randperm(len(self.inputs), generator=torch.Generator().manual_seed(epoch))
        for position in range(start, len(order) // 16):
            yield order[position * 16:(position + 1) * 16]

    def forward(self, rows: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        self.seen.append(rows.tolist())
        predictions = self.linear(self.inputs[rows])
        self.dtypes.add(predictions.dtype)
        error = (predictions.float() - self.targets[rows]).pow(2).mean()
        return {"mse": error, "half": error}


@pytest.fixture(scope="module")
def accelerator():
    return engine.make_accelerator(cpu=True)


def run(accelerator, folder: Path, seed: int = 0, **options) -> tuple[Regression, engine.TrainState]:
    engine.seed_everything(seed)
    task = Regression()
    config = TrainConfig(output_dir=str(folder), batch_size=16, learning_rate=0.05, **options)
    return task, engine.train(task, config, accelerator, options.get("max_steps", 10), "toy")


def test_the_loop_trains_and_sums_the_weighted_terms(accelerator, tmp_path):
    task, state = run(accelerator, tmp_path, max_steps=40, save_steps=0)
    assert state.step == 40 and state.epoch == 9  # 4 batches an epoch: epochs 0-9 started
    assert state.loss == pytest.approx(1.5 * state.terms["mse"])  # 1 * mse + 0.5 * half
    first = (Regression().linear.weight - task.linear.weight).abs().sum()
    assert first > 0 and state.terms["mse"] < 0.5 * Regression().targets.var().item()
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-00000040"]  # save_steps 0: only at the end


def test_resume_continues_the_same_batches_and_ends_with_the_same_weights(accelerator, tmp_path):
    straight, _ = run(accelerator, tmp_path / "straight", max_steps=10, save_steps=3, save_total_limit=0)
    assert [c.name for c in list_checkpoints(tmp_path / "straight")] == [
        "step-00000003", "step-00000006", "step-00000009", "step-00000010"]
    # A run "killed" after step 6: its later checkpoints never existed.
    interrupted = tmp_path / "interrupted"
    run(accelerator, interrupted, max_steps=10, save_steps=3, save_total_limit=0)
    for checkpoint in list_checkpoints(interrupted)[2:]:
        import shutil

        shutil.rmtree(checkpoint)
    resumed, state = run(accelerator, interrupted, seed=123, max_steps=10, save_steps=3, resume="latest")
    assert state.step == 10 and resumed.seen == straight.seen[6:]  # exactly the batches the killed run missed
    assert torch.equal(resumed.linear.weight, straight.linear.weight)
    assert len(list_checkpoints(interrupted)) == 2  # save_total_limit 2 rotates on resume too


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_autocasts_the_forward_per_stage(accelerator, tmp_path, precision, dtype):
    task, state = run(accelerator, tmp_path / precision, max_steps=6, mixed_precision=precision)
    assert task.dtypes == {dtype} and torch.isfinite(torch.tensor(state.loss))
    progress = json.loads((list_checkpoints(tmp_path / precision)[-1] / "progress.json").read_text())
    assert (progress["scaler"] is not None) == (precision == "fp16")  # fp16's loss scale resumes too
    plain, _ = run(accelerator, tmp_path / "no", max_steps=6)
    assert plain.dtypes == {torch.float32}  # the same Accelerator, another stage: no autocast


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(accelerator, tmp_path):
    class Exploding(Regression):
        def forward(self, rows, step):
            terms = super().forward(rows, step)
            return {name: value * (float("nan") if step == 4 else 1.0) for name, value in terms.items()}

    engine.seed_everything(0)
    config = TrainConfig(output_dir=str(tmp_path), batch_size=16, save_steps=2, max_steps=10)
    with pytest.raises(engine.TrainingDivergedError, match=r"loss became nan at step 5.*step-00000004"):
        engine.train(Exploding(), config, accelerator, 10, "toy")
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]


def test_a_tracker_that_is_not_installed_is_a_warning(accelerator, tmp_path, caplog):
    pytest.importorskip("accelerate")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with caplog.at_level("WARNING", logger="xbt"):
            run(accelerator, tmp_path, max_steps=2, report_to="tensorboard")
        assert "no such tracker is installed" in caplog.text
    else:
        run(accelerator, tmp_path, max_steps=2, report_to="tensorboard")
        assert list(tmp_path.rglob("events.out.tfevents*"))


def test_one_process_raises_its_own_error_through_the_rank_agreement(accelerator):
    def broken():
        raise InputError("bad file")

    assert engine.on_every_rank(accelerator, lambda: 7) == 7
    with pytest.raises(InputError, match="bad file"):
        engine.on_every_rank(accelerator, broken)
    assert engine.every_rank(accelerator, True) and not engine.every_rank(accelerator, False)


@pytest.mark.parametrize("options, message", [
    ({"learning_rate": -0.1}, "learning_rate: got -0.1; allowed: a number > 0"),
    ({"max_steps": -1}, "max_steps: got -1"),
    ({"mixed_precision": "fp32"}, "mixed_precision: got 'fp32'; allowed: one of no, fp16, bf16"),
    ({"batch_size": 1}, "batch_size: got 1"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps: got 0"),
    ({"save_total_limit": -2}, "save_total_limit: got -2"),
    ({"report_to": "comet"}, "report_to: got 'comet'"),
    ({"warmup_steps": -5}, "warmup_steps: got -5"),
    ({"temperature": 0}, "temperature: got 0"),
])
def test_run_options_are_checked(options, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**options)


def test_stage_two_options_are_checked():
    base = {"new_model": "a", "old_model": "b", "projection": "c", "output_dir": "d"}
    for options, message in [({"max_steps": 0}, "max_steps: got 0; allowed: an integer >= 1"),
                             ({"loss_weights": "anchor"}, "loss_weights: got 'anchor'; allowed: NAME=WEIGHT"),
                             ({"loss_weights": "anchor=x"}, "loss_weights: got 'anchor=x'"),
                             ({"loss_weights": "ancor=1"}, r"unknown term\(s\) \['ancor'\]"),
                             ({"bank_negatives": -1}, "bank_negatives: got -1")]:
        with pytest.raises(InputError, match=message):
            PairStageConfig(**base, **options)
    mapping = PairStageConfig(**base, loss_weights={"new_new": 1, "anchor": 0.5})  # as a YAML mapping gives it
    assert mapping.loss_weights == "new_new=1,anchor=0.5" and mapping.given_weights == {"new_new": 1.0,
                                                                                         "anchor": 0.5}
    assert TrainConfig(warmup_steps=0.1).warmup_count(200) == 20 and TrainConfig(warmup_steps=7).warmup_count(9) == 7


TORCH_FREE = {"xbt/train/config.py", "xbt/data/config.py", "xbt/data/tables.py", "xbt/train/fit.py", "xbt/errors.py",
              "xbt/io.py"}


@pytest.mark.parametrize("module", sorted(TORCH_FREE))
def test_config_modules_import_nothing_heavy_at_module_level(module):
    """What ``--help`` needs stays torch-free: module-level imports are the standard library or torch-free modules.

    Read from the source (not ``sys.modules``) so the check does not depend on what ``xbt/__init__`` imports.
    """
    import ast
    import importlib.util

    tree = ast.parse((REPO / module).read_text())
    package = module.removesuffix(".py").replace("/", ".").rpartition(".")[0]
    for node in tree.body:  # module level only: imports inside functions are lazy by design
        if isinstance(node, ast.ImportFrom):
            name = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            names = [name]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("xbt"):
                assert name.replace(".", "/") + ".py" in TORCH_FREE, f"{module} imports {name} at module level"
            else:
                assert name.split(".")[0] in sys.stdlib_module_names, f"{module} imports {name} at module level"

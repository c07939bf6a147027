"""The one training loop every stage runs through (stage 1, stage 2, the demo's pretraining).

A run's entry point (a CLI command, ``xbt fit``, a script under ``accelerate launch``)
makes the run's ONE :func:`make_accelerator` and hands it down; nothing below makes
another (Accelerate's state is one per process). A stage is a *task*: an ``nn.Module``
whose ``forward(batch, step)`` returns a dict of named loss terms (open_clip style:
model + loss in one module, so DDP synchronises everything that trains). The loop sums
the weighted terms and owns everything else: resume, gradient accumulation, mixed
precision (autocast per stage, a gradient scaler for fp16), gradient clipping, the
NaN/inf guard, logging and trackers, checkpoints and their rotation, the progress bar.

What a task provides (:class:`Task`)::

    loss_weights: dict[str, float]                # the engine computes sum(weight * term)
    forward(batch, step) -> dict[str, Tensor]     # only the terms with weight > 0
    batches(epoch, start) -> iterable             # one epoch's batches from position `start`
    parameter_groups() -> list[dict]              # AdamW groups (lr / weight_decay override the run's)
    usable(batch) -> bool                         # optional: False skips the batch on every rank
    after_step(state), end_epoch(state)           # optional hooks (validation, data-quality counting)
    log_values() -> dict                          # optional extras for the log (e.g. the temperature)
    progress_state() / load_progress_state(dict)  # optional: the task's own JSON state in checkpoints

Data order is the task's, fixed by (seed, epoch): the engine records (epoch, batch
position) in every checkpoint and asks the task for the rest of that epoch on resume,
so a killed and resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import XBTError
from .checkpoints import latest_checkpoint, read_progress, resolve_resume, save_checkpoint
from .config import TrainConfig

logger = logging.getLogger(__name__)

_END = object()  # an epoch's batches are exhausted


class TrainingDivergedError(XBTError):
    """The loss or the weights became NaN or infinite."""


class StoppedByAnotherRank(XBTError):
    """Another process failed; this one stops with it (the failing process reports the error)."""


def make_accelerator(cpu: bool = False):
    """The run's one ``Accelerator``; only entry points call this.

    Mixed precision, gradient accumulation and trackers are set per stage by :func:`train`
    (autocast, accumulation steps, trackers), so one Accelerator serves every stage. The
    scheduler is stepped once per optimiser step by the loop (not once per process).
    """
    from accelerate import Accelerator

    return Accelerator(cpu=cpu, mixed_precision="no", step_scheduler_with_optimizer=False)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): the one seeding helper of the package."""
    from accelerate.utils import set_seed

    set_seed(seed)


# ---------------------------------------------------------------------------------
# one error, every rank
# ---------------------------------------------------------------------------------
# Why at the step boundary: an exception on one rank (a bad file only it reads) would leave
# the others blocked in the next collective (gathering the batch, DDP's all-reduce). Every
# rank instead runs the risky part (setup, fetching a batch) locally, then all ranks agree
# on "did anyone fail" with one all-reduce that every rank reaches. The lowest failing rank
# re-raises its own error (the entry point prints it: once); the others raise
# StoppedByAnotherRank, which entry points turn into a silent non-zero exit.
def on_every_rank(accelerator, function: Callable[..., Any], *args) -> Any:
    """``function(*args)`` on this rank; if it raised on ANY rank, raise on every rank."""
    try:
        result, error = function(*args), None
    except Exception as caught:  # noqa: BLE001 (any failure must reach the other ranks)
        result, error = None, caught
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return result
    import torch.distributed as dist

    world = accelerator.num_processes
    failed = torch.tensor([accelerator.process_index if error is not None else world], device=accelerator.device)
    dist.all_reduce(failed, op=dist.ReduceOp.MIN)
    source = int(failed.item())
    if source == world:
        return result
    message = [f"{type(error).__name__}: {error}" if error is not None else None]
    dist.broadcast_object_list(message, src=source)  # our own string, from our own process group
    if accelerator.process_index == source:
        raise error
    raise StoppedByAnotherRank(f"process {source} failed: {message[0]}")


def every_rank(accelerator, flag: bool) -> bool:
    """True when ``flag`` holds on every process (a batch is used only if every rank has examples)."""
    if accelerator.num_processes == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


# ---------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------
class Task(Protocol):
    loss_weights: Mapping[str, float]

    def batches(self, epoch: int, start: int) -> Iterable[Any]: ...
    def parameter_groups(self) -> list[dict]: ...
    def __call__(self, batch: Any, step: int) -> dict[str, torch.Tensor]: ...


@dataclass
class TrainState:
    """Where the run is (saved in every checkpoint's progress.json)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # position in the epoch's batches (skipped ones count)
    total_steps: int = 0
    loss: float = float("nan")  # of the last step
    terms: dict[str, float] = field(default_factory=dict)

    def progress(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch}


AUTOCAST = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def train(task: nn.Module, config: TrainConfig, accelerator, total_steps: int, run_name: str,
          tracker_config: Mapping[str, Any] | None = None) -> TrainState:
    """Train ``task`` for ``total_steps`` optimiser steps under ``config``; returns the final state.

    The caller seeds (:func:`seed_everything`) before it builds the task (initial weights).
    Checkpoints go to ``config.output_dir/checkpoints``; ``config.resume`` continues from one.
    Raises :class:`TrainingDivergedError` (the last good checkpoint kept) on NaN/inf.
    """
    from transformers import get_cosine_schedule_with_warmup

    output = Path(config.output_dir)
    state = TrainState(total_steps=total_steps)
    checkpoint = resolve_resume(output, config.resume)
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    # save_state/load_state cover every object the accelerator prepared: only this stage's may be registered
    accelerator.free_memory()
    optimizer = torch.optim.AdamW([g for g in task.parameter_groups() if g["params"]], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_count(total_steps), total_steps)
    module, optimizer, scheduler = accelerator.prepare(task, optimizer, scheduler)
    dtype = AUTOCAST[config.mixed_precision]
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=dtype == torch.float16)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        progress = read_progress(checkpoint)
        state.step, state.epoch, state.batch = progress["step"], progress["epoch"], progress["batch"]
        if progress.get("scaler"):
            scaler.load_state_dict(progress["scaler"])
        if hasattr(task, "load_progress_state"):
            task.load_progress_state(progress.get("task", {}))
        logger.info("Resumed from %s at step %d of %d", checkpoint, state.step, total_steps)
    _start_trackers(accelerator, config, output, run_name, tracker_config)

    def save() -> None:
        if not all(torch.isfinite(p).all() for p in task.parameters() if p.requires_grad):
            raise TrainingDivergedError(f"Trainable weights became NaN/inf at step {state.step}; not checkpointing "
                                        f"them. The last good checkpoint is {latest_checkpoint(output) or 'none'}.")
        extra = {"task": task.progress_state() if hasattr(task, "progress_state") else {},
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None}
        save_checkpoint(accelerator, output, {**state.progress(), **extra}, config.save_total_limit)

    # side parameters (trained on detached targets) are clipped on their own: they never rescale the main update
    side = {id(p) for p in (task.side_parameters() if hasattr(task, "side_parameters") else [])}
    clip_groups = [group for group in ([p for p in module.parameters() if id(p) not in side],
                                       [p for p in module.parameters() if id(p) in side]) if group]
    module.train()
    batches = iter(task.batches(state.epoch, state.batch))
    bar = tqdm(total=total_steps, initial=state.step, desc=run_name, unit="step",
               disable=not accelerator.is_main_process)
    while state.step < total_steps:
        batch = on_every_rank(accelerator, next, batches, _END)  # a bad file on one rank stops every rank
        if batch is _END:
            if hasattr(task, "end_epoch"):  # e.g. a data-quality verdict, which may differ between ranks
                on_every_rank(accelerator, task.end_epoch, state)
            state.epoch, state.batch = state.epoch + 1, 0
            batches = iter(task.batches(state.epoch, 0))
            continue
        state.batch += 1
        if not every_rank(accelerator, task.usable(batch) if hasattr(task, "usable") else True):
            continue  # some rank lost every example of this batch to bad data: all skip it together
        with accelerator.accumulate(module):
            with torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype is not None):
                terms = module(batch, state.step)
            loss = sum(task.loss_weights[name] * value.float() for name, value in terms.items())
            if not torch.isfinite(loss):  # the loss of the gathered global batch: every rank agrees
                raise TrainingDivergedError(
                    f"The {run_name} loss became {float(loss.detach())} at step {state.step + 1} (terms "
                    f"{ {k: float(v.detach()) for k, v in terms.items()} }). The last good checkpoint is "
                    f"{latest_checkpoint(output) or 'none'}; lower the learning rate and resume from it "
                    f"with resume: latest.")
            accelerator.backward(scaler.scale(loss))
            if not accelerator.sync_gradients:
                continue
            scaler.unscale_(optimizer)
            if config.max_grad_norm > 0:
                for group in clip_groups:
                    accelerator.clip_grad_norm_(group, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        state.loss, state.terms = float(loss.detach()), {k: float(v.detach()) for k, v in terms.items()}
        if hasattr(task, "after_step"):
            task.after_step(state)
        bar.update(1)
        if state.step % config.logging_steps == 0 or state.step == total_steps:
            logs = {"loss": state.loss, **state.terms, "lr": scheduler.get_last_lr()[0],
                    **(task.log_values() if hasattr(task, "log_values") else {})}
            bar.set_postfix(loss=f"{state.loss:.4f}")
            accelerator.log(logs, step=state.step)
            logger.debug("%s step %d: %s", run_name, state.step, logs)
        if (config.save_steps and state.step % config.save_steps == 0) or state.step == total_steps:
            save()
    bar.close()
    for tracker in accelerator.trackers:  # not end_training(): it would end the process group the next stage needs
        tracker.finish()
    accelerator.trackers = []  # the next stage of this run starts its own
    accelerator.free_memory()
    return state


def _start_trackers(accelerator, config: TrainConfig, output: Path, run_name: str,
                    tracker_config: Mapping[str, Any] | None) -> None:
    """Trackers of this stage (``report_to``), logging into ``output``."""
    if config.report_to == "none":
        return
    from accelerate.tracking import filter_trackers

    accelerator.project_configuration.set_directories(str(output))
    accelerator.log_with = filter_trackers([config.report_to], accelerator.logging_dir)
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in {**asdict(config), **(tracker_config or {})}.items()}
    accelerator.init_trackers(run_name.replace(" ", "-"), config=flat)
    if not accelerator.trackers:
        logger.warning("report_to=%s: no such tracker is installed (pip install tensorboard / wandb); progress "
                       "goes to the log only.", config.report_to)


def run_entry_point(command: Callable[[], int]) -> int:
    """Run a command body; a process stopped because ANOTHER rank failed exits 2 without printing.

    The failing rank's own error propagates (and is printed once by the caller).
    """
    try:
        return command()
    except StoppedByAnotherRank as error:
        logger.debug("%s", error)
        return 2

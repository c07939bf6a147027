"""Stage 1: train ψ (new text space → old text space) from an embedding cache alone.

Input: an :class:`~xbt.cache.EmbeddingCache` holding ``new`` and ``old`` text embeddings
of the same captions, and the indices of the training and validation captions. The
text encoders never run here.

Training is a task of the one loop (:class:`TextStageTask` through
:func:`xbt.train.engine.train`): a fixed, seeded batch order per epoch (so a resumed run
sees exactly the batches the killed one would have); each process takes its share of
every global batch; optional Gaussian noise on the input; the paired loss (a
:data:`xbt.losses.TEXT_LOSSES` kind) between ψ(new) and old; AdamW with linear warm-up
then cosine decay. The engine owns checkpoints (every ``save_steps``, Accelerate's
``save_state`` under a temporary name, then renamed; ``resume="latest"`` continues from
the newest), clipping, the NaN guard, mixed precision and logging. After every epoch,
and once before training, the validation captions are scored: loss and text→text
Recall@K in the old space through :func:`xbt.retrieval.recall_at_k` (does ψ(new
caption) find the old embedding of the same caption among all validation captions?).

Output: ψ (``config.json`` + ``model.safetensors``, :class:`~xbt.projection.Projection`)
in ``OUTPUT``, with ``training_summary.json`` beside it and the per-epoch metrics in
``metrics.jsonl``. The training-free baselines are fitted on the same training pairs,
saved under ``OUTPUT/baselines/NAME`` and scored on the same validation captions.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..baselines import fit_baseline
from ..cache import EmbeddingCache, build_cache, text_source
from ..data.captions import load_captions, split_indices
from ..data.config import CacheConfig, CaptionConfig
from ..errors import InputError
from ..io import atomic_write_json, atomic_write_text
from ..losses import TEXT_LOSSES, Temperature, add_noise, uses_temperature
from ..adapter_config import ProjectionConfig
from ..projection import Projection
from ..retrieval import Labeled, recall_at_k
from . import engine
from .checkpoints import resolve_resume
from .config import ModelPairConfig, TextStageConfig
from .distributed import gather_rows
from .engine import seed_everything

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
SUMMARY_FILE, METRICS_FILE = "training_summary.json", "metrics.jsonl"


class TextStageTask(nn.Module):
    """Stage 1 as an engine task: ψ and the temperature (one module, so DDP synchronises both) and the loss.

    Batches are rows of the cache: a seeded permutation of the training rows per epoch
    (last partial batch dropped); each process takes its share of every global batch. The
    hooks score the validation captions at every epoch end (``history``, saved in checkpoints).
    """

    def __init__(self, projection: Projection, temperature: Temperature, cache: EmbeddingCache,
                 train_indices: np.ndarray, validation_indices: np.ndarray, config: TextStageConfig, accelerator):
        super().__init__()
        self.projection, self.temperature = projection, temperature
        self.cache, self.train_indices, self.config, self.accelerator = cache, train_indices, config, accelerator
        self.loss_weights = {config.loss: 1.0}
        self.batch_size = min(config.batch_size, len(train_indices))
        self.steps_per_epoch = len(train_indices) // self.batch_size
        self.validation_new = cache.tensor("new", validation_indices)
        self.validation_old = cache.tensor("old", validation_indices)
        self.history: list[dict] = []
        self.epoch_loss = 0.0  # sum of this epoch's step losses so far

    def parameter_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def batches(self, epoch: int, start: int):
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        for rows in epoch_batches(self.train_indices, self.batch_size, self.config.seed, epoch)[start:]:
            yield np.sort(rows[rank::processes])  # sorted rows read the memory map in order

    def forward(self, rows: np.ndarray, step: int) -> dict[str, torch.Tensor]:
        device = self.temperature.log_scale.device
        new, old = self.cache.tensor("new", rows).to(device), self.cache.tensor("old", rows).to(device)
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        if self.config.noise_std:
            noise = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step * processes + rank)
            new = add_noise(new, self.config.noise_std, generator=noise)
        # the loss of the global batch: N processes train like one with the same batch size
        pairs = PairedVectors(gather_rows(self.projection(new)), gather_rows(old.to(new.dtype)))
        return {self.config.loss: TEXT_LOSSES[self.config.loss].compute(pairs, self.temperature())}

    def validate(self) -> dict[str, float]:
        return evaluate(self.projection, self.validation_new, self.validation_old, self.config.loss,
                        float(self.temperature().detach()), self.batch_size)

    def after_step(self, state) -> None:
        self.epoch_loss += state.loss
        if state.step % self.steps_per_epoch == 0:
            train_loss, self.epoch_loss = self.epoch_loss / self.steps_per_epoch, 0.0
            self.history.append({"epoch": state.step // self.steps_per_epoch, "step": state.step,
                                 "train_loss": train_loss, **self.validate()})
            logger.info("Epoch %d: %s", self.history[-1]["epoch"], _format(self.history[-1]))

    def log_values(self) -> dict[str, float]:
        return {"temperature": 1.0 / float(self.temperature().detach())}

    def progress_state(self) -> dict:
        return {"history": self.history, "epoch_loss": self.epoch_loss}

    def load_progress_state(self, state: dict) -> None:
        self.history, self.epoch_loss = state["history"], state["epoch_loss"]


@dataclass
class PairedVectors:
    """What a stage-1 loss kind reads: ψ(new) and the old embedding of the same caption, row by row."""

    predictions: torch.Tensor
    targets: torch.Tensor


# ----------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(projection: nn.Module, new: torch.Tensor, old: torch.Tensor, loss: str, logit_scale: float,
             batch_size: int, chunk: int = 1024) -> dict[str, float]:
    """Validation loss (fixed batches, no noise) and text→text Recall@K (%) of ψ(new) against old.

    Recall is :func:`xbt.retrieval.recall_at_k`, the metric and tie rule of evaluation: does
    ψ(new caption) find the old embedding of the same caption among all validation captions?
    """
    was_training = projection.training
    projection.eval()
    device = next(projection.parameters()).device
    new, old = new.to(device), old.to(device).float()
    queries = torch.cat([projection(new[i:i + chunk]) for i in range(0, len(new), chunk)])
    losses = [float(TEXT_LOSSES[loss].compute(PairedVectors(queries[i:i + batch_size], old[i:i + batch_size]),
                                              logit_scale))
              for i in range(0, len(old), batch_size) if min(batch_size, len(old) - i) > 1]
    projection.train(was_training)
    labels = np.arange(len(old))
    recall = recall_at_k(Labeled(queries.float().cpu().numpy(), labels), Labeled(old.cpu().numpy(), labels),
                         RECALL_KS, validate=False)
    metrics = {"loss": float(np.mean(losses)) if losses else float("nan")}
    metrics.update({f"R@{k}": round(value, 4) for k, value in recall.items()})
    return metrics


# ----------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------
def epoch_batches(train_indices: np.ndarray, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(steps_per_epoch, batch_size) cache rows of one epoch: a seeded shuffle, last partial batch dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(train_indices)
    steps = len(order) // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


def train_text_stage(
    cache: EmbeddingCache,
    train_indices: np.ndarray,
    validation_indices: np.ndarray,
    config: TextStageConfig,
    accelerator,
    projection_config: ProjectionConfig | None = None,
) -> dict:
    """Train ψ on the cached (new, old) pairs of ``train_indices``; returns the summary (also written to disk).

    ``accelerator``: the run's one (:func:`xbt.train.engine.make_accelerator`).
    """
    projection_config = projection_config or ProjectionConfig()
    for name in ("new", "old"):
        if name not in cache.names:
            raise InputError(f"Cache {cache.path} has no {name!r} embeddings (it has {list(cache.names)}); "
                             f"stage 1 needs a cache built with sources named 'new' and 'old'.")
    if len(validation_indices) < 2:
        raise InputError("Stage 1 needs at least 2 validation captions to measure retrieval; raise validation_size.")
    output_dir = Path(config.output_dir)
    batch_size = min(config.batch_size, len(train_indices))
    if batch_size % accelerator.num_processes:
        raise InputError(f"batch_size: {batch_size} does not divide evenly over {accelerator.num_processes} "
                         f"processes; allowed: a multiple of the number of processes.")
    steps_per_epoch = len(train_indices) // batch_size
    total_steps = steps_per_epoch * config.epochs
    total_steps = min(total_steps, config.max_steps) if config.max_steps > 0 else total_steps

    seed_everything(config.seed)
    # ψ lands in the old encoder's space: for an adapter as the old side (a chained upgrade) that is its
    # target's space, not its own id; caches without recorded space ids fall back to the model id
    spaces = {f"{role}_space": cache.space_ids.get(name) or cache.fingerprints[name].removesuffix(":text")
              for role, name in (("source", "new"), ("target", "old"))}
    projection = Projection.build(cache.dims["new"], cache.dims["old"], projection_config, **spaces)
    resuming = resolve_resume(output_dir, config.resume) is not None
    init = ("random" if projection.kind == "orthogonal" else "ridge") if config.init == "auto" else config.init
    fitted: dict[str, Projection] = {}  # baselines fitted here are reused at the end, not fitted twice
    if init != "random" and not resuming:
        if projection.kind == "orthogonal":
            raise InputError("init from a baseline applies to 'linear' and 'mlp' ψ; use init='random' for 'orthogonal'.")
        # the residual MLP starts at zero, so training starts from this closed-form map
        fitted[init] = fit_on_training_pairs(init, cache, train_indices, config.ridge_alpha, **spaces)
        projection.linear.load_state_dict(fitted[init].linear.state_dict())
    learnable = config.learn_temperature and uses_temperature(TEXT_LOSSES, {config.loss: 1.0})
    task = TextStageTask(projection, Temperature(config.temperature, learnable=learnable), cache, train_indices,
                         validation_indices, config, accelerator).to(accelerator.device)
    if not resuming:
        task.history.append({"epoch": 0, "step": 0, **task.validate()})  # the untrained ψ, for comparison
        logger.info("Untrained ψ: %s", _format(task.history[-1]))

    started = time.perf_counter()
    engine.train(task, config, accelerator, total_steps, "stage 1",
                 {"projection": str(asdict(projection_config))})
    summary = None
    if accelerator.is_main_process:
        summary = _finish(task, cache, train_indices, config, projection_config, total_steps,
                          accelerator.num_processes, time.perf_counter() - started, fitted)
    accelerator.wait_for_everyone()
    return summary if summary is not None else json.loads((output_dir / SUMMARY_FILE).read_text())


def fit_on_training_pairs(name: str, cache: EmbeddingCache, train_indices, ridge_alpha: float,
                          **spaces) -> Projection:
    """A training-free baseline ψ fitted on the cached training pairs (streamed from the memory map)."""
    options = {"alpha": ridge_alpha} if name == "ridge" else {}
    return fit_baseline(name, cache.subset("new", train_indices), cache.subset("old", train_indices), **options,
                        **spaces)


def _finish(task: TextStageTask, cache: EmbeddingCache, train_indices, config: TextStageConfig,
            projection_config: ProjectionConfig, total_steps: int, processes: int, seconds: float,
            fitted: dict[str, Projection]) -> dict:
    """Save ψ, fit and score the baselines, write metrics.jsonl and the summary beside ψ."""
    output_dir = Path(config.output_dir)
    task.projection.save_pretrained(output_dir)
    spaces = {"source_space": task.projection.source_space, "target_space": task.projection.target_space}
    scale = float(task.temperature().detach())
    baselines = {}
    for name in config.baseline_names:
        baseline = fitted.get(name) or fit_on_training_pairs(name, cache, train_indices, config.ridge_alpha,
                                                             **spaces)
        baseline.save_pretrained(output_dir / "baselines" / name)
        baselines[name] = evaluate(baseline, task.validation_new, task.validation_old, config.loss, scale,
                                   task.batch_size)
        logger.info("Baseline %s: %s", name, _format(baselines[name]))
    history = task.history
    atomic_write_text(output_dir / METRICS_FILE, "".join(json.dumps(entry) + "\n" for entry in history))
    summary = {
        "stage": "text", "projection": asdict(projection_config), "config": asdict(config),
        "cache": {"path": str(cache.path), "count": cache.count, "dtype": cache.manifest["dtype"],
                  "items_fingerprint": cache.items_fingerprint, "corpus": cache.metadata.get("captions")},
        "spaces": spaces, "train_captions": int(len(train_indices)),
        "validation_captions": int(len(task.validation_new)), "steps": total_steps, "processes": processes,
        "train_seconds": round(seconds, 3), "temperature": 1.0 / scale,
        "untrained": history[0] if history and history[0]["step"] == 0 else None,
        "validation": task.validate(), "history": history, "baselines": baselines,
    }
    atomic_write_json(output_dir / SUMMARY_FILE, summary)
    logger.info("Saved ψ and %s in %s", SUMMARY_FILE, output_dir)
    return summary


def _format(metrics: dict) -> str:
    return ", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in metrics.items() if key not in ("epoch", "step"))


# ----------------------------------------------------------------------------------
# command line: corpus -> cache (encoded once) -> training
# ----------------------------------------------------------------------------------
def pretrain_text(captions: CaptionConfig, cache_config: CacheConfig, models: ModelPairConfig,
                  projection: ProjectionConfig, stage: TextStageConfig, accelerator, encoders=None) -> dict:
    """Read the corpus, encode it once into the cache (or reuse it), then train ψ from the cache alone.

    ``encoders``: the (old, new) backbones when the caller has them loaded already (``xbt fit``);
    otherwise they are loaded here, and only if the cache must be built.
    """
    if models.cache_path:
        cache = EmbeddingCache(models.cache_path)
    else:
        if not (models.old_model and models.new_model):
            raise InputError("Pass both --old_model and --new_model (or --cache_path of an existing cache).")
        corpus = load_captions(captions)  # every corpus error surfaces before a model is loaded
        if encoders is None:
            from ..backbones import load_backbone
            from ..encoders import load_encoder

            encoders = [load_encoder(models.old_model, device=accelerator.device),
                        load_backbone(models.new_model, device=accelerator.device)]
        old, new = encoders
        sources = [text_source("old", old, cache_config.encode_batch_size),
                   text_source("new", new, cache_config.encode_batch_size)]
        cache = build_cache(cache_config.cache_dir, sources, corpus.texts, dtype=cache_config.cache_dtype,
                            shard_size=cache_config.shard_size, process=accelerator,
                            metadata={"captions": corpus.summary()})
        del sources
    train_indices, validation_indices = split_indices(cache.count, captions.validation_size, captions.split_seed)
    return train_text_stage(cache, train_indices, validation_indices, stage, accelerator, projection)

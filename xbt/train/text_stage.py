"""Stage 1: train ψ (new text space → old text space) from an embedding cache alone.

Input: an :class:`~xbt.cache.EmbeddingCache` holding ``new`` and ``old`` text embeddings
of the same captions, and the indices of the training and validation captions. The
text encoders never run here.

The loop, top to bottom: a fixed, seeded batch order per epoch (so a resumed run sees
exactly the batches the killed one would have); each process takes its share of every
global batch; optional Gaussian noise on the input; the paired loss between ψ(new) and
old; AdamW with linear warm-up then cosine decay. Every ``checkpoint_every`` steps the
full state goes to ``OUTPUT/checkpoints/step-N`` through Accelerate's ``save_state``
(written under a temporary name, then renamed: a half-written checkpoint is never
resumed from); ``resume="latest"`` continues from the newest. After every epoch, and
once before training, the validation captions are scored: loss and text→text Recall@K
in the old space (does ψ(new caption) find the old embedding of the same caption
among all validation captions?).

Output: ψ (``config.json`` + ``model.safetensors``, :class:`~xbt.projection.Projection`)
in ``OUTPUT``, with ``training_summary.json`` beside it and the per-epoch metrics in
``metrics.jsonl``. The training-free baselines are fitted on the same training pairs,
saved under ``OUTPUT/baselines/NAME`` and scored on the same validation captions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..baselines import BASELINES, fit_baseline
from ..cache import CacheConfig, EmbeddingCache, build_cache, text_source
from ..config import parse_configs
from ..data.captions import CaptionConfig, load_captions, split_indices
from ..errors import InputError
from ..losses import LOSS_KINDS, Temperature, add_noise, paired_loss
from ..projection import Projection, ProjectionConfig
from .checkpoints import read_progress, resolve_resume, save_checkpoint
from .distributed import gather_rows

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
SUMMARY_FILE, METRICS_FILE = "training_summary.json", "metrics.jsonl"


@dataclass
class TextStageConfig:
    """How ψ is trained. Defaults: residual MLP ψ (ProjectionConfig) started from the ridge fit, symmetric
    InfoNCE, no input noise (noise helped image→text in one generated domain but hurt text→image in another)."""

    output_dir: str = field(default="runs/stage1", metadata={"help": "where ψ, checkpoints and the summary go"})
    loss: str = field(default="infonce", metadata={"help": f"one of {LOSS_KINDS}"})
    noise_std: float = field(default=0.0, metadata={
        "help": "std of Gaussian noise on the normalised new embedding (0.05-0.1 can help image→text transfer)"})
    temperature: float = field(default=0.07, metadata={"help": "initial InfoNCE temperature"})
    learnable_temperature: bool = field(default=True, metadata={"help": "learn the InfoNCE temperature"})
    epochs: int = field(default=10, metadata={"help": "passes over the training captions"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: run all epochs)"})
    batch_size: int = field(default=256, metadata={"help": "global batch size (split across processes)"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of all steps spent warming up"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between checkpoints (0: epoch ends only)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many newest checkpoints to keep"})
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder to continue from"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, batch order and noise"})
    baselines: str = field(default="procrustes,ridge", metadata={
        "help": f"comma-separated training-free baselines to fit and score beside ψ ({', '.join(BASELINES)}; '' for none)"})
    ridge_alpha: float = field(default=1e-3, metadata={"help": "L2 penalty of the ridge baseline"})
    init: str = field(default="auto", metadata={
        "help": "start ψ's linear map 'random' or from the 'ridge' / 'procrustes' fit on the training pairs; "
                "'auto': ridge for linear and mlp ψ, random for orthogonal"})
    cpu: bool = field(default=False, metadata={"help": "train on the CPU even when a GPU is present"})

    def __post_init__(self):
        if self.loss not in LOSS_KINDS:
            raise InputError(f"loss must be one of {LOSS_KINDS}, got {self.loss!r}.")
        if self.epochs < 1 or self.batch_size < 2:
            raise InputError("epochs must be >= 1 and batch_size >= 2.")
        if self.noise_std < 0 or not 0 <= self.warmup_ratio < 1:
            raise InputError("noise_std must be >= 0 and warmup_ratio in [0, 1).")
        if self.init not in ("auto", "random", *BASELINES):
            raise InputError(f"init must be 'auto', 'random' or one of {sorted(BASELINES)}, got {self.init!r}.")
        unknown = set(self.baseline_names) - set(BASELINES)
        if unknown:
            raise InputError(f"Unknown baselines {sorted(unknown)}; choose from {sorted(BASELINES)}.")

    @property
    def baseline_names(self) -> list[str]:
        return [name.strip() for name in self.baselines.split(",") if name.strip()]


class TextStageModel(nn.Module):
    """ψ and the temperature as one module, so DDP synchronises both."""

    def __init__(self, projection: Projection, temperature: Temperature):
        super().__init__()
        self.projection, self.temperature = projection, temperature

    def forward(self, new_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projection(new_embeddings), self.temperature()


# ----------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(projection: nn.Module, new: torch.Tensor, old: torch.Tensor, loss: str, logit_scale: float,
             batch_size: int, chunk: int = 1024) -> dict[str, float]:
    """Validation loss (fixed batches, no noise) and text→text Recall@K (%) of ψ(new) against old."""
    projection.eval()
    device = next(projection.parameters()).device
    new, old = new.to(device), old.to(device)
    queries = torch.cat([projection(new[i:i + chunk]) for i in range(0, len(new), chunk)])
    losses = [float(paired_loss(loss, queries[i:i + batch_size], old[i:i + batch_size], logit_scale))
              for i in range(0, len(old), batch_size) if min(batch_size, len(old) - i) > 1]
    ranks = []  # how many gallery items score strictly above the true one
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ old.T
        rows = torch.arange(len(scores), device=device)
        true = scores[rows, rows + start]
        ranks.append((scores > true[:, None]).sum(dim=1))
    ranks = torch.cat(ranks)
    projection.train()
    metrics = {"loss": float(np.mean(losses)) if losses else float("nan")}
    metrics.update({f"R@{k}": round(100.0 * float((ranks < k).double().mean()), 4) for k in RECALL_KS})
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
    projection_config: ProjectionConfig = ProjectionConfig(),
    accelerator=None,
) -> dict:
    """Train ψ on the cached (new, old) pairs of ``train_indices``; returns the summary (also written to disk)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    for name in ("new", "old"):
        if name not in cache.names:
            raise InputError(f"Cache {cache.path} has no {name!r} embeddings (it has {list(cache.names)}); "
                             f"stage 1 needs a cache built with sources named 'new' and 'old'.")
    if len(validation_indices) < 2:
        raise InputError("Stage 1 needs at least 2 validation captions to measure retrieval; raise validation_size.")
    accelerator = accelerator or Accelerator(cpu=config.cpu, step_scheduler_with_optimizer=False)
    output_dir = Path(config.output_dir)
    batch_size = min(config.batch_size, len(train_indices))
    if batch_size % accelerator.num_processes:
        raise InputError(f"batch_size {batch_size} must divide evenly over {accelerator.num_processes} processes.")
    steps_per_epoch = len(train_indices) // batch_size
    total_steps = steps_per_epoch * config.epochs
    total_steps = min(total_steps, config.max_steps) if config.max_steps > 0 else total_steps
    checkpoint_every = config.checkpoint_every or steps_per_epoch

    set_seed(config.seed)
    spaces = {"source_space": cache.fingerprints["new"].removesuffix(":text"),
                    "target_space": cache.fingerprints["old"].removesuffix(":text")}
    projection = Projection.build(cache.dims["new"], cache.dims["old"], projection_config, **spaces)
    checkpoint = resolve_resume(output_dir, config.resume)
    init = ("random" if projection.kind == "orthogonal" else "ridge") if config.init == "auto" else config.init
    fitted: dict[str, Projection] = {}  # baselines fitted here are reused at the end, not fitted twice
    if init != "random" and checkpoint is None:
        if projection.kind == "orthogonal":
            raise InputError("init from a baseline applies to 'linear' and 'mlp' ψ; use init='random' for 'orthogonal'.")
        # the residual MLP starts at zero, so training starts from this closed-form map
        fitted[init] = fit_on_training_pairs(init, cache, train_indices, config.ridge_alpha, **spaces)
        projection.linear.load_state_dict(fitted[init].linear.state_dict())
    # cosine and MSE use no temperature; a trainable one without gradients would break DDP.
    learnable = config.learnable_temperature and config.loss == "infonce"
    model = TextStageModel(projection, Temperature(config.temperature, learnable=learnable))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)

    validation_new = cache.tensor("new", validation_indices)
    validation_old = cache.tensor("old", validation_indices)

    def validate() -> dict[str, float]:
        return evaluate(unwrapped.projection, validation_new, validation_old, config.loss,
                        float(unwrapped.temperature().detach()), batch_size)

    step, history, epoch_loss = 0, [], 0.0  # epoch_loss: sum of this epoch's batch losses so far
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        progress = read_progress(checkpoint)
        step, history, epoch_loss = progress["step"], progress["history"], progress["epoch_loss"]
        logger.info("Resumed from %s at step %d of %d", checkpoint, step, total_steps)
    else:
        history.append({"epoch": 0, "step": 0, **validate()})  # the untrained ψ, for comparison
        logger.info("Untrained ψ: %s", _format(history[-1]))

    started = time.perf_counter()
    rank, processes = accelerator.process_index, accelerator.num_processes
    batches, batches_epoch = None, -1
    model.train()
    with tqdm(total=total_steps, initial=step, desc="stage 1", unit="step",
              disable=not accelerator.is_main_process) as bar:
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            if epoch != batches_epoch:
                batches, batches_epoch = epoch_batches(train_indices, batch_size, config.seed, epoch), epoch
            rows = np.sort(batches[position][rank::processes])  # sorted rows read the memory map in order
            new, old = cache.tensor("new", rows).to(accelerator.device), cache.tensor("old", rows).to(accelerator.device)
            noise = torch.Generator().manual_seed(config.seed * 1_000_003 + step * processes + rank)
            new = add_noise(new, config.noise_std, generator=noise) if config.noise_std else new

            predictions, logit_scale = model(new)
            # the loss of the global batch: N processes train like one with the same batch size
            loss = paired_loss(config.loss, gather_rows(predictions), gather_rows(old), logit_scale)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_loss += loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")

            if step % steps_per_epoch == 0:
                train_loss, epoch_loss = epoch_loss / steps_per_epoch, 0.0
                history.append({"epoch": step // steps_per_epoch, "step": step, "train_loss": train_loss, **validate()})
                logger.info("Epoch %d: %s", history[-1]["epoch"], _format(history[-1]))
            if step % checkpoint_every == 0 or step == total_steps:
                progress = {"step": step, "history": history, "epoch_loss": epoch_loss}
                save_checkpoint(accelerator, output_dir, progress, config.keep_checkpoints)

    summary = None
    if accelerator.is_main_process:
        summary = _finish(unwrapped, cache, train_indices, validation_new, validation_old, config, projection_config,
                          history, total_steps, processes, time.perf_counter() - started, validate(), fitted)
    accelerator.wait_for_everyone()
    return summary if summary is not None else json.loads((output_dir / SUMMARY_FILE).read_text())


def fit_on_training_pairs(name: str, cache: EmbeddingCache, train_indices, ridge_alpha: float,
                          **spaces) -> Projection:
    """A training-free baseline ψ fitted on the cached training pairs (streamed from the memory map)."""
    options = {"alpha": ridge_alpha} if name == "ridge" else {}
    return fit_baseline(name, cache.subset("new", train_indices), cache.subset("old", train_indices), **options,
                        **spaces)


def _finish(model: TextStageModel, cache: EmbeddingCache, train_indices, validation_new, validation_old,
            config: TextStageConfig, projection_config: ProjectionConfig, history, total_steps, processes, seconds,
            final, fitted: dict[str, Projection]) -> dict:
    """Save ψ, fit and score the baselines, write metrics.jsonl and the summary beside ψ."""
    output_dir = Path(config.output_dir)
    model.projection.save_pretrained(output_dir)
    spaces = {"source_space": model.projection.source_space,
                    "target_space": model.projection.target_space}
    baselines = {}
    for name in config.baseline_names:
        baseline = fitted.get(name) or fit_on_training_pairs(name, cache, train_indices, config.ridge_alpha,
                                                             **spaces)
        baseline.save_pretrained(output_dir / "baselines" / name)
        baselines[name] = evaluate(baseline, validation_new, validation_old, config.loss,
                                   float(model.temperature().detach()), min(config.batch_size, len(train_indices)))
        logger.info("Baseline %s: %s", name, _format(baselines[name]))
    with (output_dir / METRICS_FILE).open("w") as handle:
        handle.writelines(json.dumps(entry) + "\n" for entry in history)
    summary = {
        "stage": "text", "projection": asdict(projection_config), "config": asdict(config),
        "cache": {"path": str(cache.path), "count": cache.count, "dtype": cache.manifest["dtype"],
                  "items_fingerprint": cache.items_fingerprint, "corpus": cache.metadata.get("captions")},
        "spaces": spaces, "train_captions": int(len(train_indices)),
        "validation_captions": int(len(validation_new)), "steps": total_steps, "processes": processes,
        "train_seconds": round(seconds, 3), "temperature": 1.0 / float(model.temperature().detach()),
        "untrained": history[0] if history and history[0]["step"] == 0 else None,
        "validation": final, "history": history, "baselines": baselines,
    }
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    logger.info("Saved ψ and %s in %s", SUMMARY_FILE, output_dir)
    return summary


def _format(metrics: dict) -> str:
    return ", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in metrics.items() if key not in ("epoch", "step"))


# ----------------------------------------------------------------------------------
# command line: corpus -> cache (encoded once) -> training
# ----------------------------------------------------------------------------------
@dataclass
class ModelPairConfig:
    """The two frozen text encoders, or an existing cache that already holds their embeddings."""

    old_model: str = field(default="", metadata={"help": "reference of the OLD model (the space to land in)"})
    new_model: str = field(default="", metadata={"help": "reference of the NEW model"})
    cache_path: str | None = field(default=None, metadata={
        "help": "train from this complete cache folder (with 'new' and 'old' text embeddings); no model is loaded"})


def pretrain_text(captions: CaptionConfig, cache_config: CacheConfig, models: ModelPairConfig,
                  projection: ProjectionConfig, stage: TextStageConfig) -> dict:
    """Read the corpus, encode it once into the cache (or reuse it), then train ψ from the cache alone."""
    from accelerate import Accelerator

    from ..backbones import load_backbone

    accelerator = Accelerator(cpu=stage.cpu, step_scheduler_with_optimizer=False)
    if models.cache_path:
        cache = EmbeddingCache(models.cache_path)
    else:
        if not (models.old_model and models.new_model):
            raise InputError("Pass both --old_model and --new_model (or --cache_path of an existing cache).")
        corpus = load_captions(captions)  # every corpus error surfaces before a model is loaded
        old, new = (load_backbone(reference, device=accelerator.device)
                    for reference in (models.old_model, models.new_model))
        sources = [text_source("old", old, cache_config.encode_batch_size),
                   text_source("new", new, cache_config.encode_batch_size)]
        cache = build_cache(cache_config.cache_dir, sources, corpus.texts, dtype=cache_config.cache_dtype,
                            shard_size=cache_config.shard_size, process=accelerator,
                            metadata={"captions": corpus.summary()})
        del old, new, sources
    train_indices, validation_indices = split_indices(cache.count, captions.validation_size, captions.split_seed)
    return train_text_stage(cache, train_indices, validation_indices, stage, projection, accelerator)


CONFIGS = (CaptionConfig, CacheConfig, ModelPairConfig, ProjectionConfig, TextStageConfig)


def run(argv: Sequence[str]) -> int:
    """``xbt pretrain-text``: train ψ from the new model's text space into the old one's, on captions alone."""
    configs = parse_configs(CONFIGS, argv, prog="xbt pretrain-text", description=run.__doc__)
    summary = pretrain_text(*configs)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps({"output_dir": configs[-1].output_dir, "untrained": summary["untrained"],
                          "validation": summary["validation"], "baselines": summary["baselines"]}, indent=2))
    return 0

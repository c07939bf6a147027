"""Stage 2: train LoRA adapters (and ψ) on image–text pairs so the new model lands in the old space.

The same script runs with ``python`` and with ``accelerate launch`` on one or several
processes, GPUs or nodes::

    xbt train --new_model hf:/models/new --old_model open_clip:local-dir:/models/old \\
        --projection runs/stage1 --source data/train --output_dir runs/stage2 \\
        [--old_image_embeddings gallery.npy --old_image_ids ids.txt] [--resume latest]
    accelerate launch scripts/train_adapter.py CONFIG.yaml

Loss terms (each weight configurable; ``None`` = the measured default):

- ``new_new``: symmetric InfoNCE between ψ(new image) and ψ(new text) of the batch;
- ``anchor``: 1 − cos(ψ(new text), old text embedding of the same caption);
- ``text_to_old_image``: InfoNCE of ψ(new text) against ALL stored old image embeddings
  (the text→image compatibility cell itself);
- ``image_to_old_text``: InfoNCE of ψ(new image) against the old caption embeddings of
  ALL training images (per image, the normalised mean of its captions' embeddings, so
  an image's other captions are never negatives).

For large galleries ``bank_negatives`` draws that many stored rows per step (plus the
batch's positives) instead of using all of them.

Defaults: with stored old image embeddings, new_new + both cross terms (no anchor) was
best; without them, new_new + anchor. With no old-space term at all the adapter drifts
out of the old space (a negative control; a warning says so).

Batches of all processes are gathered (with gradients) before the loss, so every
process computes the loss of the global batch and a run on N processes follows the
same trajectory as one process with the same global batch.

Output: ``OUTPUT_DIR/adapter/`` (an XBTModel directory) and ``OUTPUT_DIR/checkpoints/step-N/``
(LoRA + ψ + temperature + optimizer + scheduler + RNG + data position, via ``save_state``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..backbones import load_backbone
from ..cache import CacheConfig
from ..config import parse_configs
from ..data.pairs import PairDataConfig, iter_captions, make_pair_loader, open_pairs, set_loader_epoch
from ..errors import InputError, XBTError
from ..losses import Temperature, WeightedLoss, cosine_loss, info_nce
from ..model import AdapterConfig, XBTModel
from ..projection import Projection
from .checkpoints import latest_checkpoint, read_progress, resolve_resume, save_checkpoint
from .distributed import gather_rows
from .targets import OldSpaceTargets, build_targets, old_text_source

logger = logging.getLogger(__name__)

TERMS = ("new_new", "anchor", "text_to_old_image", "image_to_old_text")
ADAPTER_DIR = "adapter"


class TrainingDivergedError(XBTError):
    """The loss became NaN or infinite."""


@dataclass
class PairStageConfig:
    """Stage-2 models, loss and optimisation. Data, LoRA and cache options are separate dataclasses."""

    new_model: str = field(metadata={"help": "reference of the NEW model (gets the adapters)"})
    old_model: str = field(metadata={"help": "reference of the OLD model (its text encoder fills the caption cache)"})
    projection: str = field(metadata={"help": "folder of the stage-1 ψ (Projection.save_pretrained)"})
    output_dir: str = field(metadata={"help": "run folder: adapter/ and checkpoints/ are written here"})
    old_image_embeddings: str | None = field(default=None, metadata={
        "help": "stored OLD image embeddings of the training images (.npy/.safetensors/.faiss): enables the "
                "gallery-aware terms"})
    old_image_ids: str | None = field(default=None, metadata={
        "help": "ids of those embeddings, one per line (default: ids stored in the file, else row numbers)"})
    new_new_weight: float = 1.0
    anchor_weight: float | None = field(default=None, metadata={"help": "default: 1 without a gallery, else 0"})
    text_to_old_image_weight: float | None = field(default=None, metadata={"help": "default: 1 with a gallery"})
    image_to_old_text_weight: float | None = field(default=None, metadata={"help": "default: 1 with a gallery"})
    bank_negatives: int = field(default=0, metadata={
        "help": "stored vectors drawn per step as negatives of the cross terms (0: all of them)"})
    temperature: float = 0.07
    learn_temperature: bool = True
    train_projection: bool = True
    max_steps: int = 800
    learning_rate: float = 5e-4
    projection_learning_rate: float | None = field(default=None, metadata={"help": "default: learning_rate"})
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (where the device supports it)"})
    gradient_checkpointing: bool = False
    save_steps: int = 200
    save_total_limit: int = 2
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    log_steps: int = 10
    report_to: str = field(default="none", metadata={"help": "none, tensorboard, wandb or all"})

    def __post_init__(self):
        if self.max_steps < 1 or self.save_steps < 1 or self.gradient_accumulation_steps < 1:
            raise InputError("max_steps, save_steps and gradient_accumulation_steps must be positive.")

    def loss_weights(self, has_gallery: bool) -> dict[str, float]:
        """The weight of every term, defaults filled in by whether old image embeddings exist."""
        if not has_gallery and (self.text_to_old_image_weight or 0) > 0:
            raise InputError("text_to_old_image_weight needs --old_image_embeddings (the stored old image "
                             "embeddings of the training images).")
        cross = 1.0 if has_gallery else 0.0
        weights = {
            "new_new": self.new_new_weight,
            "anchor": self.anchor_weight if self.anchor_weight is not None else 1.0 - cross,
            "text_to_old_image": _default(self.text_to_old_image_weight, cross),
            "image_to_old_text": _default(self.image_to_old_text_weight, cross),
        }
        if not any(weights[name] > 0 for name in TERMS[1:]):
            logger.warning("No old-space loss term: the adapter will drift out of the old space "
                           "(only useful as a negative control).")
        return weights


def _default(value: float | None, default: float) -> float:
    return default if value is None else value


# ---------------------------------------------------------------------------------
# The objective: the model, the temperature and the loss, wrapped together for DDP
# ---------------------------------------------------------------------------------
class PairObjective(nn.Module):
    """Loss of a batch. Everything trainable lives here so DDP synchronises all of it.

    Its ``state_dict`` holds only the trainable tensors (LoRA, ψ when trained, the
    temperature): checkpoints never copy the frozen backbone.
    """

    def __init__(self, model: XBTModel, weights: dict[str, float], temperature: Temperature,
                 targets: OldSpaceTargets | None, bank_negatives: int = 0, seed: int = 0):
        super().__init__()
        self.model, self.temperature, self.targets = model, temperature, targets
        self.loss = WeightedLoss(weights)
        self.bank_negatives, self.seed = bank_negatives, seed
        # Hooks, not state_dict overrides: they also run when DDP wraps this module as a child.
        self.register_state_dict_post_hook(_keep_trainable_only)
        self.register_load_state_dict_post_hook(_frozen_is_not_missing)

    def forward(self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor], positions: torch.Tensor,
                caption_indices: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        image, text = self.model(pixels, tokens)
        image, text = gather_rows(image), gather_rows(text)
        positions, caption_indices = gather_rows(positions), gather_rows(caption_indices)
        scale = self.temperature()
        targets = self.targets
        rows, bank_positives = self.bank_rows(positions, step)
        terms = {
            "new_new": lambda: info_nce(image, text, scale),
            "anchor": lambda: cosine_loss(text, targets.captions[targets.caption_rows(positions, caption_indices)]),
            "text_to_old_image": lambda: info_nce(text, targets.images[rows], scale, positives=bank_positives,
                                                  symmetric=False),
            "image_to_old_text": lambda: info_nce(image, targets.caption_means[rows], scale,
                                                  positives=bank_positives, symmetric=False),
        }
        return self.loss(terms)

    def bank_rows(self, positions: torch.Tensor, step: int) -> tuple[torch.Tensor | slice, torch.Tensor]:
        """Rows of the stored banks used as keys this step, and where each positive sits among them.

        All rows by default; with ``bank_negatives`` a sample of that many (seeded by the
        step, so every process draws the same) plus the batch's positives.
        """
        count = 0 if self.targets is None else len(self.targets.caption_means)
        if not self.bank_negatives or self.bank_negatives >= count:
            return slice(None), positions
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        sample = torch.randint(0, count, (self.bank_negatives,), generator=generator).to(positions.device)
        rows = torch.unique(torch.cat([positions, sample]))  # sorted
        return rows, torch.searchsorted(rows, positions)

    def trainable_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}


def _keep_trainable_only(module: PairObjective, state_dict, prefix: str, local_metadata) -> None:
    """Checkpoints hold the trained weights only: the frozen backbone is rebuilt from its reference."""
    trainable = module.trainable_names()
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in trainable]:
        del state_dict[key]


def _frozen_is_not_missing(module: PairObjective, incompatible) -> None:
    """The frozen backbone is deliberately absent from checkpoints; a missing trainable weight still fails."""
    trainable = module.trainable_names()
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if any(k == name or k.endswith("." + name) for name in trainable)]


def every_rank_has_examples(accelerator, batch: dict) -> bool:
    """False when any process's batch lost every example to bad data (the ranks must skip together)."""
    count = torch.tensor([len(batch["ids"])], device=accelerator.device)
    return bool((accelerator.gather(count) > 0).all()) if accelerator.num_processes > 1 else bool(count.item())


class TrainingProgress:
    """Step, epoch and batch position in the epoch; saved with every checkpoint (data position)."""

    def __init__(self):
        self.step = self.epoch = self.batch = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])


# ---------------------------------------------------------------------------------
# The training run
# ---------------------------------------------------------------------------------
def train(config: PairStageConfig, data: PairDataConfig, adapter: AdapterConfig | None = None,
          cache: CacheConfig | None = None) -> Path:
    """Run stage 2; returns the adapter folder. Resumable (``config.resume``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    adapter, cache = adapter or AdapterConfig(), cache or CacheConfig()
    output = Path(config.output_dir)
    # The scheduler is stepped by hand once per optimiser step (not once per process, accelerate's default).
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                              step_scheduler_with_optimizer=False,
                              mixed_precision=config.mixed_precision,
                              log_with=None if config.report_to == "none" else config.report_to,
                              project_dir=str(output))
    set_seed(data.seed)

    # Models: the frozen new backbone gets LoRA; ψ starts from stage 1.
    backbone = load_backbone(config.new_model, device=accelerator.device)
    projection = Projection.from_pretrained(config.projection)
    model = XBTModel(backbone, projection, adapter, old_reference=config.old_model)
    projection.requires_grad_(config.train_projection)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(backbone.model)

    # Data and the old-space targets of every training pair.
    source = open_pairs(data)
    loader = make_pair_loader(source, backbone.preprocess, rank=accelerator.process_index,
                              world_size=accelerator.num_processes)
    images = "streamed" if source.streamed else len(source)  # tar shards have no length up front
    has_gallery = config.old_image_embeddings is not None
    weights = config.loss_weights(has_gallery)
    targets, position_of = None, {}
    if any(weights[name] > 0 for name in TERMS[1:]):
        listing = list(iter_captions(source))
        ids, captions = [i for i, _ in listing], [c for _, c in listing]
        position_of = {identifier: position for position, identifier in enumerate(ids)}
        old_text = old_text_source(config.old_model, projection.target_space, projection.old_dim,
                                   accelerator.device, batch_size=cache.encode_batch_size)
        targets = build_targets(ids, captions, old_text, cache, config.old_image_embeddings, config.old_image_ids,
                                process=accelerator).to(accelerator.device)

    # A temperature no weighted InfoNCE term uses must not train: DDP refuses parameters without gradients.
    uses_temperature = any(weights[name] > 0 for name in ("new_new", "text_to_old_image", "image_to_old_text"))
    temperature = Temperature(config.temperature, config.learn_temperature and uses_temperature)
    objective = PairObjective(model, weights, temperature, targets,
                              config.bank_negatives, data.seed)
    objective.to(accelerator.device)
    groups = [{"params": model.lora_parameters(), "lr": config.learning_rate},
              {"params": list(objective.temperature.parameters()), "lr": config.learning_rate, "weight_decay": 0.0}]
    if config.train_projection:
        groups.append({"params": list(projection.parameters()),
                       "lr": config.projection_learning_rate or config.learning_rate})
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    progress = TrainingProgress()
    checkpoint = resolve_resume(output, config.resume)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        progress.load_state_dict(read_progress(checkpoint))
        logger.info("Resumed from %s at step %d", checkpoint, progress.step)
    if config.report_to != "none":
        accelerator.init_trackers("xbt-stage2", config={**_flat(config), **_flat(data), **_flat(adapter)})
        if not accelerator.trackers:
            logger.warning("report_to=%s: no such tracker is installed (pip install tensorboard / wandb); "
                           "progress goes to the log only.", config.report_to)

    logger.info("Stage 2: %s images, %d process(es), global batch %d, %d steps, loss weights %s", images,
                accelerator.num_processes,
                data.batch_size * accelerator.num_processes * config.gradient_accumulation_steps,
                config.max_steps, {k: v for k, v in weights.items() if v > 0})
    objective.train()
    bar = tqdm(total=config.max_steps, initial=progress.step, desc="stage 2", disable=not accelerator.is_main_process)
    quality, terms, finished_pass = source.new_quality(accelerator.num_processes), {}, None
    while progress.step < config.max_steps:
        set_loader_epoch(loader, progress.epoch)
        batches = _skip(loader, progress.batch)
        for batch in batches:
            quality.update(batch)
            if not every_rank_has_examples(accelerator, batch):
                progress.batch += 1  # all of some rank's examples were unusable: skip this step everywhere
                continue
            positions = _positions(batch, position_of)
            with accelerator.accumulate(objective):
                loss, terms = objective(batch["images"].to(accelerator.device),
                                        {k: v.to(accelerator.device) for k, v in
                                         backbone.tokenize(batch["captions"]).items()},
                                        positions.to(accelerator.device),
                                        batch["caption_indices"].to(accelerator.device), progress.step)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"Stage 2 loss became {float(loss.detach())} at step {progress.step + 1} (terms {terms}). "
                        f"The last good checkpoint is {latest_checkpoint(output) or 'none'}; lower the learning rate and "
                        f"resume from it with --resume latest.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(objective.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            progress.batch += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            progress.step += 1
            bar.update(1)
            if progress.step % config.log_steps == 0 or progress.step == config.max_steps:
                logs = {"loss": float(loss.detach()), **terms, "lr": scheduler.get_last_lr()[0],
                        "temperature": 1.0 / float(accelerator.unwrap_model(objective).temperature().detach())}
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                accelerator.log(logs, step=progress.step)
                logger.debug("step %d: %s", progress.step, logs)
            if progress.step % config.save_steps == 0 or progress.step == config.max_steps:
                _save_checkpoint(accelerator, objective, output, progress, config.save_total_limit)
            if progress.step >= config.max_steps:
                break
        else:
            finished_pass = quality.finish().to_dict()
            quality = source.new_quality(accelerator.num_processes)
            progress.epoch, progress.batch = progress.epoch + 1, 0
    bar.close()

    folder = output / ADAPTER_DIR
    check_replicas_identical(accelerator, objective)
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(objective).model
        trained.training_summary = {
            "steps": progress.step, "loss_weights": weights, "final_loss_terms": terms,
            "global_batch_size": data.batch_size * accelerator.num_processes * config.gradient_accumulation_steps,
            "processes": accelerator.num_processes, "learning_rate": config.learning_rate,
            "train_projection": config.train_projection, "data": source.description,
            "images": images, "seed": data.seed, "gallery_aware": has_gallery, "replicas_identical": True,
            "data_quality": finished_pass or quality.to_dict(),  # of the main process's share of the data
        }
        trained.save_pretrained(folder)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return folder


def check_replicas_identical(accelerator, objective: nn.Module) -> None:
    """Every process must end with the same weights (else they trained independent copies)."""
    trainable = [p.detach() for p in accelerator.unwrap_model(objective).parameters() if p.requires_grad]
    checksum = torch.stack([torch.stack([p.double().sum(), p.double().pow(2).sum()]) for p in trainable]).flatten()
    gathered = accelerator.gather(checksum[None])
    if not bool((gathered == gathered[0]).all()):
        raise XBTError(f"The {accelerator.num_processes} processes ended with different weights: they were not "
                       f"synchronised. On CPU, launch with ACCELERATE_USE_CPU=true (see the README).")


def _skip(loader, batches: int):
    from accelerate import skip_first_batches

    return skip_first_batches(loader, batches) if batches else loader


def _positions(batch: dict[str, Any], position_of: dict[str, int]) -> torch.Tensor:
    if not position_of:
        return batch["indices"]
    return torch.tensor([position_of[identifier] for identifier in batch["ids"]], dtype=torch.long)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (transformers or open_clip)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    else:
        raise InputError(f"{type(model).__name__} offers no gradient checkpointing; drop --gradient_checkpointing.")


# ---------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------
def _save_checkpoint(accelerator, objective: nn.Module, output: Path, progress: TrainingProgress, keep: int) -> None:
    """Refuse to checkpoint NaN/inf weights: the last good checkpoint must stay the newest one."""
    unwrapped = accelerator.unwrap_model(objective)
    if not all(torch.isfinite(p).all() for p in unwrapped.parameters() if p.requires_grad):
        raise TrainingDivergedError(f"Trainable weights became NaN/inf at step {progress.step}; not checkpointing "
                                    f"them. The last good checkpoint is {latest_checkpoint(output) or 'none'}.")
    save_checkpoint(accelerator, output, progress.state_dict(), keep)


def _flat(config) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(config).items()}


# ---------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------
CONFIG_TYPES = (PairStageConfig, PairDataConfig, AdapterConfig, CacheConfig)


def run(argv: list[str] | None = None) -> int:
    """``xbt train``: parse flags and/or ``--config FILE`` (YAML/JSON), train, print the adapter folder."""
    config, data, adapter, cache = parse_configs(CONFIG_TYPES, argv or [], prog="xbt train",
                                                 description="Stage 2: train LoRA adapters + ψ on image-text pairs.")
    folder = train(config, data, adapter, cache)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(folder)
    return 0


def main() -> int:
    """Entry point of ``scripts/train_adapter.py`` (plain python or ``accelerate launch``)."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(sys.argv[1:])
    except XBTError as error:
        print(f"train_adapter: error: {error}", file=sys.stderr)
        return 2


"""Stage 2: train LoRA adapters (and ψ) on image–text pairs so the new model lands in the old space.

The same script runs with ``python`` and with ``accelerate launch`` on one or several
processes, GPUs or nodes::

    xbt train --new_model hf:/models/new --old_model open_clip:local-dir:/models/old \\
        --projection runs/stage1 --source data/train --output_dir runs/stage2 \\
        [--old_image_embeddings gallery.npy --old_image_ids ids.txt] [--resume latest]
    accelerate launch scripts/train_adapter.py CONFIG.yaml

Loss terms (:data:`xbt.losses.PAIR_TERMS`; weights by name with ``loss_weights``, e.g.
``new_new=1,anchor=0.5``; terms not named take their measured default):

- ``new_new``: symmetric InfoNCE between ψ(new image) and ψ(new text) of the batch;
- ``anchor``: 1 − cos(ψ(new text), old text embedding of the same caption);
- ``text_to_old_image``: InfoNCE of ψ(new text) against ALL stored old image embeddings
  (the text→image compatibility cell itself);
- ``image_to_old_text``: InfoNCE of ψ(new image) against the old caption embeddings of
  ALL training images (per image, the normalised mean of its captions' embeddings, so
  an image's other captions are never negatives);
- ``full_new`` (BT²/OCA, a ψ with extra dims only; on by default there): symmetric InfoNCE
  between the full normalised ψ outputs (old dims + extra dims) of new image and new text,
  the new model's own objective, so the extra dims are trained to hold what the old space cannot.
- ``uncertainty`` (with stored old image embeddings; on by default there): FastFill's side head
  (:mod:`xbt.uncertainty`) learns from each stored old vector how unsure it is of the adapter's
  vector of that item; it trains only the head (detached target, its own gradient clipping) and
  is saved in the adapter as ``uncertainty/``, which the ``uncertainty`` backfill ordering reads.

For large galleries ``bank_negatives`` draws that many stored rows per step (plus the
batch's positives) instead of using all of them.

Defaults: with stored old image embeddings, new_new + both cross terms (no anchor) was
best; without them, new_new + anchor. With no old-space term at all the adapter drifts
out of the old space (a negative control; a warning says so).

``batch_size`` is the global batch: each of N processes loads ``batch_size / N``. Batches of all processes are gathered (with gradients) before the loss, so every
process computes the loss of the global batch and a run on N processes follows the
same trajectory as one process with the same global batch.

Training runs through the one loop (:func:`xbt.train.engine.train`) as a
:class:`PairTask`. Output: ``OUTPUT_DIR/adapter/`` (an XBTModel directory) and ``OUTPUT_DIR/checkpoints/step-N/``
(LoRA + ψ + temperature + optimizer + scheduler + RNG + data position, via ``save_state``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.config import CacheConfig, PairDataConfig, PairSourceConfig
from ..data.pairs import iter_captions, make_pair_loader, open_pairs, set_loader_epoch
from ..errors import InputError, XBTError
from ..losses import PAIR_TERMS, Temperature, resolve_weights, uses_temperature
from ..adapter_config import AdapterConfig
from ..model import XBTModel
from ..projection import Projection
from ..uncertainty import UncertaintyHead
from . import engine
from .config import PairStageConfig
from .distributed import gather_rows
from .engine import TrainingDivergedError, seed_everything
from .targets import OldSpaceTargets, build_targets, old_model_id, old_text_source

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
__all__ = ["PairTask", "TrainingDivergedError", "train"]


def provided_by(config: PairStageConfig, extra_dims: int = 0) -> frozenset[str]:
    """What this run's data and ψ (with ``extra_dims``) give the loss terms (see :data:`xbt.losses.NEEDS`)."""
    return frozenset({"old_captions"} | ({"old_images"} if config.old_image_embeddings else set())
                     | ({"extra_dims"} if extra_dims else set()))


def loss_weights(config: PairStageConfig, extra_dims: int = 0) -> dict[str, float]:
    """The weight of every stage-2 term: the given ones, the rest their defaults for this run's data and ψ."""
    return resolve_weights(PAIR_TERMS, config.given_weights, provided_by(config, extra_dims))


# ---------------------------------------------------------------------------------
# The task: the model, the temperature and the loss terms, wrapped together for DDP
# ---------------------------------------------------------------------------------
@dataclass
class PairInputs:
    """What a stage-2 loss term reads: the gathered global batch and its old-space targets."""

    image: torch.Tensor  # ψ(new image), (N, d_old)
    text: torch.Tensor  # ψ(new text) of the caption each example shows, (N, d_old)
    full_image: torch.Tensor | None  # the full normalised ψ outputs, (N, d_old + extra_dims); None without extra dims
    full_text: torch.Tensor | None
    targets: OldSpaceTargets | None
    positions: torch.Tensor  # row of each example in the banks
    caption_indices: torch.Tensor
    rows: torch.Tensor | slice  # bank rows used as keys this step
    bank_positives: torch.Tensor  # where each example's positive sits among ``rows``
    uncertainty: tuple[torch.Tensor, torch.Tensor] | None = None  # the head's (mean, log σ²) of each example

    def old_caption(self) -> torch.Tensor:
        return self.targets.captions[self.targets.caption_rows(self.positions, self.caption_indices)]

    def old_images(self) -> torch.Tensor:
        return self.targets.images[self.rows]

    def old_caption_means(self) -> torch.Tensor:
        return self.targets.caption_means[self.rows]


def bank_rows(count: int, positions: torch.Tensor, bank_negatives: int, seed: int,
              step: int) -> tuple[torch.Tensor | slice, torch.Tensor]:
    """Rows of the stored banks (``count`` rows) used as keys this step, and where each positive sits among them.

    All rows by default; with ``bank_negatives`` a sample of that many (seeded by the
    step, so every process draws the same) plus the batch's positives.
    """
    if not bank_negatives or bank_negatives >= count:
        return slice(None), positions
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    sample = torch.randint(0, count, (bank_negatives,), generator=generator).to(positions.device)
    rows = torch.unique(torch.cat([positions, sample]))  # sorted
    return rows, torch.searchsorted(rows, positions)


class PairTask(nn.Module):
    """Stage 2 as an engine task. Everything trainable lives here so DDP synchronises all of it.

    Its ``state_dict`` holds only the trainable tensors (LoRA, ψ when trained, the
    temperature): checkpoints never copy the frozen backbone. Batches come from the pair
    loader; every batch is counted for data quality (a pass's summary at each epoch end).
    """

    def __init__(self, model: XBTModel, weights: dict[str, float], temperature: Temperature,
                 targets: OldSpaceTargets | None, config: PairStageConfig, *, position_of: dict[str, int] | None = None,
                 loader=None, source=None, world_size: int = 1, uncertainty_head: UncertaintyHead | None = None):
        super().__init__()
        self.model, self.temperature, self.targets = model, temperature, targets
        self.uncertainty_head = uncertainty_head  # FastFill's side head (the `uncertainty` term), or None
        self.loss_weights, self.config = weights, config
        # the data side (batches, quality counts); a task used only for its loss (benchmarks) has none
        self.position_of, self.loader, self.source, self.world_size = position_of or {}, loader, source, world_size
        self.quality = source.new_quality(world_size) if source is not None else None
        self.finished_pass = None
        # Hooks, not state_dict overrides: they also run when DDP wraps this module as a child.
        self.register_state_dict_post_hook(_keep_trainable_only)
        self.register_load_state_dict_post_hook(_frozen_is_not_missing)

    def parameter_groups(self) -> list[dict]:
        groups = [{"params": self.model.lora_parameters()},
                  {"params": list(self.temperature.parameters()), "weight_decay": 0.0}]
        if self.config.train_projection:
            groups.append({"params": list(self.model.projection.parameters()),
                           "lr": self.config.projection_learning_rate or self.config.learning_rate})
        return groups + [{"params": self.side_parameters(), "weight_decay": 0.0}]

    def side_parameters(self) -> list[nn.Parameter]:
        """Parameters trained on detached targets only (the uncertainty head): the engine clips their gradient
        on its own, so they cannot change the adapter's updates."""
        return [] if self.uncertainty_head is None else list(self.uncertainty_head.parameters())

    def batches(self, epoch: int, start: int):
        from accelerate import skip_first_batches

        set_loader_epoch(self.loader, epoch)
        self.quality = self.source.new_quality(self.world_size)
        for batch in skip_first_batches(self.loader, start) if start else self.loader:
            self.quality.update(batch)  # raises InputError once too much is bad (on the rank that reads it)
            yield batch

    def usable(self, batch: dict[str, Any]) -> bool:
        return len(batch["ids"]) > 0

    def end_epoch(self, state) -> None:
        self.finished_pass = self.quality.finish().to_dict()

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        device = self.temperature.log_scale.device
        tokens = {k: v.to(device) for k, v in self.model.backbone.tokenize(batch["captions"]).items()}
        embedded = self.model.embed_batch(batch["images"].to(device), tokens)
        positions = _positions(batch, self.position_of).to(device)
        positions, caption_indices = gather_rows(positions), gather_rows(batch["caption_indices"].to(device))
        count = 0 if self.targets is None else len(self.targets.caption_means)
        rows, positives = bank_rows(count, positions, self.config.bank_negatives, self.config.seed, step)
        image, text, full_image, full_text = (_gathered(vectors) for vectors in (
            embedded.image, embedded.text, embedded.full_image, embedded.full_text))
        uncertainty = None if self.uncertainty_head is None else self.uncertainty_head(self.targets.images[positions])
        inputs = PairInputs(image, text, full_image, full_text, self.targets, positions, caption_indices, rows,
                            positives, uncertainty)
        scale = self.temperature()
        return {name: PAIR_TERMS[name].compute(inputs, scale) for name, weight in self.loss_weights.items()
                if weight > 0}

    def log_values(self) -> dict[str, float]:
        return {"temperature": 1.0 / float(self.temperature().detach())}

    def trainable_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}


def _gathered(vectors: torch.Tensor | None) -> torch.Tensor | None:
    """The global batch's rows of ``vectors`` (with gradients), in float32; ``None`` stays ``None``."""
    return None if vectors is None else gather_rows(vectors).float()


def _keep_trainable_only(module: PairTask, state_dict, prefix: str, local_metadata) -> None:
    """Checkpoints hold the trained weights only: the frozen backbone is rebuilt from its reference."""
    trainable = module.trainable_names()
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in trainable]:
        del state_dict[key]


def _frozen_is_not_missing(module: PairTask, incompatible) -> None:
    """The frozen backbone is deliberately absent from checkpoints; a missing trainable weight still fails."""
    trainable = module.trainable_names()
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if any(k == name or k.endswith("." + name) for name in trainable)]


# ---------------------------------------------------------------------------------
# The training run
# ---------------------------------------------------------------------------------
def train(config: PairStageConfig, data: PairSourceConfig, accelerator, adapter: AdapterConfig | None = None,
          cache: CacheConfig | None = None, backbone=None, old_encoder=None) -> Path:
    """Run stage 2 through the engine; returns the adapter folder. Resumable (``config.resume``).

    ``accelerator``: the run's one. ``backbone`` / ``old_encoder``: the new and old models when
    the caller has them loaded already (``xbt fit``); else the new one is loaded here and the old
    one only if its caption embeddings are not cached yet.
    """
    adapter, cache = adapter or AdapterConfig(), cache or CacheConfig()
    processes = accelerator.num_processes
    if config.batch_size % processes:
        raise InputError(f"batch_size: {config.batch_size} does not divide evenly over {processes} processes; "
                         f"allowed: a multiple of {processes} (batch_size is the global batch).")
    projection = Projection.from_pretrained(config.projection)  # small; its extra dims decide the loss terms
    weights = loss_weights(config, projection.extra_dims)  # before any model or data is loaded: fails at once
    loader_config = PairDataConfig(**asdict(data), batch_size=config.batch_size // processes, seed=config.seed)
    source = open_pairs(loader_config)
    seed_everything(config.seed)  # before LoRA is initialised

    # Models: the frozen new backbone gets LoRA; ψ starts from stage 1.
    if backbone is None:
        from ..backbones import load_backbone

        backbone = load_backbone(config.new_model, device=accelerator.device)
    old_id = old_model_id(config.old_model, projection.target_space, old_encoder)
    model = XBTModel(backbone, projection, adapter, old_reference=config.old_model, old_model_id=old_id)
    projection.requires_grad_(config.train_projection)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(backbone.model)

    # Data and the old-space targets of every training pair.
    loader = make_pair_loader(source, backbone.preprocess, rank=accelerator.process_index, world_size=processes)
    images = "streamed" if source.streamed else len(source)  # tar shards have no length up front
    targets, position_of = None, {}
    if any(weights[name] > 0 and PAIR_TERMS[name].needs for name in weights):
        listing = list(iter_captions(source))
        ids, captions = [i for i, _ in listing], [c for _, c in listing]
        position_of = {identifier: position for position, identifier in enumerate(ids)}
        old_text = old_text_source(config.old_model, old_id, projection.target_space, projection.old_dim,
                                   accelerator.device, batch_size=cache.encode_batch_size, encoder=old_encoder)
        targets = build_targets(ids, captions, old_text, cache, config.old_image_embeddings, config.old_image_ids,
                                process=accelerator).to(accelerator.device)

    temperature = Temperature(config.temperature, config.learn_temperature and uses_temperature(PAIR_TERMS, weights))
    head = None
    if weights["uncertainty"] > 0:
        with torch.random.fork_rng(devices=[]):  # its initialisation leaves the run's random stream untouched
            torch.manual_seed(config.seed)
            head = UncertaintyHead(projection.old_dim, space_id=projection.target_space)
    task = PairTask(model, weights, temperature, targets, config, position_of=position_of, loader=loader,
                    source=source, world_size=processes, uncertainty_head=head)
    task.to(accelerator.device)
    logger.info("Stage 2: %s images, %d process(es), global batch %d, %d steps, loss weights %s", images, processes,
                config.batch_size * config.gradient_accumulation_steps, config.max_steps,
                {k: v for k, v in weights.items() if v > 0})
    state = engine.train(task, config, accelerator, config.max_steps, "stage 2",
                         {**asdict(loader_config), **asdict(adapter)})

    folder = Path(config.output_dir) / ADAPTER_DIR
    check_replicas_identical(accelerator, task)
    if accelerator.is_main_process:
        model.training_summary = {
            "steps": state.step, "loss_weights": weights, "final_loss_terms": state.terms,
            "global_batch_size": config.batch_size * config.gradient_accumulation_steps,
            "processes": processes, "learning_rate": config.learning_rate,
            "train_projection": config.train_projection, "data": source.description,
            "images": images, "seed": config.seed, "gallery_aware": "old_images" in provided_by(config),
            "replicas_identical": True,
            "data_quality": task.finished_pass or task.quality.to_dict(),  # of the main process's share
        }
        if config.blend_support:
            from ..blending import fit_query_blending
            from ..encoders import load_encoder

            old = old_encoder or load_encoder(config.old_model, device=accelerator.device)
            model.query_blending = fit_query_blending(model.eval(), old, config.blend_support)
        model.attach_uncertainty_head(head)
        model.save_pretrained(folder)
    accelerator.wait_for_everyone()
    return folder


def check_replicas_identical(accelerator, objective: nn.Module) -> None:
    """Every process must end with the same weights (else they trained independent copies)."""
    trainable = [p.detach() for p in accelerator.unwrap_model(objective).parameters() if p.requires_grad]
    checksum = torch.stack([torch.stack([p.double().sum(), p.double().pow(2).sum()]) for p in trainable]).flatten()
    gathered = accelerator.gather(checksum[None])
    if not bool((gathered == gathered[0]).all()):
        raise XBTError(f"The {accelerator.num_processes} processes ended with different weights: they were not "
                       f"synchronised. On CPU, launch with ACCELERATE_USE_CPU=true (see the README).")


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

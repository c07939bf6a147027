"""Configuration of every training run (torch-free, so ``xbt CMD --help`` starts fast).

:class:`TrainConfig` holds what every stage's loop needs (the engine reads only it), with
transformers' ``TrainingArguments`` names; :class:`TextStageConfig` (stage 1) and
:class:`PairStageConfig` (stage 2) extend it with what is their own and change some
defaults, so the same concept has the same name in every stage. ``batch_size`` is the
GLOBAL batch (all processes together) everywhere. :class:`FitConfig` is the layout of an
``xbt fit`` file. Every check raises :class:`~xbt.errors.InputError` naming the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("none", "tensorboard", "wandb", "all")


@dataclass(kw_only=True)
class TrainConfig:
    """The run options every stage shares (one loop, :func:`xbt.train.engine.train`, reads them)."""

    output_dir: str = field(default="", metadata={"help": "run folder: results and checkpoints/ are written here"})
    batch_size: int = field(default=64, metadata={
        "help": "GLOBAL batch size: the examples of one step summed over all processes (each process gets "
                "batch_size / number of processes)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: float = field(default=0, metadata={
        "help": "linear warm-up before the cosine decay: a number of steps (>= 1) or a fraction of all steps (< 1)"})
    max_steps: int = field(default=0, metadata={"help": "optimiser steps to train (0: as the stage decides)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: no clipping)"})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "batches whose gradients are summed into one optimiser step"})
    mixed_precision: str = field(default="no", metadata={
        "help": f"autocast precision of the forward pass: {', '.join(MIXED_PRECISION)} (where the device supports it)"})
    save_steps: int = field(default=500, metadata={"help": "steps between checkpoints (0: only at the end)"})
    save_total_limit: int = field(default=2, metadata={"help": "how many newest checkpoints to keep (0: all)"})
    logging_steps: int = field(default=10, metadata={"help": "steps between log lines / tracker records"})
    report_to: str = field(default="none", metadata={"help": f"trackers: {', '.join(REPORT_TO)}"})
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder to continue from"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and noise"})
    temperature: float = field(default=0.07, metadata={"help": "initial softmax temperature of the InfoNCE terms"})
    learn_temperature: bool = field(default=True, metadata={"help": "learn the temperature"})

    def __post_init__(self) -> None:
        checks = [
            ("batch_size", self.batch_size, self.batch_size >= 2, "an integer >= 2 (contrastive losses need negatives)"),
            ("learning_rate", self.learning_rate, self.learning_rate > 0, "a number > 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, "a number >= 0"),
            ("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "a step count >= 1 or a fraction in [0, 1)"),
            ("max_steps", self.max_steps, self.max_steps >= 0, "an integer >= 0"),
            ("max_grad_norm", self.max_grad_norm, self.max_grad_norm >= 0, "a number >= 0 (0: off)"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps, self.gradient_accumulation_steps >= 1,
             "an integer >= 1"),
            ("mixed_precision", self.mixed_precision, self.mixed_precision in MIXED_PRECISION,
             f"one of {', '.join(MIXED_PRECISION)}"),
            ("save_steps", self.save_steps, self.save_steps >= 0, "an integer >= 0 (0: only at the end)"),
            ("save_total_limit", self.save_total_limit, self.save_total_limit >= 0, "an integer >= 0 (0: all)"),
            ("logging_steps", self.logging_steps, self.logging_steps >= 1, "an integer >= 1"),
            ("report_to", self.report_to, self.report_to in REPORT_TO, f"one of {', '.join(REPORT_TO)}"),
            ("temperature", self.temperature, self.temperature > 0, "a number > 0"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise InputError(f"{name}: got {value!r}; allowed: {allowed}.")

    def warmup_count(self, total_steps: int) -> int:
        """Warm-up steps of a run of ``total_steps`` (a fraction < 1 is a share of them)."""
        return int(self.warmup_steps * total_steps) if self.warmup_steps < 1 else int(self.warmup_steps)


@dataclass(kw_only=True)
class AcceleratorConfig:
    """Where the run executes (the one ``Accelerator`` of the run is made from this)."""

    cpu: bool = field(default=False, metadata={"help": "run on the CPU even when a GPU is present"})


@dataclass(kw_only=True)
class TextStageConfig(TrainConfig):
    """Stage 1 (ψ from captions). Defaults: residual MLP ψ started from the ridge fit, symmetric InfoNCE, no input
    noise (noise helped image→text in one generated domain but hurt text→image in another)."""

    output_dir: str = field(default="runs/stage1", metadata={"help": "where ψ, checkpoints and the summary go"})
    batch_size: int = field(default=256, metadata={
        "help": "GLOBAL batch size (split evenly across processes; must divide by their number)"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: float = field(default=0.05, metadata={
        "help": "linear warm-up before the cosine decay: a number of steps (>= 1) or a fraction of all steps (< 1)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: run all epochs)"})
    loss: str = field(default="infonce", metadata={"help": "paired loss kind (xbt.losses.TEXT_LOSSES): "
                                                           "infonce, cosine or mse"})
    noise_std: float = field(default=0.0, metadata={
        "help": "std of Gaussian noise on the normalised new embedding (0.05-0.1 can help image→text transfer)"})
    epochs: int = field(default=10, metadata={"help": "passes over the training captions"})
    baselines: str = field(default="procrustes,ridge", metadata={
        "help": "comma-separated training-free baselines to fit and score beside ψ (procrustes, ridge; '' for none)"})
    ridge_alpha: float = field(default=1e-3, metadata={"help": "L2 penalty of the ridge baseline"})
    init: str = field(default="auto", metadata={
        "help": "start ψ's linear map 'random' or from the 'ridge' / 'procrustes' fit on the training pairs; "
                "'auto': ridge for linear and mlp ψ, random for orthogonal"})

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..baselines import BASELINES, LINEAR_BASELINES  # torch: only when a config is built, never for --help
        from ..losses import TEXT_LOSSES

        if self.loss not in TEXT_LOSSES:
            raise InputError(f"loss: got {self.loss!r}; allowed: {', '.join(TEXT_LOSSES)}.")
        if self.epochs < 1:
            raise InputError(f"epochs: got {self.epochs!r}; allowed: an integer >= 1.")
        if self.noise_std < 0:
            raise InputError(f"noise_std: got {self.noise_std!r}; allowed: a number >= 0.")
        if self.init not in ("auto", "random", *LINEAR_BASELINES):
            raise InputError(f"init: got {self.init!r}; allowed: auto, random, {', '.join(LINEAR_BASELINES)} (a "
                             f"linear fit: ψ's linear part starts from it).")
        unknown = [name for name in self.baseline_names if name not in BASELINES]
        if unknown:
            raise InputError(f"baselines: unknown {unknown}; allowed: {', '.join(BASELINES)} (or '' for none).")

    @property
    def baseline_names(self) -> list[str]:
        return [name.strip() for name in self.baselines.split(",") if name.strip()]


@dataclass(kw_only=True)
class ModelPairConfig:
    """Stage 1's two frozen text encoders, or an existing cache that already holds their embeddings."""

    old_model: str = field(default="", metadata={
        "help": "reference of the OLD model (the space to land in): a backbone, or an xbt: adapter for a chained "
                "upgrade (its target space)"})
    new_model: str = field(default="", metadata={"help": "reference of the NEW model"})
    cache_path: str | None = field(default=None, metadata={
        "help": "train from this complete cache folder (with 'new' and 'old' text embeddings); no model is loaded"})


@dataclass(kw_only=True)
class PairStageConfig(TrainConfig):
    """Stage 2 (LoRA + ψ on image-text pairs): models, old-space data and loss. Data, LoRA and cache options are
    separate dataclasses."""

    new_model: str = field(metadata={"help": "reference of the NEW model (gets the adapters)"})
    old_model: str = field(metadata={"help": "reference of the OLD model (its text encoder fills the caption cache): a "
                                     "backbone, or an xbt: adapter for a chained upgrade"})
    projection: str = field(metadata={"help": "folder of the stage-1 ψ (Projection.save_pretrained)"})
    output_dir: str = field(metadata={"help": "run folder: adapter/ and checkpoints/ are written here"})
    batch_size: int = field(default=64, metadata={
        "help": "GLOBAL batch size (each of N processes loads batch_size / N; must divide evenly)"})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak AdamW learning rate of the LoRA weights"})
    warmup_steps: float = field(default=50, metadata={
        "help": "linear warm-up before the cosine decay: a number of steps (>= 1) or a fraction of all steps (< 1)"})
    max_steps: int = field(default=800, metadata={"help": "optimiser steps to train"})
    save_steps: int = field(default=200, metadata={"help": "steps between checkpoints (0: only at the end)"})
    old_image_embeddings: str | None = field(default=None, metadata={
        "help": "stored OLD image embeddings of the training images (.npy/.safetensors/.faiss): enables the "
                "gallery-aware terms"})
    old_image_ids: str | None = field(default=None, metadata={
        "help": "ids of those embeddings, one per line (default: ids stored in the file, else row numbers)"})
    loss_weights: str = field(default="", metadata={
        "help": "weights of the loss terms (xbt.losses.PAIR_TERMS) as NAME=WEIGHT,NAME=WEIGHT (a mapping in a "
                "config file); terms not named take their default: new_new + text_to_old_image + "
                "image_to_old_text with --old_image_embeddings, else new_new + anchor; plus full_new when ψ has extra "
                "dims (BT²/OCA)"})
    bank_negatives: int = field(default=0, metadata={
        "help": "stored vectors drawn per step as negatives of the cross terms (0: all of them)"})
    train_projection: bool = field(default=True, metadata={"help": "train ψ along with the LoRA weights"})
    projection_learning_rate: float | None = field(default=None, metadata={
        "help": "learning rate of ψ (default: learning_rate)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the towers' activations in the backward pass (less memory, more time)"})
    blend_support: str | None = field(default=None, metadata={
        "help": "held-out image-text pairs (not training pairs) on which the query-blending weight is fitted per "
                "direction after training and recorded in the adapter (blend_old='fitted'; blending runs the old "
                "encoder on every query)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blend_support is not None and not Path(self.blend_support).exists():
            raise InputError(f"blend_support: {self.blend_support!r} does not exist; give held-out image-text "
                             f"pairs (an image folder with metadata.jsonl, a table, ...).")
        if self.max_steps < 1:
            raise InputError(f"max_steps: got {self.max_steps!r}; allowed: an integer >= 1.")
        if self.bank_negatives < 0:
            raise InputError(f"bank_negatives: got {self.bank_negatives!r}; allowed: an integer >= 0 (0: all).")
        if self.projection_learning_rate is not None and self.projection_learning_rate <= 0:
            raise InputError(f"projection_learning_rate: got {self.projection_learning_rate!r}; allowed: > 0.")
        if isinstance(self.loss_weights, dict):  # a mapping from a config file: stored in the flag's own form
            self.loss_weights = ",".join(f"{name}={weight}" for name, weight in self.loss_weights.items())
        weights = self.given_weights  # parses, so a malformed value fails here
        from ..losses import PAIR_TERMS  # torch: only when a config is built, never for --help

        unknown = sorted(set(weights) - set(PAIR_TERMS))
        if unknown:
            raise InputError(f"loss_weights: unknown term(s) {unknown}; allowed: {', '.join(PAIR_TERMS)}.")

    @property
    def given_weights(self) -> dict[str, float]:
        """The weights named in ``loss_weights`` (the others take their defaults)."""
        weights: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in self.loss_weights.split(","))):
            name, equals, value = item.partition("=")
            try:
                weights[name.strip()] = float(value)
            except ValueError:
                equals = ""
            if not equals:
                raise InputError(f"loss_weights: got {self.loss_weights!r}; allowed: NAME=WEIGHT pairs separated "
                                 f"by commas, e.g. 'new_new=1,anchor=0.5'.")
        return weights


@dataclass(kw_only=True)
class FitConfig:
    """The layout of an ``xbt fit`` file: models and run folder once, then one section per step.

    ``cache`` holds :class:`~xbt.data.config.CacheConfig` options (shared by every step),
    ``stage1`` those of CaptionConfig, ProjectionConfig and TextStageConfig, ``stage2``
    those of PairStageConfig, PairSourceConfig and AdapterConfig. Options that fit sets
    itself (output folders, the models, ψ, resume) are not allowed in a section.
    """

    old_model: str = field(metadata={"help": "reference of the OLD model (the space to land in): a backbone, or an "
                                                 "xbt: adapter for a chained upgrade (its target space)"})
    new_model: str = field(metadata={"help": "reference of the NEW model"})
    run_dir: str = field(metadata={"help": "run folder: cache/, stage1/ and stage2/ go here"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even when a GPU is present"})
    cache: dict[str, Any] = field(default_factory=dict, metadata={"help": "CacheConfig options"})
    stage1: dict[str, Any] = field(default_factory=dict, metadata={"help": "stage-1 options"})
    stage2: dict[str, Any] = field(default_factory=dict, metadata={"help": "stage-2 options"})

    def __post_init__(self) -> None:
        for name in ("old_model", "new_model", "run_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InputError(f"{name}: got {getattr(self, name)!r}; allowed: a non-empty string.")
        for name in ("cache", "stage1", "stage2"):
            if not isinstance(getattr(self, name), dict):
                raise InputError(f"Section {name}: got {getattr(self, name)!r}; allowed: a mapping of option names "
                                 f"to values.")

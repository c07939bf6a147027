"""Train a tiny CLIP from scratch on generated image–caption pairs (either backend).

The model is loaded through its reference (:func:`xbt.load_backbone`), trained in place
with the symmetric contrastive (InfoNCE) loss and the model's own learnable temperature
(``logit_scale``), and written back in its library's own format, so every later stage
loads it exactly like a downloaded checkpoint.

Speed on a 2-core CPU (measured side by side with scripts/bench_pretrain.py):
- images are preprocessed and captions tokenised once, before the loop;
- the full 49,408-row CLIP token embedding is swapped, for the duration of training,
  for one holding only the rows of tokens the captions use (a few dozen). A dense
  gradient and AdamW state over the full table roughly doubled the step time of a
  width-64 model; the saved model keeps the full vocabulary and tokenizer, so both
  backends still load through the ordinary reference path;
- fp32: bf16 autocast was about 2× slower on this CPU;
- the loop is the package's one (:func:`xbt.train.engine.train`, warm-up + cosine decay
  from transformers, gradient clipping, NaN guard), with :class:`PretrainTask` as its task;
- threads: on a machine shared with other jobs, 1 intra-op thread was several times
  faster than 2 (``xbt demo --threads 1`` / ``OMP_NUM_THREADS=1``); training does not
  change the caller's torch thread setting.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import DualEncoder, load_backbone
from ..errors import InputError
from ..images import ImageLike
from ..losses import info_nce
from ..train import engine
from ..train.config import TrainConfig
from ..train.records import run_step
from .models import BUILDERS, TinyClipConfig, save_weights
from .quality import flatten_captions
from .scenes import BenchmarkConfig, read_split, write_benchmark

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp on the learnable temperature


@dataclass(kw_only=True)
class PretrainConfig(TrainConfig):
    """Optimisation of one from-scratch run (the run options every stage shares, demo defaults)."""

    max_steps: int = field(default=600, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=128, metadata={"help": "images per step (one caption drawn for each)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    warmup_steps: float = field(default=30, metadata={"help": "linear warm-up steps before the cosine decay"})
    save_steps: int = field(default=0, metadata={"help": "steps between checkpoints (0: only at the end)"})
    logging_steps: int = field(default=50, metadata={"help": "steps between log lines"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_steps < 1:
            raise InputError(f"max_steps: got {self.max_steps!r}; allowed: an integer >= 1.")


@dataclass
class PretrainResult:
    steps: int
    seconds: float
    first_loss: float  # mean over the first 10 steps
    last_loss: float  # mean over the last 10 steps
    losses: list[float] = field(repr=False)


# ---------------------------------------------------------------------------------
# pieces of the loop
# ---------------------------------------------------------------------------------
class CompactEmbedding(nn.Module):
    """The rows ``used_ids`` of a token embedding, as a small trainable table indexed by original ids."""

    def __init__(self, full_weight: torch.Tensor, used_ids: torch.Tensor):
        super().__init__()
        lookup = torch.full((full_weight.shape[0],), -1, dtype=torch.long)
        lookup[used_ids] = torch.arange(len(used_ids))
        self.register_buffer("lookup", lookup, persistent=False)
        self.used_ids = used_ids
        self.weight = nn.Parameter(full_weight.detach()[used_ids].clone())

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.lookup[token_ids], self.weight)


@contextmanager
def compact_token_embedding(model: nn.Module, token_ids: torch.Tensor) -> Iterator[CompactEmbedding]:
    """Train only the token-embedding rows that ``token_ids`` use; written back into the full table on exit."""
    name, full = max(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)),
                     key=lambda item: item[1].num_embeddings)  # the vocabulary table is the largest
    parent = model.get_submodule(name.rpartition(".")[0])
    attribute = name.rpartition(".")[2]
    compact = CompactEmbedding(full.weight, torch.unique(token_ids))
    setattr(parent, attribute, compact)
    try:
        yield compact
    finally:
        with torch.no_grad():
            full.weight[compact.used_ids] = compact.weight
        setattr(parent, attribute, full)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms, embeddings or the temperature)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 and "embedding" not in name else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------
class PretrainTask(nn.Module):
    """From-scratch CLIP training as an engine task: InfoNCE with the model's own ``logit_scale``.

    Everything the loop reads is prepared once (preprocessed images, tokenised captions).
    Batches: a seeded permutation of the images per epoch, last partial batch dropped; each
    image shows one of its captions, drawn from (seed, epoch, position), so a resumed run
    sees the same pairs.
    """

    def __init__(self, encoder: DualEncoder, pixels: torch.Tensor, tokens: dict[str, torch.Tensor],
                 counts: torch.Tensor, config: PretrainConfig):
        super().__init__()
        self.model, self.encoder, self.config = encoder.model, encoder, config
        self.pixels, self.tokens, self.counts = pixels, tokens, counts
        self.offsets = torch.cumsum(counts, 0) - counts  # first caption of each image in the flat list
        self.loss_weights = {"infonce": 1.0}
        self.losses: list[float] = []

    def parameter_groups(self) -> list[dict]:
        return parameter_groups(self.model, self.config.weight_decay)

    def batches(self, epoch: int, start: int):
        seed, size = self.config.seed, self.config.batch_size
        order = torch.randperm(len(self.pixels), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for position in range(start, len(order) // size):
            batch = order[position * size:(position + 1) * size]
            draw = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + position)
            yield batch, self.offsets[batch] + (torch.rand(len(batch), generator=draw) * self.counts[batch]).long()

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        images, chosen = batch
        device = self.model.logit_scale.device
        image_features = self.encoder.image_features(self.pixels[images].to(device))
        text_features = self.encoder.text_features({key: value[chosen].to(device) for key, value in self.tokens.items()})
        return {"infonce": info_nce(F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1),
                                    self.model.logit_scale.exp())}

    def after_step(self, state) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        self.losses.append(state.loss)

    def progress_state(self) -> dict:
        return {"losses": self.losses}

    def load_progress_state(self, state: dict) -> None:
        self.losses = list(state["losses"])


def train_contrastive(encoder: DualEncoder, images: Sequence[ImageLike] | torch.Tensor,
                      captions: Sequence[Sequence[str]], config: PretrainConfig, accelerator) -> PretrainResult:
    """Train ``encoder.model`` in place on images and their captions (one caption drawn per image per step).

    ``accelerator``: the run's one. Checkpoints go to ``config.output_dir`` (a temporary
    folder when it is empty).
    """
    if len(images) != len(captions):
        raise InputError(f"{len(images)} images but {len(captions)} caption lists; give one list per image.")
    if len(images) < config.batch_size:
        raise InputError(f"{len(images)} images is fewer than one batch ({config.batch_size}); "
                         f"lower batch_size or generate more images.")
    if any(not group for group in captions):
        raise InputError("Every image needs at least one caption.")
    engine.seed_everything(config.seed)
    pixels = images if isinstance(images, torch.Tensor) else encoder.preprocess_images(images)
    flat, _ = flatten_captions(captions)
    tokens = encoder.tokenize(flat)
    counts = torch.tensor([len(group) for group in captions])

    model = encoder.model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)  # the loader froze them
    start = time.perf_counter()
    with compact_token_embedding(model, tokens["input_ids"]), tempfile.TemporaryDirectory() as scratch:
        run = config if config.output_dir else replace(config, output_dir=scratch)
        task = PretrainTask(encoder, pixels, tokens, counts, run)
        engine.train(task, run, accelerator, config.max_steps, f"pretrain {encoder.backend}")
    seconds = time.perf_counter() - start
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    losses = task.losses
    result = PretrainResult(config.max_steps, round(seconds, 2), _mean(losses[:10]), _mean(losses[-10:]), losses)
    logger.info("trained %s: %d steps in %.1f s, loss %.3f -> %.3f", encoder.reference, result.steps,
                result.seconds, result.first_loss, result.last_loss)
    return result


def _mean(values: list[float]) -> float:
    return round(sum(values) / max(1, len(values)), 4)


# ---------------------------------------------------------------------------------
# build + train + save, cached
# ---------------------------------------------------------------------------------
@dataclass
class ModelRecipe:
    """A tiny CLIP of one backend and how long it is trained."""

    backend: str = "open_clip"
    model: TinyClipConfig = field(default_factory=TinyClipConfig)
    training: PretrainConfig = field(default_factory=PretrainConfig)
    train_images: int | None = None  # use only the first N training images (None: all)


def _data_digest(train_folder: Path) -> str:
    return hashlib.sha256((train_folder / "metadata.jsonl").read_bytes()).hexdigest()[:16]


def train_model(folder: str | Path, recipe: ModelRecipe, train_folder: str | Path, accelerator) -> str:
    """Build the recipe's tiny model in ``folder``, train it on ``train_folder``, save it; returns its reference.

    Skipped (the reference is returned as is) when ``folder``'s record shows a model trained
    with the same recipe on the same data (:func:`xbt.train.records.run_step`); a stale one
    is retrained.
    """
    folder, train_folder = Path(folder), Path(train_folder)
    if recipe.backend not in BUILDERS:
        raise InputError(f"Unknown backend {recipe.backend!r}; choose one of {', '.join(BUILDERS)}.")

    def build_and_train() -> dict:
        reference = BUILDERS[recipe.backend](folder, recipe.model)
        paths, captions = read_split(train_folder)
        paths, captions = paths[:recipe.train_images], captions[:recipe.train_images]
        encoder = load_backbone(reference)
        result = train_contrastive(encoder, paths, captions, recipe.training, accelerator)
        save_weights(encoder.model, recipe.backend, folder)
        return {"reference": reference, "fingerprint": encoder.fingerprint,
                **{k: v for k, v in asdict(result).items() if k != "losses"}}

    identity = {"recipe": asdict(recipe), "data": _data_digest(train_folder)}
    _, result = run_step(f"{recipe.backend} model", folder, identity, build_and_train,
                         on_change="redo")
    return result["reference"]


# ---------------------------------------------------------------------------------
# presets: an OLD and a NEW model on one generated benchmark
# ---------------------------------------------------------------------------------
@dataclass
class PairPreset:
    """Data sizes and the OLD/NEW recipes (the NEW one bigger and trained longer)."""

    data: BenchmarkConfig
    old: ModelRecipe
    new: ModelRecipe


@dataclass(frozen=True)
class PresetSizes:
    """The numbers that differ between presets."""

    domain: str  # the generated visual domain (xbt.demo.scenes.DOMAINS) unless the caller names one
    train_images: int
    test_images: int
    corpus_captions: int
    batch_size: int
    learning_rate: float  # measured: 2e-3 stalled the demo's width-96 model (R@1 5–7 vs 12–16 at 1e-3)
    old_width: int
    old_layers: int
    old_steps: int
    old_train_images: int  # the OLD model sees only the first N training images
    new_width: int
    new_layers: int
    new_steps: int
    old_dim: int = 32
    new_dim: int = 32
    new_image_size: int = 32  # the new model reads its images at this size, in new_patch_size patches
    new_patch_size: int = 8


FAST = PresetSizes(domain="shapes", train_images=2000, test_images=300, corpus_captions=5000, batch_size=64,
                   learning_rate=2e-3, old_width=32, old_layers=1, old_steps=150, old_train_images=1000,
                   new_width=64, new_layers=2, new_steps=250)
"""The test suite's pair: about 15–30 s for data and both models on 2 CPU cores (1 thread, shared machine)."""

DEMO = PresetSizes(domain="patterns", train_images=20000, test_images=1000, corpus_captions=50000, batch_size=128,
                   learning_rate=1e-3, old_width=64, old_layers=2, old_steps=500, old_train_images=20000,
                   new_width=96, new_layers=3, new_steps=600, old_dim=32, new_dim=64, new_image_size=48,
                   new_patch_size=12)
"""``xbt demo``: an old model worth upgrading and a clearly better new one with another dimension and backend.

Measured on the 1000 test images (R@1 text→image / image→text, one thread, 2-core machine):
the patterns domain is learnt far faster than shapes, whose models confuse the shape kinds
(new model, 600 steps: 37.7 / 34.2 on patterns against 19.0 / 22.2 on shapes); the new
model reads the 48-px images in 12-px patches (shapes, 600 steps: 19.0 / 22.2 against
16.0 / 20.7 for 32 px in 8-px patches); 2e-3, no gradient clipping, 16-px patches and a 1-layer
text tower (13.0 / 16.5) were worse for it."""


def make_preset(sizes: PresetSizes, domain: str | None = None, seed: int = 0,
                backends: tuple[str, str] = ("open_clip", "hf")) -> PairPreset:
    """Data and OLD/NEW recipes of ``sizes`` (on its domain unless ``domain`` is given); ``backends`` = (old, new),
    e.g. ``("hf", "open_clip")``."""
    def recipe(backend: str, width: int, layers: int, steps: int, model_seed: int, images: int | None = None,
               **shape):
        model = TinyClipConfig(width=width, layers=layers, heads=max(2, width // 32), context_length=20,
                               seed=model_seed, **shape)
        training = PretrainConfig(max_steps=steps, batch_size=sizes.batch_size, learning_rate=sizes.learning_rate,
                                  seed=model_seed)
        return ModelRecipe(backend, model, training, images)

    return PairPreset(
        data=BenchmarkConfig(domain=domain or sizes.domain, train_images=sizes.train_images,
                             test_images=sizes.test_images, corpus_captions=sizes.corpus_captions, seed=seed),
        old=recipe(backends[0], sizes.old_width, sizes.old_layers, sizes.old_steps, seed, sizes.old_train_images,
                   embed_dim=sizes.old_dim),
        new=recipe(backends[1], sizes.new_width, sizes.new_layers, sizes.new_steps, seed + 1, embed_dim=sizes.new_dim,
                   image_size=sizes.new_image_size, patch_size=sizes.new_patch_size),
    )


@dataclass
class TrainedPair:
    """References of the trained OLD and NEW models and the folders of the data they saw."""

    old: str
    new: str
    train: Path
    test: Path
    corpus: Path


def train_pair(root: str | Path, preset: PairPreset, accelerator=None) -> TrainedPair:
    """Generate the preset's benchmark under ``root/data`` and train both models under ``root/models``.

    ``accelerator``: the run's one; made here when the caller is the entry point (None).
    """
    root = Path(root)
    accelerator = accelerator or engine.make_accelerator()
    data = write_benchmark(root / "data", preset.data)
    old = train_model(root / "models" / "old", preset.old, data["train"], accelerator)
    new = train_model(root / "models" / "new", preset.new, data["train"], accelerator)
    return TrainedPair(old=old, new=new, train=data["train"], test=data["test"], corpus=data["corpus"])


def tiny_pair(root: str | Path, domain: str = "shapes", seed: int = 0,
              backends: tuple[str, str] = ("open_clip", "hf")) -> TrainedPair:
    """The test suite's OLD/NEW pair (:data:`FAST`); ``backends`` = (old, new), e.g. ``("hf", "open_clip")``."""
    return train_pair(root, make_preset(FAST, domain, seed, backends))

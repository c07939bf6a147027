"""The dual-encoder interface every backbone family implements.

A family (open_clip CLIP, transformers CLIP, SigLIP, ...) is one subclass of
:class:`DualEncoder` that wraps its library's model in ``self.model`` and provides the
raw feature functions, its LoRA preset table and its loader; this class provides
batching, normalisation, input checks, progress bars, the fingerprint, LoRA target
selection and the :class:`~xbt.spaces.Encoder` protocol (``dim``, ``model_id``,
``space_id``).
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..adapter_config import LAYER_KINDS, TOWERS
from ..errors import InputError, ModelLoadError
from ..images import ImageLike, as_rgb_image
from ..references import ModelRef

PROGRESS_THRESHOLD = 2048  # items; smaller inputs encode without a progress bar
_SHOWN_NAMES = 6  # module names listed when explicit LoRA targets match nothing

LoraPresets = Mapping[tuple[str, str], str]
"""(tower, layer kind) -> regex over module names relative to ``DualEncoder.model``."""


def lora_preset_table(blocks: Mapping[str, str], kinds: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """The preset table of an architecture whose layer names are ``block + kind``.

    ``blocks`` maps each tower to the regex of its transformer blocks, ``kinds`` each
    layer kind to the regex of its modules inside a block.
    """
    return {(tower, kind): blocks[tower] + kinds[kind] for tower in TOWERS for kind in LAYER_KINDS}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class DualEncoder(nn.Module, ABC):
    """A frozen CLIP-style model with a text tower and an image tower.

    Class attributes every family sets:
        family: the registry name (``"open_clip"``, ``"clip"``, ``"siglip"``).
        backend: the reference prefix it loads (one of :data:`xbt.references.BACKENDS`);
            part of the fingerprint, so it never changes for an existing family.
        model_type: for backends that host several families (``hf``), the config
            ``model_type`` this family loads; ``None`` when the backend has one family.
        lora_presets: the LoRA target table, see :data:`LoraPresets`.

    Attributes:
        reference: the parsed reference the model was loaded from.
        model: the library's own module (LoRA target names are relative to it).
        preprocess: PIL RGB image -> float tensor ``(3, S, S)``; picklable, so it runs in DataLoader workers.
    """

    family: ClassVar[str]
    backend: ClassVar[str]
    model_type: ClassVar[str | None] = None
    lora_presets: ClassVar[LoraPresets]

    def __init__(self, reference: ModelRef, model: nn.Module, preprocess: Callable[[Image.Image], torch.Tensor]):
        super().__init__()
        self.reference = reference
        self.model = model.eval()
        self.preprocess = preprocess

    # -- what each family provides ----------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, reference: ModelRef, device: torch.device) -> DualEncoder:
        """Load a frozen encoder of this family's backend from a parsed reference.

        Families that share a backend share this loader; it picks the family class
        (see :func:`xbt.backbones.registry.family_for`).
        """

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Dimension of the joint embedding space."""

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Side length (pixels) of the preprocessed square image."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token tensors (CPU) for ``texts``, ready for :meth:`text_features`."""

    @abstractmethod
    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unnormalised projected text embeddings, differentiable (used in training)."""

    @abstractmethod
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised projected image embeddings, differentiable (used in training)."""

    @abstractmethod
    def architecture_config(self) -> dict[str, Any]:
        """JSON-serialisable description of architecture and preprocessing (part of the fingerprint)."""

    # -- shared behaviour -----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def fingerprint(self) -> str:
        """Stable identity of this model: backend, architecture config and weights.

        The reference string is deliberately left out so that moving a folder or
        mirroring a repo does not invalidate artefacts; weights are hashed as float32
        values in name order, so device and storage dtype do not matter either. LoRA
        layers wrapped around the model (peft) are ignored: the base weights decide.
        """
        digest = hashlib.sha256()
        digest.update(self.backend.encode())
        digest.update(json.dumps(self.architecture_config(), sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            if "lora_" in name:
                continue
            digest.update(name.replace(".base_layer", "").encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return f"{self.backend}-{digest.hexdigest()[:16]}"

    # -- the Encoder protocol (xbt.spaces) ----------------------------------------------
    @property
    def dim(self) -> int:
        return self.embed_dim

    @property
    def model_id(self) -> str:
        return self.fingerprint

    @property
    def space_id(self) -> str:
        """A native model writes into its own space, named by its fingerprint."""
        return self.fingerprint

    # -- LoRA targets -------------------------------------------------------------------
    def lora_target_modules(
        self,
        towers: Sequence[str] = TOWERS,
        layers: Sequence[str] = LAYER_KINDS,
        target_modules: str | Sequence[str] | None = None,
    ) -> str | list[str]:
        """The peft ``target_modules`` for this model.

        Without ``target_modules``: a regex from this family's preset table selecting
        ``layers`` in ``towers``. With it (a regex, full-matched like peft does, or a
        list of module names, matched like peft does: the name or a ``.``-suffix of it),
        the given targets are checked against this model's modules and returned as
        given (a list as a list); ``towers`` and ``layers`` are then ignored.

        Raises :class:`InputError` for an unknown tower or layer kind, or explicit
        targets that select nothing (the message lists some valid names), and
        :class:`ModelLoadError` when this architecture has no module matching a preset.
        """
        if target_modules is not None:
            return self._checked_targets(target_modules)
        unknown = [t for t in towers if t not in TOWERS] + [k for k in layers if k not in LAYER_KINDS]
        if unknown or not towers or not layers:
            raise InputError(f"LoRA targets: towers must be from {TOWERS} and layers from {LAYER_KINDS}; got "
                             f"towers={list(towers)}, layers={list(layers)}.")
        regex = "|".join(f"(?:{self.lora_presets[(t, k)]})" for t in towers for k in layers)
        if not any(re.fullmatch(regex, name) for name in self._module_names()):
            raise ModelLoadError(
                f"No {'/'.join(layers)} layers of the {'/'.join(towers)} tower(s) of {self.reference} match the "
                f"LoRA preset of the {self.family} family; this architecture needs explicit target_modules."
            )
        return regex

    def _checked_targets(self, target_modules: str | Sequence[str]) -> str | list[str]:
        names = self._module_names()
        if isinstance(target_modules, str):
            try:
                pattern = re.compile(target_modules)
            except re.error as error:
                raise InputError(f"target_modules {target_modules!r} is not a valid regex ({error}).") from error
            if not any(pattern.fullmatch(name) for name in names):
                raise InputError(f"target_modules {target_modules!r} matches no module of {self.reference}. "
                                 f"{self._example_names()}")
            return target_modules
        targets = list(target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise InputError(f"target_modules must be a regex or a non-empty list of module names; got {targets!r}.")
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise InputError(f"target_modules {missing} match no module of {self.reference}. "
                             f"{self._example_names()}")
        return targets

    def _module_names(self) -> list[str]:
        return [name for name, _ in self.model.named_modules() if name]

    def _example_names(self) -> str:
        """A few names of layers LoRA can adapt (linear and attention modules)."""
        adaptable = [name for name, module in self.model.named_modules()
                     if isinstance(module, (nn.Linear, nn.MultiheadAttention))]
        return f"Valid names include: {', '.join(adaptable[:_SHOWN_NAMES])}, ... ({len(adaptable)} in all)."

    # -- encoding -----------------------------------------------------------------------
    def encode_text(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool | None = None
    ) -> torch.Tensor:
        """L2-normalised float32 text embeddings ``(len(texts), embed_dim)`` on the CPU."""
        if isinstance(texts, str):
            raise InputError("encode_text expects a list of strings, not a single string; wrap it: [text].")
        texts = list(texts)
        if not texts:
            raise InputError("encode_text got an empty list of texts; pass at least one caption.")
        for index, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"Text #{index} is empty or not a string ({text!r}); remove or fill it.")
        return self._batched(texts, batch_size, progress, "text",
                             lambda chunk: self.text_features(self._to_device(self.tokenize(chunk))))

    def encode_image(
        self,
        images: Sequence[ImageLike] | torch.Tensor,
        batch_size: int = 128,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """L2-normalised float32 image embeddings on the CPU.

        ``images`` is a list of PIL images or image paths (any mode; converted to RGB)
        or an already preprocessed tensor ``(N, 3, S, S)``.
        """
        if isinstance(images, torch.Tensor):
            self._check_pixels(images)
            return self._batched(images, batch_size, progress, "image",
                                 lambda chunk: self.image_features(chunk.to(self.device, self._dtype)))
        images = list(images)
        if not images:
            raise InputError("encode_image got an empty list of images; pass at least one.")
        return self._batched(images, batch_size, progress, "image",
                             lambda chunk: self.image_features(self.preprocess_images(chunk).to(self.device, self._dtype)))

    def preprocess_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Stack preprocessed RGB versions of ``images`` into ``(N, 3, S, S)``."""
        return torch.stack([self.preprocess(as_rgb_image(image)) for image in images])

    # -- helpers --------------------------------------------------------------------
    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _to_device(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in tokens.items()}

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        size = self.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (size, size):
            raise InputError(
                f"Preprocessed images must have shape (N, 3, {size}, {size}) for {self.reference}; got "
                f"{tuple(pixels.shape)}. Pass PIL images instead to have them preprocessed."
            )
        if pixels.shape[0] == 0:
            raise InputError("encode_image got an empty tensor; pass at least one image.")

    def _batched(self, items, batch_size: int, progress: bool | None, what: str, features) -> torch.Tensor:
        if batch_size < 1:
            raise InputError(f"batch_size must be positive, got {batch_size}.")
        total = len(items)
        show = total >= PROGRESS_THRESHOLD if progress is None else progress
        outputs = []
        with torch.inference_mode(), tqdm(total=total, desc=f"encode {what}", unit=what, disable=not show) as bar:
            for start in range(0, total, batch_size):
                chunk = items[start:start + batch_size]
                embedding = features(chunk).float()
                outputs.append(nn.functional.normalize(embedding, dim=-1).cpu())
                bar.update(len(chunk))
        return torch.cat(outputs)

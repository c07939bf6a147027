"""One dual-encoder interface over open_clip and transformers CLIP models.

:func:`load_backbone` turns a model reference (see :mod:`xbt.references`) into a
:class:`DualEncoder`. Every other module talks to backbones only through this
interface: tokenising, preprocessing, encoding, the fingerprint that ties artefacts
to a model, and the LoRA target presets (so no other module hard-codes module names).

Only safetensors weights are ever read: a checkpoint that exists only as a pickle
(.bin/.pt/.pth) is refused with an error that says how to convert it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .errors import InputError, ModelLoadError
from .images import ImageLike, as_rgb_image
from .references import ModelRef, parse_reference

logger = logging.getLogger(__name__)

TOWERS = ("vision", "text")
LAYER_KINDS = ("attention", "mlp")
PROGRESS_THRESHOLD = 2048  # items; smaller inputs encode without a progress bar


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class DualEncoder(nn.Module, ABC):
    """A frozen CLIP-style model with a text tower and an image tower.

    Subclasses wrap one library's model in ``self.model`` and implement the raw
    feature functions; this class provides batching, normalisation, input checks,
    progress bars and the fingerprint.

    Attributes:
        reference: the parsed reference the model was loaded from.
        model: the library's own module (LoRA target names are relative to it).
        preprocess: PIL RGB image -> float tensor ``(3, S, S)``; picklable, so it runs in DataLoader workers.
    """

    backend: str

    def __init__(self, reference: ModelRef, model: nn.Module, preprocess: Callable[[Image.Image], torch.Tensor]):
        super().__init__()
        self.reference = reference
        self.model = model.eval()
        self.preprocess = preprocess

    # -- what each backend provides -------------------------------------------------
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

    @abstractmethod
    def _lora_patterns(self) -> dict[tuple[str, str], str]:
        """Regex (module names relative to ``self.model``) for each (tower, layer kind)."""

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

    def lora_target_modules(
        self, towers: Sequence[str] = TOWERS, layers: Sequence[str] = LAYER_KINDS
    ) -> str:
        """A peft ``target_modules`` regex selecting ``layers`` in ``towers``.

        Raises :class:`ValueError` for an unknown tower or layer kind and
        :class:`ModelLoadError` when this architecture has no matching module.
        """
        unknown = [t for t in towers if t not in TOWERS] + [k for k in layers if k not in LAYER_KINDS]
        if unknown or not towers or not layers:
            raise ValueError(f"LoRA targets: towers must be from {TOWERS} and layers from {LAYER_KINDS}; got "
                             f"towers={list(towers)}, layers={list(layers)}.")
        patterns = self._lora_patterns()
        regex = "|".join(f"(?:{patterns[(t, k)]})" for t in towers for k in layers)
        if not any(re.fullmatch(regex, name) for name, _ in self.model.named_modules()):
            raise ModelLoadError(
                f"No {'/'.join(layers)} layers of the {'/'.join(towers)} tower(s) of {self.reference} match the "
                f"LoRA preset; this architecture needs explicit target_modules."
            )
        return regex

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
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
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


# ---------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class OpenClipEncoder(DualEncoder):
    """An ``open_clip`` CLIP model (built-in, ``hf-hub:`` or ``local-dir:``)."""

    backend = "open_clip"

    def __init__(self, reference: ModelRef, model: nn.Module, preprocess, tokenizer, model_config: dict):
        super().__init__(reference, model, preprocess)
        self.tokenizer = tokenizer
        self.model_config = model_config

    @property
    def embed_dim(self) -> int:
        return int(self.model_config["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(list(texts))}

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens["input_ids"])

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def architecture_config(self) -> dict[str, Any]:
        return {"model_cfg": self.model_config, "preprocess": getattr(self.model.visual, "preprocess_cfg", None)}

    def _lora_patterns(self) -> dict[tuple[str, str], str]:
        blocks = {"vision": r"visual\.transformer\.resblocks\.\d+", "text": r"(?:text\.)?transformer\.resblocks\.\d+"}
        # open_clip attention is nn.MultiheadAttention: peft adapts the module itself.
        kinds = {"attention": r"\.attn", "mlp": r"\.mlp\.(?:c_fc|c_proj)"}
        return {(t, k): blocks[t] + kinds[k] for t in TOWERS for k in LAYER_KINDS}


def _require_safetensors(folder: Path, reference: ModelRef) -> None:
    """Weights must be safetensors, and no pickle may sit beside them (open_clip would prefer it)."""
    files = [p for p in folder.iterdir() if p.is_file()]
    pickles = [p.name for p in files if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise ModelLoadError(
            f"{reference}: folder holds pickle weight files ({', '.join(pickles)}); xbt never unpickles weights. "
            f"Convert them once with safetensors.torch.save_file(torch.load(path, weights_only=True), "
            f"'{folder}/open_clip_model.safetensors') (or save the model with save_pretrained) and remove them."
        )
    if not any(p.suffix == ".safetensors" for p in files):
        raise ModelLoadError(f"{reference}: folder {str(folder)!r} holds no weights (*.safetensors).")


def _load_open_clip(reference: ModelRef, device: torch.device) -> OpenClipEncoder:
    import open_clip

    create_kwargs: dict[str, Any] = {}
    if reference.kind == "local":
        folder = reference.path
        config_path = folder / "open_clip_config.json"
        if not config_path.is_file():
            raise ModelLoadError(
                f"{reference}: folder holds no open_clip model (no open_clip_config.json). "
                f"If it is a transformers model, use 'hf:{folder}'."
            )
        try:
            model_config = json.loads(config_path.read_text())["model_cfg"]
        except (json.JSONDecodeError, KeyError) as error:
            raise ModelLoadError(f"{reference}: {config_path} is not a valid open_clip config ({error}).") from error
        _require_safetensors(folder, reference)
        name = f"local-dir:{folder}"
    elif reference.kind == "hub":
        folder = _download_open_clip_hub(reference.name, reference)
        model_config = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
        name = f"local-dir:{folder}"
    else:
        model_config = open_clip.get_model_config(reference.name)
        if model_config is None:
            raise ModelLoadError(
                f"{reference}: {reference.name!r} is not an open_clip architecture. "
                f"Known ones include {', '.join(open_clip.list_models()[:8])}, ... (open_clip.list_models())."
            )
        name = reference.name
        if reference.pretrained:
            create_kwargs.update(_builtin_pretrained(reference))
        else:
            logger.warning("%s has no pretrained tag: its weights are RANDOM.", reference)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, **create_kwargs)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as error:  # open_clip raises bare RuntimeError/ValueError/KeyError
        raise ModelLoadError(f"open_clip could not build {reference}: {type(error).__name__}: {error}") from error
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return OpenClipEncoder(reference, model, preprocess, tokenizer, model_config)


def _download_open_clip_hub(repo_id: str, reference: ModelRef) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        config = Path(hf_hub_download(repo_id, "open_clip_config.json"))
        hf_hub_download(repo_id, "open_clip_model.safetensors")
    except Exception as error:
        raise ModelLoadError(
            f"{reference}: could not fetch open_clip_config.json and open_clip_model.safetensors from the Hub "
            f"repo {repo_id!r} ({type(error).__name__}: {error}). Check the repo id and your network, or "
            f"download it and use 'open_clip:local-dir:PATH'."
        ) from error
    return config.parent


def _builtin_pretrained(reference: ModelRef) -> dict[str, Any]:
    """Keyword arguments that make open_clip load a built-in tag from Hub safetensors."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    config = get_pretrained_cfg(reference.name, reference.pretrained)
    if not config:
        tags = open_clip.list_pretrained_tags_by_model(reference.name)
        raise ModelLoadError(f"{reference}: unknown pretrained tag {reference.pretrained!r}; known tags: {tags}.")
    repo = config.get("hf_hub", "").strip("/")
    if not repo:
        raise ModelLoadError(
            f"{reference}: this tag is published only as a pickle download, which xbt does not load. "
            f"Convert it to safetensors and use 'open_clip:local-dir:PATH'."
        )
    weights = _download_open_clip_hub(repo, reference) / "open_clip_model.safetensors"
    return {
        "pretrained": str(weights),
        "force_quick_gelu": bool(config.get("quick_gelu", False)),
        "image_mean": config.get("mean"),
        "image_std": config.get("std"),
    }


# ---------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------
class HFImageTransform:
    """PIL image -> pixel tensor through a transformers image processor (picklable)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImageTransform({json.dumps(self.processor.to_dict(), sort_keys=True, default=str)})"


class HFClipEncoder(DualEncoder):
    """A transformers dual encoder (``CLIPModel`` or any model with ``get_text/image_features``)."""

    backend = "hf"

    def __init__(self, reference: ModelRef, model: nn.Module, processor, tokenizer):
        super().__init__(reference, model, HFImageTransform(processor))
        self.tokenizer = tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _projected(self.model.get_text_features(**tokens))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _projected(self.model.get_image_features(pixel_values=pixels))

    def architecture_config(self) -> dict[str, Any]:
        config = self.model.config.to_dict()
        volatile = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"}
        config = _drop_keys(config, volatile)
        return {"config": config, "preprocess": self.preprocess.processor.to_dict()}

    def _lora_patterns(self) -> dict[tuple[str, str], str]:
        blocks = {"vision": r"vision_model\.encoder\.layers\.\d+", "text": r"text_model\.encoder\.layers\.\d+"}
        kinds = {"attention": r"\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)", "mlp": r"\.mlp\.(?:fc1|fc2)"}
        return {(t, k): blocks[t] + kinds[k] for t in TOWERS for k in LAYER_KINDS}


def _projected(output) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _drop_keys(value, keys: set[str]):
    if isinstance(value, dict):
        return {k: _drop_keys(v, keys) for k, v in value.items() if k not in keys}
    return value


def _load_hf(reference: ModelRef, device: torch.device) -> HFClipEncoder:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    source = reference.name
    if reference.kind == "local":
        folder = reference.path
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"{reference}: folder holds no transformers model (no config.json). "
                f"If it is an open_clip model, use 'open_clip:local-dir:{folder}'."
            )
        _require_safetensors(folder, reference)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as error:
        raise ModelLoadError(f"{reference}: could not read its config ({type(error).__name__}: {error}).") from error
    if not (hasattr(config, "text_config") and hasattr(config, "vision_config")):
        raise ModelLoadError(
            f"{reference}: holds a {config.model_type!r} model, not a dual encoder with text and vision towers."
        )
    try:
        model = AutoModel.from_pretrained(source, use_safetensors=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(source)
        processor = AutoImageProcessor.from_pretrained(source)
    except Exception as error:
        raise ModelLoadError(f"{reference}: could not load model, tokenizer and image processor "
                             f"({type(error).__name__}: {error}).") from error
    if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
        raise ModelLoadError(f"{reference}: {type(model).__name__} has no get_text_features/get_image_features.")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return HFClipEncoder(reference, model, processor, tokenizer)


_LOADERS = {"open_clip": _load_open_clip, "hf": _load_hf}


def load_backbone(reference: str | ModelRef, device: str | torch.device | None = "cpu") -> DualEncoder:
    """Load a frozen dual encoder from a model reference string.

    Args:
        reference: e.g. ``"open_clip:ViT-B-32/openai"``, ``"hf:openai/clip-vit-base-patch32"``,
            ``"open_clip:local-dir:/models/old"`` or ``"hf:/models/new"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"``/``None`` for CUDA when available.
    """
    ref = parse_reference(reference)
    encoder = _LOADERS[ref.backend](ref, resolve_device(device))
    logger.info("Loaded %s (%s, embed_dim=%d)", ref, encoder.backend, encoder.embed_dim)
    return encoder


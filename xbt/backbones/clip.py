"""The transformers CLIP family, and the loader every ``hf:`` family shares.

``hf:`` references name a folder or Hub repo saved with ``save_pretrained``. The loader
reads its config first and picks the family registered for the config's
``model_type`` (``clip`` here, ``siglip`` in :mod:`xbt.backbones.siglip`); another
dual-encoder config with a ``projection_dim`` (a CLIP variant) is loaded as CLIP, as
before the registry existed. Families on ``hf`` subclass :class:`HFClipEncoder` and
override only what differs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..errors import ModelLoadError
from ..references import ModelRef
from .base import DualEncoder, lora_preset_table
from .registry import family_for, register
from .safety import require_safetensors

# Keys of a transformers config that change with the saving library, not the model (kept out of the fingerprint).
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"}


class HFImageTransform:
    """PIL image -> pixel tensor through a transformers image processor (picklable)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImageTransform({json.dumps(self.processor.to_dict(), sort_keys=True, default=str)})"


@register
class HFClipEncoder(DualEncoder):
    """A transformers ``CLIPModel`` (or a CLIP variant with ``projection_dim`` and ``get_*_features``)."""

    family = "clip"
    backend = "hf"
    model_type = "clip"
    lora_presets = lora_preset_table(
        blocks={"vision": r"vision_model\.encoder\.layers\.\d+", "text": r"text_model\.encoder\.layers\.\d+"},
        kinds={"attention": r"\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)", "mlp": r"\.mlp\.(?:fc1|fc2)"},
    )

    def __init__(self, reference: ModelRef, model: nn.Module, processor, tokenizer):
        super().__init__(reference, model, HFImageTransform(processor))
        self.tokenizer = tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, reference: ModelRef, device: torch.device) -> HFClipEncoder:
        """Load any registered ``hf`` family: the config's ``model_type`` picks the class."""
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        source = reference.name
        if reference.kind == "local":
            folder = reference.path
            if not (folder / "config.json").is_file():
                raise ModelLoadError(
                    f"{reference}: folder holds no transformers model (no config.json). "
                    f"If it is an open_clip model, use 'open_clip:local-dir:{folder}'."
                )
            require_safetensors(folder, reference)
        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as error:
            raise ModelLoadError(f"{reference}: could not read its config ({type(error).__name__}: {error}).") from error
        if not (hasattr(config, "text_config") and hasattr(config, "vision_config")):
            raise ModelLoadError(
                f"{reference}: holds a {config.model_type!r} model, not a dual encoder with text and vision towers."
            )
        family = _family_of(config)
        family.check_config(reference, config)
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
        return family(reference, model, processor, tokenizer)

    @classmethod
    def check_config(cls, reference: ModelRef, config) -> None:
        """Refuse a config this family cannot encode with (before any weights are read)."""
        if getattr(config, "projection_dim", None) is None:
            raise ModelLoadError(f"{reference}: its {config.model_type!r} config has no projection_dim, "
                                 f"which a CLIP model needs.")

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
        return _pooled(self.model.get_text_features(**tokens))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def architecture_config(self) -> dict[str, Any]:
        config = _drop_keys(self.model.config.to_dict(), _VOLATILE_CONFIG_KEYS)
        return {"config": config, "preprocess": self.preprocess.processor.to_dict()}


def _family_of(config) -> type[HFClipEncoder]:
    """The registered family of this config's model type; CLIP for other CLIP-like configs."""
    try:
        return family_for("hf", config.model_type)
    except ModelLoadError:
        if getattr(config, "projection_dim", None) is None:
            raise
        return HFClipEncoder


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _drop_keys(value, keys: set[str]):
    if isinstance(value, dict):
        return {k: _drop_keys(v, keys) for k, v in value.items() if k not in keys}
    return value

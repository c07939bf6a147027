"""The open_clip family: built-in architectures, ``hf-hub:`` repos and ``local-dir:`` folders."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from ..references import ModelRef
from .base import DualEncoder, lora_preset_table
from .registry import register
from .safety import require_safetensors

logger = logging.getLogger(__name__)


@register
class OpenClipEncoder(DualEncoder):
    """An ``open_clip`` CLIP model (built-in, ``hf-hub:`` or ``local-dir:``)."""

    family = "open_clip"
    backend = "open_clip"
    lora_presets = lora_preset_table(
        blocks={"vision": r"visual\.transformer\.resblocks\.\d+", "text": r"(?:text\.)?transformer\.resblocks\.\d+"},
        # open_clip attention is nn.MultiheadAttention: peft adapts the module itself.
        kinds={"attention": r"\.attn", "mlp": r"\.mlp\.(?:c_fc|c_proj)"},
    )

    def __init__(self, reference: ModelRef, model: nn.Module, preprocess, tokenizer, model_config: dict):
        super().__init__(reference, model, preprocess)
        self.tokenizer = tokenizer
        self.model_config = model_config

    @classmethod
    def load(cls, reference: ModelRef, device: torch.device) -> OpenClipEncoder:
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
            require_safetensors(folder, reference)
            name = f"local-dir:{folder}"
        elif reference.kind == "hub":
            folder = _download_hub(reference.name, reference)
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
        return cls(reference, model, preprocess, tokenizer, model_config)

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


def _download_hub(repo_id: str, reference: ModelRef) -> Path:
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
    weights = _download_hub(repo, reference) / "open_clip_model.safetensors"
    return {
        "pretrained": str(weights),
        "force_quick_gelu": bool(config.get("quick_gelu", False)),
        "image_mean": config.get("mean"),
        "image_std": config.get("std"),
    }

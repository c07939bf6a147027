"""The SigLIP family (transformers ``SiglipModel``), loaded from ``hf:`` references.

What differs from CLIP, and nothing else (the rest is inherited from
:class:`~xbt.backbones.clip.HFClipEncoder`, LoRA presets included: SigLIP's towers use
CLIP's module names, and the vision pooling head stays out of the presets):

- the config has no ``projection_dim``: the joint dimension is the text head's output
  (``text_config.projection_size``, the text hidden size by default), which must equal
  the vision hidden size (the vision tower's pooled output);
- the text is padded to ``max_length`` (the model was trained that way: it pools the
  last position, padding included) and the text model gets no attention mask, as in
  transformers' own SigLIP pipeline;
- the vision tower must have its pooling head (``vision_use_head``), which makes the image embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ModelLoadError
from ..references import ModelRef
from .clip import HFClipEncoder
from .registry import register


@register
class SiglipEncoder(HFClipEncoder):
    """A transformers ``SiglipModel``."""

    family = "siglip"
    model_type = "siglip"

    @classmethod
    def check_config(cls, reference: ModelRef, config) -> None:
        text_dim, vision_dim = _text_dim(config), int(config.vision_config.hidden_size)
        if text_dim != vision_dim:
            raise ModelLoadError(f"{reference}: SigLIP text embeddings have {text_dim} dimensions but image "
                                 f"embeddings {vision_dim}; the towers do not share one space.")
        if not getattr(config.vision_config, "vision_use_head", True):
            raise ModelLoadError(f"{reference}: its SigLIP vision tower has no pooling head (vision_use_head is "
                                 f"false), so it produces no image embedding.")

    @property
    def embed_dim(self) -> int:
        return _text_dim(self.model.config)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"]}


def _text_dim(config) -> int:
    text = config.text_config
    return int(getattr(text, "projection_size", None) or text.hidden_size)

"""Tiny CLIP models (and a tiny SigLIP) built from configs, saved in each library's own on-disk format.

Nothing is downloaded: weights are random (seeded) until the demo trains them. The
transformers side gets a real CLIP BPE tokenizer built from the vocabulary file that
ships inside open_clip, so both backends tokenise identically (up to padding id).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TinyClipConfig:
    """Size of a tiny CLIP: both towers are transformers of ``width`` and ``layers``."""

    embed_dim: int = 32
    width: int = 64
    layers: int = 2
    heads: int = 2
    image_size: int = 32
    patch_size: int = 8
    context_length: int = 32
    vocab_size: int = 49408
    seed: int = 0


def _clip_bpe():
    """(vocab dict, merge pairs) of the real CLIP BPE, in the token-id order CLIP uses."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(folder: str | Path | None = None, context_length: int = 77):
    """A transformers ``CLIPTokenizer`` with the real CLIP vocabulary, built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)
    if folder is not None:
        tokenizer.save_pretrained(str(folder))
    return tokenizer


def save_weights(model: torch.nn.Module, backend: str, folder: str | Path) -> None:
    """Write ``model``'s weights into ``folder`` in its library's own format (safetensors).

    open_clip reads ``open_clip_model.safetensors`` from a ``local-dir:`` folder;
    transformers writes ``model.safetensors`` + ``config.json`` with ``save_pretrained``.
    """
    if backend == "open_clip":
        state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(Path(folder) / "open_clip_model.safetensors"))
    else:
        model.save_pretrained(str(folder), safe_serialization=True)


def build_open_clip(folder: str | Path, config: TinyClipConfig = TinyClipConfig()) -> str:
    """Build and save a tiny open_clip CLIP; returns its reference ``open_clip:local-dir:FOLDER``."""
    from open_clip.model import CLIP

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": config.embed_dim,
        "vision_cfg": {"image_size": config.image_size, "layers": config.layers, "width": config.width,
                       "patch_size": config.patch_size, "head_width": config.width // config.heads},
        "text_cfg": {"context_length": config.context_length, "vocab_size": config.vocab_size,
                     "width": config.width, "heads": config.heads, "layers": config.layers},
    }
    torch.manual_seed(config.seed)
    model = CLIP(**model_cfg)
    preprocess_cfg = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    save_weights(model, "open_clip", folder)
    return f"open_clip:local-dir:{folder.resolve()}"


def _tower_configs(config: TinyClipConfig) -> tuple[dict, dict]:
    """(text, vision) tower configs of a tiny transformers dual encoder (CLIP and SigLIP alike).

    Token ids are those of the real CLIP BPE (:func:`build_clip_tokenizer`), which pads with
    its end-of-text token.
    """
    text = {"vocab_size": config.vocab_size, "hidden_size": config.width, "intermediate_size": 4 * config.width,
            "num_hidden_layers": config.layers, "num_attention_heads": config.heads,
            "max_position_embeddings": config.context_length,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    vision = {"hidden_size": config.width, "intermediate_size": 4 * config.width,
              "num_hidden_layers": config.layers, "num_attention_heads": config.heads,
              "image_size": config.image_size, "patch_size": config.patch_size}
    return text, vision


def _save_hf(model, processor, folder: Path, config: TinyClipConfig) -> str:
    """Save a tiny transformers model with the CLIP BPE tokenizer and ``processor``; returns ``hf:FOLDER``."""
    save_weights(model, "hf", folder)
    build_clip_tokenizer(folder, context_length=config.context_length)
    processor.save_pretrained(str(folder))
    (folder / "tiny_clip_config.json").write_text(json.dumps(asdict(config), indent=2))
    return f"hf:{folder.resolve()}"


def build_hf_clip(folder: str | Path, config: TinyClipConfig = TinyClipConfig()) -> str:
    """Build and save a tiny transformers CLIPModel + tokenizer + processor; returns ``hf:FOLDER``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text, vision = _tower_configs(config)
    torch.manual_seed(config.seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.embed_dim))
    processor = CLIPImageProcessor(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    return _save_hf(model, processor, folder, config)


def build_hf_siglip(folder: str | Path, config: TinyClipConfig = TinyClipConfig()) -> str:
    """Build and save a tiny transformers SiglipModel + tokenizer + processor; returns ``hf:FOLDER``.

    SigLIP has no projection: its embeddings have ``config.width`` dimensions
    (``config.embed_dim`` is not used). The tokenizer is the real CLIP BPE, saved with
    the model (SigLIP's own is a SentencePiece model that cannot be built offline);
    the image processor is SigLIP's own (plain resize, mean/std 0.5).
    """
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTextConfig, SiglipVisionConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text, vision = _tower_configs(config)
    torch.manual_seed(config.seed)
    model = SiglipModel(SiglipConfig(text_config=SiglipTextConfig(**text).to_dict(),
                                     vision_config=SiglipVisionConfig(**vision).to_dict()))
    processor = SiglipImageProcessor(size={"height": config.image_size, "width": config.image_size})
    return _save_hf(model, processor, folder, config)


BUILDERS = {"open_clip": build_open_clip, "hf": build_hf_clip}
"""One builder per backend: the tests' ``backend`` fixture runs over these."""

FAMILY_BUILDERS = {"open_clip": build_open_clip, "clip": build_hf_clip, "siglip": build_hf_siglip}
"""One builder per backbone family (:data:`xbt.backbones.FAMILIES`)."""

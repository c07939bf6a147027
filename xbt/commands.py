"""Small subcommands that only inspect things (the pipeline stages own their own commands)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import parse_configs


@dataclass
class InfoConfig:
    """What ``xbt info`` loads."""

    reference: str = field(metadata={"positional": True,
                                     "help": "model reference, e.g. open_clip:ViT-B-32/openai, hf:/path/to/model"})
    device: str = field(default="cpu", metadata={"help": "device to load the model on"})


def info(argv: Sequence[str]) -> int:
    """``xbt info REFERENCE``: load a model and print what xbt knows about it, as JSON."""
    (options,) = parse_configs([InfoConfig], argv, prog="xbt info", description=info.__doc__)

    from .backbones import load_backbone

    encoder = load_backbone(options.reference, device=options.device)
    print(json.dumps({
        "reference": str(encoder.reference),
        "backend": encoder.backend,
        "family": encoder.family,
        "embed_dim": encoder.embed_dim,
        "image_size": encoder.image_size,
        "parameters": sum(p.numel() for p in encoder.model.parameters()),
        "fingerprint": encoder.fingerprint,
        "lora_targets": encoder.lora_target_modules(),
    }, indent=2))
    return 0

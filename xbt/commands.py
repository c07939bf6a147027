"""Small subcommands that only inspect things (the pipeline stages own their own commands)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def info(argv: Sequence[str]) -> int:
    """``xbt info REFERENCE``: load a model and print what xbt knows about it, as JSON."""
    parser = argparse.ArgumentParser(prog="xbt info", description=info.__doc__)
    parser.add_argument("reference", help="e.g. open_clip:ViT-B-32/openai or hf:/path/to/model")
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args(argv)

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

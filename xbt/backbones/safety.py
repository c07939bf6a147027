"""Safe loading: only safetensors weights are ever read.

A checkpoint that exists only as a pickle (.bin/.pt/.pth) is refused with an error
that says how to convert it, and a pickle lying beside safetensors is refused too
(some libraries would prefer it).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError
from ..references import ModelRef

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(folder: Path, reference: ModelRef) -> None:
    """Raise :class:`ModelLoadError` unless ``folder`` holds safetensors weights and no pickle."""
    files = [p for p in folder.iterdir() if p.is_file()]
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelLoadError(
            f"{reference}: folder holds pickle weight files ({', '.join(pickles)}); xbt never unpickles weights. "
            f"Convert them once with safetensors.torch.save_file(torch.load(path, weights_only=True), "
            f"'{folder}/open_clip_model.safetensors') (or save the model with save_pretrained) and remove them."
        )
    if not any(p.suffix == ".safetensors" for p in files):
        raise ModelLoadError(f"{reference}: folder {str(folder)!r} holds no weights (*.safetensors).")

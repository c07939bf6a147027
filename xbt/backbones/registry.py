"""The registry of backbone families, and :func:`load_backbone` that dispatches through it.

The reference prefixes (backends) are listed once, in :data:`xbt.references.BACKENDS`,
next to their parsing rules: reference parsing must work without torch (``xbt --help``,
config validation), so the torch-free module owns the names and this registry reads
them. A family registers against one of those prefixes; a prefix with no family, or a
family with an unknown prefix, is a programming error caught at import (and by a test).

Adding a family = one module with one :class:`~xbt.backbones.base.DualEncoder` subclass
decorated with :func:`register`, imported by ``xbt/backbones/__init__.py``. A family on
a backend that hosts several (``hf``) sets ``model_type`` to the config ``model_type``
it loads and inherits the backend's loader, which picks it by that config value.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ModelLoadError
from ..references import BACKENDS, ModelRef, parse_reference
from .base import DualEncoder, resolve_device

logger = logging.getLogger(__name__)

FAMILIES: dict[str, type[DualEncoder]] = {}
"""Family name -> its encoder class, in registration order."""


def register(cls: type[DualEncoder]) -> type[DualEncoder]:
    """Class decorator: add a family to :data:`FAMILIES` (once)."""
    if cls.backend not in BACKENDS:
        raise TypeError(f"{cls.__name__}.backend {cls.backend!r} is not a reference prefix of "
                        f"xbt.references.BACKENDS {BACKENDS}.")
    if cls.family in FAMILIES:
        raise TypeError(f"Backbone family {cls.family!r} is registered twice "
                        f"({FAMILIES[cls.family].__name__} and {cls.__name__}).")
    siblings = families(cls.backend)
    if siblings:
        if cls.model_type is None or any(s.model_type in (None, cls.model_type) for s in siblings):
            raise TypeError(f"Families sharing the backend {cls.backend!r} must each name a distinct model_type; "
                            f"{cls.__name__} has {cls.model_type!r}, already registered: "
                            f"{[s.model_type for s in siblings]}.")
        if cls.load.__func__ is not siblings[0].load.__func__:
            raise TypeError(f"{cls.__name__} must inherit the loader of the {cls.backend!r} backend "
                            f"({siblings[0].__name__}.load): it picks the family from the config.")
    FAMILIES[cls.family] = cls
    return cls


def families(backend: str | None = None) -> list[type[DualEncoder]]:
    """The registered family classes (of one backend when given)."""
    return [cls for cls in FAMILIES.values() if backend is None or cls.backend == backend]


def family_for(backend: str, model_type: str | None = None) -> type[DualEncoder]:
    """The family class that loads ``backend`` references (whose config has ``model_type``).

    Raises :class:`ModelLoadError` listing the supported model types when none matches.
    """
    candidates = families(backend)
    if model_type is not None:
        candidates = [cls for cls in candidates if cls.model_type == model_type]
    if len(candidates) == 1:
        return candidates[0]
    known = ", ".join(repr(cls.model_type) for cls in families(backend)) or "none"
    raise ModelLoadError(f"No {backend!r} backbone family loads model type {model_type!r}; supported: {known}.")


def load_backbone(reference: str | ModelRef, device: str | torch.device | None = "cpu") -> DualEncoder:
    """Load a frozen dual encoder from a model reference string.

    Args:
        reference: e.g. ``"open_clip:ViT-B-32/openai"``, ``"hf:openai/clip-vit-base-patch32"``,
            ``"open_clip:local-dir:/models/old"`` or ``"hf:/models/new"`` (a CLIP or SigLIP folder).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"``/``None`` for CUDA when available.
    """
    ref = parse_reference(reference)
    if ref.is_adapter:
        raise ModelLoadError(f"{ref} is an xbt adapter, not a backbone. An adapter can be the OLD side of an upgrade "
                             f"(load it with xbt.encoders.load_encoder); the NEW model must be an hf: or open_clip: "
                             f"backbone.")
    loader = families(ref.backend)
    if not loader:
        raise ModelLoadError(f"{ref}: no backbone family is registered for the {ref.backend!r} backend.")
    # Families of one backend share its loader (checked in register), so the first one stands for all.
    encoder = loader[0].load(ref, resolve_device(device))
    logger.info("Loaded %s (%s family, embed_dim=%d)", ref, encoder.family, encoder.embed_dim)
    return encoder

"""One dual-encoder interface over every backbone family (open_clip, transformers CLIP, SigLIP).

:func:`load_backbone` turns a model reference (see :mod:`xbt.references`) into a
:class:`DualEncoder`. Every other module talks to backbones only through this
interface: tokenising, preprocessing, encoding, the fingerprint that ties artefacts
to a model, and the LoRA target presets (so no other module hard-codes module names).

Layout: :mod:`.base` (the interface), :mod:`.registry` (families and
:func:`load_backbone`), :mod:`.safety` (safetensors only), and one module per family:
:mod:`.open_clip`, :mod:`.clip`, :mod:`.siglip`. Importing this package registers them.
"""

from . import clip, open_clip, siglip  # noqa: F401  (each registers its family)
from .base import LAYER_KINDS, TOWERS, DualEncoder, resolve_device
from .registry import FAMILIES, families, family_for, load_backbone, register

__all__ = ["DualEncoder", "FAMILIES", "LAYER_KINDS", "TOWERS", "families", "family_for", "load_backbone",
           "register", "resolve_device"]

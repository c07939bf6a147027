"""Loading whatever a model reference names as an :class:`~xbt.spaces.Encoder`.

A backbone reference (``hf:``, ``open_clip:``) gives a frozen backbone in its own space;
an ``xbt:`` reference gives an adapter (``XBTModel``), which writes into its *target's*
space. Every place that takes an OLD model (stage 1, stage 2, ``fit``, ``eval``,
``embed``, query blending) loads it here, so an adapter can be the old side of the next
upgrade: v3 trained against ``xbt:<v2 adapter>`` lands in v1's space with v1 retired.
The NEW side is always a backbone (LoRA goes into it): :func:`xbt.load_backbone`.
"""

from __future__ import annotations

from typing import Any

from .references import ModelRef, parse_reference


def load_encoder(reference: str | ModelRef, device: Any = "cpu", merge: bool = False):
    """The encoder ``reference`` names: a backbone, or an adapter with its new backbone.

    ``merge``: fold an adapter's LoRA into its backbone (faster; its ``model_id`` then gets
    a ``-merged`` suffix). The default keeps the recorded identity, which caches key on.
    """
    ref = parse_reference(reference)
    if not ref.is_adapter:
        from .backbones import load_backbone

        return load_backbone(ref, device=device)
    from .model import XBTModel

    adapter = XBTModel.from_pretrained(ref.name, revision=ref.revision, device=device)
    return adapter.merge() if merge else adapter


def recorded_model_id(reference: str | ModelRef) -> str | None:
    """An adapter's ``model_id`` from its ``xbt_config.json`` (no weights loaded); ``None`` for a backbone,
    whose id is the fingerprint of its weights."""
    ref = parse_reference(reference)
    if not ref.is_adapter:
        return None
    from .model import read_adapter_config

    return read_adapter_config(ref.name, revision=ref.revision)["model_id"]

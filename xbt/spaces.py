"""Embedding spaces: the concept every artefact and every evaluation cell speaks.

A *space* is where vectors can be compared. Every encoder states the space it writes
into (``space_id``) and what it is (``model_id``):

=====================================  ==================  ===============================
encoder                                model_id            space_id
=====================================  ==================  ===============================
a native backbone (old or new)         its fingerprint     its fingerprint (its own space)
``XBTModel`` (new + LoRA + ψ)          the adapter's id    the target space (the old one)
``XBTModel``, full vectors (BT²/OCA)   the adapter's id    the adapter's own full space
=====================================  ==================  ===============================

Because an adapter's ``space_id`` is its *target's* ``space_id``, an adapter trained
against another adapter (a chained upgrade v3 → v2-adapter) writes into v1's space,
with v1 itself retired. ψ, caches, stored galleries and reports record space ids, so
an artefact made for one space refuses vectors from another (:func:`check_same_space`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .errors import FingerprintMismatchError


@runtime_checkable
class Encoder(Protocol):
    """Anything that embeds texts and images into one space (backbones, adapters)."""

    @property
    def dim(self) -> int:
        """Dimension of the vectors it returns."""

    @property
    def space_id(self) -> str:
        """The space its vectors live in (comparable with every other encoder of this id)."""

    @property
    def model_id(self) -> str:
        """What this encoder is (fingerprint of its weights)."""

    def encode_text(self, texts: Sequence[str], **options: Any):
        """L2-normalised float32 ``(len(texts), dim)`` tensor on the CPU."""

    def encode_image(self, images: Sequence[Any], **options: Any):
        """L2-normalised float32 ``(len(images), dim)`` tensor on the CPU."""


def full_space_id(model_id: str) -> str:
    """The space of an adapter's full vectors (compatible part + extra dimensions): its own."""
    return f"{model_id}/full"


def check_same_space(expected: str | None, given: str | None, what: str, fix: str = "") -> None:
    """Raise :class:`FingerprintMismatchError` naming both ids when vectors come from another space.

    ``None`` on either side means "not recorded" and passes (older artefacts, user files).
    """
    if expected and given and expected != given:
        raise FingerprintMismatchError(
            f"{what} is in space {given}, but space {expected} is expected here. "
            + (fix or "Vectors from different models are not comparable; use the files made for this space.")
        )

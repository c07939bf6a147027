"""xbt: cross-modal backward-compatible training for CLIP models.

Upgrade a CLIP model without re-embedding the gallery: train small adapters so the
new model's embeddings land in the old model's space.

The public names below are imported on first use (PEP 562), so ``import xbt`` and the
console script's ``--help`` / ``--version`` do not pay for torch; the errors are
torch-free and imported at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import FingerprintMismatchError, InputError, ModelLoadError, ModelReferenceError, XBTError

# public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "AdapterConfig": ".model",
    "DualEncoder": ".backbones",
    "ModelRef": ".references",
    "XBTModel": ".model",
    "load_backbone": ".backbones",
    "parse_reference": ".references",
}

__all__ = [
    "AdapterConfig",
    "DualEncoder",
    "FingerprintMismatchError",
    "InputError",
    "ModelLoadError",
    "ModelRef",
    "ModelReferenceError",
    "XBTError",
    "XBTModel",
    "__version__",
    "load_backbone",
    "parse_reference",
]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .backbones import DualEncoder, load_backbone
    from .model import AdapterConfig, XBTModel
    from .references import ModelRef, parse_reference

    __version__: str


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xbt-clip")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

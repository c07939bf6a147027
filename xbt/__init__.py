"""xbt: cross-modal backward-compatible training for CLIP models.

Upgrade a CLIP model without re-embedding the gallery: train small adapters so the
new model's embeddings land in the old model's space.
"""

from importlib.metadata import PackageNotFoundError, version

from .backbones import DualEncoder, load_backbone
from .errors import FingerprintMismatchError, InputError, ModelLoadError, ModelReferenceError, XBTError
from .model import AdapterConfig, XBTModel
from .references import ModelRef, parse_reference

try:
    __version__ = version("xbt-clip")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

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

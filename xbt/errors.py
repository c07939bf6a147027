"""Exceptions raised by xbt. Each message says what was wrong and what to do about it."""

from __future__ import annotations


class XBTError(Exception):
    """Base class of every error xbt raises on purpose."""


class ModelReferenceError(XBTError, ValueError):
    """A model reference string is malformed or names something that does not exist."""


class ModelLoadError(XBTError):
    """A reference parsed, but no dual encoder could be loaded from it."""


class InputError(XBTError, ValueError):
    """Input data (texts, images, vectors, files) cannot be used as given."""


class FingerprintMismatchError(XBTError):
    """An artefact was made with another model than the one it is being used with."""

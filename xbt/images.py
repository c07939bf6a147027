"""Opening and normalising images before any CLIP preprocessing.

CLIP preprocessing expects 8-bit RGB. Real image collections also hold greyscale,
palette, transparent, CMYK and 16-bit files; each is converted the way a person
looking at the picture would expect (transparency composited on white, 16-bit
scaled rather than clipped). Anything that cannot be decoded raises
:class:`~xbt.errors.InputError` naming the file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError

# Refuse decompression bombs from the header alone, before any pixel is decoded.
MAX_IMAGE_PIXELS = 100_000_000

ImageLike = Image.Image | str | os.PathLike


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _rescale_high_depth(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float greyscale to 8-bit, scaled by the mode's range."""
    array = np.asarray(image)
    if image.mode == "F":
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
        eight_bit = (np.nan_to_num(scaled) * 255.0).round()
    else:
        # 'I;16*' modes use the full 16-bit range; 'I' images are usually 16-bit data too.
        peak = 65535.0 if array.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        eight_bit = np.clip(array.astype(np.float64) / peak * 255.0, 0, 255).round()
    return Image.fromarray(eight_bit.astype(np.uint8), mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an 8-bit RGB version of ``image`` (any PIL mode)."""
    if not isinstance(image, Image.Image):
        raise InputError(f"Expected a PIL image, got {type(image).__name__}.")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "RGBa", "La", "PA") or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(image)
    if mode.startswith("I") or mode == "F":
        return _rescale_high_depth(image)
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError) as error:
        raise InputError(f"Cannot convert an image in mode {mode!r} to RGB: {error}.") from error


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and convert an image file to RGB.

    Raises :class:`InputError` for a missing, unreadable, truncated, corrupt or oversized file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Image file {str(path)!r} does not exist.")
    return _decode(path, str(path))


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode an encoded image held in memory (a tar member, a Parquet cell) to RGB.

    ``name`` identifies the image in error messages. Same checks as :func:`load_image`.
    """
    return _decode(io.BytesIO(data), name)


def _decode(source: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{width}x{height} pixels")
            image.load()  # decode now: truncation shows up here, not later in a worker
            return to_rgb(image).copy()
    except Image.DecompressionBombError as error:
        raise InputError(
            f"Image {name!r} is too large to decode safely ({error}); "
            f"resize it below {MAX_IMAGE_PIXELS:,} pixels."
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"Image {name!r} is corrupt or not an image ({type(error).__name__}: {error}).") from error


def as_rgb_image(item: ImageLike) -> Image.Image:
    """A PIL image or an image path, as an RGB PIL image."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, (str, os.PathLike)):
        return load_image(item)
    raise InputError(f"Expected a PIL image or an image path, got {type(item).__name__}.")

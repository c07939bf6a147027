"""Image modes a real collection holds, and files that cannot be decoded."""

import numpy as np
import pytest
from PIL import Image

from xbt import InputError
from xbt import images as xbt_images
from xbt.images import load_image, to_rgb


def _pixel(image: Image.Image) -> tuple:
    return to_rgb(image).getpixel((0, 0))


def test_greyscale_and_bilevel_become_grey_rgb():
    assert _pixel(Image.new("L", (4, 4), 77)) == (77, 77, 77)
    assert _pixel(Image.new("1", (4, 4), 1)) == (255, 255, 255)


def test_transparency_is_composited_on_white():
    assert _pixel(Image.new("RGBA", (4, 4), (255, 0, 0, 0))) == (255, 255, 255)
    assert _pixel(Image.new("RGBA", (4, 4), (255, 0, 0, 255))) == (255, 0, 0)
    assert _pixel(Image.new("LA", (4, 4), (0, 0))) == (255, 255, 255)
    half = _pixel(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))
    assert all(120 <= channel <= 135 for channel in half)


def test_palette_with_and_without_transparency():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert _pixel(palette) == (10, 200, 30)
    palette.info["transparency"] = 1
    assert _pixel(palette) == (255, 255, 255)


def test_cmyk_converts():
    assert _pixel(Image.new("CMYK", (4, 4), (0, 255, 255, 0))) == (255, 0, 0)


def test_sixteen_bit_is_scaled_not_clipped():
    data = np.full((4, 4), 32768, dtype=np.uint16)
    image = Image.fromarray(data)
    assert image.mode.startswith("I")
    assert _pixel(image) == (128, 128, 128)
    assert _pixel(Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))) == (255, 255, 255)


def test_float_images_are_stretched_to_their_range():
    data = np.array([[0.0, 0.5], [1.0, 1.0]], dtype=np.float32)
    rgb = to_rgb(Image.fromarray(data, mode="F"))
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((0, 1)) == (255, 255, 255)


def test_load_image_reads_every_mode_from_disk(tmp_path):
    for mode, size in [("L", 8), ("RGBA", 8), ("P", 8), ("CMYK", 8)]:
        path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.new(mode, (size, size)).save(path)
        assert load_image(path).mode == "RGB"


def test_missing_corrupt_and_truncated_files_name_the_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not a png")
    with pytest.raises(InputError, match="corrupt.png"):
        load_image(corrupt)
    whole = tmp_path / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole.read_bytes()[:400])
    with pytest.raises(InputError, match="truncated.jpg"):
        load_image(truncated)


def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(xbt_images, "MAX_IMAGE_PIXELS", 300 * 299)
    with pytest.raises(InputError, match="too large"):
        load_image(path)

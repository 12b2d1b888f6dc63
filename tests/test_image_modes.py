"""Every image mode Pillow opens is decoded to the right 8-bit RGB values, or skipped with one warning."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from data.images import load_images, read_image

SIZE = 4  # test patterns are 4 x 4, read at 4 px: no resampling
RGB = np.array([[[0, 0, 0], [255, 255, 255], [200, 30, 90], [10, 220, 140]],
                [[128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255]]] * 2, dtype=np.uint8)
GREY = np.array([[0, 17, 128, 255], [1, 100, 200, 254]] * 2, dtype=np.uint8)
SIXTEEN = np.array([[0, 257, 32896, 65535], [128, 129, 40000, 65534]] * 2, dtype=np.uint16)


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _palette(transparent: bool) -> tuple[Image.Image, np.ndarray]:
    colours = np.array([[0, 0, 0], [255, 255, 255], [200, 30, 90], [10, 220, 140]], dtype=np.uint8)
    indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0]] * 2, dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(colours.ravel().tolist())
    if transparent:
        image.info["transparency"] = 1
    return image, colours[indices]


def _cases() -> dict[str, tuple[Image.Image, str, str, np.ndarray, int]]:
    """case -> (image, file format, mode the file opens in, expected RGB, tolerance)."""
    rgba = np.dstack([RGB, np.array([[0, 64, 128, 255]] * 4, dtype=np.uint8)])
    binary = GREY > 127
    return {
        "1": (Image.fromarray(binary), "PNG", "1", _grey_rgb(binary.astype(np.uint8) * 255), 0),
        "L": (Image.fromarray(GREY, "L"), "PNG", "L", _grey_rgb(GREY), 0),
        "P": (*_palette(False)[:1], "PNG", "P", _palette(False)[1], 0),
        "P with transparency": (*_palette(True)[:1], "PNG", "P", _palette(True)[1], 0),
        "RGB": (Image.fromarray(RGB, "RGB"), "PNG", "RGB", RGB, 0),
        "RGBA": (Image.fromarray(rgba, "RGBA"), "PNG", "RGBA", RGB, 0),  # alpha dropped, colour kept
        "LA": (Image.fromarray(np.dstack([GREY, np.full_like(GREY, 7)]), "LA"), "PNG", "LA", _grey_rgb(GREY), 0),
        "CMYK": (Image.fromarray(RGB, "RGB").convert("CMYK"), "TIFF", "CMYK", RGB, 0),
        "YCbCr": (Image.fromarray(RGB, "RGB").convert("YCbCr"), "TIFF", "YCbCr", RGB, 3),  # 8-bit YCbCr rounds
        "I;16": (Image.fromarray(SIXTEEN), "PNG", "I;16", _grey_rgb(np.round(SIXTEEN / 257).astype(np.uint8)), 0),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_mode_decodes_to_the_right_rgb_values(case, tmp_path):
    image, file_format, mode, expected, tolerance = _cases()[case]
    path = tmp_path / f"image.{file_format.lower()}"
    image.save(path, file_format)
    with Image.open(path) as reopened:
        assert reopened.mode == mode  # the file really holds the mode under test
    pixels = read_image(path, SIZE)
    assert pixels.dtype == np.uint8 and pixels.shape == (SIZE, SIZE, 3)
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= tolerance


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers turn it 90 degrees clockwise
    Image.fromarray(RGB, "RGB").save(tmp_path / "turned.png", exif=exif)
    assert np.array_equal(read_image(tmp_path / "turned.png", SIZE), np.rot90(RGB, k=-1))


@pytest.mark.parametrize("mode, pixels", [("I", np.array([[0, 70000]] * 2, dtype=np.int32)),
                                          ("F", np.array([[0.0, 0.5]] * 2, dtype=np.float32))])
def test_unscaled_modes_are_skipped_with_one_warning_naming_the_file(mode, pixels, tmp_path, caplog):
    Image.fromarray(pixels, mode).save(tmp_path / "wide.tif")
    Image.fromarray(GREY, "L").save(tmp_path / "fine.png")
    with caplog.at_level(logging.WARNING, logger="data.images"):
        images, kept = load_images(tmp_path, ["wide.tif", "fine.png"], SIZE, progress=False)
    assert kept == ["fine.png"] and images.shape == (1, SIZE, SIZE, 3)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "wide.tif" in messages[0] and "8-bit" in messages[0]

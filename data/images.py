"""Decode and resize images (any mode Pillow opens -> RGB uint8), dropping unreadable files."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from utils.logs import progress as progress_bar

log = logging.getLogger(__name__)


SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
UNSCALED_MODES = {"I": "32-bit integer", "F": "32-bit float"}  # no fixed value range to map onto 0-255


def read_image(path: Path | str, size: int) -> np.ndarray:
    """Any 8- or 16-bit mode Pillow opens -> RGB uint8 ``size``x``size`` array, upright per its EXIF orientation.

    Alpha is dropped (as torchvision's loader does); 16-bit grey is scaled to 8 bits; 32-bit integer or
    float pixels raise ValueError, since nothing says which values are black and white.
    """
    with Image.open(path) as image:
        image = _to_rgb(ImageOps.exif_transpose(image))
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image)


def read_rgb(path: Path | str) -> np.ndarray:
    """``read_image`` at full size (same conversion and orientation): frames of a stream are cut into tiles first."""
    with Image.open(path) as image:
        return np.asarray(_to_rgb(ImageOps.exif_transpose(image)))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in UNSCALED_MODES:
        raise ValueError(f"{UNSCALED_MODES[image.mode]} pixels ({image.mode}): save it as an 8-bit image")
    if image.mode in SIXTEEN_BIT_MODES:
        grey = (np.asarray(image).astype(np.uint32) + 128) // 257  # 0..65535 -> 0..255, rounded
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow's documented route for palettes with a transparent entry
    return image.convert("RGB")


def _try_read(path: Path, size: int) -> np.ndarray | None:
    try:
        if path.stat().st_size == 0:
            raise OSError("empty file")
        return read_image(path, size)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        log.warning("skipping unreadable image '%s': %s", path, error)
        return None


def decode_images(root: Path, rel_paths: list[str], size: int, progress: bool = True) -> Iterator[np.ndarray | None]:
    """Each of ``rel_paths`` decoded at ``size`` in order (None for an unreadable file, with one warning).

    Decoding runs in threads (Pillow releases the GIL); the caller decides where the pixels go.
    """
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        yield from progress_bar(pool.map(lambda rel: _try_read(root / rel, size), rel_paths), total=len(rel_paths),
                                desc="decode", disable=not progress, leave=False)


def load_images(root: Path, rel_paths: list[str], size: int, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """Decode ``rel_paths`` into an in-RAM (N, size, size, 3) uint8 array; returns it and the paths kept."""
    decoded = list(decode_images(root, rel_paths, size, progress))
    kept = [rel for rel, image in zip(rel_paths, decoded) if image is not None]
    images = np.stack([image for image in decoded if image is not None]) if kept else np.zeros((0, size, size, 3), np.uint8)
    return images, kept

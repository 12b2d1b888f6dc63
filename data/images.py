"""Decode and resize images once into one in-RAM array, dropping unreadable files."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from utils.logs import progress as progress_bar

log = logging.getLogger(__name__)


def read_image(path: Path | str, size: int) -> np.ndarray:
    """Any mode (RGBA, grayscale, palette) -> RGB uint8 ``size``x``size`` array."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image)


def _try_read(path: Path, size: int) -> np.ndarray | None:
    try:
        if path.stat().st_size == 0:
            raise OSError("empty file")
        return read_image(path, size)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        log.warning("skipping unreadable image '%s': %s", path, error)
        return None


def load_images(root: Path, rel_paths: list[str], size: int, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """Decode ``rel_paths`` into an (N, size, size, 3) uint8 array; returns it and the paths kept.

    Decoding runs in threads (Pillow releases the GIL), and one contiguous array is
    shared copy-on-write with forked DataLoader workers.
    """
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(
            progress_bar(
                pool.map(lambda rel: _try_read(root / rel, size), rel_paths),
                total=len(rel_paths),
                desc="decode",
                disable=not progress,
                leave=False,
            )
        )
    kept = [rel for rel, image in zip(rel_paths, decoded) if image is not None]
    images = np.stack([image for image in decoded if image is not None]) if kept else np.zeros((0, size, size, 3), np.uint8)
    return images, kept

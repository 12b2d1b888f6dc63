"""Where a frame is looked at: the region of interest (the seam) and the model-size tiles cut from it.

A camera sees far more than one 224 px patch; classifying the whole frame shrunk to 224 px would blur a
defect away, so the seam region is cut into tiles that are classified in one batch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from deploy.edge import resize_like_evaluation
from utils.errors import UserError


class Box(NamedTuple):
    x: int
    y: int
    w: int
    h: int

    def to_list(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]


class GeometryError(UserError):
    """The ROI or tiles do not fit the frames."""


def parse_roi(text: str) -> Box:
    """``x,y,w,h`` in pixels (for argparse)."""
    try:
        x, y, w, h = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"expected x,y,w,h in pixels, got {text!r}") from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise ValueError(f"x, y must be >= 0 and w, h > 0, got {text!r}")
    return Box(x, y, w, h)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile offsets every ``stride`` px; the last tile is moved back to end at the edge, so the whole length is covered."""
    count = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(count)})


def tile_boxes(frame_size: tuple[int, int], roi: Box | None, tile: int | None, stride: int | None) -> list[Box]:
    """The boxes classified in each frame of ``frame_size`` (width, height).

    No ``tile``: the ROI (default: the whole frame) is one tile, resized to the model's input as predict.py resizes
    an image file. With ``tile``: ``tile``x``tile`` squares every ``stride`` px (default: ``tile``, no overlap) over the ROI.
    """
    width, height = frame_size
    roi = roi or Box(0, 0, width, height)
    if roi.x + roi.w > width or roi.y + roi.h > height:
        raise GeometryError(f"--roi {','.join(map(str, roi))} does not fit in the {width}x{height} frames")
    if tile is None:
        return [roi]
    if tile > roi.w or tile > roi.h:
        raise GeometryError(f"--tile {tile} is larger than the {roi.w}x{roi.h} region: give a smaller --tile or a larger --roi")
    stride = stride or tile
    return [Box(roi.x + dx, roi.y + dy, tile, tile) for dy in _starts(roi.h, tile, stride) for dx in _starts(roi.w, tile, stride)]


def cut_tiles(frame_bgr: np.ndarray, boxes: list[Box], size: int) -> np.ndarray:
    """uint8 RGB tiles [T, size, size, 3] from a BGR frame, each resized as evaluation resizes an image file.

    The resize works channel by channel, so the channels are swapped after it, on the small tile: swapping a
    1280x720 frame first costs more than the model (4 ms here).
    """
    return np.stack([resize_like_evaluation(frame_bgr[b.y:b.y + b.h, b.x:b.x + b.w], size)[..., ::-1] for b in boxes])

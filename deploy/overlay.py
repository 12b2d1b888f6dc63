"""The picture a person sees: the frame with its tiles boxed (defective ones red and labelled), for --show, --save-defects and
--serve (which adds the region of interest and the verdict as a banner)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from deploy.tiling import Box
from utils.io import atomic_open

RED, GREEN, GREY = (0, 0, 255), (0, 200, 0), (160, 160, 160)  # BGR


def _label(image: np.ndarray, text: str, x: int, y: int, colour: tuple[int, int, int]) -> None:
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    y = max(y, h + 4)
    cv2.rectangle(image, (x, y - h - 4), (x + w + 4, y), colour, cv2.FILLED)
    cv2.putText(image, text, (x + 2, y - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)


def draw_overlay(frame: np.ndarray, boxes: list[Box], labels: list[str | None], fps: float | None = None) -> np.ndarray:
    """A copy of the BGR frame: normal tiles thin green, defective tiles (a label) thick red with the label above."""
    image = frame.copy()
    for box, label in zip(boxes, labels):
        colour = GREEN if label is None else RED
        cv2.rectangle(image, (box.x, box.y), (box.x + box.w - 1, box.y + box.h - 1), colour, 1 if label is None else 3)
        if label is not None:
            _label(image, label, box.x, box.y, RED)
    if fps is not None:
        _label(image, f"{fps:.1f} FPS", 0, 0, GREY)
    return image


def draw_verdict(frame: np.ndarray, boxes: list[Box], labels: list[str | None], roi: Box | None, banner: str,
                 defect: bool) -> np.ndarray:
    """draw_overlay's picture with the region of interest in grey and ``banner`` (the verdict, its score against the
    threshold) in a red or green bar across the top, its text scaled to the frame's width."""
    image = draw_overlay(frame, boxes, labels)
    if roi is not None:
        cv2.rectangle(image, (roi.x, roi.y), (roi.x + roi.w - 1, roi.y + roi.h - 1), GREY, 1)
    scale = max(0.4, image.shape[1] / 1280)
    (_, h), _ = cv2.getTextSize(banner, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
    cv2.rectangle(image, (0, 0), (image.shape[1] - 1, h + 12), RED if defect else GREEN, cv2.FILLED)
    cv2.putText(image, banner, (6, h + 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2, cv2.LINE_AA)
    return image


def save_frame(image: np.ndarray, path: Path) -> None:
    """A JPEG written atomically (a reader never sees half a picture)."""
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} frame as JPEG")
    with atomic_open(path, "wb") as handle:
        handle.write(encoded.tobytes())

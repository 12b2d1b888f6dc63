"""Classify image files, torch-free: find the images, decode them as evaluation does, predict with any classifier.

The classifier is a callable from uint8 RGB images [N, H, W, 3] to class probabilities [N, classes]:
``deploy.edge.EdgeClassifier`` (ONNX Runtime, no torch) or ``deploy.classify.TorchClassifier`` (a checkpoint).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data.images import read_image
from data.scan import IMAGE_EXTENSIONS
from data.stitchingnet import normal_index
from utils.errors import UserError
from utils.operating_point import flag_defects, top_defect_classes

log = logging.getLogger(__name__)


class NoImagesError(UserError):
    """Nothing to classify among the given paths."""


@dataclass
class Prediction:
    path: str
    label: str
    confidence: float
    defect: bool | None  # None: the model has no Normal class
    top_k: list[tuple[str, float]]
    score: float | None = None  # the defect score 1 - P(Normal); None without a Normal class

    @property
    def verdict(self) -> str:
        return {True: "DEFECT", False: "normal", None: "-"}[self.defect]

    def to_dict(self, with_top_k: bool) -> dict:
        row = {"path": self.path, "class": self.label, "confidence": round(self.confidence, 6), "defect": self.defect,
               "defect_score": None if self.score is None else round(self.score, 6)}
        if with_top_k:
            row["top_k"] = [{"class": name, "confidence": round(p, 6)} for name, p in self.top_k]
        return row


def find_images(paths: list[str]) -> list[Path]:
    """Files as given, plus image-extension files under folders (recursively, sorted); missing paths warn."""
    found: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        else:
            log.warning("'%s' does not exist; skipped", path)
    if not found:
        raise NoImagesError(f"no image files found in {', '.join(paths)}: give image files or folders holding "
                            f"{'/'.join(sorted(IMAGE_EXTENSIONS))} files")
    return found


def _decode(path: Path, size: int) -> np.ndarray | None:
    try:
        return np.array(read_image(path, size))  # writable copy, as in the evaluation cache
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        log.warning("skipping '%s': not a readable image (%s)", path, error)
        return None


def classify_files(classify: Callable[[np.ndarray], np.ndarray], info: dict, files: list[Path], top_k: int = 1,
                   batch_size: int = 32, threshold: float | None = None) -> Iterator[Prediction]:
    """Predictions in file order; unreadable files are skipped with a warning on stderr (all unreadable: NoImagesError).

    With a ``threshold`` the defect score decides (score >= threshold: DEFECT, reported as its most likely defect
    class; else Normal), as stream.py decides a tile; without one the most likely class does."""
    names = info["class_names"]
    normal = normal_index(names)
    if normal is None:
        log.warning("the model's classes %s have no Normal class: predictions carry no defect flag", names)
    k = min(top_k, len(names))
    readable = 0
    with ThreadPoolExecutor() as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            decoded = [(path, image) for path, image in zip(chunk, pool.map(lambda p: _decode(p, info["img_size"]), chunk))
                       if image is not None]
            readable += len(decoded)
            if not decoded:
                continue
            probs = np.asarray(classify(np.stack([image for _, image in decoded])))
            indices = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            values = np.take_along_axis(probs, indices, axis=1)
            labels = indices[:, 0]
            scores = defective = [None] * len(probs)
            if normal is not None:
                scores, defective = flag_defects(probs, normal, threshold)
                labels = np.where(defective, top_defect_classes(probs, normal), normal)
            for i, ((path, _), top_values, top_indices) in enumerate(zip(decoded, values.tolist(), indices.tolist())):
                yield Prediction(str(path), names[labels[i]], float(probs[i, labels[i]]),
                                 None if normal is None else bool(defective[i]),
                                 [(names[j], v) for j, v in zip(top_indices, top_values)], None if normal is None else float(scores[i]))
    if not readable:
        raise NoImagesError(f"none of the {len(files)} files given could be read as an image")


class Throughput:
    """Images per second over the whole call (decoding included), for the summary."""

    def __init__(self):
        self.started = time.perf_counter()

    def per_second(self, count: int) -> float:
        return count / max(time.perf_counter() - self.started, 1e-9)

"""Torch-free inference for the edge device: an exported ONNX model run by ONNX Runtime on numpy arrays
(deploy.openvino_runtime runs the OpenVINO IR behind the same calls).

Preprocessing equals evaluation's (``data.images.read_image`` + ``data.transforms.Preprocess``) in numpy and
Pillow, so a Raspberry Pi needs neither PyTorch nor timm (requirements-edge.txt).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from data.stitchingnet import normal_index
from utils.errors import UserError
from utils.operating_point import OperatingPoint, OperatingPointError

log = logging.getLogger(__name__)

# The exported model's interface; defined on this torch-free side, deploy.onnx_export writes it.
METADATA_KEY = "stitchdefect"  # ONNX metadata entry / OpenVINO rt_info key holding the deploy info (class names, mean/std,
# img_size, operating_point: the defect threshold chosen for this artifact on validation images)
CHECKSUM_KEY = "stitchdefect_sha256"  # ONNX metadata entry / OpenVINO rt_info key: SHA-256 of the graph and weights,
# checked before the model is used (ONNX: every top-level field of the file but the metadata; OpenVINO: the .bin)
INPUT_NAME = "input"  # float32 [batch, 3, img_size, img_size], normalised with the stored mean/std
OUTPUT_NAME = "logits"  # float32 [batch, num_classes], softmax gives the class probabilities


class EdgeModelError(UserError):
    """An exported model file (ONNX, OpenVINO IR) given for inference cannot be used; the message says why."""


def all_threads() -> int:
    return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU's model name, for the context line of a benchmark table."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resize_like_evaluation(rgb: np.ndarray, size: int) -> np.ndarray:
    """An RGB uint8 array resized to ``size``x``size`` exactly as ``data.images.read_image`` resizes a decoded file
    (Pillow bilinear, which low-passes when shrinking; OpenCV's INTER_LINEAR does not and would give other inputs)."""
    if rgb.shape[:2] == (size, size):
        return rgb
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), Image.BILINEAR))


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 RGB [N, H, W, 3] -> float32 [N, 3, H, W], computed in float32 like ``data.transforms.Preprocess``."""
    mean255 = np.asarray(mean, np.float32).reshape(1, 3, 1, 1) * np.float32(255)
    std255 = np.asarray(std, np.float32).reshape(1, 3, 1, 1) * np.float32(255)
    inputs = images.transpose(0, 3, 1, 2).astype(np.float32)
    inputs -= mean255  # in place: the same values as (x - mean) / std at less than half the time (no temporaries)
    inputs /= std255
    return inputs


MAX_IMG_SIZE = 4096  # a larger input is a damaged file, not a model for a seam


def check_deploy_info(info: object, input_shape: Sequence | None = None, output_shape: Sequence | None = None) -> dict:
    """The deploy metadata, field by field and against the graph's own shapes; EdgeModelError (one line) otherwise."""
    def damaged(problem: str) -> EdgeModelError:
        return EdgeModelError(f"the model's metadata is damaged: {problem}; export it again with export.py")

    if not isinstance(info, dict):
        raise damaged(f"it is a {type(info).__name__}, not a mapping")
    missing = [key for key in ("model", "class_names", "img_size", "mean", "std") if key not in info]
    if missing:
        raise damaged(f"it lacks {', '.join(missing)}")
    names, size = info["class_names"], info["img_size"]
    if not (isinstance(names, list) and names and all(isinstance(name, str) and name for name in names)):
        raise damaged(f"class_names is {names!r}, not a list of names")
    if not (isinstance(size, int) and not isinstance(size, bool) and 0 < size <= MAX_IMG_SIZE):
        raise damaged(f"img_size is {size!r}, not a size in pixels up to {MAX_IMG_SIZE}")
    for key in ("mean", "std"):
        values = info[key]
        if not (isinstance(values, list) and len(values) == 3 and all(isinstance(v, int | float) and math.isfinite(v)
                                                                      for v in values)):
            raise damaged(f"{key} is {values!r}, not three numbers")
    if not all(v > 0 for v in info["std"]):
        raise damaged(f"std is {info['std']!r}: every channel's must be positive")
    if output_shape is not None and isinstance(output_shape[-1], int) and output_shape[-1] != len(names):
        raise damaged(f"{len(names)} class names for a model with {output_shape[-1]} outputs")
    if input_shape is not None and any(isinstance(side, int) and side != size for side in input_shape[2:]):
        raise damaged(f"img_size {size} for a model whose input is {list(input_shape[2:])}")
    return info


def stored_operating_point(info: dict) -> OperatingPoint | None:
    """The operating point an artifact or checkpoint carries; None for one made before operating points existed."""
    stored = info.get("operating_point")
    if stored is None:
        return None
    try:
        return OperatingPoint.from_dict(stored)
    except OperatingPointError as error:
        raise EdgeModelError(f"the model's metadata is damaged: {error}; export it again") from None


def read_info_json(text: str, path: Path) -> dict:
    """A model's deploy info (ONNX metadata, OpenVINO rt_info, NCNN sidecar); one error line if it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise EdgeModelError(f"'{path}': the model's metadata is damaged ({error}); export it again with export.py") from None
    except RecursionError:  # nested thousands deep: json's parser recurses once per level
        raise EdgeModelError(f"'{path}': the model's metadata is nested too deeply to be deploy info; export it again "
                             "with export.py") from None


ONNX_METADATA_FIELD = 14  # ModelProto.metadata_props in onnx.proto


def _varint(data: bytes | memoryview, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def onnx_checksum(data: bytes | memoryview) -> str:
    """SHA-256 of a serialised ONNX model's top-level fields except its metadata (graph, weights, opsets: the bytes
    as written), read from the protobuf wire format: torch-free and onnx-free, and the metadata, which carries the
    checksum, can be rewritten (a stamped threshold) without touching it. ValueError for bytes that are not protobuf."""
    digest, at = hashlib.sha256(), 0
    while at < len(data):
        start = at
        tag, at = _varint(data, at)
        kind = tag & 7
        if kind == 0:
            at = _varint(data, at)[1]
        elif kind == 2:
            length, at = _varint(data, at)
            at += length
        elif kind in (1, 5):
            at += 8 if kind == 1 else 4
        else:
            raise ValueError(f"wire type {kind}")
        if at > len(data):
            raise ValueError("truncated")
        if tag >> 3 != ONNX_METADATA_FIELD:
            digest.update(data[start:at])
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def warn_unverified(path: Path, export_flag: str) -> None:
    """One warning for an artifact that carries no checksum (exported before checksums were stored, or the entry was
    removed): it is used, but nothing can tell whether it was damaged after export."""
    log.warning("'%s' carries no checksum: its files cannot be verified (export it again with export.py%s)", path,
                f" {export_flag}" if export_flag else "")


def check_checksum(path: Path, stored: str, actual: str) -> None:
    """EdgeModelError (one line) when the checksum stored at export does not match the file: damaged after export."""
    if stored != actual:
        raise EdgeModelError(f"'{path}' is damaged: its weights no longer match the checksum stored when it was exported "
                             "(SHA-256); copy it again, or export it again with export.py")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class ExportedClassifier:
    """What predict.py and stream.py call on an exported model, whatever runs it: ``info`` (the deploy metadata),
    ``normal`` (index of the Normal class), ``operating_point`` (its stored defect threshold, or None), ``prepare``
    and ``infer`` (separate so a caller can time them apart); ``classifier(images)`` gives class probabilities."""

    def __init__(self, info: dict, input_shape: Sequence | None = None, output_shape: Sequence | None = None):
        """``input_shape``/``output_shape``: the graph's, where the runtime tells them ([batch, 3, H, W] and [batch,
        classes], None or a name for a dynamic axis), to check the metadata against."""
        self.info = check_deploy_info(info, input_shape, output_shape)
        self.normal = normal_index(info["class_names"])
        self.operating_point = stored_operating_point(info)

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB [N, img_size, img_size, 3] -> the model's normalised input."""
        return normalise(images, self.info["mean"], self.info["std"])

    def infer(self, inputs: np.ndarray) -> np.ndarray:
        """Class probabilities [N, classes] (float32)."""
        raise NotImplementedError

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.infer(self.prepare(images))


class EdgeClassifier(ExportedClassifier):
    """An exported ONNX model run by ONNX Runtime, with the deploy info from its metadata."""

    def __init__(self, path: Path | str, threads: int = all_threads()):
        path = Path(path)
        if not path.is_file():
            raise EdgeModelError(f"ONNX file '{path}' does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ORT raises several types for a file that is not a model
            reason = str(error).splitlines()[0]
            if "Unsupported model IR version" in reason:  # an older runtime on the device than the one that exported
                raise EdgeModelError(f"'{path}' is newer than this onnxruntime {ort.__version__} can read ({reason.split(') ')[-1]}"
                                     "): pip install -r requirements-edge.txt") from None
            raise EdgeModelError(f"'{path}' is not a readable ONNX model ({type(error).__name__}: {reason})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in metadata:
            raise EdgeModelError(f"'{path}' has no class names or preprocessing metadata: export it with export.py")
        if CHECKSUM_KEY in metadata:
            try:
                actual = onnx_checksum(path.read_bytes())
            except ValueError:
                actual = "unreadable"
            check_checksum(path, metadata[CHECKSUM_KEY], actual)
        else:
            warn_unverified(path, "")
        super().__init__(read_info_json(metadata[METADATA_KEY], path), self.session.get_inputs()[0].shape,
                         self.session.get_outputs()[0].shape)

    def infer(self, inputs: np.ndarray) -> np.ndarray:
        return softmax(self.session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0])

"""Export a checkpoint's model to ONNX, check it against PyTorch, and quantise it statically for ONNX Runtime.

The ONNX file carries what inference needs (class names, mean/std, input size) in its
metadata, so ``predict.py --onnx model.onnx`` needs no checkpoint.
"""
from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from deploy.edge import CHECKSUM_KEY, INPUT_NAME, METADATA_KEY, OUTPUT_NAME, onnx_checksum
from utils.description import RunDescription
from utils.errors import UserError
from utils.io import atomic_path
from utils.operating_point import OperatingPoint

OPSET = 18  # the dynamo exporter's own opset: asking for 17 triggers a lossy down-conversion
log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max |logit difference| allowed between PyTorch and an FP32 artifact, or where logits are
PARITY_RELATIVE = 1e-5  # large, this share of the largest |logit|: float32 rounding grows with the values (random inputs
# gave logits of ~100 and differences of 6e-5 in ONNX Runtime, 1.5e-4 in NCNN); ncnn's default fp16 storage erred by
# 3e-4 of the largest |logit| (1.2e-3 on real images), so the bound still catches a half-precision artifact
DEPLOY_KEYS = ("model", "family", "alpha", "method", "num_classes", "class_names", "img_size", "mean", "std", "dataset",
               "operating_point")


class ExportError(UserError):
    """An exported artifact does not reproduce the PyTorch model."""


def deploy_info(description: RunDescription, point: OperatingPoint | None = None) -> dict:
    """The part of a checkpoint description that inference needs, as plain data for the artifact's metadata;
    ``point`` replaces the checkpoint's operating point (an artifact's own, chosen on its own scores)."""
    info = {key: getattr(description, key) for key in DEPLOY_KEYS}
    return info if point is None else {**info, "operating_point": point.to_dict()}


def read_deploy_info(model: onnx.ModelProto) -> dict | None:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return None


def stamp_operating_point(path: Path, point: OperatingPoint | None) -> None:
    """Rewrite an exported ONNX file's metadata with its own operating point (None: no threshold, argmax verdicts)."""
    model = onnx.load(path)
    _save_with_info(model, {**read_deploy_info(model), "operating_point": point.to_dict() if point else None}, path)


def _save_with_info(model: onnx.ModelProto, info: dict, path: Path) -> None:
    """The model with ``info`` and the checksum of everything else in its metadata (deploy.edge checks it at load)."""
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(info), CHECKSUM_KEY: onnx_checksum(model.SerializeToString())})
    with atomic_path(path) as tmp:
        onnx.save_model(model, tmp)


def export_onnx(model: torch.nn.Module, description: RunDescription, path: Path) -> None:
    """torch.onnx's dynamo exporter (torch 2.14's default), one self-contained file, dynamic batch axis."""
    size = description.img_size
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(), (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
    _save_with_info(program.model_proto, deploy_info(description), path)


def parity_bound(reference_logits: torch.Tensor) -> float:
    """The largest |logit difference| an FP32 artifact may show against these PyTorch logits."""
    return max(PARITY_TOLERANCE, PARITY_RELATIVE * float(reference_logits.abs().max()))


def check_parity(name: str, reference: torch.nn.Module, candidate: torch.nn.Module, inputs: dict[str, torch.Tensor],
                 gated: bool = True) -> dict[str, float]:
    """Print the max |logit difference| per input set; raise ExportError above ``parity_bound`` if ``gated``
    (an INT8 artifact differs by design: its difference is reported, not gated)."""
    differences, bounds = {}, {}
    with torch.inference_mode():
        for label, x in inputs.items():
            expected = reference(x)
            differences[label], bounds[label] = float((expected - candidate(x)).abs().max()), parity_bound(expected)
    shown = ", ".join(f"{label} {value:.2e}" for label, value in differences.items())
    tolerance = ", ".join(f"{label} {bound:.2g}" for label, bound in bounds.items())
    log.info("%s vs PyTorch: max |logit diff| %s (%s)", name, shown, f"tolerance {tolerance}" if gated else "reported, not gated")
    failed = [label for label in inputs if differences[label] > bounds[label]]
    if gated and failed:
        raise ExportError(f"{name} differs from PyTorch by {differences[failed[0]]:.2e} > {bounds[failed[0]]:.2g} on {failed[0]} "
                          "images: the export is not faithful; report the model name")
    return differences


class ImageCalibration(CalibrationDataReader):
    """Feeds preprocessed training images to ONNX Runtime's calibrator in small batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 16):
        self.batches: Iterator[np.ndarray] = iter(np.array_split(images, max(1, len(images) // batch_size)))

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}


def depthwise_conv_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of grouped (depthwise) Conv nodes, to keep them in FP32 via ``nodes_to_exclude``."""
    names = []
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1:
            names.append(node.name)
    return names


def quantize_onnx(fp32_path: Path, int8_path: Path, calibration: np.ndarray, quant_format: QuantFormat = QuantFormat.QDQ,
                  per_channel: bool = True, activation_type: QuantType = QuantType.QInt8,
                  nodes_to_exclude: list[str] | None = None, op_types_to_quantize: list[str] | None = None) -> None:
    """Static INT8 quantisation calibrated (MinMax) on ``calibration`` (N, 3, H, W float32); keeps the metadata."""
    fp32 = onnx.load(fp32_path)
    with tempfile.TemporaryDirectory() as scratch:
        quantized_path = Path(scratch) / "int8.onnx"
        quantize_static(
            fp32, quantized_path, ImageCalibration(calibration), quant_format=quant_format, per_channel=per_channel,
            activation_type=activation_type, weight_type=QuantType.QInt8, nodes_to_exclude=nodes_to_exclude,
            op_types_to_quantize=op_types_to_quantize,
        )
        _save_with_info(onnx.load(quantized_path), read_deploy_info(fp32), int8_path)

"""Convert the exported ONNX model to an OpenVINO IR (FP32), quantise it with NNCF (INT8), and run either behind
the nn.Module call (so engine.loop.evaluate scores it and deploy.timing times it).

The IR is converted from the ONNX file rather than from the PyTorch model: that graph already passed the parity
check, and it keeps the toolkit's interface (input 'input' [N,3,H,W] with a dynamic batch axis, output 'logits');
converting the torch model gives an input named 'x' with dynamic height and width. Both agreed with PyTorch to ~1e-6.
"""
from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import nncf
import numpy as np
import onnx
import openvino as ov
import torch
from openvino import opset13

from deploy.edge import CHECKSUM_KEY, METADATA_KEY, all_threads, file_sha256
from deploy.onnx_export import read_deploy_info
from deploy.openvino_runtime import compile_ir, openvino_reason, read_ir
from utils.io import WriteError, atomic_path
from utils.operating_point import OperatingPoint
from utils.signal_stack import kept_signal_stack

log = logging.getLogger(__name__)


def save_ir(model: ov.Model, info: dict, path: Path) -> None:
    """``path`` (.xml) and its .bin, float32 weights (ov.save_model compresses to FP16 by default), deploy info and
    the .bin's SHA-256 in rt_info; each file replaced atomically, the .bin first.

    The .bin does not depend on rt_info: the IR is written once to learn its checksum, then again carrying it."""
    model.set_rt_info(json.dumps(info), [METADATA_KEY])
    with atomic_path(path) as xml_tmp, atomic_path(path.with_suffix(".bin")) as bin_tmp:
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            xml, weights = Path(scratch) / "model.xml", Path(scratch) / "model.bin"
            try:
                ov.save_model(model, xml, compress_to_fp16=False)
                checksum = file_sha256(weights)
                model.set_rt_info(checksum, [CHECKSUM_KEY])
                ov.save_model(model, xml, compress_to_fp16=False)
            except RuntimeError as error:  # OpenVINO reports a failed write as a RuntimeError
                raise WriteError(f"cannot write '{path}': {openvino_reason(error)}") from None
            if file_sha256(weights) != checksum:
                raise AssertionError("OpenVINO wrote two different .bin files for one model")
            weights.replace(bin_tmp)
            xml.replace(xml_tmp)


def stamp_operating_point_ir(path: Path, point: OperatingPoint | None) -> None:
    """Rewrite an IR's deploy info with its own operating point (None: no threshold, argmax verdicts)."""
    model, info = read_ir(path)
    save_ir(model, {**info, "operating_point": point.to_dict() if point else None}, path)


def hard_sigmoid_as_hsigmoid(model: ov.Model) -> int:
    """Replace each ONNX HardSigmoid that computes hardsigmoid (alpha 1/6, beta 1/2: what torch exports for timm's
    squeeze-excite gate) by OpenVINO's HSigmoid, in place; returns how many.

    Same function, but NNCF recognises a squeeze-excite block only by HSigmoid/Sigmoid and otherwise quantises its
    gate: on the quick start's MobileNetV3 that cost 1.9 points of INT8 accuracy (89.3 % against 91.2 %, FP32 91.3 %).
    """
    replaced = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "HardSigmoid":
            continue
        alpha, beta = (node.input_value(i).get_node() for i in (1, 2))
        if alpha.get_type_name() != "Constant" or beta.get_type_name() != "Constant":
            continue
        if np.allclose(alpha.get_data(), 1 / 6, atol=1e-6) and np.allclose(beta.get_data(), 0.5, atol=1e-6):
            node.output(0).replace(opset13.hsigmoid(node.input_value(0)).output(0))
            replaced += 1
    return replaced


def export_openvino(onnx_path: Path, path: Path) -> ov.Model:
    """The ONNX file as an FP32 OpenVINO IR at ``path``, with the ONNX file's deploy info; returns the model written."""
    model = ov.convert_model(onnx_path)
    hard_sigmoid_as_hsigmoid(model)
    save_ir(model, read_deploy_info(onnx.load(onnx_path, load_external_data=False)), path)
    return model


def quantize_openvino(fp32: ov.Model, info: dict, path: Path, calibration: np.ndarray) -> ov.Model:
    """NNCF post-training INT8 with its defaults for CNNs (performance preset: symmetric per-channel weights and
    activations, fast bias correction) calibrated on ``calibration`` (N, 3, H, W float32, one image per step);
    returns the model written to ``path``."""
    dataset = nncf.Dataset([np.ascontiguousarray(image[None], dtype=np.float32) for image in calibration])
    with kept_signal_stack():
        quantized = nncf.quantize(fp32, dataset, subset_size=len(calibration))
    save_ir(quantized, info, path)
    return quantized


def top1_accuracy(compiled: ov.CompiledModel, items: Iterable[tuple[np.ndarray, int]]) -> tuple[float, list[float]]:
    """NNCF's validation function: the toolkit's accuracy (argmax of the logits == label, as engine.loop.evaluate)
    over (image [1, 3, H, W], label) items, and each item's 1.0/0.0, so NNCF ranks layers from these values instead
    of running the images again one call per item."""
    correct = [float(int(np.argmax(compiled(image)[0])) == int(label)) for image, label in items]
    return (sum(correct) / len(correct) if correct else 0.0), correct


WEIGHTED_OPS = ("Convolution", "GroupConvolution", "MatMul")


def _int8_weights(layer: ov.Node) -> bool:
    """Whether a conv/matmul's weights are INT8: its weight input leads (through the Multiply/Subtract/Convert of
    NNCF's weight compression, or a Reshape/Transpose) to a FakeQuantize or an integer Constant."""
    node = layer.input_value(1).get_node()
    while node.get_type_name() in ("Multiply", "Subtract", "Convert", "Reshape", "Transpose"):
        node = node.input_value(0).get_node()
    return node.get_type_name() == "FakeQuantize" or (node.get_type_name() == "Constant" and node.get_element_type().is_integral())


def float_layers(model: ov.Model) -> tuple[list[str], int]:
    """The conv/matmul layers of a quantised IR whose weights are float, and how many such layers it has in all.
    NNCF quantises every one of them with its CNN defaults, so after ``quantize_with_accuracy_control`` (which
    reverts activations and weights) these are the layers it reverted."""
    layers = [op for op in model.get_ordered_ops() if op.get_type_name() in WEIGHTED_OPS]
    return [op.get_friendly_name() for op in layers if not _int8_weights(op)], len(layers)


def quantize_openvino_with_accuracy_control(fp32: ov.Model, info: dict, path: Path, calibration: np.ndarray,
                                            val_images: np.ndarray, val_labels: np.ndarray, max_drop: float) -> tuple[ov.Model, dict]:
    """INT8 as ``quantize_openvino``, then NNCF's accuracy control: the layers that cost the most validation accuracy
    go back to float, one group per step (a validation pass each, after ranking every quantised layer on a
    subset), until top-1 accuracy on (``val_images``, ``val_labels``) is at most ``max_drop`` percentage points below
    the FP32 IR's. Writes the model to ``path``; returns it with max_drop, val_acc_fp32, val_acc (both measured here
    through ``compile_ir``, not NNCF's log), float_layers and quantizable_layers."""
    items = [(np.ascontiguousarray(image[None], dtype=np.float32), int(label)) for image, label in zip(val_images, val_labels)]
    val_acc_fp32 = top1_accuracy(compile_ir(fp32, all_threads()), items)[0]
    calibration_set = nncf.Dataset([np.ascontiguousarray(image[None], dtype=np.float32) for image in calibration])
    validation_set = nncf.Dataset(items, lambda item: item[0])
    with kept_signal_stack():
        quantized = nncf.quantize_with_accuracy_control(
            fp32, calibration_set, validation_set, top1_accuracy, max_drop=max_drop / 100,
            drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration))
    val_acc = top1_accuracy(compile_ir(quantized, all_threads()), items)[0]
    reverted, layers = float_layers(quantized)
    log.info("OpenVINO INT8 (--max-drop %g): %d of %d conv/matmul layers in float%s", max_drop, len(reverted), layers,
             f" ({', '.join(reverted)})" if reverted else "")
    log.info("OpenVINO INT8 (--max-drop %g): val acc %.4f vs FP32 %.4f (%+.2f points, %d images)", max_drop, val_acc,
             val_acc_fp32, 100 * (val_acc - val_acc_fp32), len(items))
    if 100 * (val_acc_fp32 - val_acc) > max_drop + 1e-9:
        log.warning("OpenVINO INT8 loses %.2f points of validation accuracy, more than --max-drop %g: NNCF could not meet "
                    "the bound (all layers tried); the IR is written as it is", 100 * (val_acc_fp32 - val_acc), max_drop)
    save_ir(quantized, info, path)
    return quantized, {"max_drop": max_drop, "val_acc_fp32": val_acc_fp32, "val_acc": val_acc, "val_images": len(items),
                       "float_layers": reverted, "quantizable_layers": layers}


class OpenVinoModule(torch.nn.Module):
    """An IR compiled for the CPU that takes and returns torch tensors like the model it was exported from."""

    def __init__(self, path: Path | str, threads: int = 1):
        super().__init__()
        self.compiled = compile_ir(read_ir(path)[0], threads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.compiled(array)[0])

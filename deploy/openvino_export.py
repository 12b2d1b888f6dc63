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
from pathlib import Path

import nncf
import numpy as np
import onnx
import openvino as ov
import torch

from deploy.edge import METADATA_KEY
from deploy.onnx_export import read_deploy_info
from deploy.openvino_runtime import compile_ir, read_ir
from utils.io import WriteError, atomic_path

log = logging.getLogger(__name__)


def ir_bytes(path: Path) -> int:
    """Size of an IR on disk: the .xml (graph) plus the .bin (weights)."""
    return path.stat().st_size + path.with_suffix(".bin").stat().st_size


def save_ir(model: ov.Model, info: dict, path: Path) -> None:
    """``path`` (.xml) and its .bin, float32 weights (ov.save_model compresses to FP16 by default), deploy info in
    rt_info; each file replaced atomically, the .bin first."""
    model.set_rt_info(json.dumps(info), [METADATA_KEY])
    with atomic_path(path) as xml_tmp, atomic_path(path.with_suffix(".bin")) as bin_tmp:
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            try:
                ov.save_model(model, Path(scratch) / "model.xml", compress_to_fp16=False)
            except RuntimeError as error:  # OpenVINO reports a failed write as a RuntimeError
                raise WriteError(f"cannot write '{path}': {str(error).strip().splitlines()[0]}") from None
            (Path(scratch) / "model.bin").replace(bin_tmp)
            (Path(scratch) / "model.xml").replace(xml_tmp)


def export_openvino(onnx_path: Path, path: Path) -> ov.Model:
    """The ONNX file as an FP32 OpenVINO IR at ``path``, with the ONNX file's deploy info; returns the model written."""
    model = ov.convert_model(onnx_path)
    save_ir(model, read_deploy_info(onnx.load(onnx_path, load_external_data=False)), path)
    return model


def quantize_openvino(fp32: ov.Model, info: dict, path: Path, calibration: np.ndarray) -> ov.Model:
    """NNCF post-training INT8 with its defaults for CNNs (performance preset: symmetric per-channel weights and
    activations, fast bias correction) calibrated on ``calibration`` (N, 3, H, W float32, one image per step);
    returns the model written to ``path``."""
    dataset = nncf.Dataset([np.ascontiguousarray(image[None], dtype=np.float32) for image in calibration])
    quantized = nncf.quantize(fp32, dataset, subset_size=len(calibration))
    save_ir(quantized, info, path)
    return quantized


class OpenVinoModule(torch.nn.Module):
    """An IR compiled for the CPU that takes and returns torch tensors like the model it was exported from."""

    def __init__(self, path: Path | str, threads: int = 1):
        super().__init__()
        self.compiled = compile_ir(read_ir(path)[0], threads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.compiled(array)[0])

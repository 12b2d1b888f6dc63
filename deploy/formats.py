"""The export formats as one table: how each artifact is written, loaded in its runtime and stamped with its own
defect threshold. export.py runs every selected row through the same path: write, parity, score, benchmark.

OpenVINO (and NNCF) and NCNN (and pnnx) are imported on first use of their rows: seconds of imports that the other
exports need not pay.
"""
from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from deploy.inference import OnnxModule, save_torchscript_artifact, trace_torchscript
from deploy.onnx_export import deploy_info, export_onnx, quantize_onnx, stamp_operating_point
from utils.description import RunDescription
from utils.operating_point import OperatingPoint


@dataclass(frozen=True)
class ExportJob:
    """What the writers need: the FP32 model, its description, the FP32 ONNX path the others sit beside, the images
    of INT8 calibration, and those of accuracy control (made on first use)."""

    model: torch.nn.Module
    description: RunDescription
    onnx_path: Path
    calibration: np.ndarray | None  # preprocessed training images, (N, 3, H, W) float32 (with --int8)
    validation: Callable[[], tuple[np.ndarray, np.ndarray]]  # the validation split: (images, labels)
    max_drop: float | None = None  # OpenVINO INT8 accuracy control (percentage points), None: plain NNCF PTQ

    def path(self, suffix: str) -> Path:
        return self.onnx_path.with_suffix(suffix)


@dataclass(frozen=True)
class Format:
    method: str  # the results table's method
    runtime: str  # its name in the benchmark table
    suffix: str  # the file beside model.onnx
    flags: tuple[str, ...]  # export.py flags that select it (all must be set); () = always written
    library: str  # the runtime's package, whose version the benchmark report names
    write: Callable[[ExportJob, Path], dict]  # returns what the summary records besides the scores
    load: Callable[[Path, int], torch.nn.Module]  # (path, threads) -> a module taking and returning tensors
    stamp: Callable[[Path, OperatingPoint | None], None]  # writes the artifact's threshold into its metadata
    gated: bool = True  # FP32: parity must hold; INT8 differs by design, its difference is reported
    size_of: Callable[[Path], int] = lambda path: path.stat().st_size


def _openvino() -> ModuleType:
    return importlib.import_module("deploy.openvino_export")


def write_onnx(job: ExportJob, path: Path) -> dict:
    export_onnx(job.model, job.description, path)
    return {}


def write_onnx_int8(job: ExportJob, path: Path) -> dict:
    quantize_onnx(job.onnx_path, path, job.calibration)
    return {}


def write_torchscript(job: ExportJob, path: Path) -> dict:
    save_torchscript_artifact(trace_torchscript(job.model, job.description.img_size), deploy_info(job.description), path,
                              None)
    return {}


def load_torchscript(path: Path, threads: int) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript in favour of torch.export
        return torch.jit.load(str(path), map_location="cpu").eval()


def stamp_torchscript(path: Path, point: OperatingPoint | None) -> None:
    extra = {"deploy_info.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    info = json.loads(extra["deploy_info.json"])
    save_torchscript_artifact(scripted, info, path, point)


def _ncnn() -> ModuleType:
    return importlib.import_module("deploy.ncnn_export")


def write_ncnn(job: ExportJob, path: Path) -> dict:
    _ncnn().export_ncnn(job.model, deploy_info(job.description), path)
    return {}


def load_ncnn(path: Path, threads: int) -> torch.nn.Module:
    return _ncnn().NcnnModule(path, threads)


def stamp_ncnn(path: Path, point: OperatingPoint | None) -> None:
    _ncnn().stamp_operating_point_ncnn(path, point)


def write_openvino(job: ExportJob, path: Path) -> dict:
    _openvino().export_openvino(job.onnx_path, path)
    return {}


def write_openvino_int8(job: ExportJob, path: Path) -> dict:
    """NNCF PTQ of the FP32 IR (written first: its row comes earlier), with accuracy control under --max-drop."""
    openvino = _openvino()
    fp32_ir = openvino.read_ir(job.path(".xml"))[0]
    info = deploy_info(job.description)
    if job.max_drop is None:
        openvino.quantize_openvino(fp32_ir, info, path, job.calibration)
        return {}
    images, labels = job.validation()
    control = openvino.quantize_openvino_with_accuracy_control(fp32_ir, info, path, job.calibration, images, labels,
                                                               job.max_drop)[1]
    return {"accuracy_control": control}


def load_openvino(path: Path, threads: int) -> torch.nn.Module:
    return _openvino().OpenVinoModule(path, threads)


def stamp_openvino(path: Path, point: OperatingPoint | None) -> None:
    _openvino().stamp_operating_point_ir(path, point)


def ir_bytes(path: Path) -> int:
    """An OpenVINO IR or NCNN model on disk: the graph file (.xml, .param) plus its .bin (weights)."""
    return path.stat().st_size + path.with_suffix(".bin").stat().st_size


FORMATS = (
    Format("onnx-fp32", "onnxruntime-fp32", ".onnx", (), "onnxruntime", write_onnx, OnnxModule, stamp_operating_point),
    Format("torchscript-fp32", "torchscript-fp32", ".torchscript.pt", ("torchscript",), "torch", write_torchscript,
           load_torchscript, stamp_torchscript),
    Format("onnx-int8", "onnxruntime-int8", ".int8.onnx", ("int8",), "onnxruntime", write_onnx_int8, OnnxModule,
           stamp_operating_point, gated=False),
    Format("ncnn-fp32", "ncnn-fp32", ".ncnn.param", ("ncnn",), "ncnn", write_ncnn, load_ncnn, stamp_ncnn, size_of=ir_bytes),
    Format("openvino-fp32", "openvino-fp32", ".xml", ("openvino",), "openvino", write_openvino, load_openvino,
           stamp_openvino, size_of=ir_bytes),
    Format("openvino-int8", "openvino-int8", ".int8.xml", ("openvino", "int8"), "openvino", write_openvino_int8,
           load_openvino, stamp_openvino, gated=False, size_of=ir_bytes),
)


def selected_formats(flags: dict) -> list[Format]:
    """The rows the flags ask for, in table order (each one's inputs are written before it)."""
    return [fmt for fmt in FORMATS if all(flags.get(flag) for flag in fmt.flags)]

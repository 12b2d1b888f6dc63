"""Torch-free inference with an OpenVINO IR (model.xml + model.bin from ``export.py --openvino``).

The IR carries the deploy info (class names, mean/std, img_size) in its rt_info under ``METADATA_KEY``, so the
.xml/.bin pair is all a device needs besides this module, ``deploy.edge`` and the openvino package.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import openvino as ov

from deploy.edge import (
    CHECKSUM_KEY,
    METADATA_KEY,
    EdgeModelError,
    ExportedClassifier,
    all_threads,
    check_checksum,
    file_sha256,
    read_info_json,
    softmax,
    warn_unverified,
)


def read_ir(path: Path | str) -> tuple[ov.Model, dict]:
    """The IR at ``path`` and its deploy info; EdgeModelError (one line) for anything that is not the toolkit's IR."""
    path = Path(path)
    if not path.is_file():
        raise EdgeModelError(f"OpenVINO IR file '{path}' does not exist")
    if path.suffix != ".xml":  # OpenVINO would also read an ONNX file here, without the rt_info
        raise EdgeModelError(f"'{path}' is not an OpenVINO IR: pass the model.xml written by export.py --openvino "
                             "(its model.bin beside it)")
    try:
        model = _core().read_model(path)
    except Exception as error:  # OpenVINO raises RuntimeError subclasses with multi-line messages
        raise EdgeModelError(f"'{path}' (with its {path.with_suffix('.bin').name}) is not a readable OpenVINO IR: "
                             f"{openvino_reason(error)}") from None
    if not model.has_rt_info([METADATA_KEY]):
        raise EdgeModelError(f"'{path}' has no class names or preprocessing metadata: export it with export.py --openvino")
    if model.has_rt_info([CHECKSUM_KEY]):
        check_checksum(path.with_suffix(".bin"), model.get_rt_info([CHECKSUM_KEY]).astype(str), file_sha256(path.with_suffix(".bin")))
    else:
        warn_unverified(path, "--openvino")
    return model, read_info_json(model.get_rt_info([METADATA_KEY]).astype(str), path)


# On Linux each OpenVINO CPU plugin (one per ov.Core, loaded by its first compile) gives the thread that loads it an
# alternate signal stack of its own (room for AMX state) and, when unloaded, puts back the stack it found there, or only
# unmaps its own if another plugin's is current by then. Two plugins unloaded in the order they were loaded (a Core per
# compiled model, the models freed oldest first) leave the thread on an unmapped stack, and Python runs every signal
# handler there (Ctrl-C, a SIGCHLD handler, faulthandler's own SIGSEGV): the next signal kills the process with SIGSEGV
# and no Python frame, or writes over whatever was mapped at that address since. Hence one Core for every IR this
# toolkit compiles (its plugin is loaded once and kept until exit), and the thread's stack kept around NNCF, whose
# Cores come and go inside its calls (utils.signal_stack.kept_signal_stack, around NNCF in deploy.openvino_export).


@functools.cache
def _core() -> ov.Core:
    """The process's one OpenVINO runtime, made on first use and kept until exit (see above).

    It reads the weights into memory instead of mapping the .bin: a .bin replaced or cut short while its model is
    alive (a copy over a running service's files) cannot crash the process, and the checksum checked at load is of the
    weights that run."""
    core = ov.Core()
    core.set_property({"ENABLE_MMAP": False})
    return core


def openvino_reason(error: Exception) -> str:
    """The line of an OpenVINO error that says what is wrong ("Incorrect weights in bin file!"), not the source file
    and check it came from ("Exception from src/inference/...", "Check '...' failed at ...")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return (reasons or lines or [type(error).__name__])[-1]


def dims(port: ov.Output) -> list[int | None]:
    """A port's shape, None for a dynamic axis."""
    return [dim.get_length() if dim.is_static else None for dim in port.get_partial_shape()]


def compile_ir(model: ov.Model, threads: int) -> ov.CompiledModel:
    """The IR compiled for the CPU with ``threads`` inference threads and float32 arithmetic outside the INT8 ops:
    the CPU plugin's default is bf16 on x86 CPUs with bf16 support and f16 on ARM, which moved the logits by ~5e-3."""
    return _core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})


class OpenVinoClassifier(ExportedClassifier):
    """An exported OpenVINO IR (FP32 or INT8) behind EdgeClassifier's calls, for predict.py and stream.py --openvino."""

    def __init__(self, path: Path | str, threads: int = all_threads()):
        model, info = read_ir(path)
        super().__init__(info, dims(model.inputs[0]), dims(model.outputs[0]))
        self.compiled = compile_ir(model, threads)

    def infer(self, inputs: np.ndarray) -> np.ndarray:
        return softmax(self.compiled(inputs)[0])

"""Torch-free inference with an NCNN model (model.ncnn.param + model.ncnn.bin + model.ncnn.json from
``export.py --ncnn``).

An NCNN .param has no place for metadata, so the deploy info (class names, mean/std, img_size, operating point: the
same JSON as the ONNX metadata) is the sidecar ``<stem>.json`` beside it. The three files are all a device needs
besides this module, ``deploy.edge`` and the ncnn package.

Precision: the .bin holds float32 weights and the net runs with every fp16/bf16 option off. ncnn's defaults store
weights and activations in fp16 where the CPU supports it (F16C on x86, ARMv8.2 such as the Pi 5's Cortex-A76, which
also computes in fp16), which moved the logits by 1.2e-3 on real test images on this x86 CPU (3e-4 of the largest
|logit|; 3e-6 with these options) and would move them more on ARMv8.2: the artifact is FP32 everywhere, as its parity
check assumed.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ncnn
import numpy as np

from deploy.edge import (
    CHECKSUM_KEY,
    EdgeModelError,
    ExportedClassifier,
    all_threads,
    check_checksum,
    check_deploy_info,
    file_sha256,
    read_info_json,
    softmax,
    warn_unverified,
)

INPUT_BLOB, OUTPUT_BLOB = "in0", "out0"  # pnnx's names for a traced model's one input and one output
FLOAT16_OPTIONS = ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage", "use_bf16_packed")


def ncnn_files(param: Path | str) -> tuple[Path, Path]:
    """The weights (.bin) and the deploy info (.json) that belong to ``param`` (model.ncnn.param)."""
    param = Path(param)
    return param.with_suffix(".bin"), param.with_suffix(".json")


@contextlib.contextmanager
def ncnn_messages() -> Iterator[list[str]]:
    """Collect what ncnn's C code writes to stderr (file descriptor 2) inside the block, so that a failed load is one
    error line that quotes it, not loose lines before it."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines.extend(line.strip() for line in capture if line.strip())


def read_net(path: Path | str, threads: int) -> tuple[ncnn.Net, dict]:
    """The FP32 net of ``path`` (.param, its .bin beside it) and its checked deploy info; EdgeModelError (one line)
    for anything that is not the toolkit's NCNN model."""
    path = Path(path)
    weights, sidecar = ncnn_files(path)
    if not path.is_file():
        raise EdgeModelError(f"NCNN param file '{path}' does not exist")
    if path.suffix != ".param":
        raise EdgeModelError(f"'{path}' is not an NCNN model: pass the model.ncnn.param written by export.py --ncnn "
                             "(its .bin and .json beside it)")
    if not weights.is_file():
        raise EdgeModelError(f"'{path}' has no weights file '{weights.name}' beside it: copy the .param, .bin and .json "
                             "that export.py --ncnn wrote together")
    if not sidecar.is_file():
        raise EdgeModelError(f"'{path}' has no class names or preprocessing metadata ('{sidecar.name}' beside it): "
                             "copy it with the model, or export it again with export.py --ncnn")
    info = check_deploy_info(read_info_json(sidecar.read_text(encoding="utf-8", errors="replace"), sidecar))
    verify_files(path, weights, info)
    net = ncnn.Net()
    for option in FLOAT16_OPTIONS:
        setattr(net.opt, option, False)
    net.opt.num_threads = threads
    with ncnn_messages() as messages:
        param_failed = net.load_param(str(path)) != 0
        weights_failed = not param_failed and net.load_model(str(weights)) != 0
    said = f" (ncnn: {messages[0]})" if messages else ""
    if param_failed:
        raise EdgeModelError(f"'{path}' is not a readable NCNN param file{said}: export it again with export.py --ncnn")
    if weights_failed:
        raise EdgeModelError(f"'{weights}' does not hold the weights of '{path.name}' (truncated or from another model)"
                             f"{said}: copy the .bin that export.py --ncnn wrote with it")
    if (list(net.input_names()), list(net.output_names())) != ([INPUT_BLOB], [OUTPUT_BLOB]):
        raise EdgeModelError(f"'{path}' has inputs {list(net.input_names())} and outputs {list(net.output_names())}, not "
                             f"one image input '{INPUT_BLOB}' and one logits output '{OUTPUT_BLOB}': export it with export.py --ncnn")
    return net, info


def verify_files(param: Path, weights: Path, info: dict) -> None:
    """The .param and .bin against the SHA-256 the sidecar stored at export (before ncnn reads a byte of them): a .bin
    damaged in a way ncnn still loads (zeroed blocks) would otherwise give confident verdicts. Without stored
    checksums (exported before them, or removed) the model is used with one warning that it is unverified."""
    stored = info.get(CHECKSUM_KEY)
    if stored is None:
        warn_unverified(param, "--ncnn")
        return
    if not (isinstance(stored, dict) and all(isinstance(stored.get(key), str) for key in ("param", "bin"))):
        raise EdgeModelError(f"the model's metadata is damaged: {CHECKSUM_KEY} is {stored!r}, not the SHA-256 of the .param "
                             "and .bin; export it again with export.py --ncnn")
    check_checksum(param, stored["param"], file_sha256(param))
    check_checksum(weights, stored["bin"], file_sha256(weights))


class NcnnNet:
    """An NCNN model run image by image (an ``ncnn.Mat`` has no batch axis) on [N, 3, H, W] float32 arrays."""

    def __init__(self, path: Path | str, threads: int = all_threads()):
        self.net, self.info = read_net(path, threads)
        size = self.info["img_size"]
        self.classes = self.logits(np.zeros((1, 3, size, size), np.float32)).shape[1]  # the graph's own class count

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Logits [N, classes] (float32) of normalised images [N, 3, H, W]."""
        rows = []
        for image in np.ascontiguousarray(inputs, dtype=np.float32):
            extractor = self.net.create_extractor()
            extractor.input(INPUT_BLOB, ncnn.Mat(image))
            status, output = extractor.extract(OUTPUT_BLOB)
            if status != 0:
                raise EdgeModelError(f"NCNN could not run the model on a {list(image.shape)} input (status {status}): "
                                     "export it again with export.py --ncnn")
            rows.append(np.array(output, dtype=np.float32).reshape(-1))
        return np.stack(rows)


class NcnnClassifier(ExportedClassifier):
    """An exported NCNN model behind EdgeClassifier's calls, for predict.py and stream.py --ncnn."""

    def __init__(self, path: Path | str, threads: int = all_threads()):
        self.model = NcnnNet(path, threads)
        super().__init__(self.model.info, None, [None, self.model.classes])

    def infer(self, inputs: np.ndarray) -> np.ndarray:
        return softmax(self.model.logits(inputs))

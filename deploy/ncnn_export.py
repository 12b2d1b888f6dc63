"""Convert a model to NCNN with pnnx (model.ncnn.param/.bin, deploy info in model.ncnn.json beside them), and run it
behind the nn.Module call (so engine.loop.evaluate scores it and deploy.timing times it).

pnnx converts the TorchScript trace of the model, its own first-class input: it maps timm's hard-swish and
hard-sigmoid to NCNN's HardSwish/HardSigmoid layers and folds BatchNorm into the convolutions. ``fp16=0`` keeps the
weights float32 (pnnx stores fp16 by default), so the FP32 runtime (deploy.ncnn_runtime) reproduces PyTorch.
"""
from __future__ import annotations

import logging
import subprocess
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pnnx
import torch

from deploy.edge import CHECKSUM_KEY, all_threads, file_sha256
from deploy.ncnn_runtime import NcnnNet, ncnn_files, read_net
from deploy.onnx_export import ExportError
from utils.io import atomic_path, save_json
from utils.operating_point import OperatingPoint

log = logging.getLogger(__name__)


def layer_types(path: Path) -> Counter:
    """How many layers of each type the .param holds (its first two lines are the magic number and the counts)."""
    return Counter(line.split()[0] for line in path.read_text().splitlines()[2:] if line.strip())


def export_ncnn(model: torch.nn.Module, info: dict, path: Path) -> None:
    """``path`` (model.ncnn.param), its .bin (float32 weights) and its .json (``info`` and the SHA-256 of both files)
    from a batch-1 trace of ``model`` at ``info['img_size']``; pnnx's other outputs stay in a scratch folder. The
    .param and .bin replace any old ones together, after pnnx succeeded."""
    size = info["img_size"]
    weights, sidecar = ncnn_files(path)
    with tempfile.TemporaryDirectory() as scratch, atomic_path(path) as param_tmp, atomic_path(weights) as bin_tmp:
        traced = Path(scratch) / "model.pt"
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript; pnnx reads it
            torch.jit.trace(model.eval(), torch.zeros(1, 3, size, size)).save(str(traced))
        outputs = {"ncnnparam": param_tmp, "ncnnbin": bin_tmp, "fp16": 0, "inputshape": f"[1,3,{size},{size}]f32"}
        outputs |= {key: Path(scratch) / name for key, name in (("pnnxparam", "model.pnnx.param"), ("pnnxbin", "model.pnnx.bin"),
                                                                 ("pnnxpy", "model_pnnx.py"), ("pnnxonnx", "model.pnnx.onnx"),
                                                                 ("ncnnpy", "model_ncnn.py"))}
        done = subprocess.run([pnnx.EXEC_PATH, str(traced), *(f"{key}={value}" for key, value in outputs.items())],
                              cwd=scratch, capture_output=True, text=True)
        if done.returncode != 0 or not bin_tmp.stat().st_size:
            said = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[-1]
            raise ExportError(f"pnnx could not convert {info['model']} to NCNN ({said}): report the model name")
    save_json({**info, CHECKSUM_KEY: {"param": file_sha256(path), "bin": file_sha256(weights)}}, sidecar)
    types = layer_types(path)
    log.info("NCNN FP32: %s (+ .bin, .json): %d layers (%s)", path, sum(types.values()),
             ", ".join(f"{name} {count}" for name, count in types.most_common()))


def stamp_operating_point_ncnn(path: Path, point: OperatingPoint | None) -> None:
    """Rewrite an NCNN model's deploy info with its own operating point (None: no threshold, argmax verdicts)."""
    info = read_net(path, 1)[1]
    save_json({**info, "operating_point": point.to_dict() if point else None}, ncnn_files(path)[1])


class NcnnModule(torch.nn.Module):
    """An NCNN model (FP32) that takes and returns torch tensors like the model it was exported from."""

    def __init__(self, path: Path | str, threads: int = all_threads()):
        super().__init__()
        self.net = NcnnNet(path, threads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.net.logits(images.detach().cpu().numpy()))

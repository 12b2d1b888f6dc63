"""Run any artifact behind the nn.Module call (so engine.loop.evaluate scores it), and load what predict needs."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from deploy.edge import INPUT_NAME, OUTPUT_NAME, all_threads
from deploy.onnx_export import deploy_info
from models.factory import model_from_checkpoint
from utils.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.io import write_serialised
from utils.operating_point import OperatingPoint


class ArtifactError(UserError):
    """A model file given for inference cannot be used; the message says why."""


def ort_session(path: Path | str, threads: int = 1, optimized_model_filepath: str = "") -> ort.InferenceSession:
    """CPU session with ``threads`` intra-op threads and all graph optimisations (ORT's default level);
    ``optimized_model_filepath`` saves the graph ORT really runs (to see which ops stay float)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.optimized_model_filepath = optimized_model_filepath
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModule(torch.nn.Module):
    """An ONNX Runtime session that takes and returns torch tensors like the model it was exported from."""

    def __init__(self, path: Path | str, threads: int = 1):
        super().__init__()
        self.session = ort_session(path, threads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


def load_checkpoint_classifier(path: Path | str, threads: int = all_threads()) -> tuple[torch.nn.Module, dict]:
    torch.set_num_threads(threads)
    payload = load_checkpoint(path)
    return model_from_checkpoint(payload), deploy_info(payload["description"])


def trace_torchscript(model: torch.nn.Module, img_size: int) -> torch.jit.ScriptModule:
    """Traced and frozen FP32 TorchScript (portable: no x86-only fusions)."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript in favour of torch.export
        return torch.jit.freeze(torch.jit.trace(model.eval(), torch.zeros(1, 3, img_size, img_size)))


def save_torchscript_artifact(scripted: torch.jit.ScriptModule, info: dict, path: Path, point: OperatingPoint | None) -> None:
    """The deploy info, with the artifact's own operating point, rides in the extra file deploy_info.json."""
    info = {**info, "operating_point": point.to_dict() if point else None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        write_serialised(path, lambda buffer: torch.jit.save(scripted, buffer, _extra_files={"deploy_info.json": json.dumps(info)}))

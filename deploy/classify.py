"""Classify images with a PyTorch model (a checkpoint) behind the same calls as ``deploy.edge.EdgeClassifier``.

The file handling itself is torch-free (``deploy.files``); only this side of it needs torch.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from data.stitchingnet import normal_index
from data.transforms import Preprocess
from deploy.edge import all_threads, check_deploy_info, stored_operating_point
from deploy.files import Prediction, classify_files
from deploy.inference import load_checkpoint_classifier


class TorchClassifier:
    """``classifier(images)``: uint8 RGB [N, H, W, 3] -> class probabilities [N, classes] (numpy), evaluation's preprocessing.

    ``prepare`` and ``infer`` are separate so a caller can time preprocessing and inference apart.
    """

    def __init__(self, model: torch.nn.Module, info: dict):
        self.model, self.info = model, check_deploy_info(info)
        self.normal = normal_index(info["class_names"])
        self.operating_point = stored_operating_point(info)
        self.preprocess = Preprocess(info["mean"], info["std"])

    @classmethod
    def from_checkpoint(cls, path: Path | str, threads: int = all_threads()) -> TorchClassifier:
        return cls(*load_checkpoint_classifier(path, threads))

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        return torch.stack([self.preprocess(image) for image in images])

    def infer(self, inputs: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.model(inputs).float().softmax(1).numpy()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.infer(self.prepare(images))


def predict(model: torch.nn.Module, info: dict, files: list[Path], top_k: int = 1, batch_size: int = 32) -> Iterator[Prediction]:
    """``deploy.files.classify_files`` with a PyTorch model (or anything taking and returning tensors, e.g. OnnxModule)."""
    return classify_files(TorchClassifier(model, info), info, files, top_k, batch_size)

"""The model a deployment script runs: a checkpoint (PyTorch), an ONNX file or an OpenVINO IR, behind one interface.

The PyTorch and OpenVINO classifiers are imported only when chosen, so that predict.py and stream.py with an
ONNX model import neither torch nor OpenVINO (tests/test_edge.py runs them where ``import torch`` fails).
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from deploy.edge import EdgeClassifier, ExportedClassifier

if TYPE_CHECKING:
    from deploy.classify import TorchClassifier


def add_model_args(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", metavar="FILE", help="best.pt of any run (PyTorch inference)")
    model.add_argument("--onnx", metavar="FILE",
                       help="model.onnx or model.int8.onnx from export.py (ONNX Runtime; needs neither the checkpoint nor torch)")
    model.add_argument("--openvino", metavar="FILE.xml",
                       help="model.xml or model.int8.xml from export.py --openvino (OpenVINO; its .bin beside it; needs "
                            "neither the checkpoint nor torch)")


def open_classifier(checkpoint: str | None, onnx: str | None, openvino: str | None, threads: int) -> ExportedClassifier | TorchClassifier:
    """The classifier of whichever of the three files was given."""
    if onnx:
        return EdgeClassifier(onnx, threads)
    if openvino:
        from deploy.openvino_runtime import OpenVinoClassifier  # only on this path: the others need no OpenVINO

        return OpenVinoClassifier(openvino, threads)
    from deploy.classify import TorchClassifier  # only on this path: the exported ones never import torch

    return TorchClassifier.from_checkpoint(checkpoint, threads)

"""The model a deployment script runs: a checkpoint (PyTorch), an ONNX file, an OpenVINO IR or an NCNN model, behind one
interface.

The PyTorch, OpenVINO and NCNN classifiers are imported only when chosen, so that predict.py and stream.py with an
ONNX model import neither torch, OpenVINO nor ncnn (tests/test_edge.py runs them where ``import torch`` fails).
"""
from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from deploy.edge import EdgeClassifier, ExportedClassifier
from utils.cli import fraction

if TYPE_CHECKING:
    from deploy.classify import TorchClassifier

log = logging.getLogger(__name__)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", metavar="FILE", help="best.pt of any run (PyTorch inference)")
    model.add_argument("--onnx", metavar="FILE",
                       help="model.onnx or model.int8.onnx from export.py (ONNX Runtime; needs neither the checkpoint nor torch)")
    model.add_argument("--openvino", metavar="FILE.xml",
                       help="model.xml or model.int8.xml from export.py --openvino (OpenVINO; its .bin beside it; needs "
                            "neither the checkpoint nor torch)")
    model.add_argument("--ncnn", metavar="FILE.param",
                       help="model.ncnn.param from export.py --ncnn (NCNN, FP32; its .bin and .json beside it; needs "
                            "neither the checkpoint nor torch)")


def add_threshold_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--threshold", type=fraction, metavar="T",
                        help="flag an image (or tile) as defective when its defect score 1 - P(Normal) >= T, in [0, 1] "
                             "(default: the threshold stored in the model, chosen at training or export for its "
                             "false-alarm budget; a model without one decides by its most likely class)")


def decision_threshold(classifier: ExportedClassifier | TorchClassifier, override: float | None) -> float | None:
    """``--threshold`` if given, else the model's stored one; None (argmax verdicts, said once) for a model made
    before operating points were stored."""
    if override is not None:
        return override
    point = classifier.operating_point
    if point is None:
        if classifier.normal is not None:
            log.warning("this model carries no defect threshold (made before thresholds were stored): verdicts are argmax; "
                        "export it again, or pass --threshold")
        return None
    log.debug("defect threshold %.4f (stored: chosen for a %.1f %% false-alarm budget on %d Normal validation images)",
             point.threshold, 100 * point.budget, point.val_normal)
    return point.threshold


def decision_rule(threshold: float | None) -> str:
    """How verdicts are decided, for a summary line."""
    return "argmax verdicts" if threshold is None else f"defect score >= {threshold:.4f}"


def open_classifier(checkpoint: str | None, onnx: str | None, openvino: str | None, ncnn: str | None,
                    threads: int) -> ExportedClassifier | TorchClassifier:
    """The classifier of whichever of the four files was given."""
    if onnx:
        return EdgeClassifier(onnx, threads)
    if openvino:
        from deploy.openvino_runtime import OpenVinoClassifier  # only on this path: the others need no OpenVINO

        return OpenVinoClassifier(openvino, threads)
    if ncnn:
        from deploy.ncnn_runtime import NcnnClassifier  # only on this path: the others need no ncnn

        return NcnnClassifier(ncnn, threads)
    from deploy.classify import TorchClassifier  # only on this path: the exported ones never import torch

    return TorchClassifier.from_checkpoint(checkpoint, threads)

"""Score checkpoints on the labelled real StitchingNet public samples (one image per fabric x class).

A model trained only on the synthetic set meets real photographs here: 114 images are a signal, not a
measurement (one per pair, binomial SE about 4.5 points at 50 %).

    python benchmarks/real_samples.py ../shared/stitchingnet-samples runs/main/*/best.pt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.scan import scan_dataset  # noqa: E402
from deploy.classify import predict  # noqa: E402
from deploy.inference import load_checkpoint_classifier  # noqa: E402
from engine.metrics import classification_metrics  # noqa: E402
from utils.cli import run_cli  # noqa: E402


def score(checkpoint: Path, samples: Path) -> dict:
    """Accuracy, defect recall and false alarms of one checkpoint on the labelled samples under ``samples``."""
    dataset = scan_dataset(samples)
    model, info = load_checkpoint_classifier(checkpoint)
    files = [dataset.root / sample.path for sample in dataset.samples]
    index = {name: i for i, name in enumerate(info["class_names"])}
    preds = np.array([index[p.label] for p in predict(model, info, files)])
    targets = np.array([index[dataset.class_names[sample.label]] for sample in dataset.samples])
    metrics = classification_metrics(targets, preds, info["class_names"])
    return {"checkpoint": str(checkpoint), "images": len(targets), "correct": int((preds == targets).sum()),
            **{k: round(metrics[k], 4) for k in ("acc", "defect_recall", "false_alarm_rate")}}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path, help="folder of {fabric}_{class:02d}_{index}.jpg files")
    parser.add_argument("checkpoints", type=Path, nargs="+", help="best.pt files of any script")
    return parser


def main(args: argparse.Namespace) -> None:
    for checkpoint in args.checkpoints:
        print(json.dumps(score(checkpoint, args.samples)))


if __name__ == "__main__":
    run_cli(main, get_args_parser())

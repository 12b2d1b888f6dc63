"""Test metrics that matter on a sewing line: accuracy, macro F1, defect recall, false alarms."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support  # noqa: E402

from data.stitchingnet import normal_index  # noqa: E402
from utils.io import atomic_open, atomic_path, save_json  # noqa: E402


def classification_metrics(targets: np.ndarray, preds: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro precision/recall/F1, and the two QC figures.

    defect_recall: share of defective images not predicted Normal (a caught defect, whatever type).
    false_alarm_rate: share of Normal images predicted defective.
    Both are NaN when the class list has no Normal class (found by name, not position).
    """
    labels = list(range(len(class_names)))
    precision, recall, f1, _ = precision_recall_fscore_support(targets, preds, labels=labels, average="macro", zero_division=0)
    normal_class = normal_index(class_names)
    normal = targets == normal_class
    defective = ~normal if normal_class is not None else np.zeros_like(normal)
    return {
        "acc": float((targets == preds).mean()) if len(targets) else float("nan"),
        "macro_precision": float(precision),
        "macro_recall": float(recall),
        "macro_f1": float(f1),
        "defect_recall": float((preds[defective] != normal_class).mean()) if defective.any() else float("nan"),
        "false_alarm_rate": float((preds[normal] != normal_class).mean()) if normal.any() else float("nan"),
    }


def write_test_report(out_dir: Path, targets: np.ndarray, preds: np.ndarray, probs: np.ndarray, paths: list[str], class_names: list[str],
                      metrics: dict) -> None:
    """metrics.json, classification_report.txt, confusion_matrix.csv/.png, misclassified.csv."""
    labels = list(range(len(class_names)))
    save_json(metrics, out_dir / "metrics.json")
    report = classification_report(targets, preds, labels=labels, target_names=class_names, digits=4, zero_division=0)
    with atomic_open(out_dir / "classification_report.txt") as handle:
        handle.write(report)
    matrix = confusion_matrix(targets, preds, labels=labels)
    with atomic_open(out_dir / "confusion_matrix.csv", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *class_names])
        writer.writerows([name, *row] for name, row in zip(class_names, matrix.tolist()))
    with atomic_open(out_dir / "misclassified.csv", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", "confidence"])
        for i in np.flatnonzero(targets != preds):
            writer.writerow([paths[i], class_names[targets[i]], class_names[preds[i]], f"{probs[i].max():.4f}"])
    plot_confusion_matrix(matrix, class_names, out_dir / "confusion_matrix.png")


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    size = max(5, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

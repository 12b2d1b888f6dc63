"""Test metrics that matter on a sewing line: accuracy, macro F1, defect recall, false alarms, and the same two QC
figures at the operating point (the defect threshold chosen on validation images for a false-alarm budget)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support  # noqa: E402

from data.scan import fabric_of  # noqa: E402
from data.stitchingnet import normal_index  # noqa: E402
from engine.curves import plot_operating_point  # noqa: E402
from utils.io import atomic_open, atomic_path, save_json  # noqa: E402
from utils.operating_point import OperatingPoint, OperatingPointError, binomial_se, choose_threshold, defect_scores, rates_at  # noqa: E402

log = logging.getLogger(__name__)


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


def choose_operating_point(targets: np.ndarray, probs: np.ndarray, class_names: list[str], budget: float,
                           what: str = "the model") -> OperatingPoint | None:
    """The threshold for ``budget`` chosen on these (validation) predictions; None, with one warning saying why,
    where it cannot be chosen (no Normal class, or a split without Normal or defective images): the model then
    decides by argmax, as before thresholds existed."""
    normal = normal_index(class_names)
    if normal is None:
        log.warning("%s has no Normal class: no defect threshold, verdicts stay argmax", what)
        return None
    try:
        point = choose_threshold(defect_scores(probs, normal), targets != normal, budget)
    except OperatingPointError as error:
        log.warning("%s: no defect threshold, verdicts stay argmax: %s", what, error)
        return None
    log.info("%s: defect threshold %.4f for a %.1f %% false-alarm budget: validation defect recall %.4f, false alarms "
             "%.4f (%d Normal images)", what, point.threshold, 100 * budget, point.val_defect_recall,
             point.val_false_alarm_rate, point.val_normal)
    return point


def operating_point_metrics(targets: np.ndarray, probs: np.ndarray, class_names: list[str], point: OperatingPoint) -> dict:
    """The test split's defect recall and false alarms at ``point``'s threshold, with the binomial SE of the latter."""
    normal = normal_index(class_names)
    defective = targets != normal
    recall, false_alarms = rates_at(defect_scores(probs, normal), defective, point.threshold)
    return {"false_alarm_budget": point.budget, "threshold": point.threshold, "op_defect_recall": recall,
            "op_false_alarm_rate": false_alarms, "op_false_alarm_se": binomial_se(false_alarms, int((~defective).sum()))}


def per_fabric_metrics(targets: np.ndarray, preds: np.ndarray, paths: list[str], class_names: list[str]) -> dict[str, dict]:
    """Images, accuracy, defect recall and false alarms per fabric (by ``data.scan.fabric_of``; {} where paths name none).

    Fabrics differ in how visible a defect is (a dark thread on denim, a thread the colour of a jacquard's
    pattern), so one overall accuracy can hide a fabric the detector does not work on.
    """
    fabrics = np.array([fabric_of(path) for path in paths])
    table = {}
    for fabric in sorted(set(fabrics.tolist()) - {""}):
        rows = fabrics == fabric
        metrics = classification_metrics(targets[rows], preds[rows], class_names)
        table[fabric] = {"images": int(rows.sum()), **{k: metrics[k] for k in ("acc", "defect_recall", "false_alarm_rate")}}
    return table


def write_test_report(out_dir: Path, targets: np.ndarray, preds: np.ndarray, probs: np.ndarray, paths: list[str], class_names: list[str],
                      metrics: dict, point: OperatingPoint | None = None) -> dict[str, dict]:
    """metrics.json (with ``per_fabric``, the ``operating_point`` and the defect-vs-Normal AUROC and average precision),
    operating_point.png (ROC, precision-recall, score histograms), per_fabric.csv, classification_report.txt,
    confusion_matrix.csv/.png, misclassified.csv; returns the per-fabric table."""
    labels = list(range(len(class_names)))
    fabrics = per_fabric_metrics(targets, preds, paths, class_names)
    normal = normal_index(class_names)
    separation = {}
    if normal is not None:
        separation = plot_operating_point(defect_scores(probs, normal), targets != normal, point.threshold if point else None,
                                          point.budget if point else None, out_dir / "operating_point.png",
                                          f"test split, {len(targets)} images")
    save_json({**metrics, **separation, "operating_point": point.to_dict() if point else None, "per_fabric": fabrics},
              out_dir / "metrics.json")
    if fabrics:
        with atomic_open(out_dir / "per_fabric.csv", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["fabric", "images", "acc", "defect_recall", "false_alarm_rate"])
            writer.writerows([fabric, row["images"], *(round(row[k], 6) for k in ("acc", "defect_recall", "false_alarm_rate"))]
                             for fabric, row in fabrics.items())
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
    return fabrics


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

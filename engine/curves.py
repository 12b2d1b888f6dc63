"""One figure of the defect score's trade-off: ROC, precision-recall and the score histograms, operating point marked.

Accuracy hides what the line cares about: how many defects a threshold catches for the false alarms it costs. The
figure shows where the chosen threshold sits on the whole curve, so a reviewer sees whether a slightly larger
false-alarm budget would buy much more recall.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

from utils.io import atomic_path  # noqa: E402
from utils.operating_point import SCORE, rates_at  # noqa: E402

log = logging.getLogger(__name__)

NORMAL_COLOUR, DEFECT_COLOUR, POINT_COLOUR = "tab:blue", "tab:red", "black"
HISTOGRAM_BINS = np.linspace(0.0, 1.0, 41)


def plot_operating_point(scores: np.ndarray, defective: np.ndarray, threshold: float | None, budget: float | None,
                         path: Path, title: str = "") -> dict[str, float]:
    """Write the three-panel PNG to ``path`` (atomically); return {"auroc", "average_precision"}, NaN when the
    images lack Normal or defective ones (then only the histogram has something to show).

    ``threshold`` None (an argmax model, no operating point) draws the curves with nothing marked.
    """
    scores = np.asarray(scores, np.float64).ravel()
    defective = np.asarray(defective, bool).ravel()
    if scores.shape != defective.shape:
        raise ValueError(f"{scores.size} scores but {defective.size} defective flags")
    both = bool(defective.any() and (~defective).any())
    auroc = float(roc_auc_score(defective, scores)) if both else math.nan
    average_precision = float(average_precision_score(defective, scores)) if both else math.nan
    point = rates_at(scores, defective, threshold) if threshold is not None and both else None

    fig, (roc_ax, pr_ax, hist_ax) = plt.subplots(1, 3, figsize=(16, 4.8))
    if both:
        _roc_panel(roc_ax, scores, defective, auroc, point, budget)
        _pr_panel(pr_ax, scores, defective, average_precision, threshold, point)
    else:
        for ax in (roc_ax, pr_ax):
            ax.text(0.5, 0.5, "needs Normal and defective images", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
    roc_ax.set(xlabel="false-alarm rate (Normal images flagged)", ylabel="defect recall (defective images flagged)",
               title=f"ROC: defective vs Normal, score {SCORE}", xlim=(0, 1), ylim=(0, 1.02))
    pr_ax.set(xlabel="defect recall", ylabel="precision (flagged images that are defective)",
              title="precision-recall (defect = positive)", xlim=(0, 1), ylim=(0, 1.02))
    _histogram_panel(hist_ax, scores, defective, threshold)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    log.debug("wrote %s (AUROC %.4f, AP %.4f)", path, auroc, average_precision)
    return {"auroc": auroc, "average_precision": average_precision}


def _roc_panel(ax: Axes, scores: np.ndarray, defective: np.ndarray, auroc: float,
               point: tuple[float, float] | None, budget: float | None) -> None:
    false_alarms, recall, _ = roc_curve(defective, scores)
    ax.plot(false_alarms, recall, color=DEFECT_COLOUR, label=f"ROC (AUROC {auroc:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    if budget is not None:
        ax.axvline(budget, color="tab:orange", linestyle=":", linewidth=1.5, label=f"false-alarm budget {budget:.1%}")
    if point is not None:
        recall_at, false_alarms_at = point
        ax.plot(false_alarms_at, recall_at, "o", color=POINT_COLOUR, zorder=3, clip_on=False,
                label=f"operating point: recall {recall_at:.1%}, false alarms {false_alarms_at:.1%}")
    ax.grid(True, alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)


def _pr_panel(ax: Axes, scores: np.ndarray, defective: np.ndarray, average_precision: float, threshold: float | None,
              point: tuple[float, float] | None) -> None:
    precision, recall, _ = precision_recall_curve(defective, scores)
    ax.plot(recall, precision, color=DEFECT_COLOUR, drawstyle="steps-post", label=f"PR (average precision {average_precision:.4f})")
    ax.axhline(defective.mean(), color="grey", linestyle=":", linewidth=1, label=f"chance ({defective.mean():.1%} defective)")
    flagged = scores >= threshold if threshold is not None else np.zeros_like(defective)
    if point is not None and flagged.any():  # nothing flagged: precision is undefined, no point to mark
        precision_at = float(defective[flagged].mean())
        ax.plot(point[0], precision_at, "o", color=POINT_COLOUR, zorder=3, clip_on=False,
                label=f"operating point: recall {point[0]:.1%}, precision {precision_at:.1%}")
    ax.grid(True, alpha=0.25)
    ax.legend(loc="lower left", fontsize=8)


def _histogram_panel(ax: Axes, scores: np.ndarray, defective: np.ndarray, threshold: float | None) -> None:
    """Shared bins on [0, 1], log counts: the few Normal images near the threshold are what the budget is about."""
    clipped = np.clip(scores, 0.0, 1.0)  # 1 - P(Normal) in float32 can fall a hair outside [0, 1]
    for mask, colour, name in ((~defective, NORMAL_COLOUR, "Normal"), (defective, DEFECT_COLOUR, "defective")):
        if mask.any():
            ax.hist(clipped[mask], bins=HISTOGRAM_BINS, color=colour, alpha=0.5, label=f"{name} ({int(mask.sum())})")
    if threshold is not None:
        ax.axvline(threshold, color=POINT_COLOUR, linestyle="--", linewidth=1.5, label=f"threshold {threshold:.4f}")
    if scores.size:
        ax.set_yscale("log")
        ax.legend(loc="upper center", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no images", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set(xlabel=f"defect score {SCORE}", ylabel="images (log scale)", title="defect score by true class", xlim=(0, 1))
    ax.grid(True, alpha=0.25)

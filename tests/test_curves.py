"""engine.curves.plot_operating_point: the ROC / precision-recall / histogram figure of the defect score."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from engine.curves import plot_operating_point
from utils.operating_point import choose_threshold

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def crafted_scores() -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Normal and defective scores (float32, as every runtime gives them), so AUROC is below 1."""
    rng = np.random.default_rng(0)
    defective = np.r_[np.zeros(200, bool), np.ones(120, bool)]
    scores = np.r_[rng.beta(1, 8, 200), rng.beta(4, 2, 120)].astype(np.float32)
    return scores, defective


def test_writes_a_png_and_returns_sklearns_auroc_and_average_precision(tmp_path: Path) -> None:
    scores, defective = crafted_scores()
    point = choose_threshold(scores, defective, 0.05)
    path = tmp_path / "operating_point.png"
    figures = plot_operating_point(scores, defective, point.threshold, point.budget, path, title="synthetic data")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert figures["auroc"] == pytest.approx(roc_auc_score(defective, scores))
    assert figures["average_precision"] == pytest.approx(average_precision_score(defective, scores))
    assert 0.5 < figures["auroc"] < 1  # the crafted classes overlap: a real curve, not a corner
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary file left beside it


def test_argmax_model_without_threshold_still_draws(tmp_path: Path) -> None:
    scores, defective = crafted_scores()
    path = tmp_path / "argmax.png"
    figures = plot_operating_point(scores, defective, None, None, path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE and figures["auroc"] == pytest.approx(roc_auc_score(defective, scores))


@pytest.mark.parametrize("which", ["all_normal", "all_defective", "empty"])
def test_a_missing_class_gives_nan_and_still_draws_the_histogram(which: str, tmp_path: Path) -> None:
    scores, defective = crafted_scores()
    keep = {"all_normal": ~defective, "all_defective": defective, "empty": np.zeros_like(defective)}[which]
    path = tmp_path / f"{which}.png"
    figures = plot_operating_point(scores[keep], defective[keep], 0.5, 0.05, path)
    assert math.isnan(figures["auroc"]) and math.isnan(figures["average_precision"])
    assert path.read_bytes()[:8] == PNG_SIGNATURE

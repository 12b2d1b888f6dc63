"""The evidence helpers in benchmarks/: paired differences and scoring on labelled real samples."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLES

sys.path.insert(0, str(ROOT / "benchmarks"))

from paired_difference import paired_difference  # noqa: E402
from per_fabric import rebuilt_table  # noqa: E402
from real_samples import score  # noqa: E402


def report(folder: Path, wrong: list[str], acc: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"acc": acc}))
    with open(folder / "misclassified.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", "confidence"])
        writer.writerows([[path, "Normal", "Needle mark", 0.5] for path in wrong])
    return folder


def test_paired_difference_counts_gains_and_losses(tmp_path):
    base = report(tmp_path / "base", ["a", "b", "c"], acc=0.7)  # 10 test images
    other = report(tmp_path / "other", ["c", "d"], acc=0.8)
    result = paired_difference(base, other)
    assert (result["n"], result["gained"], result["lost"], result["diff_points"]) == (10, 2, 1, 10.0)
    assert result["se_points"] == pytest.approx(100 * (3 - 1 / 10) ** 0.5 / 10, abs=0.01)


def test_per_fabric_table_rebuilt_from_a_report_equals_the_one_the_run_wrote(trained_run):
    written = json.loads((trained_run / "metrics.json").read_text())["per_fabric"]
    assert written and json.dumps(rebuilt_table(trained_run)) == json.dumps(written)  # as text: NaN equals NaN


def test_real_samples_score_matches_the_predictions(trained_run, tiny_dataset):
    result = score(trained_run / "best.pt", tiny_dataset)
    assert result["images"] == 3 * 11 * 4
    assert result["acc"] == pytest.approx(result["correct"] / result["images"], abs=1e-4)
    assert 0 <= result["defect_recall"] <= 1 and 0 <= result["false_alarm_rate"] <= 1


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="needs ../shared/stitchingnet-samples beside the checkout")
def test_real_samples_are_all_labelled(trained_run):
    assert score(trained_run / "best.pt", SAMPLES)["images"] == 114

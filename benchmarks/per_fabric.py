"""Per-fabric test accuracy of a run written before runs wrote per_fabric.csv, rebuilt from its report.

Every image of the stored test split not in misclassified.csv was predicted right, so the report holds all
predictions (same table as engine.metrics.per_fabric_metrics writes for new runs):

    python benchmarks/per_fabric.py runs/main/<run> runs/quantization/<run>/ptq
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.scan import class_name_of  # noqa: E402
from data.stitchingnet import CLASS_KEYS, CLASSES, normalise_name  # noqa: E402
from engine.metrics import per_fabric_metrics  # noqa: E402


def split_file(report_dir: Path) -> Path:
    """The run's split.json: in the report folder, or in the run folder above a method's report folder."""
    for folder in (report_dir, report_dir.parent):
        if (folder / "split.json").is_file():
            return folder / "split.json"
    raise SystemExit(f"error: no split.json in {report_dir} or its parent: give a run folder of this toolkit")


def true_class(path: str) -> int:
    """StitchingNet class of a test image, named by its path as the scanner names it."""
    key = normalise_name(class_name_of(path) or "")
    if key not in CLASS_KEYS:
        raise SystemExit(f"error: cannot tell the StitchingNet class of test image '{path}'")
    return CLASS_KEYS[key]


def rebuilt_table(report_dir: Path) -> dict[str, dict]:
    paths = json.loads(split_file(report_dir).read_text())["test"]
    index = {name: i for i, name in enumerate(CLASSES)}
    with open(report_dir / "misclassified.csv", newline="") as handle:
        wrong = {row["path"]: (index[row["true"]], index[row["predicted"]]) for row in csv.DictReader(handle)}
    targets = np.array([wrong[p][0] if p in wrong else true_class(p) for p in paths])
    preds = np.array([wrong[p][1] if p in wrong else target for p, target in zip(paths, targets)])
    return per_fabric_metrics(targets, preds, paths, list(CLASSES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+", help="run or report folders (misclassified.csv; split.json here or above)")
    args = parser.parse_args()
    for report_dir in args.reports:
        table = rebuilt_table(report_dir)
        print(json.dumps({"report": str(report_dir), **{f: round(row["acc"], 4) for f, row in table.items()}}))


if __name__ == "__main__":
    main()

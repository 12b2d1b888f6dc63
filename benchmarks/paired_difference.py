"""Accuracy difference of two runs on the same test images, with the standard error of the paired difference.

Two models scored on one split disagree in correctness on a few images; the SE of the accuracy difference is
sqrt(lost + gained - (gained - lost)^2 / n) / n, from each run's misclassified.csv (same --seed and data):

    python benchmarks/paired_difference.py runs/main/<fp32 run> runs/quantization/<run>/ptq
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path


def wrong(report_dir: Path) -> set[str]:
    with open(report_dir / "misclassified.csv", newline="") as handle:
        return {row["path"] for row in csv.DictReader(handle)}


def paired_difference(base: Path, other: Path) -> dict:
    """Points gained by ``other`` over ``base`` and the SE of that difference (both in points)."""
    acc = json.loads((base / "metrics.json").read_text())["acc"]
    base_wrong, other_wrong = wrong(base), wrong(other)
    n = round(len(base_wrong) / (1 - acc)) if acc < 1 else None
    if not n:
        raise SystemExit(f"error: cannot infer the test-set size from {base}/metrics.json")
    gained, lost = len(base_wrong - other_wrong), len(other_wrong - base_wrong)
    se = math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0)) / n
    return {"n": n, "gained": gained, "lost": lost, "diff_points": round(100 * (gained - lost) / n, 2), "se_points": round(100 * se, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="report folder of the reference run (misclassified.csv, metrics.json)")
    parser.add_argument("others", type=Path, nargs="+", help="report folders of runs on the same test split")
    args = parser.parse_args()
    for other in args.others:
        print(json.dumps({"base": str(args.base), "other": str(other), **paired_difference(args.base, other)}))


if __name__ == "__main__":
    main()

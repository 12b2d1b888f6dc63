"""The one results table every script appends to: ``<output-dir>/results.csv``."""
from __future__ import annotations

import csv
from pathlib import Path

from filelock import FileLock

from utils.io import atomic_open

COLUMNS = (
    "run_id", "date", "script", "method", "model", "alpha", "pretrained", "dataset", "augment",
    "img_size", "epochs", "seed", "params", "flops", "flops_pct_mobilenetv1", "size_mb", "file_mb",
    "test_acc", "test_loss", "macro_f1", "defect_recall", "false_alarm_rate", "latency_ms_1t", "checkpoint",
)


def read_rows(path: Path | str) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def append_result(path: Path | str, row: dict) -> None:
    """Append one row under a file lock, rewriting the file atomically (temp + rename).

    Concurrent runs never tear or lose a row, and a crash mid-write leaves the old table.
    Columns the row lacks stay blank; keys outside the schema are an error (a typo).
    """
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"not results columns: {sorted(unknown)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        rows = read_rows(path) if path.exists() else []
        with atomic_open(path, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows + [row])


SUMMARY_COLUMNS = ("model", "method", "dataset", "params", "flops", "test_acc", "macro_f1", "defect_recall", "false_alarm_rate",
                   "latency_ms_1t")


def print_table(rows: list[dict], columns: tuple[str, ...] = SUMMARY_COLUMNS) -> None:
    """Plain-text summary of this invocation's rows (compare.py makes the full table)."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))

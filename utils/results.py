"""The one results table every script appends to: ``<output-dir>/results.csv``.

One strict reader serves the appends and compare.py: a file it cannot parse exactly is refused,
never rewritten, because the atomic rewrite would make a swallowed or torn row permanent.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from filelock import FileLock

from utils.errors import UserError
from utils.io import atomic_open

COLUMNS = (
    "run_id", "date", "script", "method", "model", "alpha", "pretrained", "dataset", "augment",
    "img_size", "epochs", "seed", "params", "flops", "flops_pct_mobilenetv1", "size_mb", "file_mb",
    "test_acc", "test_loss", "macro_f1", "defect_recall", "false_alarm_rate", "latency_ms_1t", "checkpoint",
    # the operating point: the threshold chosen on validation images for the false-alarm budget, and the test split's
    # defect recall and false alarms at it (with the binomial SE of the latter); the argmax columns above are unchanged
    "false_alarm_budget", "threshold", "op_defect_recall", "op_false_alarm_rate", "op_false_alarm_se",
)
OPERATING_POINT_COLUMNS = COLUMNS[-5:]
REQUIRED_COLUMNS = ("model", "test_acc", "flops")  # in every schema so far: what makes a CSV a results table
FIX = "fix or delete that line, or move the file away"


class ResultsFileError(UserError):
    """A results file that cannot be parsed exactly: rewriting it would lose or garble rows."""


def _refuse(path: Path, line: int, problem: str) -> ResultsFileError:
    return ResultsFileError(f"results file '{path}' line {line}: {problem}")


@dataclass(frozen=True)
class ResultsTable:
    """A parsed results file.

    ``columns``: the schema, then the file's own extra columns (kept when the file is rewritten).
    Every row holds every column, blank where an older file lacks it; ``lines`` says where each row starts.
    """
    columns: tuple[str, ...]
    rows: tuple[dict[str, str], ...]
    lines: tuple[int, ...]


def read_results(path: Path | str) -> ResultsTable:
    """Parse strictly; anything the csv module would silently patch up is a ResultsFileError naming the line."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a file saved again by Excel
            records = list(_records(handle, path))
    except (OSError, UnicodeDecodeError) as error:
        raise ResultsFileError(f"results file '{path}' cannot be read ({error}); fix or move the file away") from None
    if not records:
        return ResultsTable(COLUMNS, (), ())
    (_, header), *body = records
    extra = _extra_columns(header, path)
    for line, fields in body:
        if len(fields) != len(header):
            raise _refuse(path, line, f"{len(fields)} fields, the header has {len(header)}; {FIX}")
    rows = tuple({**dict.fromkeys(COLUMNS, ""), **dict(zip(header, fields))} for _, fields in body)
    return ResultsTable(COLUMNS + extra, rows, tuple(line for line, _ in body))


def _records(handle: IO[str], path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each non-blank record; a quote left open is reported at the line that opens it."""
    reader = csv.reader(handle, strict=True)
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise _refuse(path, start, f"{_quoting_problem(error, start, reader.line_num)}; {FIX}") from None
        if any("\n" in field or "\r" in field for field in fields):
            raise _refuse(path, start, f"a quote opened on this line only closes on line {reader.line_num}, "
                                       f"swallowing the lines between; {FIX}")
        if fields:
            yield start, fields
        start = reader.line_num + 1


def _quoting_problem(error: csv.Error, start: int, end: int) -> str:
    if "end of data" in str(error):  # strict mode's words for end of file inside a quoted field
        return "a quote opened on this line is never closed"
    if end > start:
        return f"a quote opened on this line only closes on line {end} ({error})"
    return f"malformed CSV ({error})"


def _extra_columns(header: list[str], path: Path) -> tuple[str, ...]:
    """The header's columns outside the schema; a header that cannot be mapped onto the schema is refused."""
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise _refuse(path, 1, f"not a results table header, it lacks the column(s) {', '.join(missing)} (expected the "
                               "results.csv that main.py and the other scripts write); fix the header or move the file away")
    unusable = sorted({c for c in header if not c or header.count(c) > 1})
    if unusable:
        raise _refuse(path, 1, f"empty or repeated column names {unusable}; fix the header or move the file away")
    return tuple(c for c in header if c not in COLUMNS)


def read_rows(path: Path | str) -> list[dict]:
    """Just the rows, every schema column present (the tests' view of the table)."""
    return list(read_results(path).rows)


def check_results_file(path: Path | str) -> None:
    """Fail before a run starts, not after its training, when its row could not be appended."""
    path = Path(path)
    if path.exists():
        read_results(path)


def append_result(path: Path | str, row: dict) -> None:
    """Append one row under a file lock, rewriting the file atomically (temp + rename).

    Concurrent runs never tear or lose a row, and a crash mid-write leaves the old table.
    Columns the row lacks stay blank; keys outside the schema are an error (a typo), and so
    are line breaks, which the strict reader would refuse on the next append. A file that
    does not parse is left byte-identical (ResultsFileError).
    """
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"not results columns: {sorted(unknown)}")
    multiline = sorted(key for key, value in row.items() if "\n" in str(value) or "\r" in str(value))
    if multiline:
        raise ValueError(f"results values with line breaks: {multiline}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        table = read_results(path) if path.exists() else ResultsTable(COLUMNS, (), ())
        with atomic_open(path, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=table.columns)
            writer.writeheader()
            writer.writerows([*table.rows, row])


SUMMARY_COLUMNS = ("model", "method", "dataset", "params", "flops", "test_acc", "macro_f1", "defect_recall", "false_alarm_rate",
                   "threshold", "op_defect_recall", "op_false_alarm_rate", "latency_ms_1t")


def print_table(rows: list[dict], columns: tuple[str, ...] = SUMMARY_COLUMNS) -> None:
    """Plain-text summary of this invocation's rows (compare.py makes the full table)."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))

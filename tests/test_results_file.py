"""The one results-file reader/writer: strict parsing, refusal to rewrite a damaged file, fail-fast before training."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN, run_script

from engine.config import RunConfig
from engine.run import create_run_dir
from utils.distributed import Runtime
from utils.results import COLUMNS, ResultsFileError, append_result, check_results_file, read_results, read_rows

HEADER = ",".join(COLUMNS)
GOOD = "a,2026-01-01T00:00:00,main,fp32,m,,False,synthetic,0,32,1,0,10,100,1.0,0.1,0.2,0.9,0.3,0.8,0.7,0.1,1.5,runs/a/best.pt," \
       "0.05,0.42,0.95,0.04,0.02"

# (file text, line the error names, words the error says)
DAMAGED = {
    "unterminated_quote_at_end": (f'{HEADER}\n{GOOD}\nx,"abc\n', 3, "never closed"),
    "unterminated_quote_swallowing_rows": (f'{HEADER}\nx,"abc\n{GOOD}\n{GOOD.replace("a,", "b,", 1)},"q"\n', 2, "only closes on line 4"),
    "quote_closed_lines_later": (f'{HEADER}\nx,"abc\n{GOOD}",\n', 2, "swallowing the lines between"),
    "stray_quote": (f'{HEADER}\n"a"b{GOOD[1:]}\n', 2, "malformed CSV"),
    "more_fields": (f"{HEADER}\n{GOOD}\n{GOOD},extra\n", 3, f"{len(COLUMNS) + 1} fields, the header has {len(COLUMNS)}"),
    "fewer_fields": (f"{HEADER}\n{GOOD}\nx,y\n", 3, "2 fields"),
    "not_a_results_header": ("epoch,loss\n1,0.5\n", 1, "lacks the column(s) model, test_acc, flops"),
    "repeated_column": (f"{HEADER},model\n{GOOD},m\n", 1, "repeated column names ['model']"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_append_refuses_a_damaged_file_and_leaves_it_byte_identical(case: str, tmp_path: Path) -> None:
    text, line, words = DAMAGED[case]
    path = tmp_path / "results.csv"
    path.write_bytes(text.encode())
    with pytest.raises(ResultsFileError) as raised:
        append_result(path, {"run_id": "new", "model": "m", "test_acc": 0.5})
    message = str(raised.value)
    assert f"'{path}' line {line}:" in message and words in message and "move the file away" in message
    assert path.read_bytes() == text.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.csv.lock"]  # no temp file left


def test_undecodable_file_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_bytes(f"{HEADER}\n".encode() + b"\xff\xfe,\n")
    with pytest.raises(ResultsFileError, match="cannot be read"):
        append_result(path, {"run_id": "new", "model": "m"})
    assert path.read_bytes() == f"{HEADER}\n".encode() + b"\xff\xfe,\n"


def test_older_and_wider_headers_are_mapped_and_kept(tmp_path: Path) -> None:
    """An older schema (a subset) gains the new columns blank; columns of a newer tool (a superset) survive a rewrite."""
    path = tmp_path / "results.csv"
    path.write_text("run_id,model,test_acc,flops,note\nold,m,0.9,100,keep me\n\n")  # a blank line is tolerated
    append_result(path, {"run_id": "new", "model": "m2", "test_acc": 0.5, "latency_ms_1t": 2.0})
    with open(path, newline="") as handle:
        header, *records = list(csv.reader(handle))
    assert header == [*COLUMNS, "note"]
    table = read_results(path)
    assert [row["run_id"] for row in table.rows] == ["old", "new"] and table.lines == (2, 3)
    assert table.rows[0]["note"] == "keep me" and table.rows[0]["latency_ms_1t"] == "" and table.rows[1]["latency_ms_1t"] == "2.0"
    assert len(records) == 2 and all(len(r) == len(header) for r in records)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_bytes(f"\ufeff{HEADER}\n{GOOD}\n".encode())
    append_result(path, {"run_id": "b", "model": "m"})
    assert [row["run_id"] for row in read_rows(path)] == ["a", "b"] and read_results(path).columns == COLUMNS


def test_blank_lines_do_not_shift_the_line_numbers_of_errors(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text(f"{HEADER}\n\n{GOOD}\n\nx,y\n")
    with pytest.raises(ResultsFileError, match="line 5: 2 fields"):
        read_rows(path)


def test_a_value_with_a_line_break_is_never_written(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    append_result(path, {"run_id": "a", "model": "m"})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="line breaks: \\['checkpoint'\\]"):
        append_result(path, {"run_id": "b", "model": "m", "checkpoint": "runs/x\ny/best.pt"})
    assert path.read_bytes() == before


def test_check_results_file_accepts_missing_and_valid_files(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    check_results_file(path)  # a first run: nothing to check
    append_result(path, {"run_id": "a", "model": "m"})
    check_results_file(path)
    path.write_text(path.read_text() + 'x,"abc\n')
    with pytest.raises(ResultsFileError, match="line 3: a quote opened on this line is never closed"):
        check_results_file(path)


def test_create_run_dir_refuses_before_making_the_run_folder(tmp_path: Path) -> None:
    text = DAMAGED["more_fields"][0]
    (tmp_path / "results.csv").write_text(text)
    with pytest.raises(ResultsFileError, match="line 3"):
        create_run_dir(RunConfig(output_dir=str(tmp_path)), "main", "m", Runtime(torch.device("cpu")))
    assert not (tmp_path / "main").exists() and (tmp_path / "results.csv").read_text() == text


def test_training_script_stops_before_training_on_a_damaged_results_file(tiny_dataset: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    text = DAMAGED["unterminated_quote_swallowing_rows"][0]
    (tmp_path / "results.csv").write_text(text)
    code = run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--epochs", "1", "--output-dir", tmp_path)
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error:", "warning:"))]
    assert len(errors) == 1 and errors[0].startswith(f"error: results file '{tmp_path / 'results.csv'}' line 2:")
    assert not (tmp_path / "main").exists() and (tmp_path / "results.csv").read_text() == text  # no run folder, nothing trained

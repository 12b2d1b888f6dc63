"""compare.py: merging, selection, Pareto marking, published-style formatting, plots, --zoo, bad input."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import run_script

from engine.comparison import best_per, frontier_labels, load_results, operating_point_rows, pareto_front, recall_groups, sort_rows
from utils.results import COLUMNS, OPERATING_POINT_COLUMNS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def result(model: str, flops: int, acc: float, latency: float | None = None, method: str = "fp32",
           dataset: str = "synthetic", date: str = "2026-01-01T00:00:00", **extra) -> dict:
    row = {"model": model, "method": method, "dataset": dataset, "flops": flops, "test_acc": acc, "date": date,
           "params": 613947, "size_mb": 2.342, "test_loss": 0.05287, "flops_pct_mobilenetv1": 7.76}
    if latency is not None:
        row["latency_ms_1t"] = latency
    return {**row, **extra}


def write_results(path: Path, rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def loaded(rows: list[dict], tmp_path: Path) -> list[dict]:
    return load_results([write_results(tmp_path / "r.csv", rows)])


def test_merges_files_and_reads_older_schema_with_blank_columns(tmp_path: Path) -> None:
    old_columns = tuple(c for c in COLUMNS if c not in ("file_mb", "latency_ms_1t", "defect_recall"))
    first = write_results(tmp_path / "a.csv", [result("lcnet_050", 46_000_000, 0.98, 3.1, file_mb=2.4)])
    second = write_results(tmp_path / "b.csv", [result("resnet18", 1_800_000_000, 0.99, 40.0)], columns=old_columns)
    rows = load_results([first, second, first])  # the repeated file adds no duplicate rows
    assert [r["model"] for r in rows] == ["lcnet_050", "resnet18"]
    assert rows[0]["file_mb"] == "2.4" and rows[1]["latency_ms_1t"] == "" and rows[1]["file_mb"] == ""
    assert set(rows[1]) == set(COLUMNS)


def test_sort_groups_datasets_and_puts_blanks_last(tmp_path: Path) -> None:
    rows = loaded([result("big", 300, 0.99, 9.0), result("small", 100, 0.90), result("mid", 200, 0.95, 5.0),
                   result("real_one", 50, 0.5, 1.0, dataset="real")], tmp_path)
    assert [r["model"] for r in sort_rows(rows, "flops")] == ["real_one", "small", "mid", "big"]
    assert [r["model"] for r in sort_rows(rows, "acc")] == ["real_one", "big", "mid", "small"]
    assert [r["model"] for r in sort_rows(rows, "latency")] == ["real_one", "mid", "big", "small"]


def test_pareto_frontier_is_computed_within_each_dataset(tmp_path: Path) -> None:
    rows = loaded([
        result("a", 100, 0.90, 0.5),  # cheapest and fastest: on both fronts
        result("b", 200, 0.95, 1.0),  # costlier but more accurate: on both fronts
        result("c", 300, 0.94, 3.0),  # dominated by b on both axes
        result("d", 200, 0.95, 4.0),  # ties b on FLOPs and accuracy: still not dominated there
        result("e", 400, 0.99),       # no latency: only on the FLOPs front
        result("r", 1000, 0.50, 9.0, dataset="real"),  # worse than everything synthetic, yet alone on the real front
    ], tmp_path)
    assert pareto_front(rows, "flops") == [True, True, False, True, True, True]
    assert pareto_front(rows, "latency_ms_1t") == [True, True, False, False, False, True]
    assert frontier_labels(rows) == ["FLOPs+latency", "FLOPs+latency", "", "FLOPs", "FLOPs", "FLOPs+latency"]


def test_best_per_keeps_one_row_per_model_method_dataset(tmp_path: Path) -> None:
    rows = loaded([
        result("m", 100, 0.97, date="2026-01-01T00:00:00"),
        result("m", 100, 0.93, date="2026-02-01T00:00:00"),
        result("m", 100, 0.99, method="qat"),
        result("m", 100, 0.80, dataset="real"),
    ], tmp_path)
    assert [r["test_acc"] for r in best_per(rows, "best")] == ["0.97", "0.99", "0.8"]
    assert [r["test_acc"] for r in best_per(rows, "latest")] == ["0.93", "0.99", "0.8"]


def test_markdown_table_plot_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = write_results(tmp_path / "a.csv", [result("lcnet_050", 45_998_976, 0.98764, 3.25, file_mb=2.4, augment=1),
                                               result("lcnet_050", 45_998_976, 0.97, 1.5, method="qat", file_mb=0.7)])
    second = write_results(tmp_path / "b.csv", [result("resnet18", 1_818_559_488, 0.99451, 40.0, method="prune", file_mb=44.0),
                                                result("tiny", 1_000_000, 0.5, 0.4, dataset="real")])
    table, plot, merged = tmp_path / "table.md", tmp_path / "pareto.png", tmp_path / "merged.csv"
    code = run_script("compare.py", first, second, "--filter", "dataset=synthetic", "--sort", "acc",
                      "--markdown", table, "--plot", plot, "--csv", merged)
    assert code == 0
    lines = table.read_text().splitlines()
    assert len(lines) == 2 + 3 + 2  # header, rule, 3 synthetic rows, blank line, note
    header, rule, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[:5]]
    assert header[:7] == ["Model Name", "total FLOPs", "FLOPs (% of MobileNetV1)", "Test Accuracy", "Test Loss",
                          "model size(MB)", "total params"]
    assert header[7:] == ["method", "dataset", "augment", "img size", "file size(MB)", "1-thread latency(ms)", "macro F1",
                          "defect recall", "FA budget", "threshold", "op recall", "op false alarms", "op FA SE", "Pareto front"]
    assert rule[1].endswith(":") and rule[0].startswith(":")  # numbers right-aligned, names left
    assert rows[0][:9] == ["resnet18", "1,818,559,488", "7.76%", "99.451%", "0.05287", "2.3420", "613,947", "prune", "synthetic"]
    assert rows[1][:4] == ["lcnet_050", "45,998,976", "7.76%", "98.764%"] and rows[1][-1] == "FLOPs+latency"
    assert rows[2][-1] == "latency"  # same FLOPs as the fp32 row but less accurate; faster than both
    assert "tiny" not in table.read_text() and "tiny" not in capsys.readouterr().out
    assert plot.stat().st_size > 0 and plot.read_bytes()[:8] == PNG_SIGNATURE
    assert [r["model"] for r in load_results([merged])] == ["resnet18", "lcnet_050", "lcnet_050"]


def test_zoo_prints_static_costs_of_two_tiny_models(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert run_script("compare.py", "--zoo", "mobilenetv3_small_050,lcnet_050", "--img-size", "32", "--csv", tmp_path / "zoo.csv") == 0
    out = capsys.readouterr().out
    assert "| mobilenetv3_small_050 |" in out and "| lcnet_050 " in out and "579,499" in out and "613,947" in out
    rows = load_results([tmp_path / "zoo.csv"])
    assert [r["model"] for r in rows] == ["mobilenetv3_small_050", "lcnet_050"]  # sorted by FLOPs
    assert int(rows[0]["flops"]) < int(rows[1]["flops"]) and rows[0]["img_size"] == "32"


@pytest.mark.parametrize("case", ["missing", "wrong_csv", "empty", "header_only", "no_match", "bad_number", "bad_plot"])
def test_bad_input_is_one_line_and_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = write_results(tmp_path / "good.csv", [result("m", 100, 0.9)])
    args = {
        "missing": [tmp_path / "nope.csv"],
        "wrong_csv": [write_text(tmp_path / "other.csv", "epoch,loss\n1,0.5\n")],
        "empty": [write_text(tmp_path / "empty.csv", "")],
        "header_only": [write_results(tmp_path / "header.csv", [])],
        "no_match": [good, "--filter", "method=qat"],
        "bad_number": [write_results(tmp_path / "bad.csv", [result("m", "lots", 0.9)])],
        "bad_plot": [good, "--plot", tmp_path / "plot.xyz"],
    }[case]
    assert run_script("compare.py", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "plot.xyz").exists()


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_nan_or_blank_numbers_are_never_on_a_front_and_do_not_disturb_the_others(tmp_path: Path) -> None:
    rows = loaded([
        result("good", 200, 0.90, 2.0),
        result("nan_acc", 100, "nan", 1.0),        # would otherwise dominate nothing and sit on both fronts
        result("nan_flops", "NaN", 0.99, 9.0),     # still comparable on latency
        result("inf_latency", 250, 0.95, "inf"),   # an infinite cost is no cost to rank
        result("no_acc", 50, ""),
    ], tmp_path)
    assert pareto_front(rows, "flops") == [True, False, False, True, False]
    assert pareto_front(rows, "latency_ms_1t") == [True, False, True, False, False]
    assert frontier_labels(rows) == ["FLOPs+latency", "n/a", "latency", "FLOPs", "n/a"]
    assert [r["model"] for r in sort_rows(rows, "acc")] == ["nan_flops", "inf_latency", "good", "nan_acc", "no_acc"]
    assert [r["model"] for r in sort_rows(rows, "flops")] == ["no_acc", "nan_acc", "good", "inf_latency", "nan_flops"]
    assert [r["model"] for r in best_per(rows + [dict(rows[0], test_acc="nan", date="2027")], "best")][0] == "good"


def test_compare_warns_once_about_unranked_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_results(tmp_path / "r.csv", [result("good", 200, 0.9, 2.0), result("nan_acc", 100, "nan", 1.0),
                                              result("old", 300, 0.95)])  # a blank latency (older schema) is no warning
    assert run_script("compare.py", path) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.strip()]
    assert warnings == [f"warning: '{path}': 1 row(s) with a blank, NaN or infinite test_acc, flops or latency_ms_1t (line 3) "
                        "are not ranked where that number is needed (Pareto front 'n/a' when on no frontier); fix or delete them"]
    cells = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in captured.out.splitlines() if line.startswith("| ")}
    assert cells["nan_acc"] == "n/a" and cells["good"] == "FLOPs+latency" and cells["old"] == "FLOPs"


@pytest.mark.parametrize("damage, line, words", [
    ('x,"abc\n', 3, "a quote opened on this line is never closed"),
    ("x,y\n", 3, f"2 fields, the header has {len(COLUMNS)}"),
])
def test_damaged_results_file_is_one_error_naming_file_and_line(damage: str, line: int, words: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    path = write_results(tmp_path / "results.csv", [result("m", 100, 0.9)])
    path.write_text(path.read_text() + damage)
    table, merged = tmp_path / "table.md", tmp_path / "merged.csv"
    assert run_script("compare.py", tmp_path, "--markdown", table, "--csv", merged) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: results file '{path}' line {line}: {words}; fix or delete that line, or move the file away"
    assert captured.out == "" and not table.exists() and not merged.exists()


def operating_point(budget: float, recall: float, false_alarms: float, se: float) -> dict:
    return {"false_alarm_budget": budget, "threshold": 0.4321, "op_defect_recall": recall,
            "op_false_alarm_rate": false_alarms, "op_false_alarm_se": se}


def test_plot_recall_draws_rows_with_an_operating_point_and_leaves_out_older_ones(tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture) -> None:
    new = write_results(tmp_path / "new.csv", [
        result("lcnet_050", 46_000_000, 0.98, 3.0, **operating_point(0.05, 0.90, 0.04, 0.01)),
        result("lcnet_050", 46_000_000, 0.97, 1.5, method="qat", **operating_point(0.05, 0.975, 0.06, 0.012)),
        result("lcnet_050", 46_000_000, 0.98, 3.0, date="2026-02-01T00:00:00", **operating_point(0.01, 0.99, 0.008, 0.004)),
        result("tiny", 1_000_000, 0.6, 0.4, dataset="real", **operating_point(0.05, 0.5, 0.05, 0.02)),
        result("argmax_only", 2_000_000, 0.9, 1.0),  # new schema, operating-point columns blank
    ])
    old_columns = tuple(c for c in COLUMNS if c not in OPERATING_POINT_COLUMNS)
    old = write_results(tmp_path / "old.csv", [result("resnet18", 1_800_000_000, 0.99, 40.0)], columns=old_columns)
    plot = tmp_path / "recall.png"
    assert run_script("compare.py", new, old, "--plot-recall", plot) == 0
    captured = capsys.readouterr()
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    assert "--plot-recall: 2 of 6 row(s) have no operating point" in captured.out  # one info line for both
    assert captured.out.count("no operating point") == 1 and captured.err == ""
    cells = {(line.split("|")[1].strip(), line.split("|")[8].strip()): [c.strip() for c in line.split("|")[1:-1]]
             for line in captured.out.splitlines() if line.startswith("| ") and "Model Name" not in line}
    assert cells[("lcnet_050", "qat")][-6:-1] == ["5.0%", "0.4321", "97.50%", "6.00%", "1.20%"]
    assert cells[("resnet18", "fp32")][-6:-1] == [""] * 5  # the older row: blank, not an error

    rows = operating_point_rows(load_results([new, old]))
    groups = recall_groups(rows)
    assert [dataset for dataset, _ in groups] == ["real", "synthetic"]  # never one ranking across datasets
    assert [(r["method"], r["false_alarm_budget"]) for r in groups[1][1]] == [("fp32", "0.01"), ("qat", "0.05"), ("fp32", "0.05")]


def test_plot_recall_without_any_operating_point_is_one_error_before_writing(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    path = write_results(tmp_path / "r.csv", [result("m", 100, 0.9, 1.0)])
    table, plot = tmp_path / "table.md", tmp_path / "recall.png"
    assert run_script("compare.py", path, "--markdown", table, "--plot-recall", plot) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --plot-recall: none of the 1 row(s) has an op_defect_recall")
    assert len(captured.err.splitlines()) == 1 and captured.out == "" and not table.exists() and not plot.exists()

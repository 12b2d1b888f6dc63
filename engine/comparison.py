"""compare.py's engine: merge results.csv files, pick rows, mark Pareto frontiers, format and plot.

Rows stay the strings the CSV holds (so ``--csv`` writes them back unchanged); numbers are
parsed on demand. Frontiers and sorting never mix datasets: a synthetic-data accuracy says
nothing about the real StitchingNet, so each dataset is ranked on its own.
"""
from __future__ import annotations

import csv
import itertools
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

from data.stitchingnet import CLASSES  # noqa: E402
from models.factory import create_model, resolve_model  # noqa: E402
from models.stats import model_stats  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.io import atomic_open, atomic_path  # noqa: E402
from utils.results import COLUMNS, OPERATING_POINT_COLUMNS, read_results  # noqa: E402

log = logging.getLogger(__name__)


class CompareError(UserError):
    """A results file or option compare.py cannot use; the message says what to do."""


NUMERIC_COLUMNS = ("params", "flops", "flops_pct_mobilenetv1", "size_mb", "file_mb", "test_acc", "test_loss",
                   "macro_f1", "defect_recall", "latency_ms_1t") + OPERATING_POINT_COLUMNS
SORT_KEYS = {"flops": ("flops", False), "acc": ("test_acc", True), "latency": ("latency_ms_1t", False), "size": ("file_mb", False)}
FRONTIER_COSTS = {"FLOPs": "flops", "latency": "latency_ms_1t"}
FRONTIER_COLUMN = "Pareto front"
UNRANKED = "n/a"  # the frontier cell of a row that lacks the numbers to be ranked on any frontier


def number(row: dict, column: str) -> float | None:
    """The column's value as a float; None when blank or NaN/infinite, so such a value is never ranked or
    compared (NaN compares false both ways and would put its row on every frontier). load_results already
    rejected non-numbers."""
    text = (row.get(column) or "").strip()
    value = float(text) if text else math.nan
    return value if math.isfinite(value) else None


def _read_file(path: Path) -> list[dict]:
    """The file's rows, every schema column, stripped; parsed by the one strict reader of results files."""
    if path.is_dir():
        path = path / "results.csv"
    if not path.is_file():
        raise CompareError(f"results file '{path}' does not exist: pass a results.csv (by default runs/results.csv) or its folder")
    table = read_results(path)
    rows = [{column: row[column].strip() for column in COLUMNS} for row in table.rows]
    for line, row in zip(table.lines, rows):
        for column in NUMERIC_COLUMNS:
            try:
                number(row, column)
            except ValueError:
                raise CompareError(f"'{path}' line {line}: {column} '{row[column]}' is not a number; fix or delete that row") from None
    _warn_unranked(path, rows, table.lines)
    return rows


def _unusable(row: dict) -> bool:
    """Accuracy or FLOPs blank or not finite, or a latency given but not finite (older schemas have none)."""
    return (any(number(row, column) is None for column in ("test_acc", "flops"))
            or (row["latency_ms_1t"] != "" and number(row, "latency_ms_1t") is None))


def _warn_unranked(path: Path, rows: list[dict], lines: tuple[int, ...]) -> None:
    """One line per file, so a NaN row is noticed rather than silently left off the frontiers."""
    bad = [line for line, row in zip(lines, rows) if _unusable(row)]
    if bad:
        shown = ("lines " if len(bad) > 1 else "line ") + ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        log.warning("'%s': %d row(s) with a blank, NaN or infinite test_acc, flops or latency_ms_1t (%s) are not "
                    "ranked where that number is needed (%s '%s' when on no frontier); fix or delete them",
                    path, len(bad), shown, FRONTIER_COLUMN, UNRANKED)


def load_results(paths: Iterable[Path | str]) -> list[dict]:
    """Rows of all files in order; columns an older schema lacks are blank, repeated rows are kept once."""
    paths = [Path(p) for p in paths]
    merged, seen = [], set()
    for path in paths:
        for row in _read_file(path):
            key = tuple(row.values())
            if key not in seen:
                seen.add(key)
                merged.append(row)
    if not merged:
        raise CompareError(f"no result rows in {', '.join(map(str, paths))}: train or compress a model first (e.g. python main.py ...)")
    return merged


def parse_filters(filters: Iterable[str]) -> dict[str, str]:
    """``--filter key=value`` strings -> {column: value}; keys must be results columns."""
    parsed = {}
    for text in filters:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or key not in COLUMNS:
            raise CompareError(f"--filter '{text}': expected COLUMN=VALUE with a results column ({', '.join(COLUMNS)})")
        parsed[key] = value.strip()
    return parsed


def select_rows(rows: list[dict], filters: dict[str, str]) -> list[dict]:
    """Rows whose columns equal every filter value; no match at all is an error naming the filters."""
    kept = [row for row in rows if all(row[key] == value for key, value in filters.items())]
    if not kept:
        wanted = ", ".join(f"{k}={v}" for k, v in filters.items())
        raise CompareError(f"no row matches {wanted}; drop or change the filter (compare.py without it lists every row)")
    return kept


def best_per(rows: list[dict], mode: str) -> list[dict]:
    """One row per (model, method, dataset): the newest (``latest``) or the most accurate (``best``).

    Ties go to the later row in file order, i.e. the later append.
    """
    groups: dict[tuple, list[tuple[int, dict]]] = defaultdict(list)
    for index, row in enumerate(rows):
        groups[(row["model"], row["method"], row["dataset"])].append((index, row))
    if mode == "latest":
        def rank(item: tuple[int, dict]) -> tuple:
            return item[1]["date"], item[0]
    else:
        def rank(item: tuple[int, dict]) -> tuple:
            acc, loss = number(item[1], "test_acc"), number(item[1], "test_loss")
            return (acc if acc is not None else -1.0), -(loss if loss is not None else float("inf")), item[0]
    chosen = sorted((max(group, key=rank) for group in groups.values()), key=lambda item: item[0])
    return [row for _, row in chosen]


def pareto_front(rows: list[dict], cost: str, value: str = "test_acc") -> list[bool]:
    """Per row: is it on the (lower ``cost``, higher ``value``) frontier of its own dataset?

    A row is on the frontier when no row of the same dataset is at least as good on both axes
    and better on one. Rows missing either number are never on it.
    """
    points = [(row["dataset"], number(row, cost), number(row, value)) for row in rows]
    on_front = []
    for dataset, c, v in points:
        if c is None or v is None:
            on_front.append(False)
            continue
        dominated = any(d == dataset and oc is not None and ov is not None and oc <= c and ov >= v and (oc < c or ov > v)
                        for d, oc, ov in points)
        on_front.append(not dominated)
    return on_front


def frontier_labels(rows: list[dict]) -> list[str]:
    """Per row: which frontiers it is on, e.g. 'FLOPs+latency'; 'n/a' when it cannot be ranked on any."""
    fronts = {name: pareto_front(rows, cost) for name, cost in FRONTIER_COSTS.items()}
    labels = []
    for i, row in enumerate(rows):
        rankable = number(row, "test_acc") is not None and any(number(row, cost) is not None for cost in FRONTIER_COSTS.values())
        labels.append("+".join(name for name in fronts if fronts[name][i]) if rankable else UNRANKED)
    return labels


def sort_rows(rows: list[dict], key: str) -> list[dict]:
    """Group by dataset, then order by ``key`` (flops, acc, latency, size); blanks go last."""
    column, descending = SORT_KEYS[key]

    def order(row: dict) -> tuple:
        value = number(row, column)
        return row["dataset"], value is None, -(value or 0.0) if descending else (value or 0.0)
    return sorted(rows, key=order)


def _thousands(digits: int = 0) -> Callable[[float], str]:
    return lambda x: f"{x:,.{digits}f}"


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda x: f"{x:.{digits}f}"


def _percent(scale: float, digits: int) -> Callable[[float], str]:
    return lambda x: f"{x * scale:.{digits}f}%"


# (header, results column, number format or None for text) - the published seed table first, then ours.
RESULT_COLUMNS: tuple[tuple[str, str, Callable[[float], str] | None], ...] = (
    ("Model Name", "model", None),
    ("total FLOPs", "flops", _thousands()),
    ("FLOPs (% of MobileNetV1)", "flops_pct_mobilenetv1", _percent(1, 2)),
    ("Test Accuracy", "test_acc", _percent(100, 3)),
    ("Test Loss", "test_loss", _fixed(5)),
    ("model size(MB)", "size_mb", _fixed(4)),
    ("total params", "params", _thousands()),
    ("method", "method", None),
    ("dataset", "dataset", None),
    ("augment", "augment", None),
    ("img size", "img_size", None),
    ("file size(MB)", "file_mb", _fixed(4)),
    ("1-thread latency(ms)", "latency_ms_1t", _fixed(2)),
    ("macro F1", "macro_f1", _fixed(4)),
    ("defect recall", "defect_recall", _percent(100, 2)),
    # the operating point (blank in rows from before it): test figures at the threshold chosen on validation images
    ("FA budget", "false_alarm_budget", _percent(100, 1)),
    ("threshold", "threshold", _fixed(4)),
    ("op recall", "op_defect_recall", _percent(100, 2)),
    ("op false alarms", "op_false_alarm_rate", _percent(100, 2)),
    ("op FA SE", "op_false_alarm_se", _percent(100, 2)),
)
ZOO_COLUMNS = tuple(spec for spec in RESULT_COLUMNS
                    if spec[1] in ("model", "flops", "flops_pct_mobilenetv1", "size_mb", "params", "img_size"))


# The 40 timm models of the published StitchingNet-Finetuning results table (KimJunWon98/StitchingNet-Finetuning README).
SEED_MODELS = (
    "mobilenetv3_small_050", "lcnet_050", "repghostnet_050", "mobilenetv3_small_075", "mobilenetv3_small_100",
    "mobilenetv4_conv_small_050", "tinynet_e", "lcnet_075", "repghostnet_080", "tinynet_d", "mobilenetv2_050", "tinynet_c",
    "ghostnet_100", "repghostnet_100", "lcnet_100", "ghostnetv2_100", "mobilenetv4_conv_small", "mobilenetv3_rw",
    "mobilenetv3_large_100", "repghostnet_130", "mixnet_s", "ghostnetv2_130", "tinynet_b", "mnasnet_100", "mobilenetv2_100",
    "spnasnet_100", "mixnet_m", "ghostnetv2_160", "tinynet_a", "mobilenetv2_110d", "repghostnet_200", "mixnet_l",
    "mobilenetv1_100", "mobilenetv2_140", "mobilenetv2_120d", "mobilenetv3_large_150d", "mobilenetv4_conv_medium",
    "mixnet_xl", "mobilenetv4_hybrid_medium", "resnet18",
)


def zoo_rows(names: str, img_size: int) -> list[dict]:
    """Static cost rows (no training) for comma-separated model names or ``seed``: main.py --stats-only's numbers."""
    wanted = list(SEED_MODELS) if names.strip() == "seed" else [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise CompareError("--zoo needs model names, e.g. --zoo lcnet_050,mobilenetv3_small_050, or --zoo seed")
    specs = [resolve_model(name) for name in wanted]  # every name checked before the slow counting starts
    rows = []
    for spec in specs:
        model, _ = create_model(spec, len(CLASSES), pretrained=False)
        stats = model_stats(model, img_size, len(CLASSES))
        rows.append({**dict.fromkeys(COLUMNS, ""), "model": spec.name, "alpha": "" if spec.alpha is None else str(spec.alpha),
                     "img_size": str(img_size), **{key: str(value) for key, value in stats.items()}})
    return rows


def table_cells(rows: list[dict], columns=RESULT_COLUMNS, extra: dict[str, list[str]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells; ``extra`` appends ready-made columns (e.g. the Pareto marks)."""
    header = [name for name, _, _ in columns] + list(extra or {})
    cells = []
    for i, row in enumerate(rows):
        line = []
        for _, column, fmt in columns:
            value = number(row, column) if fmt else None
            line.append(fmt(value) if value is not None else row.get(column, ""))
        cells.append(line + [values[i] for values in (extra or {}).values()])
    return header, cells


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    """Aligned GitHub markdown: text columns left, number columns right, readable as plain text too."""
    numeric = [all(_looks_numeric(r[i]) for r in cells if r[i]) and any(r[i] for r in cells) for i in range(len(header))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else (":" + "-" * (w + 1)) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in cells]) + "\n"


def _looks_numeric(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("%"))
        return True
    except ValueError:
        return False


def write_text(path: Path | str, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


def write_csv(path: Path | str, rows: list[dict]) -> None:
    """The selected rows in the results schema, so the file feeds compare.py again."""
    with atomic_open(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# (results column, panel title, axis label)
PLOT_COSTS = (("flops", "total FLOPs", "total FLOPs (log)"), ("latency_ms_1t", "1-thread latency", "1-thread CPU latency, ms (log)"),
              ("file_mb", "file size", "file size, MB (log)"))


def point_label(row: dict) -> str:
    return row["model"] if row["method"] in ("", "fp32") else f"{row['model']} ({row['method']})"


def plot_format(path: Path | str, flag: str = "--plot") -> str:
    """matplotlib's format name for the file's suffix; checked before anything is written."""
    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in FigureCanvasBase.get_supported_filetypes():
        raise CompareError(f"{flag} '{path}': unknown image type '.{fmt}'; use .png, .svg or .pdf")
    return fmt


def plot_pareto(rows: list[dict], path: Path | str) -> None:
    """Accuracy against FLOPs, latency and file size: one row of panels per dataset, one marker per method,
    frontier points joined and labelled, log-scale cost axes."""
    path = Path(path)
    fmt = plot_format(path)
    datasets = sorted({row["dataset"] for row in rows})
    methods = sorted({row["method"] for row in rows})
    markers = dict(zip(methods, itertools.cycle("os^Dv<>pPX*h")))
    colours = dict(zip(methods, itertools.cycle(plt.get_cmap("tab10").colors)))
    fig, axes = plt.subplots(len(datasets), len(PLOT_COSTS), figsize=(6 * len(PLOT_COSTS), 4.8 * len(datasets)), squeeze=False)
    for axes_row, dataset in zip(axes, datasets):
        subset = [row for row in rows if row["dataset"] == dataset]
        for ax, (cost, title, label) in zip(axes_row, PLOT_COSTS):
            _plot_panel(ax, subset, cost, markers, colours)
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{dataset or 'unknown'} data: accuracy vs {title}", fontsize=10)
    handles = [plt.Line2D([], [], linestyle="", marker=markers[m], color=colours[m], label=m or "?") for m in methods]
    handles.append(plt.Line2D([], [], color="grey", linestyle="--", label="Pareto front"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.06 / len(datasets)))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110)
    plt.close(fig)


def _plot_panel(ax, rows: list[dict], cost: str, markers: dict, colours: dict) -> None:
    points = [(row, number(row, cost), number(row, "test_acc")) for row in rows]
    points = [(row, x, 100 * y) for row, x, y in points if x is not None and x > 0 and y is not None]
    if not points:
        ax.text(0.5, 0.5, f"no rows with {cost}", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    for method in sorted({row["method"] for row, _, _ in points}):
        xs, ys = zip(*((x, y) for row, x, y in points if row["method"] == method))
        ax.scatter(xs, ys, marker=markers[method], color=colours[method], s=36, alpha=0.85, zorder=3)
    on_front = pareto_front([row for row, _, _ in points], cost)
    front = sorted((x, y, point_label(row)) for (row, x, y), keep in zip(points, on_front) if keep)
    ax.plot([x for x, _, _ in front], [y for _, y, _ in front], color="grey", linestyle="--", linewidth=1,
            drawstyle="steps-post", zorder=2)
    for i, (x, y, text) in enumerate(front):  # alternate above/below so neighbouring labels do not overprint
        ax.annotate(text, (x, y), xytext=(5, 7 if i % 2 == 0 else -13), textcoords="offset points", fontsize=7,
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.75}, zorder=4)
    ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.25)


def operating_point_rows(rows: list[dict]) -> list[dict]:
    """The rows --plot-recall can draw: those with a test defect recall at an operating point. Older rows (and
    argmax-only ones) are left out with one info line; none at all is an error, raised before anything is written."""
    kept = [row for row in rows if number(row, "op_defect_recall") is not None]
    if not kept:
        raise CompareError(f"--plot-recall: none of the {len(rows)} row(s) has an op_defect_recall (rows from before "
                           "operating points, or a split without defective images); train with --false-alarm-budget "
                           "or drop --plot-recall")
    if len(kept) < len(rows):
        log.info("--plot-recall: %d of %d row(s) have no operating point (no op_defect_recall: older results) and are "
                 "left out", len(rows) - len(kept), len(rows))
    return kept


def recall_label(row: dict) -> str:
    """'model (method), budget 5%': rows with different budgets are different operating points of one model."""
    budget = number(row, "false_alarm_budget")
    return point_label(row) + (f", budget {100 * budget:g}%" if budget is not None else "")


def plot_recall(rows: list[dict], path: Path | str) -> None:
    """Per dataset, test defect recall at the operating point (bars) beside its false-alarm rate (± SE) and budget.

    ``rows`` come from operating_point_rows. Each dataset is its own pair of panels (recall_groups' order): a recall
    bought with a larger budget is listed apart from one within a smaller budget.
    """
    path = Path(path)
    fmt = plot_format(path, "--plot-recall")
    groups = recall_groups(rows)
    heights = [1.6 + 0.32 * len(group) for _, group in groups]
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, sum(heights)), squeeze=False, sharey="row",
                             gridspec_kw={"height_ratios": heights, "width_ratios": (3, 2)})
    for (recall_ax, alarm_ax), (dataset, group) in zip(axes, groups):
        _recall_panel(recall_ax, group)
        _false_alarm_panel(alarm_ax, group)
        recall_ax.set_title(f"{dataset or 'unknown'} data: defect recall at the operating point", fontsize=10)
        alarm_ax.set_title(f"{dataset or 'unknown'} data: false alarms at it (budget: grey bar)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110)
    plt.close(fig)


def recall_groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(dataset, its rows) in dataset order; within one, by budget (blank last) and then recall, best first."""
    def order(row: dict) -> tuple:
        budget = number(row, "false_alarm_budget")
        return budget is None, budget or 0.0, -(number(row, "op_defect_recall") or 0.0)
    return [(dataset, sorted((row for row in rows if row["dataset"] == dataset), key=order))
            for dataset in sorted({row["dataset"] for row in rows})]


def _recall_panel(ax, rows: list[dict]) -> None:
    positions = range(len(rows))
    recalls = [100 * (number(row, "op_defect_recall") or 0.0) for row in rows]
    ax.barh(positions, recalls, color="tab:red", alpha=0.75, height=0.6)
    for y, value in zip(positions, recalls):
        ax.text(min(value, 100) + 1, y, f"{value:.1f}%", va="center", fontsize=7)
    ax.set_yticks(list(positions), [recall_label(row) for row in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top; fixed limits keep a lone bar as thin as the others
    ax.set_xlim(0, 112)  # room for the value labels
    ax.set_xlabel("test defect recall at the threshold (%)")
    ax.grid(True, axis="x", alpha=0.25)


def _false_alarm_panel(ax, rows: list[dict]) -> None:
    """The test false-alarm rate with its binomial SE, and the budget it was chosen for on validation images."""
    for y, row in enumerate(rows):
        rate, se, budget = (number(row, column) for column in ("op_false_alarm_rate", "op_false_alarm_se", "false_alarm_budget"))
        if budget is not None:
            ax.plot(100 * budget, y, marker="|", markersize=14, markeredgewidth=3, color="grey", alpha=0.6, zorder=2)
        if rate is not None:
            ax.errorbar(100 * rate, y, xerr=None if se is None else 100 * se, fmt="o", color="tab:blue", capsize=3, zorder=3)
    ax.set_xlim(left=0)
    ax.set_xlabel("test false-alarm rate at the threshold (%), ± SE")
    ax.grid(True, axis="x", alpha=0.25)

"""One table of accuracy against cost across every run and compression method, with Pareto frontiers.

Results:  python compare.py runs/results.csv more/results.csv --best-per best --markdown table.md --plot pareto.png
Recall:   python compare.py runs/results.csv --plot-recall recall.png   (defect recall at each run's operating point)
Zoo:      python compare.py --zoo seed --img-size 224        (static costs of the published table's 40 models)
"""
from __future__ import annotations

import argparse
import logging

from engine.comparison import (
    FRONTIER_COLUMN,
    RESULT_COLUMNS,
    SORT_KEYS,
    UNRANKED,
    ZOO_COLUMNS,
    CompareError,
    best_per,
    frontier_labels,
    load_results,
    markdown_table,
    operating_point_rows,
    parse_filters,
    plot_format,
    plot_pareto,
    plot_recall,
    select_rows,
    sort_rows,
    table_cells,
    write_csv,
    write_text,
    zoo_rows,
)
from engine.config import DEFAULT_IMG_SIZE, refuse
from utils.cli import positive_int, run_cli

log = logging.getLogger(__name__)

FRONTIER_NOTE = (f"{FRONTIER_COLUMN}: no row of the same dataset is both cheaper (FLOPs / 1-thread latency) and at least as "
                 f"accurate; datasets are sorted and ranked separately; {UNRANKED}: a blank, NaN or infinite accuracy or cost, not ranked.")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Merge results.csv files into one accuracy-vs-cost table (the published StitchingNet-Finetuning "
                    "columns plus method, dataset, file size, latency, macro F1, defect recall, operating point), mark the Pareto "
                    "frontiers, write markdown/CSV and plots; or list static model costs with --zoo.",
        epilog="Example: python compare.py runs/results.csv --dataset synthetic --best-per best --markdown table.md --plot pareto.png",
    )
    parser.add_argument("results", nargs="*", metavar="RESULTS_CSV",
                        help="results.csv files (or run output folders holding one) to merge")
    parser.add_argument("--zoo", metavar="MODELS",
                        help="no results needed: print FLOPs, %% of MobileNetV1, params and size of comma-separated "
                             "models, or 'seed' for the 40 models of the published StitchingNet-Finetuning table")
    parser.add_argument("--img-size", type=positive_int, default=DEFAULT_IMG_SIZE,
                        help="with --zoo: input size the FLOPs are counted at (default: %(default)s)")
    parser.add_argument("--sort", choices=SORT_KEYS, default="flops",
                        help="order within each dataset: flops, acc (best first), latency (1-thread) or size (file) "
                             "(default: %(default)s)")
    parser.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE",
                        help="keep rows whose results column equals VALUE, e.g. method=qat or augment=2 (repeatable)")
    parser.add_argument("--dataset", help="keep only rows of this dataset (real, synthetic, synthetic-zoom2 ...)")
    parser.add_argument("--best-per", choices=("latest", "best"),
                        help="one row per model + method + dataset: the newest, or the most accurate")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as GitHub markdown")
    parser.add_argument("--csv", metavar="FILE", help="write the shown rows in the results.csv schema")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="plot accuracy vs FLOPs, 1-thread latency and file size (one row of panels per dataset)")
    parser.add_argument("--plot-recall", metavar="FILE.png",
                        help="plot each row's test defect recall at its operating point beside its false-alarm rate "
                             "(± SE) and budget, one pair of panels per dataset; rows without one are left out")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """--zoo lists static costs; the other flags select, order and plot results rows: one error line for a mix."""
    if args.zoo is None:
        refuse(args.explicit, {"img_size": "the input size of --zoo's FLOPs: add --zoo MODELS, or drop it"})
        return
    if args.results or args.plot or args.plot_recall:
        raise CompareError("--zoo lists static costs only: drop the results files, --plot and --plot-recall, or drop --zoo")
    refuse(args.explicit, dict.fromkeys(("sort", "filter", "dataset", "best_per"),
                                        "selects and orders results rows, which --zoo does not read: drop it"))


def main(args: argparse.Namespace) -> None:
    if args.plot:
        plot_format(args.plot)
    if args.plot_recall:
        plot_format(args.plot_recall, "--plot-recall")
    check_flags(args)
    if args.zoo is not None:
        rows = sort_rows(zoo_rows(args.zoo, args.img_size), "flops")
        header, cells = table_cells(rows, ZOO_COLUMNS)
        note = "FLOPs: fvcore, batch 1, 11 classes (same code as main.py --stats-only); size: FP32 params x 4 B."
    else:
        if not args.results:
            raise CompareError("give one or more results.csv files (e.g. runs/results.csv), or --zoo MODELS")
        filters = parse_filters(args.filter)
        if args.dataset:
            filters["dataset"] = args.dataset
        rows = load_results(args.results)
        if filters:
            rows = select_rows(rows, filters)
        if args.best_per:
            rows = best_per(rows, args.best_per)
        rows = sort_rows(rows, args.sort)
        recall_rows = operating_point_rows(rows) if args.plot_recall else []
        header, cells = table_cells(rows, RESULT_COLUMNS, extra={FRONTIER_COLUMN: frontier_labels(rows)})
        note = FRONTIER_NOTE
    table = markdown_table(header, cells)
    print(table + "\n" + note)
    if args.markdown:
        write_text(args.markdown, table + "\n" + note + "\n")
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        plot_pareto(rows, args.plot)
    if args.plot_recall:
        plot_recall(recall_rows, args.plot_recall)
    written = [path for path in (args.markdown, args.csv, args.plot, args.plot_recall) if path]
    if written:
        log.info("wrote %s", ", ".join(written))


if __name__ == "__main__":
    run_cli(main, get_args_parser())

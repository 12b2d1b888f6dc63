"""Which exported artifact to deploy, measured on the device itself: speed *and* correctness.

Finds every artifact in an export folder that this machine can run (ONNX Runtime FP32/INT8, OpenVINO FP32/INT8 where
openvino is installed, NCNN), times each at batch 1 (1 thread and all threads, after warm-up: median, p90, FPS) and
scores each on the held-out test images export.py wrote beside them (device_test.npz): accuracy, and defect recall
and false alarms at the artifact's stored threshold. Prints one table and writes device.csv and device.md. Needs
neither torch nor timm (requirements-edge.txt):

    python benchmarks/device.py runs/export/<run>
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import logging
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.edge import all_threads, cpu_name  # noqa: E402
from deploy.on_device import COLUMNS, DEVICE_SET, find_artifacts, load_device_set, measure, write_reports  # noqa: E402
from utils.cli import non_negative_int, positive_int, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.results import print_table  # noqa: E402

log = logging.getLogger(__name__)
RUNTIMES = ("onnxruntime", "openvino", "ncnn")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Example: python benchmarks/device.py runs/export/<run> --runs 200")
    parser.add_argument("folder", type=Path, help="an export folder of export.py (the artifacts and device_test.npz)")
    parser.add_argument("--runs", type=positive_int, default=100, help="timed batch-1 calls per artifact and thread count "
                                                                       "(default: %(default)s)")
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="untimed calls before them (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="folder for device.csv and device.md (default: FOLDER)")
    return parser


def versions() -> str:
    found = []
    for package in RUNTIMES:
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def main(args: argparse.Namespace) -> None:
    if not args.folder.is_dir():
        raise UserError(f"'{args.folder}' is not a folder: pass an export folder of export.py (runs/export/<run>)")
    held_out = load_device_set(args.folder / DEVICE_SET)
    artifacts = find_artifacts(args.folder)
    if not artifacts:
        raise UserError(f"no artifact in '{args.folder}' that this machine can run (.onnx, .ncnn.param, or .xml with openvino)")
    log.info("%d artifacts, %d held-out images, %d runs each at 1 and %d threads, interleaved ...", len(artifacts), len(held_out.images),
             args.runs, all_threads())
    rows = measure(artifacts, held_out, args.runs, args.warmup)
    print_table(rows, COLUMNS)
    out = args.out or args.folder
    context = (f"{len(held_out.images)} held-out test images at {held_out.images.shape[1]} px; batch-1 latency over {args.runs} "
               f"runs after {args.warmup} warm-up, interleaved in rounds (ms_1t: 1 thread, ms_all: {all_threads()} threads); "
               f"CPU {cpu_name()} ({platform.machine()}), {all_threads()} logical cores; {versions()}; {dt.date.today().isoformat()}")
    write_reports(rows, out / "device.csv", out / "device.md", context)
    log.info("written to %s and device.md", out / "device.csv")


if __name__ == "__main__":
    run_cli(main, get_args_parser())

"""Time every checkpoint under a runs folder in one process, so their latencies compare fairly.

Latencies in results.csv are measured by the script that made each row, minutes or hours apart; on a
shared machine they disagree by more than the differences between models. This loads each best.pt
(main, prune, distill) and INT8 file (quantization) under RUNS and times them back to back, twice:

    python benchmarks/checkpoint_latency.py runs --img-size 64 --threads 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.factory import model_from_checkpoint  # noqa: E402
from models.quantize_pt2e import load_int8  # noqa: E402
from models.stats import measure_latency  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.cli import positive_int, run_cli  # noqa: E402


def checkpoints(runs: Path) -> list[tuple[str, Path]]:
    """(label, path) of each FP32 best.pt and INT8 model under ``runs``, in a stable order."""
    found = [(f"{p.parent.parent.name}/{p.parent.name}", p) for p in sorted(runs.glob("*/*/best.pt"))]
    found += [(f"quantization/{p.parent.name}/{p.stem}", p) for p in sorted(runs.glob("quantization/*/int8_*.pt"))
              if not p.name.endswith(".torchscript.pt")]
    return found


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="an --output-dir of the toolkit's scripts")
    parser.add_argument("--img-size", type=positive_int, default=224, help="input size (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1, help="intra-op threads (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=300, help="timed calls per model (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    items = checkpoints(args.runs)
    if not items:
        sys.exit(f"error: no best.pt or int8_*.pt under '{args.runs}': pass a folder the scripts wrote to")
    print("| checkpoint | pass 1 ms | pass 2 ms |\n|---|---|---|")
    for label, path in items:
        model = load_int8(path) if path.name.startswith("int8_") else model_from_checkpoint(load_checkpoint(path))
        first, second = (measure_latency(model, args.img_size, args.threads, args.repeats, warmup=30) for _ in range(2))
        print(f"| {label} | {first:.2f} | {second:.2f} |", flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser())

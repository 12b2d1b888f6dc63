"""CPU latency and throughput of every artifact of one checkpoint, in one process, on the same inputs."""
from __future__ import annotations

import csv
import logging
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from deploy.edge import all_threads
from models.stats import time_runs
from utils.io import atomic_open

log = logging.getLogger(__name__)

# name -> builder(threads) returning the model to time; builders set their own thread count
ArtifactBuilders = dict[str, Callable[[int], torch.nn.Module]]


@dataclass
class Timing:
    artifact: str
    median_ms_1t: float
    p90_ms_1t: float
    median_ms_all: float
    p90_ms_all: float
    throughput_b32: float  # images/s at batch 32, all threads
    speedup_1t: float  # PyTorch eager FP32 median / this median, batch 1, 1 thread


def _at_threads(build: Callable[[int], torch.nn.Module], threads: int) -> torch.nn.Module:
    torch.set_num_threads(threads)  # PyTorch artifacts; ONNX Runtime sessions take the count in build()
    return build(threads)


def benchmark(builders: ArtifactBuilders, img_size: int, runs: int = 200, warmup: int = 20, batch_runs: int = 10,
              seed: int = 0) -> list[Timing]:
    """Batch-1 median/p90 at 1 and all threads and batch-32 throughput; the first builder is the speed-up baseline."""
    generator = torch.Generator().manual_seed(seed)
    single = torch.randn(1, 3, img_size, img_size, generator=generator)
    batch = torch.randn(32, 3, img_size, img_size, generator=generator)
    previous = torch.get_num_threads()
    results = []
    try:
        for name, build in builders.items():
            one = time_runs(_at_threads(build, 1), single, runs, warmup)
            model = _at_threads(build, all_threads())
            many = time_runs(model, single, runs, warmup)
            batched = time_runs(model, batch, batch_runs, 2)
            median_1t = statistics.median(one) * 1000
            baseline = results[0].median_ms_1t if results else median_1t
            results.append(Timing(
                name, round(median_1t, 3), round(float(np.percentile(one, 90)) * 1000, 3),
                round(statistics.median(many) * 1000, 3), round(float(np.percentile(many, 90)) * 1000, 3),
                round(32 / statistics.median(batched), 1), round(baseline / median_1t, 2),
            ))
            log.info("  %s: %.3f ms at 1 thread", name, median_1t)
    finally:
        torch.set_num_threads(previous)
    return results


HEADERS = ("artifact", "batch-1 median ms (1 thread)", "batch-1 p90 ms (1 thread)", f"batch-1 median ms ({all_threads()} threads)",
           f"batch-1 p90 ms ({all_threads()} threads)", f"batch-32 images/s ({all_threads()} threads)", "speed-up vs eager FP32 (1 thread)")


def _cells(timings: list[Timing]) -> list[list[str]]:
    return [[str(v) for v in asdict(t).values()] for t in timings]


def format_table(timings: list[Timing]) -> str:
    cells = _cells(timings)
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_reports(timings: list[Timing], csv_path: Path, markdown_path: Path, context: str) -> None:
    """CSV (one row per artifact) and a markdown table headed by ``context`` (model, size, machine)."""
    with atomic_open(csv_path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(asdict(timings[0])))
        writer.writerows(_cells(timings))
    with atomic_open(markdown_path) as handle:
        handle.write(f"{context}\n\n| {' | '.join(HEADERS)} |\n|{'---|' * len(HEADERS)}\n")
        handle.writelines(f"| {' | '.join(row)} |\n" for row in _cells(timings))

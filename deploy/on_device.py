"""Which exported artifact is fastest *and still right* on this device: every artifact of an export folder that
this machine can run, timed at batch 1 and scored on the held-out test images export.py wrote beside them
(benchmarks/device.py). Torch-free: it runs from requirements-edge.txt alone.

The held-out set (``device_test.npz``) holds test-split images as the evaluation decodes them (uint8 RGB, resized
to the model's input) with their labels; each artifact normalises them with its own stored mean/std, exactly as
predict.py does, and is judged at its own stored defect threshold.
"""
from __future__ import annotations

import csv
import functools
import importlib
import importlib.util
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deploy.edge import EdgeModelError, ExportedClassifier, all_threads
from utils.io import atomic_open, atomic_path
from utils.operating_point import flag_defects

log = logging.getLogger(__name__)

DEVICE_SET = "device_test.npz"
SCORING_BATCH = 32
ROUNDS = 10  # the timed calls of every artifact are spread over this many rounds (time_interleaved)


@dataclass(frozen=True)
class DeviceSet:
    """Held-out test images (uint8 RGB [N, size, size, 3]) with their labels (indices into ``class_names``)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]


def save_device_set(path: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, images=np.asarray(images, np.uint8), labels=np.asarray(labels, np.int64), class_names=np.array(class_names))


def load_device_set(path: Path) -> DeviceSet:
    """The held-out set at ``path``; EdgeModelError (one line) for a missing or damaged file."""
    if not path.is_file():
        raise EdgeModelError(f"'{path}' does not exist: export.py writes it beside the artifacts (--device-images N, N > 0)")
    try:
        with np.load(path, allow_pickle=False) as stored:
            images, labels, names = stored["images"], stored["labels"], [str(name) for name in stored["class_names"]]
    except (OSError, ValueError, KeyError) as error:  # np.load's ways of refusing a file that is not this npz
        raise EdgeModelError(f"'{path}' is not a held-out set written by export.py ({type(error).__name__}: "
                             f"{str(error).strip().splitlines()[0] if str(error).strip() else 'unreadable'})") from None
    if not (images.ndim == 4 and images.shape[3] == 3 and images.dtype == np.uint8 and labels.shape == (len(images),)
            and len(images) and labels.min() >= 0 and labels.max() < len(names)):
        raise EdgeModelError(f"'{path}' is damaged (images {images.shape} {images.dtype}, labels {labels.shape}, "
                             f"{len(names)} classes): export again")
    return DeviceSet(images, labels, names)


# artifact name ending -> (format, module, classifier class, package the runtime needs); first match wins
FORMATS = (
    (".ncnn.param", "ncnn-fp32", "deploy.ncnn_runtime", "NcnnClassifier", "ncnn"),
    (".int8.onnx", "onnxruntime-int8", "deploy.edge", "EdgeClassifier", "onnxruntime"),
    (".onnx", "onnxruntime-fp32", "deploy.edge", "EdgeClassifier", "onnxruntime"),
    (".int8.xml", "openvino-int8", "deploy.openvino_runtime", "OpenVinoClassifier", "openvino"),
    (".xml", "openvino-fp32", "deploy.openvino_runtime", "OpenVinoClassifier", "openvino"),
)
NEEDS_TORCH = (".torchscript.pt",)


@dataclass(frozen=True)
class Artifact:
    format: str
    path: Path
    open: Callable[[Path, int], ExportedClassifier]

    def size_bytes(self) -> int:
        """The model's files on disk: the graph and, for OpenVINO and NCNN, the .bin beside it."""
        weights = self.path.with_suffix(".bin")
        return self.path.stat().st_size + (weights.stat().st_size if self.path.suffix in (".xml", ".param") else 0)


def find_artifacts(folder: Path) -> list[Artifact]:
    """Every artifact in ``folder`` this machine can run (its runtime is installed), in a stable order; the others
    are named in one info line each."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.endswith(NEEDS_TORCH):
            log.info("skipped %s: TorchScript needs torch, which the device path does not install", path.name)
            continue
        match = next((entry for entry in FORMATS if path.name.endswith(entry[0])), None)
        if match is None:
            continue
        _, name, module, cls, package = match
        if importlib.util.find_spec(package) is None:
            log.info("skipped %s: %s is not installed here", path.name, package)
            continue
        found.append(Artifact(name, path, getattr(importlib.import_module(module), cls)))
    return found


def time_interleaved(calls: list[Callable[[], object]], runs: int, warmup: int) -> list[list[float]]:
    """Milliseconds per call of each of ``calls``, ``runs`` each after ``warmup`` untimed ones, in ROUNDS rounds that
    visit every call in turn: a machine that slows down meanwhile (another job, a Pi warming up and throttling) slows
    every artifact alike instead of the ones measured last."""
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for share in np.array_split(np.arange(runs), min(ROUNDS, runs)):
        for call, measured in zip(calls, times):
            for _ in share:
                start = time.perf_counter()
                call()
                measured.append((time.perf_counter() - start) * 1000)
    return times


def scores(classifier: ExportedClassifier, held_out: DeviceSet) -> dict[str, float]:
    """Accuracy (argmax), and defect recall and false-alarm rate of the device's verdicts at the artifact's stored
    threshold (argmax verdicts for an artifact without one), on the held-out images."""
    probs = np.concatenate([classifier(held_out.images[i:i + SCORING_BATCH]) for i in range(0, len(held_out.images), SCORING_BATCH)])
    accuracy = float((probs.argmax(axis=1) == held_out.labels).mean())
    if classifier.normal is None:  # no Normal class: nothing is a defect verdict
        return {"accuracy": accuracy, "defect_recall": float("nan"), "false_alarms": float("nan"), "threshold": float("nan")}
    point = classifier.operating_point
    flagged = flag_defects(probs, classifier.normal, point.threshold if point else None)[1]
    defective = held_out.labels != classifier.normal
    return {"accuracy": accuracy,
            "defect_recall": float(flagged[defective].mean()) if defective.any() else float("nan"),
            "false_alarms": float(flagged[~defective].mean()) if (~defective).any() else float("nan"),
            "threshold": point.threshold if point else float("nan")}


def open_checked(artifact: Artifact, held_out: DeviceSet, threads: int) -> ExportedClassifier:
    """The artifact's classifier at ``threads`` threads, refused (one line) if the held-out set is not for its classes/size."""
    classifier = artifact.open(artifact.path, threads)
    if classifier.info["class_names"] != held_out.class_names:
        raise EdgeModelError(f"'{artifact.path}' classifies {classifier.info['class_names']}, the held-out set is labelled "
                             f"{held_out.class_names}: benchmark the export folder the set was written to")
    if classifier.info["img_size"] != held_out.images.shape[1]:
        raise EdgeModelError(f"'{artifact.path}' takes {classifier.info['img_size']} px images, the held-out set holds "
                             f"{held_out.images.shape[1]} px ones: benchmark the export folder the set was written to")
    return classifier


def measure(artifacts: list[Artifact], held_out: DeviceSet, runs: int, warmup: int) -> list[dict]:
    """One table row per artifact: its size, batch-1 latency of the model call (the same numpy normalisation before it
    for every format is left out) at 1 and at all threads, interleaved, and its figures on the held-out set."""
    rows = [{"format": a.format, "file": a.path.name, "mb": round(a.size_bytes() / 2**20, 3), "images": len(held_out.images)}
            for a in artifacts]
    for threads, suffix in ((1, "1t"), (all_threads(), "all")):
        classifiers = [open_checked(artifact, held_out, threads) for artifact in artifacts]
        calls = [functools.partial(c.infer, c.prepare(held_out.images[:1])) for c in classifiers]
        for row, times in zip(rows, time_interleaved(calls, runs, warmup)):
            median = statistics.median(times)
            row |= {f"ms_{suffix}": round(median, 3), f"p90_ms_{suffix}": round(float(np.percentile(times, 90)), 3),
                    f"fps_{suffix}": round(1000 / median, 1)}
    for row, classifier in zip(rows, classifiers):
        row |= {key: round(value, 6) for key, value in scores(classifier, held_out).items()}  # as results.csv rounds them
        log.info("  %s: accuracy %.4f, %.3f ms at 1 thread", row["format"], row["accuracy"], row["ms_1t"])
    return rows


COLUMNS = ("format", "file", "mb", "images", "accuracy", "defect_recall", "false_alarms", "threshold", "ms_1t", "p90_ms_1t",
           "fps_1t", "ms_all", "p90_ms_all", "fps_all")


def write_reports(rows: list[dict], csv_path: Path, markdown_path: Path, context: str) -> None:
    """CSV (one row per artifact) and a markdown table headed by ``context`` (machine, threads, set, date)."""
    with atomic_open(csv_path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_open(markdown_path) as handle:
        handle.write(f"{context}\n\n| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}\n")
        handle.writelines(f"| {' | '.join(str(row[column]) for column in COLUMNS)} |\n" for row in rows)

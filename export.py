"""Export a checkpoint for edge CPUs: ONNX (FP32), ONNX Runtime static INT8, OpenVINO IR (FP32, NNCF INT8), NCNN
(FP32), TorchScript; benchmark every artifact.

    python export.py --checkpoint runs/main/<run>/best.pt --int8 --openvino --torchscript --benchmark

Every exported file is checked against PyTorch (max |logit difference| printed; gated for FP32), gets its own defect
threshold chosen on the checkpoint's validation split through its runtime (--false-alarm-budget; INT8 shifts scores)
stored in its metadata, is scored on the test split, and recorded in results.csv (method onnx-fp32 / onnx-int8 /
openvino-fp32 / openvino-int8 / ncnn-fp32). Held-out test images go beside them (device_test.npz) for
benchmarks/device.py, which times and scores the artifacts on the device itself.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.metadata
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.loading import DataBundle, make_loader
from data.transforms import Preprocess
from deploy.edge import all_threads, cpu_name
from deploy.formats import ExportJob, Format, selected_formats
from deploy.on_device import DEVICE_SET, save_device_set
from deploy.onnx_export import check_parity
from deploy.timing import benchmark, format_table, write_reports
from engine.config import RunConfig, refuse, resolve
from engine.flags import add_data_args, add_run_args
from engine.loop import evaluate
from engine.run import Result, choose_threshold_on_val, create_run_dir, log_test_row, prepare_data, record
from models.factory import model_from_checkpoint
from models.int8 import check_calibration
from models.stats import model_stats, time_runs
from utils.checkpoint import CheckpointError, check_zip_records, load_checkpoint
from utils.cli import non_negative_float, non_negative_int, positive_int, run_cli
from utils.description import RunDescription
from utils.distributed import Runtime
from utils.errors import UserError
from utils.io import save_json
from utils.results import print_table

log = logging.getLogger(__name__)

CPU = Runtime(torch.device("cpu"))  # every artifact is scored where it runs: on the CPU
PARITY_IMAGES = 16
RESULT_LATENCY_RUNS = 100


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a checkpoint to ONNX (opset 18, dynamic batch axis, input 'input' [N,3,H,W] normalised "
                    "float32, output 'logits' [N,classes]), optionally ONNX Runtime INT8, OpenVINO IR (FP32, INT8) and "
                    "TorchScript, and benchmark them.",
        epilog="Example: python export.py --checkpoint runs/main/<run>/best.pt --int8 --openvino --torchscript --benchmark",
    )
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="best.pt of a main.py, prune.py or distill.py run (the FP32 weights; a QAT model's INT8 "
                             "TorchScript file goes to --torch-int8)")
    parser.add_argument("--out", metavar="FILE.onnx",
                        help="FP32 ONNX path; INT8 goes to <stem>.int8.onnx, OpenVINO to <stem>.xml/.bin and <stem>.int8.xml/.bin, "
                             "NCNN to <stem>.ncnn.param/.bin/.json, TorchScript to <stem>.torchscript.pt "
                             "(default: <output-dir>/export/<timestamp>_<model>/model.onnx)")
    parser.add_argument("--int8", action="store_true",
                        help="also write an ONNX Runtime static INT8 model (QDQ, per-channel weights, calibrated on training images); "
                             "with --openvino also an OpenVINO INT8 model (NNCF post-training quantisation, same images)")
    parser.add_argument("--openvino", action="store_true",
                        help="also write an OpenVINO IR FP32 model converted from the ONNX file (deploy info in its rt_info; "
                             "for predict.py/stream.py --openvino)")
    parser.add_argument("--calibration-images", type=positive_int, default=200, metavar="N",
                        help="training-split images used to calibrate INT8 activation ranges (default: %(default)s)")
    parser.add_argument("--max-drop", type=non_negative_float, metavar="POINTS",
                        help="with --openvino --int8: make the OpenVINO INT8 model with NNCF's accuracy control, which "
                             "reverts the layers that cost the most accuracy to float until top-1 accuracy on the "
                             "checkpoint's whole validation split is at most POINTS percentage points below the FP32 IR's "
                             "(>= 0). The search costs validation passes: two for FP32/INT8, a ranking of every quantised "
                             "layer on --calibration-images of them, then one full pass per reverted group")
    parser.add_argument("--torchscript", action="store_true", help="also write a traced, frozen FP32 TorchScript model")
    parser.add_argument("--ncnn", action="store_true",
                        help="also write an NCNN model converted with pnnx: <stem>.ncnn.param/.bin (float32 weights, run "
                             "in FP32) and <stem>.ncnn.json (deploy info); for predict.py/stream.py --ncnn")
    parser.add_argument("--device-images", type=non_negative_int, default=300, metavar="N",
                        help="test-split images (a seeded random subset; all if fewer) written with their labels to "
                             f"{DEVICE_SET} beside the artifacts, for benchmarks/device.py; 0: none (default: %(default)s)")
    parser.add_argument("--benchmark", action="store_true",
                        help="time every artifact in this process on the same inputs: batch-1 median/p90 at 1 and all "
                             "threads, batch-32 throughput; writes benchmark.csv and benchmark.md beside the ONNX file")
    parser.add_argument("--torch-int8", metavar="FILE",
                        help="with --benchmark: a PyTorch INT8 TorchScript file of this checkpoint (from quantization-train.py)")
    parser.add_argument("--runs", type=positive_int, default=200,
                        help="timed batch-1 runs per artifact and thread count (default: %(default)s)")
    add_data_args(parser, omit=("augment",))
    add_run_args(parser, omit=("device", "amp"))  # every artifact is exported, scored and timed on the CPU
    return parser


def latency_ms(module: torch.nn.Module, img_size: int) -> float:
    """Median batch-1 latency of an artifact loaded at 1 thread (the results table's latency_ms_1t)."""
    times = time_runs(module, torch.randn(1, 3, img_size, img_size), RESULT_LATENCY_RUNS, 10)
    return float(np.median(times) * 1000)


def check_flags(args: argparse.Namespace) -> None:
    if args.max_drop is not None and not (args.openvino and args.int8):
        raise UserError("--max-drop bounds the accuracy loss of the OpenVINO INT8 model: add --openvino --int8")
    if args.torch_int8 and not args.benchmark:
        raise CheckpointError("--torch-int8 is only used by --benchmark: add --benchmark")
    unused = {"runs": "sets the --benchmark timing runs: add --benchmark"} if not args.benchmark else {}
    if not args.int8:
        unused["calibration_images"] = "calibrates the INT8 models: add --int8"
    refuse(args.explicit, unused)


def load_fp32(path: str) -> dict:
    payload = load_checkpoint(path)
    stored = payload["description"]
    if stored.quantization is not None or stored.method == "qat-fake-quant":
        raise CheckpointError(
            f"'{path}' is a PyTorch INT8 checkpoint: export its FP32 source "
            f"({stored.fp32_checkpoint or 'the best.pt it was quantised from'}) with --int8, and benchmark "
            "the INT8 file with --torch-int8 <run>/int8_<mode>.torchscript.pt")
    return payload


def main(args: argparse.Namespace) -> None:
    check_flags(args)
    torch_int8 = load_torch_int8(args.torch_int8) if args.torch_int8 else None  # a bad file fails before any work
    payload = load_fp32(args.checkpoint)
    config = resolve(vars(args), pinned=payload["description"])
    description = payload["description"].replace(img_size=config.data.img_size)
    model = model_from_checkpoint(payload)
    bundle = prepare_data(config, CPU)
    run_dir = create_run_dir(config, "export", description.model, CPU)
    job = export_job(model, description, bundle, Path(args.out) if args.out else run_dir / "model.onnx", args)
    scoring = Scoring(run_dir, bundle, description, model_stats(model, description.img_size, len(bundle.class_names)), config)
    rows, summary, artifacts = [], {}, {"pytorch-eager-fp32": lambda threads: model}
    formats = selected_formats(vars(args))
    for fmt in formats:
        row, extra = export_format(fmt, job, scoring)
        rows.append(row)
        summary[fmt.method] = {**{key: row.get(key) for key in SUMMARY_KEYS}, **extra}
        artifacts[fmt.runtime] = functools.partial(fmt.load, job.path(fmt.suffix))
    if torch_int8 is not None:
        artifacts["pytorch-int8"] = torch_int8
    if args.device_images:
        write_device_set(bundle, args.device_images, args.seed, job.onnx_path.parent / DEVICE_SET)
    save_json(summary, run_dir / "summary.json")
    print_table(rows)
    if args.benchmark:
        benchmark_artifacts(artifacts, job, formats, args.runs, len(bundle.class_names))


def write_device_set(bundle: DataBundle, count: int, seed: int, path: Path) -> None:
    """A seeded subset of the test split with its labels, for benchmarks/device.py on the device itself."""
    test = bundle.parts["test"]
    chosen = np.sort(np.random.default_rng(seed).permutation(len(test.images))[:count])
    save_device_set(path, test.images[chosen], test.labels[chosen], bundle.class_names)
    log.info("held-out set for benchmarks/device.py: %d test images in %s", len(chosen), path)


SUMMARY_KEYS = ("checkpoint", "test_acc", "file_mb", "threshold", "op_defect_recall", "op_false_alarm_rate")


def export_job(model: torch.nn.Module, description: RunDescription, bundle: DataBundle, onnx_path: Path,
               args: argparse.Namespace) -> ExportJob:
    """The export's model and paths, with the calibration images (--calibration-images training images, seeded; with
    --int8) and the validation split (made when accuracy control needs it), preprocessed as evaluation does."""
    preprocess = Preprocess(description.mean, description.std)
    calibration = None
    if args.int8:  # chosen (and said to be too few) before any export work
        images = bundle.parts["train"].images
        chosen = np.random.default_rng(args.seed).permutation(len(images))[:args.calibration_images]
        calibration = torch.stack([preprocess(images[i]) for i in chosen]).numpy()
        check_calibration("ONNX/OpenVINO INT8" if args.openvino else "ONNX INT8", len(calibration), args.calibration_images)

    def validation() -> tuple[np.ndarray, np.ndarray]:
        val = bundle.parts["val"]
        return torch.stack([preprocess(image) for image in val.images]).numpy(), val.labels

    return ExportJob(model, description, onnx_path, calibration, validation, args.max_drop)


def export_format(fmt: Format, job: ExportJob, scoring: Scoring) -> tuple[dict, dict]:
    """Write one artifact, check it against PyTorch, score it through its own runtime; (results row, summary extras)."""
    path = job.path(fmt.suffix)
    extra = fmt.write(job, path)
    check_parity(fmt.method, job.model, fmt.load(path, 1), scoring.parity_inputs, gated=fmt.gated)
    return score(path, fmt, scoring), extra


def benchmark_artifacts(artifacts: dict, job: ExportJob, formats: list[Format], runs: int, num_classes: int) -> None:
    """Time every artifact in this process on the same inputs; benchmark.csv and benchmark.md beside the ONNX file."""
    size = job.description.img_size
    log.info("benchmark: %d artifacts, %d runs each at 1 and %d threads ...", len(artifacts), runs, all_threads())
    timings = benchmark(artifacts, size, runs=runs, warmup=min(20, runs))
    print(format_table(timings))
    libraries = dict.fromkeys(["torch", *(fmt.library for fmt in formats)])
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in libraries)
    context = (f"{job.description.model} at {size} px, {num_classes} classes; batch-1 latency over {runs} runs "
               f"after warm-up, batch-32 throughput over 10 runs; CPU {cpu_name()}, {all_threads()} logical cores; "
               f"{versions}; {dt.date.today().isoformat()}")
    folder = job.onnx_path.parent
    write_reports(timings, folder / "benchmark.csv", folder / "benchmark.md", context)
    log.info("benchmark written to %s and benchmark.md", folder / "benchmark.csv")


@dataclass(frozen=True)
class Scoring:
    """What scoring an artifact needs besides the artifact: where its report goes, the data, its cost, the settings."""

    run_dir: Path
    bundle: DataBundle
    description: RunDescription
    stats: dict
    config: RunConfig

    @functools.cached_property
    def loaders(self) -> dict[str, DataLoader]:
        """"val" (the threshold) and "test" (the figures), preprocessed as evaluation does."""
        preprocess = Preprocess(self.description.mean, self.description.std)
        return {split: make_loader(self.bundle.parts[split], preprocess, batch_size=64, workers=self.config.data.workers,
                                   train=False, seed=self.config.seed) for split in ("val", "test")}

    @functools.cached_property
    def parity_inputs(self) -> dict[str, torch.Tensor]:
        """Random inputs and the first test images: what every artifact's logits are compared with PyTorch's on."""
        size, preprocess = self.description.img_size, Preprocess(self.description.mean, self.description.std)
        real = torch.stack([preprocess(image) for image in self.bundle.parts["test"].images[:PARITY_IMAGES]])
        noise = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(self.config.seed))
        return {"random": noise, "real": real}


def score(path: Path, fmt: Format, scoring: Scoring) -> dict:
    """Through the artifact's runtime: its own defect threshold chosen on the validation split and written into its
    metadata, then its test-split figures written as a results row like every other model's (report in
    run_dir/method)."""
    module, method = fmt.load(path, all_threads()), fmt.method
    val = evaluate(module, scoring.loaders["val"], CPU, desc=f"val {method}")
    point = choose_threshold_on_val(val, scoring.bundle, scoring.config, method)
    fmt.stamp(path, point)
    output = evaluate(module, scoring.loaders["test"], CPU, desc=method)
    result = Result("export", method, output, point, path, report_dir=scoring.run_dir / method, file_bytes=fmt.size_of(path),
                    stats=scoring.stats, latency_ms=latency_ms(fmt.load(path, 1), scoring.description.img_size))
    row = record(result, scoring.bundle, scoring.description, scoring.run_dir, scoring.config.output_dir)
    log.info("%s: %s (%s MB), test acc %.4f, %.2f ms at 1 thread", method, path, row["file_mb"], row["test_acc"], row["latency_ms_1t"])
    log_test_row(row)
    return row


def load_torch_int8(path: str):
    """Builder for a PyTorch INT8 TorchScript file (its quantised kernels come from torch.backends.quantized.engine)."""
    if not Path(path).is_file():
        raise CheckpointError(f"--torch-int8 file '{path}' does not exist")
    check_zip_records(Path(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(path, map_location="cpu").eval()
    except Exception as error:  # torch.jit.load raises many types for a file that is not TorchScript
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"--torch-int8 file '{path}' is not a TorchScript model ({detail}): pass "
                              "<quantization run>/int8_<mode>.torchscript.pt") from None
    return lambda threads: scripted


if __name__ == "__main__":
    run_cli(main, get_args_parser())

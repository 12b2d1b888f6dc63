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
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ncnn
import numpy as np
import onnxruntime
import torch
from torch.utils.data import DataLoader

from data.loading import DataBundle, make_loader
from data.transforms import Preprocess
from deploy.edge import all_threads, cpu_name
from deploy.inference import OnnxModule, save_torchscript_artifact, trace_torchscript
from deploy.ncnn_export import NcnnModule, export_ncnn, ncnn_bytes, stamp_operating_point_ncnn
from deploy.on_device import DEVICE_SET, save_device_set
from deploy.onnx_export import check_parity, deploy_info, export_onnx, quantize_onnx, stamp_operating_point
from deploy.timing import benchmark, format_table, write_reports
from engine.config import RunConfig
from engine.flags import add_data_args, add_run_args
from engine.loop import evaluate
from engine.run import choose_threshold_on_val, create_run_dir, log_test_row, prepare_data, record
from models.factory import model_from_checkpoint
from models.stats import model_stats, time_runs
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.cli import non_negative_float, non_negative_int, positive_int, run_cli
from utils.description import RunDescription
from utils.distributed import Runtime
from utils.errors import UserError
from utils.io import save_json
from utils.operating_point import OperatingPoint
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
    add_data_args(parser)
    add_run_args(parser)
    return parser


def latency_ms(module: torch.nn.Module, img_size: int) -> float:
    """Median batch-1 latency of an artifact loaded at 1 thread (the results table's latency_ms_1t)."""
    times = time_runs(module, torch.randn(1, 3, img_size, img_size), RESULT_LATENCY_RUNS, 10)
    return float(np.median(times) * 1000)


def main(args: argparse.Namespace) -> None:
    if args.max_drop is not None and not (args.openvino and args.int8):
        raise UserError("--max-drop bounds the accuracy loss of the OpenVINO INT8 model: add --openvino --int8")
    if args.torch_int8 and not args.benchmark:
        raise CheckpointError("--torch-int8 is only used by --benchmark: add --benchmark")
    torch_int8 = load_torch_int8(args.torch_int8) if args.torch_int8 else None  # a bad file fails before any work
    payload = load_checkpoint(args.checkpoint)
    stored = payload["description"]
    if stored.quantization is not None or stored.method == "qat-fake-quant":
        raise CheckpointError(
            f"'{args.checkpoint}' is a PyTorch INT8 checkpoint: export its FP32 source "
            f"({stored.fp32_checkpoint or 'the best.pt it was quantised from'}) with --int8, and benchmark "
            "the INT8 file with --torch-int8 <run>/int8_<mode>.torchscript.pt")
    model = model_from_checkpoint(payload)
    config = RunConfig.from_flags(vars(args))
    description = stored.replace(img_size=config.data.img_size or stored.img_size)
    size, mean, std = description.img_size, description.mean, description.std
    runtime = CPU
    bundle = prepare_data(config, runtime, stored=description)
    preprocess = Preprocess(mean, std)
    split_loaders = {split: make_loader(bundle.parts[split], preprocess, batch_size=64, workers=args.workers, train=False, seed=args.seed)
                     for split in ("val", "test")}
    real = torch.stack([preprocess(image) for image in bundle.parts["test"].images[:PARITY_IMAGES]])
    parity_inputs = {"random": torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(args.seed)), "real": real}

    run_dir = create_run_dir(config.output_dir, "export", description.model, runtime)
    fp32_path = Path(args.out) if args.out else run_dir / "model.onnx"
    stats = model_stats(model, size, len(bundle.class_names))
    rows = []

    export_onnx(model, description, fp32_path)
    check_parity("ONNX Runtime FP32", model, OnnxModule(fp32_path), parity_inputs)
    scoring = Scoring(run_dir, split_loaders, bundle, description, stats, config)
    rows.append(score(fp32_path, "onnx-fp32", OnnxModule, stamp_operating_point, scoring))
    artifacts = {"pytorch-eager-fp32": lambda threads: model}

    if args.torchscript:
        scripted_path = fp32_path.with_suffix(".torchscript.pt")
        scripted = trace_torchscript(model, size)
        check_parity("TorchScript FP32", model, scripted, parity_inputs)
        point = choose_threshold_on_val(evaluate(scripted, split_loaders["val"], CPU, desc="val torchscript"), bundle, config,
                                        "torchscript-fp32")
        save_torchscript_artifact(scripted, description, scripted_path, point)
        log.info("TorchScript FP32: %s", scripted_path)
        artifacts["torchscript-fp32"] = lambda threads: scripted
    if torch_int8 is not None:
        artifacts["pytorch-int8"] = torch_int8
    artifacts["onnxruntime-fp32"] = lambda threads: OnnxModule(fp32_path, threads)

    calibration, accuracy_control = None, None
    if args.int8:
        int8_path = fp32_path.with_suffix(".int8.onnx")
        train_images = bundle.parts["train"].images
        chosen = np.random.default_rng(args.seed).permutation(len(train_images))[:args.calibration_images]
        calibration = torch.stack([preprocess(train_images[i]) for i in chosen]).numpy()
        quantize_onnx(fp32_path, int8_path, calibration)
        rows.append(score(int8_path, "onnx-int8", OnnxModule, stamp_operating_point, scoring))
        artifacts["onnxruntime-int8"] = lambda threads: OnnxModule(int8_path, threads)

    versions = f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    if args.ncnn:
        versions += f", ncnn {ncnn.__version__}"
        ncnn_path = fp32_path.with_suffix(".ncnn.param")
        export_ncnn(model, deploy_info(description), ncnn_path)
        check_parity("NCNN FP32", model, NcnnModule(ncnn_path), parity_inputs)
        rows.append(score(ncnn_path, "ncnn-fp32", NcnnModule, stamp_operating_point_ncnn, scoring, ncnn_bytes))
        artifacts["ncnn-fp32"] = lambda threads: NcnnModule(ncnn_path, threads)
    if args.openvino:
        import openvino  # with NNCF, seconds to import: only for --openvino

        from deploy.openvino_export import (
            OpenVinoModule,
            export_openvino,
            ir_bytes,
            quantize_openvino,
            quantize_openvino_with_accuracy_control,
            stamp_operating_point_ir,
        )

        versions += f", openvino {openvino.get_version()}"
        ov_path = fp32_path.with_suffix(".xml")
        fp32_ir = export_openvino(fp32_path, ov_path)
        check_parity("OpenVINO FP32", model, OpenVinoModule(ov_path), parity_inputs)
        rows.append(score(ov_path, "openvino-fp32", OpenVinoModule, stamp_operating_point_ir, scoring, ir_bytes))
        artifacts["openvino-fp32"] = lambda threads: OpenVinoModule(ov_path, threads)
        if calibration is not None:
            ov_int8_path = fp32_path.with_suffix(".int8.xml")
            if args.max_drop is None:
                quantize_openvino(fp32_ir, deploy_info(description), ov_int8_path, calibration)
            else:
                val = bundle.parts["val"]
                val_images = torch.stack([preprocess(image) for image in val.images]).numpy()
                accuracy_control = quantize_openvino_with_accuracy_control(
                    fp32_ir, deploy_info(description), ov_int8_path, calibration, val_images, val.labels, args.max_drop)[1]
            check_parity("OpenVINO INT8", model, OpenVinoModule(ov_int8_path), parity_inputs, gated=False)
            rows.append(score(ov_int8_path, "openvino-int8", OpenVinoModule, stamp_operating_point_ir, scoring, ir_bytes))
            artifacts["openvino-int8"] = lambda threads: OpenVinoModule(ov_int8_path, threads)

    if args.device_images:
        test = bundle.parts["test"]
        chosen = np.sort(np.random.default_rng(args.seed).permutation(len(test.images))[:args.device_images])
        save_device_set(fp32_path.parent / DEVICE_SET, test.images[chosen], test.labels[chosen], bundle.class_names)
        log.info("held-out set for benchmarks/device.py: %d test images in %s", len(chosen), fp32_path.parent / DEVICE_SET)
    summary = {row["method"]: {key: row.get(key) for key in ("checkpoint", "test_acc", "file_mb", "threshold", "op_defect_recall",
                                                          "op_false_alarm_rate")} for row in rows}
    if accuracy_control:
        summary["openvino-int8"]["accuracy_control"] = accuracy_control
    save_json(summary, run_dir / "summary.json")
    print_table(rows)
    if args.benchmark:
        log.info("benchmark: %d artifacts, %d runs each at 1 and %d threads ...", len(artifacts), args.runs, all_threads())
        timings = benchmark(artifacts, size, runs=args.runs, warmup=min(20, args.runs))
        print(format_table(timings))
        context = (f"{description.model} at {size} px, {len(bundle.class_names)} classes; batch-1 latency over {args.runs} runs "
                   f"after warm-up, batch-32 throughput over 10 runs; CPU {cpu_name()}, {all_threads()} logical cores; "
                   f"{versions}; {dt.date.today().isoformat()}")
        write_reports(timings, fp32_path.parent / "benchmark.csv", fp32_path.parent / "benchmark.md", context)
        log.info("benchmark written to %s and benchmark.md", fp32_path.parent / "benchmark.csv")


@dataclass(frozen=True)
class Scoring:
    """What scoring an artifact needs besides the artifact: where its report goes, the data, its cost, the settings."""

    run_dir: Path
    loaders: dict[str, DataLoader]  # "val" (the threshold) and "test" (the figures)
    bundle: DataBundle
    description: RunDescription
    stats: dict
    config: RunConfig


def score(path: Path, method: str, load: Callable[[Path, int], torch.nn.Module],
          stamp: Callable[[Path, OperatingPoint | None], None], scoring: Scoring, size_of: Callable[[Path], int] | None = None) -> dict:
    """Through the artifact's runtime (``load(path, threads)``: OnnxModule, OpenVinoModule): its own defect threshold
    chosen on the validation split and written into its metadata (``stamp``), then its test-split figures written as
    a results row like every other model's (report in run_dir/method). ``size_of``: the artifact's bytes on disk."""
    module = load(path, all_threads())
    val = evaluate(module, scoring.loaders["val"], CPU, desc=f"val {method}")
    point = choose_threshold_on_val(val, scoring.bundle, scoring.config, method)
    stamp(path, point)
    output = evaluate(module, scoring.loaders["test"], CPU, desc=method)
    row = record(output, scoring.bundle, scoring.description, scoring.run_dir, None, path, scoring.config.output_dir, "export",
                 method, latency_ms=latency_ms(load(path, 1), scoring.description.img_size), stats=scoring.stats,
                 report_dir=scoring.run_dir / method, file_bytes=size_of(path) if size_of else None, point=point)
    log.info("%s: %s (%s MB), test acc %.4f, %.2f ms at 1 thread", method, path, row["file_mb"], row["test_acc"], row["latency_ms_1t"])
    log_test_row(row)
    return row


def load_torch_int8(path: str):
    """Builder for a PyTorch INT8 TorchScript file (its quantised kernels come from torch.backends.quantized.engine)."""
    if not Path(path).is_file():
        raise CheckpointError(f"--torch-int8 file '{path}' does not exist")
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

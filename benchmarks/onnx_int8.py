"""Why is (or isn't) ONNX Runtime INT8 faster than FP32 for a small MobileNet? Variants timed in one process.

Exports the checkpoint once, quantises it several ways (QDQ vs QOperator, per-channel vs per-tensor,
depthwise convs kept FP32, only Conv/Gemm quantised, after ORT's quant_pre_process), then for each variant reports what ONNX Runtime's
optimised graph really runs (integer vs float ops, Q/DQ pairs left) and its latency on the same inputs:

    nice -n 10 python benchmarks/onnx_int8.py --checkpoint runs/main/<run>/best.pt --out-dir runs/int8-study
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantFormat, QuantType
from onnxruntime.quantization.shape_inference import quant_pre_process

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.transforms import Preprocess  # noqa: E402
from deploy.inference import OnnxModule, ort_session  # noqa: E402
from deploy.onnx_export import depthwise_conv_nodes, export_onnx, quantize_onnx  # noqa: E402
from deploy.timing import benchmark, format_table, write_reports  # noqa: E402
from engine.config import resolve  # noqa: E402
from engine.run import prepare_data  # noqa: E402
from models.factory import model_from_checkpoint  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.cli import positive_int, run_cli  # noqa: E402
from utils.distributed import Runtime  # noqa: E402

INTEGER_OPS = {"QLinearConv", "ConvInteger", "QGemm", "MatMulInteger", "QLinearMatMul", "QLinearAdd", "QLinearMul",
               "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearConcat", "QLinearAveragePool", "QLinearLeakyRelu"}
FLOAT_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "HardSwish", "HardSigmoid", "Mul", "Add", "ReduceMean",
             "GlobalAveragePool", "Relu", "Sigmoid"}


def optimised_ops(path: Path) -> Counter:
    """Op types of the graph ONNX Runtime actually executes (after its QDQ fusions), at 1 thread."""
    with tempfile.TemporaryDirectory() as scratch:
        optimised = Path(scratch) / "optimised.onnx"
        ort_session(path, 1, optimized_model_filepath=str(optimised))
        return Counter(node.op_type for node in onnx.load(optimised).graph.node)


def describe_ops(ops: Counter) -> str:
    integer = {k: v for k, v in ops.items() if k in INTEGER_OPS}
    floating = {k: v for k, v in ops.items() if k in FLOAT_OPS}
    qdq = ops["QuantizeLinear"] + ops["DequantizeLinear"]
    show = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"  # noqa: E731
    return f"integer: {show(integer)}; float: {show(floating)}; QuantizeLinear+DequantizeLinear left: {qdq}"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out-dir", default="runs/int8-study")
    parser.add_argument("--runs", type=positive_int, default=200)
    parser.add_argument("--calibration-images", type=positive_int, default=200)
    return parser


def main(args: argparse.Namespace) -> None:
    payload = load_checkpoint(args.checkpoint)
    description = payload["description"]
    model = model_from_checkpoint(payload)
    bundle = prepare_data(resolve({"seed": description.seed}, pinned=description), Runtime(torch.device("cpu")))
    preprocess = Preprocess(description.mean, description.std)
    train = bundle.parts["train"].images
    calibration = torch.stack([preprocess(train[i])
                               for i in np.random.default_rng(0).permutation(len(train))[:args.calibration_images]]).numpy()
    test = torch.stack([preprocess(image) for image in bundle.parts["test"].images])

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / "model.onnx"
    export_onnx(model, description, fp32)
    depthwise = depthwise_conv_nodes(onnx.load(fp32))
    variants = {
        "qdq-s8s8-per-channel (export.py --int8)": dict(),
        "qdq-s8s8-per-tensor": dict(per_channel=False),
        "qdq-u8s8-per-channel": dict(activation_type=QuantType.QUInt8),
        "qoperator-u8s8-per-channel": dict(quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8),
        f"qdq-depthwise-fp32 ({len(depthwise)} convs excluded)": dict(nodes_to_exclude=depthwise),
        "qdq-conv-gemm-only": dict(op_types_to_quantize=["Conv", "Gemm"]),
    }
    paths = {"onnxruntime-fp32": fp32}
    for index, (name, options) in enumerate(variants.items()):
        paths[name] = out / f"variant{index}.int8.onnx"
        quantize_onnx(fp32, paths[name], calibration, **options)
    preprocessed = out / "model.preprocessed.onnx"  # ORT's recommended quant_pre_process (it splits HardSwish)
    quant_pre_process(str(fp32), str(preprocessed))
    paths["qdq-s8s8-per-channel after quant_pre_process"] = out / f"variant{len(variants)}.int8.onnx"
    quantize_onnx(preprocessed, paths["qdq-s8s8-per-channel after quant_pre_process"], calibration)

    with torch.inference_mode():
        reference = model(test).argmax(1)
    lines = [f"# ONNX Runtime INT8 variants: {description.model} at {description.img_size} px", ""]
    for name, path in paths.items():
        agreement = float((OnnxModule(path)(test).argmax(1) == reference).float().mean())
        lines.append(f"- **{name}** ({path.stat().st_size / 2**20:.2f} MB, top-1 agreement with PyTorch FP32 on "
                     f"{len(test)} test images {agreement:.3f}): {describe_ops(optimised_ops(path))}")
    print("\n".join(lines), flush=True)
    builders = {"pytorch-eager-fp32": lambda threads: model}
    builders.update({name: (lambda threads, p=path: OnnxModule(p, threads)) for name, path in paths.items()})
    timings = benchmark(builders, description.img_size, runs=args.runs)
    print(format_table(timings))
    write_reports(timings, out / "variants.csv", out / "variants.md", "\n".join(lines))


if __name__ == "__main__":
    run_cli(main, get_args_parser())

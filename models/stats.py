"""Cost figures of a model: parameters, FLOPs (fvcore), size and CPU latency."""
from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable
from functools import cache

import timm
import torch

REFERENCE_MODEL = "mobilenetv1_100"  # the published table states FLOPs as % of MobileNetV1


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_mb(params: int) -> float:
    """FP32 weight size: params x 4 bytes / 2^20."""
    return params * 4 / 2**20


def count_flops(model: torch.nn.Module, img_size: int) -> int:
    """fvcore FLOPs (one per multiply-add) for batch 1, 3 x img x img, eval mode."""
    from fvcore.nn import FlopCountAnalysis  # on first use: its import warns (torch.jit.script), after the CLI's filters are set

    model = copy.deepcopy(model).cpu().eval()
    analysis = FlopCountAnalysis(model, torch.zeros(1, 3, img_size, img_size))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad():
        return int(analysis.total())


@cache
def reference_flops(img_size: int, num_classes: int) -> int:
    model = timm.create_model(REFERENCE_MODEL, num_classes=num_classes, pretrained=False)
    return count_flops(model, img_size)


def model_stats(model: torch.nn.Module, img_size: int, num_classes: int) -> dict:
    """params, FLOPs, FLOPs as % of MobileNetV1 at the same size, and FP32 size in MB."""
    params = count_params(model)
    flops = count_flops(model, img_size)
    return {
        "params": params,
        "flops": flops,
        "flops_pct_mobilenetv1": round(100 * flops / reference_flops(img_size, num_classes), 2),
        "size_mb": round(size_mb(params), 4),
    }


def time_runs(model: Callable[[torch.Tensor], object], inputs: torch.Tensor, runs: int, warmup: int) -> list[float]:
    """Seconds per call after ``warmup`` untimed calls (any callable: eager, TorchScript, ONNX Runtime)."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            start = time.perf_counter()
            model(inputs)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def measure_latency(model: torch.nn.Module, img_size: int, threads: int = 1, runs: int = 100, warmup: int = 10) -> float:
    """Median batch-1 CPU latency in ms with ``threads`` intra-op threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = time_runs(model.cpu().eval(), torch.randn(1, 3, img_size, img_size), runs, warmup)
        return statistics.median(times) * 1000
    finally:
        torch.set_num_threads(previous)

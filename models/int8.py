"""What every INT8 path shares, without torch.ao: backends, errors, calibration, the QAT schedule, and the one guard
through which the FX graph-mode path (``models.quantize``) is imported.

torch.ao.quantization's FX graph mode is deprecated (torch 2.14) in favour of PT2E (``models.quantize_pt2e``); a torch
that no longer ships it must still run PT2E, ONNX Runtime and OpenVINO INT8, and say in one line what to use instead.
"""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from torch import nn

from utils.errors import UserError

BACKENDS = ("x86", "fbgemm", "qnnpack")  # qnnpack: the ARM kernels of a Raspberry Pi
MIN_CALIBRATION_IMAGES = 100  # fewer images give noisy activation ranges
OBSERVERS = ("minmax", "moving-average", "histogram", "percentile")  # PTQ activation observers of the FX path
DEFAULT_OBSERVER = "histogram"  # the backends' default
FX_UNAVAILABLE = ("this torch {version} no longer ships torch.ao.quantization's FX graph mode ({error}): use --api pt2e "
                  "(quantization-train.py), or export.py --int8 / --openvino --int8")


class QuantizationError(UserError):
    """A model, backend or file that cannot be quantised or loaded; the message says why."""


class CalibrationWarning(UserWarning):
    """PTQ calibrated on fewer images than asked for or than is reliable."""


def available_backends() -> list[str]:
    return [name for name in BACKENDS if name in torch.backends.quantized.supported_engines]


def set_backend(name: str) -> None:
    """Select the quantised kernel set; packing of INT8 weights depends on it."""
    if name not in available_backends():
        raise QuantizationError(f"unsupported quantisation backend '{name}': choose one of {', '.join(available_backends())}")
    torch.backends.quantized.engine = name


@torch.inference_mode()
def calibrate(prepared: torch.fx.GraphModule, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], max_batches: int,
              requested_images: int) -> int:
    """Run up to ``max_batches`` batches through the observers; returns how many images were seen."""
    prepared.eval()
    seen = 0
    for index, (images, _) in enumerate(batches):
        if index >= max_batches:
            break
        prepared(images.cpu())
        seen += len(images)
    check_calibration("PTQ", seen, requested_images)
    return seen


def check_calibration(what: str, seen: int, requested_images: int) -> None:
    """The one check of every INT8 calibration (PyTorch PTQ, ONNX Runtime, OpenVINO): a CalibrationWarning when it saw
    fewer images than asked for or than give stable activation ranges."""
    if seen < requested_images or seen < MIN_CALIBRATION_IMAGES:
        warnings.warn(
            f"{what} calibrated on only {seen} images (asked for {requested_images}; at least {MIN_CALIBRATION_IMAGES} "
            "give stable activation ranges): expect lower INT8 accuracy", CalibrationWarning, stacklevel=3,
        )


def _fake_quantizers(model: nn.Module) -> list[nn.Module]:
    """Fake-quantisation modules of torch.ao (FX) and torchao (PT2E) alike: both keep an ``observer_enabled`` flag."""
    return [m for m in model.modules() if hasattr(m, "observer_enabled") and hasattr(m, "disable_observer")]


def qat_schedule(prepared: nn.Module, observer_epochs: int, bn_freeze_epochs: int,
                 freeze_batchnorm: Callable[[nn.Module], None]) -> Callable[[int], None]:
    """``before_epoch`` hook: freeze observers, then BatchNorm statistics (torchvision's QAT recipe); FX and PT2E
    each freeze BatchNorm their own way (``freeze_batchnorm``)."""
    def before_epoch(epoch: int) -> None:
        if epoch >= observer_epochs:
            for module in _fake_quantizers(prepared):
                module.disable_observer()
        if epoch >= bn_freeze_epochs:
            freeze_batchnorm(prepared)
    return before_epoch


@contextmanager
def observers_paused(model: nn.Module) -> Iterator[None]:
    """Evaluate a QAT model without letting validation images move its quantisation ranges."""
    fake_quants = _fake_quantizers(model)
    saved = [m.observer_enabled.clone() for m in fake_quants]
    for module in fake_quants:
        module.disable_observer()
    try:
        yield
    finally:
        for module, state in zip(fake_quants, saved):
            module.observer_enabled.copy_(state)


def fx() -> ModuleType:
    """``models.quantize`` (FX graph mode); one QuantizationError line where this torch has removed it."""
    try:
        return importlib.import_module("models.quantize")
    except ImportError as error:
        if "torch" not in str(error):
            raise
        raise QuantizationError(FX_UNAVAILABLE.format(version=torch.__version__, error=error)) from None

"""INT8 quantisation through PT2E (``torch.export`` + torchao quantizers), PTQ and QAT, beside the FX path.

FX graph mode (``models.quantize``) is deprecated in torch 2.14; PT2E is its successor. The FP32 timm model is
captured with ``torch.export.export`` (batch dimension dynamic), annotated by a backend quantizer,
``prepare_pt2e`` inserts observers, the calibration batches of the FX path run through it, and ``convert_pt2e``
produces a graph of quantize/dequantize ops around float ATen ops, with the weights stored as int8 constants.
In eager mode those ops are reference kernels (slow); ``compile_int8`` lowers the graph with inductor and
freezing into fused int8 kernels (``torchao.quantization.pt2e.inductor_passes``).

Backends: x86/fbgemm -> ``X86InductorQuantizer`` (its default config: 8-bit unsigned activations, no
``reduce_range``); qnnpack (ARM, Raspberry Pi) -> ``ArmInductorQuantizer`` (8-bit signed activations), because
the XNNPACKQuantizer moved to executorch, which this toolkit does not install. Both use the histogram
activation observer (FX's default); weights are symmetric min-max, per output channel unless ``per_channel`` is off.

QAT (``prepare(..., qat=True)``): the model is exported in training mode, ``prepare_qat_pt2e`` folds each conv-BatchNorm
pair into a fake-quantised conv that still learns (and, until frozen, updates the BatchNorm statistics), with
moving-average fake quantisers on activations and weights; ``freeze_batchnorm`` and the observer switch of
``models.int8.qat_schedule`` run the same schedule as FX QAT. The checkpoint and program are written as for PTQ.

Artifacts: the project's checkpoint (``torch.load(weights_only=True)``): the converted module's tensors (int8
weights, folded biases, weight scales) plus every observer's scale and zero point; ``load_quantized``
rebuilds the module (FP32 model with placeholder weights -> export -> prepare -> observers return the stored
quantisation parameters -> convert -> load the tensors), with outputs identical to the saved module. For
deployment ``save_program`` writes the converted graph as a ``torch.export`` program (``.pt2``), loaded with
``torch.export.load(path).module()``; that loader unpickles, so only load ``.pt2`` files you made.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import types
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch import nn

from models.factory import model_from_checkpoint
from models.int8 import BACKENDS, DEFAULT_OBSERVER, QuantizationError, calibrate, fx
from models.stats import measure_latency
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.description import RunDescription
from utils.io import write_serialised

_pytree_log = logging.getLogger("torch.utils._pytree")
_level = _pytree_log.level
_pytree_log.setLevel(logging.ERROR)  # torchao 0.18 registers an Enum that torch 2.14 logs as deprecated, once per process
try:
    from torchao.quantization.pt2e import ObserverBase, move_exported_model_to_eval, move_exported_model_to_train
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase, FusedMovingAvgObsFakeQuantize
    from torchao.quantization.pt2e.observer import (
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        PerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import QuantizationSpec, Quantizer
    from torchao.quantization.pt2e.quantizer.arm_inductor_quantizer import (
        ArmInductorQuantizer,
        get_default_arm_inductor_quantization_config,
    )
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )
finally:
    _pytree_log.setLevel(_level)

API = "pt2e"
QPARAMS = "pt2e_qparams"  # checkpoint keys "<QPARAMS>.<observer>.scale" / ".zero_point"
MAX_BATCH = 4096  # upper bound of the exported dynamic batch dimension
QUANTIZERS = {"x86": "X86InductorQuantizer", "fbgemm": "X86InductorQuantizer", "qnnpack": "ArmInductorQuantizer"}
QDQ_OPS = ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel")
BATCH_NORM_OPS = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default)
BATCH_NORM_TRAINING_ARG = 5  # (input, weight, bias, running_mean, running_var, training, momentum, eps, ...)
log = logging.getLogger(__name__)


def _weight_spec(per_channel: bool, qat: bool) -> QuantizationSpec:
    """Symmetric int8 weights per output channel (or per tensor): min-max for PTQ, a fused moving-average fake
    quantiser for QAT (the quantizers' own QAT weights: per channel on x86, per tensor on ARM)."""
    if qat:
        observer = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
        constructor = FusedMovingAvgObsFakeQuantize.with_args(observer=observer, eps=2**-12)
    else:
        constructor = (PerChannelMinMaxObserver if per_channel else MinMaxObserver).with_args(eps=2**-12)
    return QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, ch_axis=0,
                            qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
                            observer_or_fake_quant_ctr=constructor)


def quantizer_for(backend: str, per_channel: bool = True, qat: bool = False) -> Quantizer:
    """The PT2E quantizer of a backend: default config (QAT: fake quantisers), weights as ``_weight_spec``."""
    if backend not in BACKENDS:
        raise QuantizationError(f"unsupported quantisation backend '{backend}': choose one of {', '.join(BACKENDS)}")
    if QUANTIZERS[backend] == "X86InductorQuantizer":
        quantizer, config = X86InductorQuantizer(), get_default_x86_inductor_quantization_config(is_qat=qat)
    else:
        quantizer, config = ArmInductorQuantizer(), get_default_arm_inductor_quantization_config(is_qat=qat)
    return quantizer.set_global(dataclasses.replace(config, weight=_weight_spec(per_channel, qat)))


def _set_batchnorm_training(model: torch.fx.GraphModule, training: bool) -> None:
    """Whether each BatchNorm op of an exported graph normalises with batch statistics (and updates the running ones)."""
    for node in model.graph.nodes:
        if node.op == "call_function" and node.target in BATCH_NORM_OPS:
            args = list(node.args)
            args[BATCH_NORM_TRAINING_ARG] = training
            node.args = tuple(args)
    model.recompile()


def freeze_batchnorm(model: torch.fx.GraphModule) -> None:
    """QAT: from now on BatchNorm uses (and keeps) its running statistics, also after ``train()``."""
    model.meta["batchnorm_frozen"] = True
    _set_batchnorm_training(model, False)


def _train_eval(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give an exported module working ``train()``/``eval()`` (torch.export refuses them; torchao's helper returns None)."""
    def train(self: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
        if mode and self.meta.get("batchnorm_frozen"):
            _set_batchnorm_training(self, False)
        self.training = mode
        return self

    model.train = types.MethodType(train, model)
    model.eval = types.MethodType(lambda self: self.train(False), model)
    model.training = False
    return model


def export_model(model: nn.Module, img_size: int, train: bool = False) -> torch.fx.GraphModule:
    """``torch.export`` of a copy (eval mode; ``train``: training mode, for QAT) with a dynamic batch dimension; one
    QuantizationError line if it fails."""
    model = copy.deepcopy(model).cpu().train(train)
    example = (torch.zeros(2, 3, img_size, img_size),)  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        return torch.export.export(model, example, dynamic_shapes=({0: batch},)).module()
    except Exception as error:  # export raises UserError, Unsupported, GuardOnDataDependentSymNode, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QuantizationError(f"{type(model).__name__} cannot be exported with torch.export for PT2E quantisation "
                                f"({type(error).__name__}: {first_line}); use --api fx") from None


def prepare(model: nn.Module, backend: str, img_size: int, per_channel: bool = True, qat: bool = False) -> torch.fx.GraphModule:
    """Export and insert the backend quantizer's observers (PTQ, eval mode) or fake quantisers (QAT, training mode);
    the FP32 ``model`` is untouched."""
    quantizer = quantizer_for(backend, per_channel, qat)
    exported = export_model(model, img_size, train=qat)
    prepared = prepare_qat_pt2e(exported, quantizer) if qat else prepare_pt2e(exported, quantizer)
    prepared.meta[API] = {"backend": backend, "per_channel": per_channel, "img_size": img_size, "qat": qat}
    return _train_eval(prepared).train(qat)


def _quantisers(prepared: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """The observers (PTQ) or fake quantisers (QAT) whose parameters ``convert_pt2e`` bakes into the graph."""
    return {name: module for name, module in prepared.named_modules() if isinstance(module, (ObserverBase, FakeQuantizeBase))}


def observer_qparams(prepared: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every observer's calibrated scale and zero point, as checkpoint tensors keyed by the observer's name."""
    found = {}
    for name, module in _quantisers(prepared).items():
        with torch.no_grad():
            scale, zero_point = module.calculate_qparams()
            found[f"{QPARAMS}.{name}.scale"] = scale.detach().clone()
            found[f"{QPARAMS}.{name}.zero_point"] = zero_point.detach().clone()
    return found


def _drop_unused_tensors(converted: torch.fx.GraphModule) -> None:
    """Remove the FP32 weights ``convert_pt2e`` leaves registered although the graph reads their int8 copies."""
    used = {node.target for node in converted.graph.nodes if node.op == "get_attr"}
    for name in [name for name in converted.state_dict() if name not in used]:
        parent, _, leaf = name.rpartition(".")
        delattr(converted.get_submodule(parent), leaf)


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The INT8 (quantize/dequantize) copy of a calibrated prepared model; ``prepared`` is untouched.

    ``meta[QPARAMS]`` keeps the observers' parameters, which the checkpoint stores to rebuild the module.
    """
    qparams = observer_qparams(prepared)
    evaluating = copy.deepcopy(prepared)
    move_exported_model_to_eval(evaluating)  # QAT: BatchNorm folds with its running statistics
    converted = convert_pt2e(evaluating)
    _drop_unused_tensors(converted)
    converted.meta[QPARAMS] = qparams
    converted.meta[API] = dict(prepared.meta[API])
    size = prepared.meta[API]["img_size"]
    try:
        with torch.inference_mode():
            converted(torch.zeros(1, 3, size, size))
    except (NotImplementedError, RuntimeError) as error:
        raise QuantizationError(f"the PT2E INT8 model cannot run: {str(error).strip().splitlines()[-1]}") from None
    return _train_eval(converted)


def quantize_ptq(model: nn.Module, backend: str, img_size: int, per_channel: bool,
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]], max_batches: int,
                 requested_images: int) -> tuple[torch.fx.GraphModule, dict]:
    """PTQ: export, prepare, calibrate (``models.int8.calibrate``: same batches and warning as FX), convert.

    Returns the INT8 module and the settings its checkpoint records.
    """
    prepared = prepare(model, backend, img_size, per_channel)
    used = calibrate(prepared, batches, max_batches, requested_images)
    settings = {"api": API, "quantizer": QUANTIZERS[backend], "calibration_images": used, "observer": DEFAULT_OBSERVER}
    return convert(prepared), settings


def qdq_ops(converted: torch.fx.GraphModule) -> Counter:
    """How many quantize/dequantize ops of each kind the converted graph calls."""
    names = Counter(getattr(node.target, "__name__", str(node.target)).split(".")[0]
                    for node in converted.graph.nodes if node.op == "call_function")
    return Counter({name: count for name, count in names.items() if name in QDQ_OPS})


def save_quantized(path: Path | str, converted: torch.fx.GraphModule, fp32_payload: dict, settings: dict,
                   extra: dict | None = None) -> None:
    """INT8 checkpoint in the project's format: converted tensors + observer parameters + the FP32 description."""
    description = fp32_payload["description"].replace(
        **(extra or {}), quantization={**settings, "api": API,
                                       "fp32_shapes": {k: list(v.shape) for k, v in fp32_payload["model"].items()}},
    )
    save_checkpoint(path, {**converted.state_dict(), **converted.meta[QPARAMS]}, description)


class _StoredQParams:
    """An observer's ``calculate_qparams`` replaced by the calibrated values read from a checkpoint."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale, self.zero_point = scale, zero_point

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero_point


def build_quantized(description: RunDescription, state: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """The INT8 module of a PT2E checkpoint: FP32 placeholder -> export -> prepare -> stored qparams -> convert -> load."""
    settings = description.quantization
    shapes = {k: torch.ones(shape) for k, shape in settings["fp32_shapes"].items()}  # placeholder values: overwritten
    fp32 = model_from_checkpoint({"description": description, "model": shapes})
    prepared = prepare(fp32, settings["backend"], description.img_size, settings["per_channel"], settings["mode"] == "qat")
    observers = _quantisers(prepared)
    stored = {key[len(QPARAMS) + 1:].rpartition(".")[0] for key in state if key.startswith(f"{QPARAMS}.")}
    if stored != set(observers):
        raise CheckpointError(f"the PT2E checkpoint's {len(stored)} observers do not match the {len(observers)} of the rebuilt "
                              f"graph: it was made with another torch/torchao version")
    for name, observer in observers.items():
        observer.calculate_qparams = _StoredQParams(state[f"{QPARAMS}.{name}.scale"], state[f"{QPARAMS}.{name}.zero_point"])
    converted = convert(prepared)
    try:
        converted.load_state_dict({k: v for k, v in state.items() if not k.startswith(f"{QPARAMS}.")})
    except RuntimeError as error:
        raise CheckpointError(f"the PT2E checkpoint does not fit the rebuilt graph: {str(error).splitlines()[0]}") from None
    converted.meta[QPARAMS] = {k: v for k, v in state.items() if k.startswith(f"{QPARAMS}.")}
    return converted.eval()


def is_pt2e(description: RunDescription) -> bool:
    return (description.quantization or {}).get("api") == API


def load_quantized(path: Path | str) -> torch.fx.GraphModule:
    """Load a PT2E INT8 checkpoint written by quantization-train.py --api pt2e (weights_only, no pickled modules)."""
    payload = load_checkpoint(path)
    if not is_pt2e(payload["description"]):
        raise CheckpointError(f"'{path}' is not a PT2E INT8 checkpoint: load FP32 files with models.factory and FX INT8 "
                              "files with models.quantize.load_quantized (or use models.quantize_pt2e.load_int8)")
    return build_quantized(payload["description"], payload["model"])


def load_int8(path: Path | str) -> nn.Module:
    """Any INT8 checkpoint of quantization-train.py: FX or PT2E, as its ``quantization.api`` says."""
    return load_quantized(path) if is_pt2e(load_checkpoint(path)["description"]) else fx().load_quantized(path)


def save_program(converted: torch.fx.GraphModule, path: Path | str) -> None:
    """The INT8 graph as a ``torch.export`` program (``.pt2``), written atomically; batch dimension dynamic."""
    size = converted.meta[API]["img_size"]
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(converted, (torch.zeros(2, 3, size, size),), dynamic_shapes=({0: batch},))
    write_serialised(path, lambda buffer: torch.export.save(program, buffer))


def load_program(path: Path | str) -> torch.fx.GraphModule:
    """A ``.pt2`` INT8 program as a module (``torch.export.load(path).module()``) with working ``eval()``."""
    return _train_eval(torch.export.load(str(path)).module())


def compile_inference(model: nn.Module, img_size: int) -> nn.Module:
    """``torch.compile`` (inductor, freezing) of an eval-mode model, compiled now by one batch-1 call; inference only.

    On an INT8 PT2E module, freezing lets inductor's int8 patterns (registered by the quantizer import) fuse the
    quantize/dequantize ops with their convolutions. About a minute for mobilenetv3_small_050 at 112 px on one core.
    """
    compiled = _Compiled(torch.compile(model.eval()))
    with inductor_config.patch(freezing=True), torch.inference_mode():
        compiled(torch.zeros(1, 3, img_size, img_size))
    return compiled


def program_latency(program: Path, img_size: int, compiled: bool) -> tuple[float, str]:
    """Batch-1, 1-thread latency of a saved ``.pt2`` program as deployed, and what was timed: compiled by inductor, or
    eager if asked or if compiling fails (inductor needs a C++ compiler; the ARM quantizer's graph fails on x86)."""
    model = load_program(program)
    if compiled:
        try:
            return measure_latency(compile_inference(model, img_size), img_size), f"{program.name}, torch.compile (inductor, freezing)"
        except Exception as error:  # noqa: BLE001 - any compile failure: time eager instead of failing the run
            log.warning("torch.compile of %s failed (%s: %s): timing the eager graph", program.name, type(error).__name__,
                        str(error).strip().splitlines()[0] if str(error).strip() else "")
    return measure_latency(model, img_size), f"{program.name}, eager (reference quantize/dequantize ops)"


class _Compiled(nn.Module):
    """A compiled function as a module whose ``eval()``/``cpu()`` do not reach (and recompile) the compiled graph."""

    def __init__(self, function: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "function", function)  # not a submodule: train()/eval() must not rewrite its graph

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.function(images)

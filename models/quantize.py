"""INT8 quantisation of timm CNNs with torch.ao.quantization FX graph mode (PTQ and QAT).

FX mode quantises timm models without hand-written copies, but its conv-bn-act fusion
patterns only match plain ``nn.BatchNorm2d``. timm folds the activation into
``BatchNormAct2d``; left as is, every BatchNorm stays in float behind a dequantize/quantize
round trip and the INT8 model is slower than FP32. ``unfold_timm_layers`` therefore splits
each one into ``BatchNorm2d`` + activation (same weights) before ``prepare_fx``.

On the qnnpack engine (torch 2.14) quantised ``relu6``/``hardtanh``/``clamp`` return wrong values for
channels-last tensors, which every quantised conv outputs: a MobileNetV2 came out at chance. For
qnnpack, conv-bn-ReLU6 therefore becomes conv-bn-ReLU, which fuses into one quantised conv, with its
calibrated output range capped at [0, 6]: saturating at 6 is ReLU6, done by the conv's requantisation.

PTQ methods beyond the default (each optional, see docs/quantization.md): the activation observer
(``ACTIVATION_OBSERVERS``), cross-layer equalisation of conv -> (ReLU) -> conv pairs (``equalize``),
empirical bias correction (``correct_bias``) and accuracy-controlled mixed precision, which keeps the most
sensitive blocks in float (``float_units``, ``fewest_float_units``).

INT8 artifacts use the project's one checkpoint format: the quantised state dict plus the
FP32 description, loadable with ``torch.load(weights_only=True)``. ``load_quantized`` rebuilds
the module (FP32 model -> same unfolding -> prepare -> convert with the same float layers -> load the INT8 weights).
"""
from __future__ import annotations

import copy
import functools
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from types import TracebackType

import torch
from timm.layers import BatchNormAct2d
from timm.layers.linear import Linear as TimmLinear
from torch import nn
from torch.ao.nn import intrinsic
from torch.ao.nn import quantized as nnq
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import (
    FakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QConfig,
    QConfigMapping,
    default_fused_per_channel_wt_fake_quant,
    default_fused_wt_fake_quant,
    default_per_channel_weight_observer,
    default_weight_observer,
    get_default_qat_qconfig_mapping,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from models.factory import model_from_checkpoint
from models.int8 import DEFAULT_OBSERVER, OBSERVERS, QuantizationError, set_backend
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.description import RunDescription
from utils.io import write_serialised

PERCENTILE_TAIL = 1e-4  # "percentile" observer: clip the 0.01 % lowest and highest calibration activations
EQUALIZATION_SWEEPS = 4  # a conv shared by two pairs (pw -> dw -> pw) needs a few rounds to settle
log = logging.getLogger(__name__)


def unfold_timm_layers(model: nn.Module) -> nn.Module:
    """Replace timm's fused-looking layers by the plain torch layers FX knows (in place).

    ``BatchNormAct2d`` -> ``Sequential(BatchNorm2d, activation)`` so conv-bn-act fuses;
    timm's ``Linear`` subclass -> ``nn.Linear`` so the classifier becomes a quantised Linear.
    Weights, buffers and train/eval mode are kept.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, BatchNormAct2d):
            norm = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            norm.load_state_dict(child.state_dict())
            parts = [norm] + [m for m in (child.drop, child.act) if not isinstance(m, nn.Identity)]
            replacement = nn.Sequential(*parts)
        elif type(child) is TimmLinear:
            replacement = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            replacement.load_state_dict(child.state_dict())
        else:
            unfold_timm_layers(child)
            continue
        setattr(model, name, replacement.train(child.training))
    return model


class PercentileObserver(HistogramObserver):
    """HistogramObserver's histogram, but the range is cut at fixed percentiles instead of its L2 search.

    Clips the ``PERCENTILE_TAIL`` fraction of activations at each end: rare outliers then cost no resolution.
    """

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val == float("inf") and self.max_val == float("-inf"):  # never saw data: the parent warns
            return super().calculate_qparams()
        cdf = torch.cumsum(self.histogram, 0) / self.histogram.sum()
        edges = torch.linspace(self.min_val.item(), self.max_val.item(), self.bins + 1)
        low = torch.searchsorted(cdf, torch.tensor(PERCENTILE_TAIL, dtype=cdf.dtype))
        high = torch.searchsorted(cdf, torch.tensor(1 - PERCENTILE_TAIL, dtype=cdf.dtype)).clamp(max=self.bins - 1)
        return self._calculate_qparams(edges[low], edges[high + 1])


# PTQ activation observers; weights keep per-channel (or per-tensor) min-max. "histogram" is the backends' default.
ACTIVATION_OBSERVERS = {"minmax": MinMaxObserver, "moving-average": MovingAverageMinMaxObserver,
                        "histogram": HistogramObserver, "percentile": PercentileObserver}
assert tuple(ACTIVATION_OBSERVERS) == OBSERVERS


def qconfig_mapping(backend: str, per_channel: bool = True, qat: bool = False,
                    observer: str = DEFAULT_OBSERVER) -> QConfigMapping:
    """The backend's default mapping (fixed-range ops kept) with the chosen PTQ activation observer and weight scales.

    x86/fbgemm quantise activations to 7 bits (``reduce_range``), as their default mapping does.
    """
    if qat:
        mapping = get_default_qat_qconfig_mapping(backend)
        weight = default_fused_per_channel_wt_fake_quant if per_channel else default_fused_wt_fake_quant
        activation = mapping.global_qconfig.activation
    else:
        mapping = get_default_qconfig_mapping(backend)
        weight = default_per_channel_weight_observer if per_channel else default_weight_observer
        activation = ACTIVATION_OBSERVERS[observer].with_args(reduce_range=backend != "qnnpack")
    return mapping.set_global(QConfig(activation=activation, weight=weight))


def _conv_bn_relu6_chains(model: nn.Module) -> list[tuple[str, str, str]]:
    """Module names of each conv -> BatchNorm2d -> ReLU6 chain in the traced graph (each link used once)."""
    modules = dict(model.named_modules())

    def single_module_input(node: torch.fx.Node, kind: type) -> torch.fx.Node | None:
        source = node.args[0] if node.args else None
        if (isinstance(source, torch.fx.Node) and source.op == "call_module" and type(modules[source.target]) is kind
                and len(source.users) == 1):
            return source
        return None

    chains = []
    for node in torch.fx.symbolic_trace(model).graph.nodes:
        if node.op == "call_module" and type(modules[node.target]) is nn.ReLU6:
            norm = single_module_input(node, nn.BatchNorm2d)
            conv = single_module_input(norm, nn.Conv2d) if norm is not None else None
            if conv is not None:
                chains.append((conv.target, norm.target, node.target))
    return chains


def relu6_to_relu(model: nn.Module) -> list[str]:
    """qnnpack workaround, in place: each conv-bn-ReLU6 becomes conv-bn-ReLU; returns those convs' names.

    The caller caps each fused conv's output range at [0, 6] (``clip_at_six``), which restores ReLU6.
    """
    chains = _conv_bn_relu6_chains(model)
    for _, _, act in chains:
        parent, _, attribute = act.rpartition(".")
        setattr(model.get_submodule(parent), attribute, nn.ReLU().train(model.training))
    return [conv for conv, _, _ in chains]


@functools.cache
def _at_most_six(observer: type) -> type:
    """``observer`` whose range is capped at [0, 6]: quantising a ReLU output with it saturates at 6, i.e. ReLU6."""
    class AtMostSix(observer):
        def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
            scale, zero_point = super().calculate_qparams()
            return scale.clamp(max=6.0 / 255), zero_point
    return AtMostSix


FUSED_CONV_RELU = (intrinsic.ConvReLU2d, intrinsic.qat.ConvReLU2d, intrinsic.qat.ConvBnReLU2d)


def clip_at_six(prepared: torch.fx.GraphModule, convs: list[str], qat: bool, observer: str = DEFAULT_OBSERVER) -> None:
    """Give each named fused conv-ReLU an output quantiser calibrated as usual but capped at [0, 6].

    A fake quantiser also for PTQ: calibration must see the clipped values the INT8 model produces.
    """
    observer = _at_most_six(MovingAverageMinMaxObserver if qat else ACTIVATION_OBSERVERS[observer])
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target in convs:
            if not isinstance(prepared.get_submodule(node.target), FUSED_CONV_RELU):  # unfused: clipping would be wrong
                raise QuantizationError(f"'{node.target}' did not fuse with its ReLU: cannot quantise its ReLU6 for qnnpack")
            (output_observer,) = node.users
            quantiser = FakeQuantize(observer=observer, quant_min=0, quant_max=255, dtype=torch.quint8)
            setattr(prepared, output_observer.target, quantiser.train(prepared.training))


def _blocking_module(model: nn.Module, trace: TracebackType | None) -> str:
    """The innermost module of ``model`` whose forward was running when tracing failed."""
    names = {id(module): name for name, module in model.named_modules()}
    found = ""
    while trace is not None:
        owner = trace.tb_frame.f_locals.get("self")
        if id(owner) in names:
            found = f"'{names[id(owner)] or 'model'}' ({type(owner).__name__})"
        trace = trace.tb_next
    return found


def prepare(model: nn.Module, backend: str, img_size: int, per_channel: bool = True, qat: bool = False,
            observer: str = DEFAULT_OBSERVER) -> torch.fx.GraphModule:
    """Unfold, trace and insert observers (PTQ, eval mode) or fake quantisation (QAT, train mode).

    ``meta`` keeps the mapping (``convert`` extends it with float modules), the ReLU6 convs (never float: their ReLU6
    is the INT8 requantisation) and the units mixed precision may float (``float_units``).
    """
    set_backend(backend)
    model = unfold_timm_layers(copy.deepcopy(model).cpu().train(qat))
    example = (torch.zeros(1, 3, img_size, img_size),)
    insert = prepare_qat_fx if qat else prepare_fx
    try:
        relu6_convs = relu6_to_relu(model) if backend == "qnnpack" else []
        mapping = qconfig_mapping(backend, per_channel, qat, observer)
        prepared = insert(model, mapping, example)
    except Exception as error:  # tracing raises TraceError, TypeError, RuntimeError... from user code
        where = _blocking_module(model, error.__traceback__)
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise QuantizationError(
            f"{type(model).__name__} cannot be traced for FX quantisation; module {where or '(top level)'} stops it: {first_line}"
        ) from None
    clip_at_six(prepared, relu6_convs, qat, observer)
    prepared.meta.update(qconfig_mapping=mapping, relu6_convs=relu6_convs, float_units=float_units(model))
    return prepared


def convert(prepared: torch.fx.GraphModule, img_size: int, float_layers: Iterable[str] = ()) -> torch.fx.GraphModule:
    """An INT8 CPU copy of a prepared (calibrated or QAT) model, ``float_layers`` left in FP32; ``prepared`` is untouched.

    One test forward names the op when a float op has no quantised kernel.
    """
    mapping = copy.deepcopy(prepared.meta["qconfig_mapping"])
    float_layers = list(float_layers)
    for name in float_layers:
        mapping.set_module_name(name, None)  # a block's name floats everything inside it
    for conv in prepared.meta["relu6_convs"]:  # their ReLU6 is the INT8 requantisation: never float
        if any(conv == name or conv.startswith(f"{name}.") for name in float_layers):
            mapping.set_module_name(conv, mapping.global_qconfig)
    converted = convert_fx(copy.deepcopy(prepared).cpu().eval(), qconfig_mapping=mapping)
    try:
        with torch.inference_mode():
            converted(torch.zeros(1, 3, img_size, img_size))
    except (NotImplementedError, RuntimeError) as error:
        op = re.search(r"Could not run '([^']+)'", str(error))
        reason = (f"{op.group(1)} has no quantised CPU kernel" if op else
                  f"the {torch.backends.quantized.engine} kernels reject it: {str(error).strip().splitlines()[-1]}")
        raise QuantizationError(f"the INT8 model cannot run: {reason}") from None
    return converted


def _weighted(module: nn.Module) -> nn.Module:
    """The conv/linear inside a fused float module (conv-ReLU), or the module itself."""
    return module[0] if isinstance(module, intrinsic._FusedModule) else module


def _equalizable_pairs(prepared: torch.fx.GraphModule) -> list[tuple[nn.Conv2d, nn.Conv2d]]:
    """(first, second) convs where the first's output, through ReLU or nothing, feeds only the second.

    ReLU commutes with positive per-channel scales; hardswish, ReLU6 (and qnnpack's ReLU capped at 6), SE blocks and
    residual adds do not, so those links are left alone. The second conv must be dense or depthwise.
    """
    excluded = set(prepared.meta["relu6_convs"])
    module = prepared.get_submodule  # not named_modules(): shared observers appear there under one name only
    pairs = []
    for node in prepared.graph.nodes:
        if node.op != "call_module" or type(_weighted(module(node.target))) is not nn.Conv2d:
            continue
        second = _weighted(module(node.target))
        observer = node.args[0]
        first_node = observer.args[0] if isinstance(observer, torch.fx.Node) and observer.args else None
        if (not isinstance(first_node, torch.fx.Node) or first_node.op != "call_module" or first_node.target in excluded
                or len(first_node.users) != 1 or len(observer.users) != 1):
            continue
        first = module(first_node.target)
        relu_or_none = type(first) is intrinsic.ConvReLU2d or type(first) is nn.Conv2d
        if relu_or_none and type(_weighted(first)) is nn.Conv2d and second.groups in (1, second.in_channels):
            pairs.append((_weighted(first), second))
    return pairs


@torch.no_grad()
def _equalize_pair(first: nn.Conv2d, second: nn.Conv2d) -> None:
    """Scale channel i of ``first`` by 1/s_i and of ``second``'s input by s_i so both weight ranges become sqrt(r1 r2)."""
    depthwise = second.groups == second.in_channels and second.groups > 1
    range1 = first.weight.abs().amax(dim=(1, 2, 3))
    range2 = second.weight.abs().amax(dim=(1, 2, 3) if depthwise else (0, 2, 3))
    scale = torch.where((range1 > 0) & (range2 > 0), (range1 / range2).sqrt(), torch.ones_like(range1))
    first.weight.div_(scale.view(-1, 1, 1, 1))
    if first.bias is not None:
        first.bias.div_(scale)
    second.weight.mul_(scale.view(-1, 1, 1, 1) if depthwise else scale.view(1, -1, 1, 1))


def equalize(prepared: torch.fx.GraphModule) -> int:
    """Cross-layer equalisation (Nagel et al., 2019) of a prepared PTQ model before calibration; returns the pairs.

    Needs BatchNorm folded into the convs, which ``prepare_fx`` does in eval mode; the FP32 function is unchanged.
    """
    pairs = _equalizable_pairs(prepared)
    for _ in range(EQUALIZATION_SWEEPS):
        for first, second in pairs:
            _equalize_pair(first, second)
    return len(pairs)


def _weight_error_mean(module: nn.Module, delta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Per output channel, the batch sum of the mean error that the weight rounding ``delta`` adds to the output."""
    if isinstance(module, nnq.Conv2d):
        error = nn.functional.conv2d(inputs, delta, None, module.stride, module.padding, module.dilation, module.groups)
        return error.mean(dim=(2, 3)).sum(0)
    return nn.functional.linear(inputs, delta).flatten(0, -2).mean(0) * len(inputs)


@torch.inference_mode()
def correct_bias(converted: torch.fx.GraphModule, prepared: torch.fx.GraphModule,
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]], max_batches: int) -> int:
    """Empirical bias correction (Nagel et al., 2019), in place; returns how many layers were corrected.

    Weight rounding shifts each INT8 conv/linear output channel's mean by E[(W_int8 - W) x]; that mean, over the
    calibration images as they reach the layer in the INT8 model, is subtracted from its bias (before its ReLU).
    """
    layers = {name: module for name, module in converted.named_modules() if isinstance(module, (nnq.Conv2d, nnq.Linear))}
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str, module: nn.Module, delta: torch.Tensor) -> Callable:
        def accumulate(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sums[name] = sums.get(name, 0) + _weight_error_mean(module, delta, args[0].dequantize())
        return accumulate

    handles = [module.register_forward_pre_hook(hook(name, module, module.weight().dequantize()
                                                     - _weighted(prepared.get_submodule(name)).weight))
               for name, module in layers.items()]
    seen = 0
    try:
        for images, _ in islice(batches, max_batches):
            converted(images.cpu())
            seen += len(images)
    finally:
        for handle in handles:
            handle.remove()
    for name, module in layers.items():
        bias = module.bias() if module.bias() is not None else torch.zeros(module.weight().shape[0])
        module.set_weight_bias(module.weight(), bias - sums[name] / seen)
    return len(layers)


def _has_weights(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())


def float_units(model: nn.Module) -> list[list[str]]:
    """Candidates for mixed precision, in module order: each block of a stage container (timm's ``blocks.i.j``,
    ResNet's ``layerN.i``), the other top-level children (stem, head, classifier) with each weightless one (an
    activation, a pooling) joined to the weighted unit before it.

    Whole blocks, not single layers: on MobileNetV3 the INT8 loss sits in the activation quantisers (hardswish,
    squeeze-excite products, residual adds) as much as in the convs, and floating every conv/linear still lost
    3 points (docs/quantization.md).
    """
    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            stage = isinstance(child, (nn.Sequential, nn.ModuleList)) and any(any(True for _ in c.children()) for c in child.children())
            yield from walk(child, f"{prefix}{name}.") if stage else [(f"{prefix}{name}", child)]

    units: list[list[str]] = []
    pending: list[str] = []  # weightless modules before the first weighted one
    for name, child in walk(model, ""):
        if _has_weights(child):
            units.append(pending + [name])
            pending = []
        elif units:
            units[-1].append(name)
        else:
            pending.append(name)
    return units


def fewest_float_units(units: list[list[str]], build: Callable[[list[str]], nn.Module],
                       accuracy: Callable[[nn.Module], float], target: float) -> tuple[nn.Module, list[str], float]:
    """Greedy forward selection: float, one at a time, the unit whose float version raises ``accuracy`` most, until it
    reaches ``target``. Returns the model, its float module names and its accuracy.

    Accuracy is measured, not predicted: one unit alone can recover nothing while it and its neighbours recover all
    (MobileNetV3-Small: stem + first blocks), which ranks by a per-unit error miss. Cost: up to ``len(units)``
    evaluations per unit added.
    """
    chosen: list[list[str]] = []
    model = build([])
    best = accuracy(model)
    log.info("  all INT8: accuracy %.4f (target %.4f)", best, target)
    while best < target - 1e-9 and len(chosen) < len(units):  # accuracies are fractions of images: no rounding misses
        step: tuple[float, list[str], nn.Module] | None = None  # the best candidate so far: one model kept, not all
        for unit in units:
            if unit not in chosen:
                candidate = build([name for group in chosen + [unit] for name in group])
                score = accuracy(candidate)
                if step is None or score > step[0]:
                    step = (score, unit, candidate)
        best, unit, model = step
        chosen.append(unit)
        log.info("  + %s in float: accuracy %.4f (target %.4f)", "+".join(unit), best, target)
    if best < target - 1e-9:
        log.warning("accuracy %.4f misses %.4f even with every unit in float", best, target)
    elif 2 * len(chosen) > len(units):  # met, but the "INT8" model is mostly FP32: say so rather than hand it over quietly
        log.warning("%d of %d units stay in float to reach %.4f: the model is mostly FP32 in size and speed; "
                    "try QAT, a looser bound, or a model that quantises better (ReLU6, e.g. MobileNetV2)",
                    len(chosen), len(units), target)
    return model, [name for group in chosen for name in group], best


def freeze_fx_batchnorm(prepared: nn.Module) -> None:
    """QAT schedule's BatchNorm freeze for an FX-prepared model."""
    prepared.apply(freeze_bn_stats)


def save_quantized(path: Path | str, converted: torch.fx.GraphModule, fp32_payload: dict, settings: dict,
                   extra: dict | None = None) -> None:
    """INT8 checkpoint: quantised tensors + the FP32 description and tensor shapes to rebuild from."""
    description = fp32_payload["description"].replace(
        **(extra or {}), quantization={**settings, "fp32_shapes": {k: list(v.shape) for k, v in fp32_payload["model"].items()}},
    )
    save_checkpoint(path, converted.state_dict(), description)


def build_quantized(description: RunDescription) -> torch.fx.GraphModule:
    """The empty INT8 module a description calls for (weights still to load)."""
    settings = description.quantization
    shapes = {k: torch.ones(shape) for k, shape in settings["fp32_shapes"].items()}  # placeholder values: overwritten
    fp32 = model_from_checkpoint({"description": description, "model": shapes})
    size = description.img_size
    prepared = prepare(fp32, settings["backend"], size, settings["per_channel"], qat=settings["mode"] == "qat",
                       observer=settings.get("observer", DEFAULT_OBSERVER))  # checkpoints before the option: default
    with warnings.catch_warnings():  # observers never saw data: their ranges are replaced by the stored ones
        warnings.filterwarnings("ignore", message="must run observer before calling calculate_qparams")
        return convert(prepared, size, settings.get("float_layers", ()))


def load_quantized(path: Path | str) -> torch.fx.GraphModule:
    """Load an INT8 checkpoint written by quantization-train.py (weights_only, no pickled modules)."""
    payload = load_checkpoint(path)
    if payload["description"].quantization is None:
        raise CheckpointError(f"'{path}' is an FP32 checkpoint, not an INT8 one: quantise it with quantization-train.py")
    if payload["description"].quantization.get("api", "fx") != "fx":  # models.quantize_pt2e imports this module
        raise CheckpointError(f"'{path}' is a PT2E INT8 checkpoint: load it with models.quantize_pt2e.load_quantized "
                              "(or models.quantize_pt2e.load_int8, which loads both kinds)")
    model = build_quantized(payload["description"])
    model.load_state_dict(payload["model"])
    return model.eval()


def save_torchscript(converted: torch.fx.GraphModule, path: Path | str, img_size: int) -> None:
    """Traced TorchScript file for deployment: ``torch.jit.load`` needs no toolkit code."""
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates jit; it is still the INT8 deploy format
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # INT8 scales are constants of the deployed model
        traced = torch.jit.trace(converted.eval(), torch.zeros(1, 3, img_size, img_size))
        write_serialised(path, lambda buffer: torch.jit.save(traced, buffer))

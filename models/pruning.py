"""Structured channel pruning on Torch-Pruning's dependency graph (DepGraph).

Whole channels are removed from coupled layer groups (depthwise convs, residual adds,
squeeze-excite), so the dense model really shrinks. A pruned model is stored as plain data
(every tensor's shape and every layer's channel attributes) and rebuilt from its base timm
model by ``apply_architecture``, so pruned checkpoints load with ``weights_only=True``.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp

from models.stats import count_flops
from utils.errors import UserError

IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "taylor": tp.importance.TaylorImportance,
    "bn-scale": tp.importance.BNScaleImportance,
    "random": tp.importance.RandomImportance,
}
MAX_RATIO = 0.9  # no layer group loses more: Torch-Pruning skips a group it would empty, so FLOPs would rise again
FLOPS_STEPS = 100  # --target-flops prunes in steps of MAX_RATIO / FLOPS_STEPS of the channels until the target is met
LAYER_ATTRIBUTES = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features")
FLOPS_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


class PruningError(UserError):
    """A pruning request that cannot be met; the message says what to change."""


def parse_flops(text: str, current: int) -> int:
    """``30M``, ``1.5G``, ``800k``, ``12000000`` or ``50%`` (of ``current``) -> FLOPs."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg%]?)\s*", text.lower())
    if not match:
        raise PruningError(f"--target-flops '{text}' is not a FLOPs count: write e.g. 30M, 1.5G, 800k or 50%")
    value, unit = float(match.group(1)), match.group(2)
    return round(current * value / 100) if unit == "%" else round(value * FLOPS_UNITS[unit])


@dataclass(frozen=True)
class PruneConfig:
    importance: str  # a key of IMPORTANCES
    global_pruning: bool
    steps: int  # prune-then-fine-tune rounds
    round_to: int | None = None
    ratio: float | None = None  # Torch-Pruning's pruning_ratio, reached after the last step
    target_flops: int | None = None  # or prune until the model's FLOPs are at most this

    def describe(self) -> dict:
        return {"importance": self.importance, "global": self.global_pruning, "steps": self.steps,
                "round_to": self.round_to, "ratio": self.ratio, "target_flops": self.target_flops}


def _make_pruner(model: torch.nn.Module, img_size: int, config: PruneConfig, importance: tp.importance.Importance,
                 ratio: float, steps: int) -> tp.pruner.BasePruner:
    """The classifier is ignored (its outputs are the classes); the 3 input channels are never prunable."""
    device = next(model.parameters()).device
    return tp.pruner.BasePruner(
        model, torch.zeros(1, 3, img_size, img_size, device=device), importance=importance,
        global_pruning=config.global_pruning, pruning_ratio=ratio, iterative_steps=steps,
        max_pruning_ratio=MAX_RATIO if config.global_pruning else 1.0, round_to=config.round_to,
        ignored_layers=[model.get_classifier()],
    )


def minimum_flops(model: torch.nn.Module, img_size: int, config: PruneConfig) -> int:
    """FLOPs left when every layer group loses MAX_RATIO of its channels: the floor of --target-flops."""
    floor = copy.deepcopy(model).cpu().eval()
    _make_pruner(floor, img_size, config, IMPORTANCES["l1"](), MAX_RATIO, 1).step()
    return count_flops(floor, img_size)


class ChannelPruner:
    """Prunes ``model`` in place over ``config.steps`` rounds: round k of K reaches ratio * k / K,
    or FLOPs of base - (base - target) * k / K.

    ``batches`` (images, targets) give the loss gradients that Taylor importance scores.
    """

    def __init__(self, model: torch.nn.Module, img_size: int, config: PruneConfig,
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()):
        self.model, self.img_size, self.config = model.eval(), img_size, config
        self.batches = list(batches)
        if config.importance == "taylor" and not self.batches:
            raise ValueError("Taylor importance needs batches to compute gradients")
        self.base_flops = count_flops(model, img_size)
        if config.target_flops is not None:
            if config.target_flops >= self.base_flops:
                raise PruningError(f"--target-flops {config.target_flops:,} is not below the model's current "
                                   f"{self.base_flops:,} FLOPs: choose a smaller target")
            floor = minimum_flops(model, img_size, config)
            if config.target_flops < floor:
                raise PruningError(f"--target-flops {config.target_flops:,} is below the {floor:,} FLOPs left when "
                                   f"every layer keeps {1 - MAX_RATIO:.0%} of its channels: choose a larger target")
            ratio, steps = MAX_RATIO, FLOPS_STEPS
            self.base_quick_flops = self._quick_flops()
        else:
            ratio, steps = config.ratio, config.steps
        self.pruner = _make_pruner(model, img_size, config, IMPORTANCES[config.importance](), ratio, steps)

    def step(self, round_index: int) -> int:
        """Prune to round ``round_index`` (1..K)'s goal; returns the model's FLOPs."""
        self.model.eval()  # the FLOPs estimate runs forward passes: BN statistics must not move
        if self.config.target_flops is None:
            self._prune_once()
            return count_flops(self.model, self.img_size)
        goal = self.base_flops - (self.base_flops - self.config.target_flops) * round_index / self.config.steps
        flops = count_flops(self.model, self.img_size)
        while flops > goal:
            if self.pruner.current_step >= self.pruner.iterative_steps:
                raise PruningError(f"pruning stopped at {flops:,} FLOPs, above --target-flops {self.config.target_flops:,}: "
                                   "choose a larger target")
            self._prune_once()
            if self._quick_flops() / self.base_quick_flops <= goal / self.base_flops:
                flops = count_flops(self.model, self.img_size)  # fvcore confirms; it is ~5x slower than the estimate
        return flops

    def _quick_flops(self) -> float:
        """Torch-Pruning's hook-based MAC count: tracks fvcore's FLOPs ratio within ~1% (a bit below it)."""
        device = next(self.model.parameters()).device
        macs, _ = tp.utils.count_ops_and_params(self.model, torch.zeros(1, 3, self.img_size, self.img_size, device=device))
        return macs

    def _prune_once(self) -> None:
        if self.config.importance == "taylor":
            self._accumulate_gradients()
        self.pruner.step()
        self.model.zero_grad(set_to_none=True)

    def _accumulate_gradients(self) -> None:
        """Loss gradients in eval mode (BN statistics stay as trained)."""
        device = next(self.model.parameters()).device
        self.model.eval()
        self.model.zero_grad(set_to_none=True)
        for images, targets in self.batches:
            F.cross_entropy(self.model(images.to(device)), targets.to(device)).backward()


def architecture(model: torch.nn.Module) -> dict:
    """The pruned architecture as plain data: every state tensor's shape and every layer's channel attributes."""
    return {
        "shapes": {name: list(tensor.shape) for name, tensor in model.state_dict().items()},
        "layers": {
            name: {a: getattr(module, a) for a in LAYER_ATTRIBUTES if isinstance(getattr(module, a, None), int)}
            for name, module in model.named_modules() if next(module.parameters(recurse=False), None) is not None
        },
    }


def apply_architecture(model: torch.nn.Module, arch: dict) -> torch.nn.Module:
    """Re-shape the freshly built base model to a stored ``architecture`` (values still to be loaded)."""
    shapes = arch["shapes"]
    for name, module in model.named_modules():
        for attribute, value in arch["layers"].get(name, {}).items():
            setattr(module, attribute, value)
        prefix = f"{name}." if name else ""
        for key, param in list(module.named_parameters(recurse=False)):
            if prefix + key in shapes:
                setattr(module, key, torch.nn.Parameter(param.new_empty(shapes[prefix + key]), requires_grad=param.requires_grad))
        for key, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and prefix + key in shapes:
                setattr(module, key, buffer.new_empty(shapes[prefix + key]))
    return model

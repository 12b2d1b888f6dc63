"""Build timm models by name, or by family + width multiplier ``alpha`` (timm's own rounding)."""
from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models import efficientnet, ghostnet, mobilenetv3, repghost

from models.hub import HUB_TIMEOUT_S, cached_weights, reachable, weights_source
from models.pruning import apply_architecture
from utils.checkpoint import CheckpointError
from utils.description import RunDescription
from utils.errors import UserError

log = logging.getLogger(__name__)


class ModelError(UserError):
    """A model request the user can fix; its message says how."""


@dataclass(frozen=True)
class Family:
    generator: Callable[..., torch.nn.Module]
    base_variant: str  # variant at alpha 1.0; the generators read block layout from it


def _width(generator: Callable, keyword: str) -> Callable:
    return lambda variant, alpha, **kw: generator(variant, **{keyword: alpha}, **kw)


FAMILIES: dict[str, Family] = {
    "mobilenetv1": Family(_width(efficientnet._gen_mobilenet_v1, "channel_multiplier"), "mobilenetv1_100"),
    "mobilenetv2": Family(_width(efficientnet._gen_mobilenet_v2, "channel_multiplier"), "mobilenetv2_100"),
    "mobilenetv3_small": Family(_width(mobilenetv3._gen_mobilenet_v3, "channel_multiplier"), "mobilenetv3_small_100"),
    "mobilenetv3_large": Family(_width(mobilenetv3._gen_mobilenet_v3, "channel_multiplier"), "mobilenetv3_large_100"),
    "lcnet": Family(_width(mobilenetv3._gen_lcnet, "channel_multiplier"), "lcnet_100"),
    "mnasnet": Family(_width(efficientnet._gen_mnasnet_b1, "channel_multiplier"), "mnasnet_100"),
    "ghostnet": Family(_width(ghostnet._create_ghostnet, "width"), "ghostnet_100"),
    "repghostnet": Family(_width(repghost._create_repghostnet, "width"), "repghostnet_100"),
}


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a registered timm name, or a family at a width multiplier."""

    name: str  # timm name, or "<family>_alpha<alpha>" where timm registers no such variant
    family: str | None = None
    alpha: float | None = None

    def to_dict(self) -> dict:
        return {"model": self.name, "family": self.family, "alpha": self.alpha}

    @classmethod
    def of(cls, description: RunDescription) -> ModelSpec:
        """The model a checkpoint describes; CheckpointError (one line) for one this timm and toolkit cannot build."""
        spec = cls(description.model, description.family, description.alpha)
        known = timm.is_model(spec.name) or (spec.family in FAMILIES and isinstance(spec.alpha, int | float) and spec.alpha > 0)
        if not known:
            raise CheckpointError(f"the checkpoint describes a model '{spec.name}' (family {spec.family}) that timm "
                                  f"{timm.__version__} cannot build: it was made with another timm version, or is damaged")
        return spec


def resolve_model(name: str, alpha: float | None = None) -> ModelSpec:
    """Turn ``--model``/``--alpha`` into a ModelSpec, or raise ModelError with the closest names."""
    if alpha is not None and alpha <= 0:
        raise ModelError(f"--alpha must be > 0, got {alpha}")
    if name in FAMILIES:
        alpha = 1.0 if alpha is None else alpha
        registered = f"{name}_{round(alpha * 100):03d}"
        if abs(alpha * 100 - round(alpha * 100)) < 1e-9 and timm.is_model(registered):
            return ModelSpec(registered, name, alpha)
        return ModelSpec(f"{name}_alpha{alpha:g}", name, alpha)
    if timm.is_model(name):
        if alpha is not None:
            raise ModelError(f"--alpha works with a family name ({', '.join(FAMILIES)}), not with '{name}'")
        return ModelSpec(name)
    close = difflib.get_close_matches(name, list(FAMILIES) + timm.list_models(), n=5, cutoff=0.6)
    hint = f" Closest: {', '.join(close)}." if close else " See timm.list_models()."
    raise ModelError(f"unknown model '{name}'.{hint}")


def _build(spec: ModelSpec, num_classes: int, pretrained: bool, weights_file: Path | None = None) -> torch.nn.Module:
    if spec.family is not None and not timm.is_model(spec.name):
        family = FAMILIES[spec.family]
        return family.generator(family.base_variant, spec.alpha, pretrained=False, num_classes=num_classes)
    overlay = {"file": str(weights_file)} if weights_file is not None else None
    return timm.create_model(spec.name, pretrained=pretrained, num_classes=num_classes, pretrained_cfg_overlay=overlay)


def create_model(spec: ModelSpec, num_classes: int, pretrained: bool = True) -> tuple[torch.nn.Module, bool]:
    """Build the model; returns it and whether pretrained weights were really loaded.

    Pretrained weights come from timm's hub. When they cannot be fetched (the host does not
    answer within HUB_TIMEOUT_S and no local copy exists, or no weights exist for this width)
    a loud warning goes to stderr and training starts from random init at once.
    """
    if not pretrained:
        return _build(spec, num_classes, False), False
    if not timm.is_model(spec.name) or not timm.models.get_pretrained_cfg(spec.name):
        _warn(f"no pretrained weights exist for {spec.name}; starting from random init")
        return _build(spec, num_classes, False), False
    cfg = timm.models.get_pretrained_cfg(spec.name).to_dict()
    source, local = weights_source(cfg), None
    if source and not reachable(source):
        local = cached_weights(cfg)
        if local is None:
            _warn(f"{urlparse(source).hostname} cannot be reached (gave up after at most {HUB_TIMEOUT_S:g} s) and "
                  f"{spec.name}'s weights are not cached: starting from random init (pretrained=False). "
                  "Run once online, or pass --weights FILE")
            return _build(spec, num_classes, False), False
    try:
        return _build(spec, num_classes, True, local), True
    except (OSError, RuntimeError, ValueError) as error:
        _warn(f"could not load pretrained weights for {spec.name} ({type(error).__name__}: {error}); starting from random init")
        return _build(spec, num_classes, False), False


def _warn(message: str) -> None:
    log.warning("*** %s ***", message)


def load_weights(model: torch.nn.Module, path: str) -> list[str]:
    """Load local weights (a checkpoint of this project or a plain state dict).

    Tensors whose shape does not match (a classifier for another class count) are left
    as initialised; returns their names.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"--weights file '{path}' does not exist") from None
    except Exception as error:  # torch raises many types for a file that is not a state dict
        raise ModelError(f"--weights '{path}' is not a readable PyTorch state dict ({error})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelError(f"--weights '{path}' holds no state dict")
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in state.items() if k in own and k not in skipped}
    if not usable:
        raise ModelError(f"--weights '{path}' has no tensor matching {type(model).__name__}'s layers")
    model.load_state_dict(usable, strict=False)
    return skipped


def head_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the classifier parameters (they get the higher learning rate).

    Models without timm's ``get_classifier`` (FX graph modules in QAT) have no separate head group.
    """
    if not hasattr(model, "get_classifier"):
        return set()
    return {id(p) for p in model.get_classifier().parameters()}


def data_config(model: torch.nn.Module) -> dict:
    """Normalisation of the model's pretrained config (ImageNet mean/std by default)."""
    config = timm.data.resolve_model_data_config(model)
    return {"mean": [float(x) for x in config["mean"]], "std": [float(x) for x in config["std"]]}


__all__ = ["FAMILIES", "ModelError", "ModelSpec", "create_model", "data_config", "head_parameters", "load_weights", "model_from_checkpoint",
           "resolve_model"]


def model_from_checkpoint(payload: dict) -> torch.nn.Module:
    """Rebuild the FP32 model a checkpoint describes and load its weights (no pickled modules)."""
    description = payload["description"]
    spec = ModelSpec.of(description)
    model, _ = create_model(spec, description.num_classes, pretrained=False)
    if description.pruned is not None:  # prune.py: re-shape the base model to the stored channel counts
        apply_architecture(model, description.pruned["architecture"])
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:  # missing, unexpected or mis-shaped tensors
        raise CheckpointError(f"the checkpoint's weights do not fit the {description.model} it describes "
                              f"({str(error).splitlines()[0]})") from None
    return model.eval()

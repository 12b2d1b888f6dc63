"""Typed settings below the scripts, and the one place that decides them.

Scripts parse flags (and a --config recipe) with argparse and hand ``resolve(vars(args), checkpoint)`` down;
nothing below them reads an ``argparse.Namespace``. ``resolve`` decides the image size, the data source and root,
the split and the device from the flags and, where a checkpoint is given, what it pins (``CHECKPOINT_PINS``): a flag
that contradicts the checkpoint is refused in one line. Variants (QAT's own schedule, evaluation without
augmentation) are ``with_data`` / ``with_training`` copies.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from data.stitchingnet import FABRICS
from data.synthetic import MIN_IMG_SIZE
from utils.description import RunDescription, SyntheticSource
from utils.errors import UserError
from utils.operating_point import DEFAULT_BUDGET

DEFAULT_DATA_ROOT = "dataset/StitchingNet"
DEFAULT_IMG_SIZE = 224
# Not settings of a run: how this invocation talks, which recipe it read, what it typed.
NOT_SETTINGS = frozenset({"verbosity", "config", "explicit"})


class SettingsError(UserError):
    """A flag that contradicts a given checkpoint, or one the script or its mode would ignore."""


@dataclass(frozen=True)
class DataConfig:
    data_root: str | None = None
    synthetic: bool = False
    synthetic_per_class: int | None = None
    synthetic_zoom: float = 1.0
    img_size: int | None = None  # None: a given checkpoint's size, else the default
    augment: int = 1
    test_fabrics: list[str] | None = None
    fabrics: list[str] | None = None  # None: every fabric in the data
    add_data: list[str] | None = None  # labelled folders joined to the training split only (main.py --add-data)
    workers: int = 0
    batch_size: int = 32
    source: SyntheticSource | None = None  # resolved: the synthetic set, or None for the images under data_root


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    patience: int = 5
    lr: float = 1e-3
    lr_backbone: float | None = None  # None: 1e-4 after pretrained weights, else lr
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    warmup_epochs: int = 0
    clip_grad_norm: float | None = None  # None: no clipping

    def __post_init__(self) -> None:
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise UserError(f"--warmup-epochs ({self.warmup_epochs}) must be smaller than --epochs ({self.epochs})")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 2025  # split, initialisation and augmentation
    output_dir: str = "runs"
    pretrained: bool = True
    weights: str | None = None
    false_alarm_budget: float = DEFAULT_BUDGET  # the operating point's validation false-alarm rate
    device: str | None = None  # None: cuda when available, else cpu
    amp: bool | None = None  # None: on for CUDA, off for the CPU
    pinned: RunDescription | None = None  # the checkpoint whose data, split and classes the run keeps
    flags: dict[str, Any] = field(default_factory=dict)  # the resolved command line: config.yaml, checkpoints (--resume)

    @classmethod
    def from_flags(cls, flags: dict[str, Any], pinned: RunDescription | None = None) -> RunConfig:
        """From parsed flags as they are (resolved ones: see ``resolve``); absent flags keep their defaults."""
        flags = {key: str(value) if hasattr(value, "__fspath__") else value for key, value in flags.items()
                 if key not in NOT_SETTINGS}
        data = DataConfig(**_known(DataConfig, flags, exclude={"source"}))
        training = TrainConfig(**_known(TrainConfig, flags))
        return cls(data, training, **_known(cls, flags, exclude={"data", "training", "flags", "pinned"}), pinned=pinned,
                   flags=flags)

    def with_data(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **changes))

    def with_training(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, training=dataclasses.replace(self.training, **changes))


def _known(kind: type, flags: dict[str, Any], exclude: frozenset | set = frozenset()) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(kind)} - set(exclude)
    return {key: value for key, value in flags.items() if key in names}


@dataclass(frozen=True)
class Pin:
    """A setting a given checkpoint decides: ``stored`` reads it; ``may_change``: a flag may set another value."""

    what: str
    stored: Callable[[RunDescription], Any]
    may_change: bool = False


def _synthetic(read: Callable[[SyntheticSource], Any], real: Any = None) -> Callable[[RunDescription], Any]:
    """A synthetic-set setting of a checkpoint; ``real``: the flag's default, what a real-data run leaves it at."""
    return lambda description: read(description.synthetic) if description.synthetic is not None else real


# What a checkpoint given to a script (prune, export, quantisation, distillation, main.py --resume) pins. Its
# classes and normalisation have no flag; --data-root may move the data (the split's files must be there), and
# --img-size may change the size the model is run at (not for a teacher: its student is scored at its size).
CHECKPOINT_PINS: dict[str, Pin] = {
    "synthetic": Pin("data source", lambda description: description.synthetic is not None),
    "synthetic_per_class": Pin("data source", _synthetic(lambda source: source.per_class)),
    "synthetic_zoom": Pin("data source", _synthetic(lambda source: source.zoom, 1.0)),
    "data_root": Pin("data source", lambda description: description.data_root, may_change=True),
    "fabrics": Pin("split", lambda description: description.args.get("fabrics")),
    "test_fabrics": Pin("split", lambda description: description.args.get("test_fabrics")),
    "img_size": Pin("image size", lambda description: description.img_size, may_change=True),
}


def resolve(flags: dict[str, Any], pinned: RunDescription | None = None, start: RunDescription | None = None,
            fixed: Iterable[str] = ()) -> RunConfig:
    """The run's settings from its flags and, where given, the checkpoint that pins its data (``pinned``).

    ``start``: a checkpoint a new run starts from (main.py --init), whose image size is the default. ``fixed``: pins
    this script lets no flag change (``CHECKPOINT_PINS`` names).
    """
    explicit = flags.get("explicit", frozenset())
    if pinned is not None:
        check_pins(flags, explicit, pinned, frozenset(fixed))
        flags = {**flags, **{name: pin.stored(pinned) for name, pin in CHECKPOINT_PINS.items() if not pin.may_change}}
    img_size = image_size(flags.get("img_size"), pinned or start)
    source, root = data_source(flags, img_size, pinned)
    config = RunConfig.from_flags({**flags, "img_size": img_size, "data_root": root}, pinned)
    return config.with_data(source=source)


def image_size(flag: int | None, checkpoint: RunDescription | None) -> int:
    """The one rule: the flag, else the checkpoint's size, else 224."""
    return flag or (checkpoint.img_size if checkpoint is not None else None) or DEFAULT_IMG_SIZE


def data_source(flags: dict[str, Any], img_size: int, pinned: RunDescription | None) -> tuple[SyntheticSource | None, str | None]:
    """(the synthetic set, None) or (None, the data root): the flags, else the checkpoint's data, else the default."""
    if pinned is not None and pinned.synthetic is not None:
        return pinned.synthetic, None
    if flags.get("synthetic"):
        if img_size < MIN_IMG_SIZE:
            raise SettingsError(f"--img-size {img_size} is below the synthetic set's minimum of {MIN_IMG_SIZE} px")
        fabrics = flags.get("fabrics") or []
        unknown = sorted(set(fabrics) - set(FABRICS))
        if unknown:
            raise SettingsError(f"--fabrics {','.join(unknown)}: the synthetic set's fabrics are {','.join(FABRICS)}")
        return SyntheticSource(flags.get("synthetic_per_class"), img_size, flags.get("synthetic_zoom") or 1.0,
                               "".join(fabrics) or None), None
    return None, flags.get("data_root") or (pinned.data_root if pinned is not None else None) or DEFAULT_DATA_ROOT


def check_pins(flags: dict[str, Any], explicit: Iterable[str], pinned: RunDescription, fixed: frozenset[str]) -> None:
    """One line for the first typed flag that contradicts what the checkpoint pins."""
    for name in sorted(set(explicit) & set(CHECKPOINT_PINS)):
        pin, value = CHECKPOINT_PINS[name], flags.get(name)
        stored = pin.stored(pinned)
        if name == "data_root" and pinned.synthetic is not None:
            raise SettingsError(f"--data-root: the checkpoint was trained on the synthetic set ({pinned.dataset}), and a "
                                "given checkpoint decides the data: drop --data-root")
        if (pin.may_change and name not in fixed) or _same(value, stored):
            continue
        flag = "--" + name.replace("_", "-")
        raise SettingsError(f"{flag} {_shown(value)}: the given checkpoint decides the {pin.what} ({flag} "
                            f"{_shown(stored)} there); drop {flag}, or train a new model with it")


def refuse(explicit: Iterable[str], reasons: dict[str, str]) -> None:
    """One line for the first typed flag in ``reasons`` (flag name -> why this run would not use it)."""
    for name in sorted(set(explicit) & set(reasons)):
        raise SettingsError(f"--{name.replace('_', '-')}: {reasons[name]}")


def _same(value: Any, stored: Any) -> bool:
    if isinstance(value, (list, tuple)) or isinstance(stored, (list, tuple)):
        return sorted(value or []) == sorted(stored or [])
    return value == stored


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None or isinstance(value, bool):
        return {None: "unset", True: "on", False: "off"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)

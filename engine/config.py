"""Typed settings below the scripts: what the data, training and run flags of a command line ask for.

Scripts parse flags with argparse and hand ``RunConfig.from_flags(vars(args))`` down; nothing
below them reads an ``argparse.Namespace``. Variants (QAT's own schedule, evaluation without
augmentation, the teacher's image size) are ``with_data`` / ``with_training`` copies.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from utils.errors import UserError
from utils.operating_point import DEFAULT_BUDGET


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
    flags: dict[str, Any] = field(default_factory=dict)  # the whole command line, stored in checkpoints for --resume

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> RunConfig:
        """From a script's parsed flags (or a checkpoint's stored ones); absent flags keep their defaults."""
        flags = {key: str(value) if hasattr(value, "__fspath__") else value for key, value in flags.items()}
        data = DataConfig(**_known(DataConfig, flags))
        training = TrainConfig(**_known(TrainConfig, flags))
        return cls(data, training, **_known(cls, flags, exclude={"data", "training", "flags"}), flags=flags)

    def with_data(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **changes))

    def with_training(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, training=dataclasses.replace(self.training, **changes))


def _known(kind: type, flags: dict[str, Any], exclude: frozenset | set = frozenset()) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(kind)} - set(exclude)
    return {key: value for key, value in flags.items() if key in names}

"""The run description every checkpoint carries: what was trained, on which data, how, and how it scored.

Stored as plain data (``to_dict``) so checkpoints load with ``torch.load(weights_only=True)``;
``from_dict`` checks every field, so a crafted or damaged file fails with a message naming the
field instead of a KeyError deep inside a script. Schema 1 is the untyped dict of earlier
versions (no ``schema`` key); it has the same keys and loads unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from utils.errors import UserError
from utils.operating_point import OperatingPoint, OperatingPointError

SCHEMA = 2


class DescriptionError(UserError):
    """A stored run description lacks a field or holds one of the wrong type."""


@dataclass(frozen=True)
class SyntheticSource:
    """The embedded synthetic set a run used: ``per_class`` None means the real dataset's size,
    ``fabrics`` None all eleven (else their letters, e.g. "ABJ")."""

    per_class: int | None
    img_size: int
    zoom: float = 1.0
    fabrics: str | None = None

    @property
    def label(self) -> str:
        """The results ``dataset``: zoomed sets are ranked apart from the standard one."""
        return "synthetic" if self.zoom == 1 else f"synthetic-zoom{self.zoom:g}"


@dataclass(frozen=True)
class RunDescription:
    script: str
    method: str
    model: str
    family: str | None
    alpha: float | None
    num_classes: int
    class_names: list[str]
    img_size: int
    mean: list[float]
    std: list[float]
    pretrained: bool
    dataset: str
    data_root: str
    augment: int
    seed: int
    split: dict[str, Any]
    args: dict[str, Any] = field(default_factory=dict)  # the run's command-line flags (for --resume)
    synthetic: SyntheticSource | None = None
    # best.pt: the epoch it was saved at and its validation figures; test metrics once stamped
    epoch: int | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    metrics: dict[str, float] | None = None
    operating_point: dict[str, Any] | None = None  # utils.operating_point.OperatingPoint: the defect threshold and its budget
    # optional sections written by the compression scripts
    pruned: dict[str, Any] | None = None  # prune.py: settings, base FLOPs, channel architecture
    quantization: dict[str, Any] | None = None  # quantization-train.py: backend, mode, observers, FP32 shapes
    fp32_checkpoint: str | None = None  # quantization-train.py: the checkpoint it was quantised from
    teacher: dict[str, Any] | None = None  # distill.py: the teacher's model, checkpoint and test accuracy
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other versions or tools, kept as they came
    schema: int = SCHEMA

    def replace(self, **changes: Any) -> RunDescription:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {**data.pop("extra"), **data}

    @classmethod
    def from_dict(cls, data: Any) -> RunDescription:
        if not isinstance(data, dict):
            raise DescriptionError(f"the run description is a {type(data).__name__}, not a mapping")
        if data.get("schema", 1) > SCHEMA:
            raise DescriptionError(f"run description schema {data['schema']} is newer than this toolkit's ({SCHEMA}): upgrade it")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in data]
        if missing:
            raise DescriptionError(f"the run description lacks {', '.join(missing)}")
        values = {key: value for key, value in data.items() if key in names - {"extra"}}
        values["extra"] = {key: value for key, value in data.items() if key not in names}
        synthetic = values.get("synthetic")
        if synthetic is not None:
            values["synthetic"] = _synthetic(synthetic)
        values["schema"] = SCHEMA
        description = cls(**values)
        description.check()
        return description

    def check(self) -> None:
        """Types and consistency of the fields every loader relies on."""
        _expect("model", self.model, str)
        _expect("num_classes", self.num_classes, int)
        _expect("img_size", self.img_size, int)
        if self.num_classes < 1 or self.img_size < 1:
            raise DescriptionError(f"num_classes ({self.num_classes}) and img_size ({self.img_size}) must be positive")
        if not isinstance(self.class_names, list) or not all(isinstance(name, str) for name in self.class_names):
            raise DescriptionError("class_names must be a list of strings")
        if len(self.class_names) != self.num_classes:
            raise DescriptionError(f"{len(self.class_names)} class_names for num_classes {self.num_classes}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not isinstance(values, list) or len(values) != 3 or not all(isinstance(v, int | float) for v in values):
                raise DescriptionError(f"{name} must be three numbers, got {values!r}")
        if not all(math.isfinite(v) and v > 0 for v in self.std):
            raise DescriptionError(f"std must be three positive numbers, got {self.std!r}")
        if self.alpha is not None:
            _expect("alpha", self.alpha, int | float)
        if self.operating_point is not None:
            try:
                OperatingPoint.from_dict(self.operating_point)
            except OperatingPointError as error:
                raise DescriptionError(f"field 'operating_point': {error}") from None
        for name in ("split", "args", "metrics", "pruned", "quantization", "teacher"):
            value = getattr(self, name)
            if value is not None:
                _expect(name, value, dict)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _expect(name: str, value: Any, kind: Any) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DescriptionError(f"field '{name}' is {value!r}, of the wrong type")


def _synthetic(data: Any) -> SyntheticSource:
    if isinstance(data, SyntheticSource):
        return data
    if not isinstance(data, dict) or "img_size" not in data:
        raise DescriptionError(f"field 'synthetic' is {data!r}, not a synthetic-set description")
    # descriptions from before --synthetic-zoom and --fabrics have no zoom (zoom 1) and no fabrics (all)
    return SyntheticSource(data.get("per_class"), data["img_size"], data.get("zoom") or 1.0, data.get("fabrics"))

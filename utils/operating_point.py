"""The line's decision: one defect score per image, and the threshold a false-alarm budget buys on validation images.

The defect score is 1 - P(Normal), the same number in PyTorch, ONNX Runtime, OpenVINO and INT8 artifacts. An image
is flagged defective when its score is >= the threshold. The threshold is chosen on a validation split as the one
with the highest defect recall whose validation false-alarm rate is <= the budget. Plain numpy: the edge device
applies it without PyTorch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from utils.errors import UserError

DEFAULT_BUDGET = 0.05
SCORE = "1 - P(Normal)"


class OperatingPointError(UserError):
    """A threshold cannot be chosen from the scores given (no Normal or no defective images)."""


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold on the defect score and what it did on the validation images it was chosen on."""

    threshold: float
    budget: float  # the false-alarm rate allowed on validation images
    val_defect_recall: float
    val_false_alarm_rate: float
    val_normal: int  # Normal validation images (the false-alarm rate's denominator)
    val_defective: int
    score: str = SCORE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> OperatingPoint:
        """From stored metadata; OperatingPointError (one line) for anything malformed."""
        if not isinstance(data, dict):
            raise OperatingPointError(f"the stored operating point is {data!r}, not a mapping")
        numbers = ("threshold", "budget", "val_defect_recall", "val_false_alarm_rate")
        counts = ("val_normal", "val_defective")
        # JSON types as written: "0.5" or true would pass float() and hide a hand-edited or forged file
        wrong = [key for key in numbers if not _is_number(data.get(key))]
        wrong += [key for key in counts if not (_is_number(data.get(key)) and float(data[key]).is_integer())]
        if wrong:
            raise OperatingPointError(f"the stored operating point {data!r} is malformed: {', '.join(wrong)} must be "
                                      "finite numbers")
        point = cls(float(data["threshold"]), float(data["budget"]), float(data["val_defect_recall"]),
                    float(data["val_false_alarm_rate"]), int(data["val_normal"]), int(data["val_defective"]),
                    str(data.get("score", SCORE)))
        if not 0 <= point.threshold <= 1 + 1e-6:  # just above 1: flags nothing
            raise OperatingPointError(f"the stored threshold {point.threshold!r} is not a defect-score threshold in [0, 1]")
        if not (0 < point.budget < 1 and 0 <= point.val_defect_recall <= 1 and 0 <= point.val_false_alarm_rate <= 1):
            raise OperatingPointError(f"the stored operating point {data!r} is malformed: budget, recall and false-alarm "
                                      "rate are fractions")
        return point


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_threshold(value: float, what: str = "the threshold") -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
        raise OperatingPointError(f"{what} is {value!r}: a defect-score threshold is a number in [0, 1]")
    return float(value)


def defect_scores(probs: np.ndarray, normal: int) -> np.ndarray:
    """1 - P(Normal) per row of class probabilities (float32 in, float32 out: every runtime computes the same)."""
    return np.float32(1) - np.asarray(probs, np.float32)[:, normal]


def flag_defects(probs: np.ndarray, normal: int, threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(defect scores, defective flags) of rows of class probabilities: score >= ``threshold``, or, with no threshold
    (a model from before operating points), the most likely class is not Normal. A non-finite score (a broken model
    or input) is defective: an inspection fails closed."""
    scores = defect_scores(probs, normal)
    broken = ~np.isfinite(scores)
    if threshold is None:
        return scores, (np.asarray(probs).argmax(axis=1) != normal) | broken
    return scores, (scores >= threshold) | broken


def top_defect_classes(probs: np.ndarray, normal: int) -> np.ndarray:
    """The most likely class other than Normal per row: what a flagged image is reported as."""
    without_normal = np.array(probs, copy=True)
    without_normal[:, normal] = -1.0
    return without_normal.argmax(axis=1)


def choose_threshold(scores: np.ndarray, defective: np.ndarray, budget: float = DEFAULT_BUDGET) -> OperatingPoint:
    """The threshold with the highest defect recall whose false-alarm rate on these images is <= ``budget``.

    With n Normal images the budget allows k = floor(budget * n) of them flagged; every threshold above the
    (k+1)-th highest Normal score keeps to it, and the lowest such threshold catches the most defects. The
    threshold is put halfway between that Normal score and the next defect score above it, so tiny numeric
    differences neither add a false alarm nor lose a caught defect on these images. Ties count whole: a
    threshold never splits images of one score.
    """
    if not 0 < budget < 1:
        raise OperatingPointError(f"the false-alarm budget is {budget!r}: give a rate in (0, 1), e.g. 0.05 for 5 %")
    scores = np.asarray(scores, np.float64)
    defective = np.asarray(defective, bool)
    normal_scores = np.sort(scores[~defective])[::-1]
    defect_scores_ = scores[defective]
    if not len(normal_scores):
        raise OperatingPointError("no Normal image among the validation images: the false-alarm rate, and so the "
                                  "threshold, cannot be measured; add Normal images to the data")
    if not len(defect_scores_):
        raise OperatingPointError("no defective image among the validation images: defect recall, and so the "
                                  "threshold, cannot be measured; add defective images to the data")
    allowed = math.floor(budget * len(normal_scores) + 1e-9)  # 1e-9: 0.05 * 20 is 1.0000000000000002 in floating point
    bound = normal_scores[allowed]  # the highest Normal score that must not be flagged
    above = defect_scores_[defect_scores_ > bound]
    # no defect scores above the bound: nothing can be caught within the budget, flag only scores above it
    threshold = float((bound + above.min()) / 2 if len(above) else np.nextafter(bound, np.inf))
    recall, false_alarms = rates_at(scores, defective, threshold)
    return OperatingPoint(threshold, budget, recall, false_alarms, len(normal_scores), len(defect_scores_))


def rates_at(scores: np.ndarray, defective: np.ndarray, threshold: float) -> tuple[float, float]:
    """(defect recall, false-alarm rate) when a score >= ``threshold`` is flagged, a non-finite one too (as
    ``flag_defects`` decides on the device); NaN where a group is empty."""
    scores, defective = np.asarray(scores), np.asarray(defective, bool)
    flagged = (scores >= threshold) | ~np.isfinite(scores)
    recall = float(flagged[defective].mean()) if defective.any() else float("nan")
    false_alarms = float(flagged[~defective].mean()) if (~defective).any() else float("nan")
    return recall, false_alarms


def binomial_se(rate: float, count: int) -> float:
    """Standard error of a rate measured on ``count`` images: sqrt(p (1 - p) / n)."""
    return math.sqrt(rate * (1 - rate) / count) if count and math.isfinite(rate) else float("nan")

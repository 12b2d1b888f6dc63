"""The defect threshold chosen for a false-alarm budget: exact on crafted scores, carried by checkpoints and metadata."""
from __future__ import annotations

import math

import numpy as np
import pytest

from utils.description import DescriptionError, RunDescription
from utils.operating_point import (
    OperatingPoint,
    OperatingPointError,
    binomial_se,
    choose_threshold,
    defect_scores,
    flag_defects,
    rates_at,
)


def brute_force_best_recall(scores: np.ndarray, defective: np.ndarray, budget: float) -> float:
    """The highest recall any threshold reaches with a false-alarm rate <= budget (every distinct score tried)."""
    candidates = np.append(np.unique(scores), np.inf)
    return max(rates_at(scores, defective, t)[0] for t in candidates if rates_at(scores, defective, t)[1] <= budget)


def test_twenty_normal_images_at_five_percent_allow_exactly_one_false_alarm() -> None:
    normal = np.array([0.95, 0.60, 0.50] + [0.1] * 17)
    defect = np.array([0.99, 0.70, 0.55, 0.40, 0.90])
    scores, defective = np.concatenate([normal, defect]), np.r_[np.zeros(20, bool), np.ones(5, bool)]
    point = choose_threshold(scores, defective, 0.05)
    assert 0.60 < point.threshold <= 0.70  # flags the 0.95 Normal (1 of 20), not the 0.60 one
    assert point.threshold == pytest.approx((0.60 + 0.70) / 2)
    assert point.val_false_alarm_rate == 0.05 and point.val_defect_recall == 0.6
    assert (point.val_normal, point.val_defective, point.budget) == (20, 5, 0.05)
    assert rates_at(scores, defective, point.threshold) == (0.6, 0.05)


def test_ties_at_the_bound_are_never_split() -> None:
    """Two Normal images share the score that would be the one allowed false alarm: both stay unflagged."""
    scores = np.array([0.8, 0.8] + [0.2] * 18 + [0.8, 0.9])
    defective = np.r_[np.zeros(20, bool), np.ones(2, bool)]
    point = choose_threshold(scores, defective, 0.05)
    assert point.threshold > 0.8 and point.val_false_alarm_rate == 0.0 and point.val_defect_recall == 0.5


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("budget", [0.01, 0.05, 0.1, 0.3])
def test_random_score_sets_meet_the_budget_with_the_best_recall(seed: int, budget: float) -> None:
    rng = np.random.default_rng(seed)
    defective = rng.random(rng.integers(5, 300)) < 0.8
    defective[:2] = [True, False]
    scores = np.round(np.where(defective, rng.beta(4, 1, len(defective)), rng.beta(1, 4, len(defective))), 2)  # rounded: ties
    point = choose_threshold(scores, defective, budget)
    recall, false_alarms = rates_at(scores, defective, point.threshold)
    assert false_alarms <= budget and (recall, false_alarms) == (point.val_defect_recall, point.val_false_alarm_rate)
    assert recall == brute_force_best_recall(scores, defective, budget)


def test_no_defect_above_the_bound_catches_nothing_but_keeps_the_budget() -> None:
    scores, defective = np.array([0.9, 0.8, 0.1, 0.2]), np.array([False, False, True, True])
    point = choose_threshold(scores, defective, 0.4)
    assert point.val_false_alarm_rate == 0.0 and point.val_defect_recall == 0.0 and point.threshold > 0.9


@pytest.mark.parametrize("defective, message", [(np.ones(4, bool), "no Normal image"), (np.zeros(4, bool), "no defective image")])
def test_a_split_without_normal_or_without_defects_is_one_clear_message(defective: np.ndarray, message: str) -> None:
    with pytest.raises(OperatingPointError, match=message):
        choose_threshold(np.array([0.1, 0.4, 0.6, 0.9]), defective)


@pytest.mark.parametrize("budget", [0, 1, -0.1, 1.5, math.nan])
def test_a_budget_outside_zero_one_is_refused(budget: float) -> None:
    with pytest.raises(OperatingPointError, match=r"in \(0, 1\)"):
        choose_threshold(np.array([0.1, 0.9]), np.array([False, True]), budget)


def test_defect_score_and_flags_match_argmax_without_a_threshold() -> None:
    probs = np.array([[0.6, 0.3, 0.1], [0.4, 0.45, 0.15], [0.2, 0.1, 0.7]], np.float32)
    scores, by_argmax = flag_defects(probs, 0, None)
    assert scores.dtype == np.float32 and np.allclose(scores, [0.4, 0.6, 0.8])
    assert by_argmax.tolist() == [False, True, True]
    assert flag_defects(probs, 0, 0.35)[1].tolist() == [True, True, True]
    assert np.array_equal(defect_scores(probs, 0), scores)


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_a_non_finite_score_is_defective(threshold: float | None) -> None:
    probs = np.array([[np.nan, 0.5, 0.5], [np.inf, 0.0, 0.0], [0.9, 0.05, 0.05]], np.float32)
    assert flag_defects(probs, 0, threshold)[1].tolist() == [True, True, False]


def test_binomial_se() -> None:
    assert binomial_se(0.1, 100) == pytest.approx(0.03)
    assert math.isnan(binomial_se(0.1, 0))


def test_stored_operating_points_are_checked(v1_description: dict) -> None:
    point = OperatingPoint(0.42, 0.05, 0.95, 0.04, 108, 1000)
    assert OperatingPoint.from_dict(point.to_dict()) == point
    stored = RunDescription.from_dict({**v1_description, "operating_point": point.to_dict()})
    assert OperatingPoint.from_dict(stored.operating_point) == point
    assert RunDescription.from_dict(v1_description).operating_point is None  # older checkpoints: argmax
    for bad in ({"threshold": 0.4}, {**point.to_dict(), "threshold": 7.0}, {**point.to_dict(), "threshold": "x"}, [0.4]):
        with pytest.raises(DescriptionError, match="operating_point"):
            RunDescription.from_dict({**v1_description, "operating_point": bad})


@pytest.mark.parametrize("change", [{"threshold": "0.5"}, {"threshold": True}, {"budget": float("nan")}, {"budget": 0},
                                    {"val_normal": 2.5}, {"val_defect_recall": float("inf")}, {"val_false_alarm_rate": 3}])
def test_stored_operating_point_types_are_json_numbers_in_range(change: dict) -> None:
    """A threshold written as a string or a boolean, or a NaN budget, is refused, not coerced (every artifact kind reads
    its operating point through this one function)."""
    with pytest.raises(OperatingPointError, match="operating point|threshold"):
        OperatingPoint.from_dict({**OperatingPoint(0.42, 0.05, 0.95, 0.04, 108, 1000).to_dict(), **change})

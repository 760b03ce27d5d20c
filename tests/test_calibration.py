"""The decision threshold from held-out normal scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from csflow.calibration import Calibration, calibrate


@pytest.mark.parametrize("n", [1, 2, 7, 20, 101, 1000])
@pytest.mark.parametrize("target_fpr", [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9])
def test_threshold_meets_target_fpr_without_being_loose(n: int, target_fpr: float) -> None:
    scores = np.random.default_rng(n).gamma(2.0, 1.0, size=n)
    cal = calibrate(scores, target_fpr)
    above = float(np.mean(scores > cal.threshold))
    assert above <= target_fpr
    assert above > target_fpr - 2.0 / n  # the tightest reachable rate, up to the 1/n granularity
    assert cal.threshold in scores
    assert cal.target_fpr == target_fpr


def test_target_below_one_over_n_gives_the_maximum() -> None:
    scores = np.array([3.0, 1.0, 2.0, 5.0, 4.0])
    assert calibrate(scores, 0.01).threshold == 5.0


def test_ties_never_raise_the_false_positive_rate() -> None:
    scores = np.array([1.0] * 8 + [2.0, 3.0])
    cal = calibrate(scores, 0.3)
    assert np.mean(scores > cal.threshold) <= 0.3


def test_scores_are_kept_sorted() -> None:
    cal = calibrate(np.array([3.0, 1.0, 2.0]), 0.5)
    assert cal.scores == [1.0, 2.0, 3.0]


def test_empty_scores_rejected() -> None:
    with pytest.raises(ValueError, match="at least one"):
        calibrate(np.array([]), 0.05)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_rejected(bad: float) -> None:
    """A diverged model's NaN/inf scores must not become a threshold: `score > nan` is never true, so a
    NaN threshold would pass every frame as normal."""
    with pytest.raises(ValueError, match="finite"):
        calibrate(np.array([1.0, 2.0, bad, 3.0]), 0.1)


@pytest.mark.parametrize("target_fpr", [0.0, 1.0, -0.1, 1.5])
def test_bad_target_fpr_rejected(target_fpr: float) -> None:
    with pytest.raises(ValueError, match="target_fpr"):
        calibrate(np.array([1.0, 2.0]), target_fpr)


def test_dict_round_trip_through_json() -> None:
    cal = calibrate(np.random.default_rng(0).normal(size=50), 0.05)
    data = json.loads(json.dumps(cal.to_dict()))
    assert Calibration.from_dict(data) == cal
    assert data["stats"]["n"] == 50
    assert data["stats"]["q05"] <= data["stats"]["q50"] <= data["stats"]["q95"]
    assert data["stats"]["mean"] == pytest.approx(float(np.mean(cal.scores)))


def test_stats_of_a_single_score() -> None:
    stats = calibrate(np.array([2.5]), 0.1).stats
    assert stats["n"] == 1 and stats["std"] == 0.0 and stats["q50"] == 2.5


def test_calibration_nll_is_stored_with_its_quantiles() -> None:
    """Adaptation stops on the NLL (its objective), so the manifest carries the held-out normals' NLLs."""
    rng = np.random.default_rng(1)
    scores, nll = rng.normal(1.0, 0.1, size=40), rng.normal(-2.0, 0.3, size=40)
    cal = calibrate(scores, 0.05, nll)
    assert cal.nll == sorted(nll.tolist())
    assert cal.nll_quantile(0.5) == pytest.approx(float(np.median(nll)))
    data = json.loads(json.dumps(cal.to_dict()))
    assert data["nll_stats"]["q50"] == pytest.approx(float(np.median(nll)))
    assert Calibration.from_dict(data) == cal


def test_calibration_without_nll() -> None:
    cal = calibrate(np.array([1.0, 2.0, 3.0]), 0.1)
    assert cal.nll == [] and cal.nll_stats is None and "nll" not in cal.to_dict()
    with pytest.raises(ValueError, match="no NLLs"):
        cal.nll_quantile(0.5)


@pytest.mark.parametrize("nll", [np.array([1.0, 2.0]), np.array([1.0, np.nan, 2.0])])
def test_bad_calibration_nll_rejected(nll: np.ndarray) -> None:
    with pytest.raises(ValueError, match="NLL"):
        calibrate(np.array([1.0, 2.0, 3.0]), 0.1, nll)

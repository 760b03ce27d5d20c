"""Drift monitor on synthetic score streams: false-alarm rate, detection delay, defect bursts, resume."""

from __future__ import annotations

import doctest
import json
import time

import numpy as np
import pytest
from scipy.stats import ks_2samp

import drift.monitor
from csflow.calibration import calibrate
from daemon.config import ConfigError, DriftSection
from drift import DriftConfig, DriftMonitor, Reference, Thresholds, calibrate_thresholds
from drift.detectors import LowerWindowTest, cusum_increments, cusum_level, cusum_path, lower_ks_path, lower_part
from drift.thresholds import Episodes

N_REFERENCE = 300
CONFIG = DriftConfig()


def normal_scores(rng: np.random.Generator, size: int) -> np.ndarray:
    """Positive, right-skewed, like CS-Flow image scores of normal images."""
    return rng.gamma(9.0, 0.1, size)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return normal_scores(np.random.default_rng(0), N_REFERENCE)


@pytest.fixture(scope="module")
def thresholds(reference: np.ndarray) -> Thresholds:
    return calibrate_thresholds(Reference.from_scores(reference), CONFIG)


def monitor(reference: np.ndarray, thresholds: Thresholds) -> DriftMonitor:
    return DriftMonitor(reference, CONFIG, thresholds)


def first_alarm(mon: DriftMonitor, scores: np.ndarray) -> int | None:
    for score in scores:
        mon.update(float(score))
        if mon.drift_detected:
            return mon.frames_seen
    return None


def alarm_episodes(alarming: np.ndarray, gap: int) -> int:
    """Alarms with restart: runs of alarming frames separated by more than `gap` quiet frames."""
    frames = np.flatnonzero(alarming)
    return 0 if frames.size == 0 else 1 + int(np.sum(np.diff(frames) > gap))


def test_thresholds_are_deterministic_and_fast(reference: np.ndarray, thresholds: Thresholds) -> None:
    ref = Reference.from_scores(reference)
    start = time.process_time()
    again = calibrate_thresholds(ref, CONFIG)
    assert time.process_time() - start < 2.0
    assert again == thresholds
    assert calibrate_thresholds(ref, DriftConfig(seed=1)) != thresholds


@pytest.mark.parametrize("gap", [1, 5])
def test_episode_level_on_independent_frames(gap: int) -> None:
    """I.i.d. uniform statistics: an episode starts at t with probability h^gap * (1 - h)."""
    paths = np.random.default_rng(9).random((4, 250_000))
    level = Episodes.count(paths, gap).level(0.01)
    levels = np.linspace(0.5, 1.0, 100_001)
    expected = levels[np.flatnonzero(levels**gap * (1 - levels) > 0.01)[-1]]
    assert level == pytest.approx(expected, abs=0.003)


def test_window_statistic_is_scipy_ks_on_the_lower_part(reference: np.ndarray) -> None:
    """The restricted one-sided KS equals scipy's on samples censored just above the m-th reference score."""
    ref = Reference.from_scores(reference)
    rng = np.random.default_rng(1)
    for quantile, shift in [(0.1, 0.0), (0.1, 0.1), (0.25, 0.05), (0.5, -0.05)]:
        test = LowerWindowTest(ref, CONFIG.window, quantile, threshold=np.inf)
        window = normal_scores(rng, CONFIG.window) + shift
        for score in window:
            test.update(score)
        censor = ref.scores[lower_part(ref.size, quantile)]
        expected = ks_2samp(np.minimum(ref.scores, censor), np.minimum(window, censor), alternative="greater")
        assert test.statistic == pytest.approx(expected.statistic, abs=1e-12)


def test_live_detectors_match_the_simulated_ones(reference: np.ndarray, thresholds: Thresholds) -> None:
    """Thresholds simulated with the vectorised statistics hold for the live detectors."""
    ref = Reference.from_scores(reference)
    stream = normal_scores(np.random.default_rng(2), 400)
    stream[250:] *= 1.3
    mon = monitor(reference, thresholds)
    live_cusum, live_window = [], []
    for score in stream:
        mon.update(float(score))
        live_cusum.append(mon.cusum.statistic)
        live_window.append(mon.window.statistic)
    increments = cusum_increments(ref, stream, CONFIG.cap, cusum_level(ref, CONFIG.cap, CONFIG.slack))
    np.testing.assert_allclose(live_cusum, cusum_path(increments), rtol=0, atol=1e-9)
    assert live_window[: CONFIG.window - 1] == [None] * (CONFIG.window - 1)
    m = lower_part(ref.size, CONFIG.quantile)
    simulated = lower_ks_path(ref.ranks(stream), ref.size, m, CONFIG.window)
    np.testing.assert_array_equal(live_window[CONFIG.window - 1 :], simulated)


def test_false_alarm_rate_is_consistent_with_the_ert() -> None:
    """Fresh references and no-change streams from the same distribution: about one alarm per ERT frames."""
    rng = np.random.default_rng(3)
    n_references, frames = 5, 100_000
    alarms = 0
    for _ in range(n_references):
        ref = Reference.from_scores(normal_scores(rng, N_REFERENCE))
        levels = calibrate_thresholds(ref, CONFIG)
        stream = normal_scores(rng, frames)
        cusum = cusum_path(cusum_increments(ref, stream, CONFIG.cap, cusum_level(ref, CONFIG.cap, CONFIG.slack)))
        m = lower_part(ref.size, CONFIG.quantile)
        window = lower_ks_path(ref.ranks(stream), ref.size, m, CONFIG.window)
        alarming = cusum > levels.cusum
        alarming[CONFIG.window - 1 :] |= window > levels.window
        alarms += alarm_episodes(alarming, CONFIG.window)
    expected = n_references * frames / CONFIG.ert  # 50
    assert expected / 3 <= alarms <= expected * 2


def test_live_monitor_rarely_alarms_without_change(reference: np.ndarray, thresholds: Thresholds) -> None:
    rng = np.random.default_rng(4)
    mon = monitor(reference, thresholds)
    alarms = 0
    for score in normal_scores(rng, 20_000):
        mon.update(float(score))
        if mon.drift_detected:
            alarms += 1
            mon.reset()
    assert alarms <= 8  # expected about 2


@pytest.mark.parametrize(
    ("name", "shift"),
    [("+3 MAD", lambda s, mad: s + 3 * mad), ("x1.5", lambda s, mad: 1.5 * s), ("x2", lambda s, mad: 2.0 * s)],
)
def test_bulk_shift_alarms_within_bounded_delay(reference: np.ndarray, thresholds: Thresholds, name, shift) -> None:
    rng = np.random.default_rng(5)
    mad = Reference.from_scores(reference).scale
    delays = []
    for _ in range(20):
        mon = monitor(reference, thresholds)
        assert first_alarm(mon, normal_scores(rng, 200)) is None
        delay = first_alarm(mon, shift(normal_scores(rng, 400), mad))
        assert delay is not None, name
        delays.append(delay - 200)
    assert np.median(delays) <= 80, (name, delays)
    assert max(delays) <= 300, (name, delays)


def test_defect_burst_is_not_drift(reference: np.ndarray, thresholds: Thresholds) -> None:
    """30% of a window replaced by scores 5x the threshold: rarely an alarm (about as rarely as without the
    burst); a bulk shift of the same frames always is one."""
    rng = np.random.default_rng(6)
    threshold = calibrate(reference, 0.01).threshold
    burst_alarms = shift_alarms = 0
    trials = 60
    for _ in range(trials):
        stream = normal_scores(rng, 3 * CONFIG.window)
        burst = stream.copy()
        defects = CONFIG.window + np.flatnonzero(rng.random(CONFIG.window) < 0.3)
        burst[defects] = 5 * threshold
        shifted = stream.copy()
        shifted[CONFIG.window :] *= 1.5
        burst_alarms += first_alarm(monitor(reference, thresholds), burst) is not None
        shift_alarms += first_alarm(monitor(reference, thresholds), shifted) is not None
    assert burst_alarms <= trials // 10  # measured ~5%, half of it the background rate over 300 frames
    assert shift_alarms == trials


def test_state_dict_round_trip_resumes_identically(reference: np.ndarray, thresholds: Thresholds) -> None:
    rng = np.random.default_rng(7)
    mon = monitor(reference, thresholds)
    for score in normal_scores(rng, 150):
        mon.update(float(score))
    state = json.loads(json.dumps(mon.state_dict()))
    resumed = DriftMonitor.from_state_dict(state)
    assert resumed.state_dict() == mon.state_dict()
    continuation = normal_scores(rng, 300)
    continuation[100:] *= 1.6
    for score in continuation:
        mon.update(float(score))
        resumed.update(float(score))
        assert resumed.summary() == mon.summary()
    assert mon.drift_detected
    assert DriftMonitor.from_state_dict(json.loads(json.dumps(mon.state_dict()))).alarm == mon.alarm


def test_alarm_is_latched_until_reset(reference: np.ndarray, thresholds: Thresholds) -> None:
    rng = np.random.default_rng(8)
    mon = monitor(reference, thresholds)
    assert mon.state == "warmup"
    first_alarm(mon, 2.0 * normal_scores(rng, 200))
    alarm = mon.alarm
    assert mon.state == "alarm" and alarm is not None
    for score in normal_scores(rng, 500):
        mon.update(float(score))
    assert mon.drift_detected and mon.alarm == alarm
    mon.reset()
    assert not mon.drift_detected and mon.frames_seen == 0 and mon.state == "warmup"
    for score in normal_scores(rng, CONFIG.window):
        mon.update(float(score))
    assert mon.state == "ok"


def test_new_model_version_gets_its_own_reference(reference: np.ndarray, thresholds: Thresholds) -> None:
    mon = DriftMonitor(calibrate(reference, 0.01).scores, CONFIG)
    np.testing.assert_array_equal(mon.reference.scores, np.sort(reference))
    assert mon.thresholds == thresholds


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 1}, "window"),
        ({"quantile": 0.0}, "quantile"),
        ({"quantile": 1.5}, "quantile"),
        ({"ert": 50}, "ert"),
        ({"slack": 1.0}, "slack"),
        ({"slack": 0.0}, "slack"),
        ({"sim_alarms": 0}, "sim_alarms"),
        ({"sim_streams": 0}, "sim_streams"),
        ({"min_reference": 1}, "min_reference"),
        ({"cap": float("nan")}, "cap"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftConfig(**kwargs)


def test_drift_settings_section() -> None:
    assert DriftSection().to_config() == DriftConfig()
    with pytest.raises(ConfigError, match="drift: ert"):
        DriftSection(ert=50).to_config()


@pytest.mark.parametrize(
    ("scores", "message"),
    [([1.0] * 10, "at least 30"), ([1.0] * 40, "no spread"), ([*range(39), float("nan")], "finite")],
)
def test_reference_validation(scores: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftMonitor(scores, CONFIG)


def test_bad_input_is_refused(reference: np.ndarray, thresholds: Thresholds) -> None:
    mon = monitor(reference, thresholds)
    with pytest.raises(ValueError, match="non-finite"):
        mon.update(float("inf"))
    state = mon.state_dict()
    with pytest.raises(ValueError, match="format"):
        DriftMonitor.from_state_dict({**state, "format": 0})
    with pytest.raises(ValueError, match="malformed"):
        DriftMonitor.from_state_dict({k: v for k, v in state.items() if k != "thresholds"})
    with pytest.raises(ValueError, match="at most"):
        DriftMonitor.from_state_dict({**state, "window": [1.0] * (CONFIG.window + 1)})


def test_docstring_example() -> None:
    assert doctest.testmod(drift.monitor, raise_on_error=True).failed == 0

"""One camera's drift monitor: both detectors against one model version's calibration scores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from drift.config import DriftConfig
from drift.detectors import Cusum, LowerWindowTest
from drift.reference import Reference
from drift.thresholds import Thresholds, calibrate_thresholds

STATE_FORMAT = 1
State = Literal["warmup", "ok", "alarm"]


@dataclass(frozen=True)
class Alarm:
    """Which detector raised the alarm, at which frame (1-based count since the start), at what value."""

    detector: Literal["cusum", "window"]
    frame: int
    statistic: float
    threshold: float


class DriftMonitor:
    """Per-camera drift monitor on a stream of image anomaly scores.

    A sequential detector (CUSUM) catches large shifts within a few frames; a windowed two-sample test
    catches moderate ones. Both look at the bulk and lower part of the score distribution, so a burst of
    defects (scores far above the threshold) is not taken for a domain shift. The alarm is latched until
    `reset()`; a new model version gets a new monitor, on its own calibration scores.

    Parameters
    ----------
    reference
        Held-out normal scores of the active model version (its calibration scores).
    config
        Detector settings.
    thresholds
        Alarm levels; None simulates them from the reference (see `drift.thresholds`).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(7)
    >>> monitor = DriftMonitor(rng.gamma(9.0, 0.1, 300))
    >>> for score in rng.gamma(9.0, 0.1, 500):
    ...     monitor.update(score)
    >>> monitor.state, monitor.frames_seen
    ('ok', 500)
    >>> for score in 2.0 * rng.gamma(9.0, 0.1, 100):
    ...     monitor.update(score)
    >>> monitor.state, monitor.alarm.detector, monitor.alarm.frame
    ('alarm', 'cusum', 544)
    """

    def __init__(
        self,
        reference: Sequence[float],
        config: DriftConfig | None = None,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.config = config or DriftConfig()
        self.reference = Reference.from_scores(reference, self.config.min_reference)
        self.thresholds = thresholds or calibrate_thresholds(self.reference, self.config)
        self.cusum = Cusum(self.reference, self.config.cap, self.config.slack, self.thresholds.cusum)
        self.window = LowerWindowTest(self.reference, self.config.window, self.config.quantile, self.thresholds.window)
        self._reset()

    def _reset(self) -> None:
        self._frames_seen = 0
        self._alarm: Alarm | None = None

    def reset(self) -> None:
        """Clear the alarm and start over (same reference and thresholds)."""
        self.cusum.reset()
        self.window.reset()
        self._reset()

    def update(self, score: float) -> None:
        if not math.isfinite(score):
            raise ValueError(f"drift monitor got a non-finite score {score}")
        self.cusum.update(score)
        self.window.update(score)
        self._frames_seen += 1
        if self._alarm is None:
            self._alarm = self._check()

    def _check(self) -> Alarm | None:
        if self.cusum.drift_detected:
            return Alarm("cusum", self._frames_seen, self.cusum.statistic, self.cusum.threshold)
        if self.window.drift_detected:
            return Alarm("window", self._frames_seen, float(self.window.statistic), self.window.threshold)
        return None

    @property
    def drift_detected(self) -> bool:
        return self._alarm is not None

    @property
    def alarm(self) -> Alarm | None:
        return self._alarm

    @property
    def frames_seen(self) -> int:
        return self._frames_seen

    @property
    def state(self) -> State:
        if self._alarm is not None:
            return "alarm"
        return "ok" if self.window.statistic is not None else "warmup"

    def summary(self) -> dict:
        """Figures for a verdict or a metric: state, frames seen, each statistic next to its threshold."""
        return {
            "state": self.state,
            "frames_seen": self._frames_seen,
            "cusum": self.cusum.statistic,
            "cusum_threshold": self.thresholds.cusum,
            "window": self.window.statistic,
            "window_threshold": self.thresholds.window,
            "alarm": None if self._alarm is None else asdict(self._alarm),
        }

    def state_dict(self) -> dict:
        """Everything needed to resume, as plain JSON types: reference, settings, thresholds and state."""
        return {
            "format": STATE_FORMAT,
            "config": asdict(self.config),
            "reference": self.reference.scores.tolist(),
            "thresholds": asdict(self.thresholds),
            "cusum": self.cusum.statistic,
            "window": self.window.scores,
            "frames_seen": self._frames_seen,
            "alarm": None if self._alarm is None else asdict(self._alarm),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> DriftMonitor:
        """Resume a monitor saved by `state_dict` (no re-simulation: the thresholds are in the state).

        The caller checks that the state belongs to the active model version and the current settings
        (`monitor.config`), and builds a new monitor otherwise.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"drift state format {state.get('format')!r} is not {STATE_FORMAT}")
        try:
            monitor = cls(state["reference"], DriftConfig(**state["config"]), Thresholds(**state["thresholds"]))
            monitor.cusum.resume(float(state["cusum"]))
            monitor.window.resume([float(s) for s in state["window"]])
            monitor._frames_seen = int(state["frames_seen"])
            monitor._alarm = None if state["alarm"] is None else Alarm(**state["alarm"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"drift state is incomplete or malformed ({exc})") from exc
        return monitor

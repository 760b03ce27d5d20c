"""Settings of the per-camera drift monitor."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DriftConfig:
    """What the drift monitor compares, and how its alarm thresholds are calibrated.

    The thresholds are not set here: they are simulated from each model version's calibration scores so
    that, with no change, the monitor raises one false alarm per `ert` frames on average (see
    `drift.thresholds`). The other knobs trade detection delay against robustness to defect bursts. Both
    detectors look only at the lower part of the score distribution, because a defect adds a score to the
    upper tail while a domain shift moves every normal score, the lowest ones included:

    - `window`, `quantile`: the windowed test compares the empirical CDF of the last `window` scores with
      the reference's below the reference `quantile`-quantile. A share f of defects lowers the window's
      CDF there by at most f * quantile; a shift of the bulk, by up to `quantile`.
    - `cap`, `slack`: the CUSUM adds up min(z, cap) - level per frame, z being the frame's robust z-score
      and level = mu + slack * (cap - mu), mu the reference mean of min(z, cap). Every frame above the
      cap counts as a frame at the cap, however high it scores: a shift of the bulk that lifts all frames
      above it gives the CUSUM a drift of (1 - slack) * (cap - mu) per frame; a share f of defects moves
      the per-frame mean by f * (cap - mu) only, and the CUSUM keeps drifting down while f < slack.
      The default cap, -0.75, lies near the lower quartile of the reference: the CUSUM watches low
      scores disappear. A higher cap or lower slack detects large shifts sooner and takes bursts for
      drift more often (measured in bench/bench_drift.py).
    - `sim_alarms`, `sim_streams`, `seed`: size of the threshold simulation (the false-alarm rate it
      targets has a relative error of about 1 / sqrt(sim_alarms)) and its seed, so that a model
      version's thresholds are reproducible. `min_reference`: fewer calibration scores are refused.
    """

    window: int = 100
    quantile: float = 0.2
    ert: int = 10_000
    cap: float = -0.75
    slack: float = 0.7
    sim_alarms: int = 40
    sim_streams: int = 50
    min_reference: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"window must be >= 2 frames, got {self.window}")
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile}")
        if self.ert <= self.window:
            raise ValueError(f"ert must exceed the window ({self.window} frames), got {self.ert}")
        if not 0.0 < self.slack < 1.0:
            raise ValueError(f"slack must be in (0, 1) (1 would never alarm), got {self.slack}")
        if self.sim_alarms < 1 or self.sim_streams < 1:
            raise ValueError(f"sim_alarms and sim_streams must be >= 1, got {self.sim_alarms}, {self.sim_streams}")
        if self.min_reference < 2:
            raise ValueError(f"min_reference must be >= 2 scores, got {self.min_reference}")
        if not math.isfinite(self.cap):
            raise ValueError(f"cap must be a finite robust z-score, got {self.cap}")

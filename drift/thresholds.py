"""Alarm thresholds for a target expected run time (ERT) between false alarms, by simulation.

As alibi-detect's online detectors do, the thresholds come from streams simulated under no change from
the reference scores, not from hand-set values or asymptotic p-values (the statistics are computed on
overlapping windows and running sums, whose null distributions have no usable closed form).

Two choices make this fast enough to run at every model activation (well under a second for ERT 10,000
and 300 reference scores on one core) without losing the finite-reference effect:

- Rate, not run length. alibi-detect simulates many streams of length ~ERT and sets a threshold per
  time step; here a few long streams are simulated and the threshold is the level that is crossed,
  counting a crossing only when the statistic stayed at or below it for the `window` frames before
  (runs declustering, from extreme-value statistics), at a rate of 1 / ERT. With no change both
  statistics are stationary once the window is full, and the CUSUM starts at its resting value 0, so the
  waiting time to the first such crossing has mean ~1 / rate. Clustered crossings counted as two make the
  estimate conservative.
- The finite reference. Live, every statistic is computed against the same n reference scores, which
  are themselves a sample: bootstrapping frames from that reference and testing them against it would
  leave out the reference's own sampling noise (a KS test's null variance is 1/w + 1/n, not 1/w) and
  give too many false alarms. So each simulated stream gets its own pseudo-reference of n scores, and
  stream and pseudo-reference are both drawn from a smoothed bootstrap of the reference (resampled
  scores plus Gaussian noise of Silverman's bandwidth, so that frames never tie with reference scores
  as resampled values would). The median, MAD, CUSUM level and ranks are recomputed on each
  pseudo-reference. The rate is then the average over plausible references of the same size, which is
  what a fleet of cameras sees; a particular reference can sit on either side of it (with 300 synthetic
  reference scores, five references gave 0 to 31 alarms per 100,000 frames, 48 in all against 50). The
  smaller the reference, the more that average is made of the rare unrepresentative references: with
  ~70 scores a typical reference sees far fewer false alarms than 1 / ERT, and detection is slower.

The monitor alarms when either detector does, so the two detectors share the false-alarm rate 1 / ERT
(rates of rare events add up; where the detectors' false alarms coincide, the monitor's ERT is only
longer). If the window statistic cannot meet its share below its largest value m/n (a very small
reference), its level is that value, it never fires, and the CUSUM gets the whole budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter1d

from drift.config import DriftConfig
from drift.detectors import cusum_increments, cusum_level, cusum_path, lower_ks_path, lower_part
from drift.reference import Reference

# Silverman's rule of thumb for a Gaussian kernel: 0.9 * min(sd, IQR / 1.34) * n^(-1/5)
SILVERMAN_FACTOR = 0.9
IQR_TO_SD = 1.34
SILVERMAN_EXPONENT = -0.2
DETECTORS = 2


@dataclass(frozen=True)
class Thresholds:
    """Alarm levels: a detector alarms when its statistic exceeds its level."""

    cusum: float
    window: float


def silverman_bandwidth(scores: np.ndarray) -> float:
    spread = float(np.std(scores, ddof=1))
    q25, q75 = np.quantile(scores, [0.25, 0.75])
    if q75 > q25:
        spread = min(spread, float(q75 - q25) / IQR_TO_SD)
    return SILVERMAN_FACTOR * spread * scores.size**SILVERMAN_EXPONENT


@dataclass(frozen=True)
class Episodes:
    """How often a simulated statistic starts an alarm episode, as a function of the alarm level.

    An episode starts at frame t when statistic[t] > h and the `gap` frames before it were all <= h, i.e.
    when before[t] <= h < statistic[t], before[t] being their maximum. The count is constant between
    consecutive `levels`; `counts[i]` holds on [levels[i], levels[i + 1]).
    """

    levels: np.ndarray
    counts: np.ndarray
    frames: int

    @classmethod
    def count(cls, paths: np.ndarray, gap: int) -> Episodes:
        padded = np.concatenate([np.full((paths.shape[0], 1), -np.inf), paths[:, :-1]], axis=1)
        before = maximum_filter1d(padded, size=gap, axis=1, origin=(gap - 1) // 2, mode="constant", cval=-np.inf)
        rising = paths > before
        starts, ends = np.sort(before[rising]), np.sort(paths[rising])
        levels = np.unique(np.concatenate([starts[np.isfinite(starts)], ends]))
        counts = np.searchsorted(starts, levels, side="right") - np.searchsorted(ends, levels, side="right")
        return cls(levels, counts, paths.size)

    def level(self, rate: float) -> float:
        """The lowest level from which on episodes start at no more than `rate` per frame."""
        too_many = np.flatnonzero(self.counts > rate * self.frames)
        return float(self.levels[too_many[-1] + 1]) if too_many.size else float(self.levels[0])

    def rate(self, level: float) -> float:
        """Episodes per frame at `level`."""
        return float(self.counts[max(0, np.searchsorted(self.levels, level, side="right") - 1)]) / self.frames


def calibrate_thresholds(reference: Reference, config: DriftConfig) -> Thresholds:
    """Thresholds giving the monitor one false alarm per `config.ert` frames on average; deterministic in
    `config.seed`.

    The window statistic is discrete (steps of 1/n and 1/w), so its level usually meets its half of the
    false-alarm budget with room to spare; the CUSUM is given what is left.
    """
    rng = np.random.default_rng(config.seed)
    n = reference.size
    rate = 1.0 / config.ert
    length = config.window + math.ceil(config.sim_alarms * config.ert * DETECTORS / config.sim_streams)
    bandwidth = silverman_bandwidth(reference.scores)
    m = lower_part(n, config.quantile)

    def smoothed_resample(size: int) -> np.ndarray:
        return rng.choice(reference.scores, size) + rng.normal(0.0, bandwidth, size)

    cusums, windows = [], []
    for _ in range(config.sim_streams):
        pseudo = Reference.from_scores(smoothed_resample(n))
        stream = smoothed_resample(length)
        level = cusum_level(pseudo, config.cap, config.slack)
        cusums.append(cusum_path(cusum_increments(pseudo, stream, config.cap, level)))
        windows.append(lower_ks_path(pseudo.ranks(stream), n, m, config.window))
    window_episodes = Episodes.count(np.stack(windows), config.window)
    window = window_episodes.level(rate / DETECTORS)
    cusum = Episodes.count(np.stack(cusums), config.window).level(rate - window_episodes.rate(window))
    return Thresholds(cusum=cusum, window=window)

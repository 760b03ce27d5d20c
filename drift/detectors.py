"""The two detectors, live (one score at a time) and vectorised (whole simulated streams).

Both forms share the arithmetic below, so a threshold simulated with the vectorised form holds for the
live one: the window statistic is computed in integers and is bit-identical; the CUSUM's running sum
differs from the cumulative-sum form by rounding only.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from drift.reference import Reference


def cusum_level(reference: Reference, cap: float, slack: float) -> float:
    """The per-frame allowance: between the reference mean of min(z, cap) (slack 0) and the cap (slack 1)."""
    mean = float(np.minimum(reference.z(reference.scores), cap).mean())
    return mean + slack * (cap - mean)


def cusum_increments(reference: Reference, scores: np.ndarray | float, cap: float, level: float) -> np.ndarray:
    """min(z, cap) - level: winsorised, so a defect scoring far above the threshold counts as a frame at the cap."""
    return np.minimum(reference.z(scores), cap) - level


def cusum_path(increments: np.ndarray) -> np.ndarray:
    """CUSUM S_t = max(0, S_{t-1} + x_t), S_0 = 0, along the last axis, in closed form (Lindley):
    S_t = C_t - min(0, min_{s<=t} C_s) with C the cumulative sum of x."""
    total = np.cumsum(increments, axis=-1)
    return total - np.minimum(np.minimum.accumulate(total, axis=-1), 0.0)


def lower_part(reference_size: int, quantile: float) -> int:
    """m: the windowed test compares the two empirical CDFs at the m smallest reference scores."""
    return max(1, min(reference_size, math.ceil(quantile * reference_size)))


def lower_ks(below: np.ndarray, reference_size: int, window: int) -> np.ndarray:
    """One-sided two-sample KS statistic restricted to the lower part of the reference.

    below[j - 1] = window scores <= x_j, for the m smallest reference scores x_1 <= ... <= x_m (axis 0);
    the statistic is max(0, max_j F_ref(x_j) - F_win(x_j)), how far the window's CDF lies below the
    reference's there (scores moved up). Integer numerators keep it exact.
    """
    j = np.arange(1, below.shape[0] + 1).reshape((-1,) + (1,) * (below.ndim - 1))
    numerator = below * np.int64(-reference_size)
    numerator += j * window
    return np.maximum(numerator.max(axis=0), 0) / (reference_size * window)


def lower_ks_path(ranks: np.ndarray, reference_size: int, m: int, window: int) -> np.ndarray:
    """`lower_ks` of every full window of a stream of ranks: entry t is the window ending at frame t + window - 1."""
    below = np.zeros((m, ranks.size + 1), dtype=np.int32)
    lower = np.flatnonzero(ranks < m)
    below[ranks[lower], lower + 1] = 1
    np.cumsum(below, axis=0, out=below)  # below[j - 1, t + 1] = [frame t <= x_j]
    np.cumsum(below, axis=1, out=below)  # ... frames before t + 1 that are <= x_j
    return lower_ks(below[:, window:] - below[:, :-window], reference_size, window)


class Cusum:
    """One-sided CUSUM of winsorised robust z-scores: it rises when low scores stop coming.

    Parameters
    ----------
    reference
        The model version's normal scores.
    cap
        Robust z-scores are clipped at this value before they are added up (see `DriftConfig`).
    slack
        Share of the largest possible shift of the clipped score that is ignored per frame.
    threshold
        The statistic's alarm level (from `drift.thresholds`).
    """

    def __init__(self, reference: Reference, cap: float, slack: float, threshold: float) -> None:
        self.reference = reference
        self.cap = cap
        self.slack = slack
        self.threshold = threshold
        self._level = cusum_level(reference, cap, slack)
        self._reset()

    def _reset(self) -> None:
        self._statistic = 0.0

    def reset(self) -> None:
        self._reset()

    def resume(self, statistic: float) -> None:
        """Continue from a saved statistic (a restarted worker)."""
        if not (math.isfinite(statistic) and statistic >= 0):
            raise ValueError(f"a CUSUM statistic is finite and >= 0, got {statistic}")
        self._statistic = float(statistic)

    def update(self, score: float) -> None:
        increment = float(cusum_increments(self.reference, score, self.cap, self._level))
        self._statistic = max(0.0, self._statistic + increment)

    @property
    def statistic(self) -> float:
        return self._statistic

    @property
    def drift_detected(self) -> bool:
        return self._statistic > self.threshold


class LowerWindowTest:
    """Two-sample KS test of the last `window` scores against the reference, below its `quantile`-quantile.

    The upper tail is left out on purpose: defects only add scores there, a domain shift moves the bulk.
    The test runs once the window is full; before that `statistic` is None.

    Parameters
    ----------
    reference
        The model version's normal scores.
    window
        Number of recent scores compared.
    quantile
        Upper end of the compared part of the reference distribution.
    threshold
        The statistic's alarm level (from `drift.thresholds`).
    """

    def __init__(self, reference: Reference, window: int, quantile: float, threshold: float) -> None:
        self.reference = reference
        self.window = window
        self.quantile = quantile
        self.threshold = threshold
        self._m = lower_part(reference.size, quantile)
        self._reset()

    def _reset(self) -> None:
        self._scores: deque[float] = deque(maxlen=self.window)
        self._ranks: deque[int] = deque(maxlen=self.window)
        self._counts = np.zeros(self._m, dtype=np.int64)
        self._statistic: float | None = None

    def reset(self) -> None:
        self._reset()

    def resume(self, scores: list[float]) -> None:
        """Continue from a saved window (oldest score first)."""
        if len(scores) > self.window:
            raise ValueError(f"a saved window holds at most {self.window} scores, got {len(scores)}")
        self._reset()
        for score in scores:
            self.update(score)

    def update(self, score: float) -> None:
        rank = int(self.reference.ranks(score))
        if len(self._ranks) == self.window:
            self._count(self._ranks[0], -1)
        self._scores.append(float(score))
        self._ranks.append(rank)
        self._count(rank, 1)
        if len(self._ranks) == self.window:
            self._statistic = float(lower_ks(np.cumsum(self._counts), self.reference.size, self.window))

    def _count(self, rank: int, step: int) -> None:
        if rank < self._m:
            self._counts[rank] += step

    @property
    def scores(self) -> list[float]:
        """The window's scores, oldest first (what a restarted worker needs to resume)."""
        return list(self._scores)

    @property
    def statistic(self) -> float | None:
        return self._statistic

    @property
    def drift_detected(self) -> bool:
        return self._statistic is not None and self._statistic > self.threshold

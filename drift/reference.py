"""The reference a camera's scores are compared with: a model version's held-out normal scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAD_TO_SD = 1.4826  # scales the median absolute deviation to the standard deviation of a normal distribution


@dataclass(frozen=True, eq=False)
class Reference:
    """Sorted reference scores with their median and robust scale (1.4826 * MAD).

    Median and MAD rather than mean and standard deviation: a few unusual calibration images must not
    move the yardstick every frame is measured with.
    """

    scores: np.ndarray
    median: float
    scale: float

    @classmethod
    def from_scores(cls, scores: Sequence[float] | np.ndarray, min_size: int = 2) -> Reference:
        values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
        if values.size < min_size:
            raise ValueError(f"drift reference needs at least {min_size} scores, got {values.size}")
        if not np.isfinite(values).all():
            raise ValueError("drift reference scores must be finite")
        median = float(np.median(values))
        scale = MAD_TO_SD * float(np.median(np.abs(values - median)))
        if not scale > 0:
            raise ValueError("drift reference scores have no spread (MAD = 0): cannot standardise")
        values.flags.writeable = False
        return cls(values, median, scale)

    @property
    def size(self) -> int:
        return int(self.scores.size)

    def z(self, scores: np.ndarray | float) -> np.ndarray:
        """Robust z-scores: (s - median) / (1.4826 * MAD)."""
        return (np.asarray(scores, dtype=np.float64) - self.median) / self.scale

    def ranks(self, scores: np.ndarray | float) -> np.ndarray:
        """Number of reference scores strictly below each score: s <= the j-th smallest reference score
        exactly when its rank is < j."""
        return np.searchsorted(self.scores, scores, side="left")

"""Decision threshold from held-out normal scores, for a target false-positive rate."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    """The threshold and the normal-score sample it came from (kept for drift reference later)."""

    threshold: float
    target_fpr: float
    scores: list[float]

    @property
    def stats(self) -> dict[str, float]:
        s = np.asarray(self.scores)
        q = np.quantile(s, [0.05, 0.25, 0.5, 0.75, 0.95])
        return {
            "n": float(s.size),
            "mean": float(s.mean()),
            "std": float(s.std(ddof=1)) if s.size > 1 else 0.0,
            **{f"q{int(p * 100):02d}": float(v) for p, v in zip((0.05, 0.25, 0.5, 0.75, 0.95), q, strict=True)},
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "stats": self.stats}

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(float(data["threshold"]), float(data["target_fpr"]), [float(x) for x in data["scores"]])


def calibrate(normal_scores: np.ndarray, target_fpr: float) -> Calibration:
    """Threshold = the (1 - target_fpr) quantile of held-out normal scores.

    With n scores the smallest reachable false-positive rate is about 1/n; a target below that is
    met by the maximum score.
    """
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("calibration needs at least one held-out normal score")
    if not np.isfinite(scores).all():
        raise ValueError("calibration scores must be finite (the model produced NaN or inf)")
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    threshold = float(np.quantile(scores, 1.0 - target_fpr, method="higher"))
    return Calibration(threshold, target_fpr, scores.tolist())

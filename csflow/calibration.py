"""Decision threshold from held-out normal scores, for a target false-positive rate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# The sensitivity probe's strengths (csflow.defects), from faint to the gate's obvious synthetic defects.
DEFAULT_PROBE_STRENGTHS = (0.25, 0.5, 0.75, 1.0)
# Raised whenever the probe's defects (csflow.defects) change, so that a reference curve is only compared
# with probes of its own kind (1: absolute grey levels; 2: levels in the host's own contrast).
PROBE_REVISION = 2


def _stats(values: Sequence[float]) -> dict[str, float]:
    s = np.asarray(values, dtype=np.float64)
    q = np.quantile(s, QUANTILES)
    return {
        "n": float(s.size),
        "mean": float(s.mean()),
        "std": float(s.std(ddof=1)) if s.size > 1 else 0.0,
        **{f"q{int(p * 100):02d}": float(v) for p, v in zip(QUANTILES, q, strict=True)},
    }


@dataclass(frozen=True)
class Calibration:
    """The threshold and the held-out normal sample it came from (kept for drift reference later).

    `nll` holds the same images' per-sample NLL (the training objective, log-det included), sorted:
    adaptation minimises that NLL, so its stopping rule compares the shots' NLL with these, not with
    the image scores (which leave the log-det out). Empty for calibrations made without a flow pass.

    `probe_detection` is the sensitivity probe's detection curve at this threshold (`csflow.defects`:
    strength -> share of graded synthetic defects flagged) on the source model's held-out normals. An
    adapted version carries its source's curve: it is the reference a candidate must keep in a new domain.
    Empty where no probe was run (then no automatic adaptation can be accepted). `probe_revision` names
    the kind of defects it was measured with (`PROBE_REVISION`; 1 in manifests written before it was
    recorded).
    """

    threshold: float
    target_fpr: float
    scores: list[float]
    nll: list[float] = field(default_factory=list)
    probe_detection: dict[str, float] = field(default_factory=dict)
    probe_revision: int = PROBE_REVISION

    @property
    def stats(self) -> dict[str, float]:
        return _stats(self.scores)

    @property
    def nll_stats(self) -> dict[str, float] | None:
        return _stats(self.nll) if self.nll else None

    def nll_quantile(self, q: float) -> float:
        """The `q` quantile of the held-out normals' NLL; `ValueError` when none were stored."""
        if not self.nll:
            raise ValueError("this calibration stores no NLLs (made before the flow revision that records them)")
        return float(np.quantile(np.asarray(self.nll, dtype=np.float64), q))

    def to_dict(self) -> dict:
        data: dict = {
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "scores": list(self.scores),
            "stats": self.stats,
        }
        if self.nll:
            data["nll"] = list(self.nll)
            data["nll_stats"] = self.nll_stats
        if self.probe_detection:
            data["probe_detection"] = dict(self.probe_detection)
            data["probe_revision"] = self.probe_revision
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(
            float(data["threshold"]),
            float(data["target_fpr"]),
            [float(x) for x in data["scores"]],
            [float(x) for x in data.get("nll", [])],
            {str(k): float(v) for k, v in data.get("probe_detection", {}).items()},
            int(data.get("probe_revision", 1 if "probe_detection" in data else PROBE_REVISION)),
        )


def calibrate(normal_scores: np.ndarray, target_fpr: float, normal_nll: np.ndarray | None = None) -> Calibration:
    """Threshold = the (1 - target_fpr) quantile of held-out normal scores.

    With n scores the smallest reachable false-positive rate is about 1/n; a target below that is
    met by the maximum score. `normal_nll`, the same images' NLL, is stored for adaptation's stop rule.
    """
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("calibration needs at least one held-out normal score")
    if not np.isfinite(scores).all():
        raise ValueError("calibration scores must be finite (the model produced NaN or inf)")
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    nll: list[float] = []
    if normal_nll is not None:
        nll_arr = np.sort(np.asarray(normal_nll, dtype=np.float64))
        if nll_arr.size != scores.size:
            raise ValueError(f"got {nll_arr.size} NLLs for {scores.size} scores (must be the same images)")
        if not np.isfinite(nll_arr).all():
            raise ValueError("calibration NLLs must be finite (the model produced NaN or inf)")
        nll = nll_arr.tolist()
    threshold = float(np.quantile(scores, 1.0 - target_fpr, method="higher"))
    return Calibration(threshold, target_fpr, scores.tolist(), nll)

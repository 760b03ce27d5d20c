"""Shadow evaluation: a candidate earns activation on its camera's own live frames.

Why. The offline gate judges a handful of confirmed shots (or, with one shot, perturbed copies of it), and
the adaptation minimised exactly those frames' NLL, so it cannot tell whether the candidate works on the
line. A line also needs an operating point in its new domain: adaptation closes most of the gap to the
source score level but rarely all of it, and at the inherited threshold a candidate that ranks the new
domain perfectly can still reject nearly every normal part. So a candidate that passed the offline gate
scores the camera's next `frames` live frames beside its parent (verdicts still come from the parent),
and the decision rests on those frames:

- Operating point. The live frames are mostly normal with a few defects, so only the lower part of their
  score distribution describes normal parts (the drift monitor reasons the same way). The parent's
  calibration scores are carried into the new domain by the location-scale map that matches their
  median and their (median - q`lower`) spread to the candidate's live scores; the threshold is the
  parent's threshold through the same map. The new version's drift reference is its own live scores of
  the frames it does not flag, so it watches itself against what it does on this camera, not against a
  source level it never quite reached.
- Checks (each can fail): all scores finite; at its own threshold the candidate flags no more live
  frames than the parent did at the parent's; the synthetic defects of the offline gate still score
  above the new threshold (at least `min_defect_detection`); the sensitivity probe (`csflow.defects`:
  synthetic defects blended at graded strengths into the live frames it does not flag) detects at least
  what the source model detects on its own held-out normals, stored in the calibration, less
  `max_sensitivity_loss` (a candidate can keep its normals quiet by having gone blind: measured on ELPV,
  such candidates lost a third of the real defects while their flag rates looked right); and a fresh drift
  monitor whose reference is the parent's calibration carried over by the map, fed the candidate's live
  scores in stream order, raises no alarm (the statistic that raised the camera's alarm; it fails when the
  candidate's scores do not settle into one normal distribution on this camera).

The parent scores the same probes, and its detection on the frames it does not flag, at its own threshold,
is reported beside the candidate's: an operator who considers forcing a refused candidate sees what the
model serving the line catches there. `probe_reference` can make it the reference where it is lower (a line
that hides the probe's defects from the parent may hide them from any model) or higher (a candidate must not
be blinder than the parent on the same frames); measured on ELPV, neither improved the gate's decisions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from csflow.calibration import PROBE_REVISION, Calibration
from csflow.defects import (
    DefectConfig,
    ProbeItem,
    graded_defects,
    probe_detection,
    probe_plan,
    sensitivity,
    sensitivity_noise,
    strength_key,
)
from csflow.model import CSFlow
from csflow.scoring import score_images
from drift.config import DriftConfig
from drift.monitor import DriftMonitor

ProbeReference = Literal["source", "source_or_parent", "source_and_parent"]


@dataclass(frozen=True)
class ShadowConfig:
    """`frames`: live frames scored in shadow before deciding; `lower`: the quantile that, with the median,
    measures the spread of normal scores; `min_defect_detection`: share of the gate's synthetic defects
    that must stay above the new threshold; `probes_per_frame`: sensitivity probes blended into each live
    frame; `max_sensitivity_loss`: how far the candidate's probe sensitivity may fall below the reference;
    `probe_reference`: "source", the source's sensitivity on its held-out normals; "source_or_parent", the lower
    of that and the parent's on the same live frames (where the parent's probes were scored and cover every
    strength); "source_and_parent", the higher of the two; `sensitivity_z`: how many standard errors of the
    probe's own noise (`csflow.defects.sensitivity_noise`) the sensitivity may fall below the reference
    besides `max_sensitivity_loss`; `recalibration_sensitivity_z`: the same for the parent judged as its own
    candidate (`ShadowEvaluation.recalibration`)."""

    frames: int = 100
    lower: float = 0.1
    min_defect_detection: float = 0.8
    probes_per_frame: int = 2
    max_sensitivity_loss: float = 0.0
    probe_seed: int = 0
    probe_reference: ProbeReference = "source"
    sensitivity_z: float = 0.0
    recalibration_sensitivity_z: float = 0.0

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if not 0.0 < self.lower < 0.5:
            raise ValueError(f"lower must be in (0, 0.5), got {self.lower}")
        if not 0.0 <= self.min_defect_detection <= 1.0:
            raise ValueError(f"min_defect_detection must be in [0, 1], got {self.min_defect_detection}")
        if self.probes_per_frame < 1:
            raise ValueError(f"probes_per_frame must be >= 1, got {self.probes_per_frame}")
        if self.probe_reference not in get_args(ProbeReference):
            raise ValueError(f"probe_reference must be one of {get_args(ProbeReference)}, got {self.probe_reference!r}")
        if not 0.0 <= self.max_sensitivity_loss <= 1.0:
            raise ValueError(f"max_sensitivity_loss must be in [0, 1], got {self.max_sensitivity_loss}")
        for name in ("sensitivity_z", "recalibration_sensitivity_z"):
            if not 0.0 <= getattr(self, name) <= 5.0:
                raise ValueError(f"{name} must be in [0, 5], got {getattr(self, name)}")

    def for_recalibration(self) -> ShadowConfig:
        """The settings that judge the parent as its own candidate."""
        return replace(self, sensitivity_z=self.recalibration_sensitivity_z)


@dataclass(frozen=True)
class OperatingPoint:
    """Where the parent's calibration lands in the new domain: x -> location + (x - source_location) * scale."""

    threshold: float
    location: float
    source_location: float
    scale: float

    def carry(self, scores: np.ndarray) -> np.ndarray:
        return self.location + (np.asarray(scores, dtype=np.float64) - self.source_location) * self.scale


def operating_point(live_scores: np.ndarray, calibration: Calibration, lower: float) -> OperatingPoint:
    """The location-scale map from `calibration`'s scores to the lower part of `live_scores`, and the
    calibration threshold through it; `ValueError` when the live scores have no spread to match."""
    live = np.asarray(live_scores, dtype=np.float64)
    source = np.asarray(calibration.scores, dtype=np.float64)
    if live.size < 2 or not np.isfinite(live).all():
        raise ValueError("need at least two finite live scores")
    src_mid, src_low = np.quantile(source, (0.5, lower))
    live_mid, live_low = np.quantile(live, (0.5, lower))
    src_spread, live_spread = src_mid - src_low, live_mid - live_low
    if src_spread <= 0 or live_spread <= 0:
        raise ValueError(f"no spread to match (source {src_spread:.4g}, live {live_spread:.4g})")
    scale = float(live_spread / src_spread)
    threshold = float(live_mid + (calibration.threshold - src_mid) * scale)
    return OperatingPoint(threshold, float(live_mid), float(src_mid), scale)


@dataclass(frozen=True)
class ShadowDecision:
    """`calibration` is the candidate's calibration for the new domain (threshold and drift reference), set
    whenever the shadow reached an operating point, refused or not (an operator may still activate a refused
    candidate, and it must then have one); `reasons` has one 'ok ...' or 'FAIL ...' line per check."""

    accepted: bool
    reasons: list[str]
    figures: dict[str, Any]
    calibration: Calibration | None = None


@dataclass
class ShadowEvaluation:
    """Collects (parent score, candidate score, candidate NLL, the candidate's and the parent's probe scores,
    the parent's NLL) per live frame, in stream order; `decide()` once `done`. `defect_scores` and
    `parent_defect_scores`: the candidate's and the parent's scores of the offline gate's synthetic defects.
    The probes of the next frames come from `probe_images`, before their `update`."""

    parent_calibration: Calibration
    defect_scores: list[float]
    config: ShadowConfig = field(default_factory=ShadowConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    parent: list[float] = field(default_factory=list)
    candidate: list[float] = field(default_factory=list)
    candidate_nll: list[float] = field(default_factory=list)
    probe: list[float] = field(default_factory=list)
    parent_probe: list[float] = field(default_factory=list)
    parent_nll: list[float] = field(default_factory=list)
    parent_defect_scores: list[float] = field(default_factory=list)
    label: str = "shadow"  # names the checks in the reasons

    @property
    def strengths(self) -> list[float]:
        """The probe's strengths: those of the source's reference curve (none without one)."""
        return sorted(float(key) for key in self.parent_calibration.probe_detection)

    def probe_images(self, frames: Tensor) -> Tensor:
        """`probes_per_frame` probes for each of the next `len(frames)` live frames, frame by frame (empty
        without a reference to compare with)."""
        if not self.strengths:
            return frames[:0]
        first, kinds = self.frames_seen, DefectConfig().kinds
        plan = probe_plan(first, len(frames), self.config.probes_per_frame, self.strengths, len(kinds))
        generator = torch.Generator().manual_seed(self.config.probe_seed + first)
        return graded_defects(frames.cpu(), plan, DefectConfig(), generator)

    def update(
        self,
        parent_score: float,
        candidate_score: float,
        candidate_nll: float,
        probe_scores: Sequence[float] = (),
        parent_probe_scores: Sequence[float] = (),
        parent_nll: float = float("nan"),
    ) -> ShadowEvaluation:
        """One live frame; `probe_scores` and `parent_probe_scores`: the candidate's and the parent's scores of
        its `probes_per_frame` probes (the parent's only where they are measured); `parent_nll`: NaN where it
        is not measured (the parent's `recalibration` is then refused)."""
        if not self.done:
            self.parent.append(float(parent_score))
            self.candidate.append(float(candidate_score))
            self.candidate_nll.append(float(candidate_nll))
            self.probe.extend(float(x) for x in probe_scores)
            self.parent_probe.extend(float(x) for x in parent_probe_scores)
            self.parent_nll.append(float(parent_nll))
        return self

    def recalibration(self) -> ShadowEvaluation:
        """The parent as its own candidate on the same frames: what the line gets from a new operating point
        alone, with no new extractor (its `decide()` runs the same checks on the parent's columns, and its
        reasons say `recalibration`)."""
        return ShadowEvaluation(
            self.parent_calibration,
            list(self.parent_defect_scores),
            self.config.for_recalibration(),
            self.drift,
            parent=list(self.parent),
            candidate=list(self.parent),
            candidate_nll=list(self.parent_nll),
            probe=list(self.parent_probe),
            parent_probe=list(self.parent_probe),
            parent_nll=list(self.parent_nll),
            parent_defect_scores=list(self.parent_defect_scores),
            label="recalibration",
        )

    @property
    def frames_seen(self) -> int:
        return len(self.candidate)

    @property
    def done(self) -> bool:
        return self.frames_seen >= self.config.frames

    def decide(self) -> ShadowDecision:
        cfg, parent_cal = self.config, self.parent_calibration
        parent, cand = np.asarray(self.parent), np.asarray(self.candidate)
        parent_flags = int((parent > parent_cal.threshold).sum())
        figures: dict[str, Any] = {
            "frames_seen": self.frames_seen,
            "frames_needed": cfg.frames,
            "parent_threshold": parent_cal.threshold,
            "parent_flag_rate": parent_flags / max(len(parent), 1),
            "parent_median": float(np.median(parent)) if parent.size else None,
            "candidate_median": float(np.median(cand)) if cand.size else None,
        }
        reasons: list[str] = []
        checks: dict[str, bool] = {}

        def check(name: str, passed: bool, text: str) -> None:
            checks[name] = passed
            reasons.append(f"{'ok' if passed else 'FAIL'} {self.label} {name}: {text}")

        check("frames", self.done, f"{self.frames_seen} of {cfg.frames} live frames scored beside the parent")
        finite = bool(cand.size and np.isfinite(cand).all() and np.isfinite(self.candidate_nll).all())
        check("finite", finite, "candidate scores are finite" if finite else "candidate produced NaN or inf")
        if not (self.done and finite):
            return ShadowDecision(False, reasons, figures)
        try:
            point = operating_point(cand, parent_cal, cfg.lower)
        except ValueError as exc:
            check("operating_point", False, str(exc))
            return ShadowDecision(False, reasons, figures)
        flagged = cand > point.threshold
        defects = np.asarray(self.defect_scores, dtype=np.float64)
        detection = float((defects > point.threshold).mean()) if defects.size else 0.0
        try:
            monitor: DriftMonitor | None = DriftMonitor(point.carry(np.asarray(parent_cal.scores)), self.drift)
        except ValueError as exc:  # too few calibration scores to watch drift against
            monitor, no_monitor = None, str(exc)
        for score in cand if monitor is not None else ():
            monitor.update(float(score))
        probe_figures, probe_ok, probe_text = self._sensitivity(flagged, point.threshold)
        figures |= {
            "threshold": point.threshold,
            "location": point.location,
            "scale": point.scale,
            "candidate_flag_rate": float(flagged.mean()),
            "defect_detection_rate": detection,
            "n_defects": int(defects.size),
            "drift": monitor.summary() if monitor is not None else None,
            **probe_figures,
        }
        check(
            "flags",
            int(flagged.sum()) <= parent_flags,
            f"candidate flags {flagged.mean():.0%} of live frames at its threshold {point.threshold:.4g}, "
            f"the parent {figures['parent_flag_rate']:.0%} at {parent_cal.threshold:.4g}",
        )
        check(
            "defects",
            detection >= cfg.min_defect_detection,
            f"{detection:.0%} of {defects.size} synthetic defects above the new threshold "
            f"(need {cfg.min_defect_detection:.0%})",
        )
        check("sensitivity", probe_ok, probe_text)
        if monitor is None:
            check("stable", False, f"cannot watch drift: {no_monitor}")
        elif monitor.alarm is not None:
            alarm = monitor.alarm
            check(
                "stable",
                False,
                f"{alarm.detector} statistic {alarm.statistic:.4g} > {alarm.threshold:.4g} at live frame {alarm.frame}",
            )
        else:
            check("stable", True, "no drift against the parent's calibration carried into the new domain")
        keep = ~flagged
        calibration = Calibration(
            point.threshold,
            parent_cal.target_fpr,
            sorted(cand[keep].tolist()),
            sorted(np.asarray(self.candidate_nll)[keep].tolist()),
            dict(parent_cal.probe_detection),  # the reference stays the source's, in its own domain
            parent_cal.probe_revision,
        )
        return ShadowDecision(all(checks.values()), reasons, figures, calibration)

    def _sensitivity(self, flagged: np.ndarray, threshold: float) -> tuple[dict[str, Any], bool, str]:
        """The probe's detection curve on the live frames the candidate does not flag (normal hosts),
        against the source's reference: (figures, passed, reason)."""
        reference = self.parent_calibration.probe_detection
        if not reference:
            return {}, False, "the parent's calibration has no sensitivity reference (retrain it to have one)"
        if self.parent_calibration.probe_revision != PROBE_REVISION:
            return (
                {},
                False,
                f"the parent's sensitivity reference was measured with probe revision "
                f"{self.parent_calibration.probe_revision}, this inspectd probes with revision {PROBE_REVISION} "
                "(retrain it to re-measure the reference)",
            )
        per_frame = self.config.probes_per_frame
        if len(self.probe) != per_frame * self.frames_seen:
            return {}, False, f"{len(self.probe)} probe scores for {self.frames_seen} frames x {per_frame} probes"
        plan = probe_plan(0, self.frames_seen, per_frame, self.strengths, len(DefectConfig().kinds))
        detection, counts = _detection_on_unflagged(self.probe, plan, flagged, threshold)
        n_probes = sum(counts.values())
        figures: dict[str, Any] = {
            "probe_detection": detection,
            "probe_reference": dict(reference),
            "n_probes": n_probes,
        }
        if set(detection) != set(reference):
            return (
                figures,
                False,
                f"probes at strengths {sorted(detection)} cannot match the reference's {sorted(reference)}",
            )
        ours, theirs = sensitivity(detection), sensitivity(reference)
        figures |= {"sensitivity": ours, "reference_sensitivity": theirs}
        on_line = self._parent_on_line(plan, set(reference))
        compared = f"the source {theirs:.0%} on its held-out normals"
        if on_line is not None:
            parent = sensitivity(on_line)
            figures |= {"parent_probe_detection": on_line, "parent_sensitivity": parent}
            rule = self.config.probe_reference
            if (rule == "source_or_parent" and parent < theirs) or (rule == "source_and_parent" and parent > theirs):
                compared = f"the parent {parent:.0%} on these frames (the source {theirs:.0%} on its held-out normals)"
                theirs = figures["reference_sensitivity"] = parent
            else:
                compared += f" (the parent {parent:.0%} on these frames)"
        cfg = self.config
        noise = sensitivity_noise(reference, counts)
        allowed = cfg.max_sensitivity_loss + cfg.sensitivity_z * noise
        figures |= {"sensitivity_noise": noise, "sensitivity_bar": theirs - allowed}
        margin = f"{cfg.max_sensitivity_loss:.0%}"
        if cfg.sensitivity_z:
            margin += f" + {cfg.sensitivity_z:g} x {noise:.1%} (the probe's noise over {n_probes}) = {allowed:.1%}"
        text = (
            f"{ours:.0%} of {n_probes} graded synthetic defects on unflagged live frames above the new threshold, "
            f"{compared}; may fall by {margin}"
        )
        return figures, ours >= theirs - allowed, text

    def _parent_on_line(self, plan: list[ProbeItem], strengths: set[str]) -> dict[str, float] | None:
        """The parent's detection curve on the same probes, on the live frames it does not flag, at its own
        threshold; None when its probes were not scored or do not cover every strength."""
        if len(self.parent_probe) != len(plan):
            return None
        threshold = self.parent_calibration.threshold
        flagged = np.asarray(self.parent) > threshold
        detection, _ = _detection_on_unflagged(self.parent_probe, plan, flagged, threshold)
        return detection if set(detection) == strengths else None


def _detection_on_unflagged(
    scores: Sequence[float], plan: Sequence[ProbeItem], flagged: np.ndarray, threshold: float
) -> tuple[dict[str, float], dict[str, int]]:
    """The probes' detection curve over the hosts not `flagged`, and how many probes that is per strength."""
    kept = [(score, item) for score, item in zip(scores, plan, strict=True) if not flagged[item.host]]
    counts = Counter(strength_key(item.strength) for _, item in kept)
    return probe_detection([s for s, _ in kept], [i for _, i in kept], threshold), dict(counts)


def shadow_stream(
    parent: CSFlow,
    candidate: CSFlow,
    live: Tensor,
    parent_calibration: Calibration,
    defect_scores: list[float],
    config: ShadowConfig,
    drift: DriftConfig,
    batch_size: int,
    parent_defect_scores: list[float] | None = None,
) -> ShadowEvaluation:
    """The shadow fed a recorded stream of live frames (in stream order), all of them used; `decide()` it, or
    its `recalibration()`. For `inspectd adapt --live` and the protocol, which have the frames at hand rather
    than one batch at a time (the protocol keeps what it collected, so that its decisions can be replayed)."""
    frames = replace(config, frames=max(len(live), 1))
    evaluation = ShadowEvaluation(
        parent_calibration, defect_scores, frames, drift, parent_defect_scores=list(parent_defect_scores or [])
    )
    probes = evaluation.probe_images(live)
    parent_scores = score_images(parent, live, batch_size, nll=True)
    scores = score_images(candidate, live, batch_size, nll=True)
    per_frame = (len(live), len(probes) // max(len(live), 1))
    probe_scores = score_images(candidate, probes, batch_size).image.reshape(per_frame)
    parent_probe_scores = score_images(parent, probes, batch_size).image.reshape(per_frame)
    rows = zip(
        parent_scores.image,
        scores.image,
        np.asarray(scores.nll),
        probe_scores,
        parent_probe_scores,
        np.asarray(parent_scores.nll),
        strict=True,
    )
    for p, c, n, q, r, m in rows:
        evaluation.update(p, c, n, q.tolist(), r.tolist(), m)
    return evaluation

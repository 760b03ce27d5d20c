"""The gate: is an adapted candidate better than its parent on frames it was not adapted on?

Why this design. A candidate is only worth publishing if (a) it stops rejecting normal parts of the new
domain and (b) it still rejects defective ones. Both must be shown on frames the adaptation did not
see, or (a) is trivially true: the adaptation minimised exactly those frames' scores.

- Held-out frames: with k > 1 confirmed normal shots, ceil(k * holdout_fraction) of them (seeded
  choice) are held out and the candidate is adapted on the rest. With k == 1 there is no independent
  frame; augmented views of the shot (small placement shifts, drawn with a seed the adaptation does not
  use) stand in. That only shows the candidate generalises beyond the shot's exact pixels, so with one
  shot the defect check below carries most of the weight.
- (a) No false rejects and an improvement: held-out shots must score at or below the parent's threshold
  (a share above it of at most `max_false_reject_rate`), and their mean must be lower than under the
  parent. The threshold is the parent's calibrated one, which the candidate keeps: adaptation brings
  target normals back to the source score level rather than moving the threshold.
  Views are judged relative to the parent instead of against the threshold: any perturbation of a frame
  raises its score (measured on ELPV with a source model in its own domain: a 2% shift or noise of
  std 0.005 raised the median score 1.4-1.5x and pushed half of the normal frames over the threshold),
  under parent and candidate alike. So the candidate must remove at least `min_view_recovery` of the
  parent's excess over the calibration median on the views ("recovery"), and lower their mean.
  When a shadow follows (`GateConfig.shadowed`: the worker, `inspectd adapt --live`), held-out shots are
  judged by recovery as well: the shadow sets the candidate's own threshold on live frames, and adaptation
  stopped at the calibration NLL closes most of the gap to the source level but need not cross the
  inherited threshold.
- (b) No over-adaptation, two ways, since it was measured on real photographs (shots scoring well below
  the source calibration level; defect TPR 0.95 -> 0.73): synthetic defects (scratches and cut-paste patches,
  `csflow.defects`) pasted onto the held-out frames (with one shot: onto copies of the shot itself,
  unperturbed, so the views' inflation does not help them over the threshold) must still score above the
  threshold in at least `min_defect_detection` of cases, and the held-out frames' median score must not
  fall below the `floor_quantile` of the source calibration scores. A collapsed extractor (constant
  features) fails (b); a blown-up one fails (a); non-finite scores fail outright.

Every number used is returned in `GateDecision.figures`, for the record of accepted and rejected
candidates. On a line, a candidate this gate accepts is not activated yet: it is served in shadow on the
camera's live frames first (`adapters.shadow`), since these checks rest on a handful of frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from adapters.adapt import AdaptConfig, AdaptResult, adapt, check_shots
from adapters.augment import Augmentation, augment
from csflow.artifacts import ModelVersion
from csflow.calibration import Calibration
from csflow.defects import DefectConfig, synthetic_defects
from csflow.model import CSFlow
from csflow.scoring import score_images

HeldoutKind = Literal["shots", "views"]


@dataclass(frozen=True)
class GateConfig:
    holdout_fraction: float = 0.25
    n_views: int = 4  # k == 1: augmented views of the shot used as held-out frames
    views: Augmentation = field(default_factory=lambda: Augmentation(max_shift=0.02, noise_std=0.0))
    view_seed: int = 7919  # must differ from the adaptation seed
    max_false_reject_rate: float = 0.0
    min_view_recovery: float = 0.5  # share of the parent's excess score on the held-out frames to remove
    # True when a shadow on live frames follows (adapters.shadow) and sets the candidate's own threshold: then
    # held-out shots are judged by recovery too, not against the inherited threshold they need not reach.
    shadowed: bool = False
    min_defect_detection: float = 0.8
    defects: DefectConfig = field(default_factory=DefectConfig)
    floor_quantile: float | None = 0.01
    seed: int = 0  # held-out choice and synthetic defects
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {self.n_views}")
        if not self.views.enabled:
            raise ValueError("views must perturb the shot, or the held-out views would equal the training shot")
        rates = (self.max_false_reject_rate, self.min_defect_detection, self.min_view_recovery)
        if not all(0.0 <= rate <= 1.0 for rate in rates):
            raise ValueError("max_false_reject_rate, min_defect_detection and min_view_recovery must be in [0, 1]")
        if self.floor_quantile is not None and not 0.0 <= self.floor_quantile <= 1.0:
            raise ValueError(f"floor_quantile must be in [0, 1] or None, got {self.floor_quantile}")


@dataclass(frozen=True)
class GateDecision:
    """`reasons` holds one line per check ('ok ...' or 'FAIL ...'); `checks` whether each passed."""

    accepted: bool
    reasons: list[str]
    figures: dict[str, Any]
    checks: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class ShotSplit:
    """Shots to adapt on and frames to judge on; with one shot `heldout` are views of it and
    `heldout_index` is empty."""

    train: Tensor
    heldout: Tensor
    heldout_kind: HeldoutKind
    train_index: list[int]
    heldout_index: list[int]


def split_shots(shots: Tensor, config: GateConfig) -> ShotSplit:
    """Hold out ceil(k * holdout_fraction) shots (seeded) when k > 1, else augmented views of the one shot."""
    k = shots.shape[0]
    if k < 1:
        raise ValueError("need at least one shot")
    if k == 1:
        views = augment(shots.expand(config.n_views, -1, -1, -1), config.views, _generator(config.view_seed))
        return ShotSplit(shots, views, "views", [0], [])
    n_out = min(k - 1, math.ceil(k * config.holdout_fraction))
    perm = torch.randperm(k, generator=_generator(config.seed)).tolist()
    out_idx, in_idx = sorted(perm[:n_out]), sorted(perm[n_out:])
    return ShotSplit(shots[in_idx], shots[out_idx], "shots", in_idx, out_idx)


def decide(
    parent_scores: np.ndarray,
    candidate_scores: np.ndarray,
    defect_scores: np.ndarray,
    calibration: Calibration,
    config: GateConfig,
    heldout_kind: HeldoutKind = "shots",
    parent_defect_scores: np.ndarray | None = None,
) -> GateDecision:
    """The gate's verdict from scores alone (see the module docstring for the checks). `parent_defect_scores`,
    the parent's scores of the same synthetic defects, are only recorded: a recalibration of the parent
    (adapters.shadow) checks them as a candidate's are checked."""
    parent_s, cand_s, defect_s = (
        np.asarray(x, dtype=np.float64) for x in (parent_scores, candidate_scores, defect_scores)
    )
    if cand_s.size == 0 or parent_s.size != cand_s.size or defect_s.size == 0:
        raise ValueError("need the same non-empty held-out frames under parent and candidate, and defect scores")
    threshold = float(calibration.threshold)
    figures: dict[str, Any] = {
        "threshold": threshold,
        "n_heldout": int(cand_s.size),
        "n_defects": int(defect_s.size),
        "parent_scores": parent_s.tolist(),
        "candidate_scores": cand_s.tolist(),
        "parent_mean": float(parent_s.mean()),
        "candidate_mean": float(cand_s.mean()),
        "candidate_median": float(np.median(cand_s)),
        "parent_median": float(np.median(parent_s)),
        "parent_false_reject_rate": float((parent_s > threshold).mean()),
        "calibration_median": float(np.median(calibration.scores)),
        "heldout_kind": heldout_kind,
    }
    if parent_defect_scores is not None:  # recorded even when the candidate's are not finite
        figures["parent_defect_scores"] = np.asarray(parent_defect_scores, dtype=np.float64).tolist()
    checks: dict[str, bool] = {}
    reasons: list[str] = []

    def check(name: str, passed: bool, text: str) -> None:
        checks[name] = passed
        reasons.append(f"{'ok' if passed else 'FAIL'} {name}: {text}")

    finite = bool(np.isfinite(cand_s).all() and np.isfinite(defect_s).all())
    check("finite", finite, "candidate scores are finite" if finite else "candidate produced NaN or inf scores")
    if not finite:
        return GateDecision(False, reasons, figures, checks)

    false_rejects = float((cand_s > threshold).mean())
    detection = float((defect_s > threshold).mean())
    figures |= {
        "candidate_false_reject_rate": false_rejects,
        "defect_detection_rate": detection,
        "defect_median": float(np.median(defect_s)),
        "defect_scores": defect_s.tolist(),
    }
    if heldout_kind == "views" or config.shadowed:
        excess = figures["parent_median"] - figures["calibration_median"]
        recovery = (figures["parent_median"] - figures["candidate_median"]) / excess if excess > 0 else 1.0
        figures["view_recovery"] = recovery
        check(
            "recovery",
            recovery >= config.min_view_recovery,
            f"{heldout_kind}' median {figures['candidate_median']:.4g} vs parent {figures['parent_median']:.4g} and "
            f"calibration median {figures['calibration_median']:.4g}: {recovery:.0%} of the excess removed "
            f"(need {config.min_view_recovery:.0%})",
        )
    else:
        check(
            "false_rejects",
            false_rejects <= config.max_false_reject_rate,
            f"{false_rejects:.0%} of held-out normals above threshold {threshold:.4g} "
            f"(parent: {figures['parent_false_reject_rate']:.0%}; allowed {config.max_false_reject_rate:.0%})",
        )
    check(
        "improvement",
        figures["candidate_mean"] < figures["parent_mean"],
        f"held-out mean score {figures['candidate_mean']:.4g} vs parent {figures['parent_mean']:.4g}",
    )
    check(
        "defects",
        detection >= config.min_defect_detection,
        f"{detection:.0%} of {defect_s.size} synthetic defects above threshold "
        f"(need {config.min_defect_detection:.0%})",
    )
    if config.floor_quantile is not None:
        floor = float(np.quantile(np.asarray(calibration.scores, dtype=np.float64), config.floor_quantile))
        figures["floor"] = floor
        check(
            "floor",
            figures["candidate_median"] >= floor,
            f"held-out median score {figures['candidate_median']:.4g} vs source calibration "
            f"q{config.floor_quantile:g} {floor:.4g} (must not be below it: over-adaptation)",
        )
    return GateDecision(all(checks.values()), reasons, figures, checks)


def gate(
    parent: ModelVersion | CSFlow,
    candidate: CSFlow,
    heldout: Tensor,
    config: GateConfig | None = None,
    calibration: Calibration | None = None,
    heldout_kind: HeldoutKind = "shots",
    defect_base: Tensor | None = None,
) -> GateDecision:
    """Score the held-out normal frames, and synthetic defects pasted onto `defect_base` (default: the
    held-out frames), under parent and candidate, then `decide`. `calibration` defaults to the parent
    manifest's."""
    config = config or GateConfig()
    parent_model = parent.model if isinstance(parent, ModelVersion) else parent
    if calibration is None:
        if not isinstance(parent, ModelVersion):
            raise ValueError("a bare CSFlow parent needs its calibration passed in")
        calibration = parent.manifest.threshold_calibration
    check_shots(heldout, parent_model.image_size)
    base = heldout if defect_base is None else defect_base
    defects = synthetic_defects(base.cpu(), config.defects, _generator(config.seed))
    return decide(
        score_images(parent_model, heldout, config.batch_size).image,
        score_images(candidate, heldout, config.batch_size).image,
        score_images(candidate, defects, config.batch_size).image,
        calibration,
        config,
        heldout_kind,
        score_images(parent_model, defects, config.batch_size).image,
    )


@dataclass(frozen=True)
class GatedAdaptation:
    """A candidate adapted on `split.train` and judged on `split.heldout`; publish only if accepted."""

    result: AdaptResult
    decision: GateDecision
    split: ShotSplit

    @property
    def accepted(self) -> bool:
        return self.decision.accepted


def adapt_and_gate(
    parent: ModelVersion,
    shots: Tensor,
    adapt_config: AdaptConfig | None = None,
    gate_config: GateConfig | None = None,
) -> GatedAdaptation:
    """Split the shots, adapt on the training part, gate on the held-out part.

    The accepted candidate is the one that was gated (adapted without the held-out shots); re-adapting
    on all k afterwards would publish a model the gate never saw.
    """
    adapt_config = adapt_config or AdaptConfig()
    gate_config = gate_config or GateConfig()
    if adapt_config.seed == gate_config.view_seed:
        raise ValueError("the adaptation seed must differ from the gate's view seed")
    check_shots(shots, parent.model.image_size)
    split = split_shots(shots.cpu(), gate_config)
    result = adapt(parent, split.train, adapt_config)
    # one shot: defects go onto unperturbed copies of it, as many as there are views
    defect_base = split.train.expand(len(split.heldout), -1, -1, -1) if split.heldout_kind == "views" else None
    decision = gate(parent, result.model, split.heldout, gate_config, None, split.heldout_kind, defect_base)
    return GatedAdaptation(result, decision, split)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)

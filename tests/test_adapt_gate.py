"""The gate: held-out split, the decision rules on plain numbers, and broken candidates end to end."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from adapters.adapt import AdaptConfig, adapt
from adapters.gate import GateConfig, adapt_and_gate, decide, gate, split_shots
from csflow.artifacts import load_model, save_model
from csflow.backbones import LITE0_PACKAGE
from csflow.calibration import Calibration, calibrate
from csflow.defects import DefectConfig
from csflow.model import CSFlow
from csflow.scoring import score_images
from csflow.training import TrainConfig, extract_features, features_scores_and_nll, train_flow

CALIBRATION = Calibration(threshold=1.0, target_fpr=0.1, scores=list(np.linspace(0.5, 1.0, 11)))


def test_split_holds_out_a_quarter_of_the_shots(make_images: Callable[..., Tensor]) -> None:
    shots = make_images(5, seed=1)
    split = split_shots(shots, GateConfig())
    assert split.heldout_kind == "shots" and len(split.heldout_index) == 2 and len(split.train_index) == 3
    assert sorted(split.train_index + split.heldout_index) == list(range(5))
    assert torch.equal(split.train, shots[split.train_index]) and torch.equal(split.heldout, shots[split.heldout_index])
    assert split_shots(shots, GateConfig()).heldout_index == split.heldout_index
    assert len(split_shots(shots[:2], GateConfig()).heldout_index) == 1


def test_one_shot_is_judged_on_seeded_views(make_images: Callable[..., Tensor]) -> None:
    shot = make_images(1, seed=2)
    split = split_shots(shot, GateConfig(n_views=3))
    assert split.heldout_kind == "views" and split.heldout.shape == (3, 3, 128, 128)
    assert torch.equal(split.train, shot)
    assert all(not torch.equal(view, shot[0]) for view in split.heldout)
    assert torch.equal(split_shots(shot, GateConfig(n_views=3)).heldout, split.heldout)
    assert not torch.equal(split_shots(shot, GateConfig(n_views=3, view_seed=1)).heldout, split.heldout)


def test_decide_accepts_a_good_candidate() -> None:
    decision = decide(
        parent_scores=np.array([1.4, 1.6]),
        candidate_scores=np.array([0.7, 0.8]),
        defect_scores=np.array([1.5, 2.0, 0.9, 3.0, 1.2]),
        calibration=CALIBRATION,
        config=GateConfig(),
    )
    assert decision.accepted, decision.reasons
    assert set(decision.checks) == {"finite", "false_rejects", "improvement", "defects", "floor"}
    assert all(r.startswith("ok ") for r in decision.reasons)
    f = decision.figures
    assert f["threshold"] == 1.0 and f["parent_false_reject_rate"] == 1.0 and f["candidate_false_reject_rate"] == 0.0
    assert f["defect_detection_rate"] == 0.8 and f["floor"] == pytest.approx(0.505)
    assert f["candidate_scores"] == [0.7, 0.8]


@pytest.mark.parametrize(
    ("candidate", "defects", "failed"),
    [
        ([0.7, 1.2], [2.0] * 5, "false_rejects"),  # still rejects a normal part
        ([1.5, 1.7], [2.0] * 5, "improvement"),  # worse than the parent (and rejecting)
        ([0.7, 0.8], [2.0, 2.0, 0.9, 0.9, 2.0], "defects"),  # blind to 40% of obvious defects
        ([0.3, 0.35], [2.0] * 5, "floor"),  # far below the source calibration: over-adapted
        ([0.7, float("nan")], [2.0] * 5, "finite"),
    ],
)
def test_decide_rejects(candidate: list[float], defects: list[float], failed: str) -> None:
    decision = decide(np.array([1.4, 1.6]), np.array(candidate), np.array(defects), CALIBRATION, GateConfig())
    assert not decision.accepted
    assert decision.checks[failed] is False
    assert any(r.startswith(f"FAIL {failed}") for r in decision.reasons)


@pytest.mark.parametrize(
    ("candidate", "accepted"),
    [
        ([0.95, 1.15], True),  # one view still over the threshold, but 65% of the parent's excess is gone
        ([1.4, 1.5], False),  # lower than the parent, yet only 18% of the excess removed
    ],
)
def test_views_of_one_shot_are_judged_by_recovery_not_by_the_threshold(candidate: list[float], accepted: bool) -> None:
    """Perturbed views score above clean frames under any model; the parent's views here sit at 1.6 against
    a calibration median of 0.75 (excess 0.85)."""
    decision = decide(
        np.array([1.5, 1.7]), np.array(candidate), np.array([2.0] * 5), CALIBRATION, GateConfig(), "views"
    )
    assert decision.accepted is accepted, decision.reasons
    assert "false_rejects" not in decision.checks and decision.checks["recovery"] is accepted
    assert decision.figures["heldout_kind"] == "views"
    assert decision.figures["view_recovery"] == pytest.approx((1.6 - np.median(candidate)) / 0.85)


def test_shadowed_held_out_shots_are_judged_by_recovery_the_shadow_sets_the_threshold() -> None:
    """A candidate that closed 65 % of the gap but left a held-out shot above the inherited threshold: refused
    when the inherited threshold is its operating point, passed on to the shadow when one follows."""
    args = (np.array([1.5, 1.7]), np.array([0.95, 1.15]), np.array([2.0] * 5), CALIBRATION)
    plain = decide(*args, GateConfig())
    assert not plain.accepted and plain.checks["false_rejects"] is False
    shadowed = decide(*args, GateConfig(shadowed=True))
    assert shadowed.accepted, shadowed.reasons
    assert "false_rejects" not in shadowed.checks and shadowed.checks["recovery"]
    assert not decide(
        np.array([1.5, 1.7]), np.array([1.4, 1.5]), np.array([2.0] * 5), CALIBRATION, GateConfig(shadowed=True)
    ).accepted


def test_floor_check_can_be_disabled() -> None:
    config = GateConfig(floor_quantile=None)
    decision = decide(np.array([1.4]), np.array([0.3]), np.array([2.0]), CALIBRATION, config)
    assert decision.accepted and "floor" not in decision.checks


@pytest.fixture(scope="module")
def source(make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor]) -> tuple[CSFlow, Calibration]:
    """A parent and a calibration from its own scores on 'source' images (threshold: their maximum)."""
    model = make_tiny_model(seed=3)
    return model, calibrate(score_images(model, make_images(8, seed=20)).image, 0.01)


def broken(model: CSFlow, how: str) -> CSFlow:
    candidate = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in candidate.extractor.parameters():
            if how == "zeroed":
                p.zero_()
            else:
                p.add_(10.0 * torch.randn(p.shape, generator=generator))
    return candidate


@pytest.mark.parametrize(
    ("how", "failed"),
    [
        # constant features: every frame, defective or not, gets the same low score ("improved"!)
        ("zeroed", {"defects", "floor"}),
        # features blown up: every normal frame is rejected
        ("noise", {"false_rejects", "improvement"}),
    ],
)
def test_gate_rejects_a_broken_candidate(
    source: tuple[CSFlow, Calibration], make_images: Callable[..., Tensor], how: str, failed: set[str]
) -> None:
    parent, calibration = source
    heldout = make_images(2, seed=21)
    decision = gate(parent, broken(parent, how), heldout, GateConfig(), calibration)
    assert not decision.accepted, decision.reasons
    assert {name for name, passed in decision.checks.items() if not passed} == failed, decision.reasons
    assert decision.figures["n_defects"] == 8 and len(decision.figures["parent_scores"]) == 2


def test_gate_rejects_the_parent_itself(source: tuple[CSFlow, Calibration], make_images: Callable[..., Tensor]) -> None:
    """No adaptation is no improvement: an unchanged candidate is not republished."""
    parent, calibration = source
    decision = gate(parent, parent, make_images(2, seed=22), GateConfig(), calibration)
    assert not decision.accepted and decision.checks["improvement"] is False


def test_adapt_and_gate_wiring(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor], tmp_path: Path
) -> None:
    model = make_tiny_model(seed=8)
    save_model(
        tmp_path / "v", model, LITE0_PACKAGE, calibrate(score_images(model, make_images(4, seed=5)).image, 0.2), {}
    )
    parent = load_model(tmp_path / "v")
    shot = make_images(1, seed=6)
    fast = AdaptConfig(lr=1e-3, max_steps=1, stop_quantile=None)
    gated = adapt_and_gate(parent, shot, fast, GateConfig(n_views=2, defects=DefectConfig(per_image=2)))
    assert gated.split.heldout_kind == "views" and gated.result.steps == 1
    assert gated.accepted == gated.decision.accepted
    assert gated.decision.figures["n_heldout"] == 2 and gated.decision.figures["n_defects"] == 4
    with pytest.raises(ValueError, match="seed"):
        adapt_and_gate(parent, shot, AdaptConfig(seed=5), GateConfig(view_seed=5))


@pytest.mark.slow
def test_adaptation_to_a_darker_domain_is_accepted(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor]
) -> None:
    """End to end on a trained tiny flow: a darker domain pushes normal scores over the threshold; the
    adapted candidate brings held-out frames back under it and still flags scratches (about a minute)."""
    model = make_tiny_model(seed=0, perturb=0.0)
    device = torch.device("cpu")
    images = make_images(40, seed=0)
    features = extract_features(model, [images[:32], images[32:]], device)
    train_flow(
        model,
        [f[:32] for f in features],
        [f[32:] for f in features],
        TrainConfig(epochs=40, batch_size=8, lr=5e-3, eval_every=5),  # from the identity: a few more steps
        device,
    )
    scores, nll = features_scores_and_nll(model, [f[32:] for f in features], 8, device)
    calibration = calibrate(scores.numpy(), 0.1, nll.numpy())
    target = (make_images(8, seed=99) * 0.5) ** 1.2  # darker lighting
    assert (score_images(model, target).image > calibration.threshold).mean() > 0
    config = GateConfig(defects=DefectConfig(kinds=("scratch",)))
    # A fixed budget: on this toy both stop rules end too early for the held-out frames (measured: stopped
    # at the calibration median NLL after 6 steps, 75 % of them still above the threshold and their mean
    # score higher than the parent's; at the median score after 11 steps, 50 %). The rules have their
    # own tests; this one checks that adaptation plus gate can recover a domain at all.
    result = adapt(model, target[:4], AdaptConfig(max_steps=40, stop_quantile=None), calibration)
    decision = gate(model, result.model, target[4:], config, calibration)
    assert decision.accepted, decision.reasons

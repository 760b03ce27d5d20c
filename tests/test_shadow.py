"""Shadow evaluation (adapters/shadow.py): the operating point in a new domain and each check saying no."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from adapters.shadow import ShadowConfig, ShadowEvaluation, operating_point
from csflow.calibration import PROBE_REVISION, Calibration, calibrate
from csflow.defects import probe_plan

RNG = np.random.default_rng(11)
SOURCE = RNG.gamma(9.0, 0.1, 200)  # held-out normal scores of the parent in its own domain
# the source's sensitivity probe on its held-out normals: faint defects half caught, obvious ones all
REFERENCE = {"0.25": 0.5, "0.5": 0.7, "0.75": 0.9, "1": 1.0}
CALIBRATION = replace(calibrate(SOURCE, 0.01), probe_detection=REFERENCE)
CONFIG = ShadowConfig(frames=100, lower=0.1, min_defect_detection=0.8, probes_per_frame=2)


def live_stream(normal: np.ndarray, defects: np.ndarray, every: int = 20) -> np.ndarray:
    """Normal live scores with a defect every `every` frames (a few percent, as on a line)."""
    out = normal.copy()
    out[every - 1 :: every] = defects[: len(out[every - 1 :: every])]
    return out


def evaluate(
    parent: np.ndarray, candidate: np.ndarray, defect_scores: np.ndarray, probe_rise: float = 10.0
) -> ShadowEvaluation:
    """Each frame's two probes score `probe_rise` above the frame (by default: far above any threshold)."""
    ev = ShadowEvaluation(CALIBRATION, defect_scores.tolist(), CONFIG)
    for p, c in zip(parent, candidate, strict=True):
        ev.update(p, c, c * 3.0, [c + probe_rise] * 2)
    return ev


def test_operating_point_carries_the_calibration_through_a_location_scale_change() -> None:
    point = operating_point(2.0 * SOURCE + 1.0, CALIBRATION, 0.1)
    assert point.scale == pytest.approx(2.0)
    assert point.threshold == pytest.approx(2.0 * CALIBRATION.threshold + 1.0)
    np.testing.assert_allclose(point.carry(SOURCE), 2.0 * SOURCE + 1.0)
    with pytest.raises(ValueError, match="spread"):
        operating_point(np.ones(50), CALIBRATION, 0.1)


def test_a_partly_recovered_candidate_gets_its_own_threshold_and_keeps_defects_flagged() -> None:
    """The issue's case: adaptation closed most of the gap; at the inherited threshold it would reject
    nearly every normal part, at its own it rejects few and still flags the defects."""
    normal = 1.4 * RNG.gamma(9.0, 0.1, 100) + 0.6  # shifted normals under the candidate
    defects = RNG.uniform(4.0, 6.0, 100)
    candidate = live_stream(normal, defects)
    parent = live_stream(normal * 3.0, defects * 2.0)  # the parent rejects everything
    assert (normal > CALIBRATION.threshold).mean() > 0.5  # the inherited threshold would fail the line
    decision = evaluate(parent, candidate, RNG.uniform(3.0, 6.0, 20)).decide()
    assert decision.accepted, decision.reasons
    cal = decision.calibration
    assert cal is not None and CALIBRATION.threshold < cal.threshold < 3.0
    assert (normal > cal.threshold).mean() <= 0.05  # normals pass
    assert (defects > cal.threshold).all()  # defects stay flagged
    assert max(cal.scores) <= cal.threshold and len(cal.scores) >= 90  # reference: what it did not flag
    assert len(cal.nll) == len(cal.scores)
    assert decision.figures["parent_flag_rate"] == 1.0 and decision.figures["candidate_flag_rate"] <= 0.1


def test_refused_when_the_candidate_flags_more_than_the_parent() -> None:
    """A candidate that made a fifth of the normal parts look anomalous, beside a parent that was doing fine:
    its own threshold (set by the lower part) flags them, more than the parent flags."""
    normal = RNG.gamma(9.0, 0.1, 100)
    candidate = normal.copy()
    candidate[::5] += 3.0  # a fifth of the normal parts now look anomalous
    decision = evaluate(normal, candidate, RNG.uniform(8.0, 9.0, 20)).decide()
    assert not decision.accepted
    assert any(r.startswith("FAIL shadow flags") for r in decision.reasons), decision.reasons


def test_refused_when_synthetic_defects_fall_below_the_new_threshold() -> None:
    normal = 3.0 * RNG.gamma(9.0, 0.1, 100)  # spread three times wider: the threshold moves up
    decision = evaluate(normal * 4.0, normal, RNG.uniform(1.2, 1.8, 20)).decide()
    assert not decision.accepted
    assert any(r.startswith("FAIL shadow defects") for r in decision.reasons), decision.reasons


def test_refused_when_the_candidates_scores_drift_during_the_shadow() -> None:
    normal = RNG.gamma(9.0, 0.1, 100)
    drifting = normal + np.r_[np.zeros(50), np.full(50, 0.8)]  # the domain keeps moving
    decision = evaluate(drifting * 5.0, drifting, RNG.uniform(8.0, 9.0, 20)).decide()
    assert not decision.accepted
    assert any(r.startswith("FAIL shadow stable") for r in decision.reasons), decision.reasons


def test_no_decision_before_enough_frames_and_none_on_non_finite_scores() -> None:
    ev = ShadowEvaluation(CALIBRATION, [5.0], CONFIG)
    for score in SOURCE[:10]:
        ev.update(score, score, score)
    early = ev.decide()
    assert not ev.done and not early.accepted and early.calibration is None  # no operating point yet
    ev = ShadowEvaluation(CALIBRATION, [5.0], CONFIG)
    for i in range(100):
        ev.update(1.0, float("nan") if i == 50 else 1.0 + i * 1e-3, 1.0)
    decision = ev.decide()
    assert ev.done and not decision.accepted and "FAIL shadow finite" in decision.reasons[1]


def test_frames_beyond_the_shadow_are_ignored() -> None:
    ev = ShadowEvaluation(CALIBRATION, [], ShadowConfig(frames=3))
    for i in range(10):
        ev.update(1.0, float(i), 0.0)
    assert ev.candidate == [0.0, 1.0, 2.0]


def test_the_calibration_it_returns_round_trips() -> None:
    normal = 1.4 * RNG.gamma(9.0, 0.1, 100) + 0.3
    decision = evaluate(normal * 3.0, normal, RNG.uniform(4.0, 6.0, 20)).decide()
    assert decision.calibration is not None
    assert Calibration.from_dict(decision.calibration.to_dict()) == decision.calibration
    assert decision.calibration.probe_detection == REFERENCE  # the source's reference travels on


def test_no_drift_check_without_enough_calibration_scores_means_no_activation() -> None:
    few = calibrate(SOURCE[:10], 0.1)
    ev = ShadowEvaluation(few, [5.0] * 10, CONFIG)
    for score in 1.3 * RNG.gamma(9.0, 0.1, 100):
        ev.update(10.0, score, score)
    decision = ev.decide()
    assert not decision.accepted
    assert any(r.startswith("FAIL shadow stable: cannot watch drift") for r in decision.reasons), decision.reasons


def test_refused_when_the_candidate_has_gone_blind_to_defects() -> None:
    """The fault measured on ELPV: a candidate whose live flag rate looks right (it flags no more than the
    parent, shows no drift, its obvious synthetic defects pass) but catches far fewer defects than the
    source did. Probes pasted onto its live frames barely rise above the frames: refused."""
    normal = 1.4 * RNG.gamma(9.0, 0.1, 100) + 0.6
    parent, candidate = normal * 3.0, normal
    blind = evaluate(parent, candidate, RNG.uniform(4.0, 6.0, 20), probe_rise=0.05).decide()
    assert not blind.accepted
    assert [r for r in blind.reasons if r.startswith("FAIL")] == [blind.reasons[-2]], blind.reasons
    assert blind.reasons[-2].startswith("FAIL shadow sensitivity"), blind.reasons
    assert blind.figures["sensitivity"] < blind.figures["reference_sensitivity"] == pytest.approx(0.775)
    sharp = evaluate(parent, candidate, RNG.uniform(4.0, 6.0, 20)).decide()  # the same, probes caught
    assert sharp.accepted, sharp.reasons
    assert sharp.figures["sensitivity"] == 1.0 and sharp.figures["n_probes"] == 2 * sum(
        candidate <= sharp.figures["threshold"]
    )


def test_sensitivity_may_fall_by_the_configured_loss_and_no_further() -> None:
    """Probes at half the strengths caught (0.5 against the reference's 0.775): refused at the default
    loss 0, accepted when 0.3 may be lost."""
    normal = 1.4 * RNG.gamma(9.0, 0.1, 100) + 0.6
    strengths = [item.strength for item in probe_plan(0, 100, 2, [0.25, 0.5, 0.75, 1.0], 2)]
    for loss, accepted in ((0.0, False), (0.3, True)):
        ev = ShadowEvaluation(CALIBRATION, [5.0] * 20, replace(CONFIG, max_sensitivity_loss=loss))
        for i, c in enumerate(normal):
            ev.update(3 * c, c, c, [c + (10.0 if s >= 0.75 else 0.0) for s in strengths[2 * i : 2 * i + 2]])
        decision = ev.decide()
        assert decision.figures["sensitivity"] == pytest.approx(0.5)
        assert decision.accepted is accepted, decision.reasons


def test_probes_on_frames_the_candidate_flags_do_not_count() -> None:
    """A flagged frame may be a defect: probes pasted onto it say nothing about sensitivity."""
    normal = 1.4 * RNG.gamma(9.0, 0.1, 100) + 0.6
    candidate = live_stream(normal, RNG.uniform(40.0, 60.0, 100))  # five obvious defects
    ev = ShadowEvaluation(CALIBRATION, [80.0] * 20, CONFIG)
    for c in candidate:  # probes on the defects score below the threshold, on normal frames far above it
        ev.update(3 * c, c, c, [0.0 if c > 30 else c + 10.0] * 2)
    decision = ev.decide()
    assert decision.accepted, decision.reasons
    unflagged = int((candidate <= decision.figures["threshold"]).sum())
    assert unflagged <= 95 and decision.figures["sensitivity"] == 1.0 and decision.figures["n_probes"] == 2 * unflagged


def test_a_parent_without_a_sensitivity_reference_is_never_adapted_automatically() -> None:
    normal = 1.4 * RNG.gamma(9.0, 0.1, 100) + 0.6
    ev = ShadowEvaluation(calibrate(SOURCE, 0.01), [5.0] * 20, CONFIG)
    assert len(ev.probe_images(torch.rand(3, 3, 8, 8))) == 0  # nothing to probe against
    for c in normal:
        ev.update(3 * c, c, c)
    decision = ev.decide()
    assert not decision.accepted
    assert any(r.startswith("FAIL shadow sensitivity: the parent's calibration has no") for r in decision.reasons)


def test_a_reference_measured_with_other_probes_is_not_compared() -> None:
    """A manifest written before the probe's defects followed the frame's contrast (no `probe_revision`:
    revision 1) holds a curve of other defects: comparing the new probes with it would be a silent mix."""
    legacy = {k: v for k, v in CALIBRATION.to_dict().items() if k != "probe_revision"}
    old = Calibration.from_dict(legacy)
    assert old.probe_revision == 1 and old.probe_detection == REFERENCE
    assert Calibration.from_dict(CALIBRATION.to_dict()).probe_revision == PROBE_REVISION
    normal = 1.4 * RNG.gamma(9.0, 0.1, 100) + 0.6
    for calibration, accepted in ((CALIBRATION, True), (old, False)):
        ev = ShadowEvaluation(calibration, RNG.uniform(4.0, 6.0, 20).tolist(), CONFIG)
        for c in normal:
            ev.update(3 * c, c, c * 3.0, [c + 10.0] * 2)
        decision = ev.decide()
        assert decision.accepted is accepted, decision.reasons
    assert any(
        "measured with probe revision 1" in r and r.startswith("FAIL shadow sensitivity") for r in decision.reasons
    )


def test_probe_images_follow_the_stream() -> None:
    """Probes for the next frames, `probes_per_frame` each, seeded by the position in the stream."""
    frames = torch.rand(5, 3, 16, 16)
    ev = ShadowEvaluation(CALIBRATION, [], CONFIG)
    first = ev.probe_images(frames)
    assert first.shape == (10, 3, 16, 16)
    torch.testing.assert_close(ev.probe_images(frames), first)  # same position, same probes
    ev.update(1.0, 1.0, 1.0, [2.0, 2.0])
    assert not torch.equal(ev.probe_images(frames), first)  # one frame on: the next frames' probes


def test_a_refused_candidate_still_gets_the_operating_point_the_shadow_measured() -> None:
    """An operator may activate a refused candidate by hand (the worker keeps it): it must then serve at its
    own threshold for the new domain (the one an accepted candidate on the same frames gets), not at the
    parent's, which rejects most normal parts here."""
    rng = np.random.default_rng(5)
    normal = 1.4 * rng.gamma(9.0, 0.1, 100) + 0.6
    defects = rng.uniform(4.0, 6.0, 20)
    refused = evaluate(normal * 3.0, normal, defects, probe_rise=0.05).decide()
    accepted = evaluate(normal * 3.0, normal, defects).decide()
    assert accepted.accepted and accepted.calibration is not None, accepted.reasons
    assert not refused.accepted and refused.calibration == accepted.calibration
    assert (normal > CALIBRATION.threshold).mean() > 0.5 > (normal > refused.calibration.threshold).mean()


def _line_evaluation(
    reference: str,
    parent_rise: float,
    parent_offset: float = 0.0,
    parent_probes: bool = True,
    caught_from: float = 0.75,
    loss: float = 0.0,
) -> ShadowEvaluation:
    """A candidate whose probes are caught from strength `caught_from` up (by default the two strongest:
    sensitivity 0.5, below the source's 0.775); the parent's probes on the same frames (if `parent_probes`)
    rise by `parent_rise` at the two weakest strengths and by 10 at the others."""
    normal = live_stream(1.4 * RNG.gamma(9.0, 0.1, 100) + 0.6, np.full(5, 6.0))
    strengths = [item.strength for item in probe_plan(0, 100, 2, [0.25, 0.5, 0.75, 1.0], 2)]
    config = replace(CONFIG, probe_reference=reference, max_sensitivity_loss=loss)
    ev = ShadowEvaluation(CALIBRATION, [8.0] * 20, config)
    for i, c in enumerate(normal):
        p, mine = c + parent_offset, strengths[2 * i : 2 * i + 2]
        ev.update(
            p,
            c,
            c,
            [c + (10.0 if s >= caught_from else 0.0) for s in mine],
            [p + (10.0 if s >= 0.75 else parent_rise) for s in mine] if parent_probes else [],
        )
    return ev


def test_the_line_reference_is_the_parents_own_sensitivity_on_these_frames_where_that_is_lower() -> None:
    """Where the line itself hides the probe's defects from the parent (it catches only the strong ones on
    these frames, 0.5), a candidate that catches as much is not held to the source's 0.775, measured on its
    own clean normals; with the source reference it is."""
    line = _line_evaluation("source_or_parent", parent_rise=0.0).decide()
    assert line.figures["parent_sensitivity"] == pytest.approx(0.5)
    assert line.figures["reference_sensitivity"] == pytest.approx(0.5)
    assert line.accepted, line.reasons
    assert any("the parent 50% on these frames" in r for r in line.reasons)
    source = _line_evaluation("source", parent_rise=0.0).decide()
    assert source.figures["parent_sensitivity"] == pytest.approx(0.5)  # measured, not used
    assert source.figures["reference_sensitivity"] == pytest.approx(0.775)
    assert not source.accepted and any(r.startswith("FAIL shadow sensitivity") for r in source.reasons)


def test_the_line_reference_never_rises_above_the_source_and_needs_a_working_parent() -> None:
    """A parent that catches every probe on these frames does not raise the bar above the source's; a
    parent that flags every frame (the line is far from its domain) has no curve here, so the source's
    reference holds; without the parent's probe scores it holds too."""
    sharp_parent = _line_evaluation("source_or_parent", parent_rise=10.0).decide()
    assert sharp_parent.figures["parent_sensitivity"] == 1.0
    assert sharp_parent.figures["reference_sensitivity"] == pytest.approx(0.775)
    assert not sharp_parent.accepted
    lost_parent = _line_evaluation("source_or_parent", parent_rise=0.0, parent_offset=5.0).decide()
    assert "parent_sensitivity" not in lost_parent.figures and not lost_parent.accepted
    unmeasured = _line_evaluation("source_or_parent", parent_rise=0.0, parent_probes=False).decide()
    assert "parent_sensitivity" not in unmeasured.figures and not unmeasured.accepted


def test_with_source_and_parent_a_candidate_blinder_than_the_parent_on_these_frames_is_refused() -> None:
    """A candidate that catches the three strongest strengths (0.75) is within the allowed loss of the
    source's 0.775 but below the parent's 1.0 on the same frames: accepted against the source alone, refused
    when it must reach both; a parent no sharper than the source changes nothing."""
    against_source = _line_evaluation("source", parent_rise=10.0, caught_from=0.5, loss=0.05).decide()
    assert against_source.accepted, against_source.reasons
    both = _line_evaluation("source_and_parent", parent_rise=10.0, caught_from=0.5, loss=0.05).decide()
    assert both.figures["reference_sensitivity"] == 1.0 and not both.accepted
    assert any(r.startswith("FAIL shadow sensitivity") and "the parent 100% on these frames" in r for r in both.reasons)
    dull_parent = _line_evaluation("source_and_parent", parent_rise=0.0, caught_from=0.5, loss=0.05).decide()
    assert dull_parent.figures["reference_sensitivity"] == pytest.approx(0.775) and dull_parent.accepted


def test_an_unknown_probe_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="probe_reference"):
        ShadowConfig(probe_reference="parent")  # type: ignore[arg-type]


def test_the_parents_recalibration_is_judged_on_its_own_columns() -> None:
    """A line that only needs a new operating point (the parent's scores moved by a location-scale change,
    its probes still far above): the parent, as its own candidate, passes every check with its own NLLs and
    its scores of the gate's synthetic defects, whatever the candidate did; its calibration is the parent's
    carried over. Without the parent's NLLs (NaN: not measured) or its defect scores, it is refused."""
    rng = np.random.default_rng(5)  # its own: the module's RNG depends on which tests ran first
    normal = 2.0 * rng.gamma(9.0, 0.1, 100) + 1.5  # the parent flags nearly all of them at its threshold
    parent = live_stream(normal, rng.uniform(9.0, 12.0, 100))
    parent_defects = rng.uniform(8.0, 12.0, 20).tolist()

    def shadow(parent_nll: float, defects: list[float]) -> ShadowEvaluation:
        ev = ShadowEvaluation(CALIBRATION, [], CONFIG, parent_defect_scores=defects)
        for p in parent:  # a blind candidate: its probes score as its frames, and it has no defect scores
            ev.update(p, p - 1.0, 1.0, [p - 1.0] * 2, [p + 10.0] * 2, p * parent_nll)
        return ev

    evaluation = shadow(3.0, parent_defects)
    assert not evaluation.decide().accepted
    recalibration = evaluation.recalibration().decide()
    assert recalibration.accepted, recalibration.reasons
    assert recalibration.figures["parent_flag_rate"] > 0.9 and recalibration.figures["candidate_flag_rate"] < 0.15
    cal = recalibration.calibration
    assert cal is not None and cal.threshold > CALIBRATION.threshold and (normal > cal.threshold).mean() <= 0.1
    np.testing.assert_allclose(cal.nll, sorted(3.0 * s for s in cal.scores))  # its NLLs, not the candidate's
    unmeasured = shadow(float("nan"), parent_defects).recalibration().decide()
    assert not unmeasured.accepted and any(r.startswith("FAIL recalibration finite") for r in unmeasured.reasons)
    no_defects = shadow(3.0, []).recalibration().decide()
    assert not no_defects.accepted and any(r.startswith("FAIL recalibration defects") for r in no_defects.reasons)


def _three_strengths_caught(config: ShadowConfig) -> ShadowEvaluation:
    """The parent as its own candidate (same columns) on a dimmer line: its probes are caught at the three
    strongest strengths (sensitivity 0.75, a little below the source's 0.775); it flags nearly every frame at
    its own threshold, its NLLs and its scores of the gate's synthetic defects are measured."""
    normal = 1.4 * np.random.default_rng(3).gamma(9.0, 0.1, 100) + 0.6
    strengths = [item.strength for item in probe_plan(0, 100, 2, [0.25, 0.5, 0.75, 1.0], 2)]
    ev = ShadowEvaluation(CALIBRATION, [8.0] * 20, config, parent_defect_scores=[8.0] * 20)
    for i, c in enumerate(normal):
        probes = [c + (10.0 if s >= 0.5 else 0.0) for s in strengths[2 * i : 2 * i + 2]]
        ev.update(c, c, c * 3.0, probes, probes, c * 3.0)
    return ev


def test_sensitivity_may_fall_by_the_probes_own_noise_and_no_further() -> None:
    """0.75 against 0.775 over 200 probes: within two standard errors of the probe's noise (about 2.7 points
    each), not within half of one; at z = 0 (the default) refused."""
    for z, accepted in ((0.0, False), (0.5, False), (2.0, True)):
        decision = _three_strengths_caught(replace(CONFIG, sensitivity_z=z)).decide()
        figures = decision.figures
        assert figures["sensitivity"] == pytest.approx(0.75) and 0.02 < figures["sensitivity_noise"] < 0.035
        assert figures["sensitivity_bar"] == pytest.approx(0.775 - z * figures["sensitivity_noise"])
        assert decision.accepted is accepted, decision.reasons
    assert any("+ 2 x 2." in r and r.startswith("ok shadow sensitivity") for r in decision.reasons), decision.reasons
    with pytest.raises(ValueError, match="recalibration_sensitivity_z"):
        ShadowConfig(recalibration_sensitivity_z=-1.0)


def test_the_recalibrations_noise_allowance_is_its_own() -> None:
    """`recalibration_sensitivity_z` widens the bar for the parent judged as its own candidate only: on the same
    columns the candidate, held to `sensitivity_z` = 0, is refused."""
    widened = _three_strengths_caught(replace(CONFIG, recalibration_sensitivity_z=2.0))
    assert not widened.decide().accepted
    recalibration = widened.recalibration().decide()
    assert recalibration.accepted, recalibration.reasons
    assert recalibration.figures["sensitivity_bar"] < 0.75 < widened.decide().figures["sensitivity_bar"]
    strict = _three_strengths_caught(CONFIG).recalibration().decide()
    assert not strict.accepted and any(r.startswith("FAIL recalibration sensitivity") for r in strict.reasons)

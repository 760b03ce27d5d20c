"""The demo's claim about the line (`judge_recovery`): "recovered" only when the adapted version held it."""

from __future__ import annotations

from lab.demo.camera import SentFrame
from lab.demo.observe import Scored, Story
from lab.demo.spec import DemoSpec
from lab.demo.summary import judge_recovery
from lab.demo.text import gate_line

SPEC = DemoSpec(frames_before=100, frames_after=400, recovery_margin=0.02)


def story(reject_before: float, reject_after: float, realarm_at: int | None = None, after: int = 400) -> Story:
    """100 frames before the shift, 50 shifted under the source, `after` under the adapted version; every
    frame normal, the first `reject_*` share of each phase flagged anomalous."""
    s = Story(base="src", adapted="new", adapted_frame=150)
    phases = [
        (0, 100, "src", False, reject_before),
        (100, 150, "src", True, 1.0),
        (150, 150 + after, "new", True, reject_after),
    ]
    for start, end, version, shifted, share in phases:
        for i in range(start, end):
            frame = SentFrame(i, f"f{i}", "cell.png", defective=False, shifted=shifted, sent_s=0.0)
            flagged = (i - start) < share * (end - start)
            s.scored.append(Scored(frame, 1.0, 0.5, flagged, version, "ok", 0.0))
    if realarm_at is not None:
        s.alarm_frames["new"] = realarm_at
    return s


def test_recovered_when_no_alarm_and_rejects_within_the_margin() -> None:
    ok, text = judge_recovery(story(0.01, 0.02), SPEC)
    assert ok and text.startswith("recovered"), text


def test_a_re_alarm_under_the_adapted_version_is_not_a_recovery() -> None:
    ok, text = judge_recovery(story(0.01, 0.01, realarm_at=230), SPEC)
    assert not ok and text.startswith("re-alarmed") and "frame 230, 80 frames after" in text, text


def test_too_many_normal_rejects_after_the_switch_is_not_a_recovery() -> None:
    ok, text = judge_recovery(story(0.01, 0.05), SPEC)
    assert not ok and text.startswith("not recovered") and "5%" in text and "1%" in text, text


def test_too_few_frames_after_the_switch_is_not_a_recovery() -> None:
    ok, text = judge_recovery(story(0.01, 0.0, after=120), SPEC)
    assert not ok and "120 of 400" in text, text


def test_no_adapted_version_is_not_a_recovery() -> None:
    s = story(0.01, 0.0)
    s.adapted, s.adapted_frame = None, None
    assert judge_recovery(s, SPEC) == (False, "not recovered: no adapted version served the line")


def test_the_demo_names_a_recalibrations_flag_rates_beside_the_shadows() -> None:
    live = {"frames_seen": 100, "parent_flag_rate": 0.4, "candidate_flag_rate": 0.03, "threshold": 0.91}
    line = gate_line({"figures": {"shadow": live, "recalibration": {**live, "candidate_flag_rate": 0.02}}})
    assert "shadow on 100 live frames: flagged 40% by the source version, 3% by the candidate" in line
    assert "recalibration on 100 live frames: flagged 40% by the source version, 2% by the source version" in line
    assert "recalibration" not in gate_line({"figures": {"shadow": live}})

"""The demo's summary per phase, its printout and the timeline's markers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lab.demo.loop import Demo
from lab.demo.model import PreparedModel
from lab.demo.observe import Scored, Story, phase_of
from lab.demo.spec import PHASES, DemoSpec, Say
from lab.demo.text import failed_reasons, num, pct
from lab.plots import TimelineMarker, TimelinePhase


def phase_figures(scored: list[Scored]) -> dict[str, Any]:
    normal = [s for s in scored if not s.frame.defective]
    defective = [s for s in scored if s.frame.defective]

    def rate(items: list[Scored]) -> float | None:
        return round(float(np.mean([s.anomalous for s in items])), 4) if items else None

    def median(items: list[Scored]) -> float | None:
        return round(float(np.median([s.score for s in items])), 5) if items else None

    return {
        "frames": len(scored),
        "normal": len(normal),
        "defective": len(defective),
        "false_reject_rate": rate(normal),  # normal cells flagged anomalous
        "detection_rate": rate(defective),  # defective cells flagged anomalous
        "median_score_normal": median(normal),
        "median_score_defective": median(defective),
        "median_score": median(scored),
    }


def false_reject_rate(scored: list[Scored]) -> float | None:
    normal = [s.anomalous for s in scored if not s.frame.defective]
    return float(np.mean(normal)) if normal else None


def judge_recovery(story: Story, spec: DemoSpec) -> tuple[bool, str]:
    """Whether the line recovered, in words: the adapted version served `frames_after` frames with no drift
    alarm, and rejects no more normal cells than before the shift plus `recovery_margin`."""
    if story.adapted is None or story.adapted_frame is None:
        return False, "not recovered: no adapted version served the line"
    name, after = story.adapted[:10], story.after()
    before = [s for s in story.scored if phase_of(s, story) == "before_shift"]
    frr_after, frr_before = false_reject_rate(after), false_reject_rate(before)
    rates = f"it rejects {pct(frr_after)} of normal cells against {pct(frr_before)} before the shift"
    realarm = story.alarm_frames.get(story.adapted)
    if realarm is not None:
        return False, (
            f"re-alarmed: the adapted version {name} raised a drift alarm at frame {realarm}, "
            f"{realarm - story.adapted_frame} frames after it started serving; {rates}"
        )
    if len(after) < spec.frames_after:
        return False, f"not recovered yet: the adapted version {name} served {len(after)} of {spec.frames_after} frames"
    if frr_after is None or frr_before is None or frr_after > frr_before + spec.recovery_margin:
        return False, f"not recovered: {rates} (allowed: {spec.recovery_margin:.0%} more)"
    return True, f"recovered: the adapted version {name} served {len(after)} frames with no drift alarm; {rates}"


def summarise(demo: Demo, model: PreparedModel, outcome: str, ok: bool) -> dict[str, Any]:
    story, spec = demo.story, demo.spec
    scored = sorted(story.scored, key=lambda s: s.frame.index)
    by_phase: dict[str, list[Scored]] = {p: [] for p in PHASES}
    for s in scored:
        by_phase[phase_of(s, story)].append(s)
    versions: dict[str, dict[str, Any]] = {}
    for s in scored:
        v = versions.setdefault(s.version, {"version": s.version, "threshold": s.threshold, "frames": 0})
        v["frames"] += 1
        v["role"] = "adapted" if s.version == story.adapted else "source" if s.version == story.base else "other"
    alarm = None
    if story.alarm is not None:
        a = story.alarm.detail.get("alarm") or {}
        first = story.alarm_frames.get(story.base)
        alarm = {
            "version": story.alarm.version,
            "detector": a.get("detector"),
            "first_alarm_frame": first,
            "delay_frames": None if first is None else first - spec.frames_before + 1,
            # alarms of later versions, e.g. when the adapted version's scores stay above the source calibration
            "later_alarms": [
                {"version": version, "first_alarm_frame": at}
                for version, at in story.alarm_frames.items()
                if version != story.base
            ],
        }
    adaptation: dict[str, Any] = {
        "attempts": len(story.confirmed),
        "confirmed": story.confirmed,
        "rejected": [{"reasons": failed_reasons(e), "figures": _gate_summary(e.detail)} for e in story.rejected],
        "accepted": story.accepted is not None,
    }
    if story.accepted is not None:
        detail = story.accepted.detail.get("adaptation", {})
        adaptation |= {
            "version": story.accepted.version,
            "gate": _gate_summary(story.accepted.detail),
            "adaptation": {k: detail.get(k) for k in ("steps", "stop_reason", "seconds")},
            # event timestamps are the worker's clock (ms epoch); both ends come from the same worker
            "seconds_started_to_accepted": round((story.accepted.ts - story.started[-1].ts) / 1000, 2)
            if story.started
            else None,
            "seconds_confirmed_to_served": None
            if story.adapted_s is None
            else round(story.adapted_s - story.confirmed_s[-1], 2),
            "first_frame": story.adapted_frame,
        }
    return {
        "ok": ok,
        "outcome": outcome,
        "shift": spec.shift,
        "camera": spec.camera,
        "settings": {
            "image_size": spec.image_size,
            "hidden_channels": spec.hidden_channels,
            "epochs": spec.epochs,
            "rate": spec.rate,
            "frames_before": spec.frames_before,
            "frames_after": spec.frames_after,
            "defect_share": spec.defect_share,
            "shots": demo.shots,
            "seed": spec.seed,
        },
        "model": {
            "version": model.version,
            "threshold": model.threshold,
            "trained_now": model.trained,
            "seconds": round(model.seconds, 1),
        },
        "frames": {"sent": demo.camera.sent, "scored": len(story.scored)},
        "phases": {p: phase_figures(items) for p, items in by_phase.items()},
        "drift_alarm": alarm,
        "adaptation": adaptation,
        "versions": list(versions.values()),
        "events": story.events,
    }


def _gate_summary(detail: Mapping[str, Any]) -> dict[str, Any]:
    keep = (
        "threshold",
        "n_heldout",
        "parent_false_reject_rate",
        "candidate_false_reject_rate",
        "parent_median",
        "candidate_median",
        "calibration_median",
        "defect_detection_rate",
        "view_recovery",
    )
    figures = detail.get("figures", {})
    return {k: figures[k] for k in keep if k in figures}


def timeline_markers(demo: Demo) -> list[TimelineMarker]:
    story, spec = demo.story, demo.spec
    markers = [TimelineMarker(spec.frames_before, "shift", f"shift '{spec.shift}' on")]
    for version, at in story.alarm_frames.items():
        role = "adapted" if version == story.adapted else "source"
        markers.append(TimelineMarker(at, "alarm", f"drift alarm, {role} version"))
    for i, at in enumerate(story.confirmed_at_frame):
        markers.append(TimelineMarker(at, "confirms", "operator confirms" if i == 0 else f"confirms again ({i + 1})"))
    markers += [TimelineMarker(at, "rejected", "adaptation rejected") for at in story.rejected_at_frame]
    if story.adapted_frame is not None:
        markers.append(TimelineMarker(story.adapted_frame, "serves", "adapted version serves"))
    return markers


def timeline_phases(demo: Demo) -> list[TimelinePhase]:
    story, spec = demo.story, demo.spec
    last = max((s.frame.index for s in story.scored), default=0) + 1
    adapted = story.adapted_frame if story.adapted_frame is not None else last
    return [
        TimelinePhase("before_shift", 0, spec.frames_before, "before the shift"),
        TimelinePhase("shifted_before_adaptation", spec.frames_before, adapted, "shifted, source version"),
        TimelinePhase("after_adaptation", adapted, last, "shifted, adapted version"),
    ]


def timeline_thresholds(demo: Demo) -> list[tuple[str, int, int, float]]:
    """Per version, in the order they served: its label, first and last frame, threshold."""
    spans: dict[str, list[float]] = {}
    for s in sorted(demo.story.scored, key=lambda s: s.frame.index):
        span = spans.setdefault(s.version, [s.frame.index, s.frame.index, s.threshold])
        span[1] = s.frame.index
    return [
        (f"{'adapted' if v == demo.story.adapted else 'source'} version {v[:10]}", int(a), int(b), t)
        for v, (a, b, t) in spans.items()
    ]


def confirmed_frames(demo: Demo) -> list[int]:
    by_id = demo.camera.by_id
    return [by_id[f].index for batch in demo.story.confirmed for f in batch if f in by_id]


def say_summary(summary: Mapping[str, Any], say: Say) -> None:
    say("")
    say(f"summary: {summary['outcome']}")
    say(f"  {'phase':<28}{'frames':>7}{'normal rejected':>17}{'defects caught':>16}{'median normal score':>21}")
    for phase, f in summary["phases"].items():
        say(
            f"  {phase:<28}{f['frames']:>7}{pct(f['false_reject_rate']):>17}{pct(f['detection_rate']):>16}"
            f"{num(f['median_score_normal']):>21}"
        )
    alarm = summary["drift_alarm"]
    if alarm:
        say(
            f"  drift alarm at frame {alarm['first_alarm_frame']}, {alarm['delay_frames']} frames into the shift "
            f"({alarm['detector']})"
        )
        for later in alarm["later_alarms"]:
            say(f"  drift alarm again, under version {later['version']}, at frame {later['first_alarm_frame']}")
    a = summary["adaptation"]
    if a["accepted"]:
        say(
            f"  adaptation: version {a['version']} accepted after {a['attempts']} attempt(s), "
            f"{a['seconds_started_to_accepted']} s adapting; serving {a['seconds_confirmed_to_served']} s after the "
            f"operator's confirmations"
        )
    say(f"  took {summary['seconds']['total']:.0f} s (model {summary['seconds']['model']:.0f} s)")
    say(f"  files: {summary['files']['summary']}, {summary['files']['timeline']}, {summary['files']['worker_log']}")

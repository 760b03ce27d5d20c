"""The running demo: follows the worker, plays the operator and prints the live view."""

from __future__ import annotations

import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import redis

from daemon.config import Settings
from daemon.confirmations import normal_entry, submit
from daemon.events import Event, EventKind
from daemon.store import Keys
from lab.demo.camera import Camera
from lab.demo.model import PreparedModel
from lab.demo.observe import Observer, Scored, Story, phase_of
from lab.demo.spec import DemoSpec, Say
from lab.demo.text import failed_reasons, gate_line, num
from lab.demo.worker import tail

OPERATOR = "demo-operator"
DRIFT_OFF = "off"  # the verdicts' drift state of a version the worker cannot monitor
RECENT = 50  # verdicts behind each live line's figures
STATUS_EVERY_S = 1.0
POLL_MS = 200


class DemoFailed(RuntimeError):
    """The loop did not complete (no alarm, no accepted adaptation, ...): the message says what did not happen."""


class Demo:
    """The running demo: camera, worker, observer, operator and live view."""

    def __init__(
        self,
        spec: DemoSpec,
        settings: Settings,
        say: Say,
        camera: Camera,
        worker: subprocess.Popen[bytes],
        worker_log: Path,
        client: redis.Redis,
        keys: Keys,
        model: PreparedModel,
        shots: int,
        t0: float,
    ) -> None:
        self.spec, self.settings, self.say = spec, settings, say
        self.camera, self.worker, self.worker_log = camera, worker, worker_log
        self.client, self.keys, self.shots, self.t0 = client, keys, shots, t0
        self.observer = Observer(client, keys)
        self.story = Story(base=model.version)
        self._next_status = 0.0
        self._scored_at_status = 0
        self._waiting_since: float | None = None
        # Give up on an attempt only when the worker would: a 10-shot run took 558 s on 2 shared cores.
        self.adapt_timeout_s = spec.adapt_timeout_s or settings.adapt.run_timeout_s + settings.adapt.shadow_timeout_s

    def now(self) -> float:
        return time.monotonic() - self.t0

    # the loop ------------------------------------------------------------------------------------
    def follow(self) -> None:
        """Until the adapted version has scored `frames_after` frames; raises `DemoFailed` otherwise."""
        spec, story = self.spec, self.story
        while True:
            self._poll(POLL_MS)
            self._check_alive()
            if story.alarm is None:
                if any(s.drift == DRIFT_OFF for s in story.scored[-RECENT:] if s.version == story.base):
                    raise DemoFailed(
                        f"the worker does not monitor drift for version {story.base} (verdicts say drift 'off': its "
                        "manifest holds fewer calibration scores than [drift] min_reference)"
                    )
                shifted = sum(s.frame.shifted for s in story.scored)
                if shifted >= spec.max_shifted:
                    raise DemoFailed(f"no drift alarm after {shifted} shifted frames")
            elif len(story.confirmed) == 0 or (self._rejected_all() and len(story.confirmed) < spec.attempts):
                if spec.person:
                    self._await_person()
                else:
                    self._confirm()
            elif story.accepted is None:
                if self._rejected_all():
                    raise DemoFailed(
                        f"adaptation rejected {len(story.rejected)} time(s): "
                        + "; ".join(failed_reasons(story.rejected[-1]))
                    )
                waited = self.now() - story.confirmed_s[-1]
                if waited > self.adapt_timeout_s:
                    what = "adaptation_started" if len(story.started) < len(story.confirmed) else "an adaptation result"
                    raise DemoFailed(f"no {what} event within {self.adapt_timeout_s:.0f} s of the confirmations")
            else:
                if len(story.after()) >= spec.frames_after:
                    return
                if story.adapted_s is None and self.now() - story.confirmed_s[-1] > self.adapt_timeout_s:
                    raise DemoFailed(f"version {story.accepted.version} was accepted but never scored a frame")
            self._status()

    def drain(self) -> int:
        """After the camera stopped: wait until every sent frame has its verdict; returns how many are missing."""
        deadline = time.monotonic() + self.spec.drain_timeout_s
        while len(self.story.scored) < self.camera.sent and time.monotonic() < deadline:
            self._poll(POLL_MS)
            if self.worker.poll() is not None:
                break
        self._poll(None)
        return self.camera.sent - len(self.story.scored)

    # observation ---------------------------------------------------------------------------------
    def _poll(self, block_ms: int | None) -> None:
        verdicts, events = self.observer.poll(block_ms)
        for event in events:  # first: an activation comes before the verdicts of the version it activates
            self._on_event(event)
        for fields in verdicts:
            self._on_verdict(fields)
        self.camera.scored = len(self.story.scored)
        if not self.story.shift_announced and self.camera.sent > self.spec.frames_before:
            self.story.shift_announced = True
            self._line(f"camera: domain shift '{self.spec.shift}' switched on at frame {self.spec.frames_before}")

    def _on_verdict(self, fields: dict[str, str]) -> None:
        frame = self.camera.by_id.get(fields.get("frame_id", ""))
        if frame is None or fields.get("camera_id") != self.spec.camera:
            return
        scored = Scored(
            frame,
            float(fields["score"]),
            float(fields["threshold"]),
            fields["anomalous"].lower() in ("true", "1"),
            fields["model_version"],
            fields.get("drift_state", ""),
            self.now(),
        )
        story = self.story
        story.scored.append(scored)
        if scored.drift == "alarm" and scored.version not in story.alarm_frames:
            story.alarm_frames[scored.version] = frame.index
            role = (
                "adapted" if scored.version == story.adapted else "source" if scored.version == story.base else "other"
            )
            self._line(
                f"worker: drift alarm under the {role} version {scored.version[:10]} from frame {frame.index} on "
                f"({frame.index - self.spec.frames_before + 1} frames into the shift)"
            )
        if story.adapted is not None and scored.version == story.adapted and story.adapted_frame is None:
            story.adapted_frame, story.adapted_s = frame.index, self.now()
            self._line(f"worker: version {story.adapted} scores from frame {frame.index} on")

    def _on_event(self, event: Event) -> None:
        story = self.story
        story.events.append({"t_s": round(self.now(), 2), **asdict(event)})
        d = event.detail
        if event.kind == EventKind.DRIFT_ALARM:
            alarm = d.get("alarm") or {}
            early = " (before the shift: a false alarm)" if self.camera.sent <= self.spec.frames_before else ""
            self._line(
                f"DRIFT ALARM on {event.scope} (version {event.version}): {alarm.get('detector', '?')} statistic "
                f"{num(alarm.get('statistic'))} > {num(alarm.get('threshold'))}{early}"
            )
            if event.scope == self.spec.camera and story.alarm is None and event.version == story.base:
                story.alarm = event
        elif event.kind == EventKind.ADAPTATION_STARTED:
            story.started.append(event)
            self._line(f"adaptation started on {event.scope} from version {event.version} with {d.get('shots')} shots")
        elif event.kind == EventKind.ADAPTATION_SHADOW and d.get("shadowed") == "parent":
            self._line(
                f"candidate refused offline ({gate_line(d)}); [adapt] recalibrate: scoring the next "
                f"{d.get('frames')} frames with the source version alone (shadow) for a new operating point"
            )
        elif event.kind == EventKind.ADAPTATION_SHADOW:
            self._line(
                f"candidate passed the offline gate ({gate_line(d)}); scoring the next {d.get('frames')} frames "
                "beside the source version (shadow) before deciding"
            )
        elif event.kind == EventKind.ADAPTATION_ACCEPTED:
            story.accepted, story.adapted = event, event.version
            what = "ACCEPTED"
            if d.get("recalibrated"):
                what = "RECALIBRATED: the source version's weights with a new operating point"
            self._line(f"adaptation {what}: new version {event.version} — {gate_line(d)}")
        elif event.kind == EventKind.ADAPTATION_REJECTED:
            story.rejected.append(event)
            story.rejected_at_frame.append(self.camera.sent)
            kept = d.get("candidate")
            force = f"inspectd models activate {kept} --camera {self.spec.camera} --force"
            note = f" (kept, not active; an operator may still serve it: {force})" if kept else ""
            self._line(f"adaptation REJECTED: {'; '.join(failed_reasons(event)) or 'no reason given'}{note}")
        elif event.kind == EventKind.VERSION_ACTIVATED:
            if event.scope == f"camera:{self.spec.camera}" and event.version == self._served():
                self._line(
                    f"registry: {event.scope} pinned to the version it is served, {event.version} (rollback target)"
                )
            else:
                self._line(f"version {event.version} activated for scope '{event.scope}'")
        elif event.kind == EventKind.ROLLBACK:
            self._line(f"rollback in scope '{event.scope}' to version {event.version}")
        elif event.kind == EventKind.FRAMES_CONFIRMED and event.scope == self.spec.camera:
            frame_ids = [str(f) for f in d.get("frame_ids", [])]  # confirmed by a person in the console
            story.confirmed.append(frame_ids)
            story.confirmed_s.append(self.now())
            story.confirmed_at_frame.append(self.camera.sent)
            self._line(f"operator {d.get('operator')} (console): confirmed {len(frame_ids)} frames as normal")

    def _served(self) -> str:
        """The version that scored the camera's latest frame (the source version before any verdict)."""
        return self.story.scored[-1].version if self.story.scored else self.story.base

    def _check_alive(self) -> None:
        if self.worker.poll() is not None:
            raise DemoFailed(f"the worker exited with code {self.worker.returncode}:\n{tail(self.worker_log)}")
        if self.camera.error is not None:
            raise DemoFailed(f"the camera failed: {self.camera.error}")

    def _rejected_all(self) -> bool:
        return len(self.story.rejected) >= len(self.story.confirmed) > 0

    # the operator --------------------------------------------------------------------------------
    def _await_person(self) -> None:
        """With --console a person confirms (their confirmations arrive as frames_confirmed events)."""
        if self._waiting_since is None:
            self._waiting_since = self.now()
            self._line(
                f"waiting for you: confirm at least {self.shots} normal frames of {self.spec.camera} in the console"
            )
        if self.now() - self._waiting_since > self.spec.person_timeout_s:
            raise DemoFailed(f"nobody confirmed frames in the console within {self.spec.person_timeout_s:.0f} s")

    def _confirm(self) -> None:
        """Confirm the newest `shots` frames that are truly normal, shifted, still cached and not yet confirmed
        (distinct cells); waits for more verdicts when there are not enough yet."""
        story = self.story
        done = {frame_id for batch in story.confirmed for frame_id in batch}
        picked: list[str] = []
        sources: set[str] = set()
        candidates = [
            s
            for s in reversed(story.scored)
            if s.frame.shifted and not s.frame.defective and s.frame.frame_id not in done and s.version == story.base
        ]
        for s in candidates:
            if s.frame.source in sources or not self.client.exists(self.keys.frame(s.frame.frame_id)):
                continue
            picked.append(s.frame.frame_id)
            sources.add(s.frame.source)
            if len(picked) == self.shots:
                break
        if len(picked) < self.shots:
            return
        note = f"demo: normal cell under the '{self.spec.shift}' shift"
        for frame_id in picked:
            submit(self.client, self.keys, self.settings.confirmations, normal_entry(frame_id, OPERATOR, note))
        story.confirmed.append(picked)
        story.confirmed_s.append(self.now())
        story.confirmed_at_frame.append(self.camera.sent)
        self._line(f"operator {OPERATOR}: confirmed {len(picked)} frames as normal: {', '.join(picked)}")

    # the live view -------------------------------------------------------------------------------
    def _line(self, text: str) -> None:
        self.say(f"[{self.now():6.1f}s] {text}")

    def _status(self) -> None:
        now = time.monotonic()
        if now < self._next_status or len(self.story.scored) == self._scored_at_status:
            return
        self._next_status = now + STATUS_EVERY_S
        self._scored_at_status = len(self.story.scored)
        recent = self.story.scored[-RECENT:]
        normal = [s for s in recent if not s.frame.defective]
        last = recent[-1]
        rejected = sum(s.anomalous for s in normal)
        frr = f"{rejected / len(normal):4.0%} ({rejected}/{len(normal)})" if normal else "-"
        self.say(
            f"[{self.now():6.1f}s]   {self.camera.sent:5d} sent {len(self.story.scored):5d} scored | "
            f"last {len(recent)}: "
            f"median score {np.median([s.score for s in recent]):.4g} (threshold {last.threshold:.4g}), "
            f"normal cells rejected {frr} | version {last.version[:10]} | drift {last.drift or '-'} | "
            f"{phase_of(last, self.story)}"
        )

"""`inspectd demo`: the whole loop on one machine, from a camera to a recovered line.

It starts a local Kafka-protocol broker (Tansu) and Redis (daemon/services.py), prepares a CS-Flow model
on the real ELPV solar cells (trained once, then reused from `OUT/model`), starts one worker
(`inspectd run`) and a simulated camera, and switches a domain shift on. The demo then plays the operator:
when the worker raises a drift alarm it confirms a few of the newest frames that are truly normal (the
camera knows the ground truth of every frame id), the worker adapts, gates and activates a new version,
and the line recovers. The worker is a black box here: it is configured through the environment and
watched only through Redis (the verdicts and events streams), like any dashboard would.

What happens is printed live (one status line a second, one line per event); at the end a summary per
phase (before the shift, shifted under the source version, after the new version) goes to
`OUT/summary.json` and a picture of the run to `OUT/timeline.png`. Everything started is stopped, on
errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
from kafka import KafkaProducer

from adapters.shifts import Shift, get_shift
from csflow.artifacts import ArtifactError, read_manifest, save_model
from csflow.data import GOOD, ImageLimits, Sample, load_dataset, read_image
from csflow.elpv import ElpvExport, export_elpv
from csflow.fit import FitSpec, Progress, fit, no_progress, resolve_device
from csflow.training import EpochRecord
from daemon.config import Settings, override
from daemon.confirmations import normal_entry, submit
from daemon.events import Event, EventKind
from daemon.producer import FORMATS, encode
from daemon.report import TimelineMarker, plot_timeline
from daemon.services import LocalKafka, LocalRedis, free_port, pdeathsig_hook, stop_process
from daemon.store import Keys

OPERATOR = "demo-operator"
EXIT_INTERRUPTED = 130
DRIFT_OFF = "off"  # the verdicts' drift state of a version the worker cannot monitor
RECENT = 50  # verdicts behind each live line's figures
STATUS_EVERY_S = 1.0
POLL_MS = 200
Say = Callable[[str], None]

PHASES = ("before_shift", "shifted_before_adaptation", "after_adaptation")


@dataclass(frozen=True)
class DemoSpec:
    """What the demo does; the defaults are `inspectd demo`'s (sized for 2 CPU cores)."""

    out: Path = Path("runs/demo")
    data: Path = Path("data/elpv")
    shift: str = "dark"
    camera: str = "cam-1"
    frames_before: int = 200  # unshifted frames first
    frames_after: int = 120  # frames scored by the adapted version before the demo stops
    max_shifted: int = 400  # shifted frames scored without a drift alarm before giving up
    rate: float = 8.0  # frames per second (the CPU worker scores about 11/s at 256 px on 2 free cores)
    max_in_flight: int = 48  # the camera pauses while this many frames wait for a verdict (a slow machine)
    defect_share: float = 0.08  # share of defective cells among the frames
    shots: int | None = None  # frames the operator confirms per attempt (None: [adapt] min_shots)
    attempts: int = 2  # adaptation attempts (the operator confirms more frames after a rejection)
    seed: int = 0
    fresh: bool = False  # retrain even if OUT/model matches
    # The model (trained on data/train/good; cached in OUT/model while these match).
    image_size: int = 256
    hidden_channels: int = 64
    epochs: int = 15
    max_train_images: int | None = None  # None: all
    # Worker settings that differ from the configuration (None: keep [drift] window / ert).
    drift_window: int | None = None
    drift_ert: int | None = None
    worker_env: Mapping[str, str] = field(default_factory=dict)  # extra INSPECTD_* (and other) variables
    config: str | None = None  # --config passed on to the worker
    # Time limits (seconds).
    ready_timeout_s: float = 180.0
    adapt_timeout_s: float = 600.0
    drain_timeout_s: float = 120.0
    stop_timeout_s: float = 60.0


# ------------------------------------------------------------------------------------------------ model


def prepare_data(spec: DemoSpec, say: Say) -> None:
    """Export ELPV into `spec.data` unless it holds a dataset already (an export is skipped when done alike)."""
    if (spec.data / "train" / GOOD).is_dir() and not (spec.data / "export.json").is_file():
        return  # a dataset of the user's own in the MVTec layout
    counts = export_elpv(spec.data, ElpvExport())
    say(f"data: ELPV solar cells in {spec.data} ({', '.join(f'{k} {v}' for k, v in counts.items())})")


def cached_model(model_dir: Path, fit_spec: FitSpec, data: str, n_train: int) -> bool:
    """Whether `model_dir` holds a model trained on `n_train` images of `data` with these settings (then it is
    reused)."""
    try:
        manifest = read_manifest(model_dir)
    except ArtifactError:
        return False
    flow = {**asdict(fit_spec.flow), "kernel_sizes": list(fit_spec.flow.kernel_sizes)}
    return (
        (manifest.backbone, manifest.backbone_weights, manifest.image_size)
        == (fit_spec.backbone, fit_spec.weights, fit_spec.image_size)
        and manifest.flow == flow
        and manifest.summary.get("train_config") == asdict(fit_spec.train)
        and manifest.summary.get("demo_data") == data
        and manifest.summary.get("n_train") == n_train
    )


def demo_fit_spec(spec: DemoSpec, settings: Settings) -> FitSpec:
    model_cfg = override(settings.model, "model", image_size=spec.image_size)
    train_cfg = override(settings.train, "train", epochs=spec.epochs)
    return FitSpec(
        backbone=model_cfg.backbone,
        weights=model_cfg.weights_source,
        image_size=model_cfg.image_size,
        flow=override(settings.flow, "flow", hidden_channels=spec.hidden_channels).to_config(),
        train=train_cfg.to_config(),
        val_fraction=train_cfg.val_fraction,
        target_fpr=settings.calibration.target_fpr,
        limits=settings.limits.to_limits(),
    )


@dataclass(frozen=True)
class PreparedModel:
    directory: Path
    version: str
    threshold: float
    trained: bool
    seconds: float


def prepare_model(spec: DemoSpec, settings: Settings, say: Say, progress: Progress = no_progress) -> PreparedModel:
    """Train the source model into OUT/model, or reuse the one there when it was trained alike."""
    t0 = time.monotonic()
    model_dir = spec.out / "model"
    fit_spec = demo_fit_spec(spec, settings)
    data = str(spec.data.resolve())
    normal = [s.path for s in load_dataset(spec.data).train][: spec.max_train_images]
    cached = not spec.fresh and cached_model(model_dir, fit_spec, data, len(normal))
    if not cached:
        device = resolve_device(settings.model.device)
        say(
            f"model: training CS-Flow ({fit_spec.backbone}, {fit_spec.image_size} px, {fit_spec.flow.hidden_channels} "
            f"hidden channels, {fit_spec.train.epochs} epochs) on {len(normal)} normal cells, device {device}"
        )

        def on_epoch(record: EpochRecord) -> None:
            held_out = "" if record.val_nll is None else f", held-out {record.val_nll:.3f}"
            say(
                f"  epoch {record.epoch}/{fit_spec.train.epochs}: NLL {record.train_nll:.3f}{held_out} "
                f"({record.seconds:.1f} s)"
            )

        result = fit(normal, fit_spec, device, progress, on_epoch)
        summary = {**result.summary(fit_spec, len(normal)), "demo_data": data}
        save_model(model_dir, result.model, fit_spec.weights, result.calibration, summary)
        del result
    manifest = read_manifest(model_dir)
    threshold = float(manifest.calibration["threshold"])
    what = "trained" if not cached else "reused (--fresh retrains)"
    say(f"model: {manifest.version} {what}, in {model_dir}, threshold {threshold:.4g}")
    return PreparedModel(model_dir, manifest.version, threshold, not cached, time.monotonic() - t0)


# ----------------------------------------------------------------------------------------------- camera


@dataclass(frozen=True)
class SentFrame:
    """One published frame and its ground truth."""

    index: int
    frame_id: str
    source: str  # image file name
    defective: bool
    shifted: bool
    sent_s: float  # seconds since the demo's stream started


class Camera:
    """Publishes ELPV test cells at a steady rate, normal ones with a few defective ones in a seeded order;
    frames from `spec.frames_before` on go through the domain shift. Runs from `start()` until `stop()`.

    Unlike a real camera it holds back while `spec.max_in_flight` frames wait for their verdict (the owner
    sets `scored`), so that a machine slower than the rate, or busy adapting, does not pile up a backlog
    that the demo would then wait for."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        camera: str,
        test: list[Sample],
        spec: DemoSpec,
        shift: Shift,
        limits: ImageLimits,
        t0: float,
    ) -> None:
        self.topic, self.camera, self.spec, self.shift, self.limits, self.t0 = topic, camera, spec, shift, limits, t0
        self.normal = [s for s in test if not s.anomalous]
        self.defective = [s for s in test if s.anomalous]
        if not self.normal:
            raise ValueError(f"{spec.data}/test holds no normal images to stream")
        self.frames: list[SentFrame] = []
        self.scored = 0  # set by the owner as verdicts arrive
        self.by_id: dict[str, SentFrame] = {}
        self.error: str | None = None
        self._run = uuid.uuid4().hex[:6]
        self._rng = np.random.default_rng(spec.seed)
        self._queues: dict[bool, list[Sample]] = {False: [], True: []}
        self._cache: dict[tuple[Path, bool], bytes] = {}
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._publish, name="camera", daemon=True)
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="inspectd-demo-camera", acks="all")

    @property
    def sent(self) -> int:
        return len(self.frames)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing (idempotent); frames already sent are flushed."""
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._producer.close(timeout=10)

    def _next(self) -> Sample:
        defective = bool(self.defective) and self._rng.random() < self.spec.defect_share
        queue = self._queues[defective]
        if not queue:  # every image once per round, in a seeded order
            pool = self.defective if defective else self.normal
            queue.extend(pool[i] for i in self._rng.permutation(len(pool)))
        return queue.pop()

    def _publish(self) -> None:
        fmt, due = "png", time.monotonic()
        try:
            while not self._halt.is_set():
                i = len(self.frames)
                sample = self._next()
                shifted = i >= self.spec.frames_before
                key = (sample.path, shifted)
                if key not in self._cache:
                    pixels = read_image(sample.path, self.limits)
                    self._cache[key] = encode(self.shift(pixels) if shifted else pixels, fmt)
                kind = "defective" if sample.anomalous else "normal"
                frame_id = f"{self.camera}-{self._run}-{i:05d}-{kind}"
                headers = [
                    ("frame_id", frame_id.encode()),
                    ("camera_id", self.camera.encode()),
                    ("ts", str(int(time.time() * 1000)).encode()),
                    ("content_type", FORMATS[fmt][1].encode()),
                    ("source_image", sample.path.name.encode()),
                    ("shifted", b"1" if shifted else b"0"),
                ]
                self._producer.send(self.topic, key=self.camera.encode(), value=self._cache[key], headers=headers)
                frame = SentFrame(i, frame_id, sample.path.name, sample.anomalous, shifted, time.monotonic() - self.t0)
                self.by_id[frame_id] = frame
                self.frames.append(frame)
                due = max(due, time.monotonic()) + 1 / self.spec.rate  # no burst to catch up after a pause
                while not self._halt.is_set() and (
                    time.monotonic() < due or self.sent - self.scored >= self.spec.max_in_flight
                ):
                    self._halt.wait(min(0.05, max(due - time.monotonic(), 0.005)))
            self._producer.flush(timeout=10)
        except Exception as exc:  # the main loop reports it and stops the demo
            self.error = f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------------------------- worker


def start_worker(env: Mapping[str, str], config: str | None, log_path: Path) -> subprocess.Popen[bytes]:
    """`inspectd run` in a subprocess; it gets SIGKILL if the demo dies without stopping it (Linux)."""
    command = [sys.executable, "-m", "daemon.cli", *(["--config", config] if config else []), "run"]
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=pdeathsig_hook(),
        )


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with code {proc.returncode} while starting:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the worker was not ready within {timeout:.0f} s:\n{_tail(log_path)}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------- observation


@dataclass(frozen=True)
class Scored:
    """A verdict of one of the camera's frames, joined with its ground truth."""

    frame: SentFrame
    score: float
    threshold: float
    anomalous: bool
    version: str
    drift: str
    received_s: float


@dataclass
class Story:
    """What happened so far, in the order an operator would tell it."""

    base: str
    scored: list[Scored] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    alarm: Event | None = None
    alarm_frames: dict[str, int] = field(default_factory=dict)  # version -> first frame it said "alarm" for
    confirmed: list[list[str]] = field(default_factory=list)  # per attempt
    confirmed_s: list[float] = field(default_factory=list)
    confirmed_at_frame: list[int] = field(default_factory=list)
    started: list[Event] = field(default_factory=list)
    rejected: list[Event] = field(default_factory=list)
    rejected_at_frame: list[int] = field(default_factory=list)
    accepted: Event | None = None
    adapted: str | None = None
    adapted_frame: int | None = None  # index of the first frame scored by the adapted version
    adapted_s: float | None = None
    shift_announced: bool = False

    def after(self) -> list[Scored]:
        return [s for s in self.scored if self.adapted is not None and s.version == self.adapted]


class Observer:
    """Tails the verdicts and events streams (XREAD from where it left off)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._last = {keys.verdicts: "0-0", keys.events: "0-0"}

    def poll(self, block_ms: int | None) -> tuple[list[dict[str, str]], list[Event]]:
        reply = self.client.xread(dict(self._last), count=1000, block=block_ms)
        verdicts: list[dict[str, str]] = []
        events: list[Event] = []
        for stream, entries in reply or []:
            name = stream.decode()
            for entry_id, fields in entries:
                self._last[name] = entry_id.decode()
                if name == self.keys.verdicts:
                    verdicts.append({k.decode(): v.decode() for k, v in fields.items()})
                else:
                    events.append(Event.from_fields(fields))
        return verdicts, events


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
                self._confirm()
            elif story.accepted is None:
                if self._rejected_all():
                    raise DemoFailed(
                        f"adaptation rejected {len(story.rejected)} time(s): "
                        + "; ".join(_failed_reasons(story.rejected[-1]))
                    )
                waited = self.now() - story.confirmed_s[-1]
                if waited > spec.adapt_timeout_s:
                    what = "adaptation_started" if len(story.started) < len(story.confirmed) else "an adaptation result"
                    raise DemoFailed(f"no {what} event within {spec.adapt_timeout_s:.0f} s of the confirmations")
            else:
                if len(story.after()) >= spec.frames_after:
                    return
                if story.adapted_s is None and self.now() - story.confirmed_s[-1] > spec.adapt_timeout_s:
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
                f"{_num(alarm.get('statistic'))} > {_num(alarm.get('threshold'))} after {d.get('frames_seen')} "
                f"frames{early}"
            )
            if event.scope == self.spec.camera and story.alarm is None and event.version == story.base:
                story.alarm = event
        elif event.kind == EventKind.ADAPTATION_STARTED:
            story.started.append(event)
            self._line(f"adaptation started on {event.scope} from version {event.version} with {d.get('shots')} shots")
        elif event.kind == EventKind.ADAPTATION_ACCEPTED:
            story.accepted, story.adapted = event, event.version
            self._line(f"adaptation ACCEPTED: new version {event.version} — {_gate_line(d)}")
        elif event.kind == EventKind.ADAPTATION_REJECTED:
            story.rejected.append(event)
            story.rejected_at_frame.append(self.camera.sent)
            self._line(f"adaptation REJECTED: {'; '.join(_failed_reasons(event)) or 'no reason given'}")
        elif event.kind == EventKind.VERSION_ACTIVATED:
            self._line(f"version {event.version} activated for scope '{event.scope}'")
        elif event.kind == EventKind.ROLLBACK:
            self._line(f"rollback in scope '{event.scope}' to version {event.version}")

    def _check_alive(self) -> None:
        if self.worker.poll() is not None:
            raise DemoFailed(f"the worker exited with code {self.worker.returncode}:\n{_tail(self.worker_log)}")
        if self.camera.error is not None:
            raise DemoFailed(f"the camera failed: {self.camera.error}")

    def _rejected_all(self) -> bool:
        return len(self.story.rejected) >= len(self.story.confirmed) > 0

    # the operator --------------------------------------------------------------------------------
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
            f"{_phase(last, self.story)}"
        )


def _phase(s: Scored, story: Story) -> str:
    if story.adapted is not None and s.version == story.adapted:
        return "after_adaptation"
    return "shifted_before_adaptation" if s.frame.shifted else "before_shift"


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, int | float) else "?"


def _failed_reasons(event: Event) -> list[str]:
    return [r for r in event.detail.get("reasons", []) if not str(r).startswith("ok")]


def _gate_line(detail: Mapping[str, Any]) -> str:
    f = detail.get("figures", {})
    a = detail.get("adaptation", {})
    parts = [
        f"held-out normals rejected {_pct(f.get('parent_false_reject_rate'))} -> "
        f"{_pct(f.get('candidate_false_reject_rate'))}",
        f"median score {_num(f.get('parent_median'))} -> {_num(f.get('candidate_median'))} "
        f"(threshold {_num(f.get('threshold'))})",
        f"synthetic defects caught {_pct(f.get('defect_detection_rate'))}",
        f"{a.get('steps', '?')} steps in {_num(a.get('seconds'))} s",
    ]
    return ", ".join(parts)


def _pct(x: Any) -> str:
    return f"{x:.0%}" if isinstance(x, int | float) else "?"


# ---------------------------------------------------------------------------------------------- summary


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


def summarise(demo: Demo, model: PreparedModel, outcome: str, ok: bool) -> dict[str, Any]:
    story, spec = demo.story, demo.spec
    scored = sorted(story.scored, key=lambda s: s.frame.index)
    by_phase: dict[str, list[Scored]] = {p: [] for p in PHASES}
    for s in scored:
        by_phase[_phase(s, story)].append(s)
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
        "rejected": [{"reasons": _failed_reasons(e), "figures": _gate_summary(e.detail)} for e in story.rejected],
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
    markers = [TimelineMarker(spec.frames_before, f"shift '{spec.shift}' on")]
    for version, at in story.alarm_frames.items():
        markers.append(TimelineMarker(at, "drift alarm" if version == story.base else "drift alarm (new version)"))
    for i, at in enumerate(story.confirmed_at_frame):
        markers.append(TimelineMarker(at, "operator confirms" if i == 0 else f"confirms again ({i + 1})"))
    markers += [TimelineMarker(at, "adaptation rejected") for at in story.rejected_at_frame]
    if story.adapted_frame is not None:
        markers.append(TimelineMarker(story.adapted_frame, "new version serves"))
    return markers


# ------------------------------------------------------------------------------------------------- run


@dataclass
class DemoResult:
    ok: bool
    summary: dict[str, Any]
    summary_path: Path
    timeline_path: Path


def worker_env(
    spec: DemoSpec, kafka: LocalKafka, redis_url: str, topic: str, prefix: str, model_dir: Path, port: int, shots: int
) -> dict[str, str]:
    env = {
        "INSPECTD_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap,
        "INSPECTD_KAFKA__TOPIC": topic,
        "INSPECTD_KAFKA__GROUP_ID": "inspectd-demo",
        # Group joins with Tansu take about session_timeout / 2: keep them short on one machine.
        "INSPECTD_KAFKA__SESSION_TIMEOUT_MS": "2000",
        "INSPECTD_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "INSPECTD_REDIS__URL": redis_url,
        "INSPECTD_REDIS__KEY_PREFIX": prefix,
        "INSPECTD_WORKER__MODEL_DIR": str(model_dir.resolve()),
        "INSPECTD_WORKER__HTTP_HOST": "127.0.0.1",
        "INSPECTD_WORKER__HTTP_PORT": str(port),
        "INSPECTD_WORKER__DRAIN_TIMEOUT_S": "10",  # Ctrl-C reaches the services too: do not wait long for them
        "INSPECTD_REGISTRY__CACHE_DIR": str((spec.out / "versions").resolve()),
        "INSPECTD_REGISTRY__REFRESH_S": "2",
        "INSPECTD_ADAPT__MIN_SHOTS": str(shots),
        "INSPECTD_ADAPT__CHECK_INTERVAL_S": "1",
        "INSPECTD_LOG__FORMAT": "json",
    }
    if spec.drift_window is not None:
        env["INSPECTD_DRIFT__WINDOW"] = str(spec.drift_window)
    if spec.drift_ert is not None:
        env["INSPECTD_DRIFT__ERT"] = str(spec.drift_ert)
    return {**env, **spec.worker_env}


def run_demo(spec: DemoSpec, settings: Settings, say: Say = print, progress: Progress = no_progress) -> DemoResult:
    """The whole demo; returns the summary (also written to OUT/summary.json, with OUT/timeline.png).

    Raises on set-up errors (no data, a service or the worker that does not start); a loop that does not
    complete (no alarm, a rejected adaptation, ...) ends normally with `ok` False and the reason in the
    summary's `outcome`."""
    if spec.rate <= 0:
        raise ValueError("--rate must be positive")
    shift = get_shift(spec.shift, settings.limits.to_limits())  # an unknown shift fails before any work
    spec.out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    prepare_data(spec, say)
    model = prepare_model(spec, settings, say, progress)
    test = load_dataset(spec.data).test
    shots = spec.shots or settings.adapt.min_shots
    worker_log = spec.out / "worker.log"
    processes: dict[str, dict[str, Any]] = {}
    outcome, ok = "recovered: the adapted version served the shifted line", True
    with ExitStack() as stack:
        kafka = stack.enter_context(LocalKafka(workdir=spec.out / "services" / "kafka"))
        redis_server = stack.enter_context(LocalRedis(workdir=spec.out / "services" / "redis"))
        processes["kafka"] = {"pid": kafka.pid, "port": kafka.port}
        processes["redis"] = {"pid": redis_server.pid, "port": redis_server.port}
        topic, prefix = "frames", f"demo-{uuid.uuid4().hex[:6]}:"
        kafka.create_topic(topic, 1)
        kafka.create_topic(f"{topic}.dlq", 1)
        say(f"services: Kafka-protocol broker (Tansu) on {kafka.bootstrap}, Redis on port {redis_server.port}")
        client = redis_server.client(socket_timeout=10)
        stack.callback(client.close)

        port = free_port()
        env = worker_env(spec, kafka, redis_server.url, topic, prefix, model.directory, port, shots)
        worker = start_worker(env, spec.config, worker_log)
        processes["worker"] = {"pid": worker.pid, "port": port}
        stack.callback(
            lambda: processes["worker"].update(exit_code=stop_process(worker, signal.SIGTERM, spec.stop_timeout_s))
        )
        wait_ready(port, worker, spec.ready_timeout_s, worker_log)
        say(f"worker: ready (pid {worker.pid}, health on http://127.0.0.1:{port}/readyz, log {worker_log})")

        t0 = time.monotonic()
        camera = Camera(kafka.bootstrap, topic, spec.camera, test, spec, shift, settings.limits.to_limits(), t0)
        demo = Demo(spec, settings, say, camera, worker, worker_log, client, Keys(prefix), model, shots, t0)
        say(
            f"camera {spec.camera}: {spec.rate:g} frames/s, {spec.frames_before} frames before the '{spec.shift}' "
            f"shift; the operator confirms {shots} normal frames when the drift alarm comes"
        )
        stack.callback(camera.stop)
        camera.start()
        try:
            demo.follow()
        except DemoFailed as exc:
            outcome, ok = f"incomplete: {exc}", False
            say(f"demo: {outcome}")
        camera.stop()
        missing = demo.drain()
        if missing:
            say(f"demo: {missing} frames got no verdict within {spec.drain_timeout_s:.0f} s")
        processes["worker"]["exit_code"] = stop_process(worker, signal.SIGTERM, spec.stop_timeout_s)
        say(f"worker: stopped (exit code {processes['worker']['exit_code']})")
    say("services: stopped")
    processes["kafka"]["running"] = kafka.running
    processes["redis"]["running"] = redis_server.running
    summary = summarise(demo, model, outcome, ok)
    summary["processes"] = processes
    summary["seconds"] = {"total": round(time.monotonic() - t_start, 1), "model": round(model.seconds, 1)}
    summary_path, timeline_path = spec.out / "summary.json", spec.out / "timeline.png"
    summary["files"] = {"summary": str(summary_path), "timeline": str(timeline_path), "worker_log": str(worker_log)}
    summary_path.write_text(json.dumps(summary, indent=2))
    scored = sorted(demo.story.scored, key=lambda s: s.frame.index)
    plot_timeline(
        timeline_path,
        f"inspectd demo: ELPV, shift '{spec.shift}', camera {spec.camera}",
        np.array([s.frame.index for s in scored]),
        np.array([s.score for s in scored]),
        np.array([s.frame.defective for s in scored], dtype=bool),
        [s.version for s in scored],
        [s.threshold for s in scored],
        timeline_markers(demo),
        {v: f"{v[:10]} ({'adapted' if v == demo.story.adapted else 'source'})" for v in {s.version for s in scored}},
    )
    say_summary(summary, say)
    return DemoResult(ok, summary, summary_path, timeline_path)


def say_summary(summary: Mapping[str, Any], say: Say) -> None:
    say("")
    say(f"summary: {summary['outcome']}")
    say(f"  {'phase':<28}{'frames':>7}{'normal rejected':>17}{'defects caught':>16}{'median normal score':>21}")
    for phase, f in summary["phases"].items():
        say(
            f"  {phase:<28}{f['frames']:>7}{_pct(f['false_reject_rate']):>17}{_pct(f['detection_rate']):>16}"
            f"{_num(f['median_score_normal']):>21}"
        )
    alarm = summary["drift_alarm"]
    if alarm:
        say(f"  drift alarm: {alarm['delay_frames']} shifted frames after the shift ({alarm['detector']})")
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


# ---------------------------------------------------------------------------------------------- command


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.cli import EXIT_ERROR, progress

    defaults = DemoSpec()
    spec = DemoSpec(
        out=args.out,
        data=args.data,
        shift=args.shift,
        camera=args.camera,
        frames_before=args.frames_before,
        frames_after=args.frames_after,
        max_shifted=args.max_shifted,
        rate=args.rate,
        shots=args.shots,
        fresh=args.fresh,
        image_size=args.image_size or defaults.image_size,
        hidden_channels=args.hidden_channels or defaults.hidden_channels,
        epochs=args.epochs or defaults.epochs,
        config=args.config,
    )
    try:
        result = run_demo(spec, settings, lambda line: print(line, flush=True), progress)
    except KeyboardInterrupt:
        print("inspectd demo: interrupted; everything it started has been stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if result.ok else EXIT_ERROR


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    d = DemoSpec()
    p = sub.add_parser(
        "demo",
        help="the whole loop on this machine: camera, worker, drift alarm, operator, adaptation, recovery",
        description="Start a local Kafka-protocol broker and Redis, train a model on ELPV (once; reused from "
        "OUT/model), run a worker and a simulated camera, switch a domain shift on, confirm a few normal frames "
        "as the operator when the drift alarm comes, and show the worker adapting and the line recovering. "
        "Writes OUT/summary.json and OUT/timeline.png; stops everything it started. Exit 0 when the adapted "
        "version served the line, 1 otherwise.",
    )
    p.add_argument("--out", type=Path, default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--data", type=Path, default=d.data, help=f"ELPV export, made if missing (default {d.data})")
    p.add_argument("--shift", default=d.shift, help=f"domain shift switched on (default {d.shift}; also style, ...)")
    p.add_argument("--camera", default=d.camera, help=f"camera id (default {d.camera})")
    p.add_argument("--frames-before", type=int, default=d.frames_before, help="frames before the shift")
    p.add_argument(
        "--frames-after", type=int, default=d.frames_after, help="frames scored by the adapted version before stopping"
    )
    p.add_argument("--max-shifted", type=int, default=d.max_shifted, help="shifted frames to wait for a drift alarm")
    p.add_argument("--rate", type=float, default=d.rate, help=f"frames per second (default {d.rate:g})")
    p.add_argument("--shots", type=int, help="frames the operator confirms (default [adapt] min_shots)")
    p.add_argument("--fresh", action="store_true", help="train the model again even if OUT/model matches")
    p.add_argument("--image-size", type=int, help=f"model input size (default {d.image_size})")
    p.add_argument("--hidden-channels", type=int, help=f"flow hidden channels (default {d.hidden_channels})")
    p.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    p.set_defaults(handler=cmd_demo)

"""Per-camera drift monitors in the worker, tied to the model version each camera is served.

A monitor is built from its version's calibration scores (the reference): when a camera's version
changes, the old monitor is dropped and the next frame starts a fresh one, since the new version's
scores are compared with its own calibration. Monitor states are written to `drift:{camera}` with their
version id after each batch; a worker meeting a camera for the first time resumes that state when the
version and the [drift] settings match, so a restarted worker does not re-learn (or forget an alarm).

The first time a monitor alarms, a `drift_alarm` event is appended with its summary (once: an alarm is
latched until the version changes, and one restored from Redis was announced by whoever raised it).
A version whose calibration cannot seed a monitor (fewer than [drift] min_reference scores, no spread)
is served without drift monitoring; its verdicts say "off".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis
import structlog

from csflow.artifacts import ModelVersion
from daemon.events import Event, EventKind, EventLog
from daemon.store import Keys
from drift.config import DriftConfig
from drift.monitor import DriftMonitor
from drift.thresholds import Thresholds

OFF = "off"


@dataclass(frozen=True)
class DriftSave:
    """What `DriftWatch.write` persists: each touched camera's monitor state (JSON) and the alarms to
    announce, (version, summary) by camera."""

    states: dict[str, str]
    alarms: dict[str, tuple[str, dict]]


@dataclass
class _Watch:
    version: ModelVersion
    monitor: DriftMonitor | None
    announced: bool  # the alarm event was appended (or the alarm was restored)


class DriftWatch:
    """The monitors of the cameras one worker scores. Not thread-safe: the worker loop owns it; only `write`,
    which reads no monitor, may run on another thread (the worker's writes behind)."""

    def __init__(
        self, client: redis.Redis, keys: Keys, events: EventLog, config: DriftConfig, state_ttl_s: int
    ) -> None:
        """`state_ttl_s`: how long a camera's saved state outlives its last frame ([redis] drift_state_ttl_s)."""
        self.client = client
        self.keys = keys
        self.events = events
        self.config = config
        self.state_ttl_s = state_ttl_s
        self._watches: dict[str, _Watch] = {}
        self._touched: set[str] = set()
        self._thresholds: dict[str, Thresholds | None] = {}  # by version id: simulated once per version
        self._log = structlog.get_logger()

    def prepare(self, cameras: Mapping[str, ModelVersion]) -> None:
        """Start (or resume from Redis) the monitors of these cameras that have none for their version.
        The only Redis reads of the scoring path, apart from `observe`, so that the worker can retry them
        after an outage: an already started camera is skipped on the retry."""
        for camera, version in cameras.items():
            watch = self._watches.get(camera)
            if watch is None or watch.version.version != version.version:
                self._watches[camera] = self._start(camera, version)

    def observe(
        self, camera: str, version: ModelVersion, scores: Sequence[float], fresh: Sequence[bool] | None = None
    ) -> list[str]:
        """Update the camera's monitor with its scores, in frame order; the state after each frame.
        Non-finite scores (a broken model) are not fed to the monitor, nor are those whose `fresh` is False
        (frames that already have a verdict: a redelivery was counted the first time). Call `prepare`
        first: a camera without a monitor for this version is started here, reading Redis outside the
        worker's retries."""
        self.prepare({camera: version})
        watch = self._watches[camera]
        monitor = watch.monitor
        if monitor is None:
            return [OFF] * len(scores)
        self._touched.add(camera)
        states = []
        for i, score in enumerate(scores):
            if math.isfinite(score) and (fresh is None or fresh[i]):
                monitor.update(score)
            states.append(monitor.state)
        return states

    def snapshot(self) -> DriftSave:
        """The monitors updated since the last call, as they stand now, and the alarms to announce. Taken when
        a batch is scored: written behind the next batch's forward pass (`write`), it still says what this
        batch left, not what the next one adds."""
        states: dict[str, str] = {}
        alarms: dict[str, tuple[str, dict]] = {}
        for camera in self._touched:
            watch = self._watches[camera]
            monitor, version = watch.monitor, watch.version.version
            states[camera] = json.dumps({"version": version, "state": monitor.state_dict()}, allow_nan=False)
            if monitor.drift_detected and not watch.announced:
                alarms[camera] = (version, monitor.summary())
                watch.announced = True  # the snapshot is written or the worker exits without committing
        self._touched.clear()
        return DriftSave(states, alarms)

    def write(self, save: DriftSave) -> dict[str, dict]:
        """Persist a snapshot and announce its alarms, in one round trip; returns the summaries of the
        monitors that went into alarm, by camera."""
        if not save.states:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for camera, state in save.states.items():
            pipe.set(self.keys.drift(camera), state, ex=self.state_ttl_s)
        for camera, (version, summary) in save.alarms.items():
            self.events.append(Event(EventKind.DRIFT_ALARM, camera, version, summary), pipe)
        pipe.execute()
        return {camera: summary for camera, (_, summary) in save.alarms.items()}

    def alarms(self) -> dict[str, ModelVersion]:
        """Cameras whose monitor is in alarm, with the version it watches."""
        return {camera: w.version for camera, w in self._watches.items() if w.monitor and w.monitor.drift_detected}

    def forget(self, camera: str) -> None:
        """The camera's version changed: its next frame starts a monitor for the new version."""
        self._watches.pop(camera, None)
        self._touched.discard(camera)

    def drop(self, camera: str) -> None:
        """The camera's partition went to another worker: forget its monitor (saved in Redis with each
        batch); should the camera come back, its next frame resumes the saved state, with whatever the
        other worker added to it."""
        self.forget(camera)

    @property
    def cameras(self) -> set[str]:
        """The cameras with a monitor (or a version without one) in this worker."""
        return set(self._watches)

    def _start(self, camera: str, version: ModelVersion) -> _Watch:
        restored = self._restore(camera, version)
        if restored is not None:
            return _Watch(version, restored, announced=restored.drift_detected)
        return _Watch(version, self._fresh(version), announced=False)

    def _restore(self, camera: str, version: ModelVersion) -> DriftMonitor | None:
        raw = self.client.get(self.keys.drift(camera))
        if raw is None:
            return None
        try:
            saved = json.loads(raw)
            if saved["version"] != version.version:
                return None
            monitor = DriftMonitor.from_state_dict(saved["state"])
        except (ValueError, KeyError, TypeError) as exc:
            self._log.warning("drift state not resumed", camera_id=camera, error=str(exc))
            return None
        if monitor.config != self.config:
            return None  # the [drift] settings changed: their thresholds no longer apply
        self._log.info("drift state resumed", camera_id=camera, version=version.version, **monitor.summary())
        return monitor

    def _fresh(self, version: ModelVersion) -> DriftMonitor | None:
        calibration = version.manifest.threshold_calibration
        if version.version in self._thresholds:
            thresholds = self._thresholds[version.version]
            return None if thresholds is None else DriftMonitor(calibration.scores, self.config, thresholds)
        try:
            monitor = DriftMonitor(calibration.scores, self.config)
        except ValueError as exc:
            self._thresholds[version.version] = None
            self._log.warning("drift monitoring off for this version", version=version.version, reason=str(exc))
            return None
        self._thresholds[version.version] = monitor.thresholds
        return monitor

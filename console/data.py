"""What the console's pages show, read from the daemon's Redis keys (see daemon/store.py `Keys`).

Each page costs a handful of round trips whatever the number of cameras: the newest verdicts are read once
and grouped, per-camera keys are read with one MGET or one pipeline. Every call may raise `redis.RedisError`
(the client's timeout is [console] redis_timeout_s); the web layer turns that into an error banner.
"""

from __future__ import annotations

import json
import math
import threading
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from daemon.config import Settings
from daemon.confirmations import AdaptationBuffer, ReviewFrame, review_queue
from daemon.events import Event, EventKind, EventLog
from daemon.registry import DEFAULT_SCOPE, ModelRegistry, RegistryError, refused_checks
from daemon.scopes import ID_PATTERN, camera_scope, line_scope
from daemon.store import Keys
from drift.monitor import DriftMonitor

Verdicts = Sequence[Mapping[str, str]]
ADAPTATION_KINDS = (
    EventKind.ADAPTATION_STARTED,
    EventKind.ADAPTATION_SHADOW,
    EventKind.ADAPTATION_ACCEPTED,
    EventKind.ADAPTATION_REJECTED,
    EventKind.ADAPTATION_FAILED,
    EventKind.ADAPTATION_SUPERSEDED,
)
# Registry changes name a typed scope (camera:ID, line:NAME, default); every other event names the camera id.
REGISTRY_KINDS = (EventKind.VERSION_ACTIVATED, EventKind.ROLLBACK, EventKind.VERSION_UNPINNED)
EVENTS_PAGE = 500  # events read per round trip when filtering
MAX_EVENTS_SCANNED = 20_000  # a filtered events page looks no further back than this
RECENT_CONFIRMATIONS = 10  # buffered frames listed on a camera page
SVG_WIDTH, SVG_HEIGHT, SVG_PAD = 900, 240, 28


class UnknownCamera(LookupError):
    pass


def _concerns(event: Event, camera: str, scopes: set[str]) -> bool:
    """Whether `event` is about `camera`: a registry change in one of `scopes` (its own and its line's), or
    any other event that names the camera id (a camera called `default` is not the default scope)."""
    return event.scope in scopes if event.kind in REGISTRY_KINDS else event.scope == camera


def _decode(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode()


@dataclass(frozen=True)
class Drift:
    """A camera's drift monitor as an operator reads it: ok, warning, alarm, warmup, off or unknown."""

    level: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tile:
    camera: str
    version: str | None
    drift: Drift
    flagged: int
    seen: int
    last_frame: str | None
    last_ts: int | None
    event: Event | None

    @property
    def flagged_share(self) -> float | None:
        return self.flagged / self.seen if self.seen else None


@dataclass(frozen=True)
class Marker:
    x: float
    kind: str
    label: str
    ts: int


@dataclass(frozen=True)
class Timeline:
    """The camera's score timeline as SVG geometry (drawn by the template, no script)."""

    width: int
    height: int
    score_points: str
    flagged: list[tuple[float, float]]
    thresholds: list[tuple[float, float, float, str]]  # x1, x2, y, version
    markers: list[Marker]
    y_max: float
    frames: int

    @classmethod
    def build(cls, verdicts: Verdicts, events: Sequence[Event]) -> Timeline:
        """`verdicts` oldest first; frames are spaced evenly, events are placed at their time."""
        w, h, pad = SVG_WIDTH, SVG_HEIGHT, SVG_PAD
        if not verdicts:
            return cls(w, h, "", [], [], [], 1.0, 0)
        scores = [float(v["score"]) for v in verdicts]
        limits = [float(v["threshold"]) for v in verdicts]
        finite = [s for s in [*scores, *limits] if math.isfinite(s)] or [1.0]
        y_max = max(finite) * 1.05 or 1.0
        n = len(verdicts)

        def x(i: float) -> float:
            return pad + (w - 2 * pad) * (i / (n - 1) if n > 1 else 0.5)

        def y(value: float) -> float:
            value = min(max(value, 0.0), y_max) if math.isfinite(value) else y_max
            return h - pad - (h - 2 * pad) * value / y_max

        points = " ".join(f"{x(i):.1f},{y(s):.1f}" for i, s in enumerate(scores))
        flagged = [
            (x(i), y(s)) for i, (s, v) in enumerate(zip(scores, verdicts, strict=True)) if v["anomalous"] == "true"
        ]
        thresholds: list[tuple[float, float, float, str]] = []
        start = 0
        for i in range(1, n + 1):
            if i == n or (limits[i], verdicts[i]["model_version"]) != (limits[start], verdicts[start]["model_version"]):
                thresholds.append((x(start), x(i - 1), y(limits[start]), verdicts[start]["model_version"]))
                start = i
        times = [int(v["ts"]) for v in verdicts]
        markers = []
        for event in events:
            if times[0] <= event.ts <= times[-1] + 1:
                i = next((j for j, t in enumerate(times) if t >= event.ts), n - 1)
                markers.append(Marker(x(i), event.kind, event.kind.replace("_", " "), event.ts))
        return cls(w, h, points, flagged, thresholds, markers, y_max, n)


@dataclass(frozen=True)
class Adaptation:
    """Where a camera stands on its way to an adapted version."""

    buffered: int
    min_shots: int
    needs_new_frame: bool  # the last attempt used the newest buffered frame: a newer confirmation is needed
    running: bool
    last: Event | None  # the newest adaptation event

    @property
    def still_needed(self) -> int:
        if self.buffered < self.min_shots:
            return self.min_shots - self.buffered
        return 1 if self.needs_new_frame else 0


@dataclass(frozen=True)
class Confirmed:
    frame_id: str
    operator: str
    note: str
    confirmed_ms: int


@dataclass(frozen=True)
class CameraView:
    camera: str
    tile: Tile
    timeline: Timeline
    queue: list[ReviewFrame]
    adaptation: Adaptation
    confirmed: list[Confirmed]
    events: list[Event]


@dataclass(frozen=True)
class VersionRow:
    version: str
    parent: str | None
    domain: str
    created_at: str
    camera: str
    gate: dict[str, Any]
    active_in: list[str]
    error: str = ""
    refused: list[str] = field(default_factory=list)  # the checks it failed: kept by a worker, activated by force


@dataclass(frozen=True)
class ScopeRow:
    scope: str
    active: str | None
    history: list[str]
    changed_by: str
    changed_ts: int | None

    @property
    def can_roll_back(self) -> bool:
        return len(self.history) >= 2


@dataclass(frozen=True)
class VersionsView:
    versions: list[VersionRow]
    scopes: list[ScopeRow]
    scope_choices: list[str]


class VerdictTail:
    """The newest `size` verdicts, kept in memory and topped up with only the entries added since the last
    read: a page polled every few seconds reads a few new entries, not thousands (thread-safe)."""

    def __init__(self, client: redis.Redis, keys: Keys, size: int) -> None:
        self.client = client
        self.keys = keys
        self.size = size
        self._entries: deque[dict[str, str]] = deque(maxlen=size)  # oldest first
        self._last: bytes | None = None
        self._lock = threading.Lock()

    def read(self) -> list[dict[str, str]]:
        """Newest first."""
        with self._lock:
            new = None
            if self._last is not None:
                new = self.client.xrange(self.keys.verdicts, min=b"(" + self._last, count=self.size)
            if new is None or len(new) >= self.size:  # first read, or more new entries than kept: start over
                self._entries.clear()
                new = list(reversed(self.client.xrevrange(self.keys.verdicts, count=self.size)))
            for entry_id, fields in new:
                self._entries.append({k.decode(): v.decode() for k, v in fields.items()})
                self._last = entry_id
            return list(reversed(self._entries))


class ConsoleData:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.cfg = settings.console
        self.keys = Keys(settings.redis.key_prefix)
        self.registry = ModelRegistry.from_settings(client, settings)
        self.events = EventLog(client, self.keys, settings.redis.events_max_len)
        self.buffer = AdaptationBuffer(client, self.keys)
        self.tail = VerdictTail(client, self.keys, self.cfg.recent_verdicts)

    # ------------------------------------------------------------------------------------------- line

    def recent(self) -> list[dict[str, str]]:
        return self.tail.read()

    def line(self) -> list[Tile]:
        recent = self.recent()
        by_camera = _group(recent)
        cameras = sorted(set(by_camera) | set(self.settings.registry.lines))
        return self._tiles(cameras, by_camera, self.events.recent(self.cfg.events_shown))

    def _tiles(self, cameras: Sequence[str], by_camera: Mapping[str, Verdicts], events: Sequence[Event]) -> list[Tile]:
        actives = self._actives(cameras)
        drifts = self._drifts(cameras, by_camera)
        tiles = []
        for camera in cameras:
            mine = by_camera.get(camera, [])
            window = mine[: self.cfg.flagged_window]
            scopes = set(self.registry.scopes(camera)) - {DEFAULT_SCOPE}
            tiles.append(
                Tile(
                    camera=camera,
                    version=actives[camera],
                    drift=drifts[camera],
                    flagged=sum(v["anomalous"] == "true" for v in window),
                    seen=len(window),
                    last_frame=mine[0]["frame_id"] if mine else None,
                    last_ts=int(mine[0]["ts"]) if mine else None,
                    event=next((e for e in events if _concerns(e, camera, scopes)), None),
                )
            )
        return tiles

    def _actives(self, cameras: Sequence[str]) -> dict[str, str | None]:
        """Each camera's served version with one MGET (the registry's scope chain, resolved here)."""
        chains = {camera: self.registry.scopes(camera) for camera in cameras}
        scopes = sorted({s for chain in chains.values() for s in chain})
        if not scopes:
            return {}
        found = dict(zip(scopes, self.client.mget([self.keys.active(s) for s in scopes]), strict=True))
        return {
            c: next((_decode(found[s]) for s in chain if found[s] is not None), None) for c, chain in chains.items()
        }

    def _drifts(self, cameras: Sequence[str], by_camera: Mapping[str, Verdicts]) -> dict[str, Drift]:
        if not cameras:
            return {}
        raws = self.client.mget([self.keys.drift(c) for c in cameras])
        return {c: self._drift(raw, by_camera.get(c, [])) for c, raw in zip(cameras, raws, strict=True)}

    def _drift(self, raw: bytes | None, verdicts: Verdicts) -> Drift:
        latest = verdicts[0].get("drift_state", "") if verdicts else ""
        if latest == "off":
            return Drift("off")
        if raw is None:
            return Drift(latest or "unknown")
        try:
            summary = DriftMonitor.from_state_dict(json.loads(raw)["state"]).summary()
        except (ValueError, KeyError, TypeError):
            return Drift(latest or "unknown")
        level = summary["state"]
        if level == "ok" and self._near_alarm(summary):
            level = "warning"
        figures = {k: summary[k] for k in ("frames_seen", "cusum", "cusum_threshold", "window", "window_threshold")}
        return Drift(level, figures)

    def _near_alarm(self, summary: Mapping[str, Any]) -> bool:
        frac = self.cfg.drift_warning_fraction
        pairs = [(summary["cusum"], summary["cusum_threshold"]), (summary["window"], summary["window_threshold"])]
        return any(s is not None and t and s >= frac * t for s, t in pairs)

    # ------------------------------------------------------------------------------------------- camera

    def camera(self, camera: str) -> CameraView:
        recent = self.recent()
        by_camera = _group(recent)
        mine = by_camera.get(camera, [])
        if not mine and camera not in self.settings.registry.lines:
            raise UnknownCamera(camera)
        scopes = set(self.registry.scopes(camera)) - {DEFAULT_SCOPE}
        events = [e for e in self.events.recent(self.cfg.events_shown) if _concerns(e, camera, scopes)]
        tile = self._tiles([camera], by_camera, events)[0]
        timeline = Timeline.build(list(reversed(mine[: self.cfg.timeline_frames])), events)
        queue = review_queue(self.client, self.keys, mine, camera, self.cfg.review_limit, confirmable_only=True)
        return CameraView(
            camera, tile, timeline, queue, self._adaptation(camera, events), self._confirmed(camera), events
        )

    def _adaptation(self, camera: str, events: Sequence[Event]) -> Adaptation:
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self.keys.buffer(camera))
        pipe.zrevrange(self.keys.buffer(camera), 0, 0)
        pipe.get(self.keys.adapt_attempt(camera))
        pipe.exists(self.keys.adapt_lock(camera))
        size, newest, attempt, locked = pipe.execute()
        needs_new = False
        if attempt is not None and newest:
            try:
                needs_new = json.loads(attempt)["newest_frame_id"] == newest[0].decode()
            except (ValueError, KeyError, TypeError):
                needs_new = False
        last = next((e for e in events if e.kind in ADAPTATION_KINDS and e.scope == camera), None)
        return Adaptation(int(size), self.settings.adapt.min_shots, needs_new, bool(locked), last)

    def _confirmed(self, camera: str) -> list[Confirmed]:
        ids = self.client.zrevrange(self.keys.buffer(camera), 0, RECENT_CONFIRMATIONS - 1)
        if not ids:
            return []
        rows = []
        for raw in self.client.hmget(self.keys.buffer_meta(camera), ids):
            if raw is None:
                continue
            try:
                meta = json.loads(raw)
                rows.append(Confirmed(meta["frame_id"], meta["operator"], meta.get("note", ""), meta["confirmed_ms"]))
            except (ValueError, KeyError, TypeError):
                continue
        return rows

    # ------------------------------------------------------------------------------------------- versions

    def versions(self) -> VersionsView:
        actives = self.registry.actives()
        events = self.events.recent(self.cfg.events_shown)
        rows = []
        for version in reversed(self.registry.versions()):
            active_in = [s for s, v in actives.items() if v == version]
            try:
                m = self.registry.manifest(version)
            except RegistryError as exc:
                rows.append(VersionRow(version, None, "", "", "", {}, active_in, error=str(exc)))
                continue
            gate = m.summary.get("gate", {}) if isinstance(m.summary.get("gate"), dict) else {}
            camera = str(m.summary.get("camera_id", ""))
            rows.append(
                VersionRow(
                    version, m.parent, m.domain, m.created_at, camera, gate, active_in, refused=refused_checks(m)
                )
            )
        changes = [e for e in events if e.kind in REGISTRY_KINDS]
        scopes = []
        for scope, active in actives.items():
            change = next((e for e in changes if e.scope == scope), None)
            author = "" if change is None else str(change.detail.get("author") or "inspectd")
            scopes.append(ScopeRow(scope, active, self.registry.history(scope), author, change and change.ts))
        cameras = {v["camera_id"] for v in self.recent()}
        lines = self.settings.registry.lines
        choices = sorted(
            {DEFAULT_SCOPE, *actives, *map(camera_scope, {*lines, *cameras}), *map(line_scope, lines.values())}
        )
        return VersionsView(rows, scopes, choices)

    # ------------------------------------------------------------------------------------------- events

    def event_list(self, scope: str | None, kind: str | None) -> list[Event]:
        """The newest [console] events_shown events of the scope and kind (None: any); a camera id also
        finds the registry changes of its own scope (camera:ID)."""
        scopes = None if scope is None else {scope}
        if scope is not None and ID_PATTERN.fullmatch(scope):
            scopes = {scope, camera_scope(scope)}
        found: list[Event] = []
        end, scanned = "+", 0
        while len(found) < self.cfg.events_shown and scanned < MAX_EVENTS_SCANNED:
            page = self.client.xrevrange(self.keys.events, max=end, count=EVENTS_PAGE)
            if not page:
                break
            scanned += len(page)
            for _, fields in page:
                event = Event.from_fields(fields)
                if (scopes is None or event.scope in scopes) and (kind is None or event.kind == kind):
                    found.append(event)
            end = "(" + page[-1][0].decode()
        return found[: self.cfg.events_shown]


def _group(recent: Verdicts) -> dict[str, list[Mapping[str, str]]]:
    by_camera: dict[str, list[Mapping[str, str]]] = defaultdict(list)
    for v in recent:
        by_camera[v["camera_id"]].append(v)
    return by_camera

"""One operational timeline: drift alarms, adaptations, activations and rollbacks in the `events` stream.

Every part of the daemon appends to the same Redis stream (`{prefix}events`, capped approximately at
[redis] events_max_len), so an operator or a dashboard reads what happened to which camera or line and
model version, in order, from one place. Entries are flat string fields (`kind`, `scope`, `version`, `ts`
in ms epoch) plus `detail`, a JSON object for whatever is specific to the kind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis
from redis.client import Pipeline

from daemon.store import Keys


class EventKind(StrEnum):
    DRIFT_ALARM = "drift_alarm"
    ADAPTATION_STARTED = "adaptation_started"
    ADAPTATION_SHADOW = "adaptation_shadow"  # passed the offline gate; scored beside its parent on live frames
    ADAPTATION_ACCEPTED = "adaptation_accepted"
    ADAPTATION_REJECTED = "adaptation_rejected"
    ADAPTATION_FAILED = "adaptation_failed"  # the run ended without a verdict: its child died, ran out of memory
    ADAPTATION_SUPERSEDED = "adaptation_superseded"  # accepted, but its lock or the camera's version moved on
    VERSION_ACTIVATED = "version_activated"
    ROLLBACK = "rollback"
    VERSION_UNPINNED = "version_unpinned"  # a scope's own version removed: it falls back (registry unpin)
    VERSION_REMOVED = "version_removed"  # a kept refused candidate, never activated, deleted from the registry
    FRAMES_CONFIRMED = "frames_confirmed"  # an operator confirmed frames as normal (console)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Event:
    kind: str
    scope: str  # registry changes: a typed scope (daemon/scopes.py); the others: the camera id
    version: str = ""  # the model version concerned, "" when none
    detail: dict[str, Any] = field(default_factory=dict)
    ts: int = field(default_factory=now_ms)

    def fields(self) -> dict[str, str]:
        return {
            "kind": str(self.kind),
            "scope": self.scope,
            "version": self.version,
            "ts": str(self.ts),
            "detail": json.dumps(self.detail, sort_keys=True, allow_nan=False),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Event:
        f = {k.decode(): v.decode() for k, v in fields.items()}
        return cls(f["kind"], f["scope"], f["version"], json.loads(f["detail"]), int(f["ts"]))


class EventLog:
    """Appends events, optionally inside a caller's MULTI pipeline so that the event commits with the change
    it records (an activation and its event are never separated)."""

    def __init__(self, client: redis.Redis, keys: Keys, max_len: int):
        self.client = client
        self.keys = keys
        self.max_len = max_len

    def append(self, event: Event, pipe: Pipeline | None = None) -> None:
        (pipe or self.client).xadd(self.keys.events, event.fields(), maxlen=self.max_len, approximate=True)

    def recent(self, count: int = 100) -> list[Event]:
        """The newest `count` events, newest first."""
        return [Event.from_fields(f) for _, f in self.client.xrevrange(self.keys.events, count=count)]

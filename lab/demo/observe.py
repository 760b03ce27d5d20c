"""What the demo sees of the worker: its verdicts and events, tailed from Redis and joined with ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from daemon.events import Event
from daemon.store import Keys
from lab.demo.camera import SentFrame


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


def phase_of(s: Scored, story: Story) -> str:
    if story.adapted is not None and s.version == story.adapted:
        return "after_adaptation"
    return "shifted_before_adaptation" if s.frame.shifted else "before_shift"

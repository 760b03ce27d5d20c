"""Verdicts and cached frames in Redis, written idempotently by frame id.

One Lua script per verdict sets `verdict:{frame_id}` only if absent and, only then, appends to the
`verdicts` stream: a frame redelivered after a crash gets no second verdict, and the two writes
cannot be separated by a crash because a script runs atomically. A verdict carries the sha256 of its
frame's bytes: when the key exists with another hash, the frame id was reused for another frame, and
the script says so (the worker dead-letters it as `duplicate_frame_id`) instead of dropping it
silently. Frame bytes are cached only if absent, so a reused id never replaces the first frame's bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import redis

from daemon.frames import Frame

_WRITE_VERDICT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  local fields = cjson.decode(ARGV[1])
  local flat = {}
  for _, k in ipairs(cjson.decode(ARGV[4])) do
    table.insert(flat, k)
    table.insert(flat, tostring(fields[k]))
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(flat))
  return 1
end
local ok, old = pcall(cjson.decode, redis.call('GET', KEYS[1]) or '{}')
local new = cjson.decode(ARGV[1])['frame_sha256']
if ok and type(old) == 'table' and type(old['frame_sha256']) == 'string' and old['frame_sha256'] ~= ''
    and new ~= '' and old['frame_sha256'] ~= new then
  return 2
end
return 0
"""
NEW, DUPLICATE = 1, 2


@dataclass(frozen=True)
class Verdict:
    frame_id: str
    camera_id: str
    ts: int
    score: float
    threshold: float
    anomalous: bool
    model_version: str
    latency_ms: float
    drift_state: str = ""  # the camera's drift monitor after this frame: warmup, ok, alarm, or off (none)
    flag: str = ""  # why the frame is anomalous when the score cannot say: "non_finite_score" (NaN/inf)
    frame_sha256: str = ""  # of the frame's bytes ("" when unknown: then a reused id cannot be detected)

    @classmethod
    def from_entry(cls, fields: Mapping[str, str]) -> Verdict:
        """A verdict from its `verdicts` stream entry, where the Lua script wrote every field as text."""
        return cls(
            frame_id=fields["frame_id"],
            camera_id=fields["camera_id"],
            ts=int(fields["ts"]),
            score=float(fields["score"]),
            threshold=float(fields["threshold"]),
            anomalous=fields["anomalous"] == "true",
            model_version=fields["model_version"],
            latency_ms=float(fields["latency_ms"]),
            drift_state=fields.get("drift_state", ""),
            flag=fields.get("flag", ""),
            frame_sha256=fields.get("frame_sha256", ""),
        )


VERDICT_FIELDS = list(Verdict.__dataclass_fields__)


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def verdicts(self) -> str:
        return f"{self.prefix}verdicts"

    def verdict(self, frame_id: str) -> str:
        return f"{self.prefix}verdict:{frame_id}"

    def frame(self, frame_id: str) -> str:
        return f"{self.prefix}frame:{frame_id}"

    # Operator confirmations and adaptation buffers (daemon/confirmations.py).
    @property
    def confirmations(self) -> str:
        return f"{self.prefix}confirmations"

    @property
    def rejected_confirmations(self) -> str:
        return f"{self.prefix}confirmations:rejected"

    def buffer(self, camera_id: str) -> str:
        """Sorted set: the camera's confirmed frame ids, scored by confirmation time."""
        return f"{self.prefix}buffer:{camera_id}"

    def buffer_data(self, camera_id: str) -> str:
        return f"{self.prefix}buffer-data:{camera_id}"

    def buffer_meta(self, camera_id: str) -> str:
        return f"{self.prefix}buffer-meta:{camera_id}"

    @property
    def refused_dead_letters(self) -> str:
        """Stream: dead letters the DLQ topic refused for good (source, reason, detail, error)."""
        return f"{self.prefix}dead-letters:refused"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    # Model registry (daemon/registry.py). `models` is a pub/sub channel, not a key.
    @property
    def model_versions(self) -> str:
        return f"{self.prefix}model-versions"

    def model(self, version: str) -> str:
        return f"{self.prefix}model:{version}"

    def active(self, scope: str) -> str:
        return f"{self.prefix}active:{scope}"

    def history(self, scope: str) -> str:
        return f"{self.prefix}history:{scope}"

    @property
    def models_channel(self) -> str:
        return f"{self.prefix}models"

    # Serving and adaptation (daemon/drift_watch.py, daemon/controller.py).
    def drift(self, camera_id: str) -> str:
        """JSON: the camera's drift monitor state and the model version it belongs to."""
        return f"{self.prefix}drift:{camera_id}"

    def adapt_lock(self, scope: str) -> str:
        return f"{self.prefix}lock:adapt:{scope}"

    def adapt_attempt(self, scope: str) -> str:
        """JSON: the last adaptation attempt in the scope and the newest buffered frame it used."""
        return f"{self.prefix}adapt-attempt:{scope}"


class VerdictStore:
    def __init__(self, client: redis.Redis, keys: Keys, verdict_ttl_s: int, frame_ttl_s: int, stream_max_len: int):
        self.client = client
        self.keys = keys
        self.verdict_ttl_s = verdict_ttl_s
        self.frame_ttl_s = frame_ttl_s
        self.stream_max_len = stream_max_len
        self._script = client.register_script(_WRITE_VERDICT)

    def write(self, verdicts: Sequence[Verdict], frames: Sequence[Frame]) -> int:
        """Cache the frames and write the verdicts; returns how many verdicts were new."""
        return self.write_all(verdicts, frames)[0]

    def write_all(self, verdicts: Sequence[Verdict], frames: Sequence[Frame]) -> tuple[int, list[int]]:
        """Cache the frames (only where absent) and write the verdicts; returns how many verdicts were new
        and the positions of those whose frame id already has a verdict for other bytes."""
        pipe = self.client.pipeline(transaction=False)
        for frame in frames:
            pipe.set(self.keys.frame(frame.frame_id), frame.data, ex=self.frame_ttl_s, nx=True)
        for v in verdicts:
            self._script(
                keys=[self.keys.verdict(v.frame_id), self.keys.verdicts],
                args=[json.dumps(asdict(v)), self.verdict_ttl_s, self.stream_max_len, json.dumps(VERDICT_FIELDS)],
                client=pipe,
            )
        outcomes = [int(r) for r in pipe.execute()[len(frames) :]]
        return outcomes.count(NEW), [i for i, outcome in enumerate(outcomes) if outcome == DUPLICATE]

    def verdict(self, frame_id: str) -> Verdict | None:
        raw = self.client.get(self.keys.verdict(frame_id))
        return None if raw is None else Verdict(**json.loads(raw))

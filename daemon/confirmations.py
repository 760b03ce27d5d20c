"""Operator confirmations: frames confirmed as normal go into their camera's adaptation buffer.

Operators (an HMI, or `inspectd confirm`) append `{frame_id, label=normal, operator, note}` to the
`confirmations` stream. Workers read it through one consumer group. An entry is accepted when it is
well formed, the frame has a verdict (which names its camera) and its bytes are still cached; the bytes
are then copied into `buffer:{camera_id}`. Anything else is appended to `confirmations:rejected` with a
reason. Either way the entry is acknowledged in the same Lua script that copies or records it, so a
crash can neither lose an entry (it stays pending and is re-read or claimed by another worker) nor apply
it twice (the script first checks that the entry is still pending for this consumer).

Buffer layout per camera (bounded to the newest `buffer_max_frames` confirmations, durable as far as
Redis persistence is configured):
- `buffer:{camera_id}`: sorted set of frame ids scored by confirmation time (the stream entry's ms);
- `buffer-data:{camera_id}`: hash frame id -> frame bytes;
- `buffer-meta:{camera_id}`: hash frame id -> JSON (operator, note, score, model version, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis
import structlog

from daemon.config import ConfirmationsSection
from daemon.events import Event, EventKind, EventLog
from daemon.store import Keys, Verdict, VerdictStore

GROUP = "workers"
NORMAL = "normal"
LABELS = (NORMAL,)  # the only label the buffer takes: adaptation learns from normal frames only
RECORDED_FIELDS = ("frame_id", "label", "operator", "note")
NO_VERDICT = "unknown frame: no verdict (never scored here, or its verdict expired)"
NOT_CACHED = (
    "frame not cached: only frames near or over the threshold, a sample, and frames during a drift alarm are"
    " cached ([redis] cache_*), for [redis] frame_ttl_s"
)

_STREAM_FUNCTIONS = """
local function owned(stream, group, id, consumer)
  return #redis.call('XPENDING', stream, group, id, id, 1, consumer) > 0
end
local function reject(stream, rejected, group, id, maxlen, record, reason)
  table.insert(record, 'reason')
  table.insert(record, reason)
  redis.call('XADD', rejected, 'MAXLEN', '~', maxlen, '*', unpack(record))
  redis.call('XACK', stream, group, id)
end
"""

_TRIM_FUNCTION = """
local function trim(order, data, meta, keep)
  local drop = redis.call('ZCARD', order) - keep
  if drop <= 0 then return 0 end
  local old = redis.call('ZRANGE', order, 0, drop - 1)
  redis.call('ZREMRANGEBYRANK', order, 0, drop - 1)
  redis.call('HDEL', data, unpack(old))
  redis.call('HDEL', meta, unpack(old))
  return drop
end
"""

# KEYS: confirmations, rejected. ARGV: group, entry id, consumer, maxlen, reason, record field/value pairs...
_REJECT = (
    _STREAM_FUNCTIONS
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 'stale' end
reject(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[4], {unpack(ARGV, 6)}, ARGV[5])
return 'rejected'
"""
)

# KEYS: confirmations, rejected, frame, buffer, buffer-data, buffer-meta.
# ARGV: group, entry id, consumer, maxlen, frame id, order score, meta JSON, max frames, reason if the frame
# is gone, record field/value pairs...
_ACCEPT = (
    _STREAM_FUNCTIONS
    + _TRIM_FUNCTION
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 'stale' end
local data = redis.call('GET', KEYS[3])
if not data then
  reject(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[4], {unpack(ARGV, 10)}, ARGV[9])
  return 'rejected'
end
if redis.call('ZSCORE', KEYS[4], ARGV[5]) then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 'duplicate'
end
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5])
redis.call('HSET', KEYS[5], ARGV[5], data)
redis.call('HSET', KEYS[6], ARGV[5], ARGV[7])
trim(KEYS[4], KEYS[5], KEYS[6], tonumber(ARGV[8]))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 'accepted'
"""
)

# KEYS: buffer, buffer-data, buffer-meta. ARGV: frames to keep.
_TRIM = _TRIM_FUNCTION + "return trim(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))"


class InvalidConfirmation(ValueError):
    """A confirmation that cannot be accepted whatever is in Redis; `field` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


def validate(entry: Mapping[str, str], cfg: ConfirmationsSection) -> None:
    """Raise `InvalidConfirmation` for a malformed entry (shared by the worker and `inspectd confirm`)."""
    if not entry.get("frame_id"):
        raise InvalidConfirmation("frame_id", "frame_id is missing")
    label = entry.get("label", "")
    if label not in LABELS:
        raise InvalidConfirmation("label", f"label {label!r} is not one of: {', '.join(LABELS)}")
    operator = entry.get("operator", "")
    if not operator.strip():
        raise InvalidConfirmation("operator", "operator is missing")
    if len(operator) > cfg.max_operator_chars:
        raise InvalidConfirmation("operator", f"operator is longer than {cfg.max_operator_chars} characters")
    if len(entry.get("note", "")) > cfg.max_note_chars:
        raise InvalidConfirmation("note", f"note is longer than {cfg.max_note_chars} characters")


def normal_entry(frame_id: str, operator: str, note: str = "") -> dict[str, str]:
    """The stream entry confirming one frame as normal."""
    return {"frame_id": frame_id, "label": NORMAL, "operator": operator, "note": note}


def submit(client: redis.Redis, keys: Keys, cfg: ConfirmationsSection, entry: Mapping[str, str]) -> str:
    """Append one confirmation to the stream as an HMI would (the worker validates it); returns the entry id."""
    return client.xadd(keys.confirmations, dict(entry), maxlen=cfg.stream_max_len, approximate=True).decode()


def submit_all(
    client: redis.Redis,
    keys: Keys,
    cfg: ConfirmationsSection,
    entries: Sequence[Mapping[str, str]],
    events: EventLog,
    camera_id: str,
) -> list[str]:
    """Append several confirmations and one `frames_confirmed` event naming the operator, in one MULTI: an
    operator's selection is recorded whole or not at all. Returns the entry ids."""
    pipe = client.pipeline(transaction=True)
    for entry in entries:
        pipe.xadd(keys.confirmations, dict(entry), maxlen=cfg.stream_max_len, approximate=True)
    operators = sorted({e["operator"] for e in entries})
    detail = {"operator": ", ".join(operators), "frame_ids": [e["frame_id"] for e in entries]}
    events.append(Event(EventKind.FRAMES_CONFIRMED, camera_id, "", detail), pipe)
    return [entry_id.decode() for entry_id in pipe.execute()[: len(entries)]]


@dataclass(frozen=True)
class ReviewFrame:
    """A recent frame offered for confirmation, with whether it can still be confirmed."""

    verdict: Verdict
    cached: bool  # its bytes are still in the frame cache
    buffered: bool  # already confirmed into its camera's adaptation buffer


def recent_verdicts(client: redis.Redis, keys: Keys, window: int) -> list[dict[str, str]]:
    """The newest `window` entries of the verdicts stream as text fields, newest first."""
    entries = client.xrevrange(keys.verdicts, count=window)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def review_queue(
    client: redis.Redis,
    keys: Keys,
    recent: Sequence[Mapping[str, str]],
    camera: str | None,
    limit: int,
    include_normal: bool = False,
    confirmable_only: bool = False,
) -> list[ReviewFrame]:
    """The frames most worth an operator's look among `recent` verdicts (see `recent_verdicts`): during a
    drift alarm those are normal parts flagged anomalous, so frames above their threshold (or all with
    `include_normal`), highest score first. `confirmable_only` drops frames no longer cached or already
    buffered before the `limit` applies (a page offers only what can be confirmed)."""
    picked = [
        v
        for v in recent
        if (camera is None or v["camera_id"] == camera) and (include_normal or v["anomalous"] == "true")
    ]
    picked = sorted(picked, key=lambda v: float(v["score"]), reverse=True)
    if not confirmable_only:
        picked = picked[:limit]
    pipe = client.pipeline(transaction=False)
    for v in picked:
        pipe.exists(keys.frame(v["frame_id"]))
        pipe.zscore(keys.buffer(v["camera_id"]), v["frame_id"])
    flags = pipe.execute()
    rows = [
        ReviewFrame(Verdict.from_entry(v), cached=bool(flags[2 * i]), buffered=flags[2 * i + 1] is not None)
        for i, v in enumerate(picked)
    ]
    if confirmable_only:
        rows = [r for r in rows if r.cached and not r.buffered][:limit]
    return rows


@dataclass
class ConfirmationCounts:
    accepted: int = 0
    duplicate: int = 0  # the frame was already in the buffer: acknowledged, nothing changed
    rejected: int = 0

    @property
    def total(self) -> int:
        return self.accepted + self.duplicate + self.rejected


@dataclass(frozen=True)
class BufferedFrame:
    """One confirmed-normal frame with where it came from (the adaptation controller's input)."""

    frame_id: str
    camera_id: str
    operator: str
    note: str
    confirmed_ms: int
    score: float
    model_version: str
    data: bytes = field(repr=False)


class ConfirmationProcessor:
    """Handles the confirmations stream for one worker (`consumer` must be unique per worker process)."""

    def __init__(self, store: VerdictStore, cfg: ConfirmationsSection, consumer: str) -> None:
        self.store = store
        self.client = store.client
        self.keys = store.keys
        self.cfg = cfg
        self.consumer = consumer
        self._accept = self.client.register_script(_ACCEPT)
        self._reject = self.client.register_script(_REJECT)
        self._claim_cursor = "0-0"
        self._log = structlog.get_logger()

    def process(self, max_entries: int, block_ms: int | None = None) -> ConfirmationCounts:
        """Handle up to `max_entries` entries: those left pending for `claim_min_idle_ms` (by a dead worker,
        or by a call of this one that failed half-way), then new ones (waiting up to `block_ms`; None: no)."""
        try:
            entries = self._entries(max_entries, block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._create_group()
            entries = self._entries(max_entries, block_ms)
        counts = ConfirmationCounts()
        for entry_id, raw in entries.items():
            outcome = self._handle(entry_id.decode(), raw)
            if outcome != "stale":  # another worker claimed it meanwhile and owns the outcome
                setattr(counts, outcome, getattr(counts, outcome) + 1)
        return counts

    def _create_group(self) -> None:
        """Start at the stream's beginning, so entries written before any worker ran are handled too."""
        try:
            self.client.xgroup_create(self.keys.confirmations, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # another worker created it first
                raise

    def _entries(self, max_entries: int, block_ms: int | None) -> dict[bytes, dict[bytes, bytes]]:
        stream = self.keys.confirmations
        reply = self.client.xautoclaim(
            stream, GROUP, self.consumer, self.cfg.claim_min_idle_ms, self._claim_cursor, count=max_entries
        )
        self._claim_cursor, entries = reply[0], dict(reply[1])  # the cursor wraps to 0-0 at the end
        if len(entries) < max_entries:
            new = self.client.xreadgroup(
                GROUP,
                self.consumer,
                {stream: ">"},
                count=max_entries - len(entries),
                block=None if entries else block_ms,
            )
            entries.update(new[0][1] if new else [])
        return entries

    def _handle(self, entry_id: str, raw: dict[bytes, bytes]) -> str:
        entry = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
        record = [*(x for k in RECORDED_FIELDS for x in (k, entry.get(k, ""))), "entry_id", entry_id]
        frame_id = entry.get("frame_id", "")
        try:
            validate(entry, self.cfg)
        except InvalidConfirmation as exc:
            return self._rejected(entry_id, entry, record, str(exc))
        verdict = self.store.verdict(frame_id)
        if verdict is None:
            return self._rejected(entry_id, entry, record, NO_VERDICT)
        camera = verdict.camera_id
        meta = {
            "frame_id": frame_id,
            "camera_id": camera,
            "operator": entry["operator"],
            "note": entry.get("note", ""),
            "confirmed_ms": int(entry_id.split("-")[0]),
            "score": verdict.score,
            "model_version": verdict.model_version,
        }
        k = self.keys
        outcome = self._accept(
            keys=[
                k.confirmations,
                k.rejected_confirmations,
                k.frame(frame_id),
                k.buffer(camera),
                k.buffer_data(camera),
                k.buffer_meta(camera),
            ],
            args=[
                GROUP,
                entry_id,
                self.consumer,
                self.cfg.stream_max_len,
                frame_id,
                meta["confirmed_ms"],
                json.dumps(meta),
                self.cfg.buffer_max_frames,
                NOT_CACHED,
                *record,
            ],
        ).decode()
        if outcome == "rejected":
            self._log.warning("confirmation rejected", entry_id=entry_id, frame_id=frame_id, reason=NOT_CACHED)
        elif outcome != "stale":
            self._log.info(
                "confirmation handled",
                outcome=outcome,
                entry_id=entry_id,
                frame_id=frame_id,
                camera_id=camera,
                operator=entry["operator"],
            )
        return outcome

    def _rejected(self, entry_id: str, entry: Mapping[str, str], record: list[str], reason: str) -> str:
        outcome = self._reject(
            keys=[self.keys.confirmations, self.keys.rejected_confirmations],
            args=[GROUP, entry_id, self.consumer, self.cfg.stream_max_len, reason, *record],
        ).decode()
        if outcome == "rejected":
            self._log.warning("confirmation rejected", entry_id=entry_id, frame_id=entry.get("frame_id"), reason=reason)
        return outcome


class AdaptationBuffer:
    """Read and trim the cameras' confirmed-normal frames (the adaptation controller's side)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._trim = client.register_script(_TRIM)

    def size(self, camera_id: str) -> int:
        return int(self.client.zcard(self.keys.buffer(camera_id)))

    def contains(self, camera_id: str, frame_id: str) -> bool:
        return self.client.zscore(self.keys.buffer(camera_id), frame_id) is not None

    def frames(self, camera_id: str, limit: int) -> list[BufferedFrame]:
        """The newest `limit` confirmed frames, newest first (frames trimmed meanwhile are left out)."""
        ids = self.client.zrevrange(self.keys.buffer(camera_id), 0, limit - 1)
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=True)  # data and meta change together (Lua), read them so
        pipe.hmget(self.keys.buffer_data(camera_id), ids)
        pipe.hmget(self.keys.buffer_meta(camera_id), ids)
        data, metas = pipe.execute()
        return [
            BufferedFrame(**json.loads(meta), data=blob)
            for blob, meta in zip(data, metas, strict=True)
            if blob is not None and meta is not None
        ]

    def trim(self, camera_id: str, keep: int) -> int:
        """Drop all but the newest `keep` frames (0 clears the buffer); returns how many were dropped."""
        k = self.keys
        return int(
            self._trim(keys=[k.buffer(camera_id), k.buffer_data(camera_id), k.buffer_meta(camera_id)], args=[keep])
        )

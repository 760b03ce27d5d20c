"""Verdicts and cached frames in Redis, written idempotently by frame id, kept only as long as needed.

One Lua script per verdict sets `verdict:{frame_id}` only if absent and, only then, appends to the
`verdicts` stream: a frame redelivered after a crash gets no second verdict, and the two writes
cannot be separated by a crash because a script runs atomically. A verdict carries the sha256 of its
frame's bytes: when the key exists with another hash, the frame id was reused for another frame, and
the script says so (the worker dead-letters it as `duplicate_frame_id`) instead of dropping it
silently. A frame's bytes are cached by the same script, only with a new verdict and only if absent, so a
reused id never puts another frame's bytes under the first frame's verdict.

What is kept, and for how long, is sized for a plant (50 cameras at 10 fps, bench/bench_redis_memory.py):
- `verdict:{frame_id}` is the redelivery guard: it lives for [redis] verdict_ttl_s (hours), or as long
  as its frame is cached when that is longer (a confirmation needs the verdict to name the camera);
- the `verdicts` stream holds the verdicts' content and is trimmed by time ([redis] stream_retention_s,
  XADD MINID ~) as well as by count (stream_max_len, the ceiling at any rate);
- `frame:{frame_id}` is kept only for frames an operator may confirm (`CachePolicy`): near or over the
  threshold, a deterministic 1-in-N sample of the rest, and a denser sample while the camera's drift
  monitor is in alarm (the review queue after an alarm needs normal-looking frames); stored at the
  model's input size as PNG (what the model saw, losslessly; as sent when that is smaller, or when the
  frame as sent is at most a byte per input pixel) for [redis] frame_ttl_s.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import redis
from PIL import Image

from daemon.frames import Frame

# KEYS: verdict, verdicts stream, frame. ARGV: verdict JSON, its TTL, stream max length, stream fields (JSON),
# the oldest stream entry id to keep ("": no time limit), frame bytes to cache ("": none), frame TTL. The frame
# is cached with its verdict, only when the verdict is new: a reused id cannot put another frame's bytes under it.
_WRITE_VERDICT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  local fields = cjson.decode(ARGV[1])
  local flat = {}
  for _, k in ipairs(cjson.decode(ARGV[4])) do
    table.insert(flat, k)
    table.insert(flat, tostring(fields[k]))
  end
  if ARGV[5] ~= '' then
    redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[5], '*', unpack(flat))
    redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', ARGV[3])
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(flat))
  end
  if ARGV[6] ~= '' then
    redis.call('SET', KEYS[3], ARGV[6], 'NX', 'EX', ARGV[7])
  end
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
# zlib level of cached frames: 1 encodes a 256 px frame about 4.5x faster than Pillow's default 6, for
# about 18 % more bytes (ELPV cells); the cache is bounded by [redis] frame_ttl_s and its sampling policy.
CACHE_PNG_LEVEL = 1
COMPACT = (",", ":")  # JSON separators of verdict keys: a plant holds an hour of them (~2 million)


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
    def activated_versions(self) -> str:
        """Set: every version ever made active in some scope (such a version is never removed)."""
        return f"{self.prefix}activated-versions"

    @property
    def parent_versions(self) -> str:
        """Set: every version that a published version names as its parent (never removed either)."""
        return f"{self.prefix}parent-versions"

    def kept_refused(self, camera_id: str) -> str:
        """List, newest first: the camera's refused candidates kept for an operator to force."""
        return f"{self.prefix}kept-refused:{camera_id}"

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


# Why a frame is cached (`CachePolicy.reason`); None: it is not.
NEAR, ALARM, SAMPLE = "near", "alarm", "sample"


@dataclass(frozen=True)
class CachePolicy:
    """Which frames are cached for operators to confirm. Frames far below the threshold are the bulk of a
    line and nobody confirms them, except during a drift alarm (adaptation learns from normal-looking
    frames of the new domain) and in a small sample (for a look at what "normal" scores look like).

    `near_threshold`: frames scoring at least this share of their threshold (and every anomalous one);
    `sample_every`: 1 in N of the others, chosen by a hash of camera and frame id (the same frames on
    every worker and after a redelivery); `alarm_every`: 1 in N of the others while the camera's drift
    monitor is in alarm (1 = every frame). 0 turns a sample off."""

    near_threshold: float = 0.9
    sample_every: int = 1000
    alarm_every: int = 1

    def reason(self, v: Verdict) -> str | None:
        if v.anomalous or not math.isfinite(v.score) or v.score >= _near(v.threshold, self.near_threshold):
            return NEAR
        bucket = _bucket(v.camera_id, v.frame_id)
        if v.drift_state == "alarm" and self.alarm_every and bucket % self.alarm_every == 0:
            return ALARM
        if self.sample_every and bucket % self.sample_every == 0:
            return SAMPLE
        return None


# Every frame, as received: the store's behaviour when no policy is given (tools and tests that seed Redis).
CACHE_ALL = CachePolicy(near_threshold=-math.inf, sample_every=1, alarm_every=1)


def _near(threshold: float, ratio: float) -> float:
    """`ratio` x threshold for a positive threshold, measured from it the same way for a negative one."""
    return threshold - (1.0 - ratio) * abs(threshold)


def _bucket(camera_id: str, frame_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{camera_id}/{frame_id}".encode(), digest_size=8).digest(), "big")


def cached_bytes(frame: Frame, image: Any | None) -> bytes:
    """What the cache keeps of a frame, so that a confirmed frame adapts the model on exactly what it scored:
    decoded and resized again, the bytes kept give `image` (the model's input, a (3, S, S) float tensor in
    [0, 1] or an (S, S, 3) uint8 array). Bytes as sent of at most one byte per input pixel are kept as they
    are: the PNG would save little, and its encoding is work on the worker's two cores (RESULTS, "Frames
    cached as sent"). Larger frames are stored as the input in PNG, lossless, one channel when the three
    are equal (a monochrome camera), or as sent when that is smaller or no image is given."""
    if image is None:
        return frame.data
    try:
        pixels = np.asarray(image)
        tensor = pixels.dtype != np.uint8
        if tensor:
            pixels = pixels.transpose(1, 2, 0)
        if len(frame.data) <= pixels.shape[0] * pixels.shape[1]:
            return frame.data
        if tensor:  # the tensor's float pixels are uint8 / 255: this rounds back exactly
            pixels = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
        if (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all():
            pixels = pixels[..., 0]
        out = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(out, "PNG", compress_level=CACHE_PNG_LEVEL)
    except (ValueError, TypeError, OSError):  # not an image of the expected layout: the frame is kept as sent
        return frame.data
    encoded = out.getvalue()
    return encoded if len(encoded) < len(frame.data) else frame.data


class VerdictStore:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        verdict_ttl_s: int,
        frame_ttl_s: int,
        stream_max_len: int,
        policy: CachePolicy = CACHE_ALL,
        stream_retention_s: int = 0,
    ):
        """`verdict_ttl_s`: the redelivery window; `stream_retention_s`: 0 trims the stream by count only;
        `policy`: which frames are cached (by default all, as received)."""
        self.client = client
        self.keys = keys
        self.verdict_ttl_s = verdict_ttl_s
        self.frame_ttl_s = frame_ttl_s
        self.stream_max_len = stream_max_len
        self.policy = policy
        self.stream_retention_s = stream_retention_s
        self._script = client.register_script(_WRITE_VERDICT)

    def write(self, verdicts: Sequence[Verdict], frames: Sequence[Frame]) -> int:
        """Cache the frames the policy keeps and write the verdicts; returns how many verdicts were new."""
        return self.write_all(verdicts, frames)[0]

    def to_cache(
        self,
        verdicts: Sequence[Verdict],
        frames: Sequence[Frame],
        images: Sequence[Any] | None = None,
        executor: Executor | None = None,
    ) -> dict[str, bytes]:
        """The bytes to cache by frame id, for the verdicts the policy keeps (`images`, aligned with
        `frames`, are the model's inputs: what is stored when given, see `cached_bytes`). `executor`
        encodes them in parallel (Pillow's PNG encoder releases the GIL)."""
        keep = {v.frame_id for v in verdicts if self.policy.reason(v) is not None}
        kept = [i for i, f in enumerate(frames) if f.frame_id in keep]
        kept_frames = [frames[i] for i in kept]
        kept_images = [None if images is None else images[i] for i in kept]
        encode = executor.map if executor is not None else map
        encoded = encode(cached_bytes, kept_frames, kept_images)
        return {f.frame_id: data for f, data in zip(kept_frames, encoded, strict=True)}

    def write_all(
        self, verdicts: Sequence[Verdict], frames: Sequence[Frame] | Mapping[str, bytes]
    ) -> tuple[int, list[int]]:
        """Write the verdicts, each new one with its frame if cached; returns how many verdicts were new and
        the positions of those whose frame id already has a verdict for other bytes. `frames`: bytes by frame
        id, already chosen (`to_cache`), or `Frame`s, of which the policy keeps the bytes as received."""
        cache = frames if isinstance(frames, Mapping) else self.to_cache(verdicts, frames)
        pipe = self.client.pipeline(transaction=False)
        # a cached frame's verdict lives as long as the frame: a confirmation needs it to name the camera
        longer = max(self.verdict_ttl_s, self.frame_ttl_s)
        fields = json.dumps(VERDICT_FIELDS)
        # by the worker's clock (the server's TIME is outside the worker's ACL); entry ids are the server's ms
        oldest = str(int(time.time() * 1000) - self.stream_retention_s * 1000) if self.stream_retention_s else ""
        for v in verdicts:
            data = cache.get(v.frame_id, b"")
            self._script(
                keys=[self.keys.verdict(v.frame_id), self.keys.verdicts, self.keys.frame(v.frame_id)],
                args=[
                    json.dumps(asdict(v), separators=COMPACT),
                    longer if data else self.verdict_ttl_s,
                    self.stream_max_len,
                    fields,
                    oldest,
                    data,
                    self.frame_ttl_s,
                ],
                client=pipe,
            )
        outcomes = [int(r) for r in pipe.execute()]
        return outcomes.count(NEW), [i for i, outcome in enumerate(outcomes) if outcome == DUPLICATE]

    def verdict(self, frame_id: str) -> Verdict | None:
        raw = self.client.get(self.keys.verdict(frame_id))
        return None if raw is None else Verdict(**json.loads(raw))

"""Crash-loop protection: per-offset attempt counters in Redis.

A record that kills the process while it is decoded or scored (a native crash in a decoder, an OOM kill, a
hang that the liveness probe ends) is never committed, so every restart, and every worker that takes the
partition over, would die on it again. Before a batch is decoded, the worker counts an attempt for each of
its records (`<prefix>attempts:<topic>:<partition>:<offset>`, expiring after `[worker] attempts_ttl_s`);
once the batch is done the counters are cleared. A counter that is still there on redelivery means the
record was in flight when a process died.

The hot path is one Redis round trip per batch (`begin`: it also clears the previous batch's counters).
When a batch holds a record that was in flight at a death, the batch is not counted as a whole: the worker
takes its records one at a time (`start` counts only that one), so that the record that kills the process
climbs alone and the innocent ones beside it do not. A record whose counter has reached
`[worker] max_attempts` is dead-lettered without decoding, with reason `crash_loop`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

CRASH_LOOP = "crash_loop"  # the dead-letter reason code

# KEYS: the counters to clear (ARGV[1] of them), then the batch's. If none of the batch's exists, each is
# set to 1 (with the TTL ARGV[2]) and {} is returned; otherwise nothing is set and their counts come back.
_BEGIN = """
local clear = tonumber(ARGV[1])
for i = 1, clear do redis.call('DEL', KEYS[i]) end
local counts, seen = {}, false
for i = clear + 1, #KEYS do
  local n = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  counts[#counts + 1] = n
  if n > 0 then seen = true end
end
if seen then return counts end
for i = clear + 1, #KEYS do redis.call('SET', KEYS[i], 1, 'EX', ARGV[2]) end
return {}
"""


def key(prefix: str, topic: str, partition: int, offset: int) -> str:
    return f"{prefix}attempts:{topic}:{partition}:{offset}"


class Attempts:
    """The attempt counters of one worker's records. Not thread-safe: the worker loop owns it."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._finished: list[str] = []  # counters to clear with the next call (done, nothing to count)
        self._script = client.register_script(_BEGIN)

    def key_of(self, record: Any) -> str:
        return key(self.prefix, record.topic, record.partition, record.offset)

    def begin(self, records: Sequence[Any]) -> list[int] | None:
        """Count an attempt for each record, in one round trip, unless one of them was in flight when a
        process died: then nothing is counted and the counts (attempts so far, per record) are returned."""
        clear = self._finished
        counts = self._script(keys=[*clear, *map(self.key_of, records)], args=[len(clear), self.ttl_s])
        self._finished = []
        return [int(n) for n in counts] or None

    def start(self, record: Any) -> int:
        """Count an attempt for this one record; the attempts so far, this one included."""
        pipe = self.client.pipeline(transaction=False)
        if self._finished:
            pipe.delete(*self._finished)
        pipe.incr(self.key_of(record))
        pipe.expire(self.key_of(record), self.ttl_s)
        count = int(pipe.execute()[-2])
        self._finished = []
        return count

    def finish(self, records: Sequence[Any]) -> None:
        """These records are done (verdict written or dead-lettered): cleared with the next call."""
        self._finished += map(self.key_of, records)

    @property
    def pending(self) -> bool:
        return bool(self._finished)

    def abandon(self, records: Sequence[Any]) -> None:
        """Best effort, on the way out after a drain timeout: these records were not in flight at a crash.
        Redis may be the outage that timed out: then their counts stay (one attempt each)."""
        try:
            self.client.delete(*map(self.key_of, records), *self._finished)
            self._finished = []
        except redis.RedisError:
            pass

    def flush(self) -> None:
        """Clear the finished counters now (between batches, when there is no next batch to carry them)."""
        if self._finished:
            self.client.delete(*self._finished)
            self._finished = []

"""Attempt counters (daemon/attempts.py) against a real Redis: one round trip per batch on the hot path,
counts only where a record was in flight at a crash, cleared once done."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import redis

from daemon.attempts import Attempts

Record = namedtuple("Record", "topic partition offset")
TTL_S = 600


def _counting(client: redis.Redis) -> list[str]:
    """The commands this client sends from now on (each one a round trip)."""
    sent: list[str] = []
    send = client.execute_command

    def counted(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return send(*args, **options)

    client.execute_command = counted  # type: ignore[method-assign]
    return sent


def test_a_batch_is_counted_in_one_round_trip_and_cleared_with_the_next(client: redis.Redis) -> None:
    attempts = Attempts(client, "t:", TTL_S)
    batch = [Record("frames", 0, i) for i in range(16)]
    attempts.begin(batch[:1])  # loads the script
    attempts.finish(batch[:1])
    sent = _counting(client)
    assert attempts.begin(batch) is None  # nothing was in flight at a crash: counted, hot path
    assert sent == ["EVALSHA"]  # one round trip: the previous batch cleared and this one counted
    assert [int(client.get(f"t:attempts:frames:0:{i}")) for i in range(16)] == [1] * 16
    assert 0 < client.ttl("t:attempts:frames:0:0") <= TTL_S
    attempts.finish(batch)
    assert attempts.begin([Record("frames", 0, 16)]) is None
    assert client.keys("t:attempts:frames:0:1*") == [b"t:attempts:frames:0:16"]


def test_after_a_crash_only_the_record_taken_alone_is_counted(client: redis.Redis) -> None:
    crashed = Attempts(client, "t:", TTL_S)
    batch = [Record("frames", 1, i) for i in range(3)]
    crashed.begin(batch)  # ... and the process dies: nothing finished
    restarted = Attempts(client, "t:", TTL_S)
    assert restarted.begin([*batch, Record("frames", 1, 3)]) == [1, 1, 1, 0]  # counts, nothing added
    assert restarted.start(batch[0]) == 2
    restarted.finish([batch[0]])
    assert restarted.start(batch[1]) == 2  # also clears the first
    assert client.get("t:attempts:frames:1:0") is None
    assert client.get("t:attempts:frames:1:2") == b"1"


def test_abandoned_records_leave_no_count(client: redis.Redis) -> None:
    attempts = Attempts(client, "t:", TTL_S)
    batch = [Record("frames", 2, i) for i in range(4)]
    attempts.begin(batch)
    attempts.abandon(batch)
    assert not client.keys("t:attempts:*")

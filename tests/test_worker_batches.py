"""The worker's batches: what committing one commits, and what is left of one after the poll ahead rebalanced
the group (a batch polled before its predecessor was scored, `[worker] decode_ahead`)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import structlog
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from daemon.dead_letters import DeadLetter
from daemon.frames import BadFrame
from daemon.worker import Batch, Worker

TOPIC = "frames"


def _record(partition: int, offset: int) -> Any:
    return SimpleNamespace(topic=TOPIC, partition=partition, offset=offset, key=None, value=b"", headers=[])


def _stub(partition: int, offset: int) -> DeadLetter:
    return DeadLetter.stub(TOPIC, partition, offset, "unreadable_record", "test")


def test_a_batch_commits_past_its_last_record_or_dead_letter_in_each_partition() -> None:
    """Not the consumer's positions, which are past the batch polled ahead by then."""
    batch = Batch([_record(0, 5), _record(0, 7), _record(1, 2)], [_stub(1, 9)])
    assert batch.offsets == {
        TopicPartition(TOPIC, 0): OffsetAndMetadata(8, "", -1),
        TopicPartition(TOPIC, 1): OffsetAndMetadata(10, "", -1),
    }
    assert Batch([], []).offsets == {}


def test_records_of_partitions_revoked_while_the_batch_waited_are_left_to_their_new_owner() -> None:
    """Partition 1 went to another worker during the poll ahead: its records, frames and dead letters leave
    the batch (their new owner scores them from its committed offset), their attempt counters are cleared,
    and what stays keeps each frame with its own decode."""
    records = [_record(0, 1), _record(1, 1), _record(0, 2), _record(1, 2)]
    frames = [SimpleNamespace(frame_id=f"f{i}") for i in range(4)]
    decodes = ["image0", BadFrame("decode_error", "x"), "image2", "image3"]
    batch = Batch(records, [_stub(1, 3)], None, list(zip(records, frames, strict=True)), [64] * 4, iter(decodes))
    finished: list[Any] = []
    worker = Worker.__new__(Worker)  # only the consumer, the attempt counters and the log are involved
    worker.consumer = SimpleNamespace(assignment=lambda: {TopicPartition(TOPIC, 0)})
    worker.attempts = SimpleNamespace(finish=finished.extend)
    worker._log = structlog.get_logger()
    held = worker._still_held(batch)
    assert held.records == [records[0], records[2]] and held.dead == []
    assert [f.frame_id for _, f in held.parsed] == ["f0", "f2"] and list(held.decoded) == ["image0", "image2"]
    assert finished == [records[1], records[3]]
    assert held.offsets == {TopicPartition(TOPIC, 0): OffsetAndMetadata(3, "", -1)}
    # nothing revoked: the batch itself, its decodes untouched
    whole = Batch(records[:1], [], None, [(records[0], frames[0])], [64], iter(["image0"]))
    assert worker._still_held(whole) is whole

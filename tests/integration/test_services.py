"""The local services over real sockets, and the Kafka/Redis behaviour the worker relies on.

Each check is also a measurement: run with ``-s`` to see group-join, rebalance and throughput figures.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, MessageSizeTooLargeError, RebalanceInProgressError
from kafka.structs import OffsetAndMetadata

from lab.services import LocalKafka, LocalRedis, ServiceError, find_redis_server, find_tansu, free_port

PARTITIONS = 4
MB = 1024 * 1024


def headers_for(i: int) -> list[tuple[str, bytes]]:
    return [
        ("frame_id", f"frame-{i}".encode()),
        ("camera_id", f"cam-{i % 3}".encode()),
        ("ts", str(int(time.time() * 1000)).encode()),
        ("content_type", b"image/jpeg"),
    ]


def produce(bootstrap: str, topic: str, count: int, start: int = 0, size: int = 64, **config: Any) -> None:
    """``count`` records spread round-robin over the partitions (explicit partition: keyed by camera id,
    a few cameras hash onto one or two of four partitions), keyed by camera, with the frame headers."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", **config)
    try:
        for i in range(start, start + count):
            producer.send(
                topic,
                key=f"cam-{i % 3}".encode(),
                value=i.to_bytes(4, "big") + b"\0" * max(0, size - 4),
                headers=headers_for(i),
                partition=i % PARTITIONS,
            )
        producer.flush(timeout=30)
    finally:
        producer.close()


def drain(
    consumer: KafkaConsumer,
    count: int | None = None,
    timeout: float = 10.0,
    until: Callable[[], bool] | None = None,
    idle: float | None = None,
) -> list[ConsumerRecord]:
    """Poll until ``count`` records came, ``until()`` holds, ``idle`` seconds passed with partitions assigned
    but no records, or ``timeout``."""
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout
    last: float | None = None  # when a record last came, or partitions were first seen
    while time.monotonic() < deadline:
        polled = consumer.poll(timeout_ms=100)
        now = time.monotonic()
        for batch in polled.values():
            records.extend(batch)
            last = now
        if last is None and consumer.assignment():
            last = now
        if count is not None and len(records) >= count:
            break
        if until is not None and until():
            break
        if idle is not None and last is not None and now - last > idle:
            break
    return records


def wait_assigned(consumer: KafkaConsumer, timeout: float = 10.0) -> tuple[float, list[ConsumerRecord]]:
    """Seconds until the consumer has partitions, and the records that came with the first polls."""
    start = time.monotonic()
    records = drain(consumer, timeout=timeout, until=lambda: bool(consumer.assignment()))
    assert consumer.assignment(), "no partitions assigned"
    return time.monotonic() - start, records


def commit(consumer: KafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata] | None = None) -> None:
    """Commit, retrying while the group rebalances (kafka-python 3.0.12 raises RebalanceInProgressError,
    not only CommitFailedError, when a commit races a rebalance)."""
    for _ in range(50):
        try:
            consumer.commit(offsets)
            return
        except (CommitFailedError, RebalanceInProgressError):
            consumer.poll(timeout_ms=100)
    raise AssertionError("commit kept failing")


def partitions(tps: Iterable[TopicPartition]) -> set[int]:
    return {tp.partition for tp in tps}


# --------------------------------------------------------------------------------------------------
# Service helpers


def test_binaries_are_found() -> None:
    assert os.access(find_tansu(), os.X_OK)
    assert os.access(find_redis_server(), os.X_OK)


def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    bad = LocalRedis(extra_args=["--no-such-option", "1"], startup_timeout=5)
    with pytest.raises(ServiceError, match=r"(?s)exited with code .*no-such-option"):
        bad.start()
    assert not bad.running
    bad.close()


def test_port_taken_is_a_clear_error(redis_server: LocalRedis) -> None:
    clash = LocalRedis(port=redis_server.port, startup_timeout=5)
    with pytest.raises(ServiceError, match=r"(?s)redis exited with code .*Address already in use"):
        clash.start()
    clash.close()
    assert redis_server.client().ping()


def test_port_taken_is_a_clear_error_for_tansu_too() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        clash = LocalKafka(port=taken.getsockname()[1], startup_timeout=5)
        with pytest.raises(ServiceError, match=r"(?s)tansu exited with code 0 .*Address in use"):
            clash.start()
        clash.close()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# --------------------------------------------------------------------------------------------------
# Kafka (Tansu) behaviour


def test_produce_consume_100_with_headers_in_a_group(
    kafka: LocalKafka, new_topic: Callable[[int], str], consumer_config: dict[str, Any]
) -> None:
    topic = new_topic(PARTITIONS)
    produce(kafka.bootstrap, topic, 100)
    consumer = KafkaConsumer(topic, **consumer_config)
    try:
        join_s, records = wait_assigned(consumer)
        records += drain(consumer, 100 - len(records))
        print(f"\ngroup join: {join_s:.2f} s (session_timeout 2 s)")
        assert join_s < 5
        assert len(records) == 100
        assert {r.value[:4] for r in records} == {i.to_bytes(4, "big") for i in range(100)}
        for r in records:
            i = int.from_bytes(r.value[:4], "big")
            head = dict(r.headers)
            assert head["frame_id"] == f"frame-{i}".encode() and head["camera_id"] == f"cam-{i % 3}".encode()
            assert head["content_type"] == b"image/jpeg" and int(head["ts"]) > 0
            assert r.key == f"cam-{i % 3}".encode() and r.partition == i % PARTITIONS
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        assert all(consumer.committed(tp) is None for tp in tps)
        commit(consumer)
        assert [consumer.committed(tp) for tp in tps] == [25] * PARTITIONS
        # Tansu's end offsets can fall short (start of the last record batch + 1): lag is approximate.
        ends = consumer.end_offsets(tps)
        assert all(0 < ends[tp] <= 25 for tp in tps), ends
    finally:
        consumer.close()


def test_committed_offsets_survive_a_consumer_restart(
    kafka: LocalKafka, new_topic: Callable[[int], str], consumer_config: dict[str, Any]
) -> None:
    topic = new_topic(PARTITIONS)
    produce(kafka.bootstrap, topic, 40)  # 10 per partition
    first = KafkaConsumer(topic, **consumer_config)
    try:
        records = drain(first, 40)
        assert len(records) == 40
        # Commit only the first 6 of each partition: 4 x 4 records stay uncommitted.
        commit(first, {TopicPartition(topic, p): OffsetAndMetadata(6, None, -1) for p in range(PARTITIONS)})
    finally:
        first.close()
    produce(kafka.bootstrap, topic, 8, start=40)  # 2 more per partition while no one consumes

    second = KafkaConsumer(topic, **consumer_config)
    try:
        again = drain(second, 24, idle=1.0)
        got = sorted((r.partition, r.offset) for r in again)
        assert got == sorted((p, o) for p in range(PARTITIONS) for o in range(6, 12)), got
        commit(second)
    finally:
        second.close()

    third = KafkaConsumer(topic, **consumer_config)
    try:
        _, leftover = wait_assigned(third)
        leftover += drain(third, timeout=1.5)
        assert leftover == []  # everything committed: no re-delivery
    finally:
        third.close()


class Member(threading.Thread):
    """A group member polling in its own thread (two members polled from one thread stall each other's
    rebalance: a poll blocks in JoinGroup until the other member rejoins, ~6 s instead of ~2 s)."""

    def __init__(self, topic: str, config: dict[str, Any], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.consumer = KafkaConsumer(topic, client_id=name, **config)
        self.records: list[ConsumerRecord] = []
        self.assigned: set[int] = set()
        self.closing = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.closing.is_set():
            polled = self.consumer.poll(timeout_ms=100)
            with self.lock:
                for batch in polled.values():
                    self.records.extend(batch)
                self.assigned = partitions(self.consumer.assignment())
                try:
                    if polled:
                        self.consumer.commit()
                except (CommitFailedError, RebalanceInProgressError):
                    pass  # the records will be delivered again to the partition's next owner
        self.consumer.close()

    def close(self) -> None:
        self.closing.set()
        self.join(10)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def test_two_members_split_partitions_and_one_closing_hands_over(
    kafka: LocalKafka, new_topic: Callable[[int], str], consumer_config: dict[str, Any]
) -> None:
    topic = new_topic(PARTITIONS)
    a = Member(topic, consumer_config, "member-a")
    b = Member(topic, consumer_config, "member-b")
    try:
        a.start()
        wait_for(lambda: a.assigned == set(range(PARTITIONS)), 10, "a to own all partitions")
        b.start()
        rebalance_s = wait_for(
            lambda: len(a.assigned) == len(b.assigned) == 2 and not a.assigned & b.assigned, 15, "a 2+2 split"
        )
        produce(kafka.bootstrap, topic, 40)
        wait_for(lambda: len(a.records) + len(b.records) >= 40, 10, "40 records")
        assert partitions(TopicPartition(topic, r.partition) for r in a.records) == a.assigned
        assert partitions(TopicPartition(topic, r.partition) for r in b.records) == b.assigned
        b.close()
        handover_s = wait_for(lambda: a.assigned == set(range(PARTITIONS)), 15, "a to take b's partitions")
        produce(kafka.bootstrap, topic, 8, start=40)
        wait_for(lambda: len(a.records) >= 20 + 8, 10, "a to consume the new records")
        print(f"\nrebalance on join: {rebalance_s:.2f} s, hand-over on close: {handover_s:.2f} s")
        assert len({(r.partition, r.offset) for r in a.records + b.records}) == 48
    finally:
        a.close()
        b.close()


VICTIM = """
import sys
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
bootstrap, topic, group = sys.argv[1:4]
c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, client_id="victim", enable_auto_commit=False,
                  auto_offset_reset="earliest", session_timeout_ms=2000, heartbeat_interval_ms=500)
seen = {}
while True:
    for tp, batch in c.poll(timeout_ms=100).items():
        seen[tp.partition] = seen.get(tp.partition, 0) + len(batch)
    mine = sorted(tp.partition for tp in c.assignment())
    if 0 < len(mine) < 4 and all(seen.get(p, 0) >= 10 for p in mine):
        break
c.commit({TopicPartition(topic, p): OffsetAndMetadata(5, None, -1) for p in mine})  # 5..9 left uncommitted
print("READY", *mine, flush=True)
while True:  # stay a live member (heartbeats) until SIGKILL
    c.poll(timeout_ms=100)
"""


def test_sigkilled_member_uncommitted_records_go_to_the_survivor(
    kafka: LocalKafka, new_topic: Callable[[int], str], consumer_config: dict[str, Any]
) -> None:
    topic = new_topic(PARTITIONS)
    produce(kafka.bootstrap, topic, 40)  # offsets 0..9 in each partition
    survivor = KafkaConsumer(topic, client_id="survivor", **consumer_config)
    victim: subprocess.Popen[str] | None = None
    try:
        wait_assigned(survivor)
        victim = subprocess.Popen(
            [sys.executable, "-c", VICTIM, kafka.bootstrap, topic, consumer_config["group_id"]],
            stdout=subprocess.PIPE,
            text=True,
        )
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(victim.stdout.readline() if victim.stdout else ""))
        reader.start()
        drain(survivor, timeout=30, until=lambda: not reader.is_alive())
        assert ready and ready[0].startswith("READY"), f"victim did not get ready: {ready}"
        theirs = {int(p) for p in ready[0].split()[1:]}
        ours = set(range(PARTITIONS)) - theirs
        # The survivor's own view of the assignment can lag the victim's by a poll or two.
        drain(survivor, timeout=10, until=lambda: partitions(survivor.assignment()) == ours)
        assert partitions(survivor.assignment()) == ours
        drain(survivor, timeout=10, until=lambda: all(survivor.position(TopicPartition(topic, p)) == 10 for p in ours))
        commit(survivor)

        killed = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        victim.wait(5)
        redelivered = drain(survivor, timeout=15, until=lambda: len(survivor.assignment()) == PARTITIONS)
        takeover_s = time.monotonic() - killed
        redelivered += drain(survivor, 4 * len(theirs) * 2, timeout=5, idle=1.0)
        print(f"\nSIGKILLed member's partitions reassigned after {takeover_s:.2f} s (session_timeout 2 s)")
        assert partitions(survivor.assignment()) == set(range(PARTITIONS))
        got = sorted((r.partition, r.offset) for r in redelivered)
        assert got == sorted((p, o) for p in theirs for o in range(5, 10)), got
        assert 1.5 < takeover_s < 10
    finally:
        if victim is not None and victim.poll() is None:
            victim.kill()
            victim.wait()
        survivor.close()


def test_a_3mb_frame_needs_max_request_size_on_the_producer_only(
    kafka: LocalKafka, new_topic: Callable[[int], str], consumer_config: dict[str, Any]
) -> None:
    topic = new_topic(1)
    frame = os.urandom(3 * MB)
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)  # max_request_size default: 1 MiB
    try:
        with pytest.raises(MessageSizeTooLargeError):
            producer.send(topic, frame).get(10)
    finally:
        producer.close()
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, max_request_size=8 * MB)
    try:
        producer.send(topic, frame, headers=headers_for(0)).get(10)  # the broker takes it as is
    finally:
        producer.close()
    # Consumer defaults (max_partition_fetch_bytes 1 MiB, fetch_max_bytes 50 MiB) still return it: a
    # batch larger than the limit is returned when it is the first one (KIP-74).
    consumer = KafkaConsumer(topic, **consumer_config)
    try:
        records = drain(consumer, 1)
        assert len(records) == 1 and records[0].value == frame
    finally:
        consumer.close()


def test_100kb_frames_throughput(
    kafka: LocalKafka, new_topic: Callable[[int], str], consumer_config: dict[str, Any]
) -> None:
    topic = new_topic(PARTITIONS)
    count = 200
    start = time.monotonic()
    produce(kafka.bootstrap, topic, count, size=100 * 1024, linger_ms=5)
    produce_s = time.monotonic() - start
    consumer = KafkaConsumer(topic, **consumer_config)
    try:
        join_s, records = wait_assigned(consumer)
        start = time.monotonic()
        records += drain(consumer, count - len(records), timeout=20)
        consume_s = time.monotonic() - start
    finally:
        consumer.close()
    assert len(records) == count
    total_mb = count * 100 / 1024
    print(
        f"\n{count} x 100 KB: produce {count / produce_s:.0f} msg/s ({total_mb / produce_s:.0f} MB/s), "
        f"consume after join {count / max(consume_s, 1e-3):.0f} msg/s (join {join_s:.2f} s)"
    )


def test_broker_restart_loses_data_but_recreates_topics() -> None:
    with LocalKafka() as broker:
        broker.create_topic("frames", PARTITIONS)
        # kafka-python 3's default idempotent producer cannot recover from a Tansu restart
        # (UnknownProducerId, then InitProducerId UnknownError forever): use enable_idempotence=False.
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False, acks="all")
        try:
            producer.send("frames", b"before", partition=0).get(10)
            start = time.monotonic()
            broker.restart()
            restart_s = time.monotonic() - start
            assert restart_s < 3, "SIGINT stops Tansu at once (SIGTERM drains connections for ~5 s)"
            admin = broker.admin()
            try:
                described = admin.describe_topics(["frames"])[0]
                assert len(described["partitions"]) == PARTITIONS
            finally:
                admin.close()
            producer.send("frames", b"after", partition=0).get(10)
        finally:
            producer.close()
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
        try:
            tp = TopicPartition("frames", 0)
            consumer.assign([tp])
            consumer.seek_to_beginning()
            assert [r.value for r in drain(consumer, 1, timeout=5)] == [b"after"]  # b"before" is gone
        finally:
            consumer.close()


# --------------------------------------------------------------------------------------------------
# Redis


def test_redis_without_persistence_starts_empty_after_restart(redis_server: LocalRedis) -> None:
    client = redis_server.client()
    client.set("k", "v")
    redis_server.restart()
    assert client.get("k") is None  # the client reconnects by itself (redis-py's default retries)
    client.close()


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_redis_restart_keeps_data_with_persistence(tmp_path: Path, kill: bool) -> None:
    with LocalRedis(persist_dir=tmp_path / "data") as server:
        client = server.client()
        client.xadd("inspectd:verdicts", {"frame_id": "f1", "score": "0.5"})
        client.set("inspectd:verdict:f1", "x", ex=3600)
        client.sadd("inspectd:buffer:cam-1", "f1")
        server.restart(kill=kill)  # appendfsync always: even SIGKILL keeps every acknowledged write
        assert client.xlen("inspectd:verdicts") == 1
        assert client.get("inspectd:verdict:f1") == b"x" and client.ttl("inspectd:verdict:f1") > 3000
        assert client.smembers("inspectd:buffer:cam-1") == {b"f1"}
        client.close()
    # A new instance on the same directory (another port) reopens the data.
    with LocalRedis(persist_dir=tmp_path / "data") as again:
        client = again.client()
        assert client.xlen("inspectd:verdicts") == 1
        client.close()

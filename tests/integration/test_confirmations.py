"""Operator confirmations against a real Redis: accepted into the buffer, rejected with a reason, never lost.

Frames and verdicts are written by the worker's own VerdictStore; confirmations are appended as an HMI
would (XADD) or with `inspectd confirm`. The last test runs the real worker against Tansu and Redis.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import redis
import test_worker

from cli.main import main
from daemon.config import ConfirmationsSection
from daemon.confirmations import (
    GROUP,
    NO_VERDICT,
    NOT_CACHED,
    AdaptationBuffer,
    ConfirmationProcessor,
    normal_entry,
    submit,
)
from daemon.frames import Frame
from daemon.store import Keys, Verdict, VerdictStore
from lab.services import LocalRedis, free_port

PREFIX = "t:"
KEYS = Keys(PREFIX)
CFG = ConfirmationsSection(buffer_max_frames=3, claim_min_idle_ms=100)

# The worker test reuses test_worker's broker and `Line` (topic, group, prefix, worker processes);
# the tiny model is conftest's.
broker = test_worker.broker
line = test_worker.line


@pytest.fixture
def store(client: redis.Redis) -> VerdictStore:
    return VerdictStore(client, KEYS, verdict_ttl_s=3600, frame_ttl_s=3600, stream_max_len=10_000)


@pytest.fixture
def buffer(client: redis.Redis) -> AdaptationBuffer:
    return AdaptationBuffer(client, KEYS)


def scored(store: VerdictStore, frame_id: str, camera: str = "cam-1", score: float = 2.0) -> bytes:
    """Write a verdict and cache the frame's bytes, as the worker does; returns the bytes."""
    data = f"bytes of {frame_id}".encode()
    frame = Frame(frame_id, camera, 1000, "image/png", data, "frames", 0, 0)
    store.write([Verdict(frame_id, camera, 1000, score, 1.0, score > 1.0, "v1", 5.0)], [frame])
    return data


def confirm(client: redis.Redis, frame_id: str, operator: str = "ana", note: str = "") -> str:
    return submit(client, KEYS, CFG, normal_entry(frame_id, operator, note))


def pending(client: redis.Redis) -> int:
    return client.xpending(KEYS.confirmations, GROUP)["pending"]


def rejected(client: redis.Redis) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()} for _, fields in client.xrange(KEYS.rejected_confirmations)
    ]


def test_accepted_confirmation_lands_in_the_buffer_and_is_acked(
    client: redis.Redis, store: VerdictStore, buffer: AdaptationBuffer
) -> None:
    data = scored(store, "f1", score=3.5)
    entry_id = confirm(client, "f1", note="new batch of cells")  # before any worker: the group starts at 0
    counts = ConfirmationProcessor(store, CFG, "w1").process(10)
    assert (counts.accepted, counts.duplicate, counts.rejected) == (1, 0, 0)
    [frame] = buffer.frames("cam-1", 10)
    assert (frame.frame_id, frame.data, frame.camera_id, frame.operator) == ("f1", data, "cam-1", "ana")
    assert (frame.note, frame.score, frame.model_version) == ("new batch of cells", 3.5, "v1")
    assert frame.confirmed_ms == int(entry_id.split("-")[0])
    assert buffer.size("cam-1") == 1 and buffer.contains("cam-1", "f1")
    assert pending(client) == 0 and rejected(client) == []


def test_bad_confirmations_are_recorded_as_rejected(
    client: redis.Redis, store: VerdictStore, buffer: AdaptationBuffer
) -> None:
    for frame_id in ("expired", "good-1", "good-2", "good-3", "good-4", "good-5"):
        scored(store, frame_id)
    client.pexpire(KEYS.frame("expired"), 1)  # the frame's TTL runs out; its verdict lives on
    while client.exists(KEYS.frame("expired")):
        time.sleep(0.005)
    bad = [
        ({"frame_id": "never-seen", "label": "normal", "operator": "ana"}, NO_VERDICT),
        ({"frame_id": "expired", "label": "normal", "operator": "ana"}, NOT_CACHED),
        ({"frame_id": "good-1", "label": "defect", "operator": "ana"}, "label 'defect' is not one of: normal"),
        ({"frame_id": "good-2", "operator": "ana"}, "label '' is not one of: normal"),
        ({"frame_id": "good-3", "label": "normal"}, "operator is missing"),
        ({"frame_id": "good-4", "label": "normal", "operator": "  "}, "operator is missing"),
        ({"frame_id": "good-5", "label": "normal", "operator": "x" * 65}, "operator is longer than 64 characters"),
        ({"frame_id": "good-5", "label": "normal", "operator": "ana", "note": "n" * 501}, "note is longer than 500"),
        ({"label": "normal", "operator": "ana"}, "frame_id is missing"),
    ]
    ids = [client.xadd(KEYS.confirmations, entry).decode() for entry, _ in bad]
    counts = ConfirmationProcessor(store, CFG, "w1").process(100)
    assert (counts.accepted, counts.rejected) == (0, len(bad))
    records = rejected(client)
    assert [r["entry_id"] for r in records] == ids
    for record, (entry, reason) in zip(records, bad, strict=True):
        assert record["reason"].startswith(reason)
        assert record["frame_id"] == entry.get("frame_id", "")
        assert record["operator"] == entry.get("operator", "")
    assert pending(client) == 0
    assert buffer.size("cam-1") == 0


def test_buffer_keeps_the_newest_confirmations(
    client: redis.Redis, store: VerdictStore, buffer: AdaptationBuffer
) -> None:
    processor = ConfirmationProcessor(store, CFG, "w1")
    for i in range(5):
        scored(store, f"f{i}")
        confirm(client, f"f{i}")
        time.sleep(0.002)  # distinct confirmation times (entry ids' ms)
    assert processor.process(10).accepted == 5
    assert [f.frame_id for f in buffer.frames("cam-1", 10)] == ["f4", "f3", "f2"]
    assert client.hlen(KEYS.buffer_data("cam-1")) == client.hlen(KEYS.buffer_meta("cam-1")) == 3
    assert [f.frame_id for f in buffer.frames("cam-1", 2)] == ["f4", "f3"]
    assert buffer.trim("cam-1", 1) == 2
    assert [f.frame_id for f in buffer.frames("cam-1", 10)] == ["f4"]
    assert buffer.trim("cam-1", 0) == 1
    assert buffer.size("cam-1") == 0 and client.hlen(KEYS.buffer_data("cam-1")) == 0


def test_duplicate_confirmation_is_idempotent(
    client: redis.Redis, store: VerdictStore, buffer: AdaptationBuffer
) -> None:
    scored(store, "f1")
    scored(store, "f2", camera="cam-2")
    confirm(client, "f1", operator="ana")
    confirm(client, "f1", operator="bo")
    confirm(client, "f2")
    counts = ConfirmationProcessor(store, CFG, "w1").process(10)
    assert (counts.accepted, counts.duplicate, counts.rejected) == (2, 1, 0)
    assert [f.operator for f in buffer.frames("cam-1", 10)] == ["ana"]
    assert buffer.size("cam-2") == 1
    assert pending(client) == 0 and rejected(client) == []


def test_entries_of_a_dead_consumer_are_claimed_once(
    client: redis.Redis, store: VerdictStore, buffer: AdaptationBuffer
) -> None:
    survivor = ConfirmationProcessor(store, CFG, "survivor")
    survivor.process(10)  # creates the group
    scored(store, "f1")
    confirm(client, "f1")
    [[_, [(entry_id, fields)]]] = client.xreadgroup(GROUP, "dead", {KEYS.confirmations: ">"})  # then it died
    assert survivor.process(10).total == 0  # not idle long enough yet: the owner may still be working
    time.sleep(CFG.claim_min_idle_ms / 1000 + 0.05)
    assert survivor.process(10).accepted == 1
    assert pending(client) == 0 and buffer.size("cam-1") == 1
    # The presumed-dead worker wakes up and finishes its entry: the script sees it no longer owns it.
    late = ConfirmationProcessor(store, CFG, "dead")
    assert late._handle(entry_id.decode(), fields) == "stale"
    assert buffer.size("cam-1") == 1 and rejected(client) == []


@pytest.fixture
def cli_env(redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("INSPECTD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("INSPECTD_REDIS__URL", redis_server.url)
    monkeypatch.setenv("INSPECTD_REDIS__KEY_PREFIX", PREFIX)


@pytest.mark.usefixtures("cli_env")
def test_cli_confirm_and_review(
    client: redis.Redis, store: VerdictStore, buffer: AdaptationBuffer, capsys: pytest.CaptureFixture[str]
) -> None:
    scored(store, "low", score=0.5)
    scored(store, "high", score=4.0)
    scored(store, "mid", score=2.0, camera="cam-2")
    scored(store, "gone", score=3.0)
    client.delete(KEYS.frame("gone"))

    assert main(["review", "--json"]) == 0
    review = json.loads(capsys.readouterr().out)
    assert [r["frame_id"] for r in review["frames"]] == ["high", "gone", "mid"]  # above threshold, top first
    assert [r["cached"] for r in review["frames"]] == [True, False, True]
    assert review["buffers"] == {"cam-1": 0, "cam-2": 0}

    assert main(["confirm", "high", "mid", "high", "--operator", "ana", "--note", "lamp replaced"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1] for line in out] == ["high", "mid"]
    assert [line.split("\t")[0] for line in out] == [e.decode() for e, _ in client.xrange(KEYS.confirmations)]
    assert main(["confirm", "gone", "--operator", "ana"]) == 0
    assert "frame gone is not cached" in capsys.readouterr().err

    assert main(["confirm", "high", "--operator", " "]) == 2
    assert "argument --operator: operator is missing" in capsys.readouterr().err
    assert main(["confirm", "high", "--operator", "ana", "--note", "n" * 501]) == 2
    assert "argument --note" in capsys.readouterr().err
    assert client.xlen(KEYS.confirmations) == 3

    counts = ConfirmationProcessor(store, CFG, "w1").process(10)
    assert (counts.accepted, counts.rejected) == (2, 1)
    assert buffer.frames("cam-1", 10)[0].note == "lamp replaced"

    assert main(["review", "--camera", "cam-1", "--all"]) == 0
    text = capsys.readouterr().out
    assert "3 verdicts among the last 1000 verdicts of cam-1" in text
    assert "high\tcam-1\t4.0000\t1.0000\tANOMALOUS\tv1\tyes\tyes" in text
    assert "low\tcam-1\t0.5000\t1.0000\tnormal\tv1\tyes\tno" in text
    assert "adaptation buffers: cam-1 1/50" in text


def test_cli_reports_an_unreachable_redis(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for key in [k for k in os.environ if k.startswith("INSPECTD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("INSPECTD_REDIS__URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["confirm", "f1", "--operator", "ana"]) == 1
    assert "Redis" in capsys.readouterr().err


def test_worker_moves_a_scored_and_confirmed_frame_into_the_buffer(
    line: test_worker.Line, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # these random frames score far below the threshold: only a sample of such frames is cached ([redis]
    # cache_sample_every), here every one, so that the frame confirmed is still cached
    line.env["INSPECTD_REDIS__CACHE_SAMPLE_EVERY"] = "1"
    _, port = line.start_worker()
    test_worker.wait_ready(port)
    ids = line.send(4)
    line.wait_verdicts(4)
    for key, value in line.env.items():
        if key.startswith("INSPECTD_"):
            monkeypatch.setenv(key, value)
    assert main(["confirm", ids[0], "--operator", "ana"]) == 0
    buffer = AdaptationBuffer(line.redis, Keys(line.prefix))
    deadline = time.monotonic() + 30
    while not buffer.size("cam-0") and time.monotonic() < deadline:
        time.sleep(0.1)
    [frame] = buffer.frames("cam-0", 10)
    assert (frame.frame_id, frame.data, frame.operator) == (ids[0], test_worker.png(0), "ana")
    accepted = b'inspectd_confirmations_total{outcome="accepted"} 1.0'
    while accepted not in test_worker.get(port, "/metrics")[1] and time.monotonic() < deadline:
        time.sleep(0.1)  # counted right after the buffer write
    assert accepted in test_worker.get(port, "/metrics")[1]

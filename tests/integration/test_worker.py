"""The streaming worker against a real Kafka-protocol broker (Tansu) and a real Redis server.

Workers run as subprocesses (`inspectd run`), so they can be SIGKILLed and SIGTERMed like in
production. Each test uses its own topic, consumer group and Redis key prefix.
"""

from __future__ import annotations

import io
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from worker_line import Line, frame_headers, get, png, wait_metric, wait_ready

from daemon.config import RedisSection
from daemon.store import Verdict
from lab.services import LocalKafka, LocalRedis


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalKafka]:
    with LocalKafka() as kafka:
        yield kafka


@pytest.fixture
def line(broker: LocalKafka, model_dir: Path, tmp_path: Path) -> Iterator[Line]:
    with LocalRedis() as server:
        line = Line(broker, server.url, model_dir, tmp_path)
        yield line
        line.close()


def test_n_frames_give_n_verdicts_and_sigterm_drains(line: Line) -> None:
    proc, port = line.start_worker()
    wait_ready(port)
    assert get(port, "/healthz")[0] == 200
    ids = line.send(60)
    assert sorted(line.wait_verdicts(60)) == sorted(ids)
    verdict = json.loads(line.redis.get(f"{line.prefix}verdict:{ids[0]}"))
    assert verdict["model_version"] and verdict["camera_id"] == "cam-0"
    assert verdict["anomalous"] == (verdict["score"] > verdict["threshold"])
    # only frames an operator may confirm are cached (near or over the threshold, a sample): most of these
    # random frames score far below it
    policy = RedisSection().cache_policy()
    kept = [policy.reason(Verdict(**json.loads(line.redis.get(f"{line.prefix}verdict:{i}")))) for i in ids]
    cached = [line.redis.exists(f"{line.prefix}frame:{i}") == 1 for i in ids]
    assert cached == [reason is not None for reason in kept] and not all(cached), kept
    wait_metric(port, b'inspectd_frames_total{outcome="scored"} 60.0')
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert line.committed_total() == 60
    assert sorted(line.verdict_ids()) == sorted(ids)


def test_sigkill_mid_stream_gives_exactly_one_verdict_each(line: Line) -> None:
    proc, port = line.start_worker()
    wait_ready(port)
    ids = line.send(200)
    line.wait_verdicts(16)
    proc.kill()
    proc.wait()
    partial = len(line.verdict_ids())
    line.start_worker()
    line.wait_verdicts(200)
    time.sleep(2)  # anything re-delivered would show up as a duplicate by now
    got = line.verdict_ids()
    assert partial < 200, "the worker finished before it was killed: the test proved nothing"
    assert len(got) == len(set(got)) == 200
    assert set(got) == set(ids)


def test_bad_frames_go_to_the_dlq_while_good_ones_flow(line: Line) -> None:
    _, port = line.start_worker()
    wait_ready(port)
    good = line.send(10)
    line.producer.send(line.topic, key=b"cam-1", value=b"\x89PNG\r\n\x1a\nnot really", headers=frame_headers("corrupt"))
    huge = Image.new("L", (8000, 7000))  # 56 Mpixel, a few KB as PNG: a decompression bomb
    buffer = io.BytesIO()
    huge.save(buffer, format="PNG")
    line.producer.send(line.topic, key=b"cam-1", value=buffer.getvalue(), headers=frame_headers("huge"))
    line.producer.send(line.topic, key=None, value=png(2))
    line.producer.flush()
    good += line.send(10, start=100)
    assert sorted(line.wait_verdicts(20)) == sorted(good)
    letters = {h.get("frame_id", "none"): h for h in line.dead_letters(3)}
    assert {k: h["reason"] for k, h in letters.items()} == {
        "corrupt": "undecodable",
        "huge": "too_many_pixels",
        "none": "missing_header",
    }
    assert "pixels exceeds" in letters["huge"]["detail"]
    assert "missing header" in letters["none"]["detail"]
    wait_metric(port, b'inspectd_frames_total{outcome="dead_lettered"} 3.0')


def test_redis_outage_loses_nothing(broker: LocalKafka, model_dir: Path, tmp_path: Path) -> None:
    with LocalRedis(persist_dir=tmp_path / "redis-data") as server:
        line = Line(broker, server.url, model_dir, tmp_path)
        try:
            _, port = line.start_worker()
            wait_ready(port)
            ids = line.send(30)
            line.wait_verdicts(30)
            server.stop()
            ids += line.send(30, start=30)
            deadline = time.monotonic() + 30
            while get(port, "/readyz")[0] == 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert get(port, "/readyz")[0] == 503
            server.start()
            got = line.wait_verdicts(60)
            assert len(got) == len(set(got)) == 60 and set(got) == set(ids)
            wait_ready(port)
        finally:
            line.close()


def _batches(line: Line, worker: int) -> int:
    return (line.tmp_path / f"worker{worker}.log").read_text().count('"event": "batch"')


def test_two_workers_share_partitions_and_survive_one_dying(line: Line) -> None:
    a, port_a = line.start_worker()
    _, port_b = line.start_worker()
    wait_ready(port_a)
    wait_ready(port_b)
    ids = line.send(120)
    line.wait_verdicts(24)
    # both must have scored before one dies (a worker's first batch also loads its camera's model)
    deadline = time.monotonic() + 60
    while not all(_batches(line, i) for i in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.2)
    a.kill()
    a.wait()
    ids += line.send(60, start=120)
    line.wait_verdicts(180)
    time.sleep(2)
    got = line.verdict_ids()
    assert len(got) == len(set(got)) == 180 and set(got) == set(ids)
    assert _batches(line, 0) > 0 and _batches(line, 1) > 0

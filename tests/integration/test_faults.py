"""Faults that must not stop or corrupt the line (real Tansu, real Redis, `inspectd run` as a subprocess).

Each bad record is followed, in the same partition, by a valid frame. After each: the worker is alive,
the bad record is in the DLQ with its reason code (and source `topic:partition:offset`), the valid frame
behind it got its verdict, and no frame got two verdicts. One worker serves the whole parametrised
suite (a worker start costs seconds); should a case kill it, the next case starts another.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
import signal
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from kafka import KafkaProducer
from PIL import Image, PngImagePlugin
from worker_line import ROOT, Line, frame_headers, get, make_model_dir, png, wait_ready

from csflow.artifacts import ArtifactError, Manifest, load_model
from daemon.config import load_settings
from daemon.drift_watch import DriftWatch
from daemon.events import EventLog
from daemon.registry import ModelRegistry, RegistryError
from daemon.store import Keys
from daemon.worker import Worker
from lab.services import LocalKafka, LocalRedis

LINGER_MS = 5000  # keeps a test producer's batch open until flush()
BATCH_BYTES = 1024 * 1024
SETTLE_S = 1.0  # after the last verdict: anything redelivered would show up as a duplicate by now
DEAD_BROKER = "127.0.0.1:9"  # discard port: nothing listens
STOP_WITHIN_S = 20.0  # SIGTERM to exit, interpreter teardown included (seconds under load), < the drain timeout
DRAIN_TIMEOUT_S = "60"
BAD_CAMERA = "c*:\n" * 15  # measured: became the Redis key inspectd:drift:c*:\nc*:\n...
DOWNTIME_S = 1.0
HANG_S = 6.0  # a decode hang, longer than the 2 s max_poll_interval_ms of its test


@dataclass
class Shop:
    """The suite's line and its one worker (restarted if a case killed it)."""

    line: Line
    proc: Any = None
    port: int = 0
    good_ids: list[str] = field(default_factory=list)

    def worker(self) -> tuple[Any, int]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc, self.port = self.line.start_worker()
            wait_ready(self.port)
        return self.proc, self.port


@pytest.fixture(scope="module")
def shop(kafka: LocalKafka, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path_factory.mktemp("faults"))
        # every frame cached (by default only a sample of those far below the threshold): a reused frame id
        # must leave the first frame's cached bytes in place
        line.env["INSPECTD_REDIS__CACHE_SAMPLE_EVERY"] = "1"
        yield Shop(line)
        line.close()


# ---------------------------------------------------------------------------------------------- bad records


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def short_ihdr_png() -> bytes:
    """37 bytes: Pillow raises a plain ValueError ("Truncated IHDR chunk"), not an image error."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", b"\x00\x00\x00\x10\x00") + _chunk(b"IEND", b"")


def ztxt_bomb_png() -> bytes:
    """A 3 KB PNG whose compressed text chunk inflates to 3 MB (over Pillow's MAX_TEXT_CHUNK)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("note", "a" * (3 * 1024 * 1024), zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class _NullValue(tuple):
    """A header whose value is null on the wire: kafka-python's producer refuses None values, so this
    passes its check with b"" and writes the real None."""

    def __getitem__(self, i: Any) -> Any:
        return b"" if i == 1 else tuple.__getitem__(self, i)


class _RawName(str):
    """A header name that is not UTF-8 on the wire (kafka-python encodes names with `.encode`)."""

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        return b"\xff\xfe-name"


def _send(line: Line, camera: str, value: bytes | None, headers: list[Any]) -> tuple[int, int]:
    """Send one record in a batch of its own; its partition and offset."""
    if any(isinstance(h, _NullValue) for h in headers):
        return _send_null_header(line, camera, value, headers)
    future = line.producer.send(line.topic, key=camera.encode(), value=value, headers=headers)
    line.producer.flush()
    meta = future.get(timeout=10)
    return meta.partition, meta.offset


def _send_null_header(line: Line, camera: str, value: bytes | None, headers: list[Any]) -> tuple[int, int]:
    """kafka-python's size bookkeeping raises on a null header value after the record is written into an
    open batch: a valid frame (`lead-<camera>`, scored too) opens the batch, held open by linger_ms and
    large enough for both (a batch opened for the bad record itself would be dropped with the error)."""
    producer = KafkaProducer(bootstrap_servers=line.broker.bootstrap, linger_ms=LINGER_MS, batch_size=BATCH_BYTES)
    try:
        key = camera.encode()
        lead = producer.send(line.topic, key=key, value=png(8), headers=frame_headers(f"lead-{camera}", camera))
        with contextlib.suppress(TypeError):
            producer.send(line.topic, key=key, value=value, headers=headers)
        producer.flush()
        meta = lead.get(timeout=10)
    finally:
        producer.close()
    return meta.partition, meta.offset + 1


def _headers(*extra: Any) -> Callable[[str], list[Any]]:
    return lambda camera: [*frame_headers(f"bad-{camera}", camera), *extra]


@dataclass(frozen=True)
class Case:
    name: str
    value: bytes | None
    headers: Callable[[str], list[Any]]
    reason: str
    cut: bool = False  # the dead letter says that something was cut
    key: str | None = None  # the bad record's Kafka key (default: the case's camera)


CASES = [
    Case("short_ihdr_png", short_ihdr_png(), _headers(), "decode_error"),
    Case("ztxt_bomb_png", ztxt_bomb_png(), _headers(), "decode_error"),
    Case("null_header_value", png(1), _headers(_NullValue(("note", None))), "bad_header", cut=True),
    Case("non_utf8_header_name", png(2), _headers((_RawName("n"), b"1")), "unreadable_record"),
    Case("5mb_header", png(3), _headers(("note", b"x" * 5_000_000)), "bad_header", cut=True),
    Case("1000_headers", png(4), _headers(*[(f"h{i}", b"v") for i in range(1000)]), "bad_header", cut=True),
    Case("tombstone", None, lambda camera: [], "empty_frame"),
    Case("bad_camera_id", png(5), lambda c: frame_headers(f"bad-{c}", BAD_CAMERA), "bad_id", key=BAD_CAMERA),
    Case("frame_id_too_long", png(5), lambda c: frame_headers("f" * 129, c), "bad_id"),
    Case("frame_id_with_slash", png(5), lambda c: frame_headers("a/b*", c), "bad_id"),
    Case("key_header_mismatch", png(5), lambda c: frame_headers(f"bad-{c}", "cam-other"), "camera_mismatch"),
]


def _dead_letter(line: Line, source: str, timeout: float = 30.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in line.dead_records(10_000, timeout=2.0):
            headers = {k: v.decode(errors="replace") for k, v in record.headers}
            if headers.get("source") == source:
                return headers
    raise AssertionError(f"no dead letter from {source}\n{line.logs()}")


def _wait_verdict(line: Line, frame_id: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if line.redis.exists(f"{line.prefix}verdict:{frame_id}"):
            return
        time.sleep(0.1)
    raise AssertionError(f"no verdict for {frame_id} after {timeout} s\n{line.logs()}")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_record_is_dead_lettered_and_the_frame_behind_it_scored(shop: Shop, case: Case) -> None:
    proc, port = shop.worker()
    line = shop.line
    camera = f"cam-{case.name}"
    bad = _send(line, case.key or camera, case.value, case.headers(camera))
    good_id = f"good-{case.name}"
    meta = line.producer.send(line.topic, key=camera.encode(), value=png(7), headers=frame_headers(good_id, camera))
    meta = meta.get(timeout=10)
    shop.good_ids.append(good_id)
    _wait_verdict(line, good_id)
    letter = _dead_letter(line, "{}:{}:{}".format(line.topic, *bad))
    assert letter["reason"] == case.reason, letter
    assert ("cut" in letter) == case.cut, letter
    assert proc.poll() is None and get(port, "/healthz")[0] == 200
    assert _wait_metric(port, f'inspectd_bad_frames_total{{reason="{case.reason}"}}', 1.0) >= 1.0


def test_a_reused_frame_id_with_other_bytes_is_dead_lettered_and_the_first_kept(shop: Shop) -> None:
    proc, port = shop.worker()
    line = shop.line
    first, second = png(11), png(12)
    _send(line, "cam-reuse", first, frame_headers("reused-1", "cam-reuse"))
    shop.good_ids.append("reused-1")
    verdict = _verdict(line, "reused-1")
    again = _send(line, "cam-reuse", second, frame_headers("reused-1", "cam-reuse"))
    _send(line, "cam-reuse", png(13), frame_headers("reused-next", "cam-reuse"))
    shop.good_ids.append("reused-next")
    _wait_verdict(line, "reused-next")
    letter = _dead_letter(line, "{}:{}:{}".format(line.topic, *again))
    assert letter["reason"] == "duplicate_frame_id" and letter["frame_id"] == "reused-1"
    assert _verdict(line, "reused-1") == verdict and verdict["frame_sha256"] == hashlib.sha256(first).hexdigest()
    assert line.redis.get(f"{line.prefix}frame:reused-1") == first
    assert line.verdict_ids().count("reused-1") == 1
    assert proc.poll() is None
    assert _wait_metric(port, 'inspectd_bad_frames_total{reason="duplicate_frame_id"}', 1.0) == 1.0


def _registry(line: Line) -> ModelRegistry:
    keys = Keys(line.prefix)
    return ModelRegistry(line.redis, keys, EventLog(line.redis, keys, 1000), 1 << 20, 10, {})


def _verdict(line: Line, frame_id: str) -> dict[str, Any]:
    _wait_verdict(line, frame_id)
    return json.loads(line.redis.get(f"{line.prefix}verdict:{frame_id}"))


def test_a_model_that_outputs_nan_judges_every_frame_anomalous(
    shop: Shop, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`nan > threshold` is False: without a check, a broken model passes every part as normal."""
    _, port = shop.worker()
    line = shop.line
    registry = _registry(line)
    broken = registry.publish(make_model_dir(tmp_path_factory.mktemp("nan-model"), nan_weights=True))
    registry.activate("camera:cam-nan", broken.version)
    # A new camera's first frames are scored by the default version while its own loads (beside the loop):
    # one frame makes the worker load it, the next is scored by it.
    line.producer.send(line.topic, key=b"cam-nan", value=png(8), headers=frame_headers("nan-0", "cam-nan"))
    line.producer.flush()
    shop.good_ids.append("nan-0")
    deadline = time.monotonic() + 60
    while f'camera_id="cam-nan",version="{broken.version}"' not in get(port, "/metrics")[1].decode():
        assert time.monotonic() < deadline, line.logs()
        time.sleep(0.2)
    line.producer.send(line.topic, key=b"cam-nan", value=png(9), headers=frame_headers("nan-1", "cam-nan"))
    line.producer.flush()
    shop.good_ids.append("nan-1")
    verdict = _verdict(line, "nan-1")
    assert verdict["model_version"] == broken.version
    assert verdict["anomalous"] is True and verdict["flag"] == "non_finite_score", verdict
    assert _wait_metric(port, "inspectd_non_finite_scores_total", 1.0) == 1.0


def _version_with_threshold(model_dir: Path, out_dir: Path, threshold: str) -> tuple[str, str]:
    """A copy of `model_dir` whose manifest's threshold is `threshold` (JSON text); its id and manifest."""
    shutil.copytree(model_dir, out_dir)
    data = json.loads((out_dir / "manifest.json").read_text())
    try:
        data["calibration"]["threshold"] = "NaN"  # a string: hashes, and float() of it is nan
        data["version"] = Manifest(**data).content_hash()
    finally:
        text = json.dumps(data).replace('"threshold": "NaN"', f'"threshold": {threshold}')
    (out_dir / "manifest.json").write_text(text)
    return data["version"], text


@pytest.mark.parametrize("threshold", ['"NaN"', "1e999"], ids=["nan_string", "json_infinity"])
def test_a_version_with_a_non_finite_threshold_is_refused_and_never_served(
    shop: Shop, model_dir: Path, tmp_path: Path, threshold: str
) -> None:
    """Publishing refuses it; one written into the registry by other means and activated in `default` is
    not loaded (counted), and every camera keeps its version."""
    proc, port = shop.worker()
    line = shop.line
    registry = _registry(line)
    version, manifest = _version_with_threshold(model_dir, tmp_path / "bad-threshold", threshold)
    with pytest.raises((RegistryError, ArtifactError, ValueError)):
        registry.publish(tmp_path / "bad-threshold")
    line.redis.hset(
        f"{line.prefix}model:{version}", mapping={"manifest": manifest, "path": str(tmp_path / "bad-threshold")}
    )
    line.redis.zadd(f"{line.prefix}model-versions", {version: 0})
    if threshold == "1e999":  # it cannot be hashed: `models show` and the console get a registry error, not a crash
        with pytest.raises(RegistryError, match=r"stored manifest is not valid"):
            registry.manifest(version)
    tag = threshold.strip('"')
    # a camera the worker serves from `default` before the activation (when run alone, no other test made one)
    line.producer.send(
        line.topic, key=b"cam-tombstone", value=png(4), headers=frame_headers(f"before-{tag}", "cam-tombstone")
    )
    line.producer.flush()
    shop.good_ids.append(f"before-{tag}")
    _verdict(line, f"before-{tag}")
    failures = _metric(port, "inspectd_model_load_failures_total")
    registry.activate("default", version)
    try:
        deadline = time.monotonic() + 30
        while _metric(port, "inspectd_model_load_failures_total") <= failures and time.monotonic() < deadline:
            assert proc.poll() is None, line.logs()
            time.sleep(0.2)
        assert _metric(port, "inspectd_model_load_failures_total") > failures, line.logs()
        for frame_id, camera in ((f"served-{tag}", "cam-tombstone"), (f"new-{tag}", f"cam-new-{tag}")):
            line.producer.send(line.topic, key=camera.encode(), value=png(5), headers=frame_headers(frame_id, camera))
            line.producer.flush()
            shop.good_ids.append(frame_id)
            verdict = _verdict(line, frame_id)
            assert verdict["model_version"] != version and math.isfinite(verdict["threshold"]), verdict
        assert proc.poll() is None
    finally:
        registry.rollback("default")


def _wait_metric(port: int, name: str, at_least: float, timeout: float = 10.0) -> float:
    """The metric once it reaches `at_least` (metrics are updated after the batch's verdicts are written)."""
    deadline = time.monotonic() + timeout
    while (value := _metric(port, name)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def _metric(port: int, name: str) -> float:
    for line in get(port, "/metrics")[1].decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_every_good_frame_got_exactly_one_verdict(shop: Shop) -> None:
    assert shop.good_ids, "run with the parametrised cases"
    time.sleep(SETTLE_S)
    got = shop.line.verdict_ids()
    assert len(got) == len(set(got))
    assert set(shop.good_ids) <= set(got)


# ---------------------------------------------------------------------------------------------- the DLQ refuses


def test_a_dlq_that_refuses_for_good_fails_readiness_and_the_line_goes_on(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path
) -> None:
    """A DLQ topic name over Kafka's 249 characters: every dead letter is refused, as one over the topic's
    max.message.bytes or without WRITE permission would be on Apache Kafka (Tansu enforces neither)."""
    with LocalRedis() as server:
        topic = "f" * 240 + uuid.uuid4().hex[:6]  # + ".dlq": 250 characters
        line = Line(kafka, server.url, model_dir, tmp_path, topic=topic)
        try:
            proc, port = line.start_worker()
            wait_ready(port)
            bad = _send(line, "cam-1", b"not an image", frame_headers("bad", "cam-1"))
            line.producer.send(line.topic, key=b"cam-1", value=png(1), headers=frame_headers("good", "cam-1"))
            line.producer.flush()
            _wait_verdict(line, "good")
            deadline = time.monotonic() + 20
            while get(port, "/readyz")[0] == 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            status, body = get(port, "/readyz")
            assert status == 503 and b"dlq" in body and b"refuses" in body, body
            _, metrics = get(port, "/metrics")
            assert b'inspectd_dead_letters_refused_total{error="ValueError"} 1.0' in metrics
            deadline = time.monotonic() + 10  # noted in Redis right after /readyz turns
            while (
                not (noted := line.redis.xrange(f"{line.prefix}dead-letters:refused")) and time.monotonic() < deadline
            ):
                time.sleep(0.1)
            assert [(f[b"source"], f[b"reason"]) for _, f in noted] == [
                ("{}:{}:{}".format(topic, *bad).encode(), b"undecodable")
            ]
            assert proc.poll() is None
        finally:
            line.close()


# ---------------------------------------------------------------------------------------------- Redis outages


@dataclass
class InProcess:
    """A worker running in a thread of the test process (so that a fault can be injected at an exact call)."""

    worker: Worker
    outcome: dict[str, Any] = field(default_factory=dict)  # "rc", or "error": what run() raised

    @property
    def port(self) -> int:
        deadline = time.monotonic() + 60
        while self.worker.http_port is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.worker.http_port is not None
        return self.worker.http_port


@contextlib.contextmanager
def in_process(line: Line, model_dir: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> Iterator[InProcess]:
    """The worker of `line` in a thread; stopped (and its exit status checked by the caller) on leaving."""
    for key, value in {**line.env, "INSPECTD_WORKER__HTTP_PORT": "0", **env}.items():
        if key.startswith("INSPECTD_"):
            monkeypatch.setenv(key, value)
    running = InProcess(Worker(load_settings(ROOT / "config.toml"), load_model(model_dir, "cpu"), torch.device("cpu")))

    def run() -> None:
        try:
            running.outcome["rc"] = running.worker.run()
        except BaseException as exc:  # the fault under test: the loop must not raise
            running.outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield running
    finally:
        running.worker.request_stop()
        thread.join(30)


def test_redis_restart_during_a_cameras_first_batch(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis dies right when the worker reads a camera's saved drift state (its first batch) and comes back
    a second later: the worker retries, it does not crash. The worker runs in this process so that the
    kill lands at that exact call."""
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        restore = DriftWatch._restore
        killed = threading.Event()

        def dying_restore(self: DriftWatch, camera: str, version: Any) -> Any:
            if not killed.is_set():
                server.stop(kill=True)
                killed.set()
            return restore(self, camera, version)

        monkeypatch.setattr(DriftWatch, "_restore", dying_restore)
        try:
            with in_process(line, model_dir, monkeypatch) as running:
                ids = line.send(8)
                deadline = time.monotonic() + 90
                got: list[str] = []
                while time.monotonic() < deadline and "error" not in running.outcome and len(got) < 8:
                    if killed.is_set() and not server.running:
                        time.sleep(DOWNTIME_S)
                        server.start()  # from this thread: the server dies with the thread that started it
                    with contextlib.suppress(redis.ConnectionError):
                        got = line.verdict_ids()
                    time.sleep(0.2)
                assert killed.is_set(), "the fault was not injected"
                assert "error" not in running.outcome, repr(running.outcome.get("error"))
                assert sorted(got) == sorted(ids)
        finally:
            line.close()
        assert running.outcome.get("rc") == 0


def test_healthz_fails_while_the_loop_makes_no_progress(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode that hangs (longer than max_poll_interval_ms) makes /healthz fail until the loop moves."""
    decode = Worker._decode

    def hanging_decode(self: Worker, frame: Any, size: int) -> Any:
        if frame.frame_id == "hang":
            time.sleep(HANG_S)
        return decode(self, frame, size)

    monkeypatch.setattr(Worker, "_decode", hanging_decode)
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        try:
            with in_process(line, model_dir, monkeypatch, INSPECTD_KAFKA__MAX_POLL_INTERVAL_MS="2000") as running:
                wait_ready(running.port)
                assert get(running.port, "/healthz")[0] == 200
                line.producer.send(line.topic, key=b"cam-1", value=png(1), headers=frame_headers("hang", "cam-1"))
                line.producer.flush()
                seen = set()
                deadline = time.monotonic() + 60
                while not line.redis.exists(f"{line.prefix}verdict:hang") and time.monotonic() < deadline:
                    seen.add(get(running.port, "/healthz")[0])
                    time.sleep(0.2)
                assert seen >= {503}, seen
                _wait_verdict(line, "hang")
                # The verdict is written before the batch's commit and the loop's next beat: wait for the beat.
                deadline = time.monotonic() + 30
                while get(running.port, "/healthz")[0] != 200 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert get(running.port, "/healthz")[0] == 200
        finally:
            line.close()
        assert running.outcome.get("rc") == 0


# ---------------------------------------------------------------------------------------------- health


def test_kafka_down_redis_up_reports_only_kafka_and_a_stop_exits_at_once(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path
) -> None:
    """Each service's readiness is its own (Redis was only pinged after Kafka connected), and SIGTERM while
    the worker waits for a broker, with nothing in flight, exits 0 at once (it took the drain timeout and
    exited 1)."""
    with LocalRedis() as server:
        env = {"INSPECTD_KAFKA__BOOTSTRAP_SERVERS": DEAD_BROKER, "INSPECTD_WORKER__DRAIN_TIMEOUT_S": DRAIN_TIMEOUT_S}
        line = Line(kafka, server.url, model_dir, tmp_path, env=env)
        try:
            proc, port = line.start_worker()
            deadline = time.monotonic() + 60
            reasons: dict[str, str] = {}
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    status, body = get(port, "/readyz")
                    reasons = json.loads(body)["reasons"] if status == 503 else {}
                    if set(reasons) == {"kafka"} and "bootstrap" in reasons["kafka"]:
                        break
                time.sleep(0.2)
            assert set(reasons) == {"kafka"} and "bootstrap" in reasons["kafka"], f"{reasons}\n{line.logs()}"
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=STOP_WITHIN_S) == 0
            assert time.monotonic() - started < STOP_WITHIN_S
        finally:
            line.close()


def test_per_camera_metric_series_are_capped(kafka: LocalKafka, model_dir: Path, tmp_path: Path) -> None:
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path, env={"INSPECTD_WORKER__MAX_CAMERA_SERIES": "3"})
        try:
            _, port = line.start_worker()
            wait_ready(port)
            cameras = [f"cam-s{i}" for i in range(12)]
            for i, camera in enumerate(cameras):
                line.producer.send(
                    line.topic, key=camera.encode(), value=png(i), headers=frame_headers(f"s{i}", camera)
                )
            line.producer.flush()
            line.wait_verdicts(len(cameras))
            labels = _camera_labels(port, ("inspectd_model_info", "inspectd_drift_alarm"))
            assert len(labels) == 4 and "_other" in labels, labels
        finally:
            line.close()


def _camera_labels(port: int, series: tuple[str, ...] = ("inspectd_",)) -> set[str]:
    """The camera_id label values of the worker's metric series whose names start with one of `series`."""
    rows = [row for row in get(port, "/metrics")[1].decode().splitlines() if row.startswith(series)]
    return {row.split('camera_id="')[1].split('"')[0] for row in rows if 'camera_id="' in row}


# ---------------------------------------------------------------------------------------------- crash loops

MAX_ATTEMPTS = 3


class _Died(BaseException):
    """The process dies here: an in-process stand-in for a native crash or an OOM kill while decoding (a
    BaseException passes every `except Exception` of the loop, and nothing is committed)."""


def _send_around(line: Line, camera: str, poison: str) -> tuple[list[str], tuple[int, int]]:
    """Two frames, the poison, two frames, in one partition; the good ids and the poison's place."""
    ids = [f"{poison}-before-0", f"{poison}-before-1", poison, f"{poison}-after-0", f"{poison}-after-1"]
    futures = [
        line.producer.send(line.topic, key=camera.encode(), value=png(i), headers=frame_headers(frame_id, camera))
        for i, frame_id in enumerate(ids)
    ]
    line.producer.flush()
    meta = futures[2].get(timeout=10)
    return [i for i in ids if i != poison], (meta.partition, meta.offset)


def test_a_record_that_kills_the_worker_is_dead_lettered_after_max_attempts(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker dies while decoding one record, every time it is tried: after max_attempts deaths the next
    worker dead-letters it undecoded (crash_loop), and every frame around it gets exactly one verdict."""
    decode = Worker._decode
    deaths: list[int] = []

    def dying_decode(self: Worker, frame: Any, size: int) -> Any:
        if frame.frame_id == "poison":
            deaths.append(frame.offset)
            raise _Died(f"died decoding {frame.source}")
        return decode(self, frame, size)

    monkeypatch.setattr(Worker, "_decode", dying_decode)
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        try:
            good, place = _send_around(line, "cam-crash", "poison")
            for start in range(MAX_ATTEMPTS + 1):
                with in_process(line, model_dir, monkeypatch) as running:
                    deadline = time.monotonic() + 60
                    while "error" not in running.outcome and time.monotonic() < deadline:
                        if start == MAX_ATTEMPTS and set(good) <= set(line.verdict_ids()):
                            break
                        time.sleep(0.1)
                    if start < MAX_ATTEMPTS:
                        assert isinstance(running.outcome.get("error"), _Died), (start, running.outcome)
                assert len(deaths) == min(start + 1, MAX_ATTEMPTS), deaths
            assert "error" not in running.outcome, repr(running.outcome.get("error"))
            letter = _dead_letter(line, "{}:{}:{}".format(line.topic, *place))
            assert letter["reason"] == "crash_loop" and letter["frame_id"] == "poison", letter
            time.sleep(SETTLE_S)
            got = line.verdict_ids()
            assert sorted(got) == sorted(good), got  # exactly one verdict each, none for the poison
            assert not line.redis.keys(f"{line.prefix}attempts:*")  # cleared once done
        finally:
            line.close()
        assert running.outcome.get("rc") == 0


# ---------------------------------------------------------------------------------------------- redeliveries

# Drift monitoring for the tiny test model (8 calibration scores): a small reference, window and ERT.
SMALL_DRIFT = {
    "INSPECTD_DRIFT__MIN_REFERENCE": "5",
    "INSPECTD_DRIFT__WINDOW": "4",
    "INSPECTD_DRIFT__QUANTILE": "0.5",
    "INSPECTD_DRIFT__ERT": "50",
    "INSPECTD_DRIFT__SIM_ALARMS": "5",
    "INSPECTD_DRIFT__SIM_STREAMS": "5",
}


def _frames_seen(line: Line, camera: str) -> int:
    raw = line.redis.get(f"{line.prefix}drift:{camera}")
    return 0 if raw is None else int(json.loads(raw)["state"]["frames_seen"])


def test_a_redelivered_frame_feeds_the_drift_monitor_once(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same frame (id and bytes) delivered twice, in two batches and twice within one batch, as a
    producer's retry or a crash before the commit would: one verdict, and the camera's drift monitor counts
    it once."""
    camera = "cam-again"
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        try:
            with in_process(line, model_dir, monkeypatch, **SMALL_DRIFT) as running:
                wait_ready(running.port)
                twice = frame_headers("again", camera)
                _send(line, camera, png(21), twice)
                _wait_verdict(line, "again")
                assert _frames_seen(line, camera) == 1
                _send(line, camera, png(21), twice)  # a batch of its own: the verdict is there already
                for frame_id in ("pair", "pair", "after"):  # one batch: the pair's second copy is not new
                    line.producer.send(
                        line.topic, key=camera.encode(), value=png(22), headers=frame_headers(frame_id, camera)
                    )
                line.producer.flush()
                _wait_verdict(line, "after")
                deadline = time.monotonic() + 10  # the drift state is saved right after the verdicts
                while _frames_seen(line, camera) < 3 and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(SETTLE_S)
                assert _frames_seen(line, camera) == 3  # again, pair, after
                assert sorted(line.verdict_ids()) == ["after", "again", "pair"]
        finally:
            line.close()
        assert running.outcome.get("rc") == 0


# ---------------------------------------------------------------------------------------------- rebalances


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError):  # a set read while the worker's thread changes it
            if condition():
                return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_a_cameras_state_leaves_with_its_partition_and_is_resumed_when_it_comes_back(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second member of the group takes some partitions: the worker drops the drift monitors of the
    cameras on them (and keeps no stale drift metric); when the partitions come back, a camera's next frame
    resumes its monitor from Redis (frames_seen goes on from the saved count, not from zero)."""
    from kafka import KafkaConsumer

    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        try:
            with in_process(line, model_dir, monkeypatch, **SMALL_DRIFT) as running:
                wait_ready(running.port)
                worker = running.worker
                place = {}
                for i in range(8):
                    camera = f"cam-m{i}"
                    place[camera] = _send(line, camera, png(30 + i), frame_headers(f"m{i}", camera))[0]
                line.wait_verdicts(8)
                _until(lambda: set(place) <= worker.drift.cameras, 10, "every camera has a monitor")
                other = KafkaConsumer(
                    line.topic,
                    bootstrap_servers=kafka.bootstrap,
                    group_id=line.group,
                    enable_auto_commit=False,
                    session_timeout_ms=2000,
                    heartbeat_interval_ms=500,
                )
                try:
                    _until(lambda: bool(other.poll(100) is not None and other.assignment()), 30, "a second member")
                    taken = {tp.partition for tp in other.assignment()}
                    moved = {camera for camera, p in place.items() if p in taken}
                    assert moved and moved != set(place), (taken, place)  # the test needs both kinds
                    _until(lambda: not moved & worker.drift.cameras, 30, f"{moved} dropped")
                    metrics = get(running.port, "/metrics")[1].decode()
                    assert not [c for c in moved if f'inspectd_drift_alarm{{camera_id="{c}"}}' in metrics]
                finally:
                    other.close()
                back = sorted(moved)[0]
                _until(lambda: len(worker.consumer.assignment()) == 4, 30, "every partition back")
                _send(line, back, png(40), frame_headers("m-back", back))
                _wait_verdict(line, "m-back")
                _until(lambda: _frames_seen(line, back) == 2, 10, f"{back}'s monitor resumed (2 frames seen)")
        finally:
            line.close()
        assert running.outcome.get("rc") == 0


# The worker as `inspectd run`, except that it SIGKILLs itself when it starts decoding the frame argv[1]:
# a native crash or an OOM kill at that exact record, with nothing cleaned up.
DIES_ON = """
import os, signal, sys
from daemon.worker import Worker
decode = Worker._decode
def dying(self, frame, size):
    if frame.frame_id == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
    return decode(self, frame, size)
Worker._decode = dying
from cli.main import main
sys.exit(main(["--config", sys.argv[2], "run"]))
"""


@pytest.mark.slow
def test_a_record_that_sigkills_the_worker_process_is_dead_lettered_after_max_attempts(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path
) -> None:
    """As the in-process test, with real deaths: `inspectd run` subprocesses SIGKILLed while decoding one
    record, restarted each time (as Kubernetes would)."""
    import subprocess
    import sys

    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        try:
            good, place = _send_around(line, "cam-kill", "killer")
            for start in range(MAX_ATTEMPTS + 1):
                log = (tmp_path / f"worker{start}.log").open("wb")
                proc = subprocess.Popen(
                    [sys.executable, "-c", DIES_ON, "killer", str(ROOT / "config.toml")],
                    cwd=ROOT,
                    env={**line.env, "INSPECTD_WORKER__HTTP_PORT": "0"},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                line.workers.append(proc)
                if start < MAX_ATTEMPTS:
                    assert proc.wait(timeout=120) == -signal.SIGKILL, line.logs()
            letter = _dead_letter(line, "{}:{}:{}".format(line.topic, *place), timeout=120)
            assert letter["reason"] == "crash_loop" and letter["frame_id"] == "killer", letter
            line.wait_verdicts(len(good))
            time.sleep(SETTLE_S)
            assert sorted(line.verdict_ids()) == sorted(good)
            assert proc.poll() is None, line.logs()
        finally:
            line.close()


# ---------------------------------------------------------------------------------------------- many cameras


def _many_cameras(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int, keep: int
) -> None:
    """`n` distinct camera ids, one frame each, through a worker that keeps `keep` cameras: every frame gets
    its verdict, and the worker's per-camera state (drift monitors, served versions, rebalance map) and
    metric series stay within their bounds."""
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        env = {"INSPECTD_WORKER__MAX_CAMERAS": str(keep), "INSPECTD_WORKER__MAX_CAMERA_SERIES": str(keep)}
        try:
            with in_process(line, model_dir, monkeypatch, **env) as running:
                wait_ready(running.port)
                for i in range(n):
                    camera = f"many-{i}"
                    line.producer.send(
                        line.topic, key=camera.encode(), value=png(i % 7), headers=frame_headers(f"m{i}", camera)
                    )
                line.producer.flush()
                assert len(line.wait_verdicts(n, timeout=max(120.0, n / 10))) == n
                worker = running.worker
                assert len(worker.drift.cameras) <= keep and len(worker.models.cameras) <= keep
                assert len(worker.cameras.idle(keep)) == 0  # the rebalance map was kept within the bound too
                labels = _camera_labels(running.port)
                assert len(labels) <= keep + 1, len(labels)  # + "_other"
        finally:
            line.close()
        assert running.outcome.get("rc") == 0


def test_cameras_beyond_the_bound_are_forgotten(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _many_cameras(kafka, model_dir, tmp_path, monkeypatch, n=200, keep=20)


@pytest.mark.slow
def test_ten_thousand_camera_ids_keep_memory_and_metric_series_bounded(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _many_cameras(kafka, model_dir, tmp_path, monkeypatch, n=10_000, keep=1000)


def test_redis_killed_without_persistence_comes_back_empty_and_the_line_goes_on(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path
) -> None:
    """Redis SIGKILLed and restarted empty (no persistence: the registry, verdict keys and drift states are
    gone): the worker rides out the outage and serves its configured version, and every frame sent after the
    restart gets exactly one verdict."""
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        try:
            proc, port = line.start_worker()
            wait_ready(port)
            first = line.send(8)
            line.wait_verdicts(len(first))
            time.sleep(SETTLE_S)  # the batch's offsets are committed
            server.stop(kill=True)
            time.sleep(DOWNTIME_S)
            server.start()
            assert not line.redis.exists(f"{line.prefix}verdict:{first[0]}")  # nothing survived the kill
            later = line.send(8, start=8)
            line.wait_verdicts(8)
            time.sleep(SETTLE_S)  # anything written twice would show by now
            got = line.verdict_ids()
            assert sorted(got) == sorted(later), line.logs()
            assert proc.poll() is None, line.logs()
            wait_ready(port)
        finally:
            line.close()

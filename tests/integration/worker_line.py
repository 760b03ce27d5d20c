"""A test's production line: its own topic, DLQ, consumer group and Redis prefix, with `inspectd run` workers
as subprocesses (so that they can be SIGKILLed and SIGTERMed like in production). Shared by the worker tests.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import redis
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from PIL import Image

from csflow.artifacts import save_model
from csflow.backbones import LITE0, LITE0_PACKAGE
from csflow.calibration import calibrate
from csflow.fit import build_model
from csflow.flow import FlowConfig
from csflow.model import image_scores
from lab.services import LocalKafka, free_port

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 4
PRODUCER_MAX_REQUEST = 32 * 1024 * 1024  # tests send records larger than kafka-python's default 1 MB


def make_model_dir(out_dir: Path, nan_weights: bool = False) -> Path:
    """A tiny lite0 model at 128 px, calibrated on random images (accuracy is not the point here);
    `nan_weights`: one flow parameter is NaN after calibration, so the model scores every frame NaN."""
    torch.manual_seed(0)
    model = build_model(LITE0, LITE0_PACKAGE, 128, FlowConfig(hidden_channels=8))
    with torch.no_grad():
        scores = image_scores(model(torch.rand(8, 3, 128, 128)).z)
        if nan_weights:
            next(model.flow.parameters()).fill_(float("nan"))
    save_model(out_dir, model, LITE0_PACKAGE, calibrate(scores.numpy(), 0.1), {"purpose": "worker tests"})
    return out_dir


def png(seed: int, size: int = 64) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def frame_headers(frame_id: str, camera: str = "cam-1") -> list[tuple[str, bytes]]:
    return [
        ("frame_id", frame_id.encode()),
        ("camera_id", camera.encode()),
        ("ts", str(int(time.time() * 1000)).encode()),
        ("content_type", b"image/png"),
    ]


class Line:
    """One test's topic, group, Redis prefix and workers; `env` overrides the workers' settings."""

    def __init__(
        self,
        broker: LocalKafka,
        redis_url: str,
        model_dir: Path,
        tmp_path: Path,
        env: Mapping[str, str] | None = None,
        topic: str | None = None,
    ) -> None:
        tag = uuid.uuid4().hex[:8]
        self.broker, self.tmp_path = broker, tmp_path
        self.topic, self.group, self.prefix = topic or f"frames-{tag}", f"g-{tag}", f"t{tag}:"
        broker.create_topic(self.topic, PARTITIONS)
        self.dlq = f"{self.topic}.dlq"
        if len(self.dlq) <= 249:  # a longer one is illegal: a test of a DLQ that refuses everything
            broker.create_topic(self.dlq, 1)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("INSPECTD_")},
            "INSPECTD_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
            "INSPECTD_KAFKA__TOPIC": self.topic,
            "INSPECTD_KAFKA__GROUP_ID": self.group,
            "INSPECTD_KAFKA__SESSION_TIMEOUT_MS": "2000",
            "INSPECTD_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
            "INSPECTD_REDIS__URL": redis_url,
            "INSPECTD_REDIS__KEY_PREFIX": self.prefix,
            "INSPECTD_WORKER__MODEL_DIR": str(model_dir),
            "INSPECTD_WORKER__BATCH_SIZE": "8",
            "INSPECTD_WORKER__RETRY_BACKOFF_S": "0.2",
            "INSPECTD_WORKER__RETRY_BACKOFF_MAX_S": "1",
            "INSPECTD_WORKER__LAG_INTERVAL_S": "1",
            "INSPECTD_REGISTRY__CACHE_DIR": str(tmp_path / "cache"),
            "INSPECTD_MODEL__DEVICE": "cpu",
            "INSPECTD_LOG__FORMAT": "json",
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        self.workers: list[subprocess.Popen[bytes]] = []
        self.producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=PRODUCER_MAX_REQUEST)
        self.redis = redis.Redis.from_url(redis_url)

    def start_worker(self) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        log = (self.tmp_path / f"worker{len(self.workers)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "--config", str(ROOT / "config.toml"), "run"],
            cwd=ROOT,
            env={**self.env, "INSPECTD_WORKER__HTTP_PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(proc)
        return proc, port

    def send(self, n: int, start: int = 0) -> list[str]:
        ids = [f"f{i:05d}" for i in range(start, start + n)]
        for i, frame_id in zip(range(start, start + n), ids, strict=True):
            camera = f"cam-{i % 4}"  # keys spread the frames over partitions
            self.producer.send(self.topic, key=camera.encode(), value=png(i), headers=frame_headers(frame_id, camera))
        self.producer.flush()
        return ids

    def verdict_ids(self) -> list[str]:
        return [fields[b"frame_id"].decode() for _, fields in self.redis.xrange(f"{self.prefix}verdicts")]

    def wait_verdicts(self, n: int, timeout: float = 120.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = self.verdict_ids()
            except redis.ConnectionError:
                got = []
            if len(got) >= n:
                return got
            time.sleep(0.2)
        raise AssertionError(f"fewer than {n} verdicts after {timeout} s\n{self.logs()}")

    def committed_total(self) -> int:
        """Sum of the group's committed offsets over the topic's partitions (read without joining)."""
        consumer = KafkaConsumer(bootstrap_servers=self.broker.bootstrap, group_id=self.group, enable_auto_commit=False)
        try:
            return sum(consumer.committed(TopicPartition(self.topic, p)) or 0 for p in range(PARTITIONS))
        finally:
            consumer.close()

    def dead_letters(self, n: int, timeout: float = 30.0) -> list[dict[str, str]]:
        """The headers of the first n dead letters (values decoded)."""
        return [{k: v.decode(errors="replace") for k, v in record.headers} for record in self.dead_records(n, timeout)]

    def dead_records(self, n: int, timeout: float = 30.0) -> list[object]:
        consumer = KafkaConsumer(
            self.dlq,
            bootstrap_servers=self.broker.bootstrap,
            auto_offset_reset="earliest",
            consumer_timeout_ms=int(timeout * 1000),
            fetch_max_bytes=PRODUCER_MAX_REQUEST,
            max_partition_fetch_bytes=PRODUCER_MAX_REQUEST,
        )
        out = []
        for record in consumer:
            out.append(record)
            if len(out) >= n:
                break
        consumer.close()
        return out

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.tmp_path.glob("worker*.log")))

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.producer.close()
        self.redis.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_metric(port: int, sample: bytes, timeout: float = 30.0) -> bytes:
    """/metrics once it shows `sample`: a batch's counters move after its writes and commit, so a verdict or a
    dead letter can be seen a moment before them."""
    deadline = time.monotonic() + timeout
    while True:
        status, metrics = get(port, "/metrics")
        if status == 200 and sample in metrics:
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics (HTTP {status}) never showed {sample!r}:\n{metrics.decode()}")
        time.sleep(0.2)


def wait_ready(port: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get(port, "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("worker never became ready")

"""`inspectd run` before any model exists: it serves /healthz, says in /readyz which model is missing, and
starts serving once one appears (in [worker] model_dir or as the registry's default); SIGTERM while it
waits exits 0 at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from csflow.artifacts import save_model
from csflow.backbones import LITE0, LITE0_PACKAGE
from csflow.calibration import calibrate
from csflow.fit import build_model
from csflow.flow import FlowConfig
from csflow.scoring import score_images
from lab.services import LocalKafka, LocalRedis, free_port

ROOT = Path(__file__).resolve().parents[2]


def tiny_model(out: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(LITE0, LITE0_PACKAGE, 128, FlowConfig(hidden_channels=8))
    scores = score_images(model, torch.rand(8, 3, 128, 128)).image
    save_model(out, model, LITE0_PACKAGE, calibrate(scores, 0.1), {"purpose": "first-model test"})
    return out


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def poll(port: int, path: str, want: int, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = get(port, path)
            if status == want:
                return body
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{path} never answered {want}")


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalKafka]:
    with LocalKafka() as kafka:
        yield kafka


@pytest.fixture
def worker_env(broker: LocalKafka, tmp_path: Path) -> Iterator[dict[str, str]]:
    with LocalRedis() as server:
        topic = f"frames-{os.getpid()}-{time.monotonic_ns()}"
        broker.create_topic(topic, 1)
        broker.create_topic(f"{topic}.dlq", 1)
        yield {
            **{k: v for k, v in os.environ.items() if not k.startswith("INSPECTD_")},
            "INSPECTD_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
            "INSPECTD_KAFKA__TOPIC": topic,
            "INSPECTD_KAFKA__SESSION_TIMEOUT_MS": "2000",
            "INSPECTD_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
            "INSPECTD_REDIS__URL": server.url,
            "INSPECTD_WORKER__MODEL_DIR": str(tmp_path / "model"),
            "INSPECTD_WORKER__HTTP_PORT": str(free_port()),
            "INSPECTD_REGISTRY__CACHE_DIR": str(tmp_path / "cache"),
            "INSPECTD_REGISTRY__REFRESH_S": "0.5",
            "INSPECTD_MODEL__DEVICE": "cpu",
            "INSPECTD_LOG__FORMAT": "json",
            "OMP_NUM_THREADS": "1",
        }


@contextmanager
def worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`inspectd run` as a subprocess, killed at the end if a test left it running."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "--config", str(ROOT / "config.toml"), "run"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_without_a_model_it_waits_then_serves_the_one_that_appears(worker_env: dict[str, str], tmp_path: Path) -> None:
    port = int(worker_env["INSPECTD_WORKER__HTTP_PORT"])
    with worker(worker_env, tmp_path / "worker.log") as proc:
        assert poll(port, "/healthz", 200) == {"status": "ok"}
        body = poll(port, "/readyz", 503)
        assert body["not_ready"] == ["model"], body
        assert worker_env["INSPECTD_WORKER__MODEL_DIR"] in body["reasons"]["model"]
        assert proc.poll() is None, "the worker must wait, not exit"
        # Written elsewhere and moved into place, as a deployment would.
        shutil.move(tiny_model(tmp_path / "staging"), worker_env["INSPECTD_WORKER__MODEL_DIR"])
        assert poll(port, "/readyz", 200)["ready"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_sigterm_while_waiting_exits_0(worker_env: dict[str, str], tmp_path: Path) -> None:
    port = int(worker_env["INSPECTD_WORKER__HTTP_PORT"])
    with worker(worker_env, tmp_path / "worker.log") as proc:
        poll(port, "/readyz", 503)
        proc.send_signal(signal.SIGTERM)  # without a stop request it would wait for a model for ever
        assert proc.wait(timeout=60) == 0


def test_without_a_model_it_serves_the_default_version_an_operator_publishes(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    port = int(worker_env["INSPECTD_WORKER__HTTP_PORT"])
    with worker(worker_env, tmp_path / "worker.log") as proc:
        poll(port, "/readyz", 503)
        model = tiny_model(tmp_path / "published")
        publish = [sys.executable, "-m", "cli", "--config", str(ROOT / "config.toml"), "models", "publish"]
        done = subprocess.run([*publish, str(model), "--activate"], env=worker_env, cwd=ROOT, capture_output=True)
        assert done.returncode == 0, done.stderr
        assert poll(port, "/readyz", 200)["ready"]
        assert not Path(worker_env["INSPECTD_WORKER__MODEL_DIR"]).exists()  # served from the registry
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0

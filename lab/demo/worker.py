"""The worker under demonstration: `inspectd run` in a subprocess, configured through its environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from lab.demo.spec import DemoSpec
from lab.services import LocalKafka, pdeathsig_hook


def start_worker(env: Mapping[str, str], config: str | None, log_path: Path) -> subprocess.Popen[bytes]:
    """`inspectd run` in a subprocess; it gets SIGKILL if the demo dies without stopping it (Linux)."""
    command = [sys.executable, "-m", "cli", *(["--config", config] if config else []), "run"]
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=pdeathsig_hook(),
        )


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with code {proc.returncode} while starting:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the worker was not ready within {timeout:.0f} s:\n{tail(log_path)}")


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def worker_env(
    spec: DemoSpec, kafka: LocalKafka, redis_url: str, topic: str, prefix: str, model_dir: Path, port: int, shots: int
) -> dict[str, str]:
    env = {
        "INSPECTD_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap,
        "INSPECTD_KAFKA__TOPIC": topic,
        "INSPECTD_KAFKA__GROUP_ID": "inspectd-demo",
        # Group joins with Tansu take about session_timeout / 2: keep them short on one machine.
        "INSPECTD_KAFKA__SESSION_TIMEOUT_MS": "2000",
        "INSPECTD_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "INSPECTD_REDIS__URL": redis_url,
        "INSPECTD_REDIS__KEY_PREFIX": prefix,
        "INSPECTD_WORKER__MODEL_DIR": str(model_dir.resolve()),
        "INSPECTD_WORKER__HTTP_HOST": "127.0.0.1",
        "INSPECTD_WORKER__HTTP_PORT": str(port),
        "INSPECTD_WORKER__DRAIN_TIMEOUT_S": "10",  # Ctrl-C reaches the services too: do not wait long for them
        "INSPECTD_REGISTRY__CACHE_DIR": str((spec.out / "versions").resolve()),
        "INSPECTD_REGISTRY__REFRESH_S": "2",
        "INSPECTD_ADAPT__MIN_SHOTS": str(shots),
        "INSPECTD_ADAPT__CHECK_INTERVAL_S": "1",
        "INSPECTD_LOG__FORMAT": "json",
    }
    if spec.drift_window is not None:
        env["INSPECTD_DRIFT__WINDOW"] = str(spec.drift_window)
    if spec.drift_ert is not None:
        env["INSPECTD_DRIFT__ERT"] = str(spec.drift_ert)
    return {**env, **spec.worker_env}

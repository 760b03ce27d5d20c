"""An adaptation that runs out of memory costs its child process only: an `inspectd run` worker (real Tansu,
real Redis) records the attempt as failed and keeps scoring. The line and its drift come from
test_adaptation_loop.py; the child's memory bound ([adapt] max_memory_mb) is set far below what it needs.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import test_adaptation_loop
import test_worker
from test_adaptation_loop import CAMERA, SHOTS, Loop
from worker_line import get

from cli.main import main
from csflow.artifacts import read_manifest
from daemon.events import EventKind

broker = test_worker.broker
trained_dir = test_adaptation_loop.trained_dir
loop = test_adaptation_loop.loop


@pytest.mark.slow
def test_an_adaptation_out_of_memory_fails_alone_and_the_worker_keeps_scoring(loop: Loop, trained_dir: Path) -> None:
    base = read_manifest(trained_dir).version
    loop.line.env["INSPECTD_ADAPT__MAX_MEMORY_MB"] = "200"
    [port] = loop.start_workers(1)
    loop.send(16, shifted=False)
    shifted = loop.shift_until_alarm()

    assert main(["confirm", *shifted[:SHOTS], "--operator", "qa"]) == 0
    failed = loop.wait_event(EventKind.ADAPTATION_FAILED)
    assert failed.scope == CAMERA and failed.version == base
    assert "out of memory" in failed.detail["reason"], failed.detail["reason"]
    after = loop.verdicts(loop.send(8, shifted=True))
    assert {v["model_version"] for v in after} == {base}, "scoring stopped or changed version"
    assert loop.line.workers[0].poll() is None, "the worker died with its adaptation"
    metrics = get(port, "/metrics")[1].decode()
    assert re.search(r'inspectd_adaptations_total\{outcome="failed"\} 1\.0', metrics), metrics
    time.sleep(2)  # several controller checks: the failed frames are not tried again
    assert len(loop.events(EventKind.ADAPTATION_STARTED)) == 1

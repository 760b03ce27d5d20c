"""Under a backlog the worker decodes the next batch while it scores the current one (issue 14, item 3); the
batch polled ahead is committed only once it is done itself, and a stop leaves it to be redelivered.

The worker runs in this process (`test_faults.in_process`) so that its decode and forward passes can be timed;
the decode is slowed so that the two overlap measurably, or visibly not at all."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_faults import in_process
from worker_line import Line, wait_ready

from csflow.artifacts import ModelVersion
from daemon.frames import BadFrame, Frame
from daemon.worker import Worker
from lab.services import LocalKafka, LocalRedis

BATCH = 8  # the Line's [worker] batch_size
FRAMES = 6 * BATCH
DECODE_S = 0.05  # per frame: a batch takes 0.2 s on the two decode threads, several forward passes' time


@pytest.fixture
def timed(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[tuple[float, float]]]]:
    """The worker's decodes (slowed by DECODE_S) and forward passes, as (start, end) monotonic times."""
    spans: dict[str, list[tuple[float, float]]] = {"decode": [], "forward": []}
    decode, forward = Worker._decode, Worker._forward

    def slow_decode(self: Worker, frame: Frame, size: int) -> torch.Tensor | BadFrame:
        start = time.monotonic()
        time.sleep(DECODE_S)
        out = decode(self, frame, size)
        spans["decode"].append((start, time.monotonic()))
        return out

    def timed_forward(self: Worker, version: ModelVersion, images: list[torch.Tensor]) -> np.ndarray:
        start = time.monotonic()
        out = forward(self, version, images)
        spans["forward"].append((start, time.monotonic()))
        return out

    monkeypatch.setattr(Worker, "_decode", slow_decode)
    monkeypatch.setattr(Worker, "_forward", timed_forward)
    yield spans


def _overlaps(spans: dict[str, list[tuple[float, float]]]) -> int:
    """How many decodes ran while a forward pass did."""
    return sum(any(d0 < f1 and f0 < d1 for f0, f1 in spans["forward"]) for d0, d1 in spans["decode"])


@pytest.mark.parametrize("ahead", [True, False])
def test_the_next_batch_decodes_while_the_current_one_is_scored(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timed: Any, ahead: bool
) -> None:
    """A backlog of six batches: every frame gets its verdict, and with `[worker] decode_ahead` the decodes of
    a batch run during the forward pass of the batch before it; without it none does. The loop used to
    decode, score and write one batch after the other whatever the settings."""
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        ids = line.send(FRAMES)  # the backlog is there before the worker joins
        try:
            with in_process(line, model_dir, monkeypatch, INSPECTD_WORKER__DECODE_AHEAD=str(ahead).lower()) as running:
                got = line.wait_verdicts(FRAMES)
        finally:
            line.close()
    assert running.outcome.get("rc") == 0, running.outcome
    assert sorted(got) == sorted(ids)
    assert len(timed["forward"]) >= FRAMES // BATCH
    overlapped = _overlaps(timed)
    assert overlapped >= BATCH if ahead else overlapped == 0, f"{overlapped} of {len(timed['decode'])} decodes"


def test_a_stop_leaves_the_batch_polled_ahead_uncommitted_and_uncounted(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timed: Any
) -> None:
    """Stopped mid-backlog, the worker finishes and commits the batch it was scoring, but not the one it had
    polled ahead: the committed offsets are exactly the frames with a verdict, no attempt counter is left
    behind (one would make the next worker take those records one at a time, as after a crash), and a
    worker started afterwards gives every frame exactly one verdict."""
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        try:
            ids = line.send(FRAMES)
            with in_process(line, model_dir, monkeypatch, INSPECTD_WORKER__DECODE_AHEAD="true") as running:
                line.wait_verdicts(BATCH)
            assert running.outcome.get("rc") == 0, running.outcome
            scored = line.verdict_ids()
            assert BATCH <= len(scored) < FRAMES, "the worker finished the backlog before the stop: nothing tested"
            assert line.committed_total() == len(scored)
            assert not list(line.redis.scan_iter(f"{line.prefix}attempts:*"))
            monkeypatch.undo()  # the next worker is a subprocess anyway
            _, port = line.start_worker()
            wait_ready(port)
            got = line.wait_verdicts(FRAMES)
            time.sleep(2)  # a redelivered frame would show up as a duplicate by now
            got = line.verdict_ids()
        finally:
            line.close()
    assert len(got) == len(set(got)) == FRAMES and set(got) == set(ids)

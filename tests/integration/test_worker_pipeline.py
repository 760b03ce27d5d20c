"""Under a backlog the worker decodes the next batch while it scores the current one, and writes a batch to
Redis while it scores the next (issue 14, item 3); a batch is committed only once it is written, in order, and
a stop leaves the batch polled ahead to be redelivered.

The worker runs in this process (`test_faults.in_process`) so that its decodes, forward passes and writes can
be timed; decodes and writes are slowed so that they overlap the forward passes measurably, or visibly not at
all."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_faults import in_process
from worker_line import Line, wait_ready

from csflow.artifacts import ModelVersion
from daemon.frames import BadFrame, Frame
from daemon.worker import Scored, Worker, Written
from lab.services import LocalKafka, LocalRedis

BATCH = 8  # the Line's [worker] batch_size
FRAMES = 6 * BATCH
DECODE_S = 0.05  # per frame: a batch takes 0.2 s on the two decode threads, several forward passes' time
WRITE_S = 0.5  # per batch: longer than polling and decoding the next one


@pytest.fixture
def timed(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[tuple[float, float]]]]:
    """The worker's decodes (slowed by DECODE_S), forward passes and batch writes (slowed by WRITE_S), as
    (start, end) monotonic times."""
    spans: dict[str, list[tuple[float, float]]] = {"decode": [], "forward": [], "write": []}
    decode, forward, write = Worker._decode, Worker._forward, Worker._write

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

    def slow_write(self: Worker, scored: Scored, pool: ThreadPoolExecutor | None) -> Written:
        start = time.monotonic()
        time.sleep(WRITE_S)
        out = write(self, scored, pool)
        spans["write"].append((start, time.monotonic()))
        return out

    monkeypatch.setattr(Worker, "_decode", slow_decode)
    monkeypatch.setattr(Worker, "_forward", timed_forward)
    monkeypatch.setattr(Worker, "_write", slow_write)
    yield spans


def _overlaps(spans: dict[str, list[tuple[float, float]]], stage: str) -> int:
    """How many decodes (or writes) ran while a forward pass did."""
    return sum(any(d0 < f1 and f0 < d1 for f0, f1 in spans["forward"]) for d0, d1 in spans[stage])


SETTINGS = {"decode": "DECODE_AHEAD", "write": "WRITE_BEHIND"}  # the stage and its [worker] setting


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
@pytest.mark.parametrize("stage", list(SETTINGS))
def test_a_stage_overlaps_the_forward_passes_only_where_set(
    kafka: LocalKafka,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    timed: Any,
    stage: str,
    on: bool,
) -> None:
    """A backlog of six batches. With `[worker] decode_ahead` the decodes of a batch run during the forward
    pass of the batch before it; with `[worker] write_behind` the Redis writes of a batch run during the
    forward pass of the next one; with the setting off, none does (the loop used to decode, score and write
    one batch after the other whatever the settings). Either way every frame gets its verdict and every
    offset is committed, the last batch's once the worker finds the stream idle."""
    env = {f"INSPECTD_WORKER__{name}": str(on and key == stage).lower() for key, name in SETTINGS.items()}
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        ids = line.send(FRAMES)  # the backlog is there before the worker joins
        try:
            with in_process(line, model_dir, monkeypatch, **env) as running:
                got = line.wait_verdicts(FRAMES)
                deadline = time.monotonic() + 30
                while line.committed_total() < FRAMES and time.monotonic() < deadline:
                    time.sleep(0.1)
                committed = line.committed_total()
        finally:
            line.close()
    assert running.outcome.get("rc") == 0, running.outcome
    assert sorted(got) == sorted(ids)
    assert committed == FRAMES
    assert len(timed["forward"]) >= FRAMES // BATCH
    overlapped, spans = _overlaps(timed, stage), len(timed[stage])
    least = BATCH if stage == "decode" else spans // 2  # a batch's decodes; half of the writes
    assert overlapped >= least if on else overlapped == 0, f"{overlapped} of {spans} {stage}s"


@pytest.mark.parametrize("overlap", ["DECODE_AHEAD", "WRITE_BEHIND"])
def test_a_stop_commits_what_has_a_verdict_and_leaves_no_attempt_counter(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timed: Any, overlap: str
) -> None:
    """Stopped mid-backlog, the worker finishes, writes and commits the batch it was scoring (and the one it
    was writing behind), but not the one it had polled ahead: the committed offsets are exactly the frames
    with a verdict, no attempt counter is left behind (one would make the next worker take those records one
    at a time, as after a crash), and a worker started afterwards gives every frame exactly one verdict."""
    other = "WRITE_BEHIND" if overlap == "DECODE_AHEAD" else "DECODE_AHEAD"
    env = {f"INSPECTD_WORKER__{overlap}": "true", f"INSPECTD_WORKER__{other}": "false"}
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        try:
            ids = line.send(FRAMES)
            with in_process(line, model_dir, monkeypatch, **env) as running:
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

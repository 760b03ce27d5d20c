"""`run_demo`: services, model, worker, camera and operator together, stopped in order."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters.shifts import get_shift
from csflow.data import load_dataset
from csflow.fit import Progress, no_progress
from daemon.config import Settings
from daemon.store import Keys
from lab.demo.camera import Camera
from lab.demo.loop import Demo, DemoFailed
from lab.demo.model import prepare_data, prepare_model
from lab.demo.spec import DemoSpec, Say
from lab.demo.summary import (
    confirmed_frames,
    judge_recovery,
    say_summary,
    summarise,
    timeline_markers,
    timeline_phases,
    timeline_thresholds,
)
from lab.demo.worker import start_worker, wait_ready, worker_env
from lab.plots import plot_timeline
from lab.services import LocalKafka, LocalRedis, free_port, stop_process

ConsoleStarter = Callable[[str, str], AbstractContextManager[str]]


@dataclass
class DemoResult:
    ok: bool
    summary: dict[str, Any]
    summary_path: Path
    timeline_path: Path


def run_demo(
    spec: DemoSpec,
    settings: Settings,
    say: Say = print,
    progress: Progress = no_progress,
    console: ConsoleStarter | None = None,
) -> DemoResult:
    """The whole demo; returns the summary (also written to OUT/summary.json, with OUT/timeline.png).

    `console(redis_url, key_prefix)`, when given, starts the operator console beside the worker for the
    demo's lifetime (a context manager yielding the line to print: URL and login); the command line passes it
    with --console, since the lab does not import the web stack.

    Raises on set-up errors (no data, a service or the worker that does not start); a loop that does not
    complete (no alarm, a rejected adaptation, ...) ends normally with `ok` False and the reason in the
    summary's `outcome`."""
    if spec.rate <= 0:
        raise ValueError("--rate must be positive")
    shift = get_shift(spec.shift, settings.limits.to_limits())  # an unknown shift fails before any work
    spec.out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    shots = spec.shots or settings.adapt.min_shots
    worker_log = spec.out / "worker.log"
    processes: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        # The services first: a missing broker or Redis shows before minutes of export and training.
        kafka = stack.enter_context(LocalKafka(workdir=spec.out / "services" / "kafka"))
        redis_server = stack.enter_context(LocalRedis(workdir=spec.out / "services" / "redis"))
        processes["kafka"] = {"pid": kafka.pid, "port": kafka.port}
        processes["redis"] = {"pid": redis_server.pid, "port": redis_server.port}
        topic, prefix = "frames", f"demo-{uuid.uuid4().hex[:6]}:"
        kafka.create_topic(topic, 1)
        kafka.create_topic(f"{topic}.dlq", 1)
        say(f"services: Kafka-protocol broker (Tansu) on {kafka.bootstrap}, Redis on port {redis_server.port}")
        client = redis_server.client(socket_timeout=10)
        stack.callback(client.close)

        prepare_data(spec, say)
        model = prepare_model(spec, settings, say, progress)
        test = load_dataset(spec.data).test

        port = free_port()
        env = worker_env(spec, kafka, redis_server.url, topic, prefix, model.directory, port, shots)
        worker = start_worker(env, spec.config, worker_log)
        processes["worker"] = {"pid": worker.pid, "port": port}
        stack.callback(
            lambda: processes["worker"].update(exit_code=stop_process(worker, signal.SIGTERM, spec.stop_timeout_s))
        )
        wait_ready(port, worker, spec.ready_timeout_s, worker_log)
        say(f"worker: ready (pid {worker.pid}, health on http://127.0.0.1:{port}/readyz, log {worker_log})")
        if console is not None:
            say(stack.enter_context(console(redis_server.url, prefix)))

        t0 = time.monotonic()
        camera = Camera(kafka.bootstrap, topic, spec.camera, test, spec, shift, settings.limits.to_limits(), t0)
        demo = Demo(spec, settings, say, camera, worker, worker_log, client, Keys(prefix), model, shots, t0)
        say(
            f"camera {spec.camera}: {spec.rate:g} frames/s, {spec.frames_before} frames before the '{spec.shift}' "
            + (
                f"shift; when the drift alarm comes, confirm at least {shots} normal frames in the console"
                if spec.person
                else f"shift; the operator confirms {shots} normal frames when the drift alarm comes"
            )
        )
        stack.callback(camera.stop)
        camera.start()
        try:
            demo.follow()
            ok, outcome = judge_recovery(demo.story, spec)
        except DemoFailed as exc:
            outcome, ok = f"incomplete: {exc}", False
        say(f"demo: {outcome}")
        camera.stop()
        missing = demo.drain()
        if missing:
            say(f"demo: {missing} frames got no verdict within {spec.drain_timeout_s:.0f} s")
        processes["worker"]["exit_code"] = stop_process(worker, signal.SIGTERM, spec.stop_timeout_s)
        say(f"worker: stopped (exit code {processes['worker']['exit_code']})")
    say("services: stopped")
    processes["kafka"]["running"] = kafka.running
    processes["redis"]["running"] = redis_server.running
    summary = summarise(demo, model, outcome, ok)
    summary["processes"] = processes
    summary["seconds"] = {"total": round(time.monotonic() - t_start, 1), "model": round(model.seconds, 1)}
    summary_path, timeline_path = spec.out / "summary.json", spec.out / "timeline.png"
    summary["files"] = {"summary": str(summary_path), "timeline": str(timeline_path), "worker_log": str(worker_log)}
    summary_path.write_text(json.dumps(summary, indent=2))
    scored = sorted(demo.story.scored, key=lambda s: s.frame.index)
    plot_timeline(
        timeline_path,
        f"inspectd demo: ELPV, shift '{spec.shift}', camera {spec.camera}",
        np.array([s.frame.index for s in scored], dtype=int),
        np.array([s.score for s in scored]),
        np.array([s.frame.defective for s in scored], dtype=bool),
        timeline_thresholds(demo),
        timeline_markers(demo),
        timeline_phases(demo),
        confirmed_frames(demo),
    )
    say_summary(summary, say)
    return DemoResult(ok, summary, summary_path, timeline_path)

"""`inspectd run` (the streaming worker) and `inspectd produce` (the camera simulator)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from cli.common import warn_if_bf16_emulated

if TYPE_CHECKING:
    from daemon.config import Settings


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    options = settings.model.worker_serving_options()  # what the worker cannot serve: refused before waiting
    import threading

    from csflow.fit import resolve_device
    from daemon.first_model import configured_or_published, wait_for_model
    from daemon.worker import Worker

    device = resolve_device(settings.model.device)
    warn_if_bf16_emulated(options, device)
    stop = threading.Event()
    worker: Worker | None = None

    def on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and stop.is_set():
            signal.default_int_handler(signum, _frame)  # a second Ctrl+C stops at once
        stop.set()
        if worker is not None:
            worker.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    version = wait_for_model(settings, configured_or_published(settings, str(device)), stop)
    if version is None:
        return 0  # stopped while waiting: nothing was in flight
    worker = Worker(settings, version, device)
    if stop.is_set():
        worker.request_stop()
    return worker.run()


def cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.shifts import get_shift
    from daemon.kafka_clients import make_producer
    from lab.producer import CameraPlan, produce, source_images

    plan = CameraPlan(
        images=source_images(args.images),
        cameras=[c for c in args.cameras.split(",") if c],
        count=args.count,
        rate=args.rate,
        fmt=args.format,
        shift=get_shift(args.shift) if args.shift else None,
        shift_after=args.shift_after,
    )
    producer = make_producer(settings.kafka)
    try:
        ids = produce(producer, args.topic or settings.kafka.topic, plan, settings.limits.to_limits())
    finally:
        producer.close()
    print(f"published {len(ids)} frames from {len(plan.images)} images for cameras {', '.join(plan.cameras)}")
    return 0


def add_stream_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="the streaming worker: frames from Kafka, verdicts into Redis",
        description="Consume [kafka] topic in group [kafka] group_id, score with the model in "
        "[worker] model_dir, write verdicts to Redis; SIGTERM drains and exits 0. Health on "
        "[worker] http_port: /healthz, /readyz, /metrics.",
    )
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser(
        "produce",
        help="camera simulator: publish images as frames",
        description="Publish images (a dataset's test set, or a folder) to the frames topic.",
    )
    p.add_argument("--images", required=True, type=Path, help="dataset (MVTec layout) or folder of images")
    p.add_argument("--count", type=int, default=100, help="frames to publish")
    p.add_argument("--rate", type=float, default=10.0, help="frames per second over all cameras (0 = max)")
    p.add_argument("--cameras", default="cam-1", help="comma-separated camera ids, used in turn")
    p.add_argument("--format", default="png", choices=["png", "jpeg", "webp"])
    p.add_argument("--shift", help="domain shift applied after --shift-after frames (e.g. illumination, gray)")
    p.add_argument("--shift-after", type=int, default=0)
    p.add_argument("--topic", help="topic (default: [kafka] topic)")
    p.set_defaults(handler=cmd_produce)

"""End-to-end worker throughput and latency against the bare model, in one run.

Starts a local Kafka-protocol broker and Redis, loads ELPV frames (PNG), and measures on the same
frames and configuration, alternating:
  1. bare model: decode + preprocess + score in batches (what the hardware can do), under the worker's
     serving options and forward batch;
  2. worker throughput: a backlog of frames in the topic, drained by `inspectd run`'s Worker (a fresh one
     each round, on the main thread as under `inspectd run`); images/s from the first verdict to the last
     (start-up and group join excluded);
  3. where the worker's batches spend their time during the backlog (its own stage metrics: decode, score,
     Redis writes, commit; "decode" is the wait for what is left of it when the batch comes to be scored,
     since under a backlog a batch decodes while the one before it is scored);
  4. worker latency, in the last round: frames produced at a fixed share of the bare rate; produce ->
     verdict in Redis, p50/p99 (from the frame's ts header to the verdict stream entry's time).
The rounds run bare, worker, bare, worker, ..., bare: each worker round is divided by the mean of the bare
runs on either side of it, so a machine that speeds up or slows down over the run (shared cores move the
bare rate by 10-25 % here between runs minutes apart) moves both sides of each ratio. The median of the
rounds' ratios is the pipeline's overhead. Usage:

    python bench/bench_pipeline.py [--model DIR] [--image-size 256] [--hidden 64] [--frames 320]
        [--rounds 3] [--stream mixed|normal]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from kafka import KafkaProducer

from csflow.artifacts import load_model, save_model
from csflow.backbones import LITE0, LITE0_PACKAGE
from csflow.calibration import calibrate
from csflow.data import ImageLimits, decode_image, to_tensor
from csflow.elpv import ElpvExport, elpv_labels
from csflow.fit import build_model, resolve_device
from csflow.flow import FlowConfig
from csflow.inference import prepare_for_serving
from csflow.scoring import score_images
from csflow.serving_options import forward_batch
from daemon.config import Settings, load_settings
from daemon.logs import configure_logging
from daemon.worker import Worker
from lab.services import LocalKafka, LocalRedis


def frames(n: int, stream: str) -> list[bytes]:
    """The first n ELPV cells in the label file's order ("mixed": both cell types, about a third defective) or
    only normal cells of the type the models here train on (defect probability 0, `ElpvExport.cell_type`: a line
    in its steady state, where the drift monitor stays quiet)."""
    data_dir, rows = elpv_labels()
    cell_type = ElpvExport().cell_type
    chosen = rows if stream == "mixed" else [row for row in rows if row[1] == 0.0 and row[2] == cell_type]
    return [(data_dir / name).read_bytes() for name, _, _ in chosen[:n]]


def make_model(args: argparse.Namespace, out: Path) -> Path:
    if args.model:
        return Path(args.model)
    torch.manual_seed(0)
    model = build_model(LITE0, LITE0_PACKAGE, args.image_size, FlowConfig(hidden_channels=args.hidden))
    scores = score_images(model, torch.rand(4, 3, args.image_size, args.image_size)).image
    save_model(out, model, LITE0_PACKAGE, calibrate(scores, 0.25), {"purpose": "benchmark"})
    return out


def bare_rate(model_dir: Path, blobs: list[bytes], settings: Settings, device: torch.device) -> float:
    """The worker's model, serving options and forward batch, without Kafka, Redis or the worker's threads."""
    options = settings.model.worker_serving_options()
    model = prepare_for_serving(load_model(model_dir, str(device)).model, options)
    size, limits, batch = model.image_size, ImageLimits(), settings.worker.batch_size
    step = forward_batch(settings.worker.forward_batch, device.type, size, batch)
    score_images(model, torch.rand(2, 3, size, size), options=options)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(blobs), batch):
        images = torch.stack([to_tensor(decode_image(b, limits), size) for b in blobs[i : i + batch]])
        score_images(model, images, batch_size=step, options=options)
    return len(blobs) / (time.perf_counter() - t0)


def publish(producer: KafkaProducer, topic: str, blobs: list[bytes], tag: str, rate: float = 0.0) -> None:
    started = time.monotonic()
    for i, blob in enumerate(blobs):
        camera = f"cam-{i % 4}"
        headers = [
            ("frame_id", f"{tag}-{i}".encode()),
            ("camera_id", camera.encode()),
            ("ts", str(int(time.time() * 1000)).encode()),
            ("content_type", b"image/png"),
        ]
        producer.send(topic, key=camera.encode(), value=blob, headers=headers)
        if rate > 0:
            delay = started + (i + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    producer.flush()


def stream_times(client: redis.Redis, key: str, prefix: str) -> tuple[list[float], list[float]]:
    """(verdict time, frame ts) in ms for the stream entries whose frame id starts with prefix."""
    done, sent = [], []
    for entry_id, fields in client.xrange(key):
        if fields[b"frame_id"].decode().startswith(prefix):
            done.append(float(entry_id.split(b"-")[0]))
            sent.append(float(fields[b"ts"]))
    return done, sent


def wait_for(client: redis.Redis, key: str, total: int, timeout: float) -> None:
    """Until the verdict stream holds `total` entries (XLEN: reading the stream while the worker runs would
    take the GIL from the worker's thread in this same process)."""
    deadline = time.monotonic() + timeout
    while client.xlen(key) < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {total} verdicts after {timeout} s")
        time.sleep(0.25)


STAGES = ("decode", "score", "redis", "commit")  # the worker's batch stages (inspectd_stage_seconds)


def stage_means(worker: Worker) -> dict[str, float]:
    """Mean milliseconds per batch of each of the worker's stages so far, from its own metrics."""
    sample = worker.metrics.registry.get_sample_value
    means = {}
    for stage in STAGES:
        total = sample("inspectd_stage_seconds_sum", {"stage": stage}) or 0.0
        count = sample("inspectd_stage_seconds_count", {"stage": stage}) or 0.0
        means[stage] = 1000 * total / max(count, 1.0)
    return means


def drive(
    worker: Worker,
    producer: KafkaProducer,
    client: redis.Redis,
    key: str,
    before: int,
    tag: str,
    blobs: list[bytes],
    rate: float,
    measured: dict[str, Any],
) -> None:
    """Beside the worker: time its backlog (frames tagged `tag`, `before` verdicts already in the stream),
    then, when `rate` > 0, the latency of frames paced at `rate`; then stop it."""
    try:
        wait_for(client, key, before + len(blobs), timeout=3600)
        done, _ = stream_times(client, key, f"{tag}-")
        first_batch = sum(1 for t in done if t == done[0])
        measured["throughput"] = (len(done) - first_batch) / max((done[-1] - done[0]) / 1000, 1e-9)
        measured["stages"] = stage_means(worker)  # the backlog's batches (and the warm-up's)
        if rate > 0:
            paced = blobs[: max(64, len(blobs) // 2)]
            publish(producer, "frames", paced, "latency", rate=rate)
            wait_for(client, key, before + len(blobs) + len(paced), timeout=3600)
            done_l, sent_l = stream_times(client, key, "latency-")
            measured["latency"] = np.asarray(done_l) - np.asarray(sent_l)
            measured["rate"] = rate
    except Exception as exc:  # handed to the main thread
        measured["error"] = exc
    finally:
        worker.request_stop()


def worker_round(
    settings: Settings,
    model_dir: Path,
    device: torch.device,
    producer: KafkaProducer,
    client: redis.Redis,
    round_no: int,
    blobs: list[bytes],
    rate: float,
) -> dict[str, Any]:
    """One worker draining a backlog of `blobs` (after a few warm-up frames that make it join the group and
    run its first forward pass); with `rate` > 0 it then serves paced frames for the latency figures."""
    key = f"{settings.redis.key_prefix}verdicts"
    before = client.xlen(key)
    warm = blobs[:8]
    publish(producer, "frames", warm, f"warm-{round_no}")
    publish(producer, "frames", blobs, f"backlog-{round_no}")
    worker = Worker(settings, load_model(model_dir, str(device)), device)
    measured: dict[str, Any] = {}
    # The worker runs on the main thread, as under `inspectd run`. Scoring on a second thread would start
    # a second OpenMP team beside the one the bare model left on this thread, and libgomp spins less once
    # it manages more threads than CPUs (1.17x slower here): that would charge the worker for the
    # benchmark's own threading. The driver thread only sleeps, polls XLEN and publishes paced frames.
    driver = threading.Thread(
        target=drive,
        args=(worker, producer, client, key, before + len(warm), f"backlog-{round_no}", blobs, rate, measured),
    )
    driver.start()
    worker.run()
    driver.join()
    if "error" in measured:
        raise measured["error"]
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: random lite0 flow)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64, help="flow hidden channels of the random model")
    parser.add_argument("--frames", type=int, default=320)
    parser.add_argument(
        "--stream",
        choices=("mixed", "normal"),
        default="mixed",
        help="mixed: cells in the label file's order, both cell types, about a third defective (the drift monitor "
        "alarms and the worker caches more frames for confirmation); normal: defect-free cells of the trained "
        "type, a line in its steady state",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="worker rounds, each between two bare-model runs")
    parser.add_argument("--latency-load", type=float, default=0.5, help="latency phase rate as share of bare")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    device = resolve_device(args.device)
    blobs = frames(args.frames, args.stream)
    with tempfile.TemporaryDirectory() as tmp, LocalKafka() as kafka, LocalRedis() as server:
        model_dir = make_model(args, Path(tmp) / "model")
        kafka.create_topic("frames", 4)
        kafka.create_topic("frames.dlq", 1)
        os.environ.update(
            {
                "INSPECTD_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap,
                "INSPECTD_REDIS__URL": server.url,
                "INSPECTD_WORKER__MODEL_DIR": str(model_dir),
                "INSPECTD_WORKER__HTTP_PORT": "0",
                "INSPECTD_WORKER__BATCH_SIZE": str(args.batch),
                "INSPECTD_MODEL__DEVICE": str(device),
                "INSPECTD_KAFKA__SESSION_TIMEOUT_MS": "6000",
                "INSPECTD_LOG__LEVEL": "warning",
            }
        )
        settings = load_settings()
        configure_logging("warning", "console")
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, max_request_size=16 * 2**20, linger_ms=5)
        client = redis.Redis.from_url(server.url)
        bare = [bare_rate(model_dir, blobs, settings, device)]
        rounds = []
        for round_no in range(args.rounds):
            last = round_no == args.rounds - 1
            rate = bare[-1] * args.latency_load if last else 0.0
            rounds.append(worker_round(settings, model_dir, device, producer, client, round_no, blobs, rate))
            bare.append(bare_rate(model_dir, blobs, settings, device))
        producer.close()
    print(
        f"device {device}, image size {args.image_size}, batch {args.batch}, "
        f"{len(blobs)} ELPV frames (PNG, {args.stream}), {args.rounds} rounds"
    )
    print("round  bare before  worker  bare after  worker/bare  mean ms per batch: " + ", ".join(STAGES))
    ratios = []
    for i, measured in enumerate(rounds):
        ratio = measured["throughput"] / ((bare[i] + bare[i + 1]) / 2)
        ratios.append(ratio)
        stages = ", ".join(f"{ms:.0f}" for ms in measured["stages"].values())
        print(f"{i:5d}  {bare[i]:11.2f}  {measured['throughput']:6.2f}  {bare[i + 1]:10.2f}  {ratio:11.3f}  {stages}")
    print(
        f"bare model (decode + preprocess + score): median {np.median(bare):.2f} frames/s; "
        f"worker, Kafka -> Redis (backlog): median {np.median([m['throughput'] for m in rounds]):.2f} frames/s"
    )
    print(f"worker / bare, median of {len(ratios)} rounds: {np.median(ratios):.3f}")
    rate, latency = rounds[-1]["rate"], rounds[-1]["latency"]
    print(
        f"latency at {rate:.1f} frames/s ({args.latency_load:.0%} of bare): p50 {np.percentile(latency, 50):.0f} ms, "
        f"p99 {np.percentile(latency, 99):.0f} ms"
    )


if __name__ == "__main__":
    main()

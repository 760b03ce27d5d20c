"""Redis memory for a plant: what the worker keeps per camera-hour, and the projection for 50 cameras x 10 fps.

Starts a local redis-server and writes, through the worker's own VerdictStore, what a worker writes for
`--cameras` cameras at `--fps` for `--minutes` simulated minutes: one verdict per frame (Lua script: verdict
key + stream entry) and the frames the cache policy keeps, as the worker keeps them (decoded, resized to the
model's input size, PNG). Frames are camera-like 1280x1024 JPEGs of about 200 KB (a lit part with a grid,
blobs and sensor noise); scores are drawn per frame: normal parts from a log-normal (sigma `--score-sigma`)
whose threshold is its (1 - [calibration] target_fpr) quantile, and `--defect-rate` of the parts score twice
that. A second run puts `--alarm-cameras` cameras in drift alarm.

Method (time compressed): the run lasts seconds, well inside every TTL and retention, so nothing expires
and what Redis holds at the end is everything the written frames leave behind. INFO memory (used_memory,
before and after) gives the total; MEMORY USAGE per key splits it into verdict keys, the stream and cached
frames (the rest of used_memory, the keyspace's tables, is shared among the keys); each is divided
by what was written (verdicts, entries, cached frames) to give bytes per item. The plant projection
multiplies each by what a steady state holds at once, its rate times its window: verdict keys for
verdict_ttl_s (a cached frame's for frame_ttl_s when longer), stream entries for stream_retention_s capped at
stream_max_len, frames for frame_ttl_s. Beyond one window nothing grows, so 24 h of running holds the same
as one window. The former policy (every frame as sent for 1 h, verdict keys for 7 days, the stream capped by
count only) is measured the same way on a smaller sample and projected alike. Usage:

    python bench/bench_redis_memory.py [--cameras 4] [--fps 10] [--minutes 3] [--model-px 256]

Prints figures only (no pass/fail on timing); the goal for the defaults is <= 2 GB for 50 cameras x 10 fps.
"""

from __future__ import annotations

import argparse
import io
import time
from collections import Counter
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import redis
from PIL import Image

from csflow.data import ImageLimits, decode_image, to_tensor
from daemon.config import RedisSection, Settings
from daemon.frames import Frame
from daemon.store import CACHE_ALL, Keys, Verdict, VerdictStore
from lab.services import LocalRedis

PREFIX = "inspectd:"
GOAL_BYTES = 2e9  # the 2 GB (decimal: 1.86 GiB)
POOL = 6  # distinct frame images; every frame id is new, as on a line
BATCH = 16  # frames per write, as the worker's [worker] batch_size
FORMER = RedisSection(verdict_ttl_s=7 * 24 * 3600, frame_ttl_s=3600, stream_retention_s=0, stream_max_len=1_000_000)


def camera_frame(seed: int, noise: float = 4.0, quality: int = 90) -> bytes:
    """A 1280x1024 camera-like JPEG (about 200 KB): a lit part with a grid, dark blobs and sensor noise."""
    rng = np.random.default_rng(seed)
    h, w = 1024, 1280
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 120 + 60 * np.sin(x / w * np.pi) * np.cos(y / h * np.pi / 2) - 50 * (((x % 160) < 4) | ((y % 128) < 4))
    for _ in range(30):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 60)
        img -= 25 * (((x - cx) ** 2 + (y - cy) ** 2) < r * r)
    rgb = np.stack([img, img * 0.95, img * 0.9], -1) + rng.normal(0, noise, (h, w, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


@dataclass
class Measured:
    frames: int
    cached: int
    used: int  # used_memory after - before
    verdict_keys: int  # MEMORY USAGE sums
    stream: int
    frame_keys: int
    reasons: Counter

    def per(self, part: int, n: int) -> float:
        return part / n if n else 0.0


def memory_by_kind(client: redis.Redis, keys: Keys) -> tuple[int, int, int, int, int]:
    """Bytes of verdict keys, the verdicts stream and frame keys (MEMORY USAGE, every key); how many verdict
    and frame keys there are."""
    totals = {"verdict": 0, "frame": 0}
    counts = {"verdict": 0, "frame": 0}
    for kind in totals:
        batch = []
        for key in client.scan_iter(match=f"{keys.prefix}{kind}:*", count=1000):
            batch.append(key)
            counts[kind] += 1
            if len(batch) == 1000:
                totals[kind] += _usage(client, batch)
                batch = []
        totals[kind] += _usage(client, batch)
    stream = client.memory_usage(keys.verdicts, samples=0) or 0
    return totals["verdict"], stream, totals["frame"], counts["verdict"], counts["frame"]


def _usage(client: redis.Redis, batch: list[bytes]) -> int:
    pipe = client.pipeline(transaction=False)
    for key in batch:
        pipe.memory_usage(key, samples=0)
    return sum(n or 0 for n in pipe.execute())


def run(
    client: redis.Redis,
    cfg: RedisSection,
    cached_as_sent: bool,
    cameras: int,
    frames_per_camera: int,
    args: argparse.Namespace,
    pool: list[bytes],
    inputs: list[object],
    alarm_cameras: int = 0,
) -> Measured:
    """Write `frames_per_camera` frames of each camera through VerdictStore with `cfg`'s settings."""
    client.flushall()
    time.sleep(0.2)  # lazy freeing
    keys = Keys(PREFIX)
    policy = CACHE_ALL if cached_as_sent else cfg.cache_policy()
    store = VerdictStore(
        client, keys, cfg.verdict_ttl_s, cfg.frame_ttl_s, cfg.stream_max_len, policy, cfg.stream_retention_s
    )
    rng = np.random.default_rng(args.seed)
    # normal scores are log-normal(0, sigma): the threshold is their (1 - target_fpr) quantile
    threshold = float(np.exp(args.score_sigma * NormalDist().inv_cdf(1 - args.target_fpr)))
    before = int(client.info("memory")["used_memory"])
    t0_ms = int(time.time() * 1000)
    reasons: Counter = Counter()
    cached = 0
    pending: list[tuple[Verdict, Frame, int]] = []
    for n in range(frames_per_camera):
        for c in range(cameras):
            camera = f"cam-{c:02d}"
            ts = t0_ms + n * 1000 // args.fps
            score = float(np.exp(rng.normal(0, args.score_sigma)))
            if rng.random() < args.defect_rate:
                score *= 2.0
            k = int(rng.integers(POOL))
            frame_id = f"{camera}-{ts}-{n:07d}"
            drift = "alarm" if c < alarm_cameras else "ok"
            sha = f"{k:064x}"
            v = Verdict(
                frame_id, camera, ts, score, threshold, score > threshold, "v-1a2b3c4d5e6f", 12.5, drift, "", sha
            )
            pending.append((v, Frame(frame_id, camera, ts, "image/jpeg", pool[k], "frames", c, n), k))
            if len(pending) == BATCH:
                cached += _write(store, pending, inputs, cached_as_sent, reasons)
                pending = []
    if pending:
        cached += _write(store, pending, inputs, cached_as_sent, reasons)
    time.sleep(0.2)
    used = int(client.info("memory")["used_memory"]) - before
    verdict_keys, stream, frame_keys, n_verdicts, n_frames = memory_by_kind(client, keys)
    if (n_verdicts, n_frames) != (frames_per_camera * cameras, cached) or client.xlen(keys.verdicts) < n_verdicts:
        print("   WARNING: keys expired or were trimmed during the run (slower than a TTL): figures are low")
    # MEMORY USAGE leaves out the keyspace's own tables (dict and expires entries, about 50 B a key): the
    # rest of used_memory is shared among the keys, one verdict key per frame and one key per cached frame
    rest = max(0, used - verdict_keys - stream - frame_keys)
    n = frames_per_camera * cameras
    verdict_keys += rest * n // (n + cached)
    frame_keys += rest * cached // (n + cached)
    return Measured(frames_per_camera * cameras, cached, used, verdict_keys, stream, frame_keys, reasons)


def _write(
    store: VerdictStore,
    pending: list[tuple[Verdict, Frame, int]],
    inputs: list[object],
    cached_as_sent: bool,
    reasons: Counter,
) -> int:
    verdicts = [v for v, _, _ in pending]
    frames = [f for _, f, _ in pending]
    if cached_as_sent:
        cache = store.to_cache(verdicts, frames)
    else:
        cache = store.to_cache(verdicts, frames, [inputs[k] for _, _, k in pending])
        for v in verdicts:
            if v.frame_id in cache:
                reasons[store.policy.reason(v)] += 1
    store.write_all(verdicts, cache)
    return len(cache)


def project(m: Measured, cfg: RedisSection, plant_fps: float) -> dict[str, float]:
    """Bytes held at once in a plant writing `plant_fps` frames per second (all cameras), by kind."""
    share = m.cached / m.frames
    per_key, per_entry = m.per(m.verdict_keys, m.frames), m.per(m.stream, m.frames)
    per_frame = m.per(m.frame_keys, m.cached)
    longer = max(cfg.verdict_ttl_s, cfg.frame_ttl_s)
    verdict_keys = plant_fps * per_key * ((1 - share) * cfg.verdict_ttl_s + share * longer)
    window = cfg.stream_retention_s if cfg.stream_retention_s else float("inf")
    entries = min(plant_fps * window, cfg.stream_max_len)
    return {
        "verdict keys": verdict_keys,
        "verdicts stream": entries * per_entry,
        "cached frames": plant_fps * share * cfg.frame_ttl_s * per_frame,
    }


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def report(title: str, m: Measured, cfg: RedisSection, args: argparse.Namespace, minutes: float) -> float:
    cam_hours = args.cameras * minutes / 60
    print(f"\n== {title}")
    print(
        f"   {m.frames} frames written, {m.cached} cached ({100 * m.cached / m.frames:.2f} %"
        + (f": {', '.join(f'{k} {v}' for k, v in sorted(m.reasons.items()))}" if m.reasons else "")
        + ")"
    )
    print(
        f"   used_memory +{m.used / 1e6:.1f} MB (verdict keys {m.verdict_keys / 1e6:.1f},"
        f" stream {m.stream / 1e6:.1f}, frames {m.frame_keys / 1e6:.1f} MB)"
    )
    print(
        f"   per item: verdict key {m.per(m.verdict_keys, m.frames):.0f} B, stream entry"
        f" {m.per(m.stream, m.frames):.0f} B, cached frame {m.per(m.frame_keys, m.cached) / 1e3:.1f} KB"
    )
    print(f"   written per camera-hour: {m.used / cam_hours / 1e6:.1f} MB (used_memory / camera-hours written)")
    plant_fps = args.plant_cameras * args.fps
    parts = project(m, cfg, plant_fps)
    total = sum(parts.values())
    print(
        f"   held at once by {args.plant_cameras} cameras x {args.fps} fps (steady state, the same after"
        f" {args.hours} h): verdict keys {gb(parts['verdict keys'])} (ttl {cfg.verdict_ttl_s} s),"
        f" stream {gb(parts['verdicts stream'])} (retention {cfg.stream_retention_s or 'none'} s, max"
        f" {cfg.stream_max_len}), frames {gb(parts['cached frames'])} (ttl {cfg.frame_ttl_s} s)"
    )
    print(f"   TOTAL {gb(total)} = {total / (args.plant_cameras * 1e6):.1f} MB held per camera")
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cameras", type=int, default=4, help="cameras simulated")
    p.add_argument("--fps", type=int, default=10, help="frames per second per camera")
    p.add_argument("--minutes", type=float, default=3.0, help="simulated minutes of the new policy")
    p.add_argument("--former-minutes", type=float, default=0.5, help="simulated minutes of the former policy")
    p.add_argument("--model-px", type=int, default=0, help="model input size (0: [model] image_size)")
    p.add_argument("--score-sigma", type=float, default=0.25, help="log-normal sigma of normal scores")
    p.add_argument("--defect-rate", type=float, default=0.01, help="share of parts that are defective")
    p.add_argument("--alarm-cameras", type=int, default=1, help="cameras in drift alarm in the alarm run")
    p.add_argument("--plant-cameras", type=int, default=50)
    p.add_argument("--hours", type=float, default=24.0, help="hours the plant runs (steady state after a window)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    settings = Settings()
    cfg = settings.redis
    args.target_fpr = settings.calibration.target_fpr
    px = args.model_px or settings.model.image_size
    pool = [camera_frame(seed) for seed in range(POOL)]
    inputs = [to_tensor(decode_image(data, ImageLimits()), px) for data in pool]
    print(
        f"frames: {np.mean([len(d) for d in pool]) / 1e3:.0f} KB JPEG 1280x1024 (mean of {POOL}); model input"
        f" {px} px; threshold at the {1 - args.target_fpr:.2f} quantile of normal scores; defects"
        f" {100 * args.defect_rate:.1f} %"
    )
    print(
        f"policy: near_threshold {cfg.cache_near_threshold}, sample 1 in {cfg.cache_sample_every}, in alarm 1 in"
        f" {cfg.cache_alarm_every}; verdict_ttl_s {cfg.verdict_ttl_s}, frame_ttl_s {cfg.frame_ttl_s},"
        f" stream_retention_s {cfg.stream_retention_s}, stream_max_len {cfg.stream_max_len}"
    )
    with LocalRedis() as server, server.client() as client:
        baseline = int(client.info("memory")["used_memory"])
        print(f"empty Redis: used_memory {baseline / 1e6:.1f} MB (added to no projection)")
        n = int(args.minutes * 60 * args.fps)
        new = run(client, cfg, False, args.cameras, n, args, pool, inputs)
        total = report(
            f"defaults, {args.cameras} cameras x {args.minutes:g} min, no drift alarm", new, cfg, args, args.minutes
        )
        alarm = run(client, cfg, False, args.cameras, n, args, pool, inputs, alarm_cameras=args.alarm_cameras)
        extra = (alarm.frame_keys - new.frame_keys) / args.alarm_cameras
        per_frame = alarm.per(alarm.frame_keys, alarm.cached)
        held = args.fps / max(cfg.cache_alarm_every, 1) * cfg.frame_ttl_s * per_frame if cfg.cache_alarm_every else 0
        print(
            f"\n== a camera in drift alarm: +{extra / 1e6:.1f} MB of frames over {args.minutes:g} min;"
            f" held at once: {gb(held)} per camera in alarm (1 in {cfg.cache_alarm_every} frames for"
            f" {cfg.frame_ttl_s} s); with every frame cached it would be {gb(held * max(cfg.cache_alarm_every, 1))}"
        )
        m = int(args.former_minutes * 60 * args.fps)
        old = run(client, FORMER, True, args.cameras, m, args, pool, inputs)
        former = report(
            f"former policy (every frame as sent, ttl 3600 s; verdict keys 7 days; stream by count), {args.cameras}"
            f" cameras x {args.former_minutes:g} min",
            old,
            FORMER,
            args,
            args.former_minutes,
        )
    verdict = "meets" if total <= GOAL_BYTES else "MISSES"
    print(
        f"\n{args.plant_cameras} cameras x {args.fps} fps over {args.hours:g} h: {gb(total)} with the defaults"
        f" ({verdict} the 2 GB goal), {gb(former)} with the former policy ({former / total:.0f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Line page of the operator console for a line of cameras: how long one render takes.

Starts a local redis-server, writes what workers write for `--cameras` cameras (verdicts and cached PNG
frames through VerdictStore, one drift monitor state each, a drift alarm event for every fifth camera),
serves the console with uvicorn on a loopback port, logs in and times GET /line, which reads the newest
[console] recent_verdicts verdicts, the active versions, drift states and events and renders every tile
(thumbnails are separate requests, cached after the first; they are timed apart). Usage:

    python bench/bench_console.py [--cameras 50] [--frames-per-camera 100] [--repeats 30]

Prints the first render after the console started (it reads the whole window of verdicts), then the
median and p90 render time of the line page with one new frame per camera written before each request, as
on a running line (target: under 300 ms for 50 cameras), the same for the tiles fragment that the page
polls, and the first and cached thumbnail times.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import requests
from PIL import Image

from console.app import serving
from daemon.config import ConsoleSection, RedisSection, Settings
from daemon.events import Event, EventKind, EventLog
from daemon.frames import Frame
from daemon.store import Keys, Verdict, VerdictStore
from drift.config import DriftConfig
from drift.monitor import DriftMonitor
from lab.services import LocalRedis

TARGET_MS = 300.0
PREFIX = "bench:"
PASSWORD = "bench password"
FRAME_PX = 256


def frame_png(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 255, (FRAME_PX, FRAME_PX), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, "PNG")
    return out.getvalue()


def more_frames(store: VerdictStore, cameras: int, data: bytes) -> None:
    """One new verdict per camera, as a running line adds between two polls."""
    now = int(time.time() * 1000)
    frames = [
        Frame(f"cam-{c:02d}-{now}", f"cam-{c:02d}", now, "image/png", data, "frames", 0, 0) for c in range(cameras)
    ]
    verdicts = [Verdict(f.frame_id, f.camera_id, now, 0.6, 1.0, False, "v1", 3.0, "ok") for f in frames]
    store.write(verdicts, frames)


def seed(client, cameras: int, frames: int) -> list[str]:  # type: ignore[no-untyped-def]
    keys = Keys(PREFIX)
    store = VerdictStore(client, keys, 3600, 3600, 1_000_000)
    events = EventLog(client, keys, 100_000)
    rng = np.random.default_rng(0)
    reference = rng.gamma(9.0, 0.07, 300)
    thresholds = DriftMonitor(reference, DriftConfig(sim_alarms=10, sim_streams=10)).thresholds
    data = frame_png(rng)
    now = int(time.time() * 1000)
    last = []
    for c in range(cameras):
        camera = f"cam-{c:02d}"
        monitor = DriftMonitor(reference, DriftConfig(sim_alarms=10, sim_streams=10), thresholds)
        verdicts, cached = [], []
        for i in range(frames):
            score = float(rng.gamma(9.0, 0.07) * (1.8 if c % 5 == 0 and i > frames // 3 else 1.0))
            monitor.update(score)
            frame_id = f"{camera}-{i:04d}"
            ts = now - (frames - i) * 1000
            verdicts.append(Verdict(frame_id, camera, ts, score, 1.0, score > 1.0, "v1", 3.0, monitor.state))
            cached.append(Frame(frame_id, camera, ts, "image/png", data, "frames", 0, i))
        store.write(verdicts, cached)
        client.set(keys.drift(camera), json.dumps({"version": "v1", "state": monitor.state_dict()}))
        if monitor.drift_detected:
            events.append(Event(EventKind.DRIFT_ALARM, camera, "v1", monitor.summary()))
        last.append(verdicts[-1].frame_id)
    return last


def timed(session: requests.Session, url: str, repeats: int, before: Callable[[], None] = lambda: None) -> list[float]:
    times = []
    for _ in range(repeats):
        before()
        started = time.perf_counter()
        response = session.get(url)
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return times


def describe(name: str, times: list[float]) -> str:
    p90 = float(np.percentile(times, 90))
    return f"{name}: median {statistics.median(times):.0f} ms, p90 {p90:.0f} ms over {len(times)} requests"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", type=int, default=50)
    parser.add_argument("--frames-per-camera", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    from console.users import add_user

    with LocalRedis() as server, tempfile.TemporaryDirectory() as tmp:
        client = server.client()
        last_frames = seed(client, args.cameras, args.frames_per_camera)
        settings = Settings(
            redis=RedisSection(url=server.url, key_prefix=PREFIX),
            console=ConsoleSection(users_file=f"{tmp}/users.json", port=0),
        )
        add_user(settings.console.users_file, "bench", "viewer", PASSWORD)
        with serving(settings) as base:
            s = requests.Session()
            token = re.search(r'name="csrf" value="([^"]+)"', s.get(f"{base}/login").text).group(1)  # type: ignore[union-attr]
            s.post(f"{base}/login", data={"csrf": token, "username": "bench", "password": PASSWORD}).raise_for_status()
            started = time.perf_counter()
            page = s.get(f"{base}/line").text
            cold = (time.perf_counter() - started) * 1000
            tiles = page.count('class="tile ')
            assert tiles == args.cameras, f"{tiles} tiles for {args.cameras} cameras"
            store = VerdictStore(client, Keys(PREFIX), 3600, 3600, 1_000_000)
            data = frame_png(np.random.default_rng(1))
            line = timed(s, f"{base}/line", args.repeats, lambda: more_frames(store, args.cameras, data))
            fragment = timed(s, f"{base}/line/tiles", args.repeats, lambda: more_frames(store, args.cameras, data))
            first = [timed(s, f"{base}/thumbs/{f}", 1)[0] for f in last_frames]
            cached = [timed(s, f"{base}/thumbs/{f}", 1)[0] for f in last_frames]
    print(f"console line page, {args.cameras} cameras, {args.cameras * args.frames_per_camera} verdicts in Redis")
    print(f"GET /line, first after the console started (reads all {settings.console.recent_verdicts}): {cold:.0f} ms")
    print(describe("GET /line, a new frame per camera before each", line) + f" (target < {TARGET_MS:.0f} ms)")
    print(describe("GET /line/tiles (polled)", fragment))
    print(describe(f"thumbnail, first ({FRAME_PX} px PNG -> {settings.console.thumb_px} px JPEG)", first))
    print(describe("thumbnail, cached", cached))
    return 0 if statistics.median(line) < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())

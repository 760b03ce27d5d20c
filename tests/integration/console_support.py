"""Shared by the console tests: Redis seeded through the daemon's own classes, and a console served by uvicorn.

Seeding writes what a worker writes, with its classes: verdicts and cached frames (VerdictStore), drift
monitor states (a real DriftMonitor, saved as DriftWatch saves it), events (EventLog) and model versions
(ModelRegistry). Frames are real PNG images.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
import torch
from PIL import Image
from torch import Tensor

from adapters.adapt import AdaptConfig, adapt
from console.app import serving as console_serving
from console.users import add_user
from csflow.artifacts import load_model, save_adapter, save_model
from csflow.backbones import LITE0_PACKAGE
from csflow.calibration import calibrate
from csflow.model import CSFlow, image_scores
from daemon.config import ConsoleSection, RedisSection, Settings
from daemon.events import Event, EventKind, EventLog
from daemon.frames import Frame
from daemon.registry import REFUSED, ModelRegistry
from daemon.store import Keys, Verdict, VerdictStore
from drift.config import DriftConfig
from drift.monitor import DriftMonitor

PREFIX = "t:"
KEYS = Keys(PREFIX)
PASSWORD = "correct horse battery"
USERS = {"vera": "viewer", "otto": "operator", "ada": "admin"}
THRESHOLD = 1.0
START_MS = 1_700_000_000_000
SHIFT_AT = 20  # cam-1's frame where the shift starts (its monitor alarms some 50 frames later)


def png(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (np.linspace(40, 200, size)[None, :] + rng.normal(0, 12, (size, size))).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, "PNG")
    return out.getvalue()


def settings_for(redis_url: str, tmp: Path, **console: object) -> Settings:
    return Settings(
        redis=RedisSection(url=redis_url, key_prefix=PREFIX),
        console=ConsoleSection(users_file=str(tmp / "users.json"), redis_timeout_s=0.5, **console),
    )


def make_users(settings: Settings) -> None:
    for name, role in USERS.items():
        add_user(settings.console.users_file, name, role, PASSWORD)  # type: ignore[arg-type]


@dataclass
class Seeded:
    alarm_frames: list[str] = field(default_factory=list)  # cam-1's frames above threshold, newest last
    other_frames: list[str] = field(default_factory=list)  # cam-2's


def seed(client: redis.Redis, version: str = "v-source", frames: int = 110) -> Seeded:
    """cam-1 drifts into alarm (its later scores sit above the threshold); cam-2 stays normal."""
    store = VerdictStore(client, KEYS, verdict_ttl_s=3600, frame_ttl_s=3600, stream_max_len=100_000)
    events = EventLog(client, KEYS, max_len=10_000)
    rng = np.random.default_rng(3)
    reference = rng.gamma(9.0, 0.07, 200)
    seeded = Seeded()
    for camera, shifted in (("cam-1", True), ("cam-2", False)):
        monitor = DriftMonitor(reference, DriftConfig(sim_alarms=10, sim_streams=10))
        verdicts, cached, alarm_ts = [], [], 0
        for i in range(frames):
            shift = 1.8 if shifted and i >= SHIFT_AT else 1.0
            score = float(rng.gamma(9.0, 0.07) * shift)
            monitor.update(score)
            if monitor.drift_detected and not alarm_ts:
                alarm_ts = START_MS + i * 1000
            frame_id = f"{camera}-f{i:03d}"
            ts = START_MS + i * 1000
            verdicts.append(
                Verdict(frame_id, camera, ts, score, THRESHOLD, score > THRESHOLD, version, 3.0, monitor.state)
            )
            cached.append(Frame(frame_id, camera, ts, "image/png", png(i), "frames", 0, i))
            if score > THRESHOLD:
                (seeded.alarm_frames if shifted else seeded.other_frames).append(frame_id)
        store.write(verdicts, cached)
        client.set(KEYS.drift(camera), json.dumps({"version": version, "state": monitor.state_dict()}))
        if monitor.drift_detected:
            events.append(Event(EventKind.DRIFT_ALARM, camera, version, monitor.summary(), alarm_ts))
    return seeded


@contextmanager
def serving(settings: Settings, client: redis.Redis | None = None) -> Iterator[str]:
    """The console on a free loopback port, in a thread; yields its base URL."""
    free = settings.model_copy(update={"console": settings.console.model_copy(update={"port": 0})})
    with console_serving(free, client) as base:
        yield base


@dataclass(frozen=True)
class Published:
    base: str
    adapted: str  # an adapted version of base for cam-1, with the gate's figures in its summary


def publish_versions(
    registry: ModelRegistry, model: CSFlow, images: Tensor, root: Path, refused: list[str] | None = None
) -> Published:
    """A base version and an adapter of it, published and activated as a worker's controller would (with
    `refused`: the adapter is one the gate refused and a worker kept, with these failed checks)."""
    with torch.no_grad():
        calibration = calibrate(image_scores(model(images[:4]).z).numpy(), 0.2)
    base = save_model(root / "base", model, LITE0_PACKAGE, calibration, {"purpose": "console tests"})
    parent = load_model(root / "base")
    result = adapt(parent, images[4:6], AdaptConfig(lr=1e-3, max_steps=2, stop_quantile=None))
    summary = {**result.summary(), "gate": {"defect_detection": 0.95, "holdout_fpr": 0.0}, "camera_id": "cam-1"}
    if refused:
        summary[REFUSED] = refused
    adapted = save_adapter(root / "adapted", result.model, parent, result.block_names, summary, "cam-1", root / "base")
    registry.publish(root / "base")
    registry.publish(root / "adapted")
    registry.activate("default", base.version)
    registry.activate("camera:cam-1", base.version)  # pinned, as the controller pins a camera before adapting it
    return Published(base.version, adapted.version)

"""A camera simulator: publishes image files as frames, at a rate, for one or more cameras.

Used for demos and load tests. A domain shift can be switched on after N frames, the way a line
changes when a lamp is replaced or a new batch of material arrives.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kafka import KafkaProducer
from PIL import Image

from adapters.shifts import Shift
from csflow.data import ImageLimits, list_images, load_dataset, read_image

FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}


def source_images(folder: Path) -> list[Path]:
    """A dataset's test images (MVTec layout), else its training images, else a plain folder."""
    if (folder / "train").is_dir():
        dataset = load_dataset(folder)
        return [s.path for s in dataset.test] or [s.path for s in dataset.train]
    return list_images(folder)


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=FORMATS[fmt][0])
    return buffer.getvalue()


@dataclass(frozen=True)
class CameraPlan:
    images: Sequence[Path]
    cameras: Sequence[str]
    count: int
    rate: float  # frames per second over all cameras; 0 = as fast as possible
    fmt: str = "png"
    shift: Shift | None = None
    shift_after: int = 0


def produce(producer: KafkaProducer, topic: str, plan: CameraPlan, limits: ImageLimits) -> list[str]:
    """Publish `plan.count` frames; returns their frame ids in order."""
    if not plan.images:
        raise ValueError("no images to publish")
    run = uuid.uuid4().hex[:8]
    cache: dict[tuple[int, bool], bytes] = {}
    ids = []
    started = time.monotonic()
    for i in range(plan.count):
        k = i % len(plan.images)
        shifted = plan.shift is not None and i >= plan.shift_after
        if (k, shifted) not in cache:
            pixels = read_image(plan.images[k], limits)
            cache[(k, shifted)] = encode(plan.shift(pixels) if shifted else pixels, plan.fmt)
        camera = plan.cameras[i % len(plan.cameras)]
        frame_id = f"{camera}-{run}-{i:07d}"
        headers = [
            ("frame_id", frame_id.encode()),
            ("camera_id", camera.encode()),
            ("ts", str(int(time.time() * 1000)).encode()),
            ("content_type", FORMATS[plan.fmt][1].encode()),
            ("source_image", plan.images[k].name.encode()),
            ("shifted", b"1" if shifted else b"0"),
        ]
        producer.send(topic, key=camera.encode(), value=cache[(k, shifted)], headers=headers)
        ids.append(frame_id)
        if plan.rate > 0:
            delay = started + (i + 1) / plan.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    producer.flush()
    return ids

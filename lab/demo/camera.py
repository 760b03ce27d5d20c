"""The demo's camera: ELPV test cells published to Kafka at a steady rate, shifted from a given frame on."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kafka import KafkaProducer

from adapters.shifts import Shift
from csflow.data import ImageLimits, Sample, read_image
from lab.demo.spec import DemoSpec
from lab.producer import FORMATS, encode


@dataclass(frozen=True)
class SentFrame:
    """One published frame and its ground truth."""

    index: int
    frame_id: str
    source: str  # image file name
    defective: bool
    shifted: bool
    sent_s: float  # seconds since the demo's stream started


class Camera:
    """Publishes ELPV test cells at a steady rate, normal ones with a few defective ones in a seeded order;
    frames from `spec.frames_before` on go through the domain shift. Runs from `start()` until `stop()`.

    Unlike a real camera it holds back while `spec.max_in_flight` frames wait for their verdict (the owner
    sets `scored`), so that a machine slower than the rate, or busy adapting, does not pile up a backlog
    that the demo would then wait for."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        camera: str,
        test: list[Sample],
        spec: DemoSpec,
        shift: Shift,
        limits: ImageLimits,
        t0: float,
    ) -> None:
        self.topic, self.camera, self.spec, self.shift, self.limits, self.t0 = topic, camera, spec, shift, limits, t0
        self.normal = [s for s in test if not s.anomalous]
        self.defective = [s for s in test if s.anomalous]
        if not self.normal:
            raise ValueError(f"{spec.data}/test holds no normal images to stream")
        self.frames: list[SentFrame] = []
        self.scored = 0  # set by the owner as verdicts arrive
        self.by_id: dict[str, SentFrame] = {}
        self.error: str | None = None
        self._run = uuid.uuid4().hex[:6]
        self._rng = np.random.default_rng(spec.seed)
        self._queues: dict[bool, list[Sample]] = {False: [], True: []}
        self._cache: dict[tuple[Path, bool], bytes] = {}
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._publish, name="camera", daemon=True)
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="inspectd-demo-camera", acks="all")

    @property
    def sent(self) -> int:
        return len(self.frames)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing (idempotent); frames already sent are flushed."""
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._producer.close(timeout=10)

    def _next(self) -> Sample:
        defective = bool(self.defective) and self._rng.random() < self.spec.defect_share
        queue = self._queues[defective]
        if not queue:  # every image once per round, in a seeded order
            pool = self.defective if defective else self.normal
            queue.extend(pool[i] for i in self._rng.permutation(len(pool)))
        return queue.pop()

    def _publish(self) -> None:
        fmt, due = "png", time.monotonic()
        try:
            while not self._halt.is_set():
                i = len(self.frames)
                sample = self._next()
                shifted = i >= self.spec.frames_before
                key = (sample.path, shifted)
                if key not in self._cache:
                    pixels = read_image(sample.path, self.limits)
                    self._cache[key] = encode(self.shift(pixels) if shifted else pixels, fmt)
                kind = "defective" if sample.anomalous else "normal"
                frame_id = f"{self.camera}-{self._run}-{i:05d}-{kind}"
                headers = [
                    ("frame_id", frame_id.encode()),
                    ("camera_id", self.camera.encode()),
                    ("ts", str(int(time.time() * 1000)).encode()),
                    ("content_type", FORMATS[fmt][1].encode()),
                    ("source_image", sample.path.name.encode()),
                    ("shifted", b"1" if shifted else b"0"),
                ]
                self._producer.send(self.topic, key=self.camera.encode(), value=self._cache[key], headers=headers)
                frame = SentFrame(i, frame_id, sample.path.name, sample.anomalous, shifted, time.monotonic() - self.t0)
                self.by_id[frame_id] = frame
                self.frames.append(frame)
                due = max(due, time.monotonic()) + 1 / self.spec.rate  # no burst to catch up after a pause
                while not self._halt.is_set() and (
                    time.monotonic() < due or self.sent - self.scored >= self.spec.max_in_flight
                ):
                    self._halt.wait(min(0.05, max(due - time.monotonic(), 0.005)))
            self._producer.flush(timeout=10)
        except Exception as exc:  # the main loop reports it and stops the demo
            self.error = f"{type(exc).__name__}: {exc}"

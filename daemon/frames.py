"""Camera frames as they arrive from Kafka: headers checked, bytes bounded, image decoded.

Anything wrong with a frame raises `BadFrame` with a reason; the worker sends it to the dead-letter
topic and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from csflow.data import ImageError, ImageLimits, decode_image

CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
MAX_HEADER_BYTES = 256


class BadFrame(ValueError):
    """A frame that cannot be scored; `reason` goes into the dead-letter record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Frame:
    frame_id: str
    camera_id: str
    ts_ms: int
    content_type: str
    data: bytes
    topic: str
    partition: int
    offset: int

    @property
    def source(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


def _headers(raw: list[tuple[str, bytes]] | None) -> dict[str, str]:
    headers = {}
    for name, value in raw or []:
        if value is None or len(value) > MAX_HEADER_BYTES:
            raise BadFrame(f"header {name!r} is missing a value or longer than {MAX_HEADER_BYTES} bytes")
        try:
            headers[name] = value.decode()
        except UnicodeDecodeError as exc:
            raise BadFrame(f"header {name!r} is not UTF-8") from exc
    return headers


def parse_record(record: object, max_bytes: int) -> Frame:
    """A Kafka ConsumerRecord as a `Frame`; `frame_id` defaults to topic:partition:offset."""
    topic, partition, offset = record.topic, record.partition, record.offset
    headers = _headers(record.headers)
    value: bytes | None = record.value
    if not value:
        raise BadFrame("empty frame")
    if len(value) > max_bytes:
        raise BadFrame(f"frame of {len(value)} bytes exceeds the limit of {max_bytes}")
    camera_id = headers.get("camera_id") or (record.key.decode(errors="replace") if record.key else "")
    missing = [
        name
        for name, v in (
            ("camera_id", camera_id),
            ("ts", headers.get("ts")),
            ("content_type", headers.get("content_type")),
        )
        if not v
    ]
    if missing:
        raise BadFrame(f"missing header(s): {', '.join(missing)}")
    try:
        ts_ms = int(headers["ts"])
    except ValueError as exc:
        raise BadFrame(f"header ts is not an integer millisecond epoch: {headers['ts']!r}") from exc
    content_type = headers["content_type"]
    if content_type not in CONTENT_TYPES:
        raise BadFrame(f"content_type {content_type!r} is not one of {', '.join(CONTENT_TYPES)}")
    frame_id = headers.get("frame_id") or f"{topic}:{partition}:{offset}"
    return Frame(frame_id, camera_id, ts_ms, content_type, value, topic, partition, offset)


def decode_frame(frame: Frame, limits: ImageLimits) -> np.ndarray:
    """RGB pixels of a frame, decoded only with the decoder its content_type names."""
    image_format = CONTENT_TYPES[frame.content_type]
    if image_format not in limits.formats:
        raise BadFrame(f"content_type {frame.content_type!r} is not allowed by limits.image_formats")
    try:
        return decode_image(
            frame.data, ImageLimits(limits.max_bytes, limits.max_pixels, (image_format,)), frame.frame_id
        )
    except ImageError as exc:
        raise BadFrame(str(exc)) from exc

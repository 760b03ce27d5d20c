"""Camera frames as they arrive from Kafka: headers checked, bytes bounded, image decoded.

Anything wrong with a frame raises `BadFrame` with a reason code from `REASONS` (a fixed set, so that
metric labels and DLQ consumers can rely on it) and a free-text detail; the worker sends the frame to the
dead-letter topic and goes on.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from csflow.data import ImageError, ImageLimits, decode_image

CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
MAX_HEADER_BYTES = 256
MAX_HEADERS = 32  # a camera sends four; a record with hundreds is not a camera's
# Camera and frame ids end up in Redis key names, metric labels and logs: letters, digits, ".", "_", "-".
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

# Dead-letter reason codes. Every dead letter carries exactly one of these in its `reason` header.
REASONS = (
    "empty_frame",  # no value (a tombstone) or zero bytes
    "too_large",  # more bytes than [kafka] max_message_bytes / [limits] max_image_bytes
    "bad_header",  # a header without a value, not UTF-8, too long, or too many headers
    "missing_header",
    "bad_ts",
    "bad_content_type",
    "format_not_allowed",  # the content type's decoder is not in [limits] image_formats
    "too_many_pixels",
    "undecodable",  # the decoder refused the bytes
    "parse_error",  # an unexpected exception while parsing the record (a bug or an unforeseen input)
    "decode_error",  # an unexpected exception while decoding the image
    "score_error",  # the model raised on this frame
    "unreadable_record",  # the Kafka client could not deserialise the record: a stub names its offset
    "bad_id",  # a camera or frame id outside ID_PATTERN
    "camera_mismatch",  # the Kafka key and the camera_id header name different cameras
    "duplicate_frame_id",  # a frame id that already has a verdict for other bytes
    "crash_loop",  # in flight when the process died [worker] max_attempts times (daemon/attempts.py)
)


class BadFrame(ValueError):
    """A frame that cannot be scored: `reason` (one of `REASONS`) and `detail` go into the dead letter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown dead-letter reason {reason!r}")
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason


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

    @cached_property
    def sha256(self) -> str:
        """Of the frame's bytes: the verdict carries it, so a frame id reused for other bytes is told apart
        from a redelivery of the same frame."""
        return hashlib.sha256(self.data).hexdigest()


def _headers(raw: list[tuple[str, bytes]] | None) -> dict[str, str]:
    raw = raw or []
    if len(raw) > MAX_HEADERS:
        raise BadFrame("bad_header", f"{len(raw)} headers, more than {MAX_HEADERS}")
    headers = {}
    for name, value in raw:
        if value is None or len(value) > MAX_HEADER_BYTES:
            raise BadFrame(
                "bad_header", f"header {name[:64]!r} is missing a value or longer than {MAX_HEADER_BYTES} bytes"
            )
        try:
            headers[name] = value.decode()
        except UnicodeDecodeError as exc:
            raise BadFrame("bad_header", f"header {name[:64]!r} is not UTF-8") from exc
    return headers


def parse_record(record: object, max_bytes: int) -> Frame:
    """A Kafka ConsumerRecord as a `Frame`; `frame_id` defaults to topic:partition:offset.

    The camera is the Kafka key (which the partitioner used) and the `camera_id` header; either may be
    absent, but when both are present they must be equal, else the frame is dead-lettered
    (`camera_mismatch`) rather than silently served under one of the two. Ids must match `ID_PATTERN`
    (`bad_id`); the default frame id is built from the topic name (Kafka allows the same characters) and
    numbers, with ":" between them."""
    topic, partition, offset = record.topic, record.partition, record.offset
    headers = _headers(record.headers)
    value: bytes | None = record.value
    if not value:
        raise BadFrame("empty_frame", "empty frame (no value)")
    if len(value) > max_bytes:
        raise BadFrame("too_large", f"frame of {len(value)} bytes exceeds the limit of {max_bytes}")
    key_camera = record.key.decode(errors="replace") if record.key else ""
    header_camera = headers.get("camera_id", "")
    if key_camera and header_camera and key_camera != header_camera:
        raise BadFrame(
            "camera_mismatch", f"Kafka key {key_camera[:64]!r} and camera_id header {header_camera[:64]!r} differ"
        )
    camera_id = header_camera or key_camera
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
        raise BadFrame("missing_header", f"missing header(s): {', '.join(missing)}")
    try:
        ts_ms = int(headers["ts"])
    except ValueError as exc:
        raise BadFrame("bad_ts", f"header ts is not an integer millisecond epoch: {headers['ts'][:64]!r}") from exc
    content_type = headers["content_type"]
    if content_type not in CONTENT_TYPES:
        raise BadFrame(
            "bad_content_type", f"content_type {content_type[:64]!r} is not one of {', '.join(CONTENT_TYPES)}"
        )
    for name, ident in (("camera_id", camera_id), ("frame_id", headers.get("frame_id"))):
        if ident and not ID_PATTERN.fullmatch(ident):
            raise BadFrame("bad_id", f"{name} {ident[:64]!r} is not 1-128 of A-Z a-z 0-9 . _ -")
    frame_id = headers.get("frame_id") or f"{topic}:{partition}:{offset}"
    return Frame(frame_id, camera_id, ts_ms, content_type, value, topic, partition, offset)


def decode_frame(frame: Frame, limits: ImageLimits) -> np.ndarray:
    """RGB pixels of a frame, decoded only with the decoder its content_type names."""
    image_format = CONTENT_TYPES[frame.content_type]
    if image_format not in limits.formats:
        raise BadFrame(
            "format_not_allowed", f"content_type {frame.content_type!r} is not allowed by limits.image_formats"
        )
    if len(frame.data) > limits.max_bytes:
        raise BadFrame("too_large", f"{len(frame.data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        return decode_image(
            frame.data, ImageLimits(limits.max_bytes, limits.max_pixels, (image_format,)), frame.frame_id
        )
    except ImageError as exc:
        reason = "too_many_pixels" if "pixels exceeds" in str(exc) else "undecodable"
        raise BadFrame(reason, str(exc)) from exc

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from csflow.data import ImageLimits
from daemon.frames import REASONS, BadFrame, decode_frame, parse_record


@dataclass
class Record:
    value: bytes | None
    headers: list[tuple[str, bytes]]
    key: bytes | None = b"cam-1"
    topic: str = "frames"
    partition: int = 2
    offset: int = 41


def png(size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


HEADERS = [("frame_id", b"f-1"), ("camera_id", b"cam-1"), ("ts", b"1700000000000"), ("content_type", b"image/png")]


def test_parse_complete_record() -> None:
    frame = parse_record(Record(png(), HEADERS), max_bytes=10_000)
    assert (frame.frame_id, frame.camera_id, frame.ts_ms, frame.content_type) == (
        "f-1",
        "cam-1",
        1700000000000,
        "image/png",
    )
    assert decode_frame(frame, ImageLimits()).shape == (32, 32, 3)


def test_frame_id_and_camera_fall_back_to_position_and_key() -> None:
    headers = [h for h in HEADERS if h[0] not in ("frame_id", "camera_id")]
    frame = parse_record(Record(png(), headers, key=b"cam-7"), max_bytes=10_000)
    assert frame.frame_id == "frames:2:41" and frame.camera_id == "cam-7"
    frame = parse_record(Record(png(), HEADERS, key=None), max_bytes=10_000)
    assert frame.camera_id == "cam-1"


@pytest.mark.parametrize(
    ("record", "code", "detail"),
    [
        (Record(png(), []), "missing_header", "missing header(s): ts, content_type"),
        (Record(png(), [], key=None), "missing_header", "missing header(s): camera_id, ts, content_type"),
        (Record(None, HEADERS), "empty_frame", "empty frame"),
        (Record(png(), [*HEADERS[:2], ("ts", b"yesterday"), HEADERS[3]]), "bad_ts", "ts is not an integer"),
        (Record(png(), [*HEADERS[:3], ("content_type", b"image/gif")]), "bad_content_type", "'image/gif'"),
        (Record(png(), [*HEADERS, ("note", b"\xff\xfe")]), "bad_header", "not UTF-8"),
        (Record(png(), [*HEADERS, ("note", b"x" * 300)]), "bad_header", "longer than"),
        (Record(png(), [*HEADERS, ("note", None)]), "bad_header", "missing a value"),
        (Record(png(), [*HEADERS, *[("n", b"")] * 1000]), "bad_header", "1004 headers"),
        (Record(b"x" * 20_000, HEADERS), "too_large", "exceeds the limit of 10000"),
        (Record(png(), HEADERS, key=b"cam-2"), "camera_mismatch", "'cam-2' and camera_id header 'cam-1' differ"),
        (Record(png(), [("camera_id", b"c*:\nc*"), *HEADERS[2:]], key=None), "bad_id", "camera_id 'c*:\\nc*'"),
        (Record(png(), HEADERS[2:], key=b"cam 1"), "bad_id", "camera_id 'cam 1'"),
        (Record(png(), [("frame_id", b"f" * 129), *HEADERS[1:]]), "bad_id", "frame_id"),
        (Record(png(), [("frame_id", b"a/b"), *HEADERS[1:]]), "bad_id", "frame_id 'a/b'"),
    ],
)
def test_bad_records_name_the_reason(record: Record, code: str, detail: str) -> None:
    with pytest.raises(BadFrame) as info:
        parse_record(record, max_bytes=10_000)
    assert info.value.reason == code and code in REASONS
    assert detail in info.value.detail


def test_decode_refuses_content_type_mismatch_and_bombs() -> None:
    jpeg_claim = [*HEADERS[:3], ("content_type", b"image/jpeg")]
    with pytest.raises(BadFrame, match="not a decodable image"):
        decode_frame(parse_record(Record(png(), jpeg_claim), 10_000), ImageLimits())
    with pytest.raises(BadFrame, match="pixels exceeds"):
        decode_frame(parse_record(Record(png(64), HEADERS), 100_000), ImageLimits(max_pixels=1000))
    with pytest.raises(BadFrame, match="not allowed"):
        decode_frame(parse_record(Record(png(), HEADERS), 10_000), ImageLimits(formats=("JPEG",)))

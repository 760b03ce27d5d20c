"""`inspectd produce`, the camera simulator, against a real Kafka-protocol broker."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer
from PIL import Image

from cli.main import main
from lab.services import LocalKafka


@pytest.fixture(scope="module")
def tansu() -> Iterator[LocalKafka]:
    with LocalKafka() as kafka:
        yield kafka


def test_produce_publishes_frames_with_headers_and_switches_a_shift_on(
    tansu: LocalKafka, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    for key in [k for k in os.environ if k.startswith("INSPECTD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("INSPECTD_KAFKA__BOOTSTRAP_SERVERS", tansu.bootstrap)
    tansu.create_topic("sim", 1)
    args = [
        "produce",
        "--images",
        str(tmp_path),
        "--count",
        "8",
        "--rate",
        "0",
        "--cameras",
        "a,b",
        "--shift",
        "gray",
        "--shift-after",
        "5",
        "--topic",
        "sim",
    ]
    assert main(args) == 0
    consumer = KafkaConsumer(
        "sim", bootstrap_servers=tansu.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=10_000
    )
    records = [r for _, r in zip(range(8), consumer, strict=False)]
    consumer.close()
    assert len(records) == 8
    headers = [dict(r.headers) for r in records]
    assert [h["camera_id"] for h in headers] == [b"a", b"b"] * 4
    assert [r.key for r in records] == [b"a", b"b"] * 4
    assert len({h["frame_id"] for h in headers}) == 8
    assert all(h["content_type"] == b"image/png" and int(h["ts"]) > 0 for h in headers)
    assert [h["shifted"] for h in headers] == [b"0"] * 5 + [b"1"] * 3
    pixels = [np.asarray(Image.open(io.BytesIO(r.value))) for r in records]
    assert np.array_equal(pixels[0], np.asarray(Image.open(tmp_path / "0.png")))
    for p in pixels[5:]:
        assert np.array_equal(p[..., 0], p[..., 1]) and np.array_equal(p[..., 1], p[..., 2])
    assert not np.array_equal(pixels[3][..., 0], pixels[3][..., 1])


def test_produce_unknown_shift_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["produce", "--images", str(tmp_path), "--shift", "sepia"]) == 1
    assert "unknown shift 'sepia'" in capsys.readouterr().err

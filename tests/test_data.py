"""Bounded image decoding, the MVTec AD layout and plain image folders."""

from __future__ import annotations

import io
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csflow.data import (
    DatasetError,
    ImageError,
    ImageLimits,
    decode_image,
    load_batch,
    load_dataset,
    read_image,
    read_mask,
    to_tensor,
)

LIMITS = ImageLimits()


def rgb_array(h: int = 12, w: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_png_decodes_exactly() -> None:
    arr = rgb_array()
    out = decode_image(encode(Image.fromarray(arr), "PNG"), LIMITS)
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    assert np.array_equal(out, arr)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP"])
def test_other_formats_decode_to_rgb(fmt: str) -> None:
    arr = np.full((16, 24, 3), (200, 40, 90), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(arr), fmt), LIMITS)
    assert out.dtype == np.uint8 and out.shape == (16, 24, 3)
    assert np.abs(out.astype(int) - arr.astype(int)).max() <= 10  # lossy formats


def test_grayscale_becomes_rgb() -> None:
    gray = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    out = decode_image(encode(Image.fromarray(gray, mode="L"), "PNG"), LIMITS)
    assert out.shape == (12, 20, 3)
    for c in range(3):
        assert np.array_equal(out[..., c], gray)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_other_8bit_modes_become_rgb(mode: str) -> None:
    out = decode_image(encode(Image.fromarray(rgb_array()).convert(mode), "PNG"), LIMITS)
    assert out.shape == (12, 20, 3) and out.dtype == np.uint8


def test_16bit_png_rejected_naming_the_mode() -> None:
    data = encode(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), "PNG")
    with Image.open(io.BytesIO(data)) as img:
        mode = img.mode
    assert mode.startswith("I")
    with pytest.raises(ImageError, match=f"mode '{mode}'"):
        decode_image(data, LIMITS)


def test_cmyk_jpeg_rejected_naming_the_mode() -> None:
    data = encode(Image.fromarray(rgb_array()).convert("CMYK"), "JPEG")
    with pytest.raises(ImageError, match="'CMYK'"):
        decode_image(data, LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_rejected(fmt: str) -> None:
    data = encode(Image.fromarray(rgb_array(64, 64)), fmt)
    with pytest.raises(ImageError, match="corrupt"):
        decode_image(data[: len(data) // 2], LIMITS)


@pytest.mark.parametrize("data", [b"", b"not an image at all", bytes(range(256)) * 4])
def test_garbage_rejected(data: bytes) -> None:
    with pytest.raises(ImageError):
        decode_image(data, LIMITS)


def test_random_corruptions_only_ever_raise_image_error() -> None:
    """Byte flips and truncations of valid files either decode to RGB or raise ImageError, nothing else."""
    rng = random.Random(0)
    for fmt in ("PNG", "JPEG", "BMP", "WEBP"):
        valid = encode(Image.fromarray(rgb_array(16, 16)), fmt)
        for _ in range(40):
            data = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[: rng.randrange(len(data))]
            try:
                out = decode_image(bytes(data), ImageLimits(max_pixels=100_000))
            except ImageError:
                continue
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


def test_gif_not_in_formats_rejected() -> None:
    data = encode(Image.fromarray(rgb_array()).convert("P"), "GIF")
    with pytest.raises(ImageError, match="not a decodable image"):
        decode_image(data, LIMITS)
    assert decode_image(data, ImageLimits(formats=("GIF",))).shape == (12, 20, 3)


def test_too_many_bytes_rejected_before_decoding() -> None:
    data = encode(Image.fromarray(rgb_array()), "PNG")
    with pytest.raises(ImageError, match="bytes exceeds"):
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))
    assert decode_image(data, ImageLimits(max_bytes=len(data))).shape == (12, 20, 3)


def test_too_many_pixels_rejected() -> None:
    data = encode(Image.fromarray(rgb_array(12, 20)), "PNG")
    with pytest.raises(ImageError, match="pixels exceeds"):
        decode_image(data, ImageLimits(max_pixels=239))
    assert decode_image(data, ImageLimits(max_pixels=240)).shape == (12, 20, 3)


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header was rewritten to claim width x height pixels."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then chunk length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def test_pixel_limit_checked_from_the_header() -> None:
    """A tiny file claiming 9000 x 9000 pixels is refused from its header, before any decoding."""
    data = png_claiming_size(9000, 9000)
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (9000, 9000)
    with pytest.raises(ImageError, match="9000x9000 = 81000000 pixels exceeds"):
        decode_image(data, ImageLimits(max_pixels=50_000_000))


def test_read_image(tmp_path: Path) -> None:
    arr = rgb_array()
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    assert np.array_equal(read_image(path, LIMITS), arr)
    with pytest.raises(ImageError, match="bytes exceeds"):
        read_image(path, ImageLimits(max_bytes=10))


def test_read_image_missing_or_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"missing\.png"):
        read_image(tmp_path / "missing.png", LIMITS)
    with pytest.raises(ImageError):
        read_image(tmp_path, LIMITS)


def test_read_image_names_the_file_on_decode_errors(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match=r"broken\.jpg"):
        read_image(path, LIMITS)


def test_to_tensor_resizes_and_scales() -> None:
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[..., 0] = 255
    t = to_tensor(arr, 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert torch.allclose(t[0], torch.ones(16, 16)) and torch.count_nonzero(t[1:]) == 0


def test_to_tensor_is_the_exact_pixel_over_255_in_channel_first_layout() -> None:
    arr = rgb_array(40, 30, seed=3)
    t = to_tensor(arr, 40)  # the height is kept; the width is resized
    resized = np.array(Image.fromarray(arr).resize((40, 40), Image.Resampling.BILINEAR))
    assert t.is_contiguous()
    assert torch.equal(t, torch.from_numpy(resized).permute(2, 0, 1).float() / 255.0)


# Run with two OpenMP threads (conftest.py pins the tests' process to one, under which no team is started).
NATIVE_THREADS_AFTER_DECODE_ON_A_THREAD = """
import os, threading
import numpy as np, torch
from csflow.data import to_tensor

def native_threads() -> int:
    return len(os.listdir("/proc/self/task")) - threading.active_count()

torch.ones(1 << 20).add_(1)  # the scoring thread's own OpenMP team
before = native_threads()
decoded, release = threading.Event(), threading.Event()

def decode() -> None:
    to_tensor(np.zeros((300, 300, 3), np.uint8), 256)
    decoded.set()
    release.wait()

pool_thread = threading.Thread(target=decode)
pool_thread.start()
decoded.wait()
print(native_threads() - before)
release.set()
pool_thread.join()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_decoding_on_another_thread_starts_no_openmp_team() -> None:
    """A torch op on a decode thread gave that thread an OpenMP team of its own; with more threads to manage
    than CPUs, libgomp stops spinning between parallel regions and the scoring thread's passes slowed
    (bench/bench_pipeline.py: worker/bare 0.68-0.83 with it, median 1.02 without; docs/RESULTS.md)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", NATIVE_THREADS_AFTER_DECODE_ON_A_THREAD], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 0, "the decode thread started OpenMP threads of its own"


def save_png(path: Path, seed: int = 0, mask: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        arr = np.zeros((16, 16), dtype=np.uint8)
        arr[4:8, 4:8] = 255
        Image.fromarray(arr, mode="L").save(path)
    else:
        Image.fromarray(rgb_array(16, 16, seed)).save(path)


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    root = tmp_path / "bottle"
    for i in range(3):
        save_png(root / "train" / "good" / f"{i:03d}.png", seed=i)
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    for i in range(2):
        save_png(root / "test" / "good" / f"{i:03d}.png", seed=10 + i)
    for i in range(2):
        save_png(root / "test" / "crack" / f"{i:03d}.png", seed=20 + i)
    save_png(root / "test" / "scratch" / "000.png", seed=30)
    save_png(root / "ground_truth" / "crack" / "000_mask.png", mask=True)
    save_png(root / "ground_truth" / "crack" / "001_mask.png", mask=True)
    # scratch/000 has no mask on purpose
    return root


def test_mvtec_layout(mvtec_root: Path) -> None:
    ds = load_dataset(mvtec_root)
    assert ds.root == mvtec_root
    assert [s.path.name for s in ds.train] == ["000.png", "001.png", "002.png"]
    assert not any(s.anomalous for s in ds.train)
    assert len(ds.test) == 5
    by_key = {(s.defect_type, s.path.name): s for s in ds.test}
    assert set(by_key) == {
        ("good", "000.png"),
        ("good", "001.png"),
        ("crack", "000.png"),
        ("crack", "001.png"),
        ("scratch", "000.png"),
    }
    for (defect, name), sample in by_key.items():
        assert sample.anomalous == (defect != "good")
        assert sample.path == mvtec_root / "test" / defect / name
    assert by_key[("crack", "000.png")].mask_path == mvtec_root / "ground_truth" / "crack" / "000_mask.png"
    assert by_key[("crack", "001.png")].mask_path == mvtec_root / "ground_truth" / "crack" / "001_mask.png"
    assert by_key[("scratch", "000.png")].mask_path is None
    assert by_key[("good", "000.png")].mask_path is None
    assert ds.defect_types == ["crack", "scratch"]


def test_masks_and_batches_load(mvtec_root: Path) -> None:
    ds = load_dataset(mvtec_root)
    crack = next(s for s in ds.test if s.mask_path is not None)
    mask = read_mask(crack.mask_path, 8)
    assert mask.dtype == bool and mask.shape == (8, 8)
    assert mask.sum() == 4 and mask[2:4, 2:4].all()
    batch = load_batch([s.path for s in ds.train], 32, LIMITS)
    assert batch.shape == (3, 3, 32, 32) and 0 <= float(batch.min()) and float(batch.max()) <= 1


def test_plain_folder_is_train_only(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "c.bmp"):
        Image.fromarray(rgb_array()).save(tmp_path / name)
    (tmp_path / "readme.md").write_text("x")
    (tmp_path / "sub").mkdir()
    ds = load_dataset(tmp_path)
    assert [s.path.name for s in ds.train] == ["a.JPG", "b.png", "c.bmp"]
    assert ds.test == [] and ds.defect_types == []
    assert not any(s.anomalous for s in ds.train)


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(DatasetError, match="neither"):
        load_dataset(tmp_path)


def test_train_folder_without_good_images(tmp_path: Path) -> None:
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(tmp_path)

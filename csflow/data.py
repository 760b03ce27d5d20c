"""Images and datasets: bounded decoding, the MVTec AD on-disk layout, and plain folders."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RGB_CONVERTIBLE_MODES = ("RGB", "RGBA", "L", "LA", "P")  # 8-bit modes with an unambiguous RGB view
GOOD = "good"


class ImageError(ValueError):
    """An image could not be used: unreadable, undecodable, too large or of an unsupported kind."""


class DatasetError(ValueError):
    """A dataset folder is missing or does not have the expected layout."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds applied before an image is decoded (decompression bombs are refused by pixel count)."""

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 50_000_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP")


def decode_image(data: bytes, limits: ImageLimits, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes to an RGB uint8 array of shape (H, W, 3)."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"{name}: {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        with Image.open(io.BytesIO(data), formats=list(limits.formats)) as img:
            pixels = img.width * img.height
            if pixels > limits.max_pixels:
                raise ImageError(
                    f"{name}: {img.width}x{img.height} = {pixels} pixels exceeds the limit of {limits.max_pixels}"
                )
            if img.mode not in RGB_CONVERTIBLE_MODES:
                raise ImageError(
                    f"{name}: image mode {img.mode!r} is not supported (use 8-bit {', '.join(RGB_CONVERTIBLE_MODES)})"
                )
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a decodable image in formats {', '.join(limits.formats)}") from exc
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: corrupt image ({exc})") from exc


def read_image(path: str | Path, limits: ImageLimits) -> np.ndarray:
    """Read and decode an image file; see `decode_image`."""
    path = Path(path)
    try:
        if path.stat().st_size > limits.max_bytes:
            raise ImageError(f"{path}: {path.stat().st_size} bytes exceeds the limit of {limits.max_bytes}")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    return decode_image(data, limits, name=str(path))


def to_tensor(rgb: np.ndarray, size: int) -> Tensor:
    """An RGB uint8 array resized to size x size, as a float tensor (3, size, size) in [0, 1].

    NumPy does the arithmetic, not torch: the worker decodes on a thread pool, and a torch op there gives
    each pool thread an OpenMP team of its own. Once libgomp manages more threads than there are CPUs, it
    stops spinning between parallel regions, and every forward pass on the scoring thread slows down."""
    resized = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    chw = np.ascontiguousarray(resized.transpose(2, 0, 1))
    chw /= 255.0
    return torch.from_numpy(chw)


def read_mask(path: Path, size: int) -> np.ndarray:
    """A ground-truth mask as a boolean (size, size) array."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("L").resize((size, size), Image.Resampling.NEAREST)) > 0
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageError(f"{path}: cannot read mask ({exc})") from exc


@dataclass(frozen=True)
class Sample:
    path: Path
    anomalous: bool
    defect_type: str = GOOD
    mask_path: Path | None = None


@dataclass(frozen=True)
class AnomalyDataset:
    """Normal training images and a labelled test set, as in MVTec AD."""

    root: Path
    train: list[Sample]
    test: list[Sample] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test if s.anomalous})


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist or is not a directory")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_dataset(root: str | Path) -> AnomalyDataset:
    """Read the MVTec AD layout: `train/good`, `test/<type>`, `ground_truth/<type>/<name>_mask.png`.

    A plain folder of images (no `train/`) is taken as normal training images only.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not (root / "train").exists():
        images = list_images(root)
        if not images:
            raise DatasetError(f"{root} has neither a train/good folder nor any images ({', '.join(IMAGE_SUFFIXES)})")
        return AnomalyDataset(root, [Sample(p, False) for p in images])
    train = [Sample(p, False) for p in list_images(root / "train" / GOOD)]
    if not train:
        raise DatasetError(f"{root / 'train' / GOOD} holds no images")
    test: list[Sample] = []
    test_root = root / "test"
    if test_root.is_dir():
        for type_dir in sorted(d for d in test_root.iterdir() if d.is_dir()):
            anomalous = type_dir.name != GOOD
            for path in list_images(type_dir):
                mask = root / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"
                test.append(Sample(path, anomalous, type_dir.name, mask if anomalous and mask.is_file() else None))
    return AnomalyDataset(root, train, test)


Transform = Callable[[np.ndarray], np.ndarray]  # RGB uint8 (H, W, 3) -> RGB uint8, e.g. a domain shift


def load_batch(paths: Sequence[Path], size: int, limits: ImageLimits, transform: Transform | None = None) -> Tensor:
    """Images as a (N, 3, size, size) batch; `transform` is applied to the decoded pixels before resizing."""
    return torch.stack([to_tensor((transform or _identity)(read_image(p, limits)), size) for p in paths])


def _identity(rgb: np.ndarray) -> np.ndarray:
    return rgb

"""Domain shifts are deterministic, parameterised and keep the image format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapters.shifts import SHIFTS, get_shift, illumination, lamp, noise, style, style_reference


def _image(seed: int = 0, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_every_shift_is_deterministic_and_keeps_the_format(name: str) -> None:
    image = _image()
    first, second = get_shift(name)(image), get_shift(name)(image.copy())
    assert first.dtype == np.uint8 and first.shape == image.shape
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, image), f"{name} left the image unchanged"


def test_noise_depends_on_the_image_and_seed_not_on_call_order() -> None:
    a, b = _image(0), _image(1)
    shift = noise(sigma=10.0, seed=3)
    out_a = shift(a)
    shift(b)
    np.testing.assert_array_equal(shift(a), out_a)
    assert not np.array_equal(noise(sigma=10.0, seed=4)(a), out_a)


def test_parameters_change_the_result() -> None:
    image = _image()
    assert illumination(gain=1.2)(image).mean() > image.mean() > illumination(gain=0.6, gamma=1.2)(image).mean()


def test_style_transfers_the_reference_statistics_and_tints_grey_frames() -> None:
    grey = np.repeat(_image()[..., :1], 3, axis=2)
    reference = style_reference()
    out = style(reference)(grey)
    ycc_out = np.asarray(Image.fromarray(out).convert("YCbCr"), np.float64).reshape(-1, 3)
    ycc_ref = np.asarray(Image.fromarray(reference).convert("YCbCr"), np.float64).reshape(-1, 3)
    np.testing.assert_allclose(ycc_out.mean(0), ycc_ref.mean(0), atol=3.0)
    assert abs(ycc_out[:, 0].std() - ycc_ref[:, 0].std()) < 3.0
    assert out[..., 0].mean() > out[..., 2].mean() + 20  # the warm reference turned grey into orange


def test_style_reference_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    Image.fromarray(np.full((16, 16, 3), (30, 90, 160), np.uint8)).save(path)
    out = get_shift(f"style:{path}")(_image())
    assert out[..., 2].mean() > out[..., 0].mean()


def test_unknown_shift_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown shift 'sepia'.*brg"):
        get_shift("sepia")


def test_lamp_lights_one_corner_more_lifts_the_blacks_and_changes_grey_frames() -> None:
    grey = np.full((64, 64, 3), 100, np.uint8)
    out = lamp()(grey).astype(float)
    assert out[-8:, -8:].mean() > out[:8, :8].mean() + 40  # uneven light across the part
    assert lamp()(np.zeros((8, 8, 3), np.uint8)).min() >= 40  # stray light: no black stays black
    assert out[..., 0].mean() > out[..., 2].mean()  # warmer: red over blue, also on a grey frame

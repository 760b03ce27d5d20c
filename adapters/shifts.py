"""Deterministic, parameterised domain shifts of RGB uint8 images (H, W, 3).

Stand-ins for what happens on a line: a re-wired camera (`brg`), a colour camera replaced by a grey
one (`gray`), lighting (`illumination`: gain and gamma), a colour cast, defocus (`blur`), sensor
noise (`noise`, seeded from the image content so the same image always gets the same noise), a
colour-jitter in HSV (`coljit`), a new "style" (`style`: the colour statistics of a reference image
transferred onto the frame, a cheap stand-in for the paper's WCT2 style transfer), and a new lamp mounted
off-axis (`lamp`: uneven light across the part, a veil of stray light and a warmer colour temperature;
it changes grey frames too, and moves a source model's scores about as far as `style`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from csflow.data import ImageLimits, read_image

Shift = Callable[[np.ndarray], np.ndarray]
STYLE_MIN_STD = 1.0  # a flat channel (grey frames have flat Cb, Cr) is shifted, not amplified from nothing


def brg(image: np.ndarray) -> np.ndarray:
    return image[..., [2, 0, 1]].copy()


def gray(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).convert("L").convert("RGB"))


def illumination(gain: float = 1.4, gamma: float = 0.8) -> Shift:
    def shift(image: np.ndarray) -> np.ndarray:
        x = (image.astype(np.float32) / 255.0) ** gamma * gain
        return (x.clip(0, 1) * 255).round().astype(np.uint8)

    return shift


def cast(rgb_gain: tuple[float, float, float] = (1.15, 1.0, 0.8)) -> Shift:
    def shift(image: np.ndarray) -> np.ndarray:
        return (image.astype(np.float32) * np.asarray(rgb_gain, np.float32)).clip(0, 255).round().astype(np.uint8)

    return shift


def blur(radius: float = 2.0) -> Shift:
    def shift(image: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))

    return shift


def noise(sigma: float = 12.0, seed: int = 0) -> Shift:
    def shift(image: np.ndarray) -> np.ndarray:
        digest = hashlib.sha256(image.tobytes()).digest()[:8]
        rng = np.random.default_rng([seed, int.from_bytes(digest, "little")])
        return (image.astype(np.float32) + rng.normal(0, sigma, image.shape)).clip(0, 255).round().astype(np.uint8)

    return shift


def coljit(hsv_gain: tuple[float, float, float] = (1.0, 1.5, 0.8)) -> Shift:
    def shift(image: np.ndarray) -> np.ndarray:
        hsv = np.asarray(Image.fromarray(image).convert("HSV")).astype(np.float32)
        hsv = (hsv * np.asarray(hsv_gain, np.float32)).clip(0, 255).astype(np.uint8)
        return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))

    return shift


def lamp(
    gain_range: tuple[float, float] = (0.55, 1.3),
    veil: float = 0.18,
    rgb_gain: tuple[float, float, float] = (1.1, 1.0, 0.85),
) -> Shift:
    """Light falling off across the frame (a gain from `gain_range[0]` at one corner to `gain_range[1]` at
    the opposite one), stray light lifting the blacks (`veil`: share of white blended in) and a colour cast."""

    def shift(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        ramp = np.add.outer(np.linspace(0.0, 0.5, h), np.linspace(0.0, 0.5, w)).astype(np.float32)
        gain = gain_range[0] + (gain_range[1] - gain_range[0]) * ramp
        x = image.astype(np.float32) / 255.0 * gain[..., None] * np.asarray(rgb_gain, np.float32)
        x = (1.0 - veil) * x + veil
        return (x.clip(0, 1) * 255).round().astype(np.uint8)

    return shift


def style(reference: np.ndarray) -> Shift:
    """Reinhard-style transfer in YCbCr: each channel gets the reference's mean and standard deviation.

    Unlike a fixed gain, the result depends on the frame's own statistics, like a re-lit or
    re-coloured scene; a grey frame (flat Cb, Cr) takes the reference's tint.
    """
    ref = np.asarray(Image.fromarray(reference).convert("YCbCr"), np.float32).reshape(-1, 3)
    ref_mean, ref_std = ref.mean(0), ref.std(0)

    def shift(image: np.ndarray) -> np.ndarray:
        ycc = np.asarray(Image.fromarray(image).convert("YCbCr"), np.float32)
        mean, std = ycc.reshape(-1, 3).mean(0), ycc.reshape(-1, 3).std(0)
        out = (ycc - mean) * (ref_std / np.maximum(std, STYLE_MIN_STD)) + ref_mean
        return np.asarray(Image.fromarray(out.clip(0, 255).round().astype(np.uint8), mode="YCbCr").convert("RGB"))

    return shift


def style_reference(size: int = 64) -> np.ndarray:
    """The built-in style reference: a warm, low-contrast diagonal gradient (deterministic)."""
    ramp = np.add.outer(np.arange(size), np.arange(size)).astype(np.float32) / (2 * (size - 1))
    warm = np.asarray([200.0, 140.0, 90.0], np.float32) * (0.75 + 0.25 * ramp[..., None])
    return warm.round().astype(np.uint8)


SHIFTS: dict[str, Shift] = {
    "brg": brg,
    "gray": gray,
    "illumination": illumination(),
    "dark": illumination(gain=0.6, gamma=1.2),
    "cast": cast(),
    "blur": blur(),
    "noise": noise(),
    "coljit": coljit(),
    "style": style(style_reference()),
    "lamp": lamp(),
}


def get_shift(name: str, limits: ImageLimits | None = None) -> Shift:
    """A shift by name; `style:PATH` takes the style of the image at PATH (read within `limits`)."""
    if name.startswith("style:"):
        return style(read_image(name.removeprefix("style:"), limits or ImageLimits()))
    try:
        return SHIFTS[name]
    except KeyError:
        raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFTS)}, style:PATH") from None

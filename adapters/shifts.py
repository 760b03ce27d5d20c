"""Deterministic, parameterised domain shifts of RGB uint8 images (H, W, 3).

Stand-ins for what happens on a line: a re-wired camera (`brg`), a colour camera replaced by a grey
one (`gray`), lighting (`illumination`: gain and gamma), a colour cast, defocus (`blur`), sensor
noise (`noise`, seeded from the image content so the same image always gets the same noise) and a
colour-jitter in HSV (`coljit`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

Shift = Callable[[np.ndarray], np.ndarray]


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


SHIFTS: dict[str, Shift] = {
    "brg": brg,
    "gray": gray,
    "illumination": illumination(),
    "dark": illumination(gain=0.6, gamma=1.2),
    "cast": cast(),
    "blur": blur(),
    "noise": noise(),
    "coljit": coljit(),
}


def get_shift(name: str) -> Shift:
    try:
        return SHIFTS[name]
    except KeyError:
        raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFTS)}") from None

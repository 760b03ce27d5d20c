"""Seeded image perturbations of the shots for few-shot adaptation (synthetic defects: `csflow.defects`).

Every random draw comes from an explicit CPU `torch.Generator`, so a seed gives the same images on any
device and in any process; nothing touches the global RNG. Images are (N, 3, S, S) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Augmentation:
    """Which perturbations of the shots are drawn, each toggleable.

    Flips are off by default: parts on a line have an orientation, and a flipped view is a part the
    camera never sees. Small shifts (placement jitter) and sensor noise are what a line does produce.
    """

    hflip: bool = False
    vflip: bool = False
    max_shift: float = 0.03  # largest translation, as a fraction of the side; 0 disables
    noise_std: float = 0.01  # Gaussian noise in intensity units ([0, 1] scale); 0 disables

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_shift < 0.5:
            raise ValueError(f"max_shift must be in [0, 0.5), got {self.max_shift}")
        if self.noise_std < 0.0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")

    @property
    def enabled(self) -> bool:
        return self.hflip or self.vflip or self.max_shift > 0.0 or self.noise_std > 0.0


NO_AUGMENTATION = Augmentation(max_shift=0.0, noise_std=0.0)


def augment(images: Tensor, config: Augmentation, generator: torch.Generator) -> Tensor:
    """Randomly flipped, shifted (reflect padding, whole pixels) and noised copies of `images`."""
    n, _, h, w = images.shape
    out = images
    if config.hflip:
        out = _flip_some(out, torch.rand(n, generator=generator) < 0.5, dim=-1)
    if config.vflip:
        out = _flip_some(out, torch.rand(n, generator=generator) < 0.5, dim=-2)
    margin = round(config.max_shift * min(h, w))
    if margin > 0:
        shifts = torch.randint(-margin, margin + 1, (n, 2), generator=generator).tolist()
        padded = F.pad(out, (margin, margin, margin, margin), mode="reflect")
        out = torch.stack(
            [
                padded[i, :, margin + dy : margin + dy + h, margin + dx : margin + dx + w]
                for i, (dy, dx) in enumerate(shifts)
            ]
        )
    if config.noise_std > 0.0:
        noise = torch.randn(out.shape, generator=generator) * config.noise_std
        out = (out + noise.to(out.device, out.dtype)).clamp(0.0, 1.0)
    return out


def _flip_some(images: Tensor, which: Tensor, dim: int) -> Tensor:
    return torch.where(which.view(-1, 1, 1, 1).to(images.device), images.flip(dim), images)

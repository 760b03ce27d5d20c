"""Multi-scale EfficientNet features, as CS-Flow uses them."""

from __future__ import annotations

from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csflow.flow import N_SCALES

LAST_BLOCK = 5  # timm's blocks[5]: stride 32, the original's lukemelas block 35 for B5


class FeatureExtractor(nn.Module):
    """EfficientNet trunk (`conv_stem`, `bn1`, `blocks[:6]`) applied to the image at 1, 1/2 and 1/4 size.

    timm's `features_only` does not expose the end of `blocks[5]`, so the trunk is run by hand. Input
    is RGB in [0, 1], square; normalisation uses the backbone's own mean/std.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.conv_stem = backbone.conv_stem
        self.bn1 = backbone.bn1
        self.blocks = nn.Sequential(*backbone.blocks[: LAST_BLOCK + 1])
        cfg = backbone.pretrained_cfg
        self.register_buffer("mean", _as_chw(cfg["mean"]), persistent=False)
        self.register_buffer("std", _as_chw(cfg["std"]), persistent=False)
        self.out_chs = int(self.blocks[-1][-1].conv_pwl.out_channels)
        # Serving in bf16-blocks (csflow.inference): the inside of every block after the first stage in this
        # dtype, on maps of at least block_min_pixels (batch x height x width); None: the trained arithmetic.
        self.block_dtype: torch.dtype | None = None
        self.block_min_pixels = 0

    def trunk(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv_stem(x))
        if self.block_dtype is None:
            return self.blocks(x)
        # The first stage (depthwise-separable blocks on the stem's full-resolution maps) stays fp32: in bf16
        # it moved ELPV scores by up to 9 % and saved no time at 256 px (docs/RESULTS.md).
        x = self.blocks[0](x)
        for block in chain.from_iterable(self.blocks[1:]):
            large = x.shape[0] * x.shape[-2] * x.shape[-1] >= self.block_min_pixels
            # Autocast casts the fp32 weights on each call (nothing cached that an adapter's load could leave
            # stale); the block's residual add meets its fp32 input, and its output goes back to fp32.
            with torch.autocast(x.device.type, dtype=self.block_dtype, enabled=large):
                x = block(x)
            x = x.float()
        return x

    def forward(self, images: Tensor) -> list[Tensor]:
        x = (images - self.mean) / self.std
        size = x.shape[-1]
        scaled = [x] + [
            F.interpolate(x, size=(size // 2**s, size // 2**s), mode="nearest")  # the original's default
            for s in range(1, N_SCALES)
        ]
        return [self.trunk(xs) for xs in scaled]


def _as_chw(values: tuple[float, ...]) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)

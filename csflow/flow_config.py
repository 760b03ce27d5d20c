"""The flow's hyper-parameters, apart from the flow itself so that settings validate them without torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FlowConfig:
    """Hyper-parameters of the flow; the defaults are the original's."""

    hidden_channels: int = 1024
    n_blocks: int = 4
    kernel_sizes: Sequence[int] = field(default_factory=lambda: (3, 3, 3, 5))
    clamp: float = 3.0
    leaky_slope: float = 0.1

    def __post_init__(self) -> None:
        if len(self.kernel_sizes) != self.n_blocks:
            raise ValueError(f"kernel_sizes has {len(self.kernel_sizes)} entries but n_blocks is {self.n_blocks}")
        if any(k % 2 == 0 or k < 1 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd and positive, got {list(self.kernel_sizes)}")
        if self.hidden_channels < 1 or self.clamp <= 0:
            raise ValueError("hidden_channels must be >= 1 and clamp > 0")

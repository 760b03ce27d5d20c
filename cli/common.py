"""What every command shares: exit codes, the errors shown as one line, a progress bar."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

    from csflow.serving_options import ServingOptions

EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_REJECTED = 3
# Shown as one line, not a traceback: the project's own errors (bad images, datasets, artifacts, weights,
# registry refusals) all derive from these two.
USER_ERRORS = (ValueError, RuntimeError)
T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int) -> Iterable[T]:
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, file=sys.stderr, disable=None, leave=False)


def warn_if_bf16_emulated(options: ServingOptions, device: torch.device) -> None:
    """A bf16 precision on a device that emulates bf16 still scores right, only far slower than fp32: said
    once at start, naming the setting, rather than refused (a bf16 accuracy check may be run anywhere)."""
    import structlog

    from csflow.inference import bf16_is_native

    if options.precision != "fp32" and not bf16_is_native(device):
        structlog.get_logger().warning(
            "model.precision is bf16 on a device without native bf16: scoring is emulated and far slower than "
            "fp32 (B5 at 256 px, AVX2 CPU: 17x); set model.precision = fp32 here",
            precision=options.precision,
            device=str(device),
        )

"""How a served model runs: precision, memory layout, batch-norm folding, the forward batch, and whether the
next batch decodes while one is scored.

Kept free of torch so that settings validate these without loading it; `csflow.inference` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# fp32: the trained arithmetic. bf16-flow: the flow's convolutions in bf16 (its coupling arithmetic and the
# extractor stay fp32). bf16-blocks: bf16-flow, and inside each extractor block after the first stage, on large
# enough maps (below), its convolutions, norms and activations in bf16; the residual stream between blocks,
# the stem, the first stage and every weight stay fp32 (so adapters still load into the served blocks).
# bf16: the extractor's whole trunk in bf16, its residual stream too (fastest; moves scores by up to ~9 % on
# ELPV, see docs/RESULTS.md).
Precision = Literal["fp32", "bf16-flow", "bf16-blocks", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
AUTO = "auto"
# forward_batch = "auto": on a CPU, large images are scored a few at a time (a batch's activations outgrow
# the caches: B5 at 768 px measured 1.6x slower per image at batch 8 than at batch 1), small ones in
# batches; an accelerator takes the whole collected batch.
CPU_LARGE_IMAGE_PX = 512
CPU_LARGE_IMAGE_BATCH = 1
CPU_SMALL_IMAGE_BATCH = 8
# bf16-blocks: a block runs in bf16 only where its input holds at least this many pixels per channel (batch x
# height x width). On smaller maps the per-call casts of its weights and inputs cost more than bf16 saves: B5
# at 256 px, batch 1, scored in 1.19x bf16-flow's time with every block after the first stage in bf16 and 1.00x
# with this bound (batch 8: 0.71x and 0.75x), on an AVX-512 BF16 CPU (docs/RESULTS.md, "bf16 inside the
# extractor's blocks").
BF16_BLOCK_MIN_PIXELS = 4096
# bf16 keeps 8 significant bits: each image's score stays within this share of its fp32 score (the largest
# differences measured on ELPV were 1 % for bf16-flow, 2 % for bf16-blocks (3.6 % on shifted training
# images) and 9 % for bf16; checked on synthetic data by tests/test_inference.py, on ELPV by
# bench/bench_precision.py through AUROC and verdicts).
SCORE_RTOL = {"fp32": 1e-5, "bf16-flow": 0.02, "bf16-blocks": 0.05, "bf16": 0.10}


@dataclass(frozen=True)
class ServingOptions:
    """Defaults are plain fp32 with the trained model's layout: exactly its arithmetic."""

    precision: Precision = "fp32"
    channels_last: bool = False
    fold_batch_norm: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


FP32 = ServingOptions()
_FLAGS = {"cl": "channels_last", "fold": "fold_batch_norm"}


def parse_options(mode: str) -> ServingOptions:
    """`fp32`, `bf16-flow`, `bf16-blocks` or `bf16`, optionally with `+cl` (channels-last) and `+fold` (batch
    norms folded): the benchmarks' names for option sets."""
    precision, *flags = mode.split("+")
    unknown = [f for f in flags if f not in _FLAGS]
    if unknown:
        raise ValueError(f"unknown serving flags {unknown} in {mode!r}; known: {sorted(_FLAGS)}")
    return ServingOptions(precision=precision, **{_FLAGS[f]: True for f in flags})  # type: ignore[arg-type]


def forward_batch(setting: int | str, device_type: str, image_size: int, collected: int) -> int:
    """Images per forward pass for a collected batch of `collected` frames: the setting when it is a
    number, else chosen for the device and image size (see CPU_LARGE_IMAGE_PX)."""
    if setting != AUTO:
        return max(1, min(int(setting), collected))
    if device_type != "cpu":
        return max(1, collected)
    cap = CPU_LARGE_IMAGE_BATCH if image_size >= CPU_LARGE_IMAGE_PX else CPU_SMALL_IMAGE_BATCH
    return max(1, min(cap, collected))


def overlaps_forward(setting: bool | str, device_type: str, cores: int, torch_threads: int, threads: int) -> bool:
    """Whether the worker runs a stage beside the forward pass (decoding the next batch, writing the last one),
    on `threads` threads of its own: the setting when it is a boolean, else yes where that stage does not take
    CPU time from the forward pass (an accelerator scores, or those threads have cores beside torch's). On 2
    cores with torch on both, decoding ahead slowed the forward pass by more than it hid (docs/RESULTS.md)."""
    if setting != AUTO:
        return bool(setting)
    return device_type != "cpu" or cores >= torch_threads + threads

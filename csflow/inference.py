"""How a model is run for serving: precision, memory layout and batch-norm folding.

A served model is frozen, so its extractor's batch norms can be folded into the convolutions before them
(one pass over the activations less per layer), its extractor's tensors can be laid out channels-last
(what oneDNN's convolutions prefer on a CPU for large maps; the flow's small maps stay contiguous), and on
hardware with bf16 units (AMX / AVX-512 BF16, or a GPU) its convolutions can run in bf16: the couplings'
subnets (`bf16-flow`), those and the inside of each extractor block with the residual stream between
blocks in fp32 (`bf16-blocks`), or those and the extractor's whole trunk (`bf16`), while the couplings'
affine arithmetic and the scores stay fp32. How far bf16 moves the scores is checked by `tests/test_inference.py`
(synthetic) and `bench/bench_precision.py` (ELPV: AUROC and verdicts against fp32).

`prepare_for_serving` changes a model in place: an adaptation needs the unfolded model, so it is applied
to a model that is only served (the CLI's `score`/`evaluate`, the worker's loaded versions).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from csflow.flow import ParallelAffineCoupling
from csflow.model import CSFlow
from csflow.serving_options import BF16_BLOCK_MIN_PIXELS, ServingOptions


class _AfterNorm(nn.Module):
    """What remains of timm's BatchNormAct2d once its normalisation is folded away: dropout, activation."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def fold_batch_norm(module: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d among a module's children into that conv,
    recursively; returns how many were folded. Relies on timm's EfficientNet registering each norm right
    after the conv whose output it takes (true of the stem and every MBConv/depthwise block)."""
    folded = 0
    children = list(module.named_children())
    for (_, first), (name, second) in pairwise(children):
        if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d) and second.track_running_stats:
            weight, bias = fuse_conv_bn_weights(
                first.weight,
                first.bias,
                second.running_mean,
                second.running_var,
                second.eps,
                second.weight,
                second.bias,
            )
            first.weight, first.bias = weight, bias
            drop, act = getattr(second, "drop", None), getattr(second, "act", None)  # timm's BatchNormAct2d
            rest = _AfterNorm(drop, act) if drop is not None and act is not None else nn.Identity()
            setattr(module, name, rest)
            folded += 1
    for _, child in module.named_children():
        folded += fold_batch_norm(child)
    return folded


class _InPrecision(nn.Module):
    """Runs a module with its weights and inputs in `dtype` and hands fp32 back. Applied to the extractor
    and to each coupling's subnet, so that only convolutions run in bf16 while the coupling's affine
    arithmetic (exp of the soft-clamped scale) and the scores stay fp32; weights are cast once, not on
    every call as autocast would."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, float_out: bool = True) -> None:
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype
        self.float_out = float_out

    def forward(self, *inputs: Tensor) -> Any:
        out = self.inner(*(x.to(self.dtype) for x in inputs))
        return _to_float(out) if self.float_out else out


def _to_float(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.float()
    return type(out)(_to_float(o) for o in out)


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` has fast bf16 convolutions. oneDNN's bf16 kernels need AVX-512 (or AMX); on an
    AVX2-only CPU it emulates them, and B5 at 256 px scored 17x slower with bf16-flow than in fp32
    (docs/RESULTS.md). GPUs run bf16 natively from compute capability 8.0 (Ampere) on."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True  # another accelerator: no claim either way


def prepare_for_serving(model: CSFlow, options: ServingOptions) -> CSFlow:
    """Make `model` (in place) ready to serve under `options`; eval mode, gradients off."""
    model.eval().requires_grad_(False)
    if options.fold_batch_norm:
        fold_batch_norm(model.extractor)
    if options.channels_last:
        # The extractor only: the flow's convolutions run on maps of a few pixels a side, where oneDNN is
        # faster in the contiguous layout (B5 at 256 px, batch 1: the whole score 0.77x the time).
        model.extractor.to(memory_format=torch.channels_last)
    if options.precision == "bf16":
        # The extractor normalises the image in fp32, its trunk runs in bf16 (no fp32 copy between layers).
        extractor = model.extractor
        extractor.conv_stem = _InPrecision(extractor.conv_stem, torch.bfloat16, float_out=False)
        extractor.bn1.to(torch.bfloat16)
        extractor.blocks = _InPrecision(extractor.blocks, torch.bfloat16)  # type: ignore[assignment]
    if options.precision == "bf16-blocks":
        device = next(model.parameters()).device
        model.extractor.block_dtype = torch.bfloat16
        model.extractor.block_min_pixels = BF16_BLOCK_MIN_PIXELS if device.type == "cpu" else 0
    if options.precision in ("bf16", "bf16-flow", "bf16-blocks"):
        for module in model.flow.modules():
            if isinstance(module, ParallelAffineCoupling):
                module.subnet_a = _InPrecision(module.subnet_a, torch.bfloat16)  # type: ignore[assignment]
                module.subnet_b = _InPrecision(module.subnet_b, torch.bfloat16)  # type: ignore[assignment]
    return model

"""Scoring images: the one entry point of the worker, the CLI, the evaluation, the gate and the benchmarks.

Inference mode (no autograd bookkeeping), the model's own device, optional chunking, and anomaly maps only
when asked: a map is a full-resolution upsampling per image that the streaming path never needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from csflow.model import CSFlow, anomaly_maps, image_scores, per_sample_nll
from csflow.serving_options import FP32, ServingOptions


@dataclass(frozen=True)
class Scores:
    """Image scores (B,) as float64; (B, S, S) anomaly maps and per-sample NLLs (B,) when asked for."""

    image: np.ndarray
    maps: np.ndarray | None = None
    nll: np.ndarray | None = None


@torch.inference_mode()
def score_images(
    model: CSFlow,
    images: Tensor,
    batch_size: int | None = None,
    maps: bool = False,
    nll: bool = False,
    options: ServingOptions = FP32,
) -> Scores:
    """Score (B, 3, S, S) images in [0, 1] with `model` in eval mode, `batch_size` at a time (None: all);
    the NLL (the training objective, log-det included) too when asked, from the same forward pass.

    `options` are those `model` was prepared with (`csflow.inference.prepare_for_serving`): they say the
    images' memory layout; whatever runs in bf16 hands fp32 latents back."""
    model.eval()
    device = next(model.parameters()).device
    layout = torch.channels_last if options.channels_last else torch.contiguous_format
    step = batch_size or max(len(images), 1)
    image_parts: list[Tensor] = []
    map_parts: list[Tensor] = []
    nll_parts: list[Tensor] = []
    for start in range(0, len(images), step):
        out = model(images[start : start + step].to(device, memory_format=layout))
        image_parts.append(image_scores(out.z).double().cpu())
        if maps:
            map_parts.append(anomaly_maps(out.z, model.image_size).cpu())
        if nll:
            nll_parts.append(per_sample_nll(out).double().cpu())
    return Scores(_joined(image_parts), _joined(map_parts) if maps else None, _joined(nll_parts) if nll else None)


def _joined(parts: list[Tensor]) -> np.ndarray:
    return torch.cat(parts).numpy() if parts else np.zeros(0)

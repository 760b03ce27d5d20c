"""Scoring images: the one entry point of the worker, the CLI, the evaluation, the gate and the benchmarks.

Inference mode (no autograd bookkeeping), the model's own device, optional chunking, and anomaly maps only
when asked: a map is a full-resolution upsampling per image that the streaming path never needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from csflow.model import CSFlow, anomaly_maps, image_scores


@dataclass(frozen=True)
class Scores:
    """Image scores (B,) as float64, and (B, S, S) anomaly maps when they were asked for."""

    image: np.ndarray
    maps: np.ndarray | None = None


@torch.inference_mode()
def score_images(model: CSFlow, images: Tensor, batch_size: int | None = None, maps: bool = False) -> Scores:
    """Score (B, 3, S, S) images in [0, 1] with `model` in eval mode, `batch_size` at a time (None: all)."""
    model.eval()
    device = next(model.parameters()).device
    step = batch_size or max(len(images), 1)
    image_parts: list[Tensor] = []
    map_parts: list[Tensor] = []
    for start in range(0, len(images), step):
        z = model(images[start : start + step].to(device)).z
        image_parts.append(image_scores(z).double().cpu())
        if maps:
            map_parts.append(anomaly_maps(z, model.image_size).cpu())
    image = torch.cat(image_parts).numpy() if image_parts else np.zeros(0)
    return Scores(image, torch.cat(map_parts).numpy() if map_parts else None) if maps else Scores(image)

"""CS-Flow: a frozen multi-scale extractor followed by the cross-scale flow, and what it computes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csflow.extractor import FeatureExtractor
from csflow.flow import FlowConfig, build_cs_flow, map_sizes


@dataclass(frozen=True)
class FlowOutput:
    """Latents of the three scales and the per-sample log|det dz/dy|."""

    z: list[Tensor]
    log_jac_det: Tensor


def per_sample_nll(out: FlowOutput) -> Tensor:
    """(||z||^2 / 2 - log|det J|) per sample, divided by the latent dimension count.

    The log-determinant stays per sample (anomalib sums it over the batch, which mixes samples).
    """
    flat = torch.cat([z.flatten(1) for z in out.z], dim=1)
    return (0.5 * flat.pow(2).sum(dim=1) - out.log_jac_det) / flat.shape[1]


def image_scores(z: Sequence[Tensor]) -> Tensor:
    """Anomaly score per image: mean of z^2 / 2 over all positions of all scales."""
    flat = torch.cat([zs.flatten(1) for zs in z], dim=1)
    return 0.5 * flat.pow(2).mean(dim=1)


def anomaly_maps(z: Sequence[Tensor], image_size: int) -> Tensor:
    """Per-pixel anomaly: mean over channels of z^2 at the finest scale, upsampled to the image."""
    coarse = z[0].pow(2).mean(dim=1, keepdim=True)
    return F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]


class CSFlow(nn.Module):
    """Extractor + flow for square RGB images of `image_size` pixels (a multiple of 128)."""

    def __init__(
        self, extractor: FeatureExtractor, image_size: int, flow_config: FlowConfig, extractor_name: str
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.extractor_name = extractor_name
        self.flow_config = flow_config
        self.extractor = extractor
        self.flow = build_cs_flow(extractor.out_chs, map_sizes(image_size), flow_config)

    def features(self, images: Tensor) -> list[Tensor]:
        return self.extractor(images)

    def flow_forward(self, features: Sequence[Tensor]) -> FlowOutput:
        # Contiguous whatever the extractor's layout (see csflow.inference.prepare_for_serving).
        z, log_jac_det = self.flow([f.contiguous() for f in features])
        return FlowOutput(list(z), log_jac_det)

    def forward(self, images: Tensor) -> FlowOutput:
        return self.flow_forward(self.features(images))

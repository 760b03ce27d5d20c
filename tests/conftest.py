"""Small shared fixtures: tiny CS-Flow models on the lite0 backbone and synthetic images."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csflow.backbones import LITE0, LITE0_PACKAGE, create_backbone
from csflow.extractor import FeatureExtractor
from csflow.flow import FlowConfig
from csflow.model import CSFlow

# The tensors here are tiny: a second intra-op thread buys nothing, and when other processes keep the
# cores busy, OpenMP spin-waiting made the suite up to 10x slower.
torch.set_num_threads(1)

IMAGE_SIZE = 128
TINY_FLOW = FlowConfig(hidden_channels=8)


def perturb_parameters(module: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Add Gaussian noise to every parameter, so that the zero-initialised gammas (the cross-scale paths)
    and everything else are active."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


@pytest.fixture(scope="session")
def perturb() -> Callable[..., None]:
    return perturb_parameters


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[..., CSFlow]:
    """Factory for a CSFlow (eval mode) with pretrained lite0 features at 128 px and an 8-channel-hidden
    flow; `perturb` is the scale of the noise added to the flow's parameters (0: fresh, gammas at 0)."""

    def make(seed: int = 0, perturb: float = 0.01, weights: str = LITE0_PACKAGE) -> CSFlow:
        torch.manual_seed(seed)
        model = CSFlow(FeatureExtractor(create_backbone(LITE0, weights)), IMAGE_SIZE, TINY_FLOW, LITE0)
        if perturb:
            perturb_parameters(model.flow, scale=perturb, seed=seed)
        return model.eval()

    return make


@pytest.fixture(scope="session")
def make_images() -> Callable[..., Tensor]:
    """Factory for smooth random RGB images in [0, 1], shape (n, 3, 128, 128)."""

    def make(n: int, seed: int = 0) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 3, 8, 8, generator=generator)
        return F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)

    return make

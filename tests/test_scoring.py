"""`csflow.scoring.score_images`, the one scoring entry point: the model's scores, maps only when asked,
the same figures however the batch is chunked, and no autograd state left behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csflow.backbones import LITE0, NO_WEIGHTS
from csflow.fit import build_model
from csflow.flow import FlowConfig
from csflow.model import CSFlow, anomaly_maps, image_scores, per_sample_nll
from csflow.scoring import score_images


@pytest.fixture(scope="module")
def model() -> CSFlow:
    torch.manual_seed(0)
    m = build_model(LITE0, NO_WEIGHTS, 128, FlowConfig(hidden_channels=8))
    with torch.no_grad():  # open the couplings, so that scores depend on the flow too
        for name, p in m.flow.named_parameters():
            if "gamma" in name:
                p.fill_(0.5)
    return m.eval()


def test_scores_are_the_models_image_scores(model: CSFlow) -> None:
    images = torch.rand(5, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images)
        expected, expected_maps = image_scores(out.z).double().numpy(), anomaly_maps(out.z, 128).numpy()
        expected_nll = per_sample_nll(out).double().numpy()
    plain = score_images(model, images)
    assert plain.image.dtype == np.float64 and plain.image.shape == (5,) and plain.maps is None and plain.nll is None
    with_nll = score_images(model, images, nll=True)
    assert with_nll.nll is not None
    np.testing.assert_allclose(with_nll.nll, expected_nll, rtol=1e-6)
    np.testing.assert_allclose(plain.image, expected, rtol=1e-6)
    with_maps = score_images(model, images, maps=True)
    assert with_maps.maps is not None and with_maps.maps.shape == (5, 128, 128)
    np.testing.assert_allclose(with_maps.maps, expected_maps, rtol=1e-5, atol=1e-7)


def test_chunking_does_not_change_the_scores(model: CSFlow) -> None:
    images = torch.rand(7, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    whole = score_images(model, images).image
    np.testing.assert_allclose(score_images(model, images, batch_size=3).image, whole, rtol=1e-5)
    assert score_images(model, images[:0]).image.shape == (0,)


def test_scoring_runs_without_autograd(model: CSFlow) -> None:
    """No graph is built, even for a model whose parameters require gradients (an adaptation candidate)."""
    seen: list[bool] = []
    hook = model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    model.extractor.requires_grad_(True)
    try:
        score_images(model, torch.rand(2, 3, 128, 128))
    finally:
        hook.remove()
        model.requires_grad_(False)
    assert seen == [False]

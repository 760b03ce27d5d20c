"""CSFlow end to end on lite0 features: outputs, per-sample NLL, image scores and anomaly maps."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from csflow.backbones import LITE0, NO_WEIGHTS, create_backbone
from csflow.extractor import FeatureExtractor
from csflow.flow import FlowConfig
from csflow.model import CSFlow, FlowOutput, anomaly_maps, image_scores, per_sample_nll


def test_forward_gives_latents_shaped_like_features(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor]
) -> None:
    model = make_tiny_model()
    images = make_images(2)
    with torch.no_grad():
        features = model.features(images)
        out = model(images)
    assert isinstance(out, FlowOutput)
    assert [tuple(f.shape) for f in features] == [(2, 192, 4, 4), (2, 192, 2, 2), (2, 192, 1, 1)]
    assert [z.shape for z in out.z] == [f.shape for f in features]
    assert out.log_jac_det.shape == (2,)
    assert all(torch.isfinite(z).all() for z in out.z)


def test_image_size_must_be_multiple_of_128() -> None:
    extractor = FeatureExtractor(create_backbone(LITE0, NO_WEIGHTS))
    with pytest.raises(ValueError, match="multiple of 128"):
        CSFlow(extractor, 200, FlowConfig(hidden_channels=8), LITE0)


def test_model_outputs_do_not_mix_samples(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor]
) -> None:
    """Sample 0's latents, log-determinant and NLL do not depend on which image shares its batch."""
    model = make_tiny_model()
    first = make_images(1, seed=0)
    with torch.no_grad():
        out_a = model(torch.cat([first, make_images(1, seed=1)]))
        out_b = model(torch.cat([first, make_images(1, seed=2)]))
    assert out_a.log_jac_det.shape == (2,)
    for za, zb in zip(out_a.z, out_b.z, strict=True):
        torch.testing.assert_close(za[0], zb[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out_a.log_jac_det[0], out_b.log_jac_det[0], atol=1e-4, rtol=1e-5)
    assert abs(float(out_a.log_jac_det[1] - out_b.log_jac_det[1])) > 1e-2
    torch.testing.assert_close(per_sample_nll(out_a)[0], per_sample_nll(out_b)[0])


def test_per_sample_nll_does_not_mix_samples() -> None:
    generator = torch.Generator().manual_seed(0)
    z = [torch.randn(2, 4, s, s, generator=generator) for s in (4, 2, 1)]
    other = [t.clone() for t in z]
    for t in other:
        t[1] *= 3.0
    nll = per_sample_nll(FlowOutput(z, torch.tensor([1.0, 2.0])))
    nll_other = per_sample_nll(FlowOutput(other, torch.tensor([1.0, -50.0])))
    assert nll.shape == (2,)
    assert float(nll[0]) == float(nll_other[0])
    assert float(nll[1]) != float(nll_other[1])


def test_per_sample_nll_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    z = [torch.randn(2, 4, s, s, generator=generator) for s in (4, 2, 1)]
    log_jac_det = torch.tensor([1.5, -2.0])
    nll = per_sample_nll(FlowOutput(z, log_jac_det))
    dims = 4 * (16 + 4 + 1)
    for i in range(2):
        squared = sum(float((zs[i].double() ** 2).sum()) for zs in z)
        assert float(nll[i]) == pytest.approx((0.5 * squared - float(log_jac_det[i])) / dims, rel=1e-5)


def test_image_scores_are_mean_half_squared_latents() -> None:
    generator = torch.Generator().manual_seed(0)
    z = [torch.randn(3, 4, s, s, generator=generator) for s in (4, 2, 1)]
    scores = image_scores(z)
    assert scores.shape == (3,)
    for i in range(3):
        values = [float(v) ** 2 / 2 for zs in z for v in zs[i].flatten()]
        assert float(scores[i]) == pytest.approx(sum(values) / len(values), rel=1e-5)


def test_image_scores_weigh_every_position_equally() -> None:
    """A single large latent value raises the score by the same amount whichever scale it sits in."""
    base = [torch.zeros(1, 2, s, s) for s in (4, 2, 1)]
    scores = []
    for scale in range(3):
        z = [t.clone() for t in base]
        z[scale][0, 0, 0, 0] = 2.0
        scores.append(float(image_scores(z)[0]))
    assert scores == pytest.approx([2.0 / (2 * 21)] * 3)


def test_anomaly_maps_come_from_the_finest_scale() -> None:
    z = [torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 1, 1)]
    z[0][1, :, 1, 2] = 2.0  # sample 1, one position of scale 0: mean_c z^2 = 4
    z[2][0] = 5.0  # coarsest scale must not matter
    maps = anomaly_maps(z, 128)
    assert maps.shape == (2, 128, 128)
    assert torch.count_nonzero(maps[0]) == 0
    assert float(maps[1].max()) == pytest.approx(4.0, rel=0.05)
    row, col = divmod(int(maps[1].argmax()), 128)
    assert 32 <= row < 64 and 64 <= col < 96  # the cell at (1, 2) of the 4x4 map, 32 px per cell


def test_anomaly_maps_of_model_output(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor]
) -> None:
    model = make_tiny_model()
    with torch.no_grad():
        out = model(make_images(2))
    maps = anomaly_maps(out.z, model.image_size)
    assert maps.shape == (2, 128, 128)
    assert (maps >= 0).all()
    coarse_mean = out.z[0].pow(2).mean(dim=1)  # (2, 4, 4)
    torch.testing.assert_close(maps.mean(dim=(1, 2)), coarse_mean.mean(dim=(1, 2)), rtol=0.1, atol=1e-4)

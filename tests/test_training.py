"""Training the flow on extracted lite0 features: NLL goes down, the best held-out epoch is kept."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from csflow.model import CSFlow
from csflow.training import (
    EpochRecord,
    TrainConfig,
    extract_features,
    features_nll,
    features_scores,
    split_indices,
    split_normals,
    train_flow,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def extracted(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """32 training feature sets from smooth images and 8 held-out ones from white-noise images, so that
    fitting the training set eventually hurts the held-out NLL."""
    model = make_tiny_model(perturb=0)
    noise = torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(99))
    images = torch.cat([make_images(32, seed=0), noise])
    feats = extract_features(model, images.split(8), CPU)
    return [f[:32] for f in feats], [f[32:] for f in feats]


@pytest.fixture
def features(
    make_tiny_model: Callable[..., CSFlow], extracted: tuple[list[Tensor], list[Tensor]]
) -> tuple[CSFlow, list[Tensor], list[Tensor]]:
    """A fresh, unperturbed tiny model (same initial weights every time) and the extracted features."""
    return make_tiny_model(perturb=0), *extracted


def test_extract_features_batches_and_concatenates(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor]
) -> None:
    model = make_tiny_model()
    images = make_images(5)
    feats = extract_features(model, images.split(2), CPU)
    assert [tuple(f.shape) for f in feats] == [(5, 192, 4, 4), (5, 192, 2, 2), (5, 192, 1, 1)]
    with torch.no_grad():
        direct = model.features(images)
    for got, want in zip(feats, direct, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no images"):
        extract_features(model, [], CPU)


def test_training_lowers_nll_and_keeps_best_held_out_epoch(
    features: tuple[CSFlow, list[Tensor], list[Tensor]],
) -> None:
    model, train, val = features
    seen: list[EpochRecord] = []
    config = TrainConfig(epochs=10, batch_size=16, lr=5e-3, eval_every=2, seed=0)
    result = train_flow(model, train, val, config, CPU, on_epoch=seen.append)

    assert [r.epoch for r in result.history] == list(range(1, 11))
    assert seen == result.history
    train_nll = [r.train_nll for r in result.history]
    assert train_nll[-1] < train_nll[0]
    assert train_nll[-1] < train_nll[1]

    evaluated = {r.epoch: r.val_nll for r in result.history if r.val_nll is not None}
    assert sorted(evaluated) == [2, 4, 6, 8, 10]
    best_epoch = min(evaluated, key=lambda e: evaluated[e])
    assert result.best_epoch == best_epoch
    assert result.best_val_nll == pytest.approx(evaluated[best_epoch])
    # Precondition of the next check: the last epoch was not the best one, so weights must be restored.
    assert best_epoch < config.epochs and evaluated[config.epochs] > result.best_val_nll
    restored = features_nll(model, val, 16, CPU).mean().item()
    assert restored == pytest.approx(result.best_val_nll, rel=1e-5)
    assert not model.flow.training
    assert result.seconds > 0 and result.seconds_per_epoch == pytest.approx(result.seconds / 10)


def test_training_without_held_out_keeps_last_epoch(
    features: tuple[CSFlow, list[Tensor], list[Tensor]],
) -> None:
    model, train, _ = features
    result = train_flow(model, train, None, TrainConfig(epochs=3, lr=1e-3), CPU)
    assert result.best_epoch == 3
    assert all(r.val_nll is None for r in result.history)
    assert result.history[-1].train_nll < result.history[0].train_nll


def test_training_is_reproducible_for_a_seed(
    features: tuple[CSFlow, list[Tensor], list[Tensor]],
) -> None:
    model, train, val = features
    initial = {k: v.clone() for k, v in model.flow.state_dict().items()}
    config = TrainConfig(epochs=2, lr=1e-3, eval_every=1, seed=3)
    first = [r.train_nll for r in train_flow(model, train, val, config, CPU).history]
    scores_first = features_scores(model, val, 4, CPU)
    model.flow.load_state_dict(initial)
    second = [r.train_nll for r in train_flow(model, train, val, config, CPU).history]
    assert first == second
    torch.testing.assert_close(features_scores(model, val, 8, CPU), scores_first, atol=1e-5, rtol=1e-5)


def test_features_scores_match_batchless_computation(
    features: tuple[CSFlow, list[Tensor], list[Tensor]],
) -> None:
    """Batching over samples (4 then 3 then 1, ...) does not change per-sample scores or NLLs."""
    model, _, val = features
    by_3 = features_scores(model, val, 3, CPU)
    by_8 = features_scores(model, val, 8, CPU)
    assert by_3.shape == (8,)
    torch.testing.assert_close(by_3, by_8, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features_nll(model, val, 3, CPU), features_nll(model, val, 8, CPU))


@pytest.mark.parametrize(("n", "fraction"), [(2, 0.5), (10, 0.2), (33, 0.1), (5, 0.0), (5, 0.99)])
def test_split_indices_disjoint_covering_deterministic(n: int, fraction: float) -> None:
    train, held_out = split_indices(n, fraction, seed=7)
    assert set(train).isdisjoint(held_out)
    assert sorted([*train, *held_out]) == list(range(n))
    assert len(held_out) >= 1 and len(train) >= 1
    assert len(held_out) == min(max(1, round(n * fraction)), n - 1)
    assert split_indices(n, fraction, seed=7) == (train, held_out)


def test_split_indices_depends_on_seed() -> None:
    assert split_indices(50, 0.2, seed=0) != split_indices(50, 0.2, seed=1)


def test_split_indices_needs_two_items() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        split_indices(1, 0.2, seed=0)


@pytest.mark.parametrize(("n", "val", "cal"), [(3, 0.1, 0.1), (15, 0.25, 0.15), (470, 0.15, 0.15)])
def test_split_normals_three_disjoint_parts(n: int, val: float, cal: float) -> None:
    """Weight selection and threshold calibration use different images."""
    train, selection, calibration = split_normals(n, val, cal, seed=3)
    assert sorted([*train, *selection, *calibration]) == list(range(n))
    assert set(train).isdisjoint(selection) and set(train).isdisjoint(calibration)
    assert set(selection).isdisjoint(calibration)
    assert len(selection) == max(1, round(n * val)) and len(calibration) == max(1, round(n * cal))
    assert split_normals(n, val, cal, seed=3) == (train, selection, calibration)


def test_split_normals_needs_one_image_per_part() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        split_normals(2, 0.1, 0.1, seed=0)


def test_trained_flow_comes_back_frozen_and_can_be_trained_again(
    features: tuple[CSFlow, list[Tensor], list[Tensor]],
) -> None:
    """Once trained, the flow has no trainable parameters (it is served or adapted through, never
    written); training it again explicitly still works."""
    model, train, val = features
    config = TrainConfig(epochs=1, lr=1e-3, seed=0)
    train_flow(model, train, val, config, CPU)
    assert not any(p.requires_grad for p in model.flow.parameters())
    before = {k: v.clone() for k, v in model.flow.state_dict().items()}
    train_flow(model, train, val, config, CPU)
    assert any(not torch.equal(v, before[k]) for k, v in model.flow.state_dict().items())
    assert not any(p.requires_grad for p in model.flow.parameters())

"""Few-shot adaptation: which blocks it may touch, that it lowers the shots' NLL, its stopping rule,
BN handling, and seeded augmentation / synthetic defects."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from adapters.adapt import (
    AdaptConfig,
    AdaptResult,
    adapt,
    blocks_nbytes,
    first_blocks,
    flat_blocks,
    micro_batch_size,
)
from adapters.augment import NO_AUGMENTATION, Augmentation, augment
from csflow.backbones import NO_WEIGHTS
from csflow.calibration import Calibration
from csflow.defects import DefectConfig, synthetic_defects
from csflow.model import CSFlow

ADAPTED = ("blocks.0.0.", "blocks.1.0.", "blocks.1.1.", "blocks.2.0.", "blocks.2.1.")
FAST = AdaptConfig(lr=1e-3, max_steps=3, stop_quantile=None)


def snapshot(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def parent(make_tiny_model: Callable[..., CSFlow]) -> CSFlow:
    return make_tiny_model(seed=4)


@pytest.fixture(scope="module")
def shots(make_images: Callable[..., Tensor]) -> Tensor:
    return make_images(2, seed=11)


@pytest.fixture(scope="module")
def run(parent: CSFlow, shots: Tensor) -> tuple[AdaptResult, dict[str, Tensor], dict[str, Tensor]]:
    """One short adaptation, with the parent's extractor and flow tensors as they were before it."""
    extractor_before, flow_before = snapshot(parent.extractor), snapshot(parent.flow)
    return adapt(parent, shots, FAST), extractor_before, flow_before


def test_flat_blocks_of_lite0(parent: CSFlow) -> None:
    blocks = flat_blocks(parent.extractor)
    stages = parent.extractor.blocks
    assert [len(s) for s in stages] == [1, 2, 2, 3, 3, 4]
    assert len(blocks) == 15
    first = first_blocks(parent.extractor, 5)
    assert list(first) == ["blocks.0.0", "blocks.1.0", "blocks.1.1", "blocks.2.0", "blocks.2.1"]
    expected = [stages[0][0], stages[1][0], stages[1][1], stages[2][0], stages[2][1]]
    assert all(got is want for got, want in zip(first.values(), expected, strict=True))
    assert list(blocks.values())[-1] is stages[5][3]
    state = parent.extractor.state_dict()
    assert all(any(k.startswith(f"{name}.") for k in state) for name in blocks)
    for bad in (0, 16):
        with pytest.raises(ValueError, match="n_blocks"):
            first_blocks(parent.extractor, bad)


def test_adapter_payload_size_lite0(parent: CSFlow) -> None:
    # 5 blocks of lite0: 57,424 float32 values (54,576 parameters + BN running stats) + 14 int64 BN counters
    assert blocks_nbytes(parent.extractor, 5) == 229_808


def test_only_the_first_blocks_change(run: tuple[AdaptResult, dict[str, Tensor], dict[str, Tensor]]) -> None:
    result, extractor_before, flow_before = run
    after = result.model.extractor.state_dict()
    assert result.block_names == [p.rstrip(".") for p in ADAPTED]
    changed = {k for k, v in after.items() if not torch.equal(v, extractor_before[k])}
    assert changed, "adaptation changed nothing"
    assert all(k.startswith(ADAPTED) for k in changed), sorted(changed - {k for k in changed if k.startswith(ADAPTED)})
    assert any(k.startswith("blocks.0.0.") for k in changed) and any(k.startswith("blocks.2.1.") for k in changed)
    # frozen BN: running statistics of the adapted blocks are untouched too
    assert not any("running_" in k or "num_batches" in k for k in changed)
    for key, tensor in result.model.flow.state_dict().items():
        assert torch.equal(tensor, flow_before[key]), key


def test_parent_is_not_modified(parent: CSFlow, run: tuple[AdaptResult, dict[str, Tensor], dict[str, Tensor]]) -> None:
    result, extractor_before, flow_before = run
    for key, tensor in parent.extractor.state_dict().items():
        assert torch.equal(tensor, extractor_before[key]), key
    for key, tensor in parent.flow.state_dict().items():
        assert torch.equal(tensor, flow_before[key]), key
    assert result.model.extractor is not parent.extractor
    assert result.model.flow is parent.flow  # shared, frozen
    assert all(p.grad is None for p in parent.parameters())
    assert not result.model.training and not any(p.requires_grad for p in result.model.extractor.parameters())


def test_shot_nll_decreases(run: tuple[AdaptResult, dict[str, Tensor], dict[str, Tensor]]) -> None:
    result, _, _ = run
    assert result.steps == FAST.max_steps and result.stop_reason == "max_steps"
    assert len(result.history) == FAST.max_steps + 1
    nll = [r.nll for r in result.history]
    assert all(b < a for a, b in itertools.pairwise(nll)) and nll[-1] < 0.75 * nll[0], nll
    train = [r.train_nll for r in result.history[:-1]]
    assert all(t is not None for t in train) and result.history[-1].train_nll is None
    summary = result.summary()
    assert summary["initial_nll"] == nll[0] and summary["final_nll"] == nll[-1] and summary["steps"] == 3


def test_stops_at_the_source_calibration_nll(parent: CSFlow, shots: Tensor) -> None:
    """The target is a quantile of the calibration NLLs; reaching it stops the run before the cap."""
    initial = adapt(parent, shots, AdaptConfig(max_steps=0)).history[0]
    target = 0.7 * initial.nll
    scores = [initial.score] * 3  # irrelevant to the rule
    calibration = Calibration(2 * initial.score, 0.1, scores, nll=[0.5 * target, target, 4 * target])
    result = adapt(parent, shots, AdaptConfig(lr=1e-3, max_steps=8), calibration=calibration)
    assert result.target == pytest.approx(target) and result.summary()["target"] == result.target
    assert result.summary()["stop_on"] == "nll"
    assert result.stop_reason == "target" and 0 < result.steps < 8
    assert result.final.nll <= target < result.history[-2].nll

    already = Calibration(4 * initial.score, 0.1, scores, nll=[2 * initial.nll])
    none = adapt(parent, shots, AdaptConfig(lr=1e-3, max_steps=8), calibration=already)
    assert (none.steps, none.stop_reason) == (0, "target")
    for key, tensor in none.model.extractor.state_dict().items():
        assert torch.equal(tensor, parent.extractor.state_dict()[key]), key


def test_stop_rule_follows_the_nll_not_the_score(parent: CSFlow, shots: Tensor) -> None:
    """Shots whose score is already below the calibration median but whose NLL is not keep adapting;
    shots whose NLL is already there stop, whatever their score (the objective decides, not the score,
    which leaves out the log-det)."""
    initial = adapt(parent, shots, AdaptConfig(max_steps=0)).history[0]
    score_reached = Calibration(10 * initial.score, 0.1, [2 * initial.score] * 3, nll=[0.7 * initial.nll] * 3)
    result = adapt(parent, shots, AdaptConfig(lr=1e-3, max_steps=8), calibration=score_reached)
    assert result.steps > 0 and result.stop_reason == "target"
    assert result.history[0].score <= 2 * initial.score  # a score rule would have stopped at once

    nll_reached = Calibration(10 * initial.score, 0.1, [0.1 * initial.score] * 3, nll=[2 * initial.nll] * 3)
    stopped = adapt(parent, shots, AdaptConfig(lr=1e-3, max_steps=8), calibration=nll_reached)
    assert (stopped.steps, stopped.stop_reason) == (0, "target")


def test_stop_on_score_uses_the_calibration_scores(parent: CSFlow, shots: Tensor) -> None:
    initial = adapt(parent, shots, AdaptConfig(max_steps=0)).history[0]
    calibration = Calibration(10 * initial.score, 0.1, [0.8 * initial.score] * 3, nll=[2 * initial.nll] * 3)
    result = adapt(parent, shots, AdaptConfig(lr=1e-3, max_steps=8, stop_on="score"), calibration=calibration)
    assert result.target == pytest.approx(0.8 * initial.score) and result.stop_reason == "target"
    assert result.steps > 0 and result.final.score <= result.target < result.history[-2].score


def test_calibration_without_nll_cannot_set_a_target(parent: CSFlow, shots: Tensor) -> None:
    scores_only = Calibration(1.0, 0.1, [0.5, 1.0])
    with pytest.raises(ValueError, match="no stopping target"):
        adapt(parent, shots, AdaptConfig(max_steps=2), calibration=scores_only)
    adapt(parent, shots, AdaptConfig(max_steps=1, stop_quantile=None), calibration=scores_only)  # no target: fine


@pytest.mark.parametrize(
    ("config", "forwards"),
    [
        (FAST, FAST.max_steps + 1),  # one forward per update (stop check + gradient) and the final check
        (AdaptConfig(lr=1e-3, max_steps=3, stop_quantile=None, augmentation=Augmentation(hflip=True)), 2 * 3 + 1),
        (AdaptConfig(lr=1e-3, max_steps=3, stop_quantile=None, batch_norm="batch"), 2 * 3 + 1),
    ],
)
def test_each_step_reuses_its_forward_for_the_stop_check(
    parent: CSFlow, shots: Tensor, config: AdaptConfig, forwards: int
) -> None:
    """Without augmentation and with frozen BN the update's forward is the clean shots' forward, so it is
    not run twice; otherwise the clean check needs its own pass."""
    calls: list[int] = []
    handle = parent.flow.register_forward_pre_hook(lambda *_: calls.append(1))  # the flow is shared
    try:
        result = adapt(parent, shots, config)
    finally:
        handle.remove()
    assert result.steps == 3 and len(calls) == forwards


def test_shared_forward_records_the_loss_it_stepped_on(parent: CSFlow, shots: Tensor) -> None:
    result = adapt(parent, shots, FAST)
    for record in result.history[:-1]:
        assert record.train_nll == record.nll


def test_non_finite_model_stops_as_diverged(make_tiny_model: Callable[..., CSFlow], shots: Tensor) -> None:
    model = make_tiny_model(seed=1, weights=NO_WEIGHTS)
    with torch.no_grad():
        next(model.flow.parameters()).fill_(float("nan"))
    result = adapt(model, shots, FAST)
    assert (result.stop_reason, result.steps) == ("diverged", 0)


def test_a_step_that_blows_up_is_undone(parent: CSFlow, shots: Tensor) -> None:
    result = adapt(parent, shots, AdaptConfig(lr=1e30, max_steps=3, stop_quantile=None))
    assert (result.stop_reason, result.steps) == ("diverged", 1)
    assert not math.isfinite(result.final.score)
    before = parent.extractor.state_dict()
    assert all(torch.equal(v, before[k]) for k, v in result.model.extractor.state_dict().items())
    json.dumps(result.summary(), allow_nan=False)  # fit for a manifest


def test_batch_norm_batch_mode_updates_running_stats_of_adapted_blocks_only(parent: CSFlow, shots: Tensor) -> None:
    result = adapt(parent, shots, AdaptConfig(lr=1e-3, max_steps=1, stop_quantile=None, batch_norm="batch"))
    before = parent.extractor.state_dict()
    changed = {k for k, v in result.model.extractor.state_dict().items() if not torch.equal(v, before[k])}
    assert any("running_mean" in k for k in changed)
    assert all(k.startswith(ADAPTED) for k in changed)


def test_sgd_and_seeded_augmentation_are_deterministic(parent: CSFlow, shots: Tensor) -> None:
    config = AdaptConfig(
        optimizer="sgd", lr=1e-3, max_steps=2, stop_quantile=None, seed=5, augmentation=Augmentation(hflip=True)
    )
    a, b = adapt(parent, shots, config), adapt(parent, shots, config)
    assert [r.nll for r in a.history] == [r.nll for r in b.history]
    state_b = b.model.extractor.state_dict()
    assert all(torch.equal(v, state_b[k]) for k, v in a.model.extractor.state_dict().items())


def test_rejects_bad_shots_and_config(parent: CSFlow, shots: Tensor) -> None:
    for bad in (shots[:, :1], shots[:, :, :64, :64], shots * 2, shots[:0]):
        with pytest.raises(ValueError):
            adapt(parent, bad, FAST)
    for kwargs in (
        {"optimizer": "rmsprop"},
        {"batch_norm": "train"},
        {"lr": 0.0},
        {"stop_quantile": 1.5},
        {"stop_on": "loss"},
        {"micro_batch": -1},
        {"micro_batch": "all"},
    ):
        with pytest.raises(ValueError):
            AdaptConfig(**kwargs)


def test_augmentation_is_seeded(make_images: Callable[..., Tensor]) -> None:
    images = make_images(3, seed=2)
    config = Augmentation(hflip=True, vflip=True, max_shift=0.05, noise_std=0.02)

    def draw(seed: int) -> Tensor:
        return augment(images, config, torch.Generator().manual_seed(seed))

    first, again, other = draw(7), draw(7), draw(8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.shape == images.shape and first.min() >= 0 and first.max() <= 1
    assert not torch.equal(first, images)
    assert torch.equal(augment(images, NO_AUGMENTATION, torch.Generator()), images)
    shift_only = augment(images, Augmentation(max_shift=0.05, noise_std=0.0), torch.Generator().manual_seed(1))
    assert torch.allclose(shift_only.mean(), images.mean(), atol=0.05)  # a shift moves content, adds nothing
    with pytest.raises(ValueError):
        Augmentation(max_shift=0.5)


def test_synthetic_defects_are_seeded_and_visible(make_images: Callable[..., Tensor]) -> None:
    images = make_images(2, seed=3)
    config = DefectConfig(per_image=4)
    a = synthetic_defects(images, config, torch.Generator().manual_seed(0))
    b = synthetic_defects(images, config, torch.Generator().manual_seed(0))
    c = synthetic_defects(images, config, torch.Generator().manual_seed(1))
    assert a.shape == (8, 3, 128, 128) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    for i in range(8):
        changed = (a[i] - images[i // 4]).abs().amax(dim=0) > 0.1
        share = changed.float().mean().item()
        assert 0.002 < share < 0.2, (i, share)  # a local defect, not a global change
    scratches = synthetic_defects(images, DefectConfig(per_image=2, kinds=("scratch",)), torch.Generator())
    assert scratches.shape[0] == 4
    with pytest.raises(ValueError):
        DefectConfig(kinds=("smudge",))
    assert np.isfinite(a.numpy()).all()


@pytest.mark.parametrize(("micro_batch", "checkpoint"), [(2, False), (1, True), (2, True)])
def test_micro_batches_and_checkpointing_give_the_full_batch_update(
    parent: CSFlow, make_images: Callable[..., Tensor], micro_batch: int, checkpoint: bool
) -> None:
    """Memory bounding (issue 14) must not change the step: 3 shots split 2 + 1 (or 1 + 1 + 1), blocks
    recomputed in the backward pass, against one full batch. Plain SGD without clipping, so the update is
    -lr x gradient and a wrong accumulation (summed instead of averaged, parts weighted unequally, a part
    dropped) shows in its size."""
    shots = make_images(3, seed=12)
    base = {"optimizer": "sgd", "momentum": 0.0, "lr": 1e-2, "grad_clip": 1e9, "max_steps": 1, "stop_quantile": None}
    full = adapt(parent, shots, AdaptConfig(**base, micro_batch=0, checkpoint=False))
    split = adapt(parent, shots, AdaptConfig(**base, micro_batch=micro_batch, checkpoint=checkpoint))
    before = parent.extractor.state_dict()
    full_state, split_state = full.model.extractor.state_dict(), split.model.extractor.state_dict()
    moved = 0
    for key, value in full_state.items():
        want, got = value - before[key], split_state[key] - before[key]
        if key.startswith(ADAPTED) and want.is_floating_point() and want.abs().max() > 0:
            moved += 1
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())
        else:
            assert torch.equal(got, want), key
    assert moved > 10
    assert split.history[0].nll == pytest.approx(full.history[0].nll, rel=1e-5)
    assert split.history[0].score == pytest.approx(full.history[0].score, rel=1e-5)
    assert split.history[0].train_nll == pytest.approx(full.history[0].train_nll, rel=1e-5)
    assert split.history[1].nll == pytest.approx(full.history[1].nll, rel=1e-5)


def test_checkpointing_with_batch_norm_batch_updates_running_stats_once(parent: CSFlow, shots: Tensor) -> None:
    """A recomputed block in train mode would update its running statistics twice: batch BN keeps the
    adapted blocks out of checkpointing (and its training pass whole), so the result is the plain one."""
    base = {"lr": 1e-3, "max_steps": 1, "stop_quantile": None, "batch_norm": "batch"}
    plain = adapt(parent, shots, AdaptConfig(**base, micro_batch=0, checkpoint=False))
    bounded = adapt(parent, shots, AdaptConfig(**base, micro_batch=1, checkpoint=True))
    plain_state = plain.model.extractor.state_dict()
    for key, value in bounded.model.extractor.state_dict().items():
        torch.testing.assert_close(value, plain_state[key], rtol=1e-4, atol=1e-6, msg=key)


def test_checkpointing_is_undone_after_the_run(run: tuple[AdaptResult, dict[str, Tensor], dict[str, Tensor]]) -> None:
    """The candidate is served afterwards: its blocks run their own forward, not a checkpointed one."""
    result = run[0]
    assert all("forward" not in vars(block) for block in flat_blocks(result.model.extractor).values())


def test_micro_batch_size_settings() -> None:
    """A number caps the shots per pass (0: all); 'auto' is the worker's forward-batch rule: one shot on a
    CPU from 512 px, 8 below, all on a GPU; the [adapt] setting accepts exactly these."""
    from pydantic import ValidationError

    from daemon.config import AdaptSection

    assert [micro_batch_size(m, "cpu", 768, 10) for m in (0, 1, 2, 16)] == [10, 1, 2, 10]
    assert micro_batch_size("auto", "cpu", 768, 10) == 1
    assert micro_batch_size("auto", "cpu", 256, 10) == 8
    assert micro_batch_size("auto", "cpu", 256, 3) == 3
    assert micro_batch_size("auto", "cuda", 768, 10) == 10
    assert AdaptSection().to_configs()[0].micro_batch == 2
    assert AdaptSection(micro_batch="auto").to_configs()[0].micro_batch == "auto"
    for bad in (-1, "all"):
        with pytest.raises(ValidationError):
            AdaptSection(micro_batch=bad)

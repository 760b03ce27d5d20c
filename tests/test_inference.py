"""The serving options: batch norms folded and channels-last give fp32's scores, bf16 stays within its
stated tolerance, and the forward batch follows the device and image size."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from csflow.inference import fold_batch_norm, prepare_for_serving
from csflow.model import CSFlow
from csflow.scoring import score_images
from csflow.serving_options import (
    BF16_BLOCK_MIN_PIXELS,
    CPU_LARGE_IMAGE_BATCH,
    CPU_LARGE_IMAGE_PX,
    CPU_SMALL_IMAGE_BATCH,
    SCORE_RTOL,
    ServingOptions,
    forward_batch,
    overlaps_forward,
    parse_options,
)


@pytest.fixture(scope="module")
def model(make_tiny_model: Callable[..., CSFlow]) -> CSFlow:
    """Pretrained lite0 features (real batch-norm statistics to fold) and a flow whose couplings are open."""
    return make_tiny_model(perturb=0.05)


@pytest.fixture(scope="module")
def images(make_images: Callable[..., Tensor]) -> Tensor:
    return make_images(12, seed=3)


def _served(model: CSFlow, images: Tensor, mode: str) -> np.ndarray:
    options = parse_options(mode)
    return score_images(prepare_for_serving(copy.deepcopy(model), options), images, options=options).image


def test_folding_removes_every_batch_norm_and_keeps_the_features(model: CSFlow, images: Tensor) -> None:
    extractor = copy.deepcopy(model.extractor)
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in extractor.modules())
    assert n_norms > 0
    assert fold_batch_norm(extractor) == n_norms
    assert not any(isinstance(m, nn.BatchNorm2d) for m in extractor.modules())
    with torch.no_grad():
        for folded, plain in zip(extractor(images), model.extractor(images), strict=True):
            torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4)  # fp32 re-association


@pytest.mark.parametrize("mode", ["fp32+fold", "fp32+cl", "fp32+cl+fold"])
def test_layout_and_folding_keep_fp32_scores(model: CSFlow, images: Tensor, mode: str) -> None:
    reference = score_images(model, images).image
    np.testing.assert_allclose(_served(model, images, mode), reference, rtol=SCORE_RTOL["fp32"])


@pytest.mark.parametrize("mode", ["bf16-flow", "bf16-flow+cl", "bf16-blocks", "bf16-blocks+cl", "bf16", "bf16+cl+fold"])
def test_bf16_scores_stay_within_the_stated_tolerance(model: CSFlow, images: Tensor, mode: str) -> None:
    reference = score_images(model, images).image
    fast = _served(model, images, mode)
    assert fast.dtype == np.float64
    assert not np.array_equal(fast, reference)  # bf16 did run
    np.testing.assert_allclose(fast, reference, rtol=SCORE_RTOL[parse_options(mode).precision])


def test_bf16_blocks_run_after_the_first_stage_on_large_maps_only(model: CSFlow, images: Tensor) -> None:
    """bf16-blocks: the first stage stays fp32, a later block runs in bf16 where its input holds at least
    BF16_BLOCK_MIN_PIXELS pixels per channel and in fp32 below, the residual stream between blocks is fp32,
    and every weight stays fp32 (adapters are loaded into the served blocks)."""
    served = prepare_for_serving(copy.deepcopy(model), parse_options("bf16-blocks"))
    blocks = served.extractor.blocks
    inputs: dict[str, list[tuple[torch.dtype, int]]] = {"first": [], "later": []}  # dtype, batch x height x width
    inside: dict[str, list[torch.dtype]] = {"first": [], "later": []}  # the depthwise convolution's output
    for name, block in (("first", blocks[0][0]), ("later", blocks[1][0])):
        block.register_forward_pre_hook(lambda _, args, name=name: inputs[name].append(_dtype_and_pixels(args[0])))
        block.conv_dw.register_forward_hook(lambda _, __, out, name=name: inside[name].append(out.dtype))
    with torch.no_grad():
        served.extractor(images)  # three scales: each block meets maps of three sizes
        served.extractor(images[:1])
    assert set(inside["first"]) == {torch.float32}
    later = list(zip(inputs["later"], inside["later"], strict=True))
    large = {dtype for (_, pixels), dtype in later if pixels >= BF16_BLOCK_MIN_PIXELS}
    small = {dtype for (_, pixels), dtype in later if pixels < BF16_BLOCK_MIN_PIXELS}
    assert large == {torch.bfloat16} and small == {torch.float32}
    assert {dtype for dtype, _ in inputs["first"] + inputs["later"]} == {torch.float32}  # the residual stream
    assert {p.dtype for p in served.extractor.parameters()} == {torch.float32}


def _dtype_and_pixels(x: Tensor) -> tuple[torch.dtype, int]:
    return x.dtype, x.shape[0] * x.shape[-2] * x.shape[-1]


def test_serving_leaves_no_gradients_and_fp32_latents(model: CSFlow, images: Tensor) -> None:
    served = prepare_for_serving(copy.deepcopy(model), parse_options("bf16+cl"))
    assert not any(p.requires_grad for p in served.parameters())
    with torch.no_grad():
        out = served(images[:2].contiguous(memory_format=torch.channels_last))
    assert all(z.dtype == torch.float32 for z in out.z) and out.log_jac_det.dtype == torch.float32


def test_channels_last_is_the_extractors_layout_and_the_flow_stays_contiguous(model: CSFlow, images: Tensor) -> None:
    """The flow's convolutions run on maps of a few pixels a side, where the contiguous layout is the faster
    one on a CPU (docs/RESULTS.md): whatever the extractor's layout, the flow's weights and inputs stay so."""
    served = prepare_for_serving(copy.deepcopy(model), parse_options("fp32+cl"))
    extractor_weights = [p for p in served.extractor.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert extractor_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in extractor_weights)
    flow_weights = [p for p in served.flow.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert flow_weights and all(p.is_contiguous() for p in flow_weights)
    inputs: list[Tensor] = []
    first_conv = next(m for m in served.flow.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    score_images(served, images[:2], options=parse_options("fp32+cl"))
    assert inputs and all(x.is_contiguous() for x in inputs)


def test_unknown_serving_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        ServingOptions(precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown serving flags"):
        parse_options("bf16+fast")


def test_forward_batch_fits_the_device_and_image_size() -> None:
    assert forward_batch("auto", "cpu", CPU_LARGE_IMAGE_PX, 16) == CPU_LARGE_IMAGE_BATCH
    assert forward_batch("auto", "cpu", CPU_LARGE_IMAGE_PX - 128, 16) == CPU_SMALL_IMAGE_BATCH
    assert forward_batch("auto", "cpu", 256, 3) == 3
    assert forward_batch("auto", "cuda", 768, 16) == 16
    assert forward_batch(4, "cpu", 768, 16) == 4
    assert forward_batch(32, "cuda", 768, 5) == 5
    assert forward_batch("auto", "cpu", 768, 0) == 1


def test_a_stage_overlaps_the_forward_pass_only_where_it_takes_no_cpu_from_it() -> None:
    assert not overlaps_forward("auto", "cpu", cores=2, torch_threads=2, threads=2)
    assert not overlaps_forward("auto", "cpu", cores=8, torch_threads=8, threads=2)
    assert overlaps_forward("auto", "cpu", cores=16, torch_threads=8, threads=2)
    assert overlaps_forward("auto", "cuda", cores=2, torch_threads=2, threads=2)
    assert overlaps_forward(True, "cpu", cores=2, torch_threads=2, threads=2)
    assert not overlaps_forward(False, "cuda", cores=16, torch_threads=2, threads=2)

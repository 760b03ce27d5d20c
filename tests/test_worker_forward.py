"""The worker's forward pass: `[worker] forward_batch` images at a time, the same scores as one pass."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from csflow.model import CSFlow
from csflow.scoring import score_images
from daemon.config import Settings, WorkerSection
from daemon.worker import Worker


def _forward_sizes(model: CSFlow, worker: Worker, images: Tensor) -> tuple[np.ndarray, list[int]]:
    sizes: list[int] = []
    hook = model.extractor.register_forward_hook(lambda _m, inputs, _o: sizes.append(len(inputs[0])))
    try:
        version: Any = SimpleNamespace(model=model)
        scores = worker._forward(version, list(images))
    finally:
        hook.remove()
    return scores, sizes


@pytest.mark.parametrize(("setting", "expected"), [(2, [2, 2, 1]), ("auto", [5])])
def test_forward_batch_chunks_the_frames(
    make_tiny_model: Callable[..., CSFlow],
    make_images: Callable[..., Tensor],
    setting: int | str,
    expected: list[int],
) -> None:
    """At 128 px on a CPU "auto" takes the batch whole; a number splits it, with the same scores."""
    model = make_tiny_model(perturb=0.05)
    images = make_images(5, seed=4)
    worker = Worker(
        Settings(worker=WorkerSection(forward_batch=setting)), SimpleNamespace(model=model), torch.device("cpu")
    )  # type: ignore[arg-type]
    scores, sizes = _forward_sizes(model, worker, images)
    assert sizes == expected
    np.testing.assert_allclose(scores, score_images(model, images).image, rtol=1e-5)

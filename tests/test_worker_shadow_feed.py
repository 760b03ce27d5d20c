"""A candidate in shadow sees each frame once: frames that already had a verdict (redeliveries) are not
scored for the shadow again (the drift monitor's side is in tests/integration/test_faults.py)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from csflow.model import CSFlow
from daemon.config import Settings
from daemon.worker import Worker


def test_only_fresh_frames_reach_the_shadow(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor]
) -> None:
    model = make_tiny_model(perturb=0.05)
    worker = Worker(Settings(), SimpleNamespace(model=model), torch.device("cpu"))  # type: ignore[arg-type]
    seen: list[list[float]] = []
    worker.controller = SimpleNamespace(  # type: ignore[assignment]
        shadow=("cam-1", model), observe_shadow=lambda parent, candidate, nll: seen.append(parent)
    )
    frames: list[Any] = [SimpleNamespace(camera_id=c) for c in ("cam-1", "cam-1", "cam-2", "cam-1")]
    good = list(zip(frames, make_images(4), strict=True))
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    worker._score_shadow(good, scores, [True, False, True, True])  # the second was a redelivery
    assert seen == [[1.0, 4.0]]
    worker._score_shadow(good, scores, [False, False, False, False])
    assert seen == [[1.0, 4.0]]

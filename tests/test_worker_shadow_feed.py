"""A candidate in shadow sees each frame once: frames that already had a verdict (redeliveries) are not
scored for the shadow again (the drift monitor's side is in tests/integration/test_faults.py)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adapters.shadow import ShadowConfig, ShadowEvaluation
from csflow.calibration import Calibration
from csflow.model import CSFlow
from csflow.scoring import score_images
from daemon.config import Settings
from daemon.worker import Worker


def shadowing_worker(model: CSFlow, candidate: CSFlow | None) -> tuple[Worker, ShadowEvaluation]:
    """A worker serving `model` whose controller shadows `candidate` on cam-1 into the returned evaluation."""
    worker = Worker(Settings(), SimpleNamespace(model=model), torch.device("cpu"))  # type: ignore[arg-type]
    reference = Calibration(1.0, 0.1, [0.5, 1.0], probe_detection={"0.5": 0.5, "1": 1.0})
    evaluation = ShadowEvaluation(reference, [], ShadowConfig(frames=10, probes_per_frame=2))
    worker.controller = SimpleNamespace(  # type: ignore[assignment]
        shadow=("cam-1", candidate),
        shadow_probes=evaluation.probe_images,
        observe_shadow=lambda *columns: [evaluation.update(*row) for row in zip(*columns, strict=True)],
    )
    return worker, evaluation


def test_only_fresh_frames_reach_the_shadow(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor]
) -> None:
    model = make_tiny_model(perturb=0.05)
    worker = Worker(Settings(), SimpleNamespace(model=model), torch.device("cpu"))  # type: ignore[arg-type]
    seen: list[list[float]] = []
    probes: list[list[list[float]]] = []
    parent_probes: list[list[list[float]]] = []
    parent_nlls: list[list[float]] = []
    reference = Calibration(1.0, 0.1, [0.5, 1.0], probe_detection={"0.5": 0.5, "1": 1.0})
    evaluation = ShadowEvaluation(reference, [], ShadowConfig(frames=10, probes_per_frame=3))

    def observe(
        parent: list[float],
        candidate: list[float],
        nll: list[float],
        probe: list[list[float]],
        by_parent: list,
        parent_nll: list[float],
    ) -> None:
        seen.append(parent)
        probes.append(probe)
        parent_probes.append(by_parent)
        parent_nlls.append(parent_nll)

    worker.controller = SimpleNamespace(  # type: ignore[assignment]
        shadow=("cam-1", model), shadow_probes=evaluation.probe_images, observe_shadow=observe
    )
    frames: list[Any] = [SimpleNamespace(camera_id=c) for c in ("cam-1", "cam-1", "cam-2", "cam-1")]
    good = list(zip(frames, make_images(4), strict=True))
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    parent = make_tiny_model(perturb=0.2)
    versions: list[Any] = [SimpleNamespace(model=parent)] * 4
    worker._score_shadow(good, versions, scores, [True, False, True, True])  # the second was a redelivery
    assert seen == [[1.0, 4.0]]
    # each fresh frame's probes were scored by the candidate in the same pass: 3 finite scores per frame
    assert len(probes[0]) == 2 and all(len(p) == 3 and np.isfinite(p).all() for p in probes[0])
    # and the same probes by the parent serving the camera (its sensitivity on these frames)
    assert len(parent_probes[0]) == 2 and all(len(p) == 3 and np.isfinite(p).all() for p in parent_probes[0])
    assert not np.allclose(parent_probes[0], probes[0])
    # without [adapt] recalibrate the parent scores the probes only: its frames' NLLs are not measured
    assert np.isnan(parent_nlls[0]).all()
    worker._score_shadow(good, versions, scores, [False, False, False, False])
    assert seen == [[1.0, 4.0]]


def test_a_parent_that_fails_on_the_probes_costs_only_its_sensitivity_figure(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor]
) -> None:
    """The parent's probe scores are reported, not needed: when that pass fails, the shadow still gets the
    frames' scores and the candidate's probes, and no parent probe scores (so no parent figure)."""
    model = make_tiny_model(perturb=0.05)
    worker, evaluation = shadowing_worker(model, model)
    broken: list[Any] = [SimpleNamespace(model=None)] * 2  # scoring with it raises
    good = list(zip([SimpleNamespace(camera_id="cam-1")] * 2, make_images(2), strict=True))
    worker._score_shadow(good, broken, np.array([1.0, 2.0]), [True, True])
    assert evaluation.parent == [1.0, 2.0] and len(evaluation.probe) == 4 and np.isfinite(evaluation.probe).all()
    assert evaluation.parent_probe == []
    # nor NLLs: the parent's recalibration is refused on them, the candidate's shadow goes on
    assert len(evaluation.parent_nll) == 2 and np.isnan(evaluation.parent_nll).all()
    assert not evaluation.recalibration().decide().accepted


def test_without_a_candidate_the_parents_columns_stand_for_the_candidates(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor]
) -> None:
    """A parent alone in shadow (its candidate refused offline, [adapt] recalibrate): one pass of the parent
    gives the candidate's columns, NLLs included, and its probes are scored once."""
    parent = make_tiny_model(perturb=0.05)
    worker, evaluation = shadowing_worker(parent, None)
    good = list(zip([SimpleNamespace(camera_id="cam-1")] * 3, make_images(3), strict=True))
    served = score_images(parent, torch.stack([image for _, image in good])).image
    worker._score_shadow(good, [SimpleNamespace(model=parent)] * 3, served, [True] * 3)
    np.testing.assert_allclose(evaluation.candidate, served, rtol=1e-5)
    assert evaluation.candidate_nll == evaluation.parent_nll and np.isfinite(evaluation.parent_nll).all()
    assert evaluation.probe == evaluation.parent_probe and len(evaluation.probe) == 6

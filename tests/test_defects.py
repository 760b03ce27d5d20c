"""The sensitivity probe's pieces (csflow/defects.py): which probe goes where, how strong, how counted."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from csflow.defects import DefectConfig, ProbeItem, graded_defects, probe_detection, probe_plan, sensitivity

STRENGTHS = [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("per_host", [1, 2, 3, 4])
def test_every_strength_meets_every_kind_equally_often(per_host: int) -> None:
    plan = probe_plan(0, 8, per_host, STRENGTHS, 2)
    assert len(plan) == 8 * per_host and [item.host for item in plan[:per_host]] == [0] * per_host
    pairs = Counter((item.strength, item.kind) for item in plan)
    assert set(pairs) == {(s, k) for s in STRENGTHS for k in (0, 1)}
    assert max(pairs.values()) == min(pairs.values())


def test_a_plan_in_pieces_is_the_plan_in_one_go() -> None:
    """A worker plans batch by batch from its position in the stream; a recorded stream plans all at once."""
    whole = probe_plan(0, 7, 2, STRENGTHS, 2)
    pieces = probe_plan(0, 3, 2, STRENGTHS, 2) + probe_plan(3, 4, 2, STRENGTHS, 2)
    assert [(i.strength, i.kind) for i in pieces] == [(i.strength, i.kind) for i in whole]


def test_strength_blends_the_defect_in_linearly() -> None:
    host = torch.rand(1, 3, 32, 32)
    config = DefectConfig(kinds=("scratch",))
    full = graded_defects(host, [ProbeItem(0, 1.0, 0)], config, torch.Generator().manual_seed(3))
    half = graded_defects(host, [ProbeItem(0, 0.5, 0)], config, torch.Generator().manual_seed(3))
    assert (full - host).abs().sum() > 1.0  # a visible defect
    torch.testing.assert_close(half - host, 0.5 * (full - host))


def test_detection_per_strength_and_its_mean() -> None:
    plan = probe_plan(0, 4, 2, [0.5, 1.0], 2)  # per host: strengths 0.5 and 1.0
    scores = [0.5, 2.0, 1.5, 2.0, 0.2, math.nan, 0.9, 3.0]  # strength 0.5: 0.5, 1.5, 0.2, 0.9
    detection = probe_detection(scores, plan, threshold=1.0)
    assert detection == {"0.5": 0.25, "1": 0.75}  # NaN counts as missed
    assert sensitivity(detection) == 0.5
    with pytest.raises(ValueError, match="probe scores"):
        probe_detection(scores[:-1], plan, 1.0)
    with pytest.raises(ValueError):
        sensitivity({})

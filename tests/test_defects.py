"""The sensitivity probe's pieces (csflow/defects.py): which probe goes where, how strong, how counted."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from csflow.defects import (
    DefectConfig,
    ProbeItem,
    graded_defects,
    probe_detection,
    probe_plan,
    sensitivity,
    sensitivity_noise,
    synthetic_defects,
)

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


def test_the_probes_noise_is_the_standard_error_of_their_mean_rate() -> None:
    """Per strength p(1 - p)/n at the reference's rates, averaged over the strengths; a strength caught
    always (or never) adds no noise; more probes, less noise; a strength with no probes is an error."""
    reference = {"0.5": 0.5, "1": 1.0}
    assert sensitivity_noise(reference, {"0.5": 25, "1": 25}) == pytest.approx(math.sqrt(0.25 / 25) / 2)
    assert sensitivity_noise(reference, {"0.5": 100, "1": 1}) == pytest.approx(0.025)
    with pytest.raises(ValueError, match="every strength"):
        sensitivity_noise(reference, {"0.5": 25})
    # empirically: a model as sensitive as the reference, probed 60 times per strength, reads below it by
    # more than two such errors about one time in forty-four (normal approximation; binomial rates are lumpy)
    rng = torch.Generator().manual_seed(0)
    rates = torch.tensor([0.5, 0.7, 0.9])
    reads = (torch.rand(20_000, 3, 60, generator=rng) < rates[:, None]).float().mean(dim=(1, 2))
    noise = sensitivity_noise({str(i): float(p) for i, p in enumerate(rates)}, {"0": 60, "1": 60, "2": 60})
    assert reads.std().item() == pytest.approx(noise, rel=0.05)
    assert 0.01 < (reads < rates.mean() - 2 * noise).float().mean().item() < 0.04


@pytest.mark.parametrize("kind", ["scratch", "cutpaste"])
def test_a_defect_changes_with_the_light_as_the_image_does(kind: str) -> None:
    """Dimming, tinting or lifting the image (a gain and an offset per channel) before pasting gives the same
    image as pasting first: a probe on a dimmer line is as faint as a real defect there (absolute grey
    levels were not: a near-black bar stayed near-black on any line)."""
    coarse = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    images = 0.4 + 0.2 * torch.nn.functional.interpolate(coarse, size=(48, 48), mode="bilinear")
    gain, offset = torch.tensor([0.7, 0.6, 0.8]).view(1, 3, 1, 1), torch.tensor([0.05, 0.15, 0.0]).view(1, 3, 1, 1)
    config = DefectConfig(per_image=4, kinds=(kind,))
    pasted_then_dimmed = synthetic_defects(images, config, torch.Generator().manual_seed(1)) * gain + offset
    dimmed_then_pasted = synthetic_defects(images * gain + offset, config, torch.Generator().manual_seed(1))
    torch.testing.assert_close(dimmed_then_pasted, pasted_then_dimmed)
    assert ((pasted_then_dimmed - images.repeat_interleave(4, 0) * gain - offset).abs() > 0.05).any()


def test_a_flat_frame_still_gets_a_visible_defect() -> None:
    flat = torch.full((1, 3, 32, 32), 0.5)
    out = synthetic_defects(flat, DefectConfig(per_image=2), torch.Generator().manual_seed(0))
    assert ((out - flat).abs() >= 2 * DefectConfig().min_std).any(dim=(1, 2, 3)).all()
    with pytest.raises(ValueError, match="scratch_contrast"):
        DefectConfig(scratch_contrast=(2.0, 1.0))

"""Synthetic defects pasted onto normal images, for checks that a model still flags what it should.

Every random draw comes from an explicit CPU `torch.Generator`, so a seed gives the same images on any
device and in any process. Images are (N, 3, S, S) in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DefectConfig:
    """Synthetic defects pasted onto normal images: alternately a scratch and a cut-paste patch.

    Sizes are fractions of the image side. A scratch is a dark or bright bar about 2.5 sizes long and
    a fifth of a size wide; a cut-paste patch is a square of one size taken from elsewhere in the same
    image, rotated by a multiple of 90 degrees and made clearly darker or brighter (CutPaste-style).
    The defaults give defects that an inspector would call obvious, so a model that misses them has
    lost sensitivity rather than met a borderline case.

    How dark or bright is measured in the host image's own contrast: a scratch's grey level lies
    `scratch_contrast` standard deviations of the host's intensities (per channel) from its mean, a
    patch is moved by `patch_contrast` of them. So a defect changes with the image as a real one does when
    the light, the exposure or the colour of the line changes (for a gain and an offset per channel,
    pasting before or after the change gives the same image): on a dimmer or flatter line it is as faint
    as a real crack there, not a black bar that any model catches. The defaults are about as far from
    the mean as a near-black bar and a halved patch are on a mid-grey textured part.
    """

    per_image: int = 4
    min_size: float = 0.1
    max_size: float = 0.2
    kinds: tuple[str, ...] = ("scratch", "cutpaste")  # copy j of an image gets kinds[j % len(kinds)]
    scratch_contrast: tuple[float, float] = (3.0, 5.0)
    patch_contrast: tuple[float, float] = (2.0, 3.0)
    # A flat host (a blank frame) still gets a visible defect: its standard deviation counts as at least this.
    min_std: float = 0.02

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(DEFECT_KINDS)
        if not self.kinds or unknown:
            raise ValueError(f"kinds must be a non-empty selection of {list(DEFECT_KINDS)}, got {list(self.kinds)}")
        if self.per_image < 1:
            raise ValueError(f"per_image must be >= 1, got {self.per_image}")
        if not 0.0 < self.min_size <= self.max_size <= 0.5:
            raise ValueError(f"need 0 < min_size <= max_size <= 0.5, got {self.min_size}, {self.max_size}")
        for name in ("scratch_contrast", "patch_contrast"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high:
                raise ValueError(f"{name} needs 0 < low <= high, got {getattr(self, name)}")
        if self.min_std <= 0.0:
            raise ValueError(f"min_std must be > 0, got {self.min_std}")


def synthetic_defects(images: Tensor, config: DefectConfig, generator: torch.Generator) -> Tensor:
    """`config.per_image` defective copies of each image, (N * per_image, 3, S, S); copy j of image i is
    at index i * per_image + j and carries a defect of kind `config.kinds[j % len(config.kinds)]`."""
    out = []
    for image in images:
        for j in range(config.per_image):
            size = _uniform(config.min_size, config.max_size, generator)
            paste = DEFECT_KINDS[config.kinds[j % len(config.kinds)]]
            out.append(paste(image, size, config, generator))
    return torch.stack(out)


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return float(torch.empty(()).uniform_(low, high, generator=generator))


def _contrasting_offset(
    pixels: Tensor, contrast: tuple[float, float], config: DefectConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Per channel (3, 1, 1), the mean of `pixels` and an offset of `contrast` standard deviations of them (a
    drawn multiple), darker or brighter at random, except where only one side has room within [0, 1]."""
    coin = bool(torch.rand((), generator=generator) < 0.5)  # drawn always, so later draws do not shift
    z = _uniform(*contrast, generator)
    flat = pixels.flatten(1)
    mean = flat.mean(dim=1)
    offset = z * flat.std(dim=1).clamp_min(config.min_std)
    dark_fits, bright_fits = bool((mean - offset >= 0).all()), bool((mean + offset <= 1).all())
    if dark_fits == bright_fits:  # both sides have room (or neither): the coin, or the side with more room
        dark = coin if dark_fits else bool(mean.mean() > 0.5)
    else:
        dark = dark_fits
    return mean.view(-1, 1, 1), (-offset if dark else offset).view(-1, 1, 1)


def _scratch(image: Tensor, size: float, config: DefectConfig, generator: torch.Generator) -> Tensor:
    """A straight anti-aliased bar of constant level, darker or brighter than the image, through its centre region."""
    _, h, w = image.shape
    side = min(h, w)
    length = min(2.5 * size, 0.9) * side
    width = max(2.0, 0.2 * size * side)
    angle = _uniform(0.0, math.pi, generator)
    cy, cx = _uniform(0.3, 0.7, generator) * h, _uniform(0.3, 0.7, generator) * w
    mean, offset = _contrasting_offset(image, config.scratch_contrast, config, generator)
    level = (mean + offset).clamp(0.0, 1.0)
    # distance of each pixel centre to the segment p0 + t*u, t in [0, length]
    uy, ux = math.sin(angle), math.cos(angle)
    y0, x0 = cy - uy * length / 2, cx - ux * length / 2
    ys = torch.arange(h, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, -1) + 0.5
    t = ((ys - y0) * uy + (xs - x0) * ux).clamp(0.0, length)
    dist = torch.hypot(ys - (y0 + t * uy), xs - (x0 + t * ux))
    mask = (width / 2 + 0.5 - dist).clamp(0.0, 1.0).to(image.device, image.dtype)
    return image * (1 - mask) + level.to(image.dtype) * mask


def _cut_paste(image: Tensor, size: float, config: DefectConfig, generator: torch.Generator) -> Tensor:
    """A square patch from one place, rotated and made darker or brighter, pasted at another place."""
    _, h, w = image.shape
    p = max(2, round(size * min(h, w)))
    sy, sx, ty, tx = (int(torch.randint(0, limit - p + 1, (), generator=generator)) for limit in (h, w, h, w))
    quarter_turns = int(torch.randint(0, 4, (), generator=generator))
    patch = torch.rot90(image[:, sy : sy + p, sx : sx + p], quarter_turns, dims=(1, 2))
    _, offset = _contrasting_offset(image, config.patch_contrast, config, generator)
    out = image.clone()
    out[:, ty : ty + p, tx : tx + p] = (patch + offset.to(image.dtype)).clamp(0.0, 1.0)
    return out


DEFECT_KINDS = {"scratch": _scratch, "cutpaste": _cut_paste}


# --- the sensitivity probe ---------------------------------------------------------------------------
# Why. Whether a model still catches defects in a new domain cannot be read off live frames (too few of
# them are defective, and none are labelled), and obvious synthetic defects are caught by any model that
# is not broken. So the probe blends synthetic defects into normal images at graded strengths, from faint
# to obvious, and measures which share of them score above the threshold: a detection curve whose mean is
# the model's sensitivity. The calibrated model's curve on its held-out normals is the reference; an
# adapted candidate's curve on live frames of the new domain must not fall below it. The defects are
# pasted after the domain shift, but in the frame's own contrast (DefectConfig), so where the shift
# dims or flattens the image they fade with it as real defects do. Shifts that blur or restructure the
# texture hide real defects in ways a pasted one does not copy: for those the probe stays optimistic.


@dataclass(frozen=True)
class ProbeItem:
    """One probe: a defect of `DefectConfig.kinds[kind]` blended into image `host` of a batch at `strength`."""

    host: int
    strength: float
    kind: int


def probe_plan(first: int, n_hosts: int, per_host: int, strengths: Sequence[float], n_kinds: int) -> list[ProbeItem]:
    """Which probe goes onto which host, for hosts numbered `first`, `first + 1`, ... in stream order.

    Probes are numbered through the stream (`n = host * per_host + j`); probe n gets strength
    `strengths[n % len(strengths)]` and kind `n // len(strengths) % n_kinds`, so every run of
    `len(strengths) * n_kinds` consecutive probes has each strength with each kind once, whatever
    `per_host` is (the reference gives each held-out image every strength; a shadow each live frame a few).
    Host indices in the plan count from 0 at `first`."""
    if per_host < 1 or not strengths or n_kinds < 1:
        raise ValueError(f"need per_host >= 1, strengths and kinds, got {per_host}, {list(strengths)}, {n_kinds}")
    plan = []
    for i in range(n_hosts):
        for j in range(per_host):
            n = (first + i) * per_host + j
            plan.append(ProbeItem(i, float(strengths[n % len(strengths)]), n // len(strengths) % n_kinds))
    return plan


def graded_defects(
    hosts: Tensor, plan: Sequence[ProbeItem], config: DefectConfig, generator: torch.Generator
) -> Tensor:
    """One image per plan item: its host with a synthetic defect blended in, `(1 - s) * host + s * defective`."""
    out = []
    for item in plan:
        host = hosts[item.host]
        size = _uniform(config.min_size, config.max_size, generator)
        defective = DEFECT_KINDS[config.kinds[item.kind % len(config.kinds)]](host, size, config, generator)
        out.append(torch.lerp(host, defective, item.strength))
    return torch.stack(out) if out else hosts.new_empty((0, *hosts.shape[1:]))


def strength_key(strength: float) -> str:
    """How a strength names its detection rate in a manifest (JSON object keys are strings)."""
    return f"{strength:g}"


def probe_detection(scores: Sequence[float], plan: Sequence[ProbeItem], threshold: float) -> dict[str, float]:
    """Per strength, the share of its probes scoring above `threshold` (a non-finite score counts as missed)."""
    if len(scores) != len(plan):
        raise ValueError(f"got {len(scores)} probe scores for {len(plan)} probes")
    hits: dict[str, list[bool]] = {}
    for score, item in zip(scores, plan, strict=True):
        hits.setdefault(strength_key(item.strength), []).append(bool(math.isfinite(score) and score > threshold))
    return {key: sum(h) / len(h) for key, h in sorted(hits.items(), key=lambda kv: float(kv[0]))}


def sensitivity(detection: dict[str, float]) -> float:
    """The mean detection rate over strengths: the area under the probe's detection curve."""
    if not detection:
        raise ValueError("no probe detection rates")
    return sum(detection.values()) / len(detection)


def sensitivity_noise(reference: dict[str, float], counts: dict[str, int]) -> float:
    """The standard error of a `sensitivity` measured with `counts` probes per strength, were its true
    detection rates the `reference`'s: how far a model exactly as sensitive as the reference reads below it
    by chance (about one time in six by one such error, one in forty-four by two)."""
    if not reference or any(counts.get(key, 0) < 1 for key in reference):
        raise ValueError(f"need probes at every strength of {sorted(reference)}, got {counts}")
    variance = sum(p * (1.0 - p) / counts[key] for key, p in reference.items())
    return math.sqrt(variance) / len(reference)

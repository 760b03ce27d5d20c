"""Registry scopes, typed: `camera:ID`, `line:NAME` or `default`.

A camera serves its own scope's active version, else its line's ([registry] lines maps cameras to lines),
else the default scope's. The type is part of the scope's name, and so of its Redis keys (`active:{scope}`,
`history:{scope}`): a camera called `default`, or one whose id is also a line's name, has a scope of its
own (`camera:default`, `camera:line-3`) and an activation there never reaches the plant or the line.

Camera ids and line names are the characters of daemon/frames.py's ID_PATTERN (no `:`), so the type
prefix cannot be forged by a name. Apart from the registry so that the command line and the console
name scopes without loading the model stack.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

# Camera ids and line names: as daemon/frames.py's ID_PATTERN (a test keeps the two equal); that module
# loads the image stack, which the command line must not need to parse a scope.
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

CAMERA = "camera"
LINE = "line"
DEFAULT_SCOPE = "default"

Kind = Literal["camera", "line", "default"]


class ScopeError(ValueError):
    """A scope that is not `camera:ID`, `line:NAME` or `default`; the message says which form is expected."""


@dataclass(frozen=True)
class Scope:
    """A parsed scope; `str()` is its name in Redis keys, announcements and events."""

    kind: Kind
    name: str = ""  # the camera id or the line; "" for the default scope

    def __post_init__(self) -> None:
        if self.kind == DEFAULT_SCOPE:
            if self.name:
                raise ScopeError(f"the {DEFAULT_SCOPE} scope has no name (got {self.name!r})")
        elif self.kind in (CAMERA, LINE):
            _check_name(self.kind, self.name)
        else:
            raise ScopeError(f"scope kind {self.kind!r} is not {CAMERA}, {LINE} or {DEFAULT_SCOPE}")

    def __str__(self) -> str:
        return DEFAULT_SCOPE if self.kind == DEFAULT_SCOPE else f"{self.kind}:{self.name}"


def camera_scope(camera_id: str) -> str:
    """`camera:ID`, the scope a camera's own pin lives in."""
    return str(Scope(CAMERA, camera_id))


def line_scope(line: str) -> str:
    """`line:NAME`, the scope every camera of the line falls back to."""
    return str(Scope(LINE, line))


def parse_scope(text: str) -> Scope:
    """The scope named by `text`, refused (ScopeError) unless it is `camera:ID`, `line:NAME` or `default`."""
    if text == DEFAULT_SCOPE:
        return Scope(DEFAULT_SCOPE)
    kind, sep, name = text.partition(":")
    if sep and kind in (CAMERA, LINE):
        return Scope(kind, name)  # type: ignore[arg-type]  # narrowed by the test above
    hint = f"; did you mean {CAMERA}:{text} or {LINE}:{text}?" if ID_PATTERN.fullmatch(text) else ""
    raise ScopeError(
        f"scope {text!r} is not one of {CAMERA}:ID, {LINE}:NAME or {DEFAULT_SCOPE} "
        f"(ID and NAME: letters, digits, '.', '_', '-', at most 128){hint}"
    )


def check_scope(text: str) -> str:
    """`text` if it names a scope, else ScopeError (for callers that keep scopes as strings)."""
    return str(parse_scope(text))


def scope_chain(camera_id: str, lines: Mapping[str, str]) -> list[str]:
    """The scopes whose active version `camera_id` may serve, most specific first."""
    chain = [camera_scope(camera_id)]
    if camera_id in lines:
        chain.append(line_scope(lines[camera_id]))
    return [*chain, DEFAULT_SCOPE]


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not ID_PATTERN.fullmatch(name):
        what, placeholder = ("camera id", "ID") if kind == CAMERA else ("line name", "NAME")
        raise ScopeError(
            f"{kind} scope: {what} {name!r} must be 1 to 128 letters, digits, '.', '_' or '-' "
            f"(scope {kind}:{placeholder})"
        )

"""What every command shares: exit codes, the errors shown as one line, a progress bar."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_REJECTED = 3
# Shown as one line, not a traceback: the project's own errors (bad images, datasets, artifacts, weights,
# registry refusals) all derive from these two.
USER_ERRORS = (ValueError, RuntimeError)
T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int) -> Iterable[T]:
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, file=sys.stderr, disable=None, leave=False)

"""What every command shares: exit codes, the errors shown as one line, a progress bar."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

from csflow.artifacts import ArtifactError
from csflow.backbones import WeightsError
from csflow.data import DatasetError, ImageError

EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_REJECTED = 3
USER_ERRORS = (ImageError, DatasetError, ArtifactError, WeightsError, ValueError, RuntimeError)
T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int) -> Iterable[T]:
    return tqdm(items, desc=desc, total=total, file=sys.stderr, disable=None, leave=False)

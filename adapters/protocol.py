"""The paper's evaluation protocol (Dobrevski & Skočaj, Figure 4): five ways to meet a shifted domain.

For each shift, k (shots) and fold the same k shifted normal frames are given to every setting, and
all settings are scored on the same shifted test set. `target` and `source` do not use the shots, so
they are computed once per shift and shown for every k. Pure bookkeeping: drawing the shots, sizing
the from-scratch trainings, and summarising cells into rows; the runner in `lab.experiment` does
the training and the files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SETTINGS: dict[str, str] = {
    "target": "trained on the full shifted training set (best case)",
    "source": "source model on shifted data (worst case)",
    "shots": "trained on the k shots only",
    "source+shots": "trained on source + k shots",
    "adapted": "source model adapted with the k shots",
}
PER_SHIFT = ("target", "source")  # independent of k and fold


@dataclass(frozen=True)
class Cell:
    """One setting's result on one shifted test set. `fpr`/`tpr` are at the setting's own calibrated
    threshold; None where it has none (a flow trained on k shots has no held-out normals)."""

    setting: str
    shift: str
    k: int | None
    fold: int | None
    auroc: float
    fpr: float | None
    tpr: float | None
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return cell_key(self.setting, self.shift, self.k, self.fold)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        return cls(**data)


def cell_key(setting: str, shift: str, k: int | None, fold: int | None) -> str:
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    return f"{shift}/{setting}" if setting in PER_SHIFT else f"{shift}/{setting}/k={k}/fold={fold}"


def draw_shots(pool: Sequence[int], k: int, fold: int, seed: int) -> list[int]:
    """k distinct items of `pool` for this fold; the same (seed, fold, k) always gives the same shots."""
    if not 1 <= k <= len(pool):
        raise ValueError(f"cannot draw {k} shots from {len(pool)} training images")
    rng = np.random.default_rng([seed, fold, k])
    return sorted(int(pool[i]) for i in rng.choice(len(pool), size=k, replace=False))


def shots_epochs(epochs: int, n_train: int, k: int, batch_size: int) -> int:
    """Epochs over k shots that give as many optimiser steps as `epochs` over n_train images, so the
    shots-only flow is not simply under-trained."""
    return epochs * math.ceil(n_train / batch_size) // math.ceil(k / batch_size)


@dataclass(frozen=True)
class Row:
    """Mean and spread over folds of one setting at one (shift, k)."""

    shift: str
    k: int
    setting: str
    auroc_mean: float
    auroc_std: float
    fpr_mean: float | None
    tpr_mean: float | None
    n: int


def summarise(cells: Iterable[Cell], shifts: Sequence[str], shots: Sequence[int]) -> list[Row]:
    """Rows per shift, k and setting in the protocol's order; per-shift settings are repeated for each k."""
    by_group: dict[tuple[str, int, str], list[Cell]] = {}
    cells = list(cells)
    for cell in cells:
        for k in shots if cell.setting in PER_SHIFT else [cell.k]:
            by_group.setdefault((cell.shift, int(k), cell.setting), []).append(cell)  # type: ignore[arg-type]
    rows = []
    for shift in shifts:
        for k in shots:
            for setting in SETTINGS:
                group = by_group.get((shift, k, setting))
                if not group:
                    continue
                auroc = np.array([c.auroc for c in group])
                rows.append(
                    Row(
                        shift,
                        k,
                        setting,
                        float(auroc.mean()),
                        float(auroc.std(ddof=1)) if len(group) > 1 else 0.0,
                        _mean_or_none([c.fpr for c in group]),
                        _mean_or_none([c.tpr for c in group]),
                        len(group),
                    )
                )
    return rows


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def markdown_table(rows: Sequence[Row], shots: Sequence[int]) -> str:
    """Rows = (shift, setting), columns = k: image AUROC mean ± std over folds (just the value where there
    is one, as for the per-shift settings), and FPR / TPR at the setting's own threshold where it has one."""
    cells: dict[tuple[str, str], dict[int, Row]] = {}
    for row in rows:
        cells.setdefault((row.shift, row.setting), {})[row.k] = row
    header = "| shift | setting | " + " | ".join(f"k = {k}: AUROC (FPR / TPR)" for k in shots) + " |"
    lines = [header, "|" + "---|" * (2 + len(shots))]
    for (shift, setting), by_k in cells.items():
        values = []
        for k in shots:
            row = by_k.get(k)
            if row is None:
                values.append("–")
                continue
            op = f" ({row.fpr_mean:.2f} / {row.tpr_mean:.2f})" if row.fpr_mean is not None else ""
            spread = f" ± {row.auroc_std:.3f}" if row.n > 1 else ""  # one value: no spread to show
            values.append(f"{row.auroc_mean:.3f}{spread}{op}")
        lines.append(f"| {shift} | {SETTINGS[setting]} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"

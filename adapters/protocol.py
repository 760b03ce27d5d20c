"""The paper's evaluation protocol (Dobrevski & Skočaj, Figure 4): five ways to meet a shifted domain.

For each shift, k (shots) and fold the same k shifted normal frames are given to every setting, and
all settings are scored on the same shifted test set. `target` and `source` do not use the shots, so
they are computed once per shift and shown for every k. Pure bookkeeping: drawing the shots, sizing
the from-scratch trainings, and summarising cells into rows; the runner in `lab.experiment` does
the training and the files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
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
# An adapted version is "good" when, at its own threshold on the shifted test set, it rejects at most
# GOOD_MAX_FPR of the normal parts and catches defects within GOOD_MAX_TPR_DROP of the source model's
# TPR on clean data. The gate is judged against that.
GOOD_MAX_FPR = 0.05
GOOD_MAX_TPR_DROP = 0.05
GATE_CLASSES = ("accepted-good", "accepted-bad", "rejected-good", "rejected-bad")


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


def gate_class(cell: Cell) -> str | None:
    """Where an adapted cell falls in the gate's confusion table (None: not an adapted cell with a gate
    decision and an operating point). Its detail carries `accepted` and `source_clean_tpr`."""
    accepted, clean_tpr = cell.detail.get("accepted"), cell.detail.get("source_clean_tpr")
    if cell.setting != "adapted" or accepted is None or clean_tpr is None or cell.fpr is None or cell.tpr is None:
        return None
    good = cell.fpr <= GOOD_MAX_FPR and cell.tpr >= _least_good_tpr(cell)
    return f"{'accepted' if accepted else 'rejected'}-{'good' if good else 'bad'}"


def recalibrated_class(cell: Cell) -> str | None:
    """Where an adapted cell falls with [adapt] recalibrate: the candidate's class when it is accepted, else
    the recalibrated parent's when that is accepted (judged at its own threshold on the same images), else
    rejected, good when either would have been good. None: as `gate_class`, or no recalibration recorded."""
    name, recalibration = gate_class(cell), cell.detail.get("recalibration")
    if name is None or recalibration is None or cell.detail["accepted"]:
        return name if recalibration is not None else None
    good = recalibration["fpr"] <= GOOD_MAX_FPR and recalibration["tpr"] >= _least_good_tpr(cell)
    if recalibration["accepted"]:
        return f"accepted-{'good' if good else 'bad'}"
    return "rejected-good" if good or name == "rejected-good" else "rejected-bad"


def gate_confusion(cells: Iterable[Cell], classify: Callable[[Cell], str | None] = gate_class) -> dict[str, list[str]]:
    """Cell keys per class (`classify`: `gate_class` or `recalibrated_class`), in GATE_CLASSES order."""
    table: dict[str, list[str]] = {name: [] for name in GATE_CLASSES}
    for cell in cells:
        name = classify(cell)
        if name is not None:
            table[name].append(cell.key)
    return table


def gate_markdown(cells: Sequence[Cell]) -> str:
    """The gate's confusion table per (shift, k), the total, and every accepted-bad cell by name."""
    adapted = [c for c in cells if gate_class(c) is not None]
    if not adapted:
        return ""
    groups: dict[tuple[str, int], list[Cell]] = {}
    for cell in adapted:
        groups.setdefault((cell.shift, int(cell.k or 0)), []).append(cell)
    lines = [
        "\n## Does the gate decide right?\n",
        f"Adapted cells by the gate's decision (offline gate, then shadow on half of the shifted test normals "
        f"with a few defects, in stream order) and by the candidate's FPR and TPR at its own threshold on the "
        f"other normals and defects: good = "
        f"FPR <= {GOOD_MAX_FPR:.2f} and TPR within {GOOD_MAX_TPR_DROP:.2f} of the source model's on clean data.\n",
        "| shift | k | " + " | ".join(GATE_CLASSES) + " |",
        "|" + "---|" * (2 + len(GATE_CLASSES)),
    ]
    for (shift, k), group in sorted(groups.items()):
        counts = gate_confusion(group)
        lines.append(f"| {shift} | {k} | " + " | ".join(str(len(counts[n])) for n in GATE_CLASSES) + " |")
    total = gate_confusion(adapted)
    lines.append("| all | | " + " | ".join(f"**{len(total[n])}**" for n in GATE_CLASSES) + " |")
    bad = total["accepted-bad"]
    lines.append("\nAccepted but bad: " + (", ".join(bad) if bad else "none") + ".\n")
    recalibrated = gate_confusion(adapted, recalibrated_class)
    if any(recalibrated.values()):
        counts = ", ".join(f"{len(recalibrated[n])} {n}" for n in GATE_CLASSES)
        bad = recalibrated["accepted-bad"]
        lines.append(
            f"With [adapt] recalibrate (a refused candidate's parent recalibrated by the same shadow, activated if "
            f"it passes): {counts}. Accepted but bad: {', '.join(bad) if bad else 'none'}.\n"
        )
    refused = [c for c in adapted if not c.detail["accepted"] and "kept" in c.detail]
    if refused:
        kept = [c for c in refused if c.detail["kept"]]
        good = [c for c in kept if gate_class(c) == "rejected-good"]
        lines.append(
            f"Kept for an operator to force (refused in shadow, with the operating point it measured, as a worker "
            f"keeps them): {len(kept)} of the {len(refused)} refused; {len(good)} of those would be good.\n"
        )
    reachable = [c for c in adapted if c.detail.get("best_tpr_at_good_fpr") is not None]
    if reachable:
        good_model = [c for c in reachable if c.detail["best_tpr_at_good_fpr"] >= _least_good_tpr(c)]
        good_rule = [c for c in good_model if gate_class(c) in ("accepted-good", "rejected-good")]
        lines.append(
            f"With the best threshold for the judged images (an oracle that reads their labels), "
            f"{len(good_model)} of {len(reachable)} candidates would be good; at their own threshold, "
            f"{len(good_rule)} of those are.\n"
        )
    return "\n".join(lines) + "\n"


def _least_good_tpr(cell: Cell) -> float:
    return float(cell.detail["source_clean_tpr"]) - GOOD_MAX_TPR_DROP

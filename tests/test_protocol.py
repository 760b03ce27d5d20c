"""Bookkeeping of the adaptation protocol: shots drawn per fold, training length, summary rows."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.protocol import (
    Cell,
    cell_key,
    draw_shots,
    gate_confusion,
    gate_markdown,
    markdown_table,
    recalibrated_class,
    shots_epochs,
    summarise,
)
from csflow.evaluation import best_operating_point


def test_shots_are_reproducible_distinct_and_differ_between_folds() -> None:
    pool = list(range(100, 140))
    first = draw_shots(pool, 5, fold=0, seed=0)
    assert first == draw_shots(pool, 5, fold=0, seed=0)
    assert len(set(first)) == 5 and set(first) <= set(pool)
    assert first != draw_shots(pool, 5, fold=1, seed=0)
    with pytest.raises(ValueError, match="cannot draw 50 shots from 40"):
        draw_shots(pool, 50, fold=0, seed=0)


def test_shots_only_training_takes_as_many_steps_as_full_training() -> None:
    assert shots_epochs(10, n_train=400, k=1, batch_size=16) == 250  # 10 epochs x 25 batches
    assert shots_epochs(10, n_train=400, k=10, batch_size=16) == 250
    assert shots_epochs(10, n_train=16, k=1, batch_size=16) == 10


def test_summary_repeats_per_shift_settings_for_each_k_and_aggregates_folds() -> None:
    cells = [
        Cell("source", "dark", None, None, 0.6, 1.0, 1.0, 1.0),
        Cell("adapted", "dark", 1, 0, 0.8, 0.1, 0.7, 1.0),
        Cell("adapted", "dark", 1, 1, 0.9, 0.0, 0.8, 1.0),
        Cell("shots", "dark", 1, 0, 0.7, None, None, 1.0),
    ]
    rows = summarise(cells, ["dark"], [1, 5])
    by = {(r.setting, r.k): r for r in rows}
    assert by[("source", 1)].auroc_mean == by[("source", 5)].auroc_mean == 0.6
    adapted = by[("adapted", 1)]
    assert (
        adapted.n == 2
        and adapted.auroc_mean == pytest.approx(0.85)
        and adapted.auroc_std == pytest.approx(0.0707, 1e-3)
    )
    assert adapted.fpr_mean == pytest.approx(0.05) and by[("shots", 1)].fpr_mean is None
    assert ("adapted", 5) not in by
    table = markdown_table(rows, [1, 5])
    assert "0.850 ± 0.071 (0.05 / 0.75)" in table and "| dark | trained on the k shots only | 0.700 | – |" in table


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown setting"):
        cell_key("finetuned", "dark", 1, 0)


def _adapted(fold: int, fpr: float, tpr: float, accepted: bool, clean_tpr: float = 0.8, **extra: float) -> Cell:
    detail = {"accepted": accepted, "source_clean_tpr": clean_tpr, **extra}
    return Cell("adapted", "dark", 1, fold, 0.9, fpr, tpr, 1.0, detail)


def test_gate_confusion_scores_each_decision_against_the_operating_point() -> None:
    cells = [
        _adapted(0, 0.02, 0.80, True),  # accepted, good
        _adapted(1, 0.40, 0.90, True),  # accepted, rejects 40 % of normals: bad
        _adapted(2, 0.01, 0.70, True),  # accepted, misses defects (0.70 < 0.80 - 0.05): bad
        _adapted(3, 0.05, 0.75, False),  # refused although good (limits are inclusive)
        _adapted(4, 0.90, 1.00, False),  # refused, bad
        Cell("source", "dark", None, None, 0.8, 1.0, 1.0, 1.0, {}),  # not an adapted cell: not counted
    ]
    table = gate_confusion(cells)
    assert table == {
        "accepted-good": ["dark/adapted/k=1/fold=0"],
        "accepted-bad": ["dark/adapted/k=1/fold=1", "dark/adapted/k=1/fold=2"],
        "rejected-good": ["dark/adapted/k=1/fold=3"],
        "rejected-bad": ["dark/adapted/k=1/fold=4"],
    }
    text = gate_markdown(cells)
    assert "| dark | 1 | 1 | 2 | 1 | 1 |" in text
    assert "Accepted but bad: dark/adapted/k=1/fold=1, dark/adapted/k=1/fold=2." in text
    assert "oracle" not in text  # no cell carries the best threshold's TPR
    assert gate_markdown(cells[-1:]) == ""


def test_the_gate_table_says_how_many_candidates_the_best_threshold_would_make_good() -> None:
    """Cells that carry the best TPR at FPR <= 0.05 on their judged images: the table counts the candidates
    good at that oracle threshold, and how many of those are good at their own."""
    cells = [
        _adapted(0, 0.02, 0.80, True, best_tpr_at_good_fpr=0.78),  # good, and the model could be (0.78 >= 0.75)
        _adapted(1, 0.00, 0.60, False, best_tpr_at_good_fpr=0.78),  # the model could be good: the rule is short
        _adapted(2, 0.00, 0.60, False, best_tpr_at_good_fpr=0.70),  # no threshold makes this model good
    ]
    assert "2 of 3 candidates would be good; at their own threshold, 1 of those are." in gate_markdown(cells)


def test_the_gate_table_says_how_many_refused_candidates_a_worker_keeps_and_how_many_are_good() -> None:
    cells = [
        _adapted(0, 0.00, 0.80, False, kept=True),  # refused in shadow, good: forcing it would have helped
        _adapted(1, 0.00, 0.50, False, kept=True),  # refused in shadow, bad
        _adapted(2, 0.00, 0.80, False, kept=False),  # refused before the shadow: not kept
        _adapted(3, 0.00, 0.80, True, kept=False),  # accepted: not counted
        _adapted(4, 0.00, 0.80, False),  # recorded before the protocol said: not counted
    ]
    text = gate_markdown(cells)
    assert "keeps them): 2 of the 3 refused; 1 of those would be good." in text
    assert "Kept for an operator" not in gate_markdown(cells[3:])


def test_with_recalibration_a_refused_candidates_cell_is_judged_by_what_the_line_gets() -> None:
    """A refused candidate whose recalibrated parent is accepted: the cell is the parent's, judged at its
    own threshold; an accepted candidate stays its own; refused both ways, the cell is good if either
    would have been."""
    good, bad = {"fpr": 0.01, "tpr": 0.80}, {"fpr": 0.30, "tpr": 0.90}
    cells = [
        _adapted(0, 0.30, 0.90, False, recalibration={**good, "accepted": True}),  # the parent saves the line
        _adapted(1, 0.00, 0.80, False, recalibration={**bad, "accepted": True}),  # the parent is bad
        _adapted(2, 0.02, 0.80, True, recalibration={**bad, "accepted": True}),  # the candidate comes first
        _adapted(3, 0.30, 0.90, False, recalibration={**good, "accepted": False}),  # the parent would be good
        _adapted(4, 0.30, 0.90, False, recalibration={**bad, "accepted": False}),
        _adapted(5, 0.30, 0.90, False),  # recorded before recalibration: not counted
    ]
    assert [recalibrated_class(c) for c in cells] == [
        "accepted-good",
        "accepted-bad",
        "accepted-good",
        "rejected-good",
        "rejected-bad",
        None,
    ]
    text = gate_markdown(cells)
    assert "With [adapt] recalibrate" in text and "2 accepted-good, 1 accepted-bad, 1 rejected-good" in text
    assert "Accepted but bad: dark/adapted/k=1/fold=1." in text
    assert "With [adapt] recalibrate" not in gate_markdown(cells[5:])


def test_the_best_operating_point_flags_at_most_the_allowed_share_of_normals() -> None:
    normal = np.arange(20, dtype=float)  # 0 .. 19
    defects = np.array([18.5, 17.5, 10.0, 30.0])
    scores = np.r_[normal, defects]
    anomalous = np.r_[np.zeros(20, bool), np.ones(4, bool)]
    op = best_operating_point(scores, anomalous, 0.05)  # one of 20 normals may be flagged
    assert (op.threshold, op.fpr, op.tpr) == (18.0, 0.05, 0.5)
    assert best_operating_point(scores, anomalous, 0.0).tpr == 0.25  # above every normal: only 30.0
    assert best_operating_point(scores, anomalous, 0.5).tpr == 1.0  # threshold 9: every defect

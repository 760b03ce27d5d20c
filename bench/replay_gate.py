"""The protocol's gate decisions replayed under other shadow settings, without adapting again.

`inspectd experiment --settings adapted` records, per adapted cell, what its shadow saw (`shadow_record`:
the parent's and the candidate's live scores, the candidate's NLLs and probe scores, the gate's synthetic
defect scores, and which test images fed the shadow and which are judged) and the candidate's scores of
every test image. This replays the shadow's decision (`adapters.shadow.ShadowEvaluation`) with each
`--variant` of config.toml's shadow settings (e.g. `max_sensitivity_loss=0.05`) and judges each
candidate at the threshold that decision sets, as the protocol does: FPR and TPR on the judged images,
good = FPR <= 0.05 and TPR within 0.05 of the source's clean TPR. The offline gate's verdict is kept as
recorded, unless a variant waives some of its checks (`waive=recovery`): a candidate the offline gate
refused on waived checks only then goes on to its shadow, which the protocol ran for every candidate.
Prints one confusion table per setting, then every cell whose class changed.

`--parent` adds a row for what no adaptation at all would do: the parent itself put through the same shadow
as its own candidate (its live scores and its scores of the same probes; in results recorded before the
parent's NLLs and its scores of the gate's synthetic defects were, the defects are not checked), recalibrated
at the threshold that decision sets, and judged on the same images (the source's scores of the shifted test
images); and a row for `[adapt] recalibrate`: the candidate where the replay accepts it, else that parent
(both rows for each `--variant` too).
Usage:

    python bench/replay_gate.py --results runs/gate-exp --source runs/probe_s0 --data data/elpv \
        [--variant FIELD=VALUE,...]... [--parent] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from adapters.protocol import GATE_CLASSES, Cell, gate_class, recalibrated_class
from adapters.shadow import ShadowConfig, ShadowEvaluation
from adapters.shifts import get_shift
from csflow.artifacts import load_model, read_manifest
from csflow.calibration import Calibration
from csflow.data import load_batch, load_dataset
from csflow.evaluation import operating_point
from csflow.scoring import score_images
from daemon.config import Settings, load_settings
from drift.config import DriftConfig


@dataclass(frozen=True)
class Variant:
    shadow: ShadowConfig
    waived: frozenset[str] = frozenset()  # offline gate checks (adapters.gate) replayed as passed


def offline_accepted(detail: dict, waived: frozenset[str]) -> bool:
    """The offline gate's recorded verdict, with the `waived` checks counted as passed."""
    failed = {
        r.split(":")[0].removeprefix("FAIL ")
        for r in detail["reasons"]
        if r.startswith("FAIL ") and not r.startswith("FAIL shadow ")
    }
    return bool(detail["offline_accepted"]) or (bool(failed) and failed <= waived)


def replay(
    cell: Cell,
    calibration: Calibration,
    anomalous: np.ndarray,
    setting: Variant,
    drift: DriftConfig,
    parent_scores: np.ndarray | None = None,
) -> dict:
    """The cell's shadow decision under `setting` and the candidate's judged FPR and TPR at its threshold;
    with `parent_scores` (the source's scores of the cell's shifted test images), the same for the parent
    as its own candidate."""
    record, detail, config = cell.detail["shadow_record"], cell.detail, setting.shadow
    frames = len(record["candidate"])
    per = len(record["probe"]) // max(frames, 1)  # as the experiment ran, whatever config.toml says now
    config = replace(config, frames=frames, probes_per_frame=per)
    if parent_scores is not None:
        config = config.for_recalibration()
    parent_probe = record.get("parent_probe", [])  # recorded since the shadow scores them (stop 27)
    if parent_scores is None:
        evaluation = ShadowEvaluation(calibration, record["defect_scores"], config, drift)
        rows = zip(record["parent"], record["candidate"], record["candidate_nll"], strict=True)
        probes, scores = record["probe"], np.asarray(detail["scores"])
    elif "parent_nll" in record:  # recorded since the parent's recalibration exists: checked as the worker does
        evaluation = ShadowEvaluation(calibration, record["parent_defect_scores"], config, drift)
        rows = zip(record["parent"], record["parent"], record["parent_nll"], strict=True)
        probes, scores = parent_probe, parent_scores
    else:  # the NLLs only feed the drift reference, which is not judged here; the defects were not scored
        evaluation = ShadowEvaluation(calibration, [], replace(config, min_defect_detection=0.0), drift)
        rows = zip(record["parent"], record["parent"], record["parent"], strict=True)
        probes, scores = parent_probe, parent_scores
    for i, (p, c, n) in enumerate(rows):
        evaluation.update(p, c, n, probes[i * per : (i + 1) * per], parent_probe[i * per : (i + 1) * per])
    decision = evaluation.decide()
    threshold = decision.figures.get("threshold", detail["threshold"])
    judged = np.asarray(record["judged"])
    point = operating_point(scores[judged], anomalous[judged], threshold)
    offline = parent_scores is not None or offline_accepted(detail, setting.waived)
    accepted = offline and decision.accepted
    replayed = replace(cell, fpr=point.fpr, tpr=point.tpr, detail={**detail, "accepted": accepted})
    failed = [r.split(":")[0].removeprefix("FAIL shadow ") for r in decision.reasons if r.startswith("FAIL")]
    return {
        "class": gate_class(replayed),
        "fpr": point.fpr,
        "tpr": point.tpr,
        "threshold": threshold,
        "sensitivity": decision.figures.get("sensitivity"),
        "reference_sensitivity": decision.figures.get("reference_sensitivity"),
        "parent_sensitivity": decision.figures.get("parent_sensitivity"),
        "failed": failed if offline else ["offline", *failed],
    }


def recalibrate(cell: Cell, candidate: dict, parent: dict) -> dict:
    """What [adapt] recalibrate gives the line in this cell: the candidate's replay when it is accepted, else
    the parent's when that is accepted (`adapters.protocol.recalibrated_class`)."""
    accepted = candidate["class"].startswith("accepted")
    recalibration = {"accepted": parent["class"].startswith("accepted"), "fpr": parent["fpr"], "tpr": parent["tpr"]}
    detail = {**cell.detail, "accepted": accepted, "recalibration": recalibration}
    replayed = replace(cell, fpr=candidate["fpr"], tpr=candidate["tpr"], detail=detail)
    chosen = candidate if accepted or not recalibration["accepted"] else parent
    return {**chosen, "class": recalibrated_class(replayed)}


# The shadow settings that act on what was recorded (the frames, their probes and the probes' seed are fixed).
REPLAYABLE = (
    "lower",
    "min_defect_detection",
    "max_sensitivity_loss",
    "probe_reference",
    "sensitivity_z",
    "recalibration_sensitivity_z",
)
# The offline gate's checks that a variant can waive (`waive=NAME`, repeatable), as adapters.gate names them.
WAIVABLE = ("recovery", "false_rejects", "improvement", "defects", "floor")


def variant(text: str, base: ShadowConfig) -> Variant:
    """`field=value,...` over `base`."""
    changes, waived = {}, set()
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name == "waive" and value in WAIVABLE:
            waived.add(value)
        elif name == "waive":
            raise SystemExit(f"--variant: waive={value!r}: the offline checks are {', '.join(WAIVABLE)}")
        elif name == "probe_reference":
            changes[name] = value
        elif name in REPLAYABLE:
            changes[name] = float(value)
        else:
            raise SystemExit(f"--variant: {name!r} is not one of {', '.join(REPLAYABLE)} or waive")
    return Variant(replace(base, **changes), frozenset(waived))


def source_scores(source: Path, data: Path, shifts: set[str], settings: Settings) -> dict[str, np.ndarray]:
    """The source model's scores of every test image under each shift, in the dataset's order."""
    version = load_model(source, "cpu")
    paths = [s.path for s in load_dataset(data).test]
    limits, size = settings.limits.to_limits(), version.model.image_size
    return {
        shift: score_images(version.model, load_batch(paths, size, limits, get_shift(shift, limits))).image
        for shift in sorted(shifts)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="an experiment's output folder")
    parser.add_argument("--source", type=Path, required=True, help="the source model the experiment adapted")
    parser.add_argument("--data", type=Path, required=True, help="the experiment's dataset")
    parser.add_argument(
        "--variant", action="append", default=[], help="FIELD=VALUE,... of REPLAYABLE, or waive=CHECK; repeatable"
    )
    parser.add_argument("--parent", action="store_true", help="add the parent as its own candidate (no adaptation)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cells = [Cell.from_dict(c) for c in json.loads((args.results / "results.json").read_text())["cells"].values()]
    cells = [c for c in cells if c.setting == "adapted" and "shadow_record" in c.detail]
    calibration = read_manifest(args.source).threshold_calibration
    anomalous = np.array([s.anomalous for s in load_dataset(args.data).test])
    settings = load_settings()
    base, drift = settings.adapt.shadow_config(), settings.drift.to_config()
    variants = {"settings": Variant(base)} | {text: variant(text, base) for text in args.variant}
    rows = {
        name: {c.key: replay(c, calibration, anomalous, setting, drift) for c in cells}
        for name, setting in variants.items()
    }
    if args.parent:
        by_shift = source_scores(args.source, args.data, {c.shift for c in cells}, settings)
        for c in cells:  # the recorded live scores are the source's scores of the stream's frames
            stream = np.asarray(c.detail["shadow_record"]["stream"])[: len(c.detail["shadow_record"]["parent"])]
            np.testing.assert_allclose(by_shift[c.shift][stream], c.detail["shadow_record"]["parent"], atol=1e-3)
        for name, setting in variants.items():  # each setting judges the parent's recalibration too
            suffix = "" if name == "settings" else f", {name}"
            parent = {c.key: replay(c, calibration, anomalous, setting, drift, by_shift[c.shift]) for c in cells}
            rows[f"parent, not adapted{suffix}"] = parent
            rows[f"recalibrate (candidate first){suffix}"] = {
                c.key: recalibrate(c, rows[name][c.key], parent[c.key]) for c in cells
            }
    same = sum(rows["settings"][c.key]["class"] == gate_class(c) for c in cells)
    print(f"{len(cells)} adapted cells of {args.results}; source threshold {calibration.threshold:.4g}")
    print(f"replayed under config.toml's settings: {same} of {len(cells)} cells in their recorded class")
    width = max(len(name) for name in rows)
    print(f"{'shadow':<{width}}  " + "  ".join(f"{n:>14}" for n in GATE_CLASSES) + "  good (own threshold)")
    for name, by_cell in rows.items():
        counts = [sum(r["class"] == n for r in by_cell.values()) for n in GATE_CLASSES]
        good = sum(r["class"].endswith("-good") for r in by_cell.values())
        print(f"{name:<{width}}  " + "  ".join(f"{n:>14}" for n in counts) + f"  {good:>4} of {len(by_cell)}")
    for name, by_cell in list(rows.items())[1:]:
        print(f"\ncells whose class changed from config.toml's settings to {name}:")
        for key, row in by_cell.items():
            was = rows["settings"][key]
            if row["class"] != was["class"]:
                print(
                    f"  {key}: {was['class']} -> {row['class']}  FPR {was['fpr']:.3f} -> {row['fpr']:.3f}, "
                    f"TPR {was['tpr']:.3f} -> {row['tpr']:.3f}; failed now: {', '.join(row['failed']) or '-'}"
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

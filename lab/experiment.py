"""Runs the paper's protocol (`adapters.protocol`) on a dataset folder and keeps every result on disk.

Each finished cell is written to `results.json` at once (atomically), so an interrupted run loses at
most the cell in progress; a rerun with the same settings skips what is done, and a rerun with other
settings into the same folder is refused rather than mixed in. Features of the frozen extractor are
computed once per image set and shared by every flow that uses them (source, target, shots, source +
shots); only the adapted models need full forward passes.

The adapted setting runs what a worker runs: the offline gate (`adapters.gate.adapt_and_gate`, which holds
shots out), then the shadow evaluation (`adapters.shadow`) on a stream like a line's (half of the shifted
test normals with a few defects, in a seeded order), which also sets the candidate's own threshold; its
FPR and TPR are measured at that threshold on the other normals and defects, so the gate's decision can
be scored against what it decided on (`adapters.protocol.gate_markdown`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adapters.adapt import AdaptConfig
from adapters.gate import GateConfig, adapt_and_gate
from adapters.protocol import (
    GOOD_MAX_FPR,
    PER_SHIFT,
    SETTINGS,
    Cell,
    cell_key,
    draw_shots,
    gate_markdown,
    markdown_table,
    shots_epochs,
    summarise,
)
from adapters.shadow import ShadowConfig, operating_point, shadow_stream
from adapters.shifts import get_shift
from csflow.artifacts import MANIFEST, ModelVersion, load_model, read_manifest, save_model
from csflow.calibration import calibrate
from csflow.data import load_batch, load_dataset
from csflow.evaluation import best_operating_point, evaluate_scores
from csflow.fit import FitSpec, Progress, fit, image_batches, no_progress
from csflow.model import CSFlow
from csflow.scoring import score_images
from csflow.training import Features, extract_features, features_scores, split_indices, split_normals, train_flow
from drift.config import DriftConfig
from lab.plots import plot_protocol

RESULTS = "results.json"
PROTOCOL_REVISION = 5  # 2: the adapted setting is gated (offline + shadow) and judged at its own threshold;
# 3: its shadow stream is mostly normal, as on a line (ELPV's test split is mostly defective)
# 4: the shadow also runs the sensitivity probe (csflow.defects) against the source's reference;
# 5: the flows trained from scratch pick their kept epoch and set their threshold on disjoint held-out images
STREAM_DEFECT_SHARE = 0.05
OperatingPoint = tuple[float | None, float | None]  # (FPR, TPR) at the setting's threshold, if it has one
Outcome = tuple[float, OperatingPoint, dict[str, Any]]  # image AUROC, operating point, details


class ExperimentError(ValueError):
    """The output folder holds results of a different experiment."""


@dataclass(frozen=True)
class ExperimentSpec:
    data: Path
    out: Path
    shifts: tuple[str, ...]
    shots: tuple[int, ...]
    folds: int
    fit: FitSpec  # the source model and every flow trained from scratch
    adapt: AdaptConfig
    gate: GateConfig = field(default_factory=GateConfig)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    seed: int = 0
    source: Path | None = None  # an existing source model; else one is trained into out/source
    settings: tuple[str, ...] = tuple(SETTINGS)  # which settings to compute (all by default)

    def fingerprint(self) -> dict[str, Any]:
        """What the cells depend on; `out` and how many folds/shots are asked for do not change a cell."""
        described = {
            "protocol": PROTOCOL_REVISION,
            "data": str(self.data.resolve()),
            "fit": asdict(self.fit),
            "adapt": asdict(self.adapt),
            "gate": asdict(self.gate),
            "shadow": asdict(self.shadow),
            "drift": asdict(self.drift),
            "seed": self.seed,
            "source": str(self.source.resolve()) if self.source else None,
        }
        digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {"id": digest, **described}


class ResultsFile:
    """results.json: the fingerprint and the finished cells, rewritten atomically after each cell."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.cells: dict[str, Cell] = {}
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("fingerprint", {}).get("id") != fingerprint["id"]:
                raise ExperimentError(
                    f"{path} holds results of an experiment with other settings; use another --out or remove it"
                )
            self.cells = {key: Cell.from_dict(c) for key, c in stored["cells"].items()}

    def add(self, cell: Cell) -> None:
        self.cells[cell.key] = cell
        tmp = self.path.with_suffix(".tmp")
        document = {"fingerprint": self.fingerprint, "cells": {k: c.to_dict() for k, c in self.cells.items()}}
        tmp.write_text(json.dumps(document, indent=2))
        os.replace(tmp, self.path)


def planned_keys(spec: ExperimentSpec) -> list[str]:
    keys = [cell_key(s, shift, None, None) for shift in spec.shifts for s in PER_SHIFT if s in spec.settings]
    per_fold = [s for s in SETTINGS if s not in PER_SHIFT and s in spec.settings]
    keys += [  # k-major: the one-shot cells, the paper's headline, are complete first
        cell_key(s, shift, k, fold)
        for k in spec.shots
        for fold in range(spec.folds)
        for shift in spec.shifts
        for s in per_fold
    ]
    return keys


def run_experiment(
    spec: ExperimentSpec,
    progress: Progress = no_progress,
    on_cell: Callable[[Cell], None] | None = None,
    device: torch.device | None = None,
    compute: bool = True,
) -> list[Cell]:
    """Compute every missing cell (none with `compute=False`), then write the table and the chart from
    the cells done, also when interrupted; returns the cells done."""
    device = device or torch.device("cpu")
    spec.out.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(spec.out / RESULTS, spec.fingerprint())
    todo = [key for key in planned_keys(spec) if key not in results.cells] if compute else []
    try:
        if todo:
            runner = _Runner(spec, device, progress)
            for key in progress(todo, "experiment", len(todo)):
                cell = runner.compute(key)
                results.add(cell)
                if on_cell is not None:
                    on_cell(cell)
    finally:
        cells = [results.cells[key] for key in planned_keys(spec) if key in results.cells]
        missing = len(planned_keys(spec)) - len(cells)
        rows = summarise(cells, spec.shifts, spec.shots)
        header = _report_header(spec, results.fingerprint, missing)
        (spec.out / "results.md").write_text(header + markdown_table(rows, spec.shots) + gate_markdown(cells))
        plot_protocol(spec.out / "results.png", rows, spec.shifts, spec.shots, str(spec.data))
    return cells


def _report_header(spec: ExperimentSpec, fingerprint: dict[str, Any], missing: int) -> str:
    incomplete = f"**Incomplete: {missing} planned cells not computed yet** (rerun to resume).\n\n" if missing else ""
    hidden, epochs, source = spec.fit.flow.hidden_channels, spec.fit.train.epochs, "trained here"
    if spec.source is not None and (spec.source / MANIFEST).is_file():  # the source model's own, not the settings'
        manifest = read_manifest(spec.source)
        hidden, epochs = manifest.flow["hidden_channels"], manifest.summary.get("epochs", "?")
        source = f"{spec.source}, version {manifest.version}"
    return incomplete + (
        f"# Few-shot adaptation protocol on {spec.data}\n\n"
        f"Shifts {', '.join(spec.shifts)}; k = {', '.join(map(str, spec.shots))}; {spec.folds} folds "
        f"(mean ± std over folds; target and source do not depend on the fold). Backbone {spec.fit.backbone} "
        f"at {spec.fit.image_size} px; source model ({source}): flow hidden {hidden}, {epochs} epochs; flows "
        f"trained here: flow hidden {spec.fit.flow.hidden_channels}, {spec.fit.train.epochs} epochs. "
        f"Operating point (FPR on normal / TPR on defective test images) at each model's own calibrated "
        f"threshold; the shots-only flow has no held-out normals, hence no threshold. "
        f"Experiment id {fingerprint['id']}.\n\n"
    )


class _Runner:
    """Lazily computed, cached inputs (source model, images, features) and one method per setting."""

    def __init__(self, spec: ExperimentSpec, device: torch.device, progress: Progress) -> None:
        self.spec, self.device, self.progress = spec, device, progress
        self.dataset = load_dataset(spec.data)
        if not self.dataset.test:
            raise ExperimentError(f"{spec.data} has no test/ folder")
        self.train_paths = [s.path for s in self.dataset.train]
        # shots are drawn from train_idx; the flows trained from scratch split as `fit` does: one part trains,
        # one picks the kept epoch, another sets the threshold (disjoint, so the threshold is not biased low)
        self.train_idx, _ = split_indices(len(self.train_paths), spec.fit.val_fraction, spec.fit.train.seed)
        self.fit_idx, self.select_idx, self.cal_idx = split_normals(
            len(self.train_paths), spec.fit.val_fraction, spec.fit.calibration_fraction, spec.fit.train.seed
        )
        self.anomalous = np.array([s.anomalous for s in self.dataset.test])
        self.defect_types = [s.defect_type for s in self.dataset.test]
        self.source_version = cache(self._source_version)
        self.test_images = cache(self._test_images)
        self.train_features = cache(self._train_features)
        self.test_features = cache(self._test_features)
        self.source_scores = cache(self._source_scores)

    def compute(self, key: str) -> Cell:
        shift, setting, *rest = key.split("/")
        k = int(rest[0].removeprefix("k=")) if rest else None
        fold = int(rest[1].removeprefix("fold=")) if rest else None
        started = time.perf_counter()
        auroc, op, detail = getattr(self, "_" + setting.replace("+", "_plus_"))(shift, k, fold)
        return Cell(setting, shift, k, fold, auroc, *op, round(time.perf_counter() - started, 1), detail)

    # --- inputs -----------------------------------------------------------------------------------
    def _source_version(self) -> ModelVersion:
        spec = self.spec
        directory = spec.source or spec.out / "source"
        if not (directory / "manifest.json").exists():
            result = fit(self.train_paths, spec.fit, self.device, self.progress)
            summary = result.summary(spec.fit, len(self.train_paths))
            save_model(directory, result.model, spec.fit.weights, result.calibration, summary)
        version = load_model(directory, str(self.device))
        model = version.model
        if (model.image_size, model.extractor_name) != (spec.fit.image_size, spec.fit.backbone):
            raise ExperimentError(
                f"source model {directory} is {model.extractor_name} at {model.image_size} px; the experiment asks "
                f"for {spec.fit.backbone} at {spec.fit.image_size} px"
            )
        return version

    def _test_images(self, shift: str | None) -> Tensor:
        paths = [s.path for s in self.dataset.test]
        return load_batch(paths, self.spec.fit.image_size, self.spec.fit.limits, self._transform(shift))

    def _train_features(self, shift: str | None) -> Features:
        """Frozen-extractor features of every training image (None: unshifted), in `train_paths` order."""
        batches = image_batches(
            self.train_paths,
            self.spec.fit.image_size,
            self.spec.fit.limits,
            self.spec.fit.train.batch_size,
            self._transform(shift),
        )
        total = -(-len(self.train_paths) // self.spec.fit.train.batch_size)
        return extract_features(self._model(), self.progress(batches, f"features train {shift}", total), self.device)

    def _test_features(self, shift: str) -> Features:
        images = self.test_images(shift)
        batches = images.split(self.spec.fit.train.batch_size)
        return extract_features(
            self._model(), self.progress(batches, f"features test {shift}", len(batches)), self.device
        )

    def _transform(self, shift: str | None) -> Callable[[np.ndarray], np.ndarray] | None:
        return get_shift(shift, self.spec.fit.limits) if shift else None

    def _model(self) -> CSFlow:
        return self.source_version().model

    # --- settings ---------------------------------------------------------------------------------
    def _target(self, shift: str, k: None, fold: None) -> Outcome:
        feats = self.train_features(shift)
        model = self._train(_take(feats, self.fit_idx), _take(feats, self.select_idx), self.spec.fit.train.epochs)
        return self._evaluate_flow(model, shift, self._calibrated(model, _take(feats, self.cal_idx)))

    def _source(self, shift: str, k: None, fold: None) -> Outcome:
        version = self.source_version()
        return self._evaluate_flow(version.model, shift, version.threshold)

    def _shots(self, shift: str, k: int, fold: int) -> Outcome:
        shots = self._shot_indices(k, fold)
        epochs = shots_epochs(self.spec.fit.train.epochs, len(self.train_idx), k, self.spec.fit.train.batch_size)
        model = self._train(_take(self.train_features(shift), shots), None, epochs)
        auroc, _, detail = self._evaluate_flow(model, shift, None)
        return auroc, (None, None), {**detail, "shots": shots, "epochs": epochs}

    def _source_plus_shots(self, shift: str, k: int, fold: int) -> Outcome:
        shots = self._shot_indices(k, fold)
        source, target = self.train_features(None), self.train_features(shift)
        train = [torch.cat([s[self.fit_idx], t[shots]]) for s, t in zip(source, target, strict=True)]
        model = self._train(train, _take(source, self.select_idx), self.spec.fit.train.epochs)
        auroc, op, detail = self._evaluate_flow(model, shift, self._calibrated(model, _take(source, self.cal_idx)))
        return auroc, op, {**detail, "shots": shots}

    def _adapted(self, shift: str, k: int, fold: int) -> Outcome:
        spec, version = self.spec, self.source_version()
        shots = self._shot_indices(k, fold)
        images = load_batch(
            [self.train_paths[i] for i in shots], spec.fit.image_size, spec.fit.limits, self._transform(shift)
        )
        gated = adapt_and_gate(version, images, spec.adapt, spec.gate)
        test = self.test_images(shift)
        candidate = score_images(gated.result.model, test, spec.fit.train.batch_size)
        stream, judged = self._stream_split(k, fold)
        calibration = version.manifest.threshold_calibration
        live = stream[: spec.shadow.frames]
        shadow = shadow_stream(
            version.model,
            gated.result.model,
            test[live],
            calibration,
            list(gated.decision.figures.get("defect_scores", [])),
            spec.shadow,
            spec.drift,
            spec.fit.train.batch_size,
            list(gated.decision.figures.get("parent_defect_scores", [])),
        )
        decision = shadow.decide()
        recalibration = shadow.recalibration().decide()
        recalibrated_threshold = recalibration.figures.get("threshold", version.threshold)
        recalibrated = evaluate_scores(
            self.source_scores(shift)[judged],
            self.anomalous[judged],
            [self.defect_types[i] for i in judged],
            recalibrated_threshold,
        ).operating_point
        try:  # the candidate's own threshold, also for a refused one (to judge the refusal)
            threshold = operating_point(candidate.image[stream], calibration, spec.shadow.lower).threshold
        except ValueError:
            threshold = version.threshold
        auroc, _ = self._metrics(candidate.image, threshold)
        evaluation = evaluate_scores(
            candidate.image[judged], self.anomalous[judged], [self.defect_types[i] for i in judged], threshold
        )
        summary = gated.result.summary()
        detail = {
            **{k_: summary.get(k_) for k_ in ("steps", "stop_reason", "seconds")},
            "shots": shots,
            "threshold": threshold,
            "inherited_threshold": version.threshold,
            "accepted": gated.accepted and decision.accepted,
            "offline_accepted": gated.accepted,
            "shadow_accepted": decision.accepted,
            # what a worker keeps for an operator to force: refused in shadow, with an operating point
            "kept": gated.accepted and not decision.accepted and decision.calibration is not None,
            "reasons": [r for r in [*gated.decision.reasons, *decision.reasons] if not r.startswith("ok")],
            "shadow": {
                key: decision.figures.get(key)
                for key in (
                    "candidate_flag_rate",
                    "parent_flag_rate",
                    "scale",
                    "sensitivity",
                    "reference_sensitivity",
                    "parent_sensitivity",
                    "probe_detection",
                )
            },
            # What the line flagged before the drift: the shadow's frames, unshifted, under the source.
            "line_flag_rate_before": float((self.source_scores(None)[live] > version.threshold).mean()),
            "source_clean_tpr": self._metrics(self.source_scores(None), version.threshold)[1][1],
            "fpr_inherited_threshold": float(
                (candidate.image[judged][~self.anomalous[judged]] > version.threshold).mean()
            ),
            # the best any threshold could do on the judged images: is the threshold or the model short?
            "best_tpr_at_good_fpr": best_operating_point(
                candidate.image[judged], self.anomalous[judged], GOOD_MAX_FPR
            ).tpr,
            # The parent itself through the same shadow (a new operating point, no new extractor), judged on
            # the same images: what [adapt] recalibrate activates when the candidate is refused.
            "recalibration": {
                "accepted": recalibration.accepted,
                "threshold": recalibrated_threshold,
                "fpr": recalibrated.fpr,
                "tpr": recalibrated.tpr,
                "reasons": [r for r in recalibration.reasons if not r.startswith("ok")],
            },
            "scores": candidate.image.tolist(),
            # What the shadow saw, so that its decision can be replayed under other shadow settings
            # (adapters.shadow.ShadowEvaluation); `stream` and `judged` index `scores`.
            "shadow_record": {
                "parent": shadow.parent,
                "candidate": shadow.candidate,
                "candidate_nll": shadow.candidate_nll,
                "probe": shadow.probe,
                "parent_probe": shadow.parent_probe,
                "parent_nll": shadow.parent_nll,
                "defect_scores": shadow.defect_scores,
                "parent_defect_scores": shadow.parent_defect_scores,
                "stream": stream.tolist(),
                "judged": judged.tolist(),
            },
        }
        op = evaluation.operating_point
        return auroc, (op.fpr, op.tpr), detail

    def _stream_split(self, k: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
        """Test indices as a line would show them: half of the normal cells with a few defects
        (STREAM_DEFECT_SHARE) in a seeded order feed the shadow; the other normals and defects are judged."""
        rng = np.random.default_rng([self.spec.seed, fold, k, len(self.anomalous)])
        normal = rng.permutation(np.flatnonzero(~self.anomalous))
        defective = rng.permutation(np.flatnonzero(self.anomalous))
        half = len(normal) // 2
        n_defects = max(1, round(STREAM_DEFECT_SHARE * half))
        return rng.permutation(np.r_[normal[:half], defective[:n_defects]]), np.r_[normal[half:], defective[n_defects:]]

    def _source_scores(self, shift: str | None) -> np.ndarray:
        """The source model's scores of the test images under `shift` (None: clean)."""
        return score_images(self.source_version().model, self.test_images(shift), self.spec.fit.train.batch_size).image

    # --- helpers ----------------------------------------------------------------------------------
    def _shot_indices(self, k: int, fold: int) -> list[int]:
        return draw_shots(self.train_idx, k, fold, self.spec.seed)

    def _train(self, train: Features, val: Features | None, epochs: int) -> CSFlow:
        """A fresh flow on the (shared, frozen) pretrained extractor of the source model."""
        config = replace(self.spec.fit.train, epochs=epochs)
        torch.manual_seed(config.seed)
        source = self._model()
        model = CSFlow(source.extractor, source.image_size, source.flow_config, source.extractor_name).to(self.device)
        train_flow(model, train, val, config, self.device)
        return model

    def _calibrated(self, model: CSFlow, held_out: Features) -> float:
        scores = features_scores(model, held_out, self.spec.fit.train.batch_size, self.device)
        return calibrate(scores.numpy(), self.spec.fit.target_fpr).threshold

    def _evaluate_flow(self, model: CSFlow, shift: str, threshold: float | None) -> Outcome:
        scores = features_scores(model, self.test_features(shift), self.spec.fit.train.batch_size, self.device).numpy()
        auroc, op = self._metrics(scores, threshold)
        return auroc, op, {"threshold": threshold, "scores": scores.tolist()}

    def _metrics(self, scores: np.ndarray, threshold: float | None) -> tuple[float, OperatingPoint]:
        evaluation = evaluate_scores(scores, self.anomalous, self.defect_types, threshold or 0.0)
        op = evaluation.operating_point
        return evaluation.image_auroc, (op.fpr, op.tpr) if threshold is not None else (None, None)


def _take(features: Features, idx: Sequence[int]) -> Features:
    return [f[list(idx)] for f in features]

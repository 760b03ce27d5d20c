"""Adaptation's stopping rule on real data: stop on the NLL (the objective) or on the image score?

Adapts a trained model to k shifted normal training cells twice, with `[adapt] stop_on` = nll and =
score (everything else the defaults, no gate), and prints for each shift the steps taken and, at the
inherited threshold, FPR / TPR / image AUROC / median normal score on the shifted test set, next to the
source model's. Usage:

    python bench/bench_stop_rule.py --model runs/flowfix_s256_seed0 --data data/elpv [--shifts dark,style]
                                    [--shots 5] [--seed 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from adapters.adapt import AdaptConfig, adapt
from adapters.shifts import get_shift
from csflow.artifacts import load_model
from csflow.data import ImageLimits, Sample, load_dataset, read_image, to_tensor
from csflow.evaluation import evaluate_scores
from csflow.model import CSFlow
from csflow.scoring import score_images

LIMITS = ImageLimits(1 << 26, 50_000_000, ("PNG", "JPEG"))
BATCH = 16


def images(paths: list[Path], shift_name: str, size: int) -> Tensor:
    shift = get_shift(shift_name)
    return torch.stack([to_tensor(shift(read_image(p, LIMITS)), size) for p in paths])


def figures(model: CSFlow, test: list[Sample], x: Tensor, threshold: float) -> dict[str, float]:
    scores = score_images(model, x, BATCH).image
    anomalous = np.array([s.anomalous for s in test])
    evaluation = evaluate_scores(scores, anomalous, [s.defect_type for s in test], threshold)
    point = evaluation.operating_point
    return {
        "auroc": round(evaluation.image_auroc, 3),
        "fpr": round(point.fpr, 3),
        "tpr": round(point.tpr, 3),
        "median_normal_score": round(float(np.median(scores[~anomalous])), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--shifts", default="dark,style")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    version = load_model(args.model)
    size = version.model.image_size
    dataset = load_dataset(args.data)
    rng = np.random.default_rng(args.seed)
    shot_paths = [dataset.train[i].path for i in rng.choice(len(dataset.train), args.shots, replace=False)]
    calibration = version.manifest.threshold_calibration
    report: dict[str, object] = {
        "threshold": version.threshold,
        "calibration_median_score": calibration.stats["q50"],
        "calibration_median_nll": calibration.nll_quantile(0.5),
    }
    for name in args.shifts.split(","):
        x = images([s.path for s in dataset.test], name, size)
        row = {"source": figures(version.model, dataset.test, x, version.threshold)}
        shots = images(shot_paths, name, size)
        for stop_on in ("nll", "score"):
            result = adapt(version, shots, AdaptConfig(stop_on=stop_on, seed=args.seed))
            row[stop_on] = {
                **figures(result.model, dataset.test, x, version.threshold),
                "steps": result.steps,
                "stop_reason": result.stop_reason,
                "shots_nll": [round(result.initial.nll, 3), round(result.final.nll, 3)],
                "shots_score": [round(result.initial.score, 3), round(result.final.score, 3)],
            }
        report[name] = row
        print(name, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

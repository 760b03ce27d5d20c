"""Image and pixel AUROC plus the operating point at the model's own threshold.

AUROC ranks images within one test set and can hide a global score shift; the false-positive rate on
normal images at the calibrated threshold is what a running line feels, so both are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve

from csflow.data import ImageLimits, Sample, Transform, read_mask
from csflow.fit import Progress, image_batches, no_progress
from csflow.model import CSFlow
from csflow.scoring import score_images
from csflow.serving_options import FP32, ServingOptions

PIXEL_EVAL_SIZE = 256  # maps and masks are compared at most at this side length, to bound memory


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    fpr: float  # share of normal images flagged
    tpr: float  # share of defective images flagged
    balanced_accuracy: float


@dataclass(frozen=True)
class Evaluation:
    image_auroc: float
    pixel_auroc: float | None
    per_type_auroc: dict[str, float]
    operating_point: OperatingPoint
    n_normal: int
    n_anomalous: int

    def to_dict(self) -> dict:
        return asdict(self)


def operating_point(scores: np.ndarray, anomalous: np.ndarray, threshold: float) -> OperatingPoint:
    flagged = scores > threshold
    fpr = float(flagged[~anomalous].mean()) if (~anomalous).any() else float("nan")
    tpr = float(flagged[anomalous].mean()) if anomalous.any() else float("nan")
    return OperatingPoint(threshold, fpr, tpr, 0.5 * ((1.0 - fpr) + tpr))


def best_operating_point(scores: np.ndarray, anomalous: np.ndarray, max_fpr: float) -> OperatingPoint:
    """The highest TPR any threshold reaches while flagging at most `max_fpr` of the normal images. It reads
    the test labels: a bound for judging a threshold rule (is the rule or the model short?), never a rule."""
    normal = np.sort(np.asarray(scores, dtype=np.float64)[~anomalous])
    allowed = int(np.floor(max_fpr * len(normal) + 1e-9))  # normals that may lie above the threshold
    return operating_point(scores, anomalous, float(normal[len(normal) - allowed - 1]))


def roc(scores: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(anomalous, scores)
    return fpr, tpr


def evaluate_scores(
    scores: Sequence[float],
    anomalous: Sequence[bool],
    defect_types: Sequence[str],
    threshold: float,
    maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
) -> Evaluation:
    """Metrics for one test set. `maps`/`masks` (N, H, W) are used for pixel AUROC where given;
    images without a mask should be passed with an all-false mask only if they are normal."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(anomalous, dtype=bool)
    types = np.asarray(defect_types)
    if y.all() or not y.any():
        raise ValueError("AUROC needs both normal and defective test images")
    per_type = {
        t: float(roc_auc_score(y[(types == t) | ~y], s[(types == t) | ~y])) for t in sorted(set(types[y].tolist()))
    }
    pixel = None
    if maps is not None and masks is not None and masks.any():
        pixel = float(roc_auc_score(masks.reshape(-1), maps.reshape(-1)))
    return Evaluation(
        image_auroc=float(roc_auc_score(y, s)),
        pixel_auroc=pixel,
        per_type_auroc=per_type,
        operating_point=operating_point(s, y, threshold),
        n_normal=int((~y).sum()),
        n_anomalous=int(y.sum()),
    )


@dataclass(frozen=True)
class ScoredTestSet:
    evaluation: Evaluation
    scores: np.ndarray
    anomalous: np.ndarray


def evaluate_samples(
    model: CSFlow,
    samples: Sequence[Sample],
    threshold: float,
    limits: ImageLimits,
    batch_size: int,
    progress: Progress = no_progress,
    transform: Transform | None = None,
    options: ServingOptions = FP32,
) -> ScoredTestSet:
    """Score a labelled test set (each image through `transform` first, e.g. a domain shift) and compute
    its metrics (pixel AUROC where masks exist); `options`: those `model` was prepared to serve with."""
    size = model.image_size
    has_masks = any(s.mask_path for s in samples)
    pixel_size = min(size, PIXEL_EVAL_SIZE)
    scores, maps = [], []
    batches = image_batches([s.path for s in samples], size, limits, batch_size, transform)
    for batch in progress(batches, "evaluate", -(-len(samples) // batch_size)):
        scored = score_images(model, batch, maps=has_masks, options=options)
        scores.append(scored.image)
        if scored.maps is not None:
            maps.append(F.adaptive_avg_pool2d(torch.from_numpy(scored.maps)[:, None], pixel_size)[:, 0].numpy())
    score_arr = np.concatenate(scores)
    anomalous = np.array([s.anomalous for s in samples])
    masks = (
        np.stack(
            [read_mask(s.mask_path, pixel_size) if s.mask_path else np.zeros((pixel_size,) * 2, bool) for s in samples]
        )
        if has_masks
        else None
    )
    evaluation = evaluate_scores(
        score_arr,
        anomalous,
        [s.defect_type for s in samples],
        threshold,
        np.concatenate(maps) if has_masks else None,
        masks,
    )
    return ScoredTestSet(evaluation, score_arr, anomalous)

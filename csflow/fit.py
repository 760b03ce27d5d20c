"""From a folder of normal images to a calibrated model: split, extract, train, calibrate."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from csflow.backbones import create_backbone
from csflow.calibration import DEFAULT_PROBE_STRENGTHS, Calibration, calibrate
from csflow.data import ImageLimits, Transform, load_batch
from csflow.defects import DefectConfig, ProbeItem, graded_defects, probe_detection, probe_plan
from csflow.extractor import FeatureExtractor
from csflow.flow import FlowConfig
from csflow.model import CSFlow
from csflow.scoring import score_images
from csflow.training import (
    EpochRecord,
    TrainConfig,
    TrainResult,
    extract_features,
    features_scores_and_nll,
    split_normals,
    train_flow,
)

T = TypeVar("T")
Progress = Callable[[Iterable[T], str, int], Iterable[T]]


def no_progress(items: Iterable[T], desc: str, total: int) -> Iterable[T]:
    return items


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def image_batches(
    paths: Sequence[Path], size: int, limits: ImageLimits, batch_size: int, transform: Transform | None = None
) -> Iterator[Tensor]:
    for i in range(0, len(paths), batch_size):
        yield load_batch(paths[i : i + batch_size], size, limits, transform)


@dataclass(frozen=True)
class FitSpec:
    backbone: str
    weights: str
    image_size: int
    flow: FlowConfig
    train: TrainConfig
    val_fraction: float
    calibration_fraction: float
    target_fpr: float
    limits: ImageLimits
    probe_strengths: tuple[float, ...] = DEFAULT_PROBE_STRENGTHS  # the sensitivity probe (csflow.defects)


@dataclass
class FitResult:
    model: CSFlow
    calibration: Calibration
    training: TrainResult
    extract_seconds: float
    n_fit: int
    n_val: int

    def summary(self, spec: FitSpec, n_train: int) -> dict:
        """Of the `n_train` normal training images, `n_fit` trained the flow, `n_weight_selection`
        picked the kept epoch and `n_heldout` calibrated the threshold."""
        return {
            "n_train": n_train,
            "n_fit": self.n_fit,
            "n_weight_selection": self.n_val,
            "n_heldout": len(self.calibration.scores),
            "epochs": len(self.training.history),
            "first_epoch_train_nll": self.training.history[0].train_nll if self.training.history else None,
            "best_epoch": self.training.best_epoch,
            "best_heldout_nll": self.training.best_val_nll,
            "train_seconds": round(self.training.seconds, 1),
            "extract_seconds": round(self.extract_seconds, 1),
            "train_config": asdict(spec.train),
            "val_fraction": spec.val_fraction,
            "calibration_fraction": spec.calibration_fraction,
        }


def build_model(backbone: str, weights: str, image_size: int, flow: FlowConfig) -> CSFlow:
    return CSFlow(FeatureExtractor(create_backbone(backbone, weights)), image_size, flow, backbone).eval()


def fit(
    normal_images: Sequence[Path],
    spec: FitSpec,
    device: torch.device,
    progress: Progress = no_progress,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FitResult:
    """Train on normal images; two disjoint seeded shares are held out, one to pick the kept weights,
    one to set the threshold (and record the calibration NLLs)."""
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.backbone, spec.weights, spec.image_size, spec.flow).to(device)
    train_idx, val_idx, cal_idx = split_normals(
        len(normal_images), spec.val_fraction, spec.calibration_fraction, spec.train.seed
    )
    t0 = time.perf_counter()
    bs = spec.train.batch_size

    def features(idx: Sequence[int], desc: str) -> list[Tensor]:
        paths = [normal_images[i] for i in idx]
        batches = image_batches(paths, spec.image_size, spec.limits, bs)
        return extract_features(model, progress(batches, desc, -(-len(paths) // bs)), device)

    train_feats = features(train_idx, "extract train")
    val_feats = features(val_idx, "extract weight selection")
    cal_feats = features(cal_idx, "extract calibration")
    extract_seconds = time.perf_counter() - t0
    result = train_flow(model, train_feats, val_feats, spec.train, device, on_epoch)
    cal_scores, cal_nll = features_scores_and_nll(model, cal_feats, bs, device)
    calibration = calibrate(cal_scores.numpy(), spec.target_fpr, cal_nll.numpy())
    cal_paths = [normal_images[i] for i in cal_idx]
    cal_batches = image_batches(cal_paths, spec.image_size, spec.limits, bs)
    detection = probe_reference(model, cal_batches, calibration.threshold, spec.probe_strengths, spec.train.seed, bs)
    calibration = replace(calibration, probe_detection=detection)
    return FitResult(model, calibration, result, extract_seconds, len(train_idx), len(val_idx))


def probe_reference(
    model: CSFlow,
    batches: Iterable[Tensor],
    threshold: float,
    strengths: Sequence[float] = DEFAULT_PROBE_STRENGTHS,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, float]:
    """The sensitivity probe's detection curve (`csflow.defects`) on held-out normal images at `threshold`:
    every strength on every image."""
    generator = torch.Generator().manual_seed(seed)
    defects = DefectConfig()
    scores: list[float] = []
    plan: list[ProbeItem] = []
    first = 0
    for batch in batches:
        items = probe_plan(first, len(batch), len(strengths), strengths, len(defects.kinds))
        scores += score_images(model, graded_defects(batch, items, defects, generator), batch_size).image.tolist()
        plan += items
        first += len(batch)
    return probe_detection(scores, plan, threshold)

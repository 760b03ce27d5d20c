"""The demo's data and source model: ELPV exported once, CS-Flow trained once and reused."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from csflow.artifacts import ArtifactError, read_manifest, save_model
from csflow.calibration import PROBE_REVISION
from csflow.data import GOOD, load_dataset
from csflow.defects import strength_key
from csflow.elpv import ElpvExport, export_elpv
from csflow.fit import FitSpec, Progress, fit, no_progress, resolve_device
from csflow.training import EpochRecord
from daemon.config import Settings, override
from lab.demo.spec import DemoSpec, Say


def prepare_data(spec: DemoSpec, say: Say) -> None:
    """Export ELPV into `spec.data` unless it holds a dataset already (an export is skipped when done alike)."""
    if (spec.data / "train" / GOOD).is_dir() and not (spec.data / "export.json").is_file():
        return  # a dataset of the user's own in the MVTec layout
    counts = export_elpv(spec.data, ElpvExport())
    say(f"data: ELPV solar cells in {spec.data} ({', '.join(f'{k} {v}' for k, v in counts.items())})")


def cached_model(model_dir: Path, fit_spec: FitSpec, data: str, n_train: int) -> bool:
    """Whether `model_dir` holds a model trained on `n_train` images of `data` with these settings (then it is
    reused)."""
    try:
        manifest = read_manifest(model_dir)
    except ArtifactError:
        return False
    flow = {**asdict(fit_spec.flow), "kernel_sizes": list(fit_spec.flow.kernel_sizes)}
    return (
        (manifest.backbone, manifest.backbone_weights, manifest.image_size)
        == (fit_spec.backbone, fit_spec.weights, fit_spec.image_size)
        and manifest.flow == flow
        and manifest.summary.get("train_config") == asdict(fit_spec.train)
        and manifest.summary.get("demo_data") == data
        and manifest.summary.get("n_train") == n_train
        and list(manifest.calibration.get("probe_detection", {})) == [strength_key(s) for s in fit_spec.probe_strengths]
        and manifest.calibration.get("probe_revision") == PROBE_REVISION
    )


def demo_fit_spec(spec: DemoSpec, settings: Settings) -> FitSpec:
    model_cfg = override(settings.model, "model", image_size=spec.image_size)
    train_cfg = override(settings.train, "train", epochs=spec.epochs, lr=spec.lr)
    return FitSpec(
        backbone=model_cfg.backbone,
        weights=model_cfg.weights_source,
        image_size=model_cfg.image_size,
        flow=override(settings.flow, "flow", hidden_channels=spec.hidden_channels).to_config(),
        train=train_cfg.to_config(),
        val_fraction=train_cfg.val_fraction,
        calibration_fraction=settings.calibration.heldout_fraction,
        target_fpr=settings.calibration.target_fpr,
        limits=settings.limits.to_limits(),
        probe_strengths=settings.calibration.probe_strengths,
    )


@dataclass(frozen=True)
class PreparedModel:
    directory: Path
    version: str
    threshold: float
    trained: bool
    seconds: float


def prepare_model(spec: DemoSpec, settings: Settings, say: Say, progress: Progress = no_progress) -> PreparedModel:
    """Train the source model into OUT/model, or reuse the one there when it was trained alike."""
    t0 = time.monotonic()
    model_dir = spec.out / "model"
    fit_spec = demo_fit_spec(spec, settings)
    data = str(spec.data.resolve())
    normal = [s.path for s in load_dataset(spec.data).train][: spec.max_train_images]
    cached = not spec.fresh and cached_model(model_dir, fit_spec, data, len(normal))
    if not cached:
        device = resolve_device(settings.model.device)
        say(
            f"model: training CS-Flow ({fit_spec.backbone}, {fit_spec.image_size} px, {fit_spec.flow.hidden_channels} "
            f"hidden channels, {fit_spec.train.epochs} epochs) on {len(normal)} normal cells, device {device}"
        )

        def on_epoch(record: EpochRecord) -> None:
            held_out = "" if record.val_nll is None else f", held-out {record.val_nll:.3f}"
            say(
                f"  epoch {record.epoch}/{fit_spec.train.epochs}: NLL {record.train_nll:.3f}{held_out} "
                f"({record.seconds:.1f} s)"
            )

        result = fit(normal, fit_spec, device, progress, on_epoch)
        summary = {**result.summary(fit_spec, len(normal)), "demo_data": data}
        save_model(model_dir, result.model, fit_spec.weights, result.calibration, summary)
        del result
    manifest = read_manifest(model_dir)
    threshold = float(manifest.calibration["threshold"])
    what = "trained" if not cached else "reused (--fresh retrains)"
    say(f"model: {manifest.version} {what}, in {model_dir}, threshold {threshold:.4g}")
    return PreparedModel(model_dir, manifest.version, threshold, not cached, time.monotonic() - t0)

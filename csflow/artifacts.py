"""Model versions on disk: `manifest.json` + safetensors, content-hashed and verified on load.

No pickle anywhere: tensors are safetensors, everything else is JSON. The version id is a hash of the
manifest's content (which includes the sha256 of every tensor file), so equal content means equal id
and any tampering with a file or the manifest is detected.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from csflow.backbones import WeightsError, create_backbone, state_digest
from csflow.calibration import Calibration
from csflow.extractor import FeatureExtractor
from csflow.flow import FlowConfig
from csflow.model import CSFlow

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FLOW_FILE = "flow.safetensors"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
VERSION_CHARS = 20


class ArtifactError(RuntimeError):
    """A model directory is missing, corrupt, tampered with or inconsistent."""


@dataclass(frozen=True)
class Manifest:
    backbone: str
    backbone_weights: str
    backbone_sha256: str
    image_size: int
    flow: dict[str, Any]
    calibration: dict[str, Any]
    files: dict[str, str]
    parent: str | None = None
    domain: str = "source"
    summary: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    version: str = ""
    format: int = FORMAT_VERSION

    def content_hash(self) -> str:
        content = {k: v for k, v in asdict(self).items() if k not in ("version", "created_at")}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:VERSION_CHARS]

    @property
    def flow_config(self) -> FlowConfig:
        return FlowConfig(**{**self.flow, "kernel_sizes": tuple(self.flow["kernel_sizes"])})

    @property
    def threshold_calibration(self) -> Calibration:
        return Calibration.from_dict(self.calibration)


@dataclass(frozen=True)
class ModelVersion:
    model: CSFlow
    manifest: Manifest

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def threshold(self) -> float:
        return float(self.manifest.calibration["threshold"])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(
    directory: str | Path,
    model: CSFlow,
    backbone_weights: str,
    calibration: Calibration,
    summary: dict[str, Any],
    domain: str = "source",
) -> Manifest:
    """Write `model` as a new version into `directory` (created; existing files are replaced)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.flow.state_dict().items()}
    save_file(tensors, directory / FLOW_FILE)
    cfg = model.flow_config
    manifest = Manifest(
        backbone=model.extractor_name,
        backbone_weights=backbone_weights,
        backbone_sha256=state_digest(model.extractor),
        image_size=model.image_size,
        flow={**asdict(cfg), "kernel_sizes": list(cfg.kernel_sizes)},
        calibration=calibration.to_dict(),
        files={FLOW_FILE: file_sha256(directory / FLOW_FILE)},
        domain=domain,
        summary=summary,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    manifest = Manifest(**{**asdict(manifest), "version": manifest.content_hash()})
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True, allow_nan=False))
    tmp.replace(directory / MANIFEST)
    return manifest


def read_manifest(directory: str | Path) -> Manifest:
    """Read and check a manifest: known format, all fields present, version matching the content."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a model directory: {MANIFEST} is missing")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(path.read_text())
        manifest = Manifest(**data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ArtifactError(f"{path} is not a valid manifest: {exc}") from exc
    if manifest.format != FORMAT_VERSION:
        raise ArtifactError(f"{path}: manifest format {manifest.format} is not supported (expected {FORMAT_VERSION})")
    if manifest.content_hash() != manifest.version:
        raise ArtifactError(f"{path}: content does not match version {manifest.version!r} (edited or corrupted)")
    return manifest


def verify_files(directory: Path, manifest: Manifest) -> None:
    for name, expected in manifest.files.items():
        path = directory / name
        if Path(name).name != name:
            raise ArtifactError(f"{directory / MANIFEST}: file name {name!r} must not contain a path")
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing")
        if file_sha256(path) != expected:
            raise ArtifactError(f"{path}: sha256 does not match the manifest (corrupted or tampered)")


def load_model(directory: str | Path, device: str = "cpu") -> ModelVersion:
    """Load a verified model version; raises `ArtifactError` naming what is wrong."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    try:
        extractor = FeatureExtractor(create_backbone(manifest.backbone, manifest.backbone_weights))
        model = CSFlow(extractor, manifest.image_size, manifest.flow_config, manifest.backbone)
    except (WeightsError, TypeError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{directory / MANIFEST}: cannot build the model it describes: {exc}") from exc
    if state_digest(extractor) != manifest.backbone_sha256:
        raise ArtifactError(
            f"backbone weights {manifest.backbone_weights!r} differ from the ones version {manifest.version} "
            "was trained with"
        )
    try:
        tensors = load_file(directory / FLOW_FILE)
        model.flow.load_state_dict(tensors, strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise ArtifactError(f"{directory / FLOW_FILE} does not fit the manifest's flow: {exc}") from exc
    return ModelVersion(model.to(device).eval(), manifest)

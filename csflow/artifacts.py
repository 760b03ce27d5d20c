"""Model versions on disk: `manifest.json` + safetensors, content-hashed and verified on load.

No pickle anywhere: tensors are safetensors, everything else is JSON. The version id is a hash of the
manifest's content (which includes the sha256 of every tensor file), so equal content means equal id
and any tampering with a file or the manifest is detected.

Two kinds of version share the format. A base version holds the flow (`flow.safetensors`) and names
its backbone weights. An adapted version holds only the extractor tensors its adaptation changed
(`extractor_delta.safetensors`: full tensors of the adapted blocks, not differences) and names its
parent version; loading resolves the chain down to the base, verifies every link (manifest hash, file
hashes, the parent's version id) and checks that the rebuilt extractor has the digest the adapter
recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from csflow.backbones import WeightsError, create_backbone, state_digest
from csflow.calibration import Calibration
from csflow.extractor import FeatureExtractor
from csflow.flow import FLOW_REVISION, FlowConfig
from csflow.model import CSFlow
from csflow.sharing import owner_modules, share_except

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FLOW_FILE = "flow.safetensors"
DELTA_FILE = "extractor_delta.safetensors"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
VERSION_CHARS = 20
MAX_CHAIN = 32  # adapted-of-adapted links followed before giving up (guards against loops)
# Not part of the content hash: where a parent lives is a location hint, not content. The parent's
# identity is its version id (`parent`, hashed), checked against the directory found.
LOCATION_FIELDS = ("parent_path",)

Resolver = Callable[[str], str | Path]  # parent version id -> its directory


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
    flow_revision: int = FLOW_REVISION
    parent_path: str | None = None  # adapted versions: parent directory, relative to this one or absolute

    def content_hash(self) -> str:
        excluded = ("version", "created_at", *LOCATION_FIELDS)
        content = {k: v for k, v in asdict(self).items() if k not in excluded}
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
    """A loaded model and the manifest of its version; `lineage` lists version ids from this one to the
    base (one entry for a base version)."""

    model: CSFlow
    manifest: Manifest
    lineage: tuple[str, ...] = ()

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
    _write_manifest(directory, manifest)
    return manifest


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True, allow_nan=False))
    tmp.replace(directory / MANIFEST)


def save_adapter(
    directory: str | Path,
    model: CSFlow,
    parent: ModelVersion,
    block_names: Sequence[str],
    summary: dict[str, Any],
    domain: str,
    parent_dir: str | Path | None = None,
    calibration: Calibration | None = None,
) -> Manifest:
    """Write `model`, an adaptation of `parent`, as a version holding only the tensors of `block_names`.

    `block_names` are extractor state-dict prefixes (e.g. `blocks.1.0`); every other extractor tensor and
    the whole flow must equal the parent's, otherwise the adapter could not reproduce `model` and a
    `ValueError` is raised. `parent_dir` is stored relative to `directory` (so a registry folder can move
    as a whole); without it, loading needs a resolver. The calibration defaults to a copy of the
    parent's: the adaptation aims to bring target normals back to the source score level, so the
    source threshold stays the operating point.
    """
    directory = Path(directory)
    if model.image_size != parent.model.image_size or model.flow_config != parent.model.flow_config:
        raise ValueError("the adapted model's image size or flow config differs from its parent's")
    prefixes = tuple(f"{name}." for name in block_names)
    if not prefixes:
        raise ValueError("an adapter needs at least one adapted block")
    state = model.extractor.state_dict()
    parent_state = parent.model.extractor.state_dict()
    unknown = [p for p in prefixes if not any(k.startswith(p) for k in state)]
    if unknown:
        raise ValueError(f"no extractor tensors under {unknown}")
    for key, tensor in state.items():
        if not key.startswith(prefixes) and not torch.equal(tensor.cpu(), parent_state[key].cpu()):
            raise ValueError(f"extractor tensor {key!r} differs from the parent's but is outside the adapted blocks")
    if model.flow is not parent.model.flow:
        parent_flow = parent.model.flow.state_dict()
        for key, tensor in model.flow.state_dict().items():
            if not torch.equal(tensor.cpu(), parent_flow[key].cpu()):
                raise ValueError(
                    f"flow tensor {key!r} differs from the parent's; adapters carry only extractor tensors"
                )
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if k.startswith(prefixes)}
    save_file(tensors, directory / DELTA_FILE)
    location = None
    if parent_dir is not None:
        location = os.path.relpath(Path(parent_dir).resolve(), directory.resolve())
    manifest = Manifest(
        backbone=parent.manifest.backbone,
        backbone_weights=parent.manifest.backbone_weights,
        backbone_sha256=state_digest(model.extractor),
        image_size=parent.manifest.image_size,
        flow=dict(parent.manifest.flow),
        calibration=calibration.to_dict() if calibration is not None else dict(parent.manifest.calibration),
        files={DELTA_FILE: file_sha256(directory / DELTA_FILE)},
        parent=parent.version,
        domain=domain,
        summary=summary,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        parent_path=location,
    )
    manifest = Manifest(**{**asdict(manifest), "version": manifest.content_hash()})
    _write_manifest(directory, manifest)
    return manifest


def check_flow_revision(data: dict[str, Any], where: str) -> None:
    """Refuse a manifest written for another flow revision (missing: revision 1, before it was recorded).

    Checked on the stored fields before the content hash, so that an old version gets this message
    rather than "corrupted" (the hash of an old manifest read with today's fields does not match)."""
    revision = data.get("flow_revision", 1)
    if revision != FLOW_REVISION:
        raise ArtifactError(
            f"{where}: version {data.get('version')!r} was trained with CS-Flow revision {revision}, but this "
            f"inspectd computes revision {FLOW_REVISION} (gammas on each destination scale, as the original), "
            "so its weights cannot be used: retrain it with `inspectd train` (and adapt again)"
        )


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
    check_flow_revision(data, str(path))
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


def load_model(directory: str | Path, device: str = "cpu", resolver: Resolver | None = None) -> ModelVersion:
    """Load a verified model version; raises `ArtifactError` naming what is wrong.

    An adapted version's parent is found with `resolver(parent_version_id)` when given, else through the
    manifest's `parent_path`; every link is verified before any tensor is used.
    """
    chain = _resolve_chain(Path(directory), resolver)
    base_dir, base = chain[-1]
    model = _load_base(base_dir, base)
    for adapter_dir, manifest in reversed(chain[:-1]):
        apply_adapter(model, adapter_dir, manifest)
    model.requires_grad_(False)  # served models carry no gradients; adaptation unfreezes what it tunes
    return ModelVersion(model.to(device).eval(), chain[0][1], tuple(m.version for _, m in chain))


def _resolve_chain(directory: Path, resolver: Resolver | None, verify_base: bool = True) -> list[tuple[Path, Manifest]]:
    """(directory, manifest) from `directory` down to its base version, each link verified (the base's
    files not with `verify_base` False: its tensors are not read, an already-loaded copy is used)."""
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    chain = [(directory, manifest)]
    while manifest.parent is not None:
        if len(chain) > MAX_CHAIN:
            raise ArtifactError(f"{chain[0][0]}: parent chain is longer than {MAX_CHAIN} versions")
        child_dir, child = directory, manifest
        directory = _parent_dir(child_dir, child, resolver)
        manifest = read_manifest(directory)
        if manifest.version != child.parent:
            raise ArtifactError(
                f"{child_dir} names parent version {child.parent}, but {directory} holds version {manifest.version}"
            )
        if verify_base or manifest.parent is not None:
            verify_files(directory, manifest)
        _check_same_model(child_dir, child, manifest)
        chain.append((directory, manifest))
    return chain


def _parent_dir(directory: Path, manifest: Manifest, resolver: Resolver | None) -> Path:
    if resolver is not None:
        try:
            return Path(resolver(str(manifest.parent)))
        except (LookupError, OSError, ValueError) as exc:
            raise ArtifactError(f"{directory}: cannot resolve parent version {manifest.parent}: {exc}") from exc
    if manifest.parent_path is None:
        raise ArtifactError(
            f"{directory}: parent version {manifest.parent} has no stored location; pass a resolver to load it"
        )
    return directory / manifest.parent_path  # an absolute parent_path replaces `directory`


def _check_same_model(directory: Path, child: Manifest, parent: Manifest) -> None:
    fields = ("backbone", "backbone_weights", "image_size", "flow")
    differing = [f for f in fields if getattr(child, f) != getattr(parent, f)]
    if differing:
        raise ArtifactError(f"{directory}: {', '.join(differing)} differ from parent version {parent.version}")
    if DELTA_FILE not in child.files:
        raise ArtifactError(f"{directory}: an adapted version must list {DELTA_FILE}")


def _load_base(directory: Path, manifest: Manifest) -> CSFlow:
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
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ArtifactError(f"{directory / FLOW_FILE} does not fit the manifest's flow: {exc}") from exc
    return model


def apply_adapter(model: CSFlow, directory: Path, manifest: Manifest) -> None:
    """Overwrite the extractor tensors an adapter carries (in `model`, in place); the result must have the
    recorded digest, so an adapter applied to another parent than its own is refused."""
    path = directory / DELTA_FILE
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file: {exc}") from exc
    state = model.extractor.state_dict()
    if not tensors:
        raise ArtifactError(f"{path} holds no tensors")
    for key, tensor in tensors.items():
        target = state.get(key)
        if target is None or target.shape != tensor.shape or target.dtype != tensor.dtype:
            raise ArtifactError(f"{path}: tensor {key!r} does not fit the extractor of {manifest.backbone}")
    with torch.no_grad():
        for key, tensor in tensors.items():
            state[key].copy_(tensor)
    if state_digest(model.extractor) != manifest.backbone_sha256:
        raise ArtifactError(f"{directory}: the rebuilt extractor does not match version {manifest.version}")


def lineage(directory: str | Path, resolver: Resolver | None = None) -> tuple[str, ...]:
    """Version ids from the version in `directory` down to its base, from the manifests alone (each
    checked against its id; no tensor file is hashed): which base an adapted version needs."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    ids = [manifest.version]
    while manifest.parent is not None:
        if len(ids) > MAX_CHAIN:
            raise ArtifactError(f"{directory}: parent chain is longer than {MAX_CHAIN} versions")
        directory = _parent_dir(directory, manifest, resolver)
        manifest = read_manifest(directory)
        ids.append(manifest.version)
    return tuple(ids)


def load_adapted(directory: str | Path, base: ModelVersion, resolver: Resolver | None = None) -> ModelVersion:
    """Load an adapted version onto `base`, its already-loaded base version, instead of rebuilding it.

    The result shares the base's flow and every extractor module that no adapter of the chain changes
    (the same tensors: a further adapted version costs its adapter blocks); only the modules holding
    adapted tensors are copied, then overwritten with the adapter tensors and checked against the
    recorded digest, as `load_model` does. The base's own files are not read again: `base` was verified
    when it was loaded, and its version id (a hash that covers its tensor files) must be the chain's.
    """
    chain = _resolve_chain(Path(directory), resolver, verify_base=False)
    if len(chain) < 2:
        raise ArtifactError(f"{directory}: version {chain[0][1].version} is a base version, not an adapted one")
    if chain[-1][1].version != base.version:
        raise ArtifactError(f"{directory}: its base is version {chain[-1][1].version}, not {base.version}")
    keys: set[str] = set()
    for adapter_dir, _ in chain[:-1]:
        try:
            with safe_open(adapter_dir / DELTA_FILE, framework="pt") as fh:
                keys.update(fh.keys())
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{adapter_dir / DELTA_FILE} is not a readable safetensors file: {exc}") from exc
    try:
        model = share_except(base.model, owner_modules(keys, prefix="extractor."))
    except ValueError as exc:
        raise ArtifactError(f"{directory}: the adapter does not fit the base extractor: {exc}") from exc
    for adapter_dir, manifest in reversed(chain[:-1]):
        apply_adapter(model, adapter_dir, manifest)
    model.requires_grad_(False)
    return ModelVersion(model.eval(), chain[0][1], tuple(m.version for _, m in chain))

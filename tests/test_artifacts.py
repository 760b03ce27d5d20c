"""Model versions on disk: safetensors + a content-hashed manifest, verified on load."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from csflow.artifacts import (
    FLOW_FILE,
    LOCATION_FIELDS,
    MANIFEST,
    VERSION_CHARS,
    ArtifactError,
    Manifest,
    load_model,
    read_manifest,
    save_model,
)
from csflow.backbones import LITE0, LITE0_PACKAGE
from csflow.calibration import calibrate
from csflow.flow import FLOW_REVISION
from csflow.model import CSFlow, image_scores

CALIBRATION = calibrate(np.linspace(0.5, 1.5, 21), 0.1)
SUMMARY = {"epochs": 3, "best_epoch": 2, "val_nll": 1.25}
TINY_FLOW_DICT = {
    "hidden_channels": 8,
    "n_blocks": 4,
    "kernel_sizes": [3, 3, 3, 5],
    "clamp": 3.0,
    "leaky_slope": 0.1,
}


@pytest.fixture
def saved(make_tiny_model: Callable[..., CSFlow], tmp_path: Path) -> tuple[CSFlow, Manifest, Path]:
    model = make_tiny_model(seed=5)
    directory = tmp_path / "v1"
    manifest = save_model(directory, model, LITE0_PACKAGE, CALIBRATION, SUMMARY, domain="line-3")
    return model, manifest, directory


def rewrite_manifest(directory: Path, rehash: bool = True, **changes: Any) -> None:
    """Change manifest fields; with `rehash`, also recompute the version so only the later checks can
    catch the change."""
    path = directory / MANIFEST
    data = json.loads(path.read_text())
    data.update(changes)
    if rehash:
        data["version"] = Manifest(**data).content_hash()
    path.write_text(json.dumps(data))


def test_round_trip_is_bit_identical(saved: tuple[CSFlow, Manifest, Path], make_images: Callable[..., Tensor]) -> None:
    model, _, directory = saved
    loaded = load_model(directory)
    original_state = model.flow.state_dict()
    loaded_state = loaded.model.flow.state_dict()
    assert loaded_state.keys() == original_state.keys()
    assert any("perm" in k for k in loaded_state)
    for key, tensor in original_state.items():
        assert torch.equal(loaded_state[key], tensor), key
    assert not loaded.model.training

    images = make_images(2, seed=3)
    with torch.no_grad():
        expected = image_scores(model(images).z)
        got = image_scores(loaded.model(images).z)
    assert torch.equal(got, expected)


def test_manifest_contents(saved: tuple[CSFlow, Manifest, Path]) -> None:
    model, manifest, directory = saved
    loaded = load_model(directory)
    assert loaded.manifest == manifest == read_manifest(directory)
    assert loaded.version == manifest.version == manifest.content_hash()
    assert len(manifest.version) == 20
    assert loaded.threshold == CALIBRATION.threshold
    assert manifest.threshold_calibration == CALIBRATION
    assert manifest.flow_config == model.flow_config
    assert (manifest.backbone, manifest.backbone_weights, manifest.image_size) == (LITE0, LITE0_PACKAGE, 128)
    assert manifest.domain == "line-3" and manifest.summary == SUMMARY and manifest.parent is None
    assert set(manifest.files) == {FLOW_FILE}
    assert loaded.model.flow_config == model.flow_config and loaded.model.image_size == 128


def test_only_json_and_safetensors_on_disk(saved: tuple[CSFlow, Manifest, Path]) -> None:
    _, _, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == [FLOW_FILE, MANIFEST]
    json.loads((directory / MANIFEST).read_text())
    raw = (directory / FLOW_FILE).read_bytes()
    assert not raw.startswith((b"\x80", b"PK"))  # neither a pickle nor torch.save's zip
    assert load_file(directory / FLOW_FILE)  # parses as safetensors


def test_same_content_same_version(make_tiny_model: Callable[..., CSFlow], tmp_path: Path) -> None:
    a = save_model(tmp_path / "a", make_tiny_model(seed=1), LITE0_PACKAGE, CALIBRATION, SUMMARY)
    b = save_model(tmp_path / "b", make_tiny_model(seed=1), LITE0_PACKAGE, CALIBRATION, SUMMARY)
    c = save_model(tmp_path / "c", make_tiny_model(seed=2), LITE0_PACKAGE, CALIBRATION, SUMMARY)
    other_summary = {**SUMMARY, "epochs": 4}
    d = save_model(tmp_path / "d", make_tiny_model(seed=1), LITE0_PACKAGE, CALIBRATION, other_summary)
    assert a.version == b.version
    assert len({a.version, c.version, d.version}) == 3


def test_flipped_byte_in_tensors_detected(saved: tuple[CSFlow, Manifest, Path]) -> None:
    _, _, directory = saved
    path = directory / FLOW_FILE
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        load_model(directory)


def test_edited_threshold_detected(saved: tuple[CSFlow, Manifest, Path]) -> None:
    _, manifest, directory = saved
    calibration = {**manifest.calibration, "threshold": manifest.calibration["threshold"] * 2}
    rewrite_manifest(directory, rehash=False, calibration=calibration)
    with pytest.raises(ArtifactError, match="does not match version"):
        load_model(directory)


def test_missing_directory_or_manifest(tmp_path: Path, saved: tuple[CSFlow, Manifest, Path]) -> None:
    with pytest.raises(ArtifactError, match="missing"):
        load_model(tmp_path / "nowhere")
    _, _, directory = saved
    (directory / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_model(directory)


def test_missing_tensor_file(saved: tuple[CSFlow, Manifest, Path]) -> None:
    _, _, directory = saved
    (directory / FLOW_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_model(directory)


@pytest.mark.parametrize("text", ["{not json", "[]", '"a string"', '{"backbone": "x"}'])
def test_malformed_manifest(saved: tuple[CSFlow, Manifest, Path], text: str) -> None:
    _, _, directory = saved
    (directory / MANIFEST).write_text(text)
    with pytest.raises(ArtifactError, match="not a valid manifest"):
        load_model(directory)


def test_unknown_manifest_field(saved: tuple[CSFlow, Manifest, Path]) -> None:
    _, _, directory = saved
    data = json.loads((directory / MANIFEST).read_text())
    data["surprise"] = 1
    (directory / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="not a valid manifest"):
        load_model(directory)


def write_old_revision_manifest(directory: Path, revision: int | None) -> None:
    """Rewrite the manifest as an earlier inspectd wrote it: `revision` (None: no such field, as before
    revisions were recorded), with a version id consistent with that content."""
    path = directory / MANIFEST
    data = json.loads(path.read_text())
    del data["flow_revision"]
    if revision is not None:
        data["flow_revision"] = revision
    content = {k: v for k, v in data.items() if k not in ("version", "created_at", *LOCATION_FIELDS)}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    data["version"] = hashlib.sha256(canonical.encode()).hexdigest()[:VERSION_CHARS]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("revision", [None, 1, FLOW_REVISION + 1])
def test_version_of_another_flow_revision_is_refused_with_retrain_advice(
    saved: tuple[CSFlow, Manifest, Path], revision: int | None
) -> None:
    """Weights trained with the earlier flow (gammas on the cross paths only) compute something else
    under today's flow: loading them must fail loudly, never score silently."""
    _, manifest, directory = saved
    assert manifest.flow_revision == FLOW_REVISION == 2
    assert json.loads((directory / MANIFEST).read_text())["flow_revision"] == FLOW_REVISION
    write_old_revision_manifest(directory, revision)
    expected = 1 if revision is None else revision
    with pytest.raises(ArtifactError, match=rf"revision {expected}, .*retrain"):
        load_model(directory)
    with pytest.raises(ArtifactError, match="retrain"):
        read_manifest(directory)


def test_loaded_model_is_frozen(saved: tuple[CSFlow, Manifest, Path], make_images: Callable[..., Tensor]) -> None:
    """A served model carries no gradients: nothing it scores can write to its flow or extractor."""
    _, _, directory = saved
    model = load_model(directory).model
    assert not any(p.requires_grad for p in model.parameters())
    out = model(make_images(1))
    assert not out.log_jac_det.requires_grad and not any(z.requires_grad for z in out.z)


def test_unsupported_format(saved: tuple[CSFlow, Manifest, Path]) -> None:
    _, _, directory = saved
    rewrite_manifest(directory, format=2)
    with pytest.raises(ArtifactError, match="format 2"):
        load_model(directory)


def test_file_names_with_paths_refused(saved: tuple[CSFlow, Manifest, Path]) -> None:
    _, manifest, directory = saved
    (directory.parent / "outside.safetensors").write_bytes((directory / FLOW_FILE).read_bytes())
    rewrite_manifest(directory, files={"../outside.safetensors": manifest.files[FLOW_FILE]})
    with pytest.raises(ArtifactError, match="must not contain a path"):
        load_model(directory)


def test_different_backbone_weights_detected(saved: tuple[CSFlow, Manifest, Path]) -> None:
    _, _, directory = saved
    rewrite_manifest(directory, backbone_sha256="0" * 64)
    with pytest.raises(ArtifactError, match="differ"):
        load_model(directory)


def test_flow_config_not_matching_tensors(saved: tuple[CSFlow, Manifest, Path]) -> None:
    _, manifest, directory = saved
    rewrite_manifest(directory, flow={**manifest.flow, "hidden_channels": 16})
    with pytest.raises(ArtifactError, match="does not fit"):
        load_model(directory)


@pytest.mark.parametrize(
    "changes",
    [
        {"image_size": 100},
        {"backbone": "no_such_net"},
        {"backbone_weights": "/nonexistent/weights.safetensors"},
        {"flow": {**TINY_FLOW_DICT, "unknown_option": 1}},
        {"flow": {**TINY_FLOW_DICT, "kernel_sizes": [3, 3, 4, 5]}},
    ],
    ids=["image_size", "backbone", "weights_file", "flow_key", "flow_value"],
)
def test_consistent_but_unusable_manifest_raises_artifact_error(
    saved: tuple[CSFlow, Manifest, Path], changes: dict[str, Any]
) -> None:
    """A manifest whose hash matches but whose content cannot be built (another writer, a newer
    release, a moved weights file) is reported as ArtifactError, as load_model documents, not as a
    stray ValueError/TypeError/WeightsError."""
    _, _, directory = saved
    rewrite_manifest(directory, **changes)
    with pytest.raises(ArtifactError):
        load_model(directory)


def test_manifest_is_plain_json_of_the_dataclass(saved: tuple[CSFlow, Manifest, Path]) -> None:
    _, manifest, directory = saved
    assert json.loads((directory / MANIFEST).read_text()) == asdict(manifest)

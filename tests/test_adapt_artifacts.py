"""Adapted versions on disk: only the adapted blocks' tensors plus the parent's id, resolved and verified
link by link on load."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_artifacts import rewrite_manifest
from torch import Tensor

from adapters.adapt import AdaptConfig, AdaptResult, adapt, blocks_nbytes
from csflow.artifacts import (
    DELTA_FILE,
    FLOW_FILE,
    MANIFEST,
    ArtifactError,
    Manifest,
    ModelVersion,
    file_sha256,
    load_model,
    read_manifest,
    save_adapter,
    save_model,
)
from csflow.backbones import LITE0_PACKAGE
from csflow.calibration import calibrate
from csflow.model import CSFlow, image_scores

FAST = AdaptConfig(lr=1e-3, max_steps=2, stop_quantile=None)


@dataclass
class Stored:
    root: Path
    parent: ModelVersion
    result: AdaptResult
    manifest: Manifest

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapted"


@pytest.fixture(scope="module")
def stored(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor], tmp_path_factory: pytest.TempPathFactory
) -> Stored:
    root = tmp_path_factory.mktemp("registry")
    model = make_tiny_model(seed=6)
    with torch.no_grad():
        scores = image_scores(model(make_images(6, seed=1)).z).numpy()
    save_model(root / "base", model, LITE0_PACKAGE, calibrate(scores, 0.2), {"purpose": "adapter tests"})
    parent = load_model(root / "base")
    result = adapt(parent, make_images(2, seed=9), FAST)
    manifest = save_adapter(
        root / "adapted", result.model, parent, result.block_names, result.summary(), "line-3/dark", root / "base"
    )
    return Stored(root, parent, result, manifest)


@pytest.fixture
def copy_of(stored: Stored, tmp_path: Path) -> Stored:
    """The registry copied, for tests that tamper with it."""
    shutil.copytree(stored.root, tmp_path / "registry")
    return Stored(tmp_path / "registry", stored.parent, stored.result, stored.manifest)


def test_round_trip_is_exact(stored: Stored, make_images: Callable[..., Tensor]) -> None:
    loaded = load_model(stored.adapter_dir)
    want_state = stored.result.model.extractor.state_dict()
    got_state = loaded.model.extractor.state_dict()
    assert got_state.keys() == want_state.keys()
    assert all(torch.equal(got_state[k], v) for k, v in want_state.items())
    parent_flow = stored.parent.model.flow.state_dict()
    assert all(torch.equal(parent_flow[k], v) for k, v in loaded.model.flow.state_dict().items())
    images = make_images(3, seed=4)
    with torch.no_grad():
        assert torch.equal(image_scores(loaded.model(images).z), image_scores(stored.result.model(images).z))
    assert loaded.version == stored.manifest.version
    assert loaded.lineage == (stored.manifest.version, stored.parent.version)
    assert stored.parent.lineage == (stored.parent.version,)


def test_adapter_holds_only_the_adapted_blocks(stored: Stored) -> None:
    manifest = read_manifest(stored.adapter_dir)
    assert manifest == stored.manifest
    assert manifest.parent == stored.parent.version and manifest.parent_path == "../base"
    assert set(manifest.files) == {DELTA_FILE}
    assert sorted(p.name for p in stored.adapter_dir.iterdir()) == [DELTA_FILE, MANIFEST]
    assert manifest.domain == "line-3/dark" and manifest.summary["steps"] == 2
    assert manifest.calibration == stored.parent.manifest.calibration  # the source threshold stays
    assert (manifest.backbone, manifest.backbone_weights, manifest.flow) == (
        stored.parent.manifest.backbone,
        stored.parent.manifest.backbone_weights,
        stored.parent.manifest.flow,
    )
    tensors = load_file(stored.adapter_dir / DELTA_FILE)
    prefixes = tuple(f"{b}." for b in stored.result.block_names)
    block_keys = {k for k in stored.result.model.extractor.state_dict() if k.startswith(prefixes)}
    assert set(tensors) == block_keys
    payload = blocks_nbytes(stored.result.model.extractor, 5)
    assert payload == sum(t.numel() * t.element_size() for t in tensors.values())
    size = (stored.adapter_dir / DELTA_FILE).stat().st_size
    assert payload < size < payload + 16_384  # tensors plus the safetensors header; no flow


def test_same_adaptation_same_version(stored: Stored, tmp_path: Path) -> None:
    r = stored.result
    again = save_adapter(tmp_path / "again", r.model, stored.parent, r.block_names, r.summary(), "line-3/dark")
    assert again.version == stored.manifest.version  # the parent's location is not content
    other = save_adapter(tmp_path / "other", r.model, stored.parent, r.block_names, r.summary(), "line-4")
    assert other.version != stored.manifest.version


def test_tampered_adapter_tensor_detected(copy_of: Stored) -> None:
    path = copy_of.adapter_dir / DELTA_FILE
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        load_model(copy_of.adapter_dir)


def test_tampered_parent_detected(copy_of: Stored) -> None:
    path = copy_of.base_dir / FLOW_FILE
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        load_model(copy_of.adapter_dir)


def test_wrong_parent_version_detected(copy_of: Stored, make_tiny_model: Callable[..., CSFlow]) -> None:
    """The parent's directory now holds another version (retrained in place): refuse the chain."""
    shutil.rmtree(copy_of.base_dir)
    save_model(copy_of.base_dir, make_tiny_model(seed=7), LITE0_PACKAGE, calibrate(np.arange(5.0), 0.2), {})
    with pytest.raises(ArtifactError, match="names parent version"):
        load_model(copy_of.adapter_dir)


def test_edited_parent_id_detected(copy_of: Stored) -> None:
    rewrite_manifest(copy_of.adapter_dir, rehash=False, parent="0" * 20)
    with pytest.raises(ArtifactError, match="does not match version"):
        load_model(copy_of.adapter_dir)
    rewrite_manifest(copy_of.adapter_dir, rehash=True, parent="0" * 20)  # a consistent forgery
    with pytest.raises(ArtifactError, match="names parent version"):
        load_model(copy_of.adapter_dir)


def test_resolver_finds_a_moved_parent(copy_of: Stored) -> None:
    moved = copy_of.root / "elsewhere" / "v"
    moved.parent.mkdir()
    copy_of.base_dir.rename(moved)
    with pytest.raises(ArtifactError, match="missing"):
        load_model(copy_of.adapter_dir)
    registry = {copy_of.parent.version: moved}
    loaded = load_model(copy_of.adapter_dir, resolver=registry.__getitem__)
    assert loaded.lineage == (copy_of.manifest.version, copy_of.parent.version)
    with pytest.raises(ArtifactError, match="cannot resolve parent"):
        load_model(copy_of.adapter_dir, resolver={}.__getitem__)
    with pytest.raises(ArtifactError, match="names parent version"):
        load_model(copy_of.adapter_dir, resolver=lambda _: copy_of.adapter_dir)


def test_parent_path_edit_is_harmless_and_absent_path_needs_resolver(copy_of: Stored) -> None:
    rewrite_manifest(copy_of.adapter_dir, rehash=False, parent_path=str(copy_of.base_dir.resolve()))
    assert load_model(copy_of.adapter_dir).version == copy_of.manifest.version
    rewrite_manifest(copy_of.adapter_dir, rehash=False, parent_path=None)
    with pytest.raises(ArtifactError, match="no stored location"):
        load_model(copy_of.adapter_dir)


def _forge_delta(directory: Path, tensors: dict[str, Tensor], **changes: Any) -> None:
    """Replace the delta file and make the manifest consistent with it (hash and file sha)."""
    save_file(tensors, directory / DELTA_FILE)
    rewrite_manifest(directory, files={DELTA_FILE: file_sha256(directory / DELTA_FILE)}, **changes)


def test_forged_delta_refused(copy_of: Stored) -> None:
    tensors = load_file(copy_of.adapter_dir / DELTA_FILE)
    _forge_delta(copy_of.adapter_dir, {**tensors, "blocks.9.9.conv.weight": torch.zeros(1)})
    with pytest.raises(ArtifactError, match="does not fit"):
        load_model(copy_of.adapter_dir)
    key = next(k for k in tensors if k.endswith("conv_dw.weight"))
    _forge_delta(copy_of.adapter_dir, {**tensors, key: tensors[key][:1].clone()})
    with pytest.raises(ArtifactError, match="does not fit"):
        load_model(copy_of.adapter_dir)
    _forge_delta(copy_of.adapter_dir, {**tensors, key: tensors[key] + 1.0})  # digest not updated
    with pytest.raises(ArtifactError, match="rebuilt extractor"):
        load_model(copy_of.adapter_dir)


def test_adapter_must_match_parent_model(copy_of: Stored) -> None:
    rewrite_manifest(copy_of.adapter_dir, image_size=256)
    with pytest.raises(ArtifactError, match="image_size differ"):
        load_model(copy_of.adapter_dir)


def test_chain_of_two_adapters(stored: Stored, make_images: Callable[..., Tensor], tmp_path: Path) -> None:
    first = load_model(stored.adapter_dir)
    second = adapt(first, make_images(1, seed=12), AdaptConfig(lr=1e-3, max_steps=1, stop_quantile=None))
    manifest = save_adapter(
        tmp_path / "second", second.model, first, second.block_names, second.summary(), "line-3/dim", stored.adapter_dir
    )
    loaded = load_model(tmp_path / "second")
    assert loaded.lineage == (manifest.version, stored.manifest.version, stored.parent.version)
    want = second.model.extractor.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.model.extractor.state_dict().items())


def test_save_adapter_refuses_changes_outside_the_blocks(stored: Stored) -> None:
    model = stored.result.model
    with pytest.raises(ValueError, match="outside the adapted blocks"):
        save_adapter(stored.root / "x", model, stored.parent, ["blocks.0.0"], {}, "d")
    with pytest.raises(ValueError, match="no extractor tensors"):
        save_adapter(stored.root / "x", model, stored.parent, [*stored.result.block_names, "blocks.9.9"], {}, "d")
    assert not (stored.root / "x").exists()

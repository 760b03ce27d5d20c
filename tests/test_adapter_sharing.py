"""Adapted versions loaded onto their already-loaded base: the base's flow and later extractor blocks are
the same tensors (not copies), the adapted blocks are their own, and the scores are a rebuilt model's."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from adapters.adapt import first_blocks
from csflow.artifacts import ArtifactError, load_adapted, load_model, save_adapter, save_model
from csflow.backbones import LITE0_PACKAGE
from csflow.calibration import calibrate
from csflow.model import CSFlow, image_scores
from csflow.sharing import owner_modules, share_except

N_ADAPTED = 2  # blocks.0.0 and blocks.1.0 of lite0


def storages(module: nn.Module) -> dict[int, int]:
    """data_ptr -> bytes of every parameter and buffer storage the module uses."""
    tensors = [*module.parameters(), *module.buffers()]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def adapted_copy(model: CSFlow, seed: int) -> tuple[CSFlow, list[str]]:
    """`model` with the first blocks' weights moved, as an adaptation would (the flow shared, untouched)."""
    candidate = copy.deepcopy(model, memo={id(model.flow): model.flow})
    blocks = first_blocks(candidate.extractor, N_ADAPTED)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in blocks.values():
            for p in block.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return candidate, list(blocks)


@pytest.fixture(scope="module")
def versions(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """A base version and two adapted versions of it (different adapted weights)."""
    root = tmp_path_factory.mktemp("sharing")
    model = make_tiny_model(seed=3)
    with torch.no_grad():
        calibration = calibrate(image_scores(model(make_images(4, seed=1)).z).numpy(), 0.2)
    save_model(root / "base", model, LITE0_PACKAGE, calibration, {"purpose": "sharing"})
    parent = load_model(root / "base")
    for i in (1, 2):
        candidate, names = adapted_copy(parent.model, seed=i)
        save_adapter(root / f"a{i}", candidate, parent, names, {"i": i}, f"target-{i}", parent_dir=root / "base")
    return root / "base", root / "a1", root / "a2"


def test_two_adapted_versions_share_the_base_and_score_like_rebuilt_models(
    versions: tuple[Path, Path, Path], make_images: Callable[..., Tensor]
) -> None:
    base_dir, a1_dir, a2_dir = versions
    base = load_model(base_dir)
    a1, a2 = load_adapted(a1_dir, base), load_adapted(a2_dir, base)
    assert a1.lineage == (a1.version, base.version) and a1.version == load_model(a1_dir).version

    for adapted in (a1, a2):
        for p, q in zip(adapted.model.flow.parameters(), base.model.flow.parameters(), strict=True):
            assert p.data_ptr() == q.data_ptr()
        later = list(adapted.model.extractor.blocks[-1].parameters())
        assert [p.data_ptr() for p in later] == [p.data_ptr() for p in base.model.extractor.blocks[-1].parameters()]
        first = next(adapted.model.extractor.blocks[0].parameters())
        assert first.data_ptr() != next(base.model.extractor.blocks[0].parameters()).data_ptr()
    assert (
        next(a1.model.extractor.blocks[0].parameters()).data_ptr()
        != next(a2.model.extractor.blocks[0].parameters()).data_ptr()
    )

    images = make_images(3, seed=7)
    with torch.no_grad():
        for adapted, directory in ((a1, a1_dir), (a2, a2_dir)):
            rebuilt = load_model(directory)
            torch.testing.assert_close(image_scores(adapted.model(images).z), image_scores(rebuilt.model(images).z))
        base_scores = image_scores(base.model(images).z)
        assert not torch.allclose(image_scores(a1.model(images).z), base_scores)  # the adapter applied
        torch.testing.assert_close(base_scores, image_scores(load_model(base_dir).model(images).z))  # base intact

    # Memory: the second adapted version adds its adapted blocks' storage, nothing of the flow or trunk.
    alone = storages(base.model)
    together = storages(base.model) | storages(a1.model) | storages(a2.model)
    extra = sum(together.values()) - sum(alone.values())
    adapter = sum(
        t.nbytes for b in first_blocks(base.model.extractor, N_ADAPTED).values() for t in b.state_dict().values()
    )
    assert extra == 2 * adapter, (extra, adapter)
    assert 2 * adapter < sum(alone.values()) / 10


def test_an_adapted_version_must_sit_on_its_own_base(
    versions: tuple[Path, Path, Path], make_tiny_model: Callable[..., CSFlow], tmp_path: Path
) -> None:
    base_dir, a1_dir, _ = versions
    base = load_model(base_dir)
    with pytest.raises(ArtifactError, match="base version"):
        load_adapted(base_dir, base)
    other = make_tiny_model(seed=9)
    save_model(tmp_path / "other", other, LITE0_PACKAGE, base.manifest.threshold_calibration, {"other": 1})
    with pytest.raises(ArtifactError, match="its base is version"):
        load_adapted(a1_dir, load_model(tmp_path / "other"))


def test_share_except_copies_only_the_named_modules() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    copied = share_except(model, owner_modules(["1.1.weight", "1.1.running_mean"]))
    assert copied is not model and copied[1] is not model[1]
    assert copied[0] is model[0] and copied[1][0] is model[1][0]
    assert copied[1][1] is not model[1][1] and copied[1][1].weight.data_ptr() != model[1][1].weight.data_ptr()
    torch.testing.assert_close(copied[1][1].weight, model[1][1].weight)
    with pytest.raises(ValueError, match="no submodule"):
        share_except(model, ["2"])

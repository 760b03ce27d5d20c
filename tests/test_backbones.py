"""Backbones with offline weights, the lukemelas -> timm key mapping, weights digests, the extractor."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from matplotlib import cbook
from PIL import Image
from safetensors.torch import save_file

from csflow.backbones import (
    WeightsError,
    create_backbone,
    lite0_package_weights_path,
    lukemelas_to_timm,
    state_digest,
)
from csflow.extractor import FeatureExtractor
from csflow.weights import LITE0, LITE0_PACKAGE, NO_WEIGHTS, TIMM_HUB, default_weights, resolve_weights

MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's grace_hopper.jpg


def package_state() -> dict[str, torch.Tensor]:
    return torch.load(lite0_package_weights_path(), map_location="cpu", weights_only=True)


def grace_hopper(size: int) -> torch.Tensor:
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(path) as img:
        rgb = np.array(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0).unsqueeze(0)


def test_lite0_package_weights_classify_grace_hopper() -> None:
    model = create_backbone(LITE0, LITE0_PACKAGE).eval()
    assert tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert tuple(model.pretrained_cfg["std"]) == (0.5, 0.5, 0.5)
    x = (grace_hopper(224) - 0.5) / 0.5
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (1, 1000)
    assert int(logits.argmax(dim=1)) == MILITARY_UNIFORM


def test_random_weights_do_not_classify_grace_hopper() -> None:
    """Control for the test above: the pretrained weights, not the image, make the prediction."""
    torch.manual_seed(0)
    model = create_backbone(LITE0, NO_WEIGHTS).eval()
    with torch.no_grad():
        logits = model((grace_hopper(224) - 0.5) / 0.5)
    assert int(logits.argmax(dim=1)) != MILITARY_UNIFORM


def test_lukemelas_mapping_covers_every_timm_key_exactly() -> None:
    model = create_backbone(LITE0, NO_WEIGHTS)
    state = package_state()
    renamed = lukemelas_to_timm(state, model)
    assert len(renamed) == len(state)
    assert set(renamed) == set(model.state_dict())
    for key, tensor in renamed.items():
        assert tensor.shape == model.state_dict()[key].shape, key


def test_lukemelas_mapping_rejects_unknown_key() -> None:
    model = create_backbone(LITE0, NO_WEIGHTS)
    state = package_state()
    state["_something_else.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="_something_else"):
        lukemelas_to_timm(state, model)


def test_lukemelas_mapping_rejects_extra_block() -> None:
    model = create_backbone(LITE0, NO_WEIGHTS)
    n_blocks = sum(len(stage) for stage in model.blocks)
    with pytest.raises(WeightsError, match="block"):
        lukemelas_to_timm({f"_blocks.{n_blocks}._depthwise_conv.weight": torch.zeros(1)}, model)


def test_package_weights_refused_for_other_backbones() -> None:
    with pytest.raises(WeightsError, match=LITE0):
        create_backbone("tf_efficientnet_lite1", LITE0_PACKAGE)


def test_unknown_backbone_name_raises_weights_error() -> None:
    with pytest.raises(WeightsError, match="no_such_net"):
        create_backbone("no_such_net", NO_WEIGHTS)


@pytest.mark.parametrize("name", ["weights.pth", "weights.bin", "weights"])
def test_local_weights_must_be_safetensors(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    torch.save(create_backbone(LITE0, NO_WEIGHTS).state_dict(), path)  # exists, but is a pickle
    with pytest.raises(WeightsError, match="safetensors"):
        create_backbone(LITE0, str(path))


def test_missing_local_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone(LITE0, str(tmp_path / "absent.safetensors"))


def test_safetensors_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_backbone(LITE0, NO_WEIGHTS)
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    loaded = create_backbone(LITE0, str(path))
    expected = source.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


def test_safetensors_weights_that_do_not_fit(tmp_path: Path) -> None:
    state = create_backbone(LITE0, NO_WEIGHTS).state_dict()
    del state["conv_stem.weight"]
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(WeightsError, match="do not fit"):
        create_backbone(LITE0, str(path))


def test_default_weights() -> None:
    assert default_weights(LITE0) == LITE0_PACKAGE
    assert default_weights("tf_efficientnet_b5") == "timm-hub:aa_in1k"  # the original's checkpoint, pinned
    assert default_weights("tf_efficientnet_b0") == TIMM_HUB  # nothing pinned: timm's default tag


def test_hub_weights_are_pinned_to_the_originals_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """B5 from the hub is the AutoAugment checkpoint the original uses, not timm's default (Noisy
    Student), whether the source says `timm-hub` or names the tag; the manifest records the tag."""
    requested: list[tuple[str, bool]] = []
    real = timm.create_model

    def record(name: str, pretrained: bool = False) -> torch.nn.Module:
        requested.append((name, pretrained))
        return real(name, pretrained=False)  # no hub offline; the name is what matters

    monkeypatch.setattr(timm, "create_model", record)
    create_backbone("tf_efficientnet_b5", TIMM_HUB)
    create_backbone("tf_efficientnet_b5", "timm-hub:ns_jft_in1k")
    assert requested == [("tf_efficientnet_b5.aa_in1k", True), ("tf_efficientnet_b5.ns_jft_in1k", True)]
    assert resolve_weights("tf_efficientnet_b5", TIMM_HUB) == "timm-hub:aa_in1k"
    assert resolve_weights(LITE0, LITE0_PACKAGE) == LITE0_PACKAGE


def test_unknown_hub_tag_is_a_weights_error() -> None:
    with pytest.raises(WeightsError, match="bogus"):
        create_backbone("tf_efficientnet_b5", "timm-hub:bogus")


def test_state_digest_identifies_weights() -> None:
    model = create_backbone(LITE0, LITE0_PACKAGE)
    digest = state_digest(model)
    assert len(digest) == 64
    assert state_digest(copy.deepcopy(model)) == digest
    assert state_digest(create_backbone(LITE0, LITE0_PACKAGE)) == digest
    with torch.no_grad():
        model.blocks[3][0].conv_pw.weight[0, 0, 0, 0] += 1e-3
    assert state_digest(model) != digest


def test_state_digest_of_extractor_covers_batchnorm_buffers() -> None:
    extractor = FeatureExtractor(create_backbone(LITE0, LITE0_PACKAGE))
    digest = state_digest(extractor)
    with torch.no_grad():
        extractor.bn1.running_var[0] *= 2
    assert state_digest(extractor) != digest


def test_feature_extractor_shapes() -> None:
    extractor = FeatureExtractor(create_backbone(LITE0, NO_WEIGHTS)).eval()
    assert extractor.out_chs == 192
    with torch.no_grad():
        maps = extractor(torch.rand(2, 3, 128, 128))
    assert [tuple(m.shape) for m in maps] == [(2, 192, 4, 4), (2, 192, 2, 2), (2, 192, 1, 1)]


def test_feature_extractor_normalises_and_rescales_like_the_original() -> None:
    """Scale s is the trunk applied to the normalised image nearest-downsampled by 2**s."""
    extractor = FeatureExtractor(create_backbone(LITE0, LITE0_PACKAGE)).eval()
    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    normalised = (images - 0.5) / 0.5
    with torch.no_grad():
        maps = extractor(images)
        expected = [
            extractor.trunk(normalised),
            extractor.trunk(normalised[:, :, ::2, ::2]),
            extractor.trunk(normalised[:, :, ::4, ::4]),
        ]
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_feature_extractor_uses_backbone_statistics_for_b5() -> None:
    extractor = FeatureExtractor(create_backbone("tf_efficientnet_b5", NO_WEIGHTS))
    assert extractor.out_chs == 304
    torch.testing.assert_close(extractor.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(extractor.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))

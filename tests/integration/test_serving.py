"""Serving pieces against a real Redis: the default version set once, model swaps, drift state resumed."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from test_adapter_sharing import adapted_copy
from test_faults import _metric, _verdict, in_process
from torch import Tensor
from worker_line import Line, frame_headers, get, png, wait_ready

from adapters.adapt import flat_blocks
from csflow.artifacts import FLOW_FILE, Manifest, ModelVersion, load_model, save_adapter, save_model
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
from lab.services import LocalKafka, LocalRedis

KEYS = Keys("t:")
DRIFT = DriftConfig(window=10, ert=200)
REFRESH_S = 0.2
LOAD_RETRY_S = 2.0
N_ADAPTED = 2  # blocks.0.0 and blocks.1.0 of lite0
SLOW_LOAD_S = 5.0
WORKER_LOAD_S = 6.0  # an adapted version's load in the worker test: three times its max_poll_interval_ms


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
    default = registry.active(DEFAULT_SCOPE)
    assert default is not None and registry.history(DEFAULT_SCOPE) == [default]
    for directory in version_dirs:
        served[0].bootstrap(directory)
    assert registry.history(DEFAULT_SCOPE) == [default]


def own_scope(registry: ModelRegistry, camera: str) -> str:
    """The camera's own registry scope (its most specific one)."""
    return registry.scopes(camera)[0]


def follow_until(served: ServedModels, done: Callable[[], bool], timeout: float = 30.0) -> None:
    """Call `follow` between "batches" until `done()` (loads finish in the background)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out following the registry"
        served.follow()
        time.sleep(0.02)


def native_threads() -> int:
    """Threads of this process that Python did not start (OpenMP's, here)."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_a_version_loads_without_an_openmp_team_of_its_own(
    registry: ModelRegistry, version_dirs: list[Path], tmp_path: Path
) -> None:
    """The loader thread outlives its loads, and so would an OpenMP team started on it: more threads for
    libgomp to manage than CPUs, so it stops spinning between the scoring thread's parallel regions."""
    fallback = load_model(version_dirs[0])
    swaps: list[Swap] = []
    torch.set_num_threads(2)  # conftest.py pins one, under which no team is ever started
    try:
        torch.ones(1 << 20).add_(1)  # the scoring thread's own team
        before = native_threads()
        served = ServedModels(registry, tmp_path / "cache", torch.device("cpu"), REFRESH_S, fallback, swaps.append)
        try:
            served.bootstrap(version_dirs[0])
            served.follow()
            served.models(["cam-1"])
            other = registry.publish(version_dirs[1]).version
            registry.activate(own_scope(registry, "cam-1"), other)
            follow_until(served, lambda: len(swaps) == 2)
            assert served.models(["cam-1"])["cam-1"].version == other
            assert native_threads() == before, "the loader thread started OpenMP threads of its own"
            assert torch.get_num_threads() == 2, "the scoring thread lost its threads"
        finally:
            served.close()
    finally:
        torch.set_num_threads(1)


def test_cameras_follow_the_registry_and_keep_serving_when_a_version_cannot_load(
    registry: ModelRegistry, version_dirs: list[Path], tmp_path: Path
) -> None:
    """A version that fails to load leaves the camera on what it served, is reported once, and is tried
    again only after load_retry_s (here the repaired path is found then), not at every refresh."""
    fallback = load_model(version_dirs[0])
    broken = tmp_path / "broken"
    shutil.copytree(version_dirs[1], broken)
    other = registry.publish(broken).version  # registered at a path whose flow then goes missing
    (broken / FLOW_FILE).unlink()
    swaps: list[Swap] = []
    failures: list[str] = []
    served = ServedModels(
        registry,
        tmp_path / "cache",
        torch.device("cpu"),
        REFRESH_S,
        fallback,
        swaps.append,
        on_load_failed=lambda version, error: failures.append(version),
        load_retry_s=LOAD_RETRY_S,
    )
    try:
        served.bootstrap(version_dirs[0])
        served.follow()  # subscribes
        assert served.models(["cam-1"])["cam-1"] is fallback
        registry.activate(own_scope(registry, "cam-1"), other)
        registry.activate(own_scope(registry, "cam-2"), other)
        follow_until(served, lambda: bool(failures))
        assert served.models(["cam-1", "cam-2"]) == {"cam-1": fallback, "cam-2": fallback}
        started = time.monotonic()
        while time.monotonic() - started < 3 * REFRESH_S:  # several refreshes, inside load_retry_s
            served.follow()
            time.sleep(0.02)
        assert failures == [other], "a failed load was retried before load_retry_s"

        registry.publish(version_dirs[1])  # the base's path repaired: no announcement, the retry finds it
        follow_until(served, lambda: len(swaps) == 4)
        assert time.monotonic() - started >= LOAD_RETRY_S - 3 * REFRESH_S
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
        assert failures == [other]
    finally:
        served.close()


def test_a_failed_version_is_tried_again_at_once_when_an_announcement_names_it(
    registry: ModelRegistry, version_dirs: list[Path], tmp_path: Path
) -> None:
    fallback = load_model(version_dirs[0])
    broken = tmp_path / "broken"
    shutil.copytree(version_dirs[1], broken)
    other = registry.publish(broken).version
    (broken / FLOW_FILE).unlink()
    failures: list[str] = []
    served = ServedModels(
        registry,
        tmp_path / "cache",
        torch.device("cpu"),
        3600.0,
        fallback,
        lambda _: None,
        on_load_failed=lambda version, error: failures.append(version),
        load_retry_s=3600.0,
    )
    try:
        served.bootstrap(version_dirs[0])
        served.follow()
        registry.activate(own_scope(registry, "cam-1"), other)
        assert served.models(["cam-1"])["cam-1"] is fallback
        follow_until(served, lambda: bool(failures))
        registry.publish(version_dirs[1])  # repaired, then announced (activated for another camera)
        registry.activate(own_scope(registry, "cam-2"), other)
        follow_until(served, lambda: served.models(["cam-1"])["cam-1"].version == other)
        assert failures == [other]
    finally:
        served.close()


def test_a_redis_outage_while_loading_is_not_a_broken_version(
    registry: ModelRegistry, version_dirs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis failing under the loader is retried after refresh_s and never counted as a load failure."""
    materialise = ModelRegistry.materialise
    calls: list[str] = []

    def flaky(self: ModelRegistry, version: str, cache_dir: str | Path) -> Path:
        calls.append(version)
        if len(calls) == 1:
            raise redis.ConnectionError("Redis went away")
        return materialise(self, version, cache_dir)

    monkeypatch.setattr(ModelRegistry, "materialise", flaky)
    fallback = load_model(version_dirs[0])
    failures: list[str] = []
    served = ServedModels(
        registry,
        tmp_path / "cache",
        torch.device("cpu"),
        REFRESH_S,
        fallback,
        lambda _: None,
        on_load_failed=lambda version, error: failures.append(version),
    )
    try:
        served.bootstrap(version_dirs[0])
        other = registry.publish(version_dirs[1]).version
        registry.activate(own_scope(registry, "cam-1"), other)
        served.follow()
        assert served.models(["cam-1"])["cam-1"] is fallback
        follow_until(served, lambda: served.models(["cam-1"])["cam-1"].version == other)
        assert calls == [other, other] and failures == []
    finally:
        served.close()


def test_a_slow_load_does_not_hold_the_batch(
    registry: ModelRegistry, version_dirs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a camera's version loads (slowly), `models()` answers at once: a new camera gets the default's
    version, a known one keeps its own; the swap comes with the first call after the load is done."""
    import daemon.serving

    load = daemon.serving.load_model
    release = threading.Event()

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        release.wait(SLOW_LOAD_S)  # the old loop would hold the batch this long
        return load(*args, **kwargs)

    monkeypatch.setattr(daemon.serving, "load_model", slow_load)
    fallback = load_model(version_dirs[0])
    swaps: list[Swap] = []
    served = ServedModels(registry, tmp_path / "cache", torch.device("cpu"), REFRESH_S, fallback, swaps.append)
    try:
        served.bootstrap(version_dirs[0])
        other = registry.publish(version_dirs[1]).version
        registry.activate(own_scope(registry, "cam-new"), other)
        started = time.monotonic()
        served.follow()
        models = served.models(["cam-new", "cam-old"])
        assert time.monotonic() - started < 1.0
        assert {c: m.version for c, m in models.items()} == {"cam-new": fallback.version, "cam-old": fallback.version}
        assert served.loading() == {"cam-new": other}
        registry.activate(own_scope(registry, "cam-old"), other)  # a known camera asks for the loading version
        follow_until(served, lambda: "cam-old" in served.loading())
        assert served.models(["cam-old"])["cam-old"] is fallback and served.loading() == {
            "cam-new": other,
            "cam-old": other,
        }
        release.set()
        follow_until(served, lambda: len(swaps) == 4)
        assert {c: m.version for c, m in served.models(["cam-new", "cam-old"]).items()} == {
            "cam-new": other,
            "cam-old": other,
        }
        assert [(s.camera, s.current.version) for s in swaps][-2:] == [("cam-new", other), ("cam-old", other)]
    finally:
        release.set()
        served.close()


def test_adapted_versions_are_built_on_the_loaded_base(
    registry: ModelRegistry,
    version_dirs: list[Path],
    tmp_path: Path,
    make_images: Callable[..., Tensor],
) -> None:
    """Two adapted versions of the served base share its flow and its unadapted extractor blocks (same
    storage), own their adapted blocks, and score as the versions rebuilt from disk."""
    fallback = load_model(version_dirs[0])
    adapted_dirs = []
    for i in (1, 2):
        candidate, names = adapted_copy(fallback.model, seed=i)
        directory = tmp_path / f"adapted{i}"
        save_adapter(directory, candidate, fallback, names, {"i": i}, f"target-{i}", parent_dir=version_dirs[0])
        adapted_dirs.append(directory)
    served = ServedModels(registry, tmp_path / "cache", torch.device("cpu"), REFRESH_S, fallback, lambda _: None)
    try:
        served.bootstrap(version_dirs[0])
        versions = [registry.publish(d).version for d in adapted_dirs]
        for camera, version in zip(["cam-a", "cam-b"], versions, strict=True):
            registry.activate(own_scope(registry, camera), version)
        served.follow()
        follow_until(served, lambda: [m.version for m in served.models(["cam-a", "cam-b"]).values()] == versions)
        models = served.models(["cam-a", "cam-b"])
        assert [models[c].version for c in ("cam-a", "cam-b")] == versions
        base = fallback.model
        for adapted in (models["cam-a"].model, models["cam-b"].model):
            assert data_ptrs(adapted.flow) == data_ptrs(base.flow)
            assert data_ptrs(adapted.extractor.conv_stem) == data_ptrs(base.extractor.conv_stem)
            ours, theirs = flat_blocks(adapted.extractor), flat_blocks(base.extractor)
            for i, name in enumerate(theirs):
                if i < N_ADAPTED:  # the adapted blocks: storage of their own
                    assert not set(data_ptrs(ours[name])) & set(data_ptrs(theirs[name])), name
                else:
                    assert data_ptrs(ours[name]) == data_ptrs(theirs[name]), name
        images = make_images(3, seed=5)
        with torch.no_grad():
            for camera, directory in zip(["cam-a", "cam-b"], adapted_dirs, strict=True):
                rebuilt = load_model(directory).model
                torch.testing.assert_close(
                    image_scores(models[camera].model(images).z), image_scores(rebuilt(images).z)
                )
    finally:
        served.close()


def data_ptrs(module: torch.nn.Module) -> list[int]:
    return [t.data_ptr() for t in [*module.parameters(), *module.buffers()]]


def test_drift_state_is_resumed_for_the_same_version_and_settings_only(client: redis.Redis) -> None:
    rng = np.random.default_rng(0)
    reference = rng.gamma(9.0, 0.1, 60).tolist()
    version = stub_version("v1", reference)
    events = EventLog(client, KEYS, 1000)
    watch = DriftWatch(client, KEYS, events, DRIFT, 3600)
    states = watch.observe("cam-1", version, (3 * rng.gamma(9.0, 0.1, 40)).tolist())
    assert states[0] == "warmup" and states[-1] == "alarm"
    assert list(watch.write(watch.snapshot())) == ["cam-1"] and watch.write(watch.snapshot()) == {}
    assert 0 < client.ttl(KEYS.drift("cam-1")) <= 3600  # a camera that stopped sending does not stay for ever
    assert list(watch.alarms()) == ["cam-1"]

    restarted = DriftWatch(client, KEYS, events, DRIFT, 3600)
    assert restarted.observe("cam-1", version, [0.9]) == ["alarm"]
    assert restarted.write(restarted.snapshot()) == {}  # announced by the worker that raised it
    assert [e.kind for e in events.recent()] == [EventKind.DRIFT_ALARM]

    def first_state(config: DriftConfig, camera: str, v: ModelVersion) -> str:
        return DriftWatch(client, KEYS, events, config, 3600).observe(camera, v, [0.9])[0]

    assert first_state(DRIFT, "cam-1", stub_version("v2", reference)) == "warmup"  # another version
    assert first_state(DriftConfig(window=12, ert=200), "cam-1", version) == "warmup"  # other settings
    assert first_state(DRIFT, "cam-2", stub_version("v3", [1.0, 2.0])) == OFF  # too few calibration scores


# ---------------------------------------------------------------------------------------------- in a worker


def test_a_cold_camera_does_not_stall_the_worker(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A camera whose (adapted) version takes longer to load than max_poll_interval_ms: its frames are
    scored with the default version meanwhile, /healthz stays 200, and once the load is done its verdicts
    name the adapted version. A camera whose version cannot load keeps the default, and the failure is
    counted once (not retried at every refresh). The worker runs in this process so that the load can be
    slowed at the registry's materialise."""
    base = load_model(model_dir)
    candidate, names = adapted_copy(base.model, seed=1)
    save_adapter(tmp_path / "adapted", candidate, base, names, {"cold": 1}, "target", parent_dir=model_dir)
    broken = tmp_path / "broken"
    materialise = ModelRegistry.materialise
    loading = threading.Event()

    def slow_materialise(self: ModelRegistry, version: str, cache_dir: str | Path) -> Path:
        if version == adapted:
            loading.set()
            time.sleep(WORKER_LOAD_S)
        return materialise(self, version, cache_dir)

    monkeypatch.setattr(ModelRegistry, "materialise", slow_materialise)
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        registry = ModelRegistry.from_settings(line.redis, Settings(redis={"key_prefix": line.prefix}))
        registry.publish(model_dir)
        adapted = registry.publish(tmp_path / "adapted").version
        # another base whose flow goes missing after publishing: it cannot load
        save_model(broken, base.model, LITE0_PACKAGE, base.manifest.threshold_calibration, {"broken": 1})
        unloadable = registry.publish(broken).version
        (broken / FLOW_FILE).unlink()
        registry.activate(own_scope(registry, "cam-cold"), adapted)
        registry.activate(own_scope(registry, "cam-bad"), unloadable)
        env = {"INSPECTD_KAFKA__MAX_POLL_INTERVAL_MS": "2000", "INSPECTD_REGISTRY__REFRESH_S": "0.2"}
        try:
            with in_process(line, model_dir, monkeypatch, **env) as running:
                wait_ready(running.port)
                sent = send(line, "cold", "cam-cold", 4) + send(line, "bad", "cam-bad", 4)
                health: set[int] = set()
                deadline = time.monotonic() + 60
                while not all(line.redis.exists(f"{line.prefix}verdict:{f}") for f in sent):
                    assert time.monotonic() < deadline, line.logs()
                    health.add(get(running.port, "/healthz")[0])
                    time.sleep(0.1)
                assert loading.is_set(), "the slow load was not started"
                assert health == {200}, health
                assert {_verdict(line, f)["model_version"] for f in sent} == {base.version}
                ready = json.loads(get(running.port, "/readyz")[1])  # loading is no reason to be unready
                assert ready["ready"] and ready["models"]["loading"].get("cam-cold") == adapted, ready
                while "cam-cold" in running.worker.models.loading():  # the load, still going in the background
                    assert time.monotonic() < deadline, line.logs()
                    health.add(get(running.port, "/healthz")[0])
                    time.sleep(0.1)
                assert health == {200}, health
                later = send(line, "warm", "cam-cold", 4) + send(line, "still-bad", "cam-bad", 2)
                versions = [_verdict(line, f)["model_version"] for f in later]
                assert versions == [adapted] * 4 + [base.version] * 2
                time.sleep(4 * 0.2)  # a few refreshes: the failed version waits for load_retry_s
                assert _metric(running.port, "inspectd_model_load_failures_total") == 1
                ready = json.loads(get(running.port, "/readyz")[1])
                # cam-bad still waits for its version (and is served the default), whose load failed
                assert ready["models"]["loading"] == {"cam-bad": unloadable}, ready
                assert FLOW_FILE in ready["models"]["failed"][unloadable], ready
                assert get(running.port, "/healthz")[0] == 200
        finally:
            line.close()
        assert running.outcome.get("rc") == 0, running.outcome


def send(line: Line, prefix: str, camera: str, n: int) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(n)]
    for i, frame_id in enumerate(ids):
        line.producer.send(line.topic, key=camera.encode(), value=png(i), headers=frame_headers(frame_id, camera))
    line.producer.flush()
    return ids

"""Adaptation cannot race, loop or take scoring down (issue 11, item 6): the controller against real Redis,
with its runs in real child processes.

Most tests replace the child's work (minutes of gradient steps on these CPUs) with a small stand-in
process that waits for the test's go-ahead and hands back a prepared adapter, so that the test decides
when a run ends: a lock that expires during a run, a second worker, an operator's rollback, a worker
killed mid-run. The child's memory bound runs the real job (`python -m daemon.adaptation_job`); the
slow test adapts for real, twice, and checks that the second version is parented on the base.
"""

from __future__ import annotations

import copy
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from PIL import Image

import daemon.controller as controller_module
from csflow.artifacts import ModelVersion, load_model, read_manifest, save_adapter, save_model
from csflow.backbones import LITE0, LITE0_PACKAGE
from csflow.calibration import Calibration
from csflow.fit import build_model
from csflow.flow import FlowConfig
from daemon.config import AdaptSection, RedisSection, RegistrySection, Settings
from daemon.confirmations import AdaptationBuffer
from daemon.controller import AdaptationController
from daemon.events import Event, EventKind, EventLog
from daemon.metrics import WorkerMetrics
from daemon.registry import Fence, ModelRegistry, SupersededError, UnknownVersionError
from daemon.scopes import DEFAULT_SCOPE, camera_scope
from daemon.store import Keys
from lab.services import LocalRedis

CAMERA = "cam-1"
PREFIX = "ac:"
KEYS = Keys(PREFIX)
WAIT_S = 60.0

# The stand-in child: waits for `go` in its job directory, then returns the prepared adapter as accepted
# (or the result's fields given as JSON in a third argument: a refusal has no adapter).
STAND_IN = """
import json, os, pathlib, shutil, sys, time
job, adapter = pathlib.Path(sys.argv[1]), sys.argv[2]
settings_env = sorted(k for k in os.environ if k.startswith("INSPECTD_"))
deadline = time.monotonic() + 60
while not (job / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.02)
result = {"accepted": True, "reasons": ["ok stand-in", f"env {settings_env}"], "figures": {"defect_scores": []},
          "heldout_kind": "shots",
          "summary": {}, "block_names": ["blocks.0.0"], "adapter_version": None}
result.update(json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
if result["accepted"]:
    shutil.copytree(adapter, job / "adapter")
(job / "result.json").write_text(json.dumps(result))
"""


def png(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelVersion]:
    """A tiny model whose threshold no frame reaches (so the slow test's gate accepts), loaded."""
    torch.manual_seed(0)
    model = build_model(LITE0, LITE0_PACKAGE, 128, FlowConfig(hidden_channels=8))
    directory = tmp_path_factory.mktemp("base")
    save_model(directory, model, LITE0_PACKAGE, Calibration(1e6, 0.1, [0.0] * 10, [-1e9] * 10), {"purpose": "test"})
    return directory, load_model(directory)


@dataclass(frozen=True)
class Prepared:
    """An adapter of the base as a child would return it: its directory, and its version loaded."""

    directory: Path
    loaded: ModelVersion

    @property
    def version(self) -> str:
        return self.loaded.version


@pytest.fixture(scope="module")
def adapters(base: tuple[Path, ModelVersion], tmp_path_factory: pytest.TempPathFactory) -> list[Prepared]:
    """Three adapters of the base (block 0 moved by different amounts)."""
    base_dir, parent = base
    made = []
    for i in range(3):
        model = copy.deepcopy(parent.model, memo={id(parent.model.flow): parent.model.flow})
        with torch.no_grad():
            for p in model.extractor.blocks[0][0].parameters():
                p.add_(0.01 * (i + 1))
        directory = tmp_path_factory.mktemp(f"adapter{i}")
        manifest = save_adapter(directory, model, parent, ["blocks.0.0"], {"n": i}, CAMERA, parent_dir=base_dir)
        made.append(Prepared(directory, ModelVersion(model, manifest, (manifest.version, parent.version))))
    return made


class Plant:
    """One Redis, a registry with the base active in `default`, and workers' controllers on it."""

    def __init__(self, server: LocalRedis, base: tuple[Path, ModelVersion], tmp_path: Path, **adapt: object) -> None:
        self.client = server.client()
        self.base_dir, self.base = base
        self.tmp_path = tmp_path
        settings = {"min_shots": 2, "max_shots": 4, "check_interval_s": 0.01, "shadow_frames": 0, "lock_ttl_s": 30.0}
        self.adapt = AdaptSection(**{**settings, **adapt})  # type: ignore[arg-type]
        self.settings = self.settings_for(tmp_path / "cache-0")
        self.registry = ModelRegistry.from_settings(self.client, self.settings)
        self.registry.publish(self.base_dir)
        self.registry.activate(DEFAULT_SCOPE, self.base.version)
        self.buffer = AdaptationBuffer(self.client, KEYS)
        self.confirmed = 0
        self.workers = 0

    def settings_for(self, cache_dir: Path) -> Settings:
        return Settings(
            redis=RedisSection(key_prefix=PREFIX),
            registry=RegistrySection(cache_dir=str(cache_dir)),
            adapt=self.adapt,
        )

    def controller(self) -> tuple[AdaptationController, WorkerMetrics]:
        """A worker's controller, with its own cache directory and metrics."""
        settings = self.settings_for(self.tmp_path / f"cache-{self.workers}")
        self.workers += 1
        metrics = WorkerMetrics()
        registry = ModelRegistry.from_settings(self.client, settings)
        events = EventLog(self.client, KEYS, 10_000)
        return AdaptationController(settings, registry, self.buffer, events, metrics), metrics

    def confirm(self, n: int = 1) -> None:
        """n more operator-confirmed frames of CAMERA in its adaptation buffer, newer than the others."""
        for _ in range(n):
            self.confirmed += 1
            frame_id, ts = f"f{self.confirmed:04d}", 1_700_000_000_000 + self.confirmed
            meta = {"frame_id": frame_id, "camera_id": CAMERA, "operator": "qa", "note": "", "confirmed_ms": ts}
            meta |= {"score": 2.0, "model_version": self.base.version}
            self.client.zadd(KEYS.buffer(CAMERA), {frame_id: ts})
            self.client.hset(KEYS.buffer_data(CAMERA), frame_id, png(self.confirmed))
            self.client.hset(KEYS.buffer_meta(CAMERA), frame_id, json.dumps(meta))

    def events(self, kind: EventKind) -> list[Event]:
        found = [Event.from_fields(f) for _, f in self.client.xrange(KEYS.events)]
        return [e for e in found if e.kind == kind]

    def attempt(self) -> dict:
        raw = self.client.get(KEYS.adapt_attempt(CAMERA))
        assert raw is not None, "no attempt recorded"
        return json.loads(raw)


@pytest.fixture
def plant(redis_server: LocalRedis, base: tuple[Path, ModelVersion], tmp_path: Path) -> Iterator[Plant]:
    made = Plant(redis_server, base, tmp_path)
    yield made
    made.client.close()


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch, adapters: list[Prepared]) -> list[str]:
    """Runs start the stand-in child; each run hands back the next of `adapters` (their versions, in order)."""
    queue = list(adapters)

    def command(directory: Path) -> list[str]:
        return [sys.executable, "-c", STAND_IN, str(directory), str(queue.pop(0).directory)]

    monkeypatch.setattr(controller_module, "command", command)
    return [a.version for a in adapters]


def start(controller: AdaptationController, parent: ModelVersion) -> None:
    deadline = time.monotonic() + WAIT_S
    while controller.running is None:
        assert time.monotonic() < deadline, "the run did not start"
        controller.step({CAMERA: parent})


def go(controller: AdaptationController) -> None:
    assert controller.running is not None
    (controller.running.directory / "go").touch()


def finish(controller: AdaptationController, parent: ModelVersion) -> None:
    deadline = time.monotonic() + WAIT_S
    while controller.running is not None:
        assert time.monotonic() < deadline, "the run did not end"
        controller.step({CAMERA: parent})
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------ the fence


@pytest.mark.parametrize("stale_first", [True, False], ids=["stale-run-ends-first", "stale-run-ends-last"])
def test_two_workers_after_a_lock_expiry_activate_exactly_once(
    plant: Plant, stand_in: list[str], stale_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INSPECTD_REDIS__URL", "redis://:secret@redis:6379/0")  # the child must not inherit it
    plant.confirm(2)
    first, first_metrics = plant.controller()
    start(first, plant.base)
    # the first worker stalls past the lock's expiry (deleted here, as its expiry would); an operator confirms
    # one more frame, and a second worker takes the free lock for the newer frames
    plant.client.delete(KEYS.adapt_lock(CAMERA))
    plant.confirm()
    second, _ = plant.controller()
    start(second, plant.base)
    assert int(second.running.token) > int(first.running.token)  # type: ignore[union-attr]

    order = [first, second] if stale_first else [second, first]
    for controller in order:
        go(controller)
        finish(controller, plant.base)

    accepted = plant.events(EventKind.ADAPTATION_ACCEPTED)
    superseded = plant.events(EventKind.ADAPTATION_SUPERSEDED)
    assert [e.version for e in accepted] == [stand_in[1]], "exactly the lock holder's result is activated"
    assert "env []" in accepted[0].detail["reasons"], "the child inherited the worker's INSPECTD_* settings"
    assert [e.version for e in superseded] == [stand_in[0]]
    assert "lock" in superseded[0].detail["reason"] or "served" in superseded[0].detail["reason"]
    activated = [e.version for e in plant.events(EventKind.VERSION_ACTIVATED) if e.scope == camera_scope(CAMERA)]
    assert activated == [plant.base.version, stand_in[1]]  # the pin to the parent, then the one result
    assert plant.registry.active(CAMERA) == stand_in[1]
    assert first_metrics.adaptations.labels("superseded")._value.get() == 1
    assert plant.attempt()["status"] == "accepted", "the stale run must not overwrite the newer attempt's record"


@pytest.mark.parametrize("action", ["rollback", "activate"])
def test_an_operators_change_during_a_run_wins(
    plant: Plant, stand_in: list[str], adapters: list[Prepared], action: str
) -> None:
    parent = plant.base
    if action == "rollback":  # the line serves an adapted version; the operator rolls the plant back meanwhile
        plant.registry.publish(adapters[2].directory)
        plant.registry.activate(DEFAULT_SCOPE, adapters[2].version)
        parent = adapters[2].loaded
    plant.confirm(2)
    controller, metrics = plant.controller()
    start(controller, parent)
    if action == "rollback":
        plant.registry.rollback(DEFAULT_SCOPE, author="operator")
    else:
        plant.registry.publish(adapters[2].directory)
        plant.registry.activate(camera_scope(CAMERA), adapters[2].version, author="operator")
    operators = plant.registry.active(CAMERA)
    go(controller)
    finish(controller, parent)

    assert plant.registry.active(CAMERA) == operators, "the run's result replaced the operator's choice"
    assert not plant.events(EventKind.ADAPTATION_ACCEPTED)
    [superseded] = plant.events(EventKind.ADAPTATION_SUPERSEDED)
    assert f"no longer {parent.version}" in superseded.detail["reason"]
    assert metrics.adaptations.labels("superseded")._value.get() == 1
    assert plant.attempt()["status"] == "superseded"


def test_the_fence_is_checked_in_the_activating_transaction(plant: Plant, adapters: list[Prepared]) -> None:
    """The registry alone: a token that is not the lock's, or a camera that moved on, changes nothing."""
    plant.registry.publish(adapters[0].directory)
    lock = KEYS.adapt_lock(CAMERA)
    plant.client.set(lock, "8")
    scope = camera_scope(CAMERA)
    with pytest.raises(SupersededError, match="held by token 8"):
        plant.registry.activate_fenced(scope, adapters[0].version, Fence(lock, "7", CAMERA, plant.base.version))
    with pytest.raises(SupersededError, match="no longer"):
        plant.registry.activate_fenced(scope, adapters[0].version, Fence(lock, "8", CAMERA, adapters[1].version))
    assert plant.registry.active(CAMERA) == plant.base.version and not plant.registry.history(scope)
    plant.registry.activate_fenced(scope, adapters[0].version, Fence(lock, "8", CAMERA, plant.base.version))
    assert plant.registry.history(scope) == [adapters[0].version, plant.base.version]  # pinned, then activated


# ------------------------------------------------------------------------------------------ attempts and failures


def test_the_attempt_is_recorded_before_the_run_so_a_killed_worker_is_not_retried(
    plant: Plant, stand_in: list[str]
) -> None:
    plant.confirm(3)
    first, _ = plant.controller()
    start(first, plant.base)
    record = plant.attempt()
    assert record["status"] == "running" and record["newest_frame_id"] == "f0003"
    # the worker is OOM-killed mid-run: its child and its lock renewal die with it, the lock expires
    run = first.running
    assert run is not None
    run.process.kill()  # type: ignore[union-attr]
    run._released.set()
    plant.client.delete(KEYS.adapt_lock(CAMERA))

    second, metrics = plant.controller()
    for _ in range(5):
        second.step({CAMERA: plant.base})
        time.sleep(0.02)
    assert second.running is None, "another worker retried the frames the killed worker was adapting on"
    assert metrics.adaptations.labels("started")._value.get() == 0
    plant.confirm()  # a newer confirmation: a new attempt
    start(second, plant.base)
    assert plant.attempt()["newest_frame_id"] == "f0004"
    second.close()
    assert plant.attempt()["status"] == "failed"  # a stop during the run is recorded too
    assert "the worker stopped" in plant.events(EventKind.ADAPTATION_FAILED)[-1].detail["reason"]


class Killed(BaseException):
    """The worker process dying at this point (as SIGKILL would: nothing after it runs)."""


def test_a_worker_killed_between_publish_and_activate_leaves_nothing_active_and_no_retry(
    plant: Plant, stand_in: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    plant.confirm(2)
    first, _ = plant.controller()
    start(first, plant.base)

    def killed(*args: object, **kwargs: object) -> None:
        raise Killed

    monkeypatch.setattr(first.registry, "activate_fenced", killed)
    go(first)
    with pytest.raises(Killed):
        finish(first, plant.base)
    assert plant.registry.registered(stand_in[0]), "the candidate was published before the kill"
    assert plant.registry.active(CAMERA) == plant.base.version and not plant.events(EventKind.ADAPTATION_ACCEPTED)
    plant.client.delete(KEYS.adapt_lock(CAMERA))  # expired (the kill freed nothing)

    second, _ = plant.controller()
    for _ in range(5):
        second.step({CAMERA: plant.base})
        time.sleep(0.02)
    assert second.running is None, "the killed worker's frames were tried again"
    plant.confirm()
    start(second, plant.base)
    go(second)
    finish(second, plant.base)
    assert plant.registry.active(CAMERA) == stand_in[1]
    assert [e.version for e in plant.events(EventKind.ADAPTATION_ACCEPTED)] == [stand_in[1]]


def test_an_outage_while_a_result_is_taken_up_frees_the_scope(plant: Plant, stand_in: list[str]) -> None:
    """The worker retries the step after an outage; the run is given up, and its lock not renewed for ever."""
    plant.confirm(2)
    controller, _ = plant.controller()
    start(controller, plant.base)
    plant.client.delete(KEYS.events)
    plant.client.set(KEYS.events, "not a stream")  # every event append now fails (WRONGTYPE)
    go(controller)
    with pytest.raises(redis.ResponseError):
        finish(controller, plant.base)
    assert controller.running is None
    assert not plant.client.exists(KEYS.adapt_lock(CAMERA)), "the lock is still held (and renewed)"
    assert plant.attempt()["status"] == "running"  # given up: these frames are not tried again


@pytest.mark.parametrize("how", ["sigkill", "timeout"])
def test_a_child_that_dies_or_hangs_is_a_failed_attempt(
    redis_server: LocalRedis, base: tuple[Path, ModelVersion], tmp_path: Path, stand_in: list[str], how: str
) -> None:
    plant = Plant(redis_server, base, tmp_path, run_timeout_s=60.0 if how == "sigkill" else 0.5)
    plant.confirm(2)
    controller, metrics = plant.controller()
    start(controller, plant.base)
    if how == "sigkill":  # as the kernel's OOM killer would
        controller.running.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    finish(controller, plant.base)

    [failed] = plant.events(EventKind.ADAPTATION_FAILED)
    assert ("killed by SIGKILL" if how == "sigkill" else "run_timeout_s") in failed.detail["reason"]
    assert plant.attempt()["status"] == "failed"
    assert metrics.adaptations.labels("failed")._value.get() == 1
    assert metrics.adaptation_seconds._sum.get() > 0
    assert plant.registry.active(CAMERA) == plant.base.version
    assert not plant.client.exists(KEYS.adapt_lock(CAMERA)), "the scope was not freed"
    plant.client.close()


def test_a_child_out_of_memory_fails_alone_and_is_not_retried(
    redis_server: LocalRedis, base: tuple[Path, ModelVersion], tmp_path: Path
) -> None:
    """The real job under a memory bound too small for it: the child fails, the controller goes on."""
    plant = Plant(redis_server, base, tmp_path, max_memory_mb=200)
    plant.confirm(2)
    controller, metrics = plant.controller()
    start(controller, plant.base)
    finish(controller, plant.base)

    [failed] = plant.events(EventKind.ADAPTATION_FAILED)
    assert "out of memory" in failed.detail["reason"], failed.detail["reason"]
    assert metrics.adaptations.labels("failed")._value.get() == 1
    assert plant.attempt()["status"] == "failed"
    for _ in range(5):
        controller.step({CAMERA: plant.base})
        time.sleep(0.02)
    assert controller.running is None and metrics.adaptations.labels("started")._value.get() == 1
    plant.client.close()


def test_the_child_is_the_oom_killers_first_choice() -> None:
    """Should the container run out of memory before the child's bound, the kernel kills the child."""
    code = "import daemon.adaptation_job as j; j.prefer_as_oom_victim(); print(open('/proc/self/oom_score_adj').read())"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(found) == 1000


# ------------------------------------------------------------------------------------------ the real job


@pytest.mark.slow
def test_adapting_an_adapted_version_parents_the_adapter_on_the_base(
    redis_server: LocalRedis, base: tuple[Path, ModelVersion], tmp_path: Path
) -> None:
    """Two real runs: the second adapts the first's version, and its adapter's parent is the base."""
    plant = Plant(
        redis_server, base, tmp_path, max_steps=1, lr=1e-3, min_defect_detection=0.0, max_memory_mb=0, n_blocks=2
    )
    plant.confirm(2)
    controller, metrics = plant.controller()
    start(controller, plant.base)
    finish(controller, plant.base)
    [first] = plant.events(EventKind.ADAPTATION_ACCEPTED)
    cache = Path(controller.settings.registry.cache_dir)
    adapted = load_model(plant.registry.materialise(first.version, cache))
    assert adapted.manifest.parent == plant.base.version

    plant.confirm(2)  # newer frames, and the camera now serves the adapted version
    controller._next_check = 0.0
    start(controller, adapted)
    finish(controller, adapted)
    second = plant.events(EventKind.ADAPTATION_ACCEPTED)[-1]
    assert second.version != first.version and second.detail["parent"] == first.version
    manifest = plant.registry.manifest(second.version)
    assert manifest.parent == plant.base.version, "the chain grew: adapter of an adapter"
    assert manifest.summary["adapted_from"] == first.version
    loaded = load_model(plant.registry.materialise(second.version, cache))
    assert loaded.lineage == (second.version, plant.base.version)
    assert plant.registry.active(CAMERA) == second.version
    assert read_manifest(cache / second.version).parent == plant.base.version
    assert metrics.adaptations.labels("accepted")._value.get() == 2
    plant.client.close()


# ------------------------------------------------------------------------------------------ recalibration

SHADOW_FRAMES = 120
# the gate's synthetic defects, scored far above any threshold here by the parent (and by the candidate)
DEFECTS = {"defect_scores": [50.0] * 8, "parent_defect_scores": [50.0] * 8}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelVersion]:
    """A tiny model with a calibration a shadow can carry: normal scores around 1, a threshold above them,
    and the sensitivity reference of a source model."""
    torch.manual_seed(0)
    model = build_model(LITE0, LITE0_PACKAGE, 128, FlowConfig(hidden_channels=8))
    scores = sorted(np.random.default_rng(0).normal(1.0, 0.1, 200).tolist())
    calibration = Calibration(1.3, 0.01, scores, sorted(s * 10 for s in scores), {"0.5": 0.5, "1": 0.9})
    directory = tmp_path_factory.mktemp("calibrated")
    save_model(directory, model, LITE0_PACKAGE, calibration, {"purpose": "test"})
    return directory, load_model(directory)


def refusing_stand_in(monkeypatch: pytest.MonkeyPatch, adapters: list[Prepared], result: dict) -> None:
    """Runs start the stand-in child with these result fields (e.g. a refusal)."""

    def command(directory: Path) -> list[str]:
        return [sys.executable, "-c", STAND_IN, str(directory), str(adapters[0].directory), json.dumps(result)]

    monkeypatch.setattr(controller_module, "command", command)


def feed_darker_line(controller: AdaptationController, nll: float = 10.0, seed: int = 1) -> None:
    """The shadow's frames of a line whose normal scores moved from about 1 to about 2.5 (the parent flags
    all of them at 1.3) with the same shape. The parent's probes score far above its frames; a candidate is
    blind (its probes score as its frames). `nll`: the parent's NLL of each frame (NaN: not measured).
    Without a candidate, the parent's columns stand for the candidate's, as the worker passes them."""
    assert controller.shadow is not None
    rng = np.random.default_rng(seed)
    parent = (2.5 + 1.5 * rng.normal(0.0, 0.1, SHADOW_FRAMES)).tolist()
    probes = [[s + 20.0, s + 40.0] for s in parent]
    nlls = [nll] * SHADOW_FRAMES
    if controller.shadow[1] is None:
        controller.observe_shadow(parent, parent, nlls, probes, probes, nlls)
    else:
        candidate = [s - 1.0 for s in parent]
        controller.observe_shadow(parent, candidate, [5.0] * SHADOW_FRAMES, [[c, c] for c in candidate], probes, nlls)


def conclude(controller: AdaptationController, parent: ModelVersion) -> None:
    deadline = time.monotonic() + WAIT_S
    while controller.shadow is not None:
        assert time.monotonic() < deadline, "the shadow did not conclude"
        controller.step({CAMERA: parent})


@pytest.mark.parametrize("refused", ["offline", "in-shadow"])
def test_a_refused_candidates_parent_recalibrated_by_the_shadow_is_activated(
    redis_server: LocalRedis,
    calibrated: tuple[Path, ModelVersion],
    adapters: list[Prepared],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    refused: str,
) -> None:
    """The line needs a new operating point, not new weights: with [adapt] recalibrate, the parent passes
    the shadow's checks on its own columns and a version with its weights and the new threshold and drift
    reference is activated in the camera's scope."""
    plant = Plant(redis_server, calibrated, tmp_path, shadow_frames=SHADOW_FRAMES, recalibrate=True)
    result = {"accepted": refused == "in-shadow", "figures": DEFECTS}
    refusing_stand_in(monkeypatch, adapters, result)
    plant.confirm(2)
    controller, _ = plant.controller()
    start(controller, plant.base)
    go(controller)
    finish(controller, plant.base)
    assert controller.shadow is not None, "no shadow started"
    camera, candidate = controller.shadow
    assert camera == CAMERA and (candidate is None) == (refused == "offline")
    [shadow] = plant.events(EventKind.ADAPTATION_SHADOW)
    assert shadow.detail["shadowed"] == ("parent" if refused == "offline" else "adapted")
    feed_darker_line(controller)
    conclude(controller, plant.base)

    [accepted] = plant.events(EventKind.ADAPTATION_ACCEPTED)
    assert accepted.detail["recalibrated"] is True
    reasons = accepted.detail["reasons"]
    assert any(r.startswith("ok recalibration flags") for r in reasons), reasons
    if refused == "in-shadow":
        assert any(r.startswith("FAIL shadow sensitivity") for r in reasons), "the candidate's refusal is not reported"
    assert plant.registry.active(CAMERA) == accepted.version
    manifest = plant.registry.manifest(accepted.version)
    assert manifest.summary["recalibrated_from"] == plant.base.version
    assert manifest.backbone_sha256 == plant.base.manifest.backbone_sha256, "the weights are not the parent's"
    calibration = manifest.threshold_calibration
    assert 2.5 < calibration.threshold == accepted.detail["figures"]["recalibration"]["threshold"]
    assert len(calibration.scores) > SHADOW_FRAMES * 0.9 and np.median(calibration.scores) > 2.0
    loaded = load_model(plant.registry.materialise(accepted.version, tmp_path / "check"))
    assert loaded.threshold == calibration.threshold
    assert not plant.events(EventKind.ADAPTATION_REJECTED)
    plant.client.close()


@pytest.mark.parametrize("case", ["off", "parent-refused"])
def test_no_recalibration_without_the_setting_or_without_the_parents_evidence(
    redis_server: LocalRedis,
    calibrated: tuple[Path, ModelVersion],
    adapters: list[Prepared],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    """Off, a candidate refused offline ends the attempt there; on, a parent whose NLLs were not measured
    (its shadow pass failed) is refused like a candidate, and nothing is activated."""
    plant = Plant(redis_server, calibrated, tmp_path, shadow_frames=SHADOW_FRAMES, recalibrate=case != "off")
    refusing_stand_in(monkeypatch, adapters, {"accepted": False, "figures": DEFECTS})
    plant.confirm(2)
    controller, _ = plant.controller()
    start(controller, plant.base)
    go(controller)
    finish(controller, plant.base)
    if case == "off":
        assert controller.shadow is None and not plant.events(EventKind.ADAPTATION_SHADOW)
    else:
        feed_darker_line(controller, nll=float("nan"))
        conclude(controller, plant.base)
    [rejected] = plant.events(EventKind.ADAPTATION_REJECTED)
    if case != "off":
        assert any(r.startswith("FAIL recalibration finite") for r in rejected.detail["reasons"])
    assert not plant.events(EventKind.ADAPTATION_ACCEPTED)
    assert plant.registry.active(CAMERA) == plant.base.version
    assert plant.attempt()["status"] == "rejected"
    plant.client.close()


def test_a_camera_keeps_only_its_newest_refused_candidates(
    redis_server: LocalRedis,
    calibrated: tuple[Path, ModelVersion],
    adapters: list[Prepared],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each attempt refused in its shadow keeps its candidate (each holds its tensors in Redis); with
    [adapt] max_kept_refused = 1 the second attempt's removes the first's from the registry and from the
    worker's cache, recorded as version_removed, and the removed one can no longer be activated."""
    plant = Plant(redis_server, calibrated, tmp_path, shadow_frames=SHADOW_FRAMES, max_kept_refused=1)
    refusing_stand_in(monkeypatch, adapters, {"accepted": True, "figures": DEFECTS})
    controller, _ = plant.controller()
    kept = []
    for attempt in range(2):
        plant.confirm(2)  # newer frames: the camera is tried again
        controller._next_check = 0.0
        start(controller, plant.base)
        go(controller)
        finish(controller, plant.base)
        feed_darker_line(controller, seed=attempt)  # other frames: another operating point, another version
        conclude(controller, plant.base)
        kept.append(plant.events(EventKind.ADAPTATION_REJECTED)[-1].detail["candidate"])
    first, second = kept
    assert first != second and plant.registry.registered(second)
    assert not plant.registry.registered(first) and first not in plant.registry.versions()
    [removed] = plant.events(EventKind.VERSION_REMOVED)
    assert (removed.scope, removed.version) == (CAMERA, first)
    cache = tmp_path / "cache-0"
    assert not (cache / first).exists() and (cache / second).is_dir()
    with pytest.raises(UnknownVersionError):
        plant.registry.activate(camera_scope(CAMERA), first, force=True)
    assert plant.registry.active(CAMERA) == plant.base.version
    plant.client.close()

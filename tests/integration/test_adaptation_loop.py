"""The adaptation loop end to end: real Tansu broker, real Redis, `inspectd run` worker processes.

A tiny flow is trained on smooth synthetic images (the "source domain"); the line then switches to the same
kind of parts seen through a noisy sensor (`adapters.shifts` 'noise'), which pushes every normal frame over
the threshold. The workers raise a drift alarm, an operator confirms a few frames with `inspectd confirm`,
one worker adapts, the gate accepts, and every worker switches to the new version; `inspectd models
rollback` switches them back. A candidate the gate refuses changes nothing and is not retried on the same
frames; one refused in shadow is kept, never activated by the worker, for an operator to force. Drift
settings are small (20-frame window, ERT 400) so that alarms come within a few dozen frames.

Frames of the one camera are spread over all partitions on purpose, so that both workers serve it (in
production a camera's frames share a partition, keyed by camera id).
"""

from __future__ import annotations

import io
import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import test_worker
import torch
from PIL import Image
from torch import Tensor
from worker_line import PARTITIONS, Line, frame_headers, get, wait_ready

from adapters.shifts import SHIFTS
from cli.main import main
from csflow.artifacts import load_model, read_manifest, save_model
from csflow.backbones import LITE0, LITE0_PACKAGE
from csflow.calibration import PROBE_REVISION, calibrate
from csflow.data import to_tensor
from csflow.fit import build_model, probe_reference
from csflow.flow import FlowConfig
from csflow.training import TrainConfig, extract_features, features_scores_and_nll, train_flow
from daemon.events import Event, EventKind
from lab.services import LocalKafka, LocalRedis

broker = test_worker.broker
CAMERA = "cam-1"
SHIFT = SHIFTS["noise"]
SHOTS = 6
TIMEOUT_S = 120.0
LOOP_ENV = {
    "INSPECTD_DRIFT__WINDOW": "20",
    "INSPECTD_DRIFT__ERT": "400",
    "INSPECTD_ADAPT__MIN_SHOTS": str(SHOTS),
    "INSPECTD_ADAPT__CHECK_INTERVAL_S": "0.5",
    # The shadow: the adapting worker sees half of the camera's frames here (two workers share its partitions).
    "INSPECTD_ADAPT__SHADOW_FRAMES": "16",
    # An 8-channel flow trained for seconds misses some of the gate's synthetic defects even before adapting.
    "INSPECTD_ADAPT__MIN_DEFECT_DETECTION": "0.5",
    # On this toy flow the noise-shifted shots reach the calibration median NLL after ~8 steps while their
    # scores are still far above the threshold (measured offline on 64 frames: 33 % of shifted normals
    # flagged after adapting, gate rejects); stopped at the median score: 11 %, accepted.
    "INSPECTD_ADAPT__STOP_ON": "score",
}


def to_uint8(images: Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def trained_dir(make_images: Callable[..., Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny flow trained on 32 smooth images and calibrated on 40 others (enough for a drift reference)."""
    torch.manual_seed(0)
    model = build_model(LITE0, LITE0_PACKAGE, 128, FlowConfig(hidden_channels=8)).eval()
    device = torch.device("cpu")

    def decoded(n: int, seed: int) -> Tensor:
        return torch.stack([to_tensor(x, 128) for x in to_uint8(make_images(n, seed))])  # as decoded from PNG

    held_out_images = decoded(40, 101)
    train, held_out = (
        extract_features(model, [decoded(32, 100)], device),
        extract_features(model, [held_out_images], device),
    )
    # a fresh flow is the identity (as the original): 40 epochs at 5e-3 make it a usable density model
    train_flow(model, train, held_out, TrainConfig(epochs=40, batch_size=8, lr=5e-3, eval_every=5), device)
    scores, nll = features_scores_and_nll(model, held_out, 8, device)
    calibration = calibrate(scores.numpy(), 0.05, nll.numpy())
    calibration = replace(calibration, probe_detection=probe_reference(model, [held_out_images], calibration.threshold))
    out = tmp_path_factory.mktemp("trained")
    save_model(out, model, LITE0_PACKAGE, calibration, {"purpose": "adaptation loop tests"})
    return out


class Loop:
    """A `Line` whose frames all come from one camera, spread over every partition, with event helpers."""

    def __init__(self, line: Line, make_images: Callable[..., Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
        self.line = line
        self.make_images = make_images
        self.sent = 0
        line.env.update(LOOP_ENV)
        for key in ("INSPECTD_REDIS__URL", "INSPECTD_REDIS__KEY_PREFIX"):
            monkeypatch.setenv(key, line.env[key])  # for `inspectd confirm` and `inspectd models` in-process

    def start_workers(self, n: int) -> list[int]:
        ports = []
        for i in range(n):
            self.line.env["INSPECTD_REGISTRY__CACHE_DIR"] = str(self.line.tmp_path / f"cache-{i}")
            ports.append(self.line.start_worker()[1])
        for port in ports:
            wait_ready(port)
        return ports

    def send(self, n: int, shifted: bool) -> list[str]:
        """n new normal parts (seeded by their index), through the shifted sensor or not; waits for verdicts."""
        images = to_uint8(self.make_images(n, seed=1000 + self.sent))
        ids = []
        for image in images:
            frame_id = f"f{self.sent:05d}"
            buffer = io.BytesIO()
            Image.fromarray(SHIFT(image) if shifted else image).save(buffer, format="PNG")
            self.line.producer.send(
                self.line.topic,
                value=buffer.getvalue(),
                partition=self.sent % PARTITIONS,
                headers=frame_headers(frame_id, CAMERA),
            )
            ids.append(frame_id)
            self.sent += 1
        self.line.producer.flush()
        self.line.wait_verdicts(self.sent, timeout=TIMEOUT_S)
        return ids

    def verdicts(self, ids: list[str]) -> list[dict]:
        return [json.loads(self.line.redis.get(f"{self.line.prefix}verdict:{i}")) for i in ids]

    def events(self, kind: EventKind | None = None) -> list[Event]:
        found = [Event.from_fields(f) for _, f in self.line.redis.xrange(f"{self.line.prefix}events")]
        return [e for e in found if kind is None or e.kind == kind]

    def wait_event(self, kind: EventKind, count: int = 1) -> Event:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            found = self.events(kind)
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.2)
        raise AssertionError(f"no {kind} event #{count} within {TIMEOUT_S} s: {self.events()}\n{self.line.logs()}")

    def send_until(self, *kinds: EventKind, chunk: int = 8, max_frames: int = 160) -> list[str]:
        """Shifted frames, a chunk at a time, until an event of one of `kinds` appears."""
        ids: list[str] = []
        while not any(self.events(kind) for kind in kinds):
            assert len(ids) < max_frames, f"no {kinds} event after {len(ids)} frames\n{self.line.logs()}"
            ids += self.send(chunk, shifted=True)
        return ids

    def shift_until_alarm(self, chunk: int = 16, max_frames: int = 160) -> list[str]:
        ids: list[str] = []
        while not self.events(EventKind.DRIFT_ALARM):
            assert len(ids) < max_frames, f"no drift alarm after {len(ids)} shifted frames\n{self.line.logs()}"
            ids += self.send(chunk, shifted=True)
        return ids

    def served(self, port: int) -> str | None:
        """The version a worker's /metrics says it serves CAMERA."""
        text = get(port, "/metrics")[1].decode()
        found = re.search(rf'inspectd_model_info{{camera_id="{CAMERA}",version="(\w+)"}}', text)
        return found.group(1) if found else None

    def wait_served(self, ports: list[int], version: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if all(self.served(port) == version for port in ports):
                return
            time.sleep(0.2)
        raise AssertionError(f"not every worker serves {version}: {[self.served(p) for p in ports]}")


@contextmanager
def running_loop(
    broker: LocalKafka,
    source: Path,
    tmp_path: Path,
    make_images: Callable[..., Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Loop]:
    """A `Loop` on its own Redis, whose workers serve the model in `source`."""
    with LocalRedis() as server:
        line = Line(broker, server.url, source, tmp_path)
        try:
            yield Loop(line, make_images, monkeypatch)
        finally:
            line.close()


@pytest.fixture
def loop(
    broker: LocalKafka,
    trained_dir: Path,
    tmp_path: Path,
    make_images: Callable[..., Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Loop]:
    with running_loop(broker, trained_dir, tmp_path, make_images, monkeypatch) as running:
        yield running


@pytest.fixture(scope="module")
def stale_probe_dir(trained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained model with its sensitivity reference marked as measured by an older probe: every candidate
    then fails the shadow's sensitivity check, and only that check (the offline gate does not use the probe)."""
    version = load_model(trained_dir)
    calibration = replace(version.manifest.threshold_calibration, probe_revision=PROBE_REVISION - 1)
    out = tmp_path_factory.mktemp("stale-probe")
    save_model(out, version.model, LITE0_PACKAGE, calibration, {"purpose": "a candidate refused in shadow"})
    return out


def false_positive_rate(verdicts: list[dict]) -> float:
    return float(np.mean([v["anomalous"] for v in verdicts]))


def test_shift_is_adapted_to_by_every_worker_and_rolled_back(loop: Loop, trained_dir: Path) -> None:
    base = read_manifest(trained_dir).version
    ports = loop.start_workers(2)
    assert [e.scope for e in loop.events(EventKind.VERSION_ACTIVATED)] == ["default"]  # two bootstraps, one default

    source = loop.verdicts(loop.send(32, shifted=False))
    assert {v["model_version"] for v in source} == {base}
    assert not loop.events(EventKind.DRIFT_ALARM), "false drift alarm on the source domain"

    shifted = loop.verdicts(loop.shift_until_alarm())
    alarm = loop.wait_event(EventKind.DRIFT_ALARM)
    assert alarm.scope == CAMERA and alarm.version == base and alarm.detail["state"] == "alarm"
    assert {v["drift_state"] for v in source} <= {"warmup", "ok"}
    assert any(v["drift_state"] == "alarm" for v in shifted)

    confirmed = [v["frame_id"] for v in shifted[:SHOTS]]  # the same images on every run: a reproducible candidate
    assert main(["confirm", *confirmed, "--operator", "qa", "--note", "new sensor"]) == 0
    started = loop.wait_event(EventKind.ADAPTATION_STARTED)
    assert started.scope == CAMERA and sorted(started.detail["frame_ids"]) == sorted(confirmed)
    shadow = loop.wait_event(EventKind.ADAPTATION_SHADOW)
    assert shadow.scope == CAMERA and shadow.version == base and shadow.detail["frames"] == 16
    # The candidate earns its activation on the camera's own frames, scored beside the parent, whose verdicts
    # stand meanwhile; it gets its own threshold there.
    in_shadow = loop.verdicts(loop.send_until(EventKind.ADAPTATION_ACCEPTED, EventKind.ADAPTATION_REJECTED))
    assert in_shadow[0]["model_version"] == base and len(in_shadow) >= 16  # the parent's verdicts stand meanwhile
    accepted = loop.wait_event(EventKind.ADAPTATION_ACCEPTED)
    adapted = accepted.version
    on_line = accepted.detail["figures"]["shadow"]
    assert on_line["frames_seen"] == 16 and on_line["candidate_flag_rate"] <= on_line["parent_flag_rate"]
    assert any(r.startswith("ok shadow stable") for r in accepted.detail["reasons"])
    assert any(r.startswith("ok shadow sensitivity") for r in accepted.detail["reasons"]), accepted.detail["reasons"]
    manifest = read_manifest(next(loop.line.tmp_path.glob(f"cache-*/{adapted}")))
    assert manifest.calibration["threshold"] == on_line["threshold"]  # its own operating point, not the parent's
    assert len(manifest.calibration["scores"]) >= 12  # its drift reference: the live frames it did not flag
    assert accepted.detail["parent"] == base and accepted.detail["figures"]["candidate_false_reject_rate"] == 0.0
    activated = [e for e in loop.events(EventKind.VERSION_ACTIVATED) if e.scope == f"camera:{CAMERA}"]
    assert [e.version for e in activated] == [base, adapted]  # the camera pinned to its parent, then switched
    loop.wait_served(ports, adapted)

    after = loop.verdicts(loop.send(32, shifted=True))
    assert {v["model_version"] for v in after} == {adapted}, "a worker still scores with the old version"
    fpr = {"source": false_positive_rate(source), "shifted": false_positive_rate(shifted)}
    fpr["adapted"] = false_positive_rate(after)
    print(
        f"false-positive rates: source {fpr['source']:.3f}, shifted under the source version "
        f"{fpr['shifted']:.3f}, shifted under the adapted version {fpr['adapted']:.3f}"
    )
    assert fpr["shifted"] >= 0.5
    # measured offline on 64 frames: source 0.00, adapted 0.11 (the shots stop at the calibration median score)
    assert fpr["adapted"] <= fpr["source"] + 0.2
    assert len(loop.events(EventKind.ADAPTATION_STARTED)) == 1, "adapted twice on the same frames"

    assert main(["models", "rollback", "--camera", CAMERA]) == 0
    loop.wait_served(ports, base)
    rolled_back = loop.verdicts(loop.send(16, shifted=True))
    assert {v["model_version"] for v in rolled_back} == {base}
    assert loop.wait_event(EventKind.ROLLBACK).version == base


def test_a_rejected_candidate_changes_nothing_and_a_restarted_worker_resumes(loop: Loop, trained_dir: Path) -> None:
    base = read_manifest(trained_dir).version
    loop.line.env["INSPECTD_ADAPT__MAX_STEPS"] = "1"  # one small step cannot undo the shift: held-out shots fail
    ports = loop.start_workers(1)
    loop.send(16, shifted=False)
    shifted = loop.shift_until_alarm()

    assert main(["confirm", *shifted[:SHOTS], "--operator", "qa"]) == 0
    rejected = loop.wait_event(EventKind.ADAPTATION_REJECTED)
    assert rejected.scope == CAMERA and rejected.version == base
    # with a shadow to follow, held-out shots are judged by how much of the parent's excess they lost
    assert any(r.startswith("FAIL recovery") for r in rejected.detail["reasons"]), rejected.detail["reasons"]
    assert rejected.detail["figures"]["candidate_false_reject_rate"] > 0
    assert not loop.events(EventKind.ADAPTATION_ACCEPTED)
    assert [e.scope for e in loop.events(EventKind.VERSION_ACTIVATED)] == ["default"]  # the bootstrap only
    time.sleep(2)  # several controller checks: the same frames are not tried again
    assert len(loop.events(EventKind.ADAPTATION_STARTED)) == 1
    assert loop.served(ports[0]) == base
    assert {v["model_version"] for v in loop.verdicts(loop.send(8, shifted=True))} == {base}

    assert main(["confirm", shifted[SHOTS], "--operator", "qa"]) == 0  # one more frame: a new attempt
    loop.wait_event(EventKind.ADAPTATION_REJECTED, count=2)
    assert len(loop.events(EventKind.ADAPTATION_STARTED)) == 2

    worker = loop.line.workers[0]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    loop.start_workers(1)
    resumed = loop.verdicts(loop.send(4, shifted=True))
    assert [v["drift_state"] for v in resumed] == ["alarm"] * 4, "the restarted worker re-learned the drift state"
    assert len(loop.events(EventKind.DRIFT_ALARM)) == 1
    time.sleep(2)
    assert len(loop.events(EventKind.ADAPTATION_STARTED)) == 2, "the restarted worker retried the same frames"


def test_a_candidate_refused_in_shadow_is_kept_for_an_operator_to_force(
    broker: LocalKafka,
    stale_probe_dir: Path,
    tmp_path: Path,
    make_images: Callable[..., Tensor],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The gate refuses good candidates too (docs/RESULTS.md), and an operator may overrule it. A candidate
    refused in shadow is published with the operating point the shadow measured, never activated by the
    worker; activating it needs --force, and it then serves at its own threshold."""
    base = read_manifest(stale_probe_dir).version
    with running_loop(broker, stale_probe_dir, tmp_path, make_images, monkeypatch) as loop:
        ports = loop.start_workers(1)
        loop.send(16, shifted=False)
        shifted = loop.shift_until_alarm()
        assert main(["confirm", *shifted[:SHOTS], "--operator", "qa"]) == 0
        loop.wait_event(EventKind.ADAPTATION_SHADOW)
        loop.send_until(EventKind.ADAPTATION_ACCEPTED, EventKind.ADAPTATION_REJECTED)
        rejected = loop.wait_event(EventKind.ADAPTATION_REJECTED)
        failed = [r for r in rejected.detail["reasons"] if r.startswith("FAIL")]
        assert len(failed) == 1 and failed[0].startswith("FAIL shadow sensitivity"), rejected.detail["reasons"]
        candidate = rejected.detail["candidate"]
        manifest = read_manifest(next(loop.line.tmp_path.glob(f"cache-*/{candidate}")))
        assert manifest.parent == base and manifest.summary["refused"] == failed
        assert manifest.calibration["threshold"] == rejected.detail["figures"]["shadow"]["threshold"]
        assert not loop.events(EventKind.ADAPTATION_ACCEPTED)
        assert [e.scope for e in loop.events(EventKind.VERSION_ACTIVATED)] == ["default"]  # the bootstrap only
        assert loop.served(ports[0]) == base

        capsys.readouterr()
        assert main(["models", "list", "--json"]) == 0
        rows = {row["version"]: row for row in json.loads(capsys.readouterr().out)}
        assert rows[candidate]["refused"] and not rows[candidate]["active_in"] and not rows[base]["refused"]
        assert main(["models", "activate", candidate, "--camera", CAMERA]) == 1
        assert "refused by the adaptation gate" in capsys.readouterr().err
        assert [e.scope for e in loop.events(EventKind.VERSION_ACTIVATED)] == ["default"]

        assert main(["models", "activate", candidate, "--camera", CAMERA, "--force"]) == 0
        loop.wait_served(ports, candidate)
        after = loop.verdicts(loop.send(16, shifted=True))
        assert {v["model_version"] for v in after} == {candidate}
        assert {v["threshold"] for v in after} == {manifest.calibration["threshold"]}  # its own operating point


@pytest.mark.slow
def test_with_recalibrate_a_candidate_refused_offline_leaves_the_parent_alone_in_shadow(
    loop: Loop, trained_dir: Path
) -> None:
    """[adapt] recalibrate in a real worker: the candidate fails the offline gate (one small step), so the
    worker scores the camera's next frames with the parent alone, its probes and NLLs included, and decides
    on the parent's own columns; accepted, every frame after the switch is served at the new threshold."""
    base = read_manifest(trained_dir).version
    loop.line.env["INSPECTD_ADAPT__MAX_STEPS"] = "1"  # one small step cannot undo the shift: held-out shots fail
    loop.line.env["INSPECTD_ADAPT__RECALIBRATE"] = "true"
    ports = loop.start_workers(1)
    loop.send(16, shifted=False)
    shifted = loop.shift_until_alarm()
    assert main(["confirm", *shifted[:SHOTS], "--operator", "qa"]) == 0
    shadow = loop.wait_event(EventKind.ADAPTATION_SHADOW)
    assert shadow.detail["shadowed"] == "parent"
    assert any(r.startswith("FAIL recovery") for r in shadow.detail["reasons"]), shadow.detail["reasons"]
    loop.send_until(EventKind.ADAPTATION_ACCEPTED, EventKind.ADAPTATION_REJECTED)
    ended = (loop.events(EventKind.ADAPTATION_ACCEPTED) + loop.events(EventKind.ADAPTATION_REJECTED))[0]
    recalibration = ended.detail["figures"]["recalibration"]
    assert (
        recalibration["frames_seen"] == 16
        and recalibration["parent_threshold"] == read_manifest(trained_dir).calibration["threshold"]
    )
    checks = [r for r in ended.detail["reasons"] if r.startswith(("ok recalibration", "FAIL recalibration"))]
    assert len(checks) >= 6, ended.detail["reasons"]  # every check ran on the parent's columns
    print(f"recalibration {ended.kind}: {checks}")
    if ended.kind == EventKind.ADAPTATION_ACCEPTED:
        assert ended.detail["recalibrated"] is True
        manifest = read_manifest(next(loop.line.tmp_path.glob(f"cache-*/{ended.version}")))
        assert manifest.summary["recalibrated_from"] == base
        assert manifest.backbone_sha256 == read_manifest(trained_dir).backbone_sha256
        loop.wait_served(ports, ended.version)
        after = loop.verdicts(loop.send(16, shifted=True))
        assert {v["threshold"] for v in after} == {recalibration["threshold"]}
    else:
        assert any(r.startswith("FAIL recalibration") for r in checks)
        assert loop.served(ports[0]) == base

"""The adaptation controller: from a camera's drift alarm and its operator-confirmed frames to a new version.

Checked between batches, every [adapt] check_interval_s, and never blocking scoring: when a camera's drift
monitor is in alarm and its adaptation buffer holds at least [adapt] min_shots frames, the worker takes the
Redis lock `lock:adapt:{camera}` (expiry [adapt] lock_ttl_s, renewed by a small thread while the run lasts,
so one worker per scope adapts), and a background thread decodes the newest [adapt] max_shots frames (the
same image limits as Kafka frames) and runs `adapt_and_gate` on the version the camera is served. The
result is taken up between later batches:

- accepted by the offline gate: the candidate is served in shadow ([adapt] shadow_frames > 0): the worker
  scores the camera's next shadow_frames frames with it beside the parent (verdicts still come from the
  parent), and `adapters.shadow` decides on those frames, setting the candidate's own threshold and
  drift reference for the new domain (event adaptation_shadow, then accepted or rejected with both flag
  rates, the drift statistic and the frames seen). The lock is held, and renewed, until then; a shadow
  that does not get its frames within shadow_timeout_s (the camera's partition moved) is rejected. With
  shadow_frames = 0 a candidate adapted on one shot is never activated (its offline evidence is
  perturbed copies of its own training frame).
- accepted: the adapter is saved into [registry] cache_dir (next to its materialised parent), published,
  and activated in the camera's own scope (`camera:ID`: the shift was seen on this camera; an operator
  can widen it with `inspectd models activate VERSION --line LINE`). A camera scope with no
  version of its own is first pinned to the parent, so that `inspectd models rollback --camera CAMERA`
  returns the camera to what it was served before. Events: adaptation_started, adaptation_accepted (gate
  figures), version_activated (by the registry).
- rejected (or failed: undecodable frames, an error while adapting or saving): adaptation_rejected with
  the figures and reasons; the active version stays.

Either way the attempt is recorded in `adapt-attempt:{camera}` with the newest buffered frame it used, so
no worker adapts the camera again until an operator has confirmed a newer frame.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import structlog
import torch
from redis.exceptions import LockError
from redis.lock import Lock

from adapters.gate import GatedAdaptation, adapt_and_gate
from adapters.shadow import ShadowEvaluation
from csflow.artifacts import ArtifactError, ModelVersion, save_adapter
from csflow.calibration import Calibration
from csflow.data import ImageError, decode_image, to_tensor
from csflow.model import CSFlow
from daemon.config import Settings
from daemon.confirmations import AdaptationBuffer, BufferedFrame
from daemon.events import Event, EventKind, EventLog, now_ms
from daemon.registry import ModelRegistry, RegistryError
from daemon.scopes import camera_scope

RENEWALS_PER_TTL = 3  # the lock is extended this often per expiry period


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: `version` is the activated version when accepted."""

    accepted: bool
    version: str | None
    reasons: list[str]


class _Run:
    """One adaptation in a background thread, and the renewal of its lock in another."""

    def __init__(
        self, camera: str, parent: ModelVersion, frames: list[BufferedFrame], lock: Lock, settings: Settings
    ) -> None:
        self.camera = camera
        self.parent = parent
        self.frames = frames
        self.lock = lock
        self.settings = settings
        self.result: GatedAdaptation | None = None
        self.error: str | None = None
        self.skipped: list[str] = []  # frames that could not be decoded
        self._done = threading.Event()
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._adapt, name=f"adapt-{camera}", daemon=True)
        self._renewer = threading.Thread(target=self._renew, name=f"adapt-lock-{camera}", daemon=True)
        self._log = structlog.get_logger()

    def start(self) -> None:
        self._thread.start()
        self._renewer.start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _adapt(self) -> None:
        try:
            limits, size = self.settings.limits.to_limits(), self.parent.model.image_size
            shots = []
            for frame in self.frames:
                try:
                    shots.append(to_tensor(decode_image(frame.data, limits, frame.frame_id), size))
                except ImageError as exc:
                    self.skipped.append(str(exc))
            if not shots:
                raise ValueError("no buffered frame could be decoded")
            adapt_config, gate_config = self.settings.adapt.to_configs()
            self.result = adapt_and_gate(self.parent, torch.stack(shots), adapt_config, gate_config)
        except Exception as exc:  # a thread's exception would be lost: whatever it is, it is this run's outcome
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._done.set()

    def release(self) -> None:
        """Stop renewing and free the scope (the lock outlives the adaptation while the shadow runs)."""
        self._released.set()
        _release_quietly(self.lock)

    def _renew(self) -> None:
        ttl = self.settings.adapt.lock_ttl_s
        while not self._released.wait(ttl / RENEWALS_PER_TTL):
            try:
                self.lock.extend(ttl, replace_ttl=True)
            except (LockError, redis.RedisError) as exc:
                self._log.warning("adaptation lock not renewed", camera_id=self.camera, error=str(exc))


@dataclass
class _Shadow:
    """A candidate that passed the offline gate, scored beside its parent on the camera's live frames."""

    run: _Run
    gated: GatedAdaptation
    evaluation: ShadowEvaluation
    deadline: float


class AdaptationController:
    """Starts at most one adaptation at a time per worker and publishes its outcome. Owned by the worker
    loop (not thread-safe); its Redis errors propagate to the worker's retry."""

    def __init__(self, settings: Settings, registry: ModelRegistry, buffer: AdaptationBuffer, events: EventLog) -> None:
        self.settings = settings
        self.registry = registry
        self.client = registry.client
        self.keys = registry.keys
        self.buffer = buffer
        self.events = events
        self.cache_dir = Path(settings.registry.cache_dir)
        self._run: _Run | None = None
        self._shadow: _Shadow | None = None
        self._next_check = 0.0
        self._log = structlog.get_logger()

    @property
    def shadow(self) -> tuple[str, CSFlow] | None:
        """The camera whose frames the worker must also score with the candidate, and the candidate."""
        if self._shadow is None:
            return None
        return self._shadow.run.camera, self._shadow.gated.result.model

    def observe_shadow(self, parent_scores: list[float], candidate_scores: list[float], nll: list[float]) -> None:
        """The shadow camera's frames of one batch, in stream order: parent and candidate scores, candidate NLLs."""
        if self._shadow is not None:
            for p, c, n in zip(parent_scores, candidate_scores, nll, strict=True):
                self._shadow.evaluation.update(p, c, n)

    def step(self, alarms: Mapping[str, ModelVersion]) -> None:
        """Take up a finished run or shadow, or start a run for a camera in alarm (`alarms`: camera -> its
        version)."""
        if self._shadow is not None:
            shadow = self._shadow
            if shadow.evaluation.done or time.monotonic() > shadow.deadline:
                self._conclude(shadow.run, self._shadow_outcome(shadow))
                self._shadow = None
            return
        if self._run is not None:
            if self._run.done:
                run, self._run = self._run, None
                self._finish(run)
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.settings.adapt.check_interval_s
        for camera, parent in alarms.items():
            if self._start(camera, parent):
                return

    def close(self) -> None:
        """On shutdown: a run still going is abandoned (its thread dies with the process); free the scope."""
        for run in (self._run, self._shadow.run if self._shadow else None):
            if run is not None:
                run.release()
        self._run, self._shadow = None, None

    # -------------------------------------------------------------------------------------------- start

    def _start(self, camera: str, parent: ModelVersion) -> bool:
        cfg = self.settings.adapt
        if self.buffer.size(camera) < cfg.min_shots or not self._new_frames(camera):
            return False
        lock = self.client.lock(self.keys.adapt_lock(camera), timeout=cfg.lock_ttl_s, thread_local=False)
        if not lock.acquire(blocking=False):
            return False  # another worker adapts this scope
        try:
            frames = self.buffer.frames(camera, cfg.max_shots)
            # checked again under the lock: another worker may have finished an attempt on these frames
            if len(frames) < cfg.min_shots or not self._new_frames(camera, frames[0]):
                lock.release()
                return False
            detail = {"shots": len(frames), "frame_ids": [f.frame_id for f in frames]}
            self.events.append(Event(EventKind.ADAPTATION_STARTED, camera, parent.version, detail))
        except redis.RedisError:
            _release_quietly(lock)
            raise
        self._run = _Run(camera, parent, frames, lock, self.settings)
        self._run.start()
        self._log.info("adaptation started", camera_id=camera, parent=parent.version, shots=len(frames))
        return True

    def _new_frames(self, camera: str, newest: BufferedFrame | None = None) -> bool:
        """Whether the buffer's newest frame is newer than the last attempt's (no attempt: yes)."""
        raw = self.client.get(self.keys.adapt_attempt(camera))
        if raw is None:
            return True
        if newest is None:
            found = self.buffer.frames(camera, 1)
            if not found:
                return False
            newest = found[0]
        try:
            return json.loads(raw)["newest_frame_id"] != newest.frame_id
        except (ValueError, KeyError, TypeError):
            return True  # an unreadable record does not block adaptation for good

    # -------------------------------------------------------------------------------------------- finish

    def _finish(self, run: _Run) -> None:
        """The offline gate's outcome: a shadow starts, or the outcome is published or recorded."""
        outcome = self._outcome(run)
        if outcome is not None:
            self._conclude(run, outcome)

    def _conclude(self, run: _Run, outcome: Outcome) -> None:
        """Record the attempt and free the scope."""
        attempt = {
            "newest_frame_id": run.frames[0].frame_id,
            "shots": len(run.frames),
            "parent": run.parent.version,
            "accepted": outcome.accepted,
            "version": outcome.version,
            "ts": now_ms(),
        }
        self.client.set(self.keys.adapt_attempt(run.camera), json.dumps(attempt))
        run.release()
        log = self._log.info if outcome.accepted else self._log.warning
        log(
            "adaptation accepted" if outcome.accepted else "adaptation rejected",
            camera_id=run.camera,
            parent=run.parent.version,
            version=outcome.version,
            reasons=outcome.reasons,
        )

    def _outcome(self, run: _Run) -> Outcome | None:
        """The offline gate's verdict; None when the candidate goes into shadow first."""
        gated = run.result
        if gated is None:
            return self._rejected(run, [f"FAIL error: {run.error}"], {})
        figures = _json_safe(gated.decision.figures)
        reasons = [*gated.decision.reasons, *(f"skipped frame: {s}" for s in run.skipped)]
        if not gated.accepted:
            return self._rejected(run, reasons, figures)
        cfg = self.settings.adapt
        if cfg.shadow_frames > 0:
            evaluation = ShadowEvaluation(
                run.parent.manifest.threshold_calibration,
                list(gated.decision.figures.get("defect_scores", [])),
                cfg.shadow_config(),
                self.settings.drift.to_config(),
            )
            self._shadow = _Shadow(run, gated, evaluation, time.monotonic() + cfg.shadow_timeout_s)
            detail = {
                "figures": figures,
                "reasons": reasons,
                "frames": cfg.shadow_frames,
                "adaptation": _json_safe(gated.result.summary()),
            }
            self.events.append(Event(EventKind.ADAPTATION_SHADOW, run.camera, run.parent.version, detail))
            self._log.info("candidate in shadow", camera_id=run.camera, parent=run.parent.version)
            return None
        if gated.split.heldout_kind == "views":
            reason = "FAIL shadow: a candidate adapted on one shot is never activated without shadow evidence"
            return self._rejected(run, [*reasons, f"{reason} ([adapt] shadow_frames is 0)"], figures)
        return self._activate(run, gated, reasons, figures, None)

    def _shadow_outcome(self, shadow: _Shadow) -> Outcome:
        run, gated = shadow.run, shadow.gated
        decision = shadow.evaluation.decide()
        figures = _json_safe({**gated.decision.figures, "shadow": decision.figures})
        reasons = [*gated.decision.reasons, *decision.reasons]
        if not decision.accepted:
            return self._rejected(run, reasons, figures)
        return self._activate(run, gated, reasons, figures, decision.calibration)

    def _activate(
        self,
        run: _Run,
        gated: GatedAdaptation,
        reasons: list[str],
        figures: dict[str, Any],
        calibration: Calibration | None,
    ) -> Outcome:
        """Save, publish and activate the candidate in the camera's scope (`calibration`: its own operating
        point for the new domain, None to inherit the parent's)."""
        camera, parent = run.camera, run.parent.version
        try:
            version = self._save(run, gated, calibration)
            self.registry.publish(self.cache_dir / version)
        except (ArtifactError, RegistryError, OSError, ValueError) as exc:
            return self._rejected(run, [*reasons, f"FAIL publish: {type(exc).__name__}: {exc}"], figures)
        detail = {"parent": parent, "figures": figures, "reasons": reasons, "adaptation": gated.result.summary()}
        self.events.append(Event(EventKind.ADAPTATION_ACCEPTED, camera, version, _json_safe(detail)))
        scope = camera_scope(camera)
        if not self.registry.history(scope):
            self.registry.activate(scope, parent)  # pin: a rollback in the camera's scope returns here
        self.registry.activate(scope, version)
        return Outcome(True, version, reasons)

    def _rejected(self, run: _Run, reasons: list[str], figures: dict[str, Any]) -> Outcome:
        detail = {"figures": figures, "reasons": reasons, "shots": len(run.frames)}
        self.events.append(Event(EventKind.ADAPTATION_REJECTED, run.camera, run.parent.version, detail))
        return Outcome(False, None, reasons)

    def _save(self, run: _Run, gated: GatedAdaptation, calibration: Calibration | None) -> str:
        """The adapter as `cache_dir/{version}`, beside its parent's materialised directory (whose relative
        path it records); written to a temporary directory and renamed, so a directory there is complete."""
        parent_dir = self.registry.materialise(run.parent.version, self.cache_dir)
        tmp = Path(tempfile.mkdtemp(prefix=".adapt-", dir=self.cache_dir))
        try:
            result = gated.result
            summary = {**result.summary(), "gate": _json_safe(gated.decision.figures), "camera_id": run.camera}
            manifest = save_adapter(
                tmp,
                result.model,
                run.parent,
                result.block_names,
                summary,
                domain=run.camera,
                parent_dir=parent_dir,
                calibration=calibration,
            )
            target = self.cache_dir / manifest.version
            if not target.is_dir():
                tmp.rename(target)
            return manifest.version
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _release_quietly(lock: Lock) -> None:
    """Expired, or Redis unreachable: either way the lock frees itself at its expiry."""
    with contextlib.suppress(LockError, redis.RedisError):
        lock.release()


def _json_safe(value: Any) -> Any:
    """Events and manifests are strict JSON: non-finite figures (a diverged candidate) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value

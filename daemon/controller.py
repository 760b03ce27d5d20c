"""The adaptation controller: from a camera's drift alarm and its operator-confirmed frames to a new version.

Checked between batches, every [adapt] check_interval_s, and never blocking scoring: when a camera's drift
monitor is in alarm and its adaptation buffer holds at least [adapt] min_shots frames, the worker takes the
Redis lock `lock:adapt:{camera}` with a fencing token (from the counter `adapt-fence`, which only grows;
the token is the lock's value), records the attempt in `adapt-attempt:{camera}` (before anything runs: a
worker killed during the run, by the OOM killer or otherwise, leaves the record, so the same frames are not
tried again and again; only a newer confirmed frame starts a new attempt), and starts the run in a child
process (daemon/adaptation_job.py) with its own memory bound ([adapt] max_memory_mb): decoding the newest
[adapt] max_shots frames, adapting the version the camera is served and gating the candidate happen
there, so that running out of memory kills the child, not scoring. The lock expires after [adapt]
lock_ttl_s and is renewed by a small thread while the run lasts. The child's outcome is taken up between
later batches:

- the child died (out of memory, a signal, an exception, past [adapt] run_timeout_s): adaptation_failed
  with the reason; the active version stays.
- accepted by the offline gate: the candidate is served in shadow ([adapt] shadow_frames > 0): the worker
  scores the camera's next shadow_frames frames with it beside the parent (verdicts still come from the
  parent), and `adapters.shadow` decides on those frames, setting the candidate's own threshold and
  drift reference for the new domain (event adaptation_shadow, then accepted or rejected with both flag
  rates, the drift statistic and the frames seen). The lock is held, and renewed, until then; a shadow
  that does not get its frames within shadow_timeout_s (the camera's partition moved) is rejected. With
  shadow_frames = 0 a candidate adapted on one shot is never activated (its offline evidence is
  perturbed copies of its own training frame).
- accepted: the adapter is saved into [registry] cache_dir (next to its materialised base), published,
  and activated in the camera's own scope (`camera:ID`: the shift was seen on this camera; an operator
  can widen it with `inspectd models activate VERSION --line LINE`), by `ModelRegistry.activate_fenced`:
  only if the lock still holds this run's token and the camera is still served the version the run
  adapted, both checked in the activating transaction. Else (the lock expired and another worker took it,
  or an operator activated or rolled back meanwhile) adaptation_superseded, and nothing is activated. A
  camera scope with no version of its own is first pinned to the parent, so that `inspectd models rollback
  --camera CAMERA` returns the camera to what it was served before. Events: adaptation_started,
  adaptation_accepted (gate figures), version_activated (by the registry).
- recalibrated ([adapt] recalibrate): a candidate refused offline or in its shadow may leave a line that needs
  a new operating point rather than new weights. The parent goes through the same shadow as its own
  candidate (refused offline: the parent alone is shadowed), on its own scores, NLLs and probe scores of the
  same frames and its scores of the gate's synthetic defects; if it passes the same checks, a version with
  the parent's weights (its tensors of the same blocks) and the new threshold and drift reference is
  activated as above (adaptation_accepted with `recalibrated`; its manifest summary names the version it
  recalibrated). An accepted candidate comes first.
- rejected (or an error while saving or publishing): adaptation_rejected with the figures and reasons. A
  candidate refused in shadow is kept ([adapt] keep_refused): saved and published with the operating point
  the shadow measured and its failed checks in the manifest summary, never activated by the worker; the
  event names it (`candidate`), and an operator may activate it with `inspectd models activate --force`
  (the gate refuses good candidates too). One refused before the shadow has no operating point: discarded.
  A camera keeps its newest [adapt] max_kept_refused: the registry removes older ones never activated.

Adapters are parented on the base: adapting an adapted version yields an adapter of the base that carries
the blocks of both adaptations, so versions never chain toward csflow.artifacts.MAX_CHAIN.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import redis
import structlog
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock
from safetensors import SafetensorError
from torch import Tensor

from adapters.shadow import ShadowEvaluation
from csflow.artifacts import (
    ArtifactError,
    ModelVersion,
    apply_adapter,
    read_manifest,
    save_adapter,
    verify_files,
)
from csflow.calibration import Calibration
from csflow.model import CSFlow
from daemon.adaptation_job import LOG_FILE, Job, JobFailed, JobResult, command, json_safe, read_result, write_job
from daemon.config import Settings
from daemon.confirmations import AdaptationBuffer, BufferedFrame
from daemon.events import Event, EventKind, EventLog, now_ms
from daemon.metrics import WorkerMetrics
from daemon.registry import RECALIBRATED_FROM, REFUSED, Fence, ModelRegistry, RegistryError, SupersededError
from daemon.scopes import camera_scope

RENEWALS_PER_TTL = 3  # the lock is extended this often per expiry period
FENCE_KEY = "adapt-fence"  # under [redis] key_prefix: the counter that hands out fencing tokens
KILL_WAIT_S = 10.0  # after SIGKILL, how long to wait for the child to be reaped
SETTINGS_ENV_PREFIX = "INSPECTD_"  # daemon/config.py's environment overrides, secrets included

OutcomeKind = Literal["accepted", "rejected", "failed", "superseded"]


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: `version` is the activated version when accepted."""

    kind: OutcomeKind
    version: str | None
    reasons: list[str]

    @property
    def accepted(self) -> bool:
        return self.kind == "accepted"


class _Run:
    """One adaptation in a child process, and the renewal of its lock in a thread."""

    def __init__(
        self,
        camera: str,
        parent: ModelVersion,
        frames: list[BufferedFrame],
        lock: Lock,
        token: str,
        settings: Settings,
        directory: Path,
    ) -> None:
        self.camera = camera
        self.parent = parent
        self.frames = frames
        self.lock = lock
        self.token = token
        self.settings = settings
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.started = time.monotonic()
        self.seconds: float | None = None  # the child's wall time, once it exited
        self.timed_out = False
        self._log_file: IO[bytes] | None = None
        self._released = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name=f"adapt-lock-{camera}", daemon=True)
        self._log = structlog.get_logger()

    def start(self) -> None:
        self._renewer.start()
        self._log_file = (self.directory / LOG_FILE).open("wb")
        # The child gets its settings in job.json: no INSPECTD_* variable (Redis and Kafka credentials among them).
        env = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_ENV_PREFIX)}
        self.process = subprocess.Popen(
            command(self.directory), stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, env=env
        )
        self.started = time.monotonic()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def done(self) -> bool:
        """Whether the child has exited (killed here past [adapt] run_timeout_s)."""
        if self.process is None:
            return True
        if self.process.poll() is None:
            if time.monotonic() - self.started <= self.settings.adapt.run_timeout_s:
                return False
            self.timed_out = True
            self.kill()
        if self.seconds is None:
            self.seconds = time.monotonic() - self.started
        return True

    def result(self) -> JobResult:
        """The child's result; JobFailed says why there is none."""
        if self.process is None or self.process.returncode is None:
            raise JobFailed("the child process did not run")
        if self.timed_out:
            raise JobFailed(f"killed after {self.settings.adapt.run_timeout_s:g} s ([adapt] run_timeout_s)")
        return read_result(self.directory, self.process.returncode)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(KILL_WAIT_S)

    def release(self) -> None:
        """Stop renewing, free the scope and the job's files (the lock outlives the child during the shadow)."""
        self._released.set()
        _release_quietly(self.lock)
        self.kill()
        if self._log_file is not None:
            self._log_file.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _renew(self) -> None:
        ttl = self.settings.adapt.lock_ttl_s
        while not self._released.wait(ttl / RENEWALS_PER_TTL):
            try:
                self.lock.extend(ttl, replace_ttl=True)
            except LockNotOwnedError:
                # expired (a stall longer than its ttl) and maybe taken: the activation's fence will tell
                self._log.warning("adaptation lock lost", camera_id=self.camera, token=self.token)
                return
            except (LockError, redis.RedisError) as exc:
                self._log.warning("adaptation lock not renewed", camera_id=self.camera, error=str(exc))


@dataclass
class _Shadow:
    """A candidate that passed the offline gate, scored beside its parent on the camera's live frames; or,
    with `candidate` None (refused offline, [adapt] recalibrate), the parent alone, as its own candidate."""

    run: _Run
    result: JobResult
    candidate: CSFlow | None
    evaluation: ShadowEvaluation
    deadline: float


class AdaptationController:
    """Starts at most one adaptation at a time per worker and publishes its outcome. Owned by the worker
    loop (not thread-safe); its Redis errors propagate to the worker's retry."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        buffer: AdaptationBuffer,
        events: EventLog,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.client = registry.client
        self.keys = registry.keys
        self.buffer = buffer
        self.events = events
        self.metrics = metrics
        self.cache_dir = Path(settings.registry.cache_dir)
        self.fence_key = f"{self.keys.prefix}{FENCE_KEY}"
        self._run: _Run | None = None
        self._shadow: _Shadow | None = None
        self._next_check = 0.0
        self._log = structlog.get_logger()

    @property
    def running(self) -> _Run | None:
        """The run whose child is going, if any (for the worker's logs and for tests)."""
        return self._run

    @property
    def shadow(self) -> tuple[str, CSFlow | None] | None:
        """The camera whose frames the worker must also score with the candidate, and the candidate (None:
        the parent is its own candidate, and its columns stand for the candidate's)."""
        if self._shadow is None:
            return None
        return self._shadow.run.camera, self._shadow.candidate

    def shadow_probes(self, frames: Tensor) -> Tensor:
        """The sensitivity probes to score with the candidate beside these frames of the shadow camera (the
        next ones in stream order): `probes_per_frame` per frame, frame by frame."""
        if self._shadow is None:
            return frames[:0]
        return self._shadow.evaluation.probe_images(frames)

    def observe_shadow(
        self,
        parent_scores: list[float],
        candidate_scores: list[float],
        nll: list[float],
        probe_scores: list[list[float]],
        parent_probe_scores: list[list[float]],
        parent_nll: list[float],
    ) -> None:
        """The shadow camera's frames of one batch, in stream order: parent and candidate scores, candidate
        NLLs, the candidate's and the parent's scores of each frame's probes (`shadow_probes`), and the
        parent's NLLs (for its recalibration)."""
        if self._shadow is not None:
            rows = zip(parent_scores, candidate_scores, nll, probe_scores, parent_probe_scores, parent_nll, strict=True)
            for p, c, n, q, r, m in rows:
                self._shadow.evaluation.update(p, c, n, q, r, m)

    def step(self, alarms: Mapping[str, ModelVersion]) -> None:
        """Take up a finished run or shadow, or start a run for a camera in alarm (`alarms`: camera -> its
        version)."""
        if self._shadow is not None:
            shadow = self._shadow
            if shadow.evaluation.done or time.monotonic() > shadow.deadline:
                self._shadow = None
                with _released_on_error(shadow.run):
                    self._conclude(shadow.run, self._shadow_outcome(shadow))
            return
        if self._run is not None:
            if self._run.done:
                run, self._run = self._run, None
                with _released_on_error(run):
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
        """On shutdown: a run still going is killed and recorded as failed (its frames are not tried again
        until a newer one is confirmed); the scope is freed."""
        for run in (self._run, self._shadow.run if self._shadow else None):
            if run is None:
                continue
            run.kill()
            with contextlib.suppress(redis.RedisError):
                self._conclude(run, self._failed(run, "the worker stopped during the run"))
            run.release()
        self._run, self._shadow = None, None

    # -------------------------------------------------------------------------------------------- start

    def _start(self, camera: str, parent: ModelVersion) -> bool:
        cfg = self.settings.adapt
        if self.buffer.size(camera) < cfg.min_shots or not self._new_frames(camera):
            return False
        token = str(self.client.incr(self.fence_key))
        lock = self.client.lock(self.keys.adapt_lock(camera), timeout=cfg.lock_ttl_s, thread_local=False)
        if not lock.acquire(blocking=False, token=token):
            return False  # another worker adapts this scope
        try:
            frames = self.buffer.frames(camera, cfg.max_shots)
            # checked again under the lock: another worker may have finished an attempt on these frames
            if len(frames) < cfg.min_shots or not self._new_frames(camera, frames[0]):
                lock.release()
                return False
            self._record(camera, frames, parent, token, {"status": "running"})  # before anything runs
            detail = {"shots": len(frames), "frame_ids": [f.frame_id for f in frames], "token": int(token)}
            self.events.append(Event(EventKind.ADAPTATION_STARTED, camera, parent.version, detail))
        except redis.RedisError:
            _release_quietly(lock)
            raise
        if self.metrics is not None:
            self.metrics.adaptations.labels("started").inc()
        directory = Path(tempfile.mkdtemp(prefix="inspectd-adapt-"))
        run = _Run(camera, parent, frames, lock, token, self.settings, directory)
        try:
            parent_dir = self.registry.materialise(parent.version, self.cache_dir)
            base = parent.lineage[-1] if parent.lineage else parent.version
            base_dir = self.registry.materialise(base, self.cache_dir)
            job = Job(
                camera=camera,
                parent_dir=str(parent_dir.resolve()),
                base_dir=str(base_dir.resolve()),
                frame_ids=[f.frame_id for f in frames],
                adapt=self.settings.adapt.model_dump(mode="json"),
                limits=self.settings.limits.model_dump(mode="json"),
                device=str(next(parent.model.parameters()).device),
                max_memory_mb=cfg.max_memory_mb,
            )
            write_job(directory, job, [f.data for f in frames])
            run.start()
        except redis.RedisError:
            run.release()
            raise
        except (RegistryError, ArtifactError, OSError, ValueError) as exc:
            self._conclude(run, self._failed(run, f"cannot start the run: {type(exc).__name__}: {exc}"))
            return True
        self._run = run
        self._log.info(
            "adaptation started", camera_id=camera, parent=parent.version, shots=len(frames), pid=run.pid, token=token
        )
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

    def _record(
        self, camera: str, frames: list[BufferedFrame], parent: ModelVersion, token: str, status: dict[str, Any]
    ) -> None:
        """The attempt's record, written unless a later attempt (another token) has replaced it."""
        key = self.keys.adapt_attempt(camera)
        record = {
            "newest_frame_id": frames[0].frame_id,
            "shots": len(frames),
            "parent": parent.version,
            "token": int(token),
            "ts": now_ms(),
            **status,
        }

        def change(pipe: redis.client.Pipeline) -> None:
            raw = pipe.get(key)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if raw is not None and int(json.loads(raw)["token"]) > int(token):
                    return
            pipe.multi()
            pipe.set(key, json.dumps(record))

        self.client.transaction(change, key)

    # -------------------------------------------------------------------------------------------- finish

    def _finish(self, run: _Run) -> None:
        """The child's outcome: a failure, a rejection, a shadow that starts, or an activation."""
        if self.metrics is not None and run.seconds is not None:
            self.metrics.adaptation_seconds.observe(run.seconds)
        try:
            result = run.result()
        except (JobFailed, OSError, ValueError, TypeError) as exc:
            self._conclude(run, self._failed(run, str(exc)))
            return
        outcome = self._outcome(run, result)
        if outcome is not None:
            self._conclude(run, outcome)

    def _conclude(self, run: _Run, outcome: Outcome) -> None:
        """Record the attempt's end and free the scope."""
        status = {"status": outcome.kind, "accepted": outcome.accepted, "version": outcome.version}
        try:
            self._record(run.camera, run.frames, run.parent, run.token, status)
        finally:
            run.release()
        if self.metrics is not None:
            self.metrics.adaptations.labels(outcome.kind).inc()
        log = self._log.info if outcome.accepted else self._log.warning
        log(
            f"adaptation {outcome.kind}",
            camera_id=run.camera,
            parent=run.parent.version,
            version=outcome.version,
            reasons=outcome.reasons,
        )

    def _outcome(self, run: _Run, result: JobResult) -> Outcome | None:
        """The offline gate's verdict; None when the candidate goes into shadow first."""
        figures = json_safe(result.figures)
        reasons = [*result.reasons, *(f"skipped frame: {s}" for s in result.skipped)]
        cfg = self.settings.adapt
        if not result.accepted:
            if cfg.recalibrate and cfg.shadow_frames > 0:
                self._start_shadow(run, result, None, reasons, figures)
                return None
            return self._rejected(run, reasons, figures)
        try:
            candidate = _candidate(run.parent, run.directory / "adapter")
        except (ArtifactError, SafetensorError, OSError, ValueError, RuntimeError) as exc:
            return self._failed(run, f"the child's adapter cannot be applied: {type(exc).__name__}: {exc}")
        if cfg.shadow_frames > 0:
            self._start_shadow(run, result, candidate, reasons, figures)
            return None
        if result.heldout_kind == "views":
            reason = "FAIL shadow: a candidate adapted on one shot is never activated without shadow evidence"
            return self._rejected(run, [*reasons, f"{reason} ([adapt] shadow_frames is 0)"], figures)
        return self._activate(run, result, candidate, reasons, figures, None)

    def _start_shadow(
        self, run: _Run, result: JobResult, candidate: CSFlow | None, reasons: list[str], figures: dict[str, Any]
    ) -> None:
        """Serve `candidate` in shadow on the camera's next frames (None: the parent alone, to recalibrate)."""
        cfg = self.settings.adapt
        evaluation = ShadowEvaluation(
            run.parent.manifest.threshold_calibration,
            _finite_list(result.figures.get("defect_scores" if candidate is not None else "parent_defect_scores")),
            cfg.shadow_config(),
            self.settings.drift.to_config(),
            parent_defect_scores=_finite_list(result.figures.get("parent_defect_scores")),
        )
        self._shadow = _Shadow(run, result, candidate, evaluation, time.monotonic() + cfg.shadow_timeout_s)
        detail = {
            "figures": figures,
            "reasons": reasons,
            "frames": cfg.shadow_frames,
            "adaptation": result.summary,
            "shadowed": "adapted" if candidate is not None else "parent",
        }
        self.events.append(Event(EventKind.ADAPTATION_SHADOW, run.camera, run.parent.version, detail))
        log = self._log.bind(camera_id=run.camera, parent=run.parent.version)
        log.info("candidate in shadow", shadowed=detail["shadowed"])

    def _shadow_outcome(self, shadow: _Shadow) -> Outcome:
        """The candidate when the shadow accepts it; else ([adapt] recalibrate) the parent with the operating
        point the same frames give it, when they accept that; else a refusal (the candidate kept)."""
        run, result, cfg = shadow.run, shadow.result, self.settings.adapt
        reasons, figures = list(result.reasons), dict(result.figures)
        decision = None
        if shadow.candidate is not None:
            decision = shadow.evaluation.decide()
            reasons += decision.reasons
            figures["shadow"] = decision.figures
            if decision.accepted:
                return self._activate(run, result, shadow.candidate, reasons, json_safe(figures), decision.calibration)
        if cfg.recalibrate:
            recalibration = shadow.evaluation.recalibration().decide()
            reasons += recalibration.reasons
            figures["recalibration"] = recalibration.figures
            if recalibration.accepted:
                return self._activate(run, result, None, reasons, json_safe(figures), recalibration.calibration)
        kept = None
        if shadow.candidate is not None and decision is not None:  # a candidate was shadowed and refused
            kept = self._keep_refused(run, result, shadow.candidate, decision.reasons, decision.calibration)
        return self._rejected(run, reasons, json_safe(figures), kept)

    def _keep_refused(
        self, run: _Run, result: JobResult, candidate: CSFlow, reasons: list[str], calibration: Calibration | None
    ) -> str | None:
        """Save and publish a candidate the shadow refused, not activated, so that an operator may still
        activate it by hand; its id, or None when it is not kept (no operating point, [adapt] keep_refused
        off, or an error saving or publishing it, logged: the refusal stands either way)."""
        if calibration is None or not self.settings.adapt.keep_refused:
            return None
        refused = [r for r in [*result.reasons, *reasons] if r.startswith("FAIL")]
        try:
            version = self._save(run, result, candidate, calibration, refused)
            _, removed = self.registry.keep_refused(self.cache_dir / version, self.settings.adapt.max_kept_refused)
        except (ArtifactError, RegistryError, OSError, ValueError) as exc:
            self._log.warning("refused candidate not kept", camera_id=run.camera, error=f"{type(exc).__name__}: {exc}")
            return None
        for old in removed:  # never served, so never loaded from here again
            shutil.rmtree(self.cache_dir / old, ignore_errors=True)
        if removed:
            self._log.info("older refused candidates removed", camera_id=run.camera, versions=removed)
        return version

    def _activate(
        self,
        run: _Run,
        result: JobResult,
        candidate: CSFlow | None,
        reasons: list[str],
        figures: dict[str, Any],
        calibration: Calibration | None,
    ) -> Outcome:
        """Save, publish and activate the candidate in the camera's scope (None: the parent recalibrated;
        `calibration`: the operating point for the new domain, None to inherit the parent's), fenced (see
        the module docstring)."""
        camera, parent = run.camera, run.parent.version
        try:
            version = self._save(run, result, candidate, calibration)
            self.registry.publish(self.cache_dir / version)
        except (ArtifactError, RegistryError, OSError, ValueError) as exc:
            return self._rejected(run, [*reasons, f"FAIL publish: {type(exc).__name__}: {exc}"], figures)
        fence = Fence(self.keys.adapt_lock(camera), run.token, camera, parent)
        try:
            self.registry.activate_fenced(camera_scope(camera), version, fence)
        except SupersededError as exc:
            outcome = Outcome("superseded", None, [*reasons, f"FAIL superseded: {exc}"])
            detail = {"parent": parent, "reason": str(exc), "reasons": outcome.reasons, "token": int(run.token)}
            self.events.append(Event(EventKind.ADAPTATION_SUPERSEDED, camera, version, detail | {"figures": figures}))
            return outcome
        detail = {
            "parent": parent,
            "figures": figures,
            "reasons": reasons,
            "adaptation": result.summary,
            "recalibrated": candidate is None,
        }
        self.events.append(Event(EventKind.ADAPTATION_ACCEPTED, camera, version, json_safe(detail)))
        return Outcome("accepted", version, reasons)

    def _rejected(
        self, run: _Run, reasons: list[str], figures: dict[str, Any], candidate: str | None = None
    ) -> Outcome:
        """`candidate`: the refused version kept in the registry (not active), for an operator to force."""
        detail = {"figures": figures, "reasons": reasons, "shots": len(run.frames)}
        if candidate is not None:
            detail["candidate"] = candidate
        self.events.append(Event(EventKind.ADAPTATION_REJECTED, run.camera, run.parent.version, detail))
        return Outcome("rejected", None, reasons)

    def _failed(self, run: _Run, reason: str) -> Outcome:
        outcome = Outcome("failed", None, [f"FAIL run: {reason}"])
        detail = {"reason": reason, "reasons": outcome.reasons, "shots": len(run.frames), "token": int(run.token)}
        self.events.append(Event(EventKind.ADAPTATION_FAILED, run.camera, run.parent.version, detail))
        return outcome

    def _save(
        self,
        run: _Run,
        result: JobResult,
        candidate: CSFlow | None,
        calibration: Calibration | None,
        refused: list[str] | None = None,
    ) -> str:
        """The adapter as `cache_dir/{version}`, parented on the base, beside the base's materialised
        directory (whose relative path it records); written to a temporary directory and renamed, so a
        directory there is complete. `candidate` None: the parent's own tensors of the same blocks, a
        recalibration. `refused`: the checks it failed, recorded in its manifest's summary (`REFUSED`), where
        the registry reads them before an activation."""
        parent = run.parent
        base_id = parent.lineage[-1] if parent.lineage else parent.version
        base_dir = self.registry.materialise(base_id, self.cache_dir)
        # Outside the adapter's blocks the parent's model equals its base's: it stands for it (no second model).
        as_base = ModelVersion(parent.model, self.registry.manifest(base_id), (base_id,))
        if candidate is None:
            summary = {"camera_id": run.camera, RECALIBRATED_FROM: parent.version}
        else:
            summary = read_manifest(run.directory / "adapter").summary | ({REFUSED: refused} if refused else {})
        tmp = Path(tempfile.mkdtemp(prefix=".adapt-", dir=self.cache_dir))
        try:
            manifest = save_adapter(
                tmp,
                candidate or parent.model,
                as_base,
                result.block_names,
                summary,
                domain=run.camera,
                parent_dir=base_dir,
                calibration=calibration or parent.manifest.threshold_calibration,
            )
            target = self.cache_dir / manifest.version
            if not target.is_dir():
                tmp.rename(target)
            return manifest.version
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _finite_list(values: Any) -> list[float]:
    """The finite numbers of a figure read back from the child's JSON (None stands for NaN there)."""
    return [float(v) for v in values or [] if v is not None and np.isfinite(v)]


def _candidate(parent: ModelVersion, adapter_dir: Path) -> CSFlow:
    """The child's candidate rebuilt beside the served parent: a copy of the parent's extractor (the flow
    is shared: frozen, never written) with the adapter's tensors, checked against the adapter's digest."""
    manifest = read_manifest(adapter_dir)
    verify_files(adapter_dir, manifest)
    model = copy.deepcopy(parent.model, memo={id(parent.model.flow): parent.model.flow})
    apply_adapter(model, adapter_dir, manifest)
    return model.eval()


@contextlib.contextmanager
def _released_on_error(run: _Run) -> Iterator[None]:
    """An outage while a finished run is taken up (the worker retries the step) must not leave its lock
    renewed for ever: the run is given up and its scope freed (its record says `running`: not retried)."""
    try:
        yield
    except BaseException:
        run.release()
        raise


def _release_quietly(lock: Lock) -> None:
    """Expired, or Redis unreachable: either way the lock frees itself at its expiry."""
    with contextlib.suppress(LockError, redis.RedisError):
        lock.release()

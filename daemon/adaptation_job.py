"""One adaptation run in a child process of the worker, under its own memory bound.

Adapting tunes a copy of the extractor with gradients through the flow: at B5 and 512 px, 5 shots peaked
at 12 GiB, more than a CPU worker pod's limit. Run in the worker's process, an out-of-memory kill takes
scoring down for every partition of the pod. So the worker's controller (daemon/controller.py) writes a
job directory and starts `python -m daemon.adaptation_job DIR`, which first sets its own `RLIMIT_DATA`
from `[adapt] max_memory_mb` (an allocation past it fails with `MemoryError` in the child) and raises its
own `oom_score_adj` to the maximum (the kernel's OOM killer, if the container runs out first, kills the
child, not the worker), then decodes the shots, adapts and gates. The worker keeps scoring meanwhile and
reads the outcome when the child exits: an exit code, a signal, or a result.

Everything crosses by value or by path, never as a pickle:
- in: `job.json` (the camera, the parent's and the base's materialised directories, the [adapt] and
  [limits] settings, the device) and the shots' encoded bytes `shot-{i}` (decoded here, with the same
  limits as Kafka frames, so that a hostile image also costs only the child);
- out: `result.json` (the gate's decision and figures, the run's summary, the frames that could not be
  decoded) and, when the gate accepts, `adapter/`, the candidate as a version directory (safetensors and
  manifest); or `error.json` (the exception's type and message) and a non-zero exit.

The adapter is parented on the base, not on the adapted version it was adapted from: it carries the
blocks this run tuned and those the parent's own adapters had changed (their full tensors, as every
adapter does), so adapting an adapted version again yields a one-link chain, never a longer one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

JOB_FILE = "job.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
LOG_FILE = "child.log"
ADAPTER_DIR = "adapter"
SHOT_PREFIX = "shot-"
EXIT_ERROR = 1
EXIT_MEMORY = 3  # MemoryError: the [adapt] max_memory_mb bound (or the host) ran out
EXIT_ORPHANED = 4  # the worker that started the run is gone: nobody would read the result
PARENT_POLL_S = 1.0
OOM_SCORE_ADJ_MAX = 1000  # the kernel's maximum: the first process its OOM killer picks
MIB = 1024 * 1024
# How running out of memory reads when it comes through a library rather than as MemoryError: a shared
# object torch cannot map while loading, glibc unable to set up a thread, a C++ allocator.
_MEMORY_TEXT = re.compile(r"cannot allocate memory|can't allocate memory|failed to map segment|out of memory", re.I)


@dataclass(frozen=True)
class Job:
    """What a child needs, by value or by path (see the module docstring)."""

    camera: str
    parent_dir: str  # the parent version, materialised (load_model loads it with its chain)
    base_dir: str  # the parent's base version, materialised: the new adapter's parent
    frame_ids: list[str]
    adapt: dict[str, Any]  # the [adapt] section
    limits: dict[str, Any]  # the [limits] section (image decoding)
    device: str
    max_memory_mb: int  # 0: no bound of its own


@dataclass(frozen=True)
class JobResult:
    """The child's outcome as the worker reads it back (`adapter_dir` only when the gate accepted)."""

    accepted: bool
    reasons: list[str]
    figures: dict[str, Any]
    heldout_kind: str
    summary: dict[str, Any]  # the adaptation's (adapters.adapt.AdaptResult.summary)
    block_names: list[str]  # the blocks the adapter carries
    skipped: list[str] = field(default_factory=list)  # frames that could not be decoded
    adapter_version: str | None = None
    seconds: float = 0.0


class JobFailed(RuntimeError):
    """The child ended without a result; the message says how (exit code, signal, exception)."""


def write_job(directory: Path, job: Job, shots: list[bytes]) -> None:
    """The job's inputs: its description and the shots' encoded bytes."""
    if len(shots) != len(job.frame_ids):
        raise ValueError(f"{len(shots)} shots for {len(job.frame_ids)} frame ids")
    for i, data in enumerate(shots):
        (directory / f"{SHOT_PREFIX}{i}").write_bytes(data)
    (directory / JOB_FILE).write_text(json.dumps(asdict(job), sort_keys=True))


def command(directory: Path) -> list[str]:
    """The child's command line: this interpreter, this module, the job directory."""
    return [sys.executable, "-m", "daemon.adaptation_job", str(directory)]


def read_result(directory: Path, returncode: int) -> JobResult:
    """The child's result, or JobFailed naming why there is none."""
    if returncode == 0 and (directory / RESULT_FILE).is_file():
        data = json.loads((directory / RESULT_FILE).read_text())
        return JobResult(**data)
    error = ""
    if (directory / ERROR_FILE).is_file():
        try:
            error = str(json.loads((directory / ERROR_FILE).read_text())["error"])
        except (ValueError, KeyError, TypeError):
            error = "unreadable error.json"
    raise JobFailed(_describe_exit(returncode, error, directory))


def _describe_exit(returncode: int, error: str, directory: Path) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        how = f"killed by {name}"
        if -returncode == signal.SIGKILL:
            how += " (the kernel's OOM killer, an operator, or the run's timeout)"
        return how
    if returncode == EXIT_MEMORY:
        return f"out of memory (exit code {returncode}): {error or 'MemoryError'}"
    if returncode == EXIT_ORPHANED:
        return f"exit code {returncode}: the worker that started it had gone"
    if error:
        return f"exit code {returncode}: {error}"
    tail = _log_tail(directory)
    if _MEMORY_TEXT.search(tail):  # e.g. glibc aborting a thread's creation under the bound
        return f"out of memory (exit code {returncode}): {tail}"
    return f"exit code {returncode} without a result: {tail}"


def _log_tail(directory: Path, chars: int = 500) -> str:
    try:
        return (directory / LOG_FILE).read_text(errors="replace")[-chars:].strip() or "no output"
    except OSError:
        return "no output"


# ------------------------------------------------------------------------------------------------ the child


def bound_memory(max_memory_mb: int) -> None:
    """RLIMIT_DATA (heap and private writable mappings: where tensors live), not RLIMIT_AS: the address
    space of a torch process is mostly reserved, never-touched mappings (thread arenas, CUDA's), and a
    bound on it fails long before memory is short."""
    if max_memory_mb > 0:
        limit = max_memory_mb * MIB
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def prefer_as_oom_victim() -> None:
    """Raise this process's `oom_score_adj` to the maximum (an unprivileged process may raise its own): when
    the container or the host runs out of memory before the bound is reached, the kernel kills the child,
    never the worker. Best effort: where /proc is not Linux's, the bound alone protects the worker."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text(str(OOM_SCORE_ADJ_MAX))


def _watch_parent() -> None:
    """Exit when the worker that started this run is gone (SIGKILLed): its result would never be read."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent:
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_job(directory: Path) -> JobResult:
    """Decode, adapt, gate and (accepted) save the adapter; writes and returns the result."""
    import torch  # here, not at the top: the child bounds its memory before torch is loaded

    from adapters.adapt import flat_blocks
    from adapters.gate import adapt_and_gate
    from csflow.artifacts import ModelVersion, load_model, read_manifest, save_adapter
    from csflow.data import ImageError, decode_image, to_tensor
    from daemon.config import AdaptSection, LimitsSection

    started = time.perf_counter()
    job = Job(**json.loads((directory / JOB_FILE).read_text()))
    parent = load_model(job.parent_dir, job.device)
    limits, size = LimitsSection(**job.limits).to_limits(), parent.model.image_size
    shots, skipped = [], []
    for i, frame_id in enumerate(job.frame_ids):
        try:
            data = (directory / f"{SHOT_PREFIX}{i}").read_bytes()
            shots.append(to_tensor(decode_image(data, limits, frame_id), size))
        except ImageError as exc:
            skipped.append(str(exc))
    if not shots:
        raise ValueError("no buffered frame could be decoded")
    adapt_config, gate_config = AdaptSection(**job.adapt).to_configs()
    gated = adapt_and_gate(parent, torch.stack(shots), adapt_config, gate_config)
    decision = gated.decision
    extractor_blocks = flat_blocks(parent.model.extractor)
    blocks = _adapter_blocks(gated.result.block_names, parent, Path(job.parent_dir), extractor_blocks)
    result = JobResult(
        accepted=decision.accepted,
        reasons=list(decision.reasons),
        figures=json_safe(decision.figures),
        heldout_kind=gated.split.heldout_kind,
        summary=json_safe(gated.result.summary()),
        block_names=blocks,
        skipped=skipped,
    )
    if decision.accepted:
        base = read_manifest(job.base_dir)
        if base.version != parent.lineage[-1]:
            raise ValueError(f"{job.base_dir} holds {base.version}, not the base {parent.lineage[-1]} of the parent")
        # Outside `blocks`, the parent equals its base (load_model wrote only its adapters' tensors into it
        # and checked each digest), so the parent's model stands for the base's in save_adapter's check that
        # nothing else changed, without loading a second model.
        as_base = ModelVersion(parent.model, base, (base.version,))
        summary = {**result.summary, "gate": result.figures, "camera_id": job.camera, "adapted_from": parent.version}
        manifest = save_adapter(
            directory / ADAPTER_DIR,
            gated.result.model,
            as_base,
            blocks,
            summary,
            domain=job.camera,
            parent_dir=job.base_dir,
            calibration=parent.manifest.threshold_calibration,  # the adapted parent's operating point
        )
        result = JobResult(**{**asdict(result), "adapter_version": manifest.version})
    result = JobResult(**{**asdict(result), "seconds": round(time.perf_counter() - started, 3)})
    tmp = directory / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(result), sort_keys=True, allow_nan=False))
    tmp.replace(directory / RESULT_FILE)
    return result


def _adapter_blocks(tuned: list[str], parent: Any, parent_dir: Path, blocks: dict[str, Any]) -> list[str]:
    """The blocks this run tuned and those in which the parent differs from its base (the tensors of its
    chain's adapters), in the extractor's order."""
    from safetensors import safe_open

    from csflow.artifacts import DELTA_FILE, read_manifest

    changed: set[str] = set(tuned)
    directory = parent_dir
    for version in parent.lineage[:-1]:  # the adapted links, from the parent down (the base is last)
        manifest = read_manifest(directory)
        if manifest.version != version:
            raise ValueError(f"{directory} does not hold version {version} of the parent's chain")
        with safe_open(str(directory / DELTA_FILE), framework="pt") as delta:
            keys = list(delta.keys())
        changed |= {name for name in blocks for key in keys if key.startswith(f"{name}.")}
        directory = directory / str(manifest.parent_path)  # as load_model followed it
    return [name for name in blocks if name in changed]


def json_safe(value: Any) -> Any:
    """Results, events and manifests are strict JSON: non-finite figures (a diverged candidate) become null."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m daemon.adaptation_job JOB_DIR", file=sys.stderr)
        return 2
    directory = Path(args[0])
    try:
        job = json.loads((directory / JOB_FILE).read_text())
        bound_memory(int(job["max_memory_mb"]))
        prefer_as_oom_victim()
        _watch_parent()
        run_job(directory)
        return 0
    except BaseException as exc:  # whatever it is (SystemExit too), it is this run's outcome, told to the worker
        _write_error(directory, f"{type(exc).__name__}: {exc or 'allocation failed'}")
        return EXIT_MEMORY if _out_of_memory(exc) else EXIT_ERROR


def _out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or the bound seen through a library: a shared object that cannot be mapped while torch
    loads, a C++ allocator's "can't allocate memory"."""
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return True
    return bool(_MEMORY_TEXT.search(str(exc)))


def _write_error(directory: Path, error: str) -> None:
    try:
        (directory / ERROR_FILE).write_text(json.dumps({"error": error[:2000]}))
    except (OSError, MemoryError):
        pass  # the exit code still tells


if __name__ == "__main__":
    sys.exit(main())

"""Which model version each camera is served, loaded once per worker and swapped only between batches.

A camera serves what the registry resolves for it (`camera:ID` -> `line:NAME` -> `default`,
`ModelRegistry.active`).
Announcements on the models channel are cues to re-resolve every known camera. Pub/sub is at-most-once
(a reconnect or a slow reader loses messages), so the cameras are also re-resolved right after each
(re)subscription and every [registry] refresh_s.

Versions are materialised into [registry] cache_dir and built by one background loader thread, never on
the loop: a version being loaded (a registry download, hundreds of MB of tensors hashed and read) would
otherwise hold the batch of its camera past [kafka] max_poll_interval_ms. Requests wait in a bounded
queue ([registry] load_queue), one per version; meanwhile the camera keeps the version it served, and a
camera seen for the first time is served the default scope's version if it is loaded, else the
worker's configured version ([worker] model_dir, always loaded). A finished load is swapped in between
batches (`models()` before a batch is scored, `follow()` after it), so every verdict names the version
that scored it.

An adapted version is built on its already-loaded base (`csflow.artifacts.load_adapted`): the base's
flow and every extractor block its adapter leaves alone are the base's own tensors (frozen and in eval
mode, so read-only), and only the adapted blocks are copies; a second adapted version of a base costs
its adapter blocks, not a model. The base is loaded first when it is not yet.

Every served version runs under the worker's serving options ([model] precision, channels_last; see
`ModelSection.worker_serving_options`): the configured version and each loaded base are prepared
(`csflow.inference.prepare_for_serving`) before they serve, and an adapted version built on a prepared
base is prepared with it: its copied blocks keep the base's memory layout and its flow is the base's,
already in bf16 for bf16-flow. Options that would change the extractor's modules (folded batch norms, a
bf16 extractor) are refused, since adapters are loaded into copies of those modules. The worker's shadow
candidates are built the same way on the served parent (`daemon/controller.py`), so a candidate and its
parent are scored under the same options.

A version that cannot be loaded (a missing base path, a corrupt blob, a threshold that is not a finite
number, or any exception while loading) is logged, reported to `on_load_failed`, and the camera keeps
what it served; it is tried again after [registry] load_retry_s, or at once when an announcement names
it. A Redis error while loading is an outage, not a broken version: not reported, tried again after
refresh_s. The registry refuses a non-finite threshold at publish; a version written by other means is
checked here again, since `nan > threshold` and `score > nan` are both False: every frame would pass.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import redis
import structlog
import torch
from redis.client import PubSub

from csflow.artifacts import ArtifactError, ModelVersion, lineage, load_adapted, load_model
from csflow.inference import prepare_for_serving
from csflow.model import CSFlow
from csflow.serving_options import FP32, ServingOptions
from daemon.registry import DEFAULT_SCOPE, Announcement, ModelRegistry

MAX_MESSAGES = 1000  # announcements taken per call, so a flood cannot hold the loop
STOP_WAIT_S = 1.0  # close(): how long to wait for the loader to finish what it is building
PREPARED = "_inspectd_serving_options"  # set on a prepared model (and so on its copies): prepared once


@dataclass(frozen=True)
class Swap:
    """`camera` is served `current` from now on (`previous` None: the camera was not served before)."""

    camera: str
    previous: str | None
    current: ModelVersion


@dataclass(frozen=True)
class LoadResult:
    """What the loader made of one version: the model, or the error (`outage`: Redis failed, not the version)."""

    version: str
    model: ModelVersion | None
    error: str = ""
    outage: bool = False
    seconds: float = 0.0


class ServedModels:
    """The camera -> model version map of one worker, and its background loader.

    The worker loop owns the map (`models`, `follow`, `close` are called from it only); the loader thread
    shares only `_loaded` (under `_lock`) and the request and result queues.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        cache_dir: str | Path,
        device: torch.device,
        refresh_s: float,
        fallback: ModelVersion,
        on_swap: Callable[[Swap], None],
        on_load_failed: Callable[[str, str], None] | None = None,
        load_queue: int = 8,
        load_retry_s: float = 60.0,
        options: ServingOptions = FP32,
    ) -> None:
        """`fallback` is prepared for `options` here, in place (see the module docstring)."""
        if options.fold_batch_norm or options.precision == "bf16":
            raise ValueError(f"the worker cannot serve {options}: adapters are loaded into its extractor's blocks")
        self.options = options
        prepare(fallback.model, options)
        self.registry = registry
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.refresh_s = refresh_s
        self.fallback = fallback
        self.on_swap = on_swap
        self.on_load_failed = on_load_failed
        self.load_retry_s = load_retry_s
        self._lock = threading.Lock()
        self._loaded: dict[str, ModelVersion] = {fallback.version: fallback}  # shared with the loader
        self._served: dict[str, str] = {}  # camera -> version id it is served
        self._wanted: dict[str, str] = {}  # camera -> version id it moves to once loaded
        self._loading: set[str] = set()  # queued or being built
        self._retry_at: dict[str, float] = {}  # version -> monotonic time before which a failed load waits
        self._failed: dict[str, str] = {}  # version -> why its last load failed (until one succeeds)
        self._requests: queue.Queue[str | None] = queue.Queue(maxsize=load_queue)
        self._results: queue.Queue[LoadResult] = queue.Queue()
        self._stopping = threading.Event()
        self._loader = threading.Thread(target=self._load_forever, name="model-loader", daemon=True)
        self._loader.start()
        self._pubsub: PubSub | None = None
        self._next_refresh = 0.0
        self._log = structlog.get_logger()

    def bootstrap(self, model_dir: str | Path) -> None:
        """Publish the configured version and make it the default unless the registry has one already.

        Idempotent, and safe when several workers start together: publishing is, and the activation is a
        transaction that does nothing once any default is set (an operator's choice is never replaced).
        """
        if self.registry.active_in(DEFAULT_SCOPE) is not None:
            return
        manifest = self.registry.publish(model_dir)
        if self.registry.activate(DEFAULT_SCOPE, manifest.version, if_unset=True) is not None:
            self._log.info("default model version set", version=manifest.version, model_dir=str(model_dir))

    def models(self, cameras: Collection[str]) -> dict[str, ModelVersion]:
        """The version each camera is served for the coming batch: finished loads are swapped in first,
        and a camera seen for the first time is resolved now (served a stand-in while its version loads)."""
        self._take_results()
        for camera in cameras:
            if camera not in self._served:
                self._resolve(camera)
        with self._lock:
            return {camera: self._loaded[self._served[camera]] for camera in cameras}

    def follow(self) -> None:
        """Between batches: swap in finished loads; re-resolve the known cameras after an announcement, a
        (re)subscription, or refresh_s; queue loads whose retry time has come."""
        cue = self._announced()
        self._take_results()
        now = time.monotonic()
        if cue or now >= self._next_refresh:
            self._next_refresh = now + self.refresh_s
            for camera in list(self._served):
                self._resolve(camera)
            self._evict()
        for version in set(self._wanted.values()):
            self._request(version)

    def forget(self, cameras: Collection[str]) -> None:
        """These cameras left this worker (their partition moved, or they were idle longest): their next frame,
        if any, resolves their version again."""
        for camera in cameras:
            self._served.pop(camera, None)
            self._wanted.pop(camera, None)

    @property
    def cameras(self) -> set[str]:
        """The cameras this worker has a version for."""
        return set(self._served)

    def load_state(self) -> dict[str, dict[str, str]]:
        """For /readyz, from another thread (dict copies are atomic): the cameras waiting for a version to
        load (served a stand-in meanwhile) and the versions whose last load failed, with the error."""
        return {"loading": dict(self._wanted), "failed": dict(self._failed)}

    def loading(self) -> dict[str, str]:
        """Cameras waiting for a version to load: camera -> that version."""
        return dict(self._wanted)

    def close(self) -> None:
        """Stop the loader (a load in progress is abandoned after STOP_WAIT_S) and the subscription."""
        self._stopping.set()
        try:
            self._requests.put_nowait(None)
        except queue.Full:
            pass  # the loader sees `_stopping` after the load it is in
        self._loader.join(STOP_WAIT_S)
        self._unsubscribe()

    def _unsubscribe(self) -> None:
        if self._pubsub is not None:
            self._pubsub.close()
            self._pubsub = None

    def _announced(self) -> bool:
        """Whether anything changed may have been announced: a message, or a fresh subscription (before
        which announcements were lost). A Redis error drops the subscription, so the retry resubscribes."""
        try:
            if self._pubsub is None:
                self._pubsub = self.registry.client.pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(self.registry.keys.models_channel)
                return True
            cue = False
            for _ in range(MAX_MESSAGES):
                message = self._pubsub.get_message(timeout=0.0)
                if message is None:
                    break
                cue = True
                self._read_announcement(message["data"])
            return cue
        except redis.RedisError:
            self._unsubscribe()
            raise

    def _read_announcement(self, data: bytes) -> None:
        """Log it; a version it names that failed to load may be tried again at once (republished, fixed)."""
        try:
            a = Announcement.from_json(data)
        except (ValueError, TypeError) as exc:
            self._log.warning("unreadable model announcement", error=str(exc))
            return
        self._log.info("model announcement", action=a.action, scope=a.scope, version=a.version, previous=a.previous)
        if a.version is not None:
            self._retry_at.pop(a.version, None)

    def _resolve(self, camera: str) -> None:
        previous = self._served.get(camera)
        version = self.registry.active(camera) or self.fallback.version
        if version == previous:
            self._wanted.pop(camera, None)
            return
        with self._lock:
            model = self._loaded.get(version)
        if model is not None:
            self._wanted.pop(camera, None)
            self._swap(camera, model)
            return
        self._wanted[camera] = version
        self._request(version)
        if previous is None:
            self._swap(camera, self._stand_in())

    def _stand_in(self) -> ModelVersion:
        """For a new camera whose version is loading: the default scope's version if it is loaded (what most
        cameras serve), else the configured one."""
        raw = self.registry.client.get(self.registry.keys.active(DEFAULT_SCOPE))
        with self._lock:
            return self._loaded.get(raw.decode(), self.fallback) if raw is not None else self.fallback

    def _swap(self, camera: str, model: ModelVersion) -> None:
        previous = self._served.get(camera)
        self._served[camera] = model.version
        self.on_swap(Swap(camera, previous, model))

    def _request(self, version: str) -> None:
        """Queue a load of `version` unless it is loaded, queued, waiting out a failure, or the queue is full
        (then `follow` asks again)."""
        if version in self._loading or time.monotonic() < self._retry_at.get(version, 0.0):
            return
        with self._lock:
            if version in self._loaded:
                return
        try:
            self._requests.put_nowait(version)
        except queue.Full:
            return
        self._loading.add(version)

    def _take_results(self) -> None:
        """Finished loads, on the loop: swap the cameras waiting for a loaded version, note failures."""
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                return
            self._loading.discard(result.version)
            if result.model is not None:
                self._retry_at.pop(result.version, None)
                self._failed.pop(result.version, None)
                self._log.info(
                    "model version loaded",
                    version=result.version,
                    lineage=list(result.model.lineage),
                    seconds=round(result.seconds, 3),
                )
                for camera, version in list(self._wanted.items()):
                    if version == result.version:
                        del self._wanted[camera]
                        self._swap(camera, result.model)
            elif result.outage:
                self._retry_at[result.version] = time.monotonic() + self.refresh_s
                self._log.warning("cannot load model version: Redis", version=result.version, error=result.error)
            else:
                self._retry_at[result.version] = time.monotonic() + self.load_retry_s
                self._failed[result.version] = result.error
                self._log.error(
                    "cannot load model version",
                    version=result.version,
                    error=result.error,
                    retry_in_s=self.load_retry_s,
                )
                if self.on_load_failed is not None:
                    self.on_load_failed(result.version, result.error)

    def _evict(self) -> None:
        """Drop loaded versions no camera is served or waits for (keeping their bases, and the fallback).
        A dropped adapted version frees its own blocks only; its base's tensors stay with the base."""
        keep = {self.fallback.version}
        with self._lock:
            for version in {*self._served.values(), *self._wanted.values()}:
                loaded = self._loaded.get(version)
                keep.update(loaded.lineage if loaded is not None else (version,))
            for version in set(self._loaded) - keep:
                del self._loaded[version]

    # the loader thread -------------------------------------------------------------------------
    def _load_forever(self) -> None:
        # One OpenMP thread here: this thread lives as long as the worker, and so would a team of its own,
        # which slows every forward pass of the scoring thread (libgomp spins less once it manages more
        # threads than there are CPUs). Loading is I/O and copies; the scoring thread keeps its own count.
        torch.set_num_threads(1)
        while not self._stopping.is_set():
            version = self._requests.get()
            if version is None or self._stopping.is_set():
                return
            started = time.perf_counter()
            try:
                model = self._build(version)
            except redis.RedisError as exc:
                result = LoadResult(version, None, _describe(exc), outage=True)
            except Exception as exc:  # whatever the artifact does, the camera keeps serving what works
                result = LoadResult(version, None, _describe(exc))
            else:
                result = LoadResult(version, model, seconds=time.perf_counter() - started)
            self._results.put(result)

    def _build(self, version: str) -> ModelVersion:
        """Materialise and load `version`; an adapted one onto its base (loaded first when it is not).
        The result, and its base, are in `_loaded` when this returns."""
        directory = self.registry.materialise(version, self.cache_dir)
        base_id = lineage(directory)[-1]
        with self._lock:
            base = self._loaded.get(base_id)
        if base is None:
            base_dir = directory if base_id == version else self.registry.materialise(base_id, self.cache_dir)
            base = load_model(base_dir, str(self.device))
            prepare(base.model, self.options)
        model = base if base_id == version else load_adapted(directory, base)
        prepare(model.model, self.options)  # built on the prepared base: already is (its copies keep the mark)
        _check_threshold(model)
        with self._lock:
            if math.isfinite(base.threshold):  # else it may hold the flow, but never serves
                self._loaded.setdefault(base_id, base)
            self._loaded[version] = model
        return model


def prepare(model: CSFlow, options: ServingOptions) -> None:
    """Prepare `model` in place for `options` unless it (or the model it was copied from) already is; a model
    prepared for other options cannot be undone, so that is an error."""
    done = getattr(model, PREPARED, None)
    if done is None:
        prepare_for_serving(model, options)
        setattr(model, PREPARED, options)
    elif done != options:
        raise ValueError(f"the model was prepared for {done}, not {options}")


def _check_threshold(model: ModelVersion) -> None:
    if not math.isfinite(model.threshold):
        raise ArtifactError(f"version {model.version}: threshold {model.threshold} is not a finite number")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"

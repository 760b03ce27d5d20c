"""Which model version each camera is served, loaded once per worker and swapped only between batches.

A camera serves what the registry resolves for it (`camera:ID` -> `line:NAME` -> `default`,
`ModelRegistry.active`).
Announcements on the models channel are cues to re-resolve every known camera. Pub/sub is at-most-once
(a reconnect or a slow reader loses messages), so the cameras are also re-resolved right after each
(re)subscription and every [registry] refresh_s.

Versions are materialised into [registry] cache_dir and loaded once, cached by version id. An adapted
version shares its base's flow module when the base is loaded too: both are the same verified tensors
(the base's version id is the hash of its flow file), the flow is frozen, and at B5 it is hundreds of MB.
A version that cannot be loaded (a missing base path, a corrupt blob, a threshold that is not a finite
number, or any exception while loading) is logged, reported to `on_load_failed`, and the camera keeps
what it served; a camera with nothing yet falls back to the worker's configured version ([worker]
model_dir). The registry refuses a non-finite threshold at publish; a version written by other means is
checked here again, since `nan > threshold` and `score > nan` are both False: every frame would pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import redis
import structlog
import torch
from redis.client import PubSub

from csflow.artifacts import ArtifactError, ModelVersion, load_model
from daemon.registry import DEFAULT_SCOPE, Announcement, ModelRegistry

MAX_MESSAGES = 1000  # announcements taken per call, so a flood cannot hold the loop


@dataclass(frozen=True)
class Swap:
    """`camera` is served `current` from now on (`previous` None: the camera was not served before)."""

    camera: str
    previous: str | None
    current: ModelVersion


class ServedModels:
    """The camera -> model version map of one worker. Not thread-safe: the worker loop owns it."""

    def __init__(
        self,
        registry: ModelRegistry,
        cache_dir: str | Path,
        device: torch.device,
        refresh_s: float,
        fallback: ModelVersion,
        on_swap: Callable[[Swap], None],
        on_load_failed: Callable[[str, str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.refresh_s = refresh_s
        self.fallback = fallback
        self.on_swap = on_swap
        self.on_load_failed = on_load_failed
        self._loaded: dict[str, ModelVersion] = {fallback.version: fallback}
        self._served: dict[str, str] = {}  # camera -> version id
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
        """The version each camera is served; a camera seen for the first time is resolved now."""
        for camera in cameras:
            if camera not in self._served:
                self._resolve(camera)
        return {camera: self._loaded[self._served[camera]] for camera in cameras}

    def follow(self) -> None:
        """Between batches: re-resolve the known cameras after an announcement, a (re)subscription, or
        refresh_s; each camera whose version changed is swapped and reported to `on_swap`."""
        cue = self._announced()
        now = time.monotonic()
        if not cue and now < self._next_refresh:
            return
        self._next_refresh = now + self.refresh_s
        for camera in list(self._served):
            self._resolve(camera)
        self._evict()

    def close(self) -> None:
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
                self._log_announcement(message["data"])
            return cue
        except redis.RedisError:
            self.close()
            raise

    def _log_announcement(self, data: bytes) -> None:
        try:
            a = Announcement.from_json(data)
        except (ValueError, TypeError) as exc:
            self._log.warning("unreadable model announcement", error=str(exc))
            return
        self._log.info("model announcement", action=a.action, scope=a.scope, version=a.version, previous=a.previous)

    def _resolve(self, camera: str) -> None:
        previous = self._served.get(camera)
        version = self.registry.active(camera) or self.fallback.version
        if version == previous:
            return
        model = self._load(version)
        if model is None:
            if previous is not None:
                return  # keep serving what works; the next refresh tries again
            model = self.fallback
        self._served[camera] = model.version
        self.on_swap(Swap(camera, previous, model))

    def _load(self, version: str) -> ModelVersion | None:
        if version in self._loaded:
            return self._loaded[version]
        try:
            loaded = load_model(self.registry.materialise(version, self.cache_dir), str(self.device))
            if not math.isfinite(loaded.threshold):
                raise ArtifactError(f"version {version}: threshold {loaded.threshold} is not a finite number")
        except redis.RedisError:
            raise  # an outage: the worker retries the whole resolution
        except Exception as exc:  # whatever the artifact does, the camera keeps serving what works
            self._log.error("cannot load model version", version=version, error=f"{type(exc).__name__}: {exc}")
            if self.on_load_failed is not None:
                self.on_load_failed(version, f"{type(exc).__name__}: {exc}")
            return None
        base = self._loaded.get(loaded.lineage[-1])
        if base is not None and base is not loaded:
            loaded.model.flow = base.model.flow
        self._loaded[version] = loaded
        self._log.info("model version loaded", version=version, lineage=list(loaded.lineage))
        return loaded

    def _evict(self) -> None:
        """Drop loaded versions no camera is served (keeping the bases of served ones, and the fallback)."""
        keep = {self.fallback.version}
        for version in set(self._served.values()):
            keep.update(self._loaded[version].lineage)
        for version in set(self._loaded) - keep:
            del self._loaded[version]

"""The worker's first model: the configured directory, else the registry's default version.

A worker started before any model exists (a fresh deployment, a volume not yet filled) must not crash-loop:
it serves /healthz, answers /readyz with 503 naming the missing model, and waits until a model appears in
[worker] model_dir or an operator publishes one as the registry's default (`inspectd models publish DIR
--activate`). A model that exists but is broken (a hash mismatch, an old flow revision) is an error, not
something to wait for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import redis
import structlog
from prometheus_client import CollectorRegistry

from csflow.artifacts import MANIFEST, ModelVersion, load_model
from daemon.config import Settings
from daemon.health import HealthServer
from daemon.registry import DEFAULT_SCOPE, ModelRegistry, RegistryError

Loader = Callable[[], ModelVersion | None]


def configured_or_published(settings: Settings, device: str) -> Loader:
    """A loader of the configured directory's model, else the registry's default version, else None."""
    model_dir = Path(settings.worker.model_dir)

    def load() -> ModelVersion | None:
        if (model_dir / MANIFEST).is_file():
            return load_model(model_dir, device)
        client = settings.redis.client()
        try:
            registry = ModelRegistry.from_settings(client, settings)
            version = registry.active(DEFAULT_SCOPE)
            if version is None:
                return None
            return load_model(registry.materialise(version, settings.registry.cache_dir), device)
        except (redis.RedisError, RegistryError):
            return None  # Redis not there yet: keep waiting, /readyz says why
        finally:
            client.close()

    return load


def wait_for_model(settings: Settings, load: Loader, stop: threading.Event) -> ModelVersion | None:
    """`load()` until it returns a model, serving health meanwhile; None when `stop` is set first."""
    version = load()
    if version is not None or stop.is_set():
        return version
    cfg = settings.worker
    reason = (
        f"no model in {cfg.model_dir} ({MANIFEST} missing) and no default version in the registry: train one "
        f"into it (inspectd train --out {cfg.model_dir}) or publish one (inspectd models publish DIR --activate)"
    )
    log = structlog.get_logger()
    log.warning("waiting for a model", reason=reason)
    health = HealthServer(
        cfg.http_host, cfg.http_port, CollectorRegistry(), lambda: {"model": reason}, lambda: None, cfg.http_timeout_s
    )
    health.start()
    try:
        while not stop.wait(settings.registry.refresh_s):
            version = load()
            if version is not None:
                log.info("model found", version=version.version)
                return version
        return None
    finally:
        health.stop()

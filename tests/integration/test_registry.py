"""The model registry against a real Redis: publish, activate, roll back, announce, materialise, refuse."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis
import torch
from torch import Tensor

from adapters.adapt import AdaptConfig, adapt
from cli.main import main
from csflow.artifacts import DELTA_FILE, FLOW_FILE, ArtifactError, Manifest, load_model, save_adapter, save_model
from csflow.backbones import LITE0_PACKAGE
from csflow.calibration import calibrate
from csflow.model import CSFlow, image_scores
from daemon.events import EventKind, EventLog
from daemon.registry import Announcement, ModelRegistry, RegistryError, UnknownVersionError
from daemon.store import Keys
from lab.services import LocalRedis

KEYS = Keys("t:")
N_CONCURRENT = 8


@dataclass(frozen=True)
class Versions:
    base_dir: Path
    base: Manifest
    adapter_dir: Path
    adapter: Manifest
    others: list[Path]  # more base versions (same weights, another summary), for concurrency


@pytest.fixture(scope="module")
def versions(
    make_tiny_model: Callable[..., CSFlow], make_images: Callable[..., Tensor], tmp_path_factory: pytest.TempPathFactory
) -> Versions:
    root = tmp_path_factory.mktemp("versions")
    model = make_tiny_model(seed=6)
    with torch.no_grad():
        calibration = calibrate(image_scores(model(make_images(6, seed=1)).z).numpy(), 0.2)
    base = save_model(root / "base", model, LITE0_PACKAGE, calibration, {"purpose": "registry tests"})
    parent = load_model(root / "base")
    result = adapt(parent, make_images(2, seed=9), AdaptConfig(lr=1e-3, max_steps=2, stop_quantile=None))
    adapter = save_adapter(
        root / "adapted", result.model, parent, result.block_names, result.summary(), "line-3/dark", root / "base"
    )
    others = [root / f"other-{i}" for i in range(N_CONCURRENT)]
    for i, directory in enumerate(others):
        save_model(directory, model, LITE0_PACKAGE, calibration, {"copy": i})
    return Versions(root / "base", base, root / "adapted", adapter, others)


def make_registry(client: redis.Redis, max_blob_bytes: int = 1 << 24, history_len: int = 10) -> ModelRegistry:
    events = EventLog(client, KEYS, max_len=1000)
    return ModelRegistry(client, KEYS, events, max_blob_bytes, history_len, {"cam-1": "line-3"})


@pytest.fixture
def registry(client: redis.Redis) -> ModelRegistry:
    return make_registry(client)


@pytest.fixture
def published(registry: ModelRegistry, versions: Versions) -> ModelRegistry:
    registry.publish(versions.base_dir)
    registry.publish(versions.adapter_dir)
    return registry


def announcements(pubsub: redis.client.PubSub) -> list[Announcement]:
    found = []
    while (message := pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)) is not None:
        found.append(Announcement.from_json(message["data"]))
    return found


def subscribe(client: redis.Redis) -> redis.client.PubSub:
    pubsub = client.pubsub()
    pubsub.subscribe(KEYS.models_channel)
    pubsub.get_message(timeout=1)  # the subscription's confirmation
    return pubsub


def test_base_by_path_adapter_by_blob(published: ModelRegistry, versions: Versions, client: redis.Redis) -> None:
    base, adapter = versions.base.version, versions.adapter.version
    assert sorted(published.versions()) == sorted([base, adapter])  # publish order, ties in id order
    assert published.manifest(adapter) == replace(versions.adapter, parent_path=None)  # location is not content
    base_fields = client.hgetall(KEYS.model(base))
    assert set(base_fields) == {b"manifest", b"path"}  # never the flow's tensors
    assert published.base_path(base) == versions.base_dir.resolve()
    adapter_fields = client.hgetall(KEYS.model(adapter))
    assert set(adapter_fields) == {b"manifest", f"file:{DELTA_FILE}".encode()}
    assert adapter_fields[f"file:{DELTA_FILE}".encode()] == (versions.adapter_dir / DELTA_FILE).read_bytes()
    assert published.base_path(adapter) is None


def test_publish_is_idempotent_and_needs_the_parent(registry: ModelRegistry, versions: Versions) -> None:
    with pytest.raises(RegistryError, match=f"parent version {versions.base.version} .* not registered"):
        registry.publish(versions.adapter_dir)
    assert registry.versions() == []
    for _ in range(2):
        assert registry.publish(versions.base_dir).version == versions.base.version
        assert registry.publish(versions.adapter_dir).version == versions.adapter.version
    assert sorted(registry.versions()) == sorted([versions.base.version, versions.adapter.version])


def test_activate_resolve_history_rollback_announce(published: ModelRegistry, versions: Versions) -> None:
    base, adapter = versions.base.version, versions.adapter.version
    pubsub = subscribe(published.client)
    assert published.active("cam-1") is None
    published.activate("default", base)
    assert published.active("cam-1") == published.active("cam-9") == base
    published.activate("line-3", adapter)
    assert published.scopes("cam-1") == ["cam-1", "line-3", "default"]
    assert [published.active(s) for s in ("cam-1", "line-3", "cam-9")] == [adapter, adapter, base]
    assert published.activate("line-3", adapter) is None  # already active: nothing recorded
    published.activate("cam-1", base)
    published.activate("cam-1", adapter)
    assert published.history("cam-1") == [adapter, base]
    assert published.actives() == {"cam-1": adapter, "default": base, "line-3": adapter}

    back = published.rollback("cam-1")
    assert (back.version, back.previous) == (base, adapter)
    assert published.active("cam-1") == base and published.history("cam-1") == [base]
    with pytest.raises(RegistryError, match=r"no earlier version.*only"):
        published.rollback("cam-1")
    with pytest.raises(RegistryError, match=r"no earlier version.*no version"):
        published.rollback("line-9")

    got = [(a.action, a.scope, a.version, a.previous) for a in announcements(pubsub)]
    assert got == [
        ("activate", "default", base, None),
        ("activate", "line-3", adapter, None),
        ("activate", "cam-1", base, None),
        ("activate", "cam-1", adapter, base),
        ("rollback", "cam-1", base, adapter),
    ]
    events = published.events.recent()[::-1]
    assert [(e.kind, e.scope, e.version, e.detail["previous"]) for e in events] == [
        (EventKind.VERSION_ACTIVATED if action == "activate" else EventKind.ROLLBACK, *rest) for action, *rest in got
    ]


def test_history_is_capped(client: redis.Redis, versions: Versions) -> None:
    registry = make_registry(client, history_len=3)
    for directory in versions.others[:5]:
        registry.activate("default", registry.publish(directory).version)
    assert len(registry.history("default")) == 3


def test_unknown_versions_and_bad_scopes(published: ModelRegistry, tmp_path: Path) -> None:
    for call in (
        lambda: published.activate("default", "nope"),
        lambda: published.manifest("nope"),
        lambda: published.materialise("nope", tmp_path),
    ):
        with pytest.raises(UnknownVersionError, match="'nope'"):
            call()
    with pytest.raises(RegistryError, match="scope"):
        published.activate("line *", published.versions()[0])
    assert published.actives() == {}


def test_materialised_adapter_scores_bit_identically(
    published: ModelRegistry, versions: Versions, make_images: Callable[..., Tensor], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    path = published.materialise(versions.adapter.version, cache)
    assert path == cache / versions.adapter.version
    assert (cache / versions.base.version).resolve() == versions.base_dir.resolve()  # linked, not copied
    assert sorted(p.name for p in cache.iterdir()) == sorted([versions.base.version, versions.adapter.version])
    loaded, original = load_model(path), load_model(versions.adapter_dir)
    assert loaded.lineage == original.lineage == (versions.adapter.version, versions.base.version)
    images = make_images(3, seed=4)
    with torch.no_grad():
        assert torch.equal(image_scores(loaded.model(images).z), image_scores(original.model(images).z))
    assert published.materialise(versions.adapter.version, cache) == path  # again: kept, still loadable
    assert load_model(published.materialise(versions.base.version, cache)).version == versions.base.version


def test_tampered_registry_is_refused(
    published: ModelRegistry, versions: Versions, client: redis.Redis, tmp_path: Path
) -> None:
    key, field = KEYS.model(versions.adapter.version), f"file:{DELTA_FILE}"
    blob = bytearray(client.hget(key, field))
    blob[-10] ^= 0x01
    client.hset(key, field, bytes(blob))
    with pytest.raises(RegistryError, match="sha256"):
        published.materialise(versions.adapter.version, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written

    manifest = json.loads(client.hget(key, "manifest"))
    client.hset(key, "manifest", json.dumps({**manifest, "calibration": {**manifest["calibration"], "threshold": 1e9}}))
    with pytest.raises(RegistryError, match="does not match"):
        published.materialise(versions.adapter.version, tmp_path)

    other = published.publish(versions.others[0]).version
    client.hset(KEYS.model(other), "path", str(versions.base_dir.resolve()))  # now points at another version
    with pytest.raises(RegistryError, match="which holds"):
        published.materialise(other, tmp_path)


def test_version_registered_under_an_older_flow_revision_is_refused(
    published: ModelRegistry, versions: Versions, client: redis.Redis
) -> None:
    """A version registered before the flow fix (its stored manifest has no flow revision, with a
    consistent id) must not reach a worker: the registry says to retrain instead of "edited"."""
    key = KEYS.model(versions.base.version)
    manifest = json.loads(client.hget(key, "manifest"))
    del manifest["flow_revision"]
    client.hset(key, "manifest", json.dumps(manifest))
    with pytest.raises(RegistryError, match=r"revision 1.*retrain"):
        published.manifest(versions.base.version)


def test_blob_size_is_bounded(client: redis.Redis, versions: Versions, tmp_path: Path) -> None:
    size = (versions.adapter_dir / DELTA_FILE).stat().st_size
    small = make_registry(client, max_blob_bytes=size - 1)
    small.publish(versions.base_dir)
    with pytest.raises(RegistryError, match="max_blob_bytes"):
        small.publish(versions.adapter_dir)
    make_registry(client).publish(versions.adapter_dir)
    with pytest.raises(RegistryError, match=f"{size} bytes, more than the limit"):
        small.materialise(versions.adapter.version, tmp_path)


def test_publish_refuses_a_corrupt_base(registry: ModelRegistry, versions: Versions, tmp_path: Path) -> None:
    copy = tmp_path / "base"
    copy.mkdir()
    for f in versions.base_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    raw = bytearray((copy / FLOW_FILE).read_bytes())
    raw[-10] ^= 0x01
    (copy / FLOW_FILE).write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        registry.publish(copy)
    assert registry.versions() == []


def test_concurrent_activations_serialise(client: redis.Redis, versions: Versions) -> None:
    """Racing activations each commit whole: the announcements form one chain, each naming the version the
    one before it activated, and history and events agree with them."""
    registry = make_registry(client, history_len=100)
    ids = [registry.publish(d).version for d in versions.others]
    pubsub = subscribe(client)
    start = threading.Barrier(len(ids))

    def activate(version: str) -> None:
        start.wait()
        registry.activate("line-3", version)

    threads = [threading.Thread(target=activate, args=(v,)) for v in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = announcements(pubsub)
    assert sorted(a.version for a in got) == sorted(ids)
    assert [a.previous for a in got] == [None, *[a.version for a in got[:-1]]]
    assert registry.history("line-3") == [a.version for a in reversed(got)]
    assert registry.active("line-3") == got[-1].version
    assert [e.version for e in registry.events.recent()] == registry.history("line-3")


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, redis_server: LocalRedis) -> None:
    for k in [k for k in os.environ if k.startswith("INSPECTD_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("INSPECTD_REDIS__URL", redis_server.url)
    monkeypatch.setenv("INSPECTD_REDIS__KEY_PREFIX", KEYS.prefix)


@pytest.mark.usefixtures("cli_env")
def test_cli_publish_activate_list_show_rollback(
    versions: Versions, registry: ModelRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = versions.base.version, versions.adapter.version
    assert main(["models", "publish", str(versions.adapter_dir)]) == 1
    assert f"parent version {base}" in capsys.readouterr().err
    assert main(["models", "publish", str(versions.base_dir), "--activate"]) == 0
    assert main(["models", "publish", str(versions.base_dir)]) == 0
    assert main(["models", "publish", str(versions.adapter_dir), "--activate", "--scope", "line-3"]) == 0
    out = capsys.readouterr().out
    assert f"published {base} (base at {versions.base_dir.resolve()})" in out
    assert f"already registered: {base}" in out
    assert f"{adapter} is now active in scope line-3 (it had none)" in out

    assert main(["models", "list", "--json"]) == 0
    rows = {r["version"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[base]["active_in"] == ["default"] and rows[base]["kind"] == "base"
    assert rows[adapter]["active_in"] == ["line-3"] and rows[adapter]["parent"] == base
    assert main(["models", "list"]) == 0
    assert "active in: line-3" in capsys.readouterr().out
    assert main(["models", "show", adapter]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["manifest"]["version"] == adapter and shown["path"] is None

    assert main(["models", "activate", base, "--scope", "line-3"]) == 0
    assert f"{base} is now active in scope line-3 (was {adapter})" in capsys.readouterr().out
    assert main(["models", "rollback", "--scope", "line-3"]) == 0
    assert f"rolled back from {base} to {adapter}" in capsys.readouterr().out
    assert registry.active("cam-1") == adapter


@pytest.mark.usefixtures("cli_env")
def test_cli_errors_an_operator_understands(
    versions: Versions, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["models", "activate", "0123abcd"], ["models", "show", "0123abcd"]):
        assert main(argv) == 2
        assert "unknown model version '0123abcd'" in capsys.readouterr().err
    assert main(["models", "rollback", "--scope", "line-3"]) == 1
    assert "no earlier version to roll back to" in capsys.readouterr().err
    assert main(["models", "publish", str(versions.base_dir), "--scope", "line-3"]) == 2
    assert "--scope needs --activate" in capsys.readouterr().err
    monkeypatch.setenv("INSPECTD_REDIS__URL", "redis://127.0.0.1:1/0")
    assert main(["models", "list"]) == 1
    assert "inspectd: error: Redis:" in capsys.readouterr().err

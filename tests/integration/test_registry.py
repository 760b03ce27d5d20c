"""The model registry against a real Redis: publish, activate, roll back, announce, materialise, refuse."""

from __future__ import annotations

import json
import os
import threading
import time
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
from daemon.config import RegistrySection
from daemon.events import EventKind, EventLog
from daemon.frames import ID_PATTERN as FRAME_ID_PATTERN
from daemon.registry import REFUSED, UNPINNED, Announcement, ModelRegistry, RegistryError, UnknownVersionError
from daemon.scopes import DEFAULT_SCOPE, camera_scope, line_scope
from daemon.scopes import ID_PATTERN as SCOPE_ID_PATTERN
from daemon.serving import ServedModels, Swap
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
    published.activate("line:line-3", adapter)
    assert published.scopes("cam-1") == ["camera:cam-1", "line:line-3", "default"]
    assert published.scopes("cam-9") == ["camera:cam-9", "default"]
    assert [published.active(c) for c in ("cam-1", "cam-9")] == [adapter, base]
    assert published.active_in("line:line-3") == adapter and published.active_in("camera:cam-1") is None
    assert published.activate("line:line-3", adapter) is None  # already active: nothing recorded
    published.activate("camera:cam-1", base)
    published.activate("camera:cam-1", adapter)
    assert published.history("camera:cam-1") == [adapter, base]
    assert published.actives() == {"camera:cam-1": adapter, "default": base, "line:line-3": adapter}

    back = published.rollback("camera:cam-1")
    assert (back.version, back.previous) == (base, adapter)
    assert published.active("cam-1") == base and published.history("camera:cam-1") == [base]
    with pytest.raises(RegistryError, match=r"no earlier version.*only"):
        published.rollback("camera:cam-1")
    with pytest.raises(RegistryError, match=r"no earlier version.*no version"):
        published.rollback("line:line-9")

    got = [(a.action, a.scope, a.version, a.previous) for a in announcements(pubsub)]
    assert got == [
        ("activate", "default", base, None),
        ("activate", "line:line-3", adapter, None),
        ("activate", "camera:cam-1", base, None),
        ("activate", "camera:cam-1", adapter, base),
        ("rollback", "camera:cam-1", base, adapter),
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


@pytest.mark.parametrize(
    "scope, message",
    [
        ("cam-1", r"'cam-1' is not one of camera:ID, line:NAME or default.*did you mean camera:cam-1 or line:cam-1"),
        ("line-3", r"did you mean camera:line-3 or line:line-3"),
        ("Default", r"'Default' is not one of"),
        ("", r"'' is not one of"),
        ("camera:", r"camera id '' must be"),
        ("camera:a:b", r"camera id 'a:b' must be"),
        ("line:l *", r"line name 'l \*' must be"),
        ("line:" + "x" * 129, r"line name 'x+' must be"),
        ("device:cam-1", r"'device:cam-1' is not one of"),
        ("camera:cam-1\n", r"camera id 'cam-1\\n' must be"),
    ],
)
def test_untyped_or_malformed_scopes_are_refused_with_the_form_expected(
    published: ModelRegistry, versions: Versions, scope: str, message: str
) -> None:
    """Before the types, a bare name was a scope: `cam-1`, `line-3` and every other string were accepted."""
    for call in (
        lambda: published.activate(scope, versions.base.version),
        lambda: published.rollback(scope),
        lambda: published.unpin(scope),
        lambda: published.history(scope),
        lambda: published.active_in(scope),
    ):
        with pytest.raises(RegistryError, match=message):
            call()
    assert published.actives() == {} and published.events.recent() == []


def test_a_camera_called_default_pins_only_itself(published: ModelRegistry, versions: Versions) -> None:
    """Before the types, `activate("default", v)` for the camera called `default` changed the whole plant."""
    base, adapter = versions.base.version, versions.adapter.version
    published.activate(DEFAULT_SCOPE, base)
    published.activate(camera_scope("default"), adapter)
    assert published.active("default") == adapter  # the camera
    assert published.active_in(DEFAULT_SCOPE) == base and published.history(DEFAULT_SCOPE) == [base]
    assert published.active("cam-9") == base and published.active("cam-1") == base
    assert published.actives() == {"camera:default": adapter, "default": base}
    assert [(e.scope, e.version) for e in published.events.recent()] == [("camera:default", adapter), ("default", base)]


def test_a_camera_named_like_a_line_does_not_change_the_line(
    client: redis.Redis, published: ModelRegistry, versions: Versions
) -> None:
    """cam-1 is on line-3; a camera whose id is `line-3` pins itself, never the line's cameras."""
    base, adapter = versions.base.version, versions.adapter.version
    published.activate(DEFAULT_SCOPE, base)
    published.activate(line_scope("line-3"), base)
    published.activate(camera_scope("line-3"), adapter)
    assert published.active("line-3") == adapter  # the camera called line-3
    assert published.active("cam-1") == base and published.active_in("line:line-3") == base
    assert client.get(KEYS.active("camera:line-3")) == adapter.encode()  # typed keys: no collision
    assert client.get(KEYS.active("line:line-3")) == base.encode()
    published.unpin(camera_scope("line-3"))
    assert published.active("line-3") == base and published.active_in("line:line-3") == base


def test_unpin_falls_back_to_the_line_then_the_default_and_is_recorded(
    published: ModelRegistry, versions: Versions
) -> None:
    base, adapter = versions.base.version, versions.adapter.version
    published.activate(DEFAULT_SCOPE, base)
    published.activate(line_scope("line-3"), adapter)
    published.activate(camera_scope("cam-1"), base)
    published.activate(camera_scope("cam-9"), adapter)  # cam-9 has no line
    pubsub = subscribe(published.client)

    change = published.unpin(camera_scope("cam-1"), author="anna")
    assert (change.action, change.scope, change.version, change.previous) == ("unpin", "camera:cam-1", None, base)
    assert published.active("cam-1") == adapter  # its line's
    assert published.active_in("camera:cam-1") is None and published.history("camera:cam-1") == [UNPINNED, base]
    published.unpin(camera_scope("cam-9"))
    assert published.active("cam-9") == base  # the default's
    with pytest.raises(RegistryError, match="no version of its own to unpin"):
        published.unpin(camera_scope("cam-1"))
    with pytest.raises(RegistryError, match="default scope cannot be unpinned"):
        published.unpin(DEFAULT_SCOPE)

    back = published.rollback(camera_scope("cam-1"))  # undoes the unpin: pinned again
    assert (back.version, back.previous) == (base, None) and published.active_in("camera:cam-1") == base
    published.unpin(camera_scope("cam-1"))
    published.activate(camera_scope("cam-1"), adapter)
    back = published.rollback(camera_scope("cam-1"))  # back to falling back, not to the old pin
    assert (back.version, back.previous) == (None, adapter) and published.active_in("camera:cam-1") is None
    assert published.active("cam-1") == adapter and published.history("camera:cam-1") == [UNPINNED, base]

    got = [(a.action, a.scope, a.version, a.previous) for a in announcements(pubsub)]
    assert got == [
        ("unpin", "camera:cam-1", None, base),
        ("unpin", "camera:cam-9", None, adapter),
        ("rollback", "camera:cam-1", base, None),
        ("unpin", "camera:cam-1", None, base),
        ("activate", "camera:cam-1", adapter, None),
        ("rollback", "camera:cam-1", None, adapter),
    ]
    events = published.events.recent(len(got))[::-1]
    assert [(e.kind, e.scope, e.version, e.detail["previous"]) for e in events[:2]] == [
        (EventKind.VERSION_UNPINNED, "camera:cam-1", "", base),
        (EventKind.VERSION_UNPINNED, "camera:cam-9", "", adapter),
    ]
    assert events[0].detail["author"] == "anna"


def test_workers_follow_an_unpin_to_the_line_version(
    published: ModelRegistry, versions: Versions, tmp_path: Path
) -> None:
    """A worker re-resolves on the unpin's announcement (its periodic re-read is an hour away here)."""
    base, adapter = versions.base.version, versions.adapter.version
    published.activate(DEFAULT_SCOPE, base)
    published.activate(line_scope("line-3"), adapter)
    published.activate(camera_scope("cam-1"), base)
    swaps: list[Swap] = []
    served = ServedModels(
        published, tmp_path / "cache", torch.device("cpu"), 3600.0, load_model(versions.base_dir), swaps.append
    )
    try:
        served.follow()  # subscribes
        assert {c: m.version for c, m in served.models(["cam-1", "cam-2"]).items()} == {"cam-1": base, "cam-2": base}
        published.unpin(camera_scope("cam-1"))
        deadline = time.monotonic() + 30  # the adapted version loads in the background
        while len(swaps) < 3 and time.monotonic() < deadline:
            served.follow()
            time.sleep(0.05)
        assert [(s.camera, s.previous, s.current.version) for s in swaps] == [
            ("cam-1", None, base),
            ("cam-2", None, base),
            ("cam-1", base, adapter),  # cam-1 now serves line-3's version; cam-2 (no line) is unchanged
        ]
    finally:
        served.close()


def test_line_names_and_camera_ids_in_the_config_are_scope_names() -> None:
    assert SCOPE_ID_PATTERN.pattern == FRAME_ID_PATTERN.pattern  # one definition of an id, two modules
    RegistrySection(lines={"cam-1": "line-3"})
    for lines in ({"cam 1": "line-3"}, {"cam-1": "line:3"}, {"cam-1": ""}):
        with pytest.raises(ValueError, match="camera ids and line names"):
            RegistrySection(lines=lines)


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
        registry.activate("line:line-3", version)

    threads = [threading.Thread(target=activate, args=(v,)) for v in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = announcements(pubsub)
    assert sorted(a.version for a in got) == sorted(ids)
    assert [a.previous for a in got] == [None, *[a.version for a in got[:-1]]]
    assert registry.history("line:line-3") == [a.version for a in reversed(got)]
    assert registry.active("cam-1") == got[-1].version
    assert [e.version for e in registry.events.recent()] == registry.history("line:line-3")


# ------------------------------------------------------------------------------------------------ kept refused


def refused_copies(versions: Versions, root: Path, n: int) -> list[Path]:
    """`n` refused candidates of cam-1 (the adapter's tensors, each with other failed checks: other ids)."""
    parent, adapted = load_model(versions.base_dir), load_model(versions.adapter_dir)
    blocks = versions.adapter.summary["adapted_blocks"]
    directories = []
    for i in range(n):
        summary = {**versions.adapter.summary, REFUSED: [f"FAIL shadow sensitivity: attempt {i}"]}
        save_adapter(root / f"refused-{i}", adapted.model, parent, blocks, summary, "cam-1", versions.base_dir)
        directories.append(root / f"refused-{i}")
    return directories


def test_a_cameras_kept_refused_candidates_are_bounded(
    registry: ModelRegistry, versions: Versions, client: redis.Redis, tmp_path: Path
) -> None:
    """Kept beyond the limit, the oldest is deleted whole and recorded; one activated since (forced), or one
    that a published version is built on, is never deleted, only no longer counted; an unrefused version is
    not kept this way."""
    registry.publish(versions.base_dir)
    ids = [registry.keep_refused(d, limit=2)[0].version for d in refused_copies(versions, tmp_path, 6)[:3]]
    assert len(set(ids)) == 3
    assert client.lrange(KEYS.kept_refused("cam-1"), 0, -1) == [ids[2].encode(), ids[1].encode()]
    assert ids[0] not in registry.versions() and not client.exists(KEYS.model(ids[0]))
    [removed] = [e for e in registry.events.recent() if e.kind == EventKind.VERSION_REMOVED]
    assert (removed.scope, removed.version) == ("cam-1", ids[0])
    with pytest.raises(UnknownVersionError):
        registry.activate("camera:cam-1", ids[0], force=True)

    registry.activate("camera:cam-1", ids[1], force=True)  # an operator forced it: it serves the camera
    child_root = tmp_path / "child"
    kept_dir = registry.materialise(ids[2], tmp_path / "cache")
    served, blocks = load_model(kept_dir), versions.adapter.summary["adapted_blocks"]
    save_adapter(child_root, served.model, served, blocks, {"built": "on a kept one"}, "cam-1", kept_dir)
    registry.publish(child_root)  # a version built on ids[2]
    more = [registry.keep_refused(d, limit=2) for d in refused_copies(versions, tmp_path / "more", 6)[3:5]]
    assert [r for _, r in more] == [[], []], "an activated version or a parent was removed"
    assert all(registry.registered(v) for v in ids[1:])
    assert client.lrange(KEYS.kept_refused("cam-1"), 0, -1) == [m.version.encode() for m, _ in reversed(more)]
    assert registry.active("cam-1") == ids[1]
    with pytest.raises(RegistryError, match="not marked refused"):
        registry.keep_refused(versions.adapter_dir, limit=2)


def test_an_activation_racing_a_removal_activates_nothing(
    registry: ModelRegistry, versions: Versions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept candidate removed between the check of its manifest and the activating transaction: the
    transaction sees it gone and refuses, where a pointer to a deleted version would stop the camera."""
    registry.publish(versions.base_dir)
    registry.activate("camera:cam-1", versions.base.version)
    kept = registry.keep_refused(refused_copies(versions, tmp_path, 1)[0], limit=1)[0].version
    read = registry.manifest

    def removed_meanwhile(version: str) -> Manifest:
        manifest = read(version)
        assert registry.remove_refused(version, "cam-1")
        return manifest

    monkeypatch.setattr(registry, "manifest", removed_meanwhile)
    with pytest.raises(UnknownVersionError):
        registry.activate("camera:cam-1", kept, force=True)
    assert registry.active("cam-1") == versions.base.version
    assert registry.history("camera:cam-1") == [versions.base.version]


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, redis_server: LocalRedis) -> None:
    for k in [k for k in os.environ if k.startswith("INSPECTD_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("INSPECTD_REDIS__URL", redis_server.url)
    monkeypatch.setenv("INSPECTD_REDIS__KEY_PREFIX", KEYS.prefix)


@pytest.mark.usefixtures("cli_env")
def test_cli_publish_activate_list_show_rollback(
    versions: Versions, registry: ModelRegistry, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INSPECTD_REGISTRY__LINES", json.dumps(registry.lines))  # as the `registry` fixture's
    base, adapter = versions.base.version, versions.adapter.version
    assert main(["models", "publish", str(versions.adapter_dir)]) == 1
    assert f"parent version {base}" in capsys.readouterr().err
    assert main(["models", "publish", str(versions.base_dir), "--activate"]) == 0
    assert main(["models", "publish", str(versions.base_dir)]) == 0
    assert main(["models", "publish", str(versions.adapter_dir), "--activate", "--line", "line-3"]) == 0
    out = capsys.readouterr().out
    assert f"published {base} (base at {versions.base_dir.resolve()})" in out
    assert f"already registered: {base}" in out
    assert f"{adapter} is now active in scope line:line-3 (it had none)" in out

    assert main(["models", "list", "--json"]) == 0
    rows = {r["version"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[base]["active_in"] == ["default"] and rows[base]["kind"] == "base"
    assert rows[adapter]["active_in"] == ["line:line-3"] and rows[adapter]["parent"] == base
    assert main(["models", "list"]) == 0
    assert "active in: line:line-3" in capsys.readouterr().out
    assert main(["models", "show", adapter]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["manifest"]["version"] == adapter and shown["path"] is None
    assert shown["active_in"] == ["line:line-3"]

    assert main(["models", "activate", base, "--scope", "line:line-3"]) == 0
    assert f"{base} is now active in scope line:line-3 (was {adapter})" in capsys.readouterr().out
    assert main(["models", "rollback", "--line", "line-3"]) == 0
    assert f"rolled back from {base} to {adapter}" in capsys.readouterr().out
    assert registry.active("cam-1") == adapter

    assert main(["models", "activate", base, "--camera", "default"]) == 0  # the camera called "default"
    assert f"{base} is now active in scope camera:default (it had none)" in capsys.readouterr().out
    assert registry.active_in("default") == base and registry.active("cam-9") == base
    assert main(["models", "activate", base, "--camera", "cam-1"]) == 0
    assert registry.active("cam-1") == base
    capsys.readouterr()
    assert main(["models", "unpin", "cam-1"]) == 0
    out = capsys.readouterr().out
    assert f"scope camera:cam-1 unpinned (was {base}); camera cam-1 now serves {adapter} from scope line:line-3" in out
    assert registry.active("cam-1") == adapter
    assert main(["models", "rollback", "--camera", "cam-1"]) == 0  # pins it again
    assert f"rolled back from nothing of its own to {base}" in capsys.readouterr().out
    assert main(["models", "activate", base, "--default"]) == 0
    assert f"{base} was already active in scope default" in capsys.readouterr().out


@pytest.mark.usefixtures("cli_env")
def test_cli_errors_an_operator_understands(
    versions: Versions, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["models", "activate", "0123abcd"], ["models", "show", "0123abcd"]):
        assert main(argv) == 2
        assert "unknown model version '0123abcd'" in capsys.readouterr().err
    assert main(["models", "rollback", "--line", "line-3"]) == 1
    assert "no earlier version to roll back to" in capsys.readouterr().err
    assert main(["models", "publish", str(versions.base_dir), "--line", "line-3"]) == 2
    assert "needs --activate" in capsys.readouterr().err
    assert main(["models", "unpin", "cam-1"]) == 1
    assert "no version of its own to unpin" in capsys.readouterr().err
    for argv, message in (
        (["models", "activate", "0123abcd", "--scope", "line-3"], "did you mean camera:line-3 or line:line-3"),
        (["models", "rollback", "--scope", "cam-1"], "did you mean camera:cam-1"),
        (["models", "activate", "0123abcd", "--camera", "x", "--line", "y"], "not allowed with argument --camera"),
        (["models", "activate", "0123abcd", "--camera", "cam:1"], "camera id 'cam:1' must be"),
        (["models", "unpin", "cam*"], "camera id 'cam*' must be"),
        (["models", "unpin", "camera:cam-1"], "camera id 'camera:cam-1' must be"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err, argv
    monkeypatch.setenv("INSPECTD_REDIS__URL", "redis://127.0.0.1:1/0")
    assert main(["models", "list"]) == 1
    assert "inspectd: error: Redis:" in capsys.readouterr().err

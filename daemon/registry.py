"""Model versions in Redis: manifests, adapter blobs, and per-scope active pointers that workers follow.

Adapted versions are small, so they travel whole through Redis; a base version (hundreds of MB) is stored
as its manifest plus its directory on the shared volume. Activation and rollback are WATCH/MULTI
transactions: the pointer, the history, the announcement and the event commit together or not at all.

Key layout (prefix [redis] key_prefix; `Keys` in daemon/store.py):
- `model-versions`: sorted set of version ids, scored by first publish time (ms epoch).
- `model:{version}`: hash; `manifest` (JSON, `parent_path` dropped: location is not content), plus
  `file:{name}` (tensor file bytes, sha256 in the manifest) for an adapted version, or `path` (its
  directory as workers mount it) for a base version.
- `active:{scope}`: the version served in the scope; `history:{scope}`: activations, newest first (the
  head is the active version, or `UNPINNED` when the scope has none of its own since an unpin), capped
  at [registry] history_len. Rollback pops the head.
- `activated-versions`: set of every version ever made active in some scope, written in the transaction
  that activates it.
- `kept-refused:{camera}`: the camera's kept refused candidates (published, never activated unless forced),
  newest first. Each holds its tensors in Redis, so only the newest [adapt] max_kept_refused are kept: an
  older one is removed (`remove_refused`) unless it was activated since or an adapted version was
  published on top of it (`parent-versions`: set of every version that another one names as its
  parent). Versions are otherwise never removed (a rollback may need any of them).
- pub/sub channel `models`: one JSON announcement per change, see `Announcement`. Pub/sub is at-most-once,
  so a worker reads `active()` when it (re)subscribes and takes an announcement as a cue to re-resolve.

A scope is typed (daemon/scopes.py): `camera:ID`, `line:NAME` or `default`, so a camera called `default` or
named like a line pins only itself. A camera serves its own active version if it has one, else its line's
([registry] lines maps cameras to lines), else the default scope's. Unpinning a camera (or a line) removes
its own pointer, so it falls back again. (Scope keys were bare camera ids and line names before the types:
no deployment held data under them; a registry written then needs its activations made again.)

The client must return bytes (redis-py's default, no `decode_responses`): blobs are binary. Nothing read
from Redis is unpickled; every read is bounded in size, and every blob is checked against its sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import redis
from redis.client import Pipeline
from redis.commands.core import Script

from csflow.artifacts import (
    MANIFEST,
    MAX_CHAIN,
    MAX_MANIFEST_BYTES,
    ArtifactError,
    Manifest,
    check_flow_revision,
    read_manifest,
    verify_files,
)
from daemon.config import Settings
from daemon.events import Event, EventKind, EventLog, now_ms
from daemon.scopes import DEFAULT_SCOPE, ScopeError, check_scope, parse_scope, scope_chain
from daemon.store import Keys

MANIFEST_FIELD = "manifest"
PATH_FIELD = "path"
FILE_FIELD = "file:"  # + the file's name
MAX_PATH_BYTES = 4096
UNPINNED = "-"  # a history entry: the scope had no version of its own from then (never a version id)
# In an adapted version's manifest summary: the checks it failed, when the worker kept a candidate that the
# shadow refused (activated only with force).
REFUSED = "refused"
# In a recalibrated version's manifest summary: the version whose weights it carries with a new calibration.
RECALIBRATED_FROM = "recalibrated_from"

# A field's length first, so that an oversized value is refused without being transferred.
_BOUNDED_HGET = """
local n = redis.call('HSTRLEN', KEYS[1], ARGV[1])
if n > tonumber(ARGV[2]) then return n end
return redis.call('HGET', KEYS[1], ARGV[1])
"""


class RegistryError(RuntimeError):
    """The registry refuses a request or holds something inconsistent; the message says which and why."""


class UnknownVersionError(RegistryError):
    def __init__(self, version: str):
        super().__init__(f"unknown model version {version!r} (not published in the registry)")
        self.version = version


def refused_checks(manifest: Manifest) -> list[str]:
    """The checks a version failed when a worker kept it after the gate refused it; empty for any other."""
    return [str(reason) for reason in manifest.summary.get(REFUSED) or []]


class RefusedVersionError(RegistryError):
    """An activation, without force, of a version that the adaptation gate refused."""

    def __init__(self, version: str, failed: list[str], camera: str):
        super().__init__(
            f"version {version} was refused by the adaptation gate for camera {camera} ({'; '.join(failed)}); "
            f"read its figures (inspectd models show {version}) and activate it anyway with force "
            f"(inspectd models activate {version} --camera {camera} --force)"
        )


@dataclass(frozen=True)
class Announcement:
    """Published on the `models` channel after each change: `version` is now active in `scope` (None: the
    scope has none of its own, after an unpin), replacing `previous` (None when the scope had none)."""

    action: Literal["activate", "rollback", "unpin"]
    scope: str
    version: str | None
    previous: str | None
    ts: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, data: bytes | str) -> Announcement:
        return cls(**json.loads(data))


class ModelRegistry:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        events: EventLog,
        max_blob_bytes: int,
        history_len: int,
        lines: Mapping[str, str],
    ):
        self.client = client
        self.keys = keys
        self.events = events
        self.max_blob_bytes = max_blob_bytes
        self.history_len = history_len
        self.lines = dict(lines)
        self._bounded_hget = client.register_script(_BOUNDED_HGET)

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> ModelRegistry:
        keys = Keys(settings.redis.key_prefix)
        cfg = settings.registry
        events = EventLog(client, keys, settings.redis.events_max_len)
        return cls(client, keys, events, cfg.max_blob_bytes, cfg.history_len, cfg.lines)

    # ---------------------------------------------------------------------------------------------- publish

    def publish(self, directory: str | Path) -> Manifest:
        """Register the version in `directory` (verified first); publishing it again changes nothing but a
        base version's path. An adapted version's parent must be registered already."""
        directory = Path(directory).resolve()
        manifest = read_manifest(directory)
        _check_threshold(manifest)
        if manifest.parent is None:
            verify_files(directory, manifest)  # once here; workers' load_model verifies again on each load
            fields = {PATH_FIELD: str(directory).encode()}
        else:
            if not self.registered(manifest.parent):
                raise RegistryError(
                    f"parent version {manifest.parent} of {manifest.version} is not registered: publish it first"
                )
            fields = {FILE_FIELD + name: self._read_file(manifest, directory, name) for name in manifest.files}
        fields[MANIFEST_FIELD] = json.dumps(asdict(replace(manifest, parent_path=None)), sort_keys=True).encode()
        parent_key = None if manifest.parent is None else self.keys.model(manifest.parent)

        def change(pipe: Pipeline) -> None:  # a version is registered whole or not at all
            if parent_key is not None and not pipe.exists(parent_key):
                raise UnknownVersionError(str(manifest.parent))  # removed since it was checked
            pipe.multi()
            pipe.hset(self.keys.model(manifest.version), mapping=fields)
            pipe.zadd(self.keys.model_versions, {manifest.version: now_ms()}, nx=True)
            if manifest.parent is not None:  # a parent is never removed: this version needs it
                pipe.sadd(self.keys.parent_versions, manifest.parent)

        self.client.transaction(change, *([parent_key] if parent_key else []))
        return manifest

    def _read_file(self, manifest: Manifest, directory: Path, name: str) -> bytes:
        path = directory / _checked_name(manifest, name)
        if not path.is_file():
            raise RegistryError(f"{path} is listed in the manifest but missing")
        size = path.stat().st_size
        if size > self.max_blob_bytes:
            raise RegistryError(f"{path}: {size} bytes, more than [registry] max_blob_bytes ({self.max_blob_bytes})")
        data = path.read_bytes()
        _check_sha256(manifest, name, data)
        return data

    # ---------------------------------------------------------------------------------------------- queries

    def registered(self, version: str) -> bool:
        return bool(self.client.exists(self.keys.model(version)))

    def versions(self) -> list[str]:
        """Registered version ids in publish order (same-millisecond ties in id order)."""
        return [v.decode() for v in self.client.zrange(self.keys.model_versions, 0, -1)]

    def manifest(self, version: str) -> Manifest:
        """The version's manifest, checked against its id (a manifest edited in Redis is refused)."""
        raw = self._field(version, MANIFEST_FIELD, MAX_MANIFEST_BYTES)
        if raw is None:
            raise UnknownVersionError(version)
        try:
            data = json.loads(raw)
            manifest = Manifest(**data)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise RegistryError(f"version {version}: the stored manifest is not valid: {exc}") from exc
        try:
            check_flow_revision(data, f"registered version {version}")
        except ArtifactError as exc:
            raise RegistryError(str(exc)) from exc
        try:
            content_hash = manifest.content_hash()
        except ValueError as exc:  # a non-finite number (JSON allows 1e999): no version of ours has one
            raise RegistryError(f"version {version}: the stored manifest is not valid: {exc}") from exc
        if manifest.version != version or content_hash != version:
            raise RegistryError(f"version {version}: the stored manifest does not match the version (edited?)")
        return manifest

    def base_path(self, version: str) -> Path | None:
        """Where a base version lives on the shared volume; None for an adapted version."""
        raw = self._field(version, PATH_FIELD, MAX_PATH_BYTES)
        return None if raw is None else Path(raw.decode())

    def scopes(self, camera: str) -> list[str]:
        """The scopes whose active version `camera` (an id) may serve, most specific first."""
        return scope_chain(camera, self.lines)

    def active(self, camera: str) -> str | None:
        """The version `camera` (an id) serves: the first scope of `scopes()` with an active version."""
        pointers = self.client.mget([self.keys.active(s) for s in self.scopes(camera)])
        return next((p.decode() for p in pointers if p is not None), None)

    def active_in(self, scope: str) -> str | None:
        """The version active in `scope` itself (a typed scope), without falling back."""
        _check_scope(scope)
        pointer = self.client.get(self.keys.active(scope))
        return None if pointer is None else pointer.decode()

    def actives(self) -> dict[str, str]:
        """Every scope with an active version (for operators: a SCAN, not for the hot path)."""
        pattern = self.keys.active("*")
        found = {}
        for key in self.client.scan_iter(match=pattern, count=1000):
            version = self.client.get(key)
            if version is not None:
                found[key.decode().removeprefix(pattern[:-1])] = version.decode()
        return dict(sorted(found.items()))

    def history(self, scope: str) -> list[str]:
        """Activations in `scope`, newest (the active one) first; `UNPINNED` where the scope had none."""
        _check_scope(scope)
        return [v.decode() for v in self.client.lrange(self.keys.history(scope), 0, -1)]

    # ---------------------------------------------------------------------------------------------- changes

    def activate(
        self, scope: str, version: str, if_unset: bool = False, author: str | None = None, *, force: bool = False
    ) -> Announcement | None:
        """Make `version` active in `scope`; None when it already was (nothing recorded or announced), or
        with `if_unset` when the scope had any active version (checked in the same transaction). `author`
        (a logged-in person) is recorded in the event; None: the daemon itself. A version the adaptation gate
        refused (kept by a worker) raises `RefusedVersionError` unless `force`."""
        _check_scope(scope)
        try:
            manifest: Manifest | None = self.manifest(version)
        except UnknownVersionError:
            raise
        except RegistryError:
            manifest = None  # it does not verify: every worker refuses to load it (and counts that), as before
        failed = refused_checks(manifest) if manifest is not None else []
        if failed and manifest is not None and not force:
            raise RefusedVersionError(version, failed, manifest.domain)
        active_key, history_key = self.keys.active(scope), self.keys.history(scope)
        model_key = self.keys.model(version)

        def change(pipe: Pipeline) -> Announcement | None:
            current = pipe.get(active_key)
            previous = None if current is None else current.decode()
            if previous == version or (if_unset and previous is not None):
                return None
            if not pipe.exists(model_key):  # removed since its manifest was read
                raise UnknownVersionError(version)
            announcement = Announcement("activate", scope, version, previous, now_ms())
            pipe.multi()
            pipe.set(active_key, version)
            pipe.sadd(self.keys.activated_versions, version)
            pipe.lpush(history_key, version)
            pipe.ltrim(history_key, 0, self.history_len - 1)
            self._announce(pipe, announcement, EventKind.VERSION_ACTIVATED, author)
            return announcement

        return self.client.transaction(change, active_key, history_key, model_key, value_from_callable=True)

    def rollback(self, scope: str, author: str | None = None) -> Announcement:
        """Make the version active before the current one in `scope` active again (`author` as in activate);
        where the scope had none of its own before (an unpin), it has none again and falls back."""
        _check_scope(scope)
        active_key, history_key = self.keys.active(scope), self.keys.history(scope)

        def change(pipe: Pipeline) -> Announcement:
            entries = [v.decode() for v in pipe.lrange(history_key, 0, 1)]
            if len(entries) < 2:
                had = f"only {entries[0]} was ever activated" if entries else "no version was ever activated"
                raise RegistryError(f"scope {scope!r} has no earlier version to roll back to ({had})")
            current, previous = (None if e == UNPINNED else e for e in entries)
            announcement = Announcement("rollback", scope, previous, current, now_ms())
            pipe.multi()
            pipe.lpop(history_key)
            if previous is None:
                pipe.delete(active_key)
            else:
                pipe.set(active_key, previous)
                pipe.sadd(self.keys.activated_versions, previous)
            self._announce(pipe, announcement, EventKind.ROLLBACK, author)
            return announcement

        return self.client.transaction(change, active_key, history_key, value_from_callable=True)

    def unpin(self, scope: str, author: str | None = None) -> Announcement:
        """Remove the version of `scope` (a camera's or a line's) itself, so that it serves its line's or
        the default's again: recorded in the history (`UNPINNED`, a rollback pins again), as an event, and
        announced so that workers re-resolve. `author` as in activate."""
        if parse_scope(_check_scope(scope)).kind == DEFAULT_SCOPE:
            raise RegistryError(f"the {DEFAULT_SCOPE} scope cannot be unpinned: every camera falls back to it")
        active_key, history_key = self.keys.active(scope), self.keys.history(scope)

        def change(pipe: Pipeline) -> Announcement:
            current = pipe.get(active_key)
            if current is None:
                raise RegistryError(f"scope {scope!r} has no version of its own to unpin (it already falls back)")
            announcement = Announcement("unpin", scope, None, current.decode(), now_ms())
            pipe.multi()
            pipe.delete(active_key)
            pipe.lpush(history_key, UNPINNED)
            pipe.ltrim(history_key, 0, self.history_len - 1)
            self._announce(pipe, announcement, EventKind.VERSION_UNPINNED, author)
            return announcement

        return self.client.transaction(change, active_key, history_key, value_from_callable=True)

    def _announce(self, pipe: Pipeline, announcement: Announcement, kind: EventKind, author: str | None) -> None:
        pipe.publish(self.keys.models_channel, announcement.to_json())
        a = announcement
        detail: dict[str, str | None] = {"previous": a.previous}
        if author is not None:
            detail["author"] = author
        self.events.append(Event(kind, a.scope, a.version or "", detail, a.ts), pipe)

    # ---------------------------------------------------------------------------------------------- kept refused

    def keep_refused(self, directory: str | Path, limit: int) -> tuple[Manifest, list[str]]:
        """Publish a candidate the gate refused (its manifest's summary names the failed checks) as the newest
        of its camera's kept candidates, and remove the oldest beyond `limit` (see `remove_refused`): the
        manifest and the ids removed."""
        manifest = read_manifest(Path(directory))
        if not refused_checks(manifest):
            raise RegistryError(f"version {manifest.version} is not marked refused: it is published, not kept")
        self.publish(directory)
        camera, key = manifest.domain, self.keys.kept_refused(manifest.domain)
        pipe = self.client.pipeline()
        pipe.lrem(key, 0, manifest.version)  # kept again (the same tensors and figures): newest once
        pipe.lpush(key, manifest.version)
        pipe.lrange(key, limit, -1)
        older = [v.decode() for v in pipe.execute()[-1]]
        return manifest, [v for v in older if self.remove_refused(v, camera)]

    def remove_refused(self, version: str, camera: str) -> bool:
        """Delete a kept refused candidate of `camera` (its tensors, manifest and id) and record it; False,
        with nothing deleted (it then leaves the camera's kept list), when it was ever activated or
        an adapted version was published on top of it (or it is not on that list). Each is read inside the
        transaction that deletes, which every activation's and publication's transaction invalidates."""
        kept_key, model_key = self.keys.kept_refused(camera), self.keys.model(version)

        def change(pipe: Pipeline) -> bool:
            needed = pipe.sismember(self.keys.activated_versions, version) or pipe.sismember(
                self.keys.parent_versions, version
            )
            listed = pipe.lpos(kept_key, version) is not None
            pipe.multi()
            pipe.lrem(kept_key, 0, version)
            if needed or not listed:
                return False
            pipe.delete(model_key)
            pipe.zrem(self.keys.model_versions, version)
            detail = {"reason": "a newer refused candidate of the camera is kept ([adapt] max_kept_refused)"}
            self.events.append(Event(EventKind.VERSION_REMOVED, camera, version, detail), pipe)
            return True

        watched = [self.keys.activated_versions, self.keys.parent_versions, kept_key, model_key]
        return bool(self.client.transaction(change, *watched, value_from_callable=True))

    # ---------------------------------------------------------------------------------------------- materialise

    def materialise(self, version: str, cache_dir: str | Path) -> Path:
        """`cache_dir/{version}`, a directory that `csflow.artifacts.load_model` loads with its chain.

        Each adapted version of the chain becomes `cache_dir/{id}` (parent_path `../{parent}`), written to a
        temporary directory after its blobs matched their sha256 and renamed into place, so a directory
        that exists is complete; one already there is kept (load_model verifies it on every load). The base
        becomes a symlink `cache_dir/{id}` to its stored path, renewed each time, after checking that the
        manifest there is the version's; its hundreds of MB are hashed by load_model, not here.
        """
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest(version)
        for _ in range(MAX_CHAIN + 1):
            target = cache_dir / manifest.version
            if manifest.parent is None:
                self._link_base(manifest, target)
                return cache_dir / version
            if not target.is_dir():
                self._write_adapter(manifest, target)
            manifest = self.manifest(manifest.parent)
        raise RegistryError(f"version {version}: parent chain is longer than {MAX_CHAIN} versions")

    def _write_adapter(self, manifest: Manifest, target: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.version}.", dir=target.parent))
        try:
            for name in manifest.files:
                data = self._field(manifest.version, FILE_FIELD + _checked_name(manifest, name), self.max_blob_bytes)
                if data is None:
                    raise RegistryError(f"version {manifest.version}: {name} is missing from the registry")
                _check_sha256(manifest, name, data)
                (tmp / name).write_bytes(data)
            stored = replace(manifest, parent_path=f"../{manifest.parent}")
            (tmp / MANIFEST).write_text(json.dumps(asdict(stored), indent=2, sort_keys=True))
            try:
                tmp.rename(target)
            except OSError:
                if not target.is_dir():
                    raise  # else another process put the same version there first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _link_base(self, manifest: Manifest, link: Path) -> None:
        path = self.base_path(manifest.version)
        if path is None:
            raise RegistryError(f"base version {manifest.version} has no stored path")
        found = read_manifest(path).version
        if found != manifest.version:
            raise RegistryError(f"base version {manifest.version} is registered at {path}, which holds {found}")
        tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}")
        tmp.symlink_to(path, target_is_directory=True)
        tmp.replace(link)  # atomic: a reader sees the old link or the new one

    def _field(self, version: str, field: str, limit: int) -> bytes | None:
        value = _read_only(self.client, self._bounded_hget, [self.keys.model(version)], [field, limit])
        if isinstance(value, int):
            raise RegistryError(f"version {version}: {field} is {value} bytes, more than the limit of {limit}")
        return value

    # ---------------------------------------------------------------------------------------------- adaptation

    def activate_fenced(self, scope: str, version: str, fence: Fence) -> Announcement | None:
        """Activate an adaptation's result in `scope` only if its run still holds the adaptation lock with
        its fencing token and `fence.camera` is still served `fence.parent`, both read inside the
        transaction that activates (WATCH on the lock, the camera's active pointers and the scope's
        history): a second worker that took the lock after it expired, or an operator's activation or
        rollback during the run, wins, and this raises SupersededError with nothing changed. A scope with
        no version of its own is pinned to the parent first (a rollback there returns to it); each change
        is recorded and announced as by `activate`. None when `version` was already active."""
        _check_scope(scope)
        if not self.registered(version):
            raise UnknownVersionError(version)
        active_key, history_key = self.keys.active(scope), self.keys.history(scope)
        served_keys = [self.keys.active(s) for s in self.scopes(fence.camera)]

        def change(pipe: Pipeline) -> Announcement | None:
            holder = pipe.get(fence.lock_key)
            if holder != fence.token.encode():
                held = "expired" if holder is None else f"held by token {holder.decode(errors='replace')}"
                raise SupersededError(f"the adaptation lock is no longer this run's (token {fence.token}): {held}")
            served = next((p.decode() for p in pipe.mget(served_keys) if p is not None), None)
            if served != fence.parent:
                raise SupersededError(
                    f"camera {fence.camera} is served {served}, no longer {fence.parent}, the version adapted"
                )
            current = pipe.get(active_key)
            previous = None if current is None else current.decode()
            if previous == version:
                return None
            if not pipe.exists(self.keys.model(version)):
                raise UnknownVersionError(version)
            pipe.multi()
            pipe.sadd(self.keys.activated_versions, version, fence.parent)
            if previous is None:
                pin = Announcement("activate", scope, fence.parent, None, now_ms())
                pipe.set(active_key, fence.parent)
                pipe.lpush(history_key, fence.parent)
                self._announce(pipe, pin, EventKind.VERSION_ACTIVATED, None)
                previous = fence.parent
            announcement = Announcement("activate", scope, version, previous, now_ms())
            pipe.set(active_key, version)
            pipe.lpush(history_key, version)
            pipe.ltrim(history_key, 0, self.history_len - 1)
            self._announce(pipe, announcement, EventKind.VERSION_ACTIVATED, None)
            return announcement

        watched = dict.fromkeys([fence.lock_key, active_key, history_key, self.keys.model(version), *served_keys])
        return self.client.transaction(change, *watched, value_from_callable=True)


def _read_only(client: redis.Redis, script: Script, keys: list[str], args: list[str | int]) -> Any:
    """Run a script that only reads through EVALSHA_RO: a Redis user with read-only access to the keys (the
    operator console's, see deploy/README.md) may run it, where EVALSHA would need write access too."""
    try:
        return client.evalsha_ro(script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        client.script_load(script.script)
        return client.evalsha_ro(script.sha, len(keys), *keys, *args)


def _checked_name(manifest: Manifest, name: str) -> str:
    """A manifest's file name, refused unless it is a plain name inside the version's directory."""
    if Path(name).name != name or name.startswith(".") or name == MANIFEST:
        raise RegistryError(f"version {manifest.version}: file name {name!r} is not allowed")
    return name


def _check_sha256(manifest: Manifest, name: str, data: bytes) -> None:
    if hashlib.sha256(data).hexdigest() != manifest.files[name]:
        raise RegistryError(
            f"version {manifest.version}: {name} does not match its sha256 in the manifest (corrupted or tampered)"
        )


def _check_scope(scope: str) -> str:
    """`scope` if it is typed (`camera:ID`, `line:NAME`, `default`), else a RegistryError saying so."""
    try:
        return check_scope(scope)
    except ScopeError as exc:
        raise RegistryError(str(exc)) from exc


def _check_threshold(manifest: Manifest) -> None:
    """A threshold that is not a finite number would pass every frame as normal (`score > nan` is False)."""
    try:
        threshold = float(manifest.calibration["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"version {manifest.version}: no numeric threshold in its calibration") from exc
    if not math.isfinite(threshold):
        raise RegistryError(f"version {manifest.version}: threshold {threshold} is not a finite number")


class SupersededError(RegistryError):
    """An adaptation's result lost its claim while it ran (see `ModelRegistry.activate_fenced`)."""


@dataclass(frozen=True)
class Fence:
    """What an adaptation's activation checks: the lock key must still hold `token` (given when the lock
    was taken, from a counter that only grows), and `camera` must still be served `parent`."""

    lock_key: str
    token: str
    camera: str
    parent: str

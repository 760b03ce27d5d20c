"""The Redis ACL of deploy/README.md, enforced: the worker's writes and the whole console work with exactly
those users, and the console is refused everything else.

The `ACL SETUSER` lines are read from the README (between `acl:begin` and `acl:end`), so the documented
lines are the tested ones. Redis is seeded as the worker user through the worker's classes.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import console_support as cs
import pytest
import redis
import requests
from pydantic import SecretStr
from test_console import csrf_of, login
from torch import Tensor

from csflow.model import CSFlow
from daemon.config import ConfirmationsSection
from daemon.confirmations import AdaptationBuffer, ConfirmationProcessor
from daemon.registry import ModelRegistry
from daemon.store import VerdictStore
from lab.services import LocalRedis

README = Path(__file__).resolve().parents[2] / "deploy" / "README.md"
PASSWORDS = {"WORKER_PASSWORD": "worker-secret", "CONSOLE_PASSWORD": "console-secret"}


def acl_lines(prefix: str) -> list[list[str]]:
    block = re.search(r"<!-- acl:begin -->(.*?)<!-- acl:end -->", README.read_text(), re.S)
    assert block, "deploy/README.md has no ACL block"
    lines = [line for line in block.group(1).splitlines() if line.startswith("ACL SETUSER")]
    assert len(lines) == 2
    out = []
    for line in lines:
        for name, value in PASSWORDS.items():
            line = line.replace(name, value)
        out.append(shlex.split(line.replace("inspectd:", prefix)))
    return out


def user_url(server: LocalRedis, user: str) -> str:
    return f"redis://{user}:{PASSWORDS[user.split('-')[1].upper() + '_PASSWORD']}@{server.host}:{server.port}/0"


def test_worker_and_console_work_under_the_documented_acl(
    redis_server: LocalRedis,
    client: redis.Redis,
    tmp_path: Path,
    make_tiny_model: Callable[..., CSFlow],
    make_images: Callable[..., Tensor],
) -> None:
    for command in acl_lines(cs.PREFIX):
        client.execute_command(*command)
    worker = redis.Redis.from_url(user_url(redis_server, "inspectd-worker"))
    console = redis.Redis.from_url(user_url(redis_server, "inspectd-console"))

    # The worker's side, as the worker user: verdicts, frames, drift states, events, versions.
    seeded = cs.seed(worker)
    registry = ModelRegistry.from_settings(worker, cs.settings_for(redis_server.url, tmp_path))
    published = cs.publish_versions(registry, make_tiny_model(seed=6), make_images(6, seed=1), tmp_path / "v")
    for refused in (["CONFIG", "GET", "maxmemory"], ["FLUSHALL"], ["KEYS", "*"], ["SET", "other:key", "1"]):
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.execute_command(*refused)

    # The console is refused all but what it needs.
    for refused in (
        ["SET", f"{cs.PREFIX}verdict:x", "1"],
        ["XADD", f"{cs.PREFIX}verdicts", "*", "a", "b"],
        ["HGET", f"{cs.PREFIX}buffer-data:cam-1", "x"],
        ["XRANGE", f"{cs.PREFIX}confirmations", "-", "+"],
        ["DEL", f"{cs.PREFIX}frame:cam-1-f000"],
        ["HSET", f"{cs.PREFIX}model:x", "manifest", "{}"],
        ["FLUSHALL"],
        ["GET", "other:key"],
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            console.execute_command(*refused)

    settings = cs.settings_for(redis_server.url, tmp_path)
    settings = settings.model_copy(
        update={
            "console": settings.console.model_copy(
                update={"redis_url": SecretStr(user_url(redis_server, "inspectd-console"))}
            )
        }
    )
    cs.make_users(settings)
    with cs.serving(settings) as base:  # the console's own client, from [console] redis_url
        s, csrf = login(base, "otto")
        for path in [
            "/line",
            "/line/tiles",
            "/cameras/cam-1",
            "/versions",
            "/events?camera=cam-1",
            f"/thumbs/{seeded.alarm_frames[0]}",
        ]:
            r = s.get(base + path)
            assert r.status_code == 200, (path, re.findall(r"muted\">([^<]*)", r.text))
        picked = seeded.alarm_frames[-5:]
        r = s.post(f"{base}/cameras/cam-1/confirm", data={"csrf": csrf, "frame_id": picked, "note": "acl"})
        assert r.status_code == 200 and "5 frame(s) confirmed" in r.text

        admin, admin_csrf = login(base, "ada")
        step = admin.get(
            f"{base}/versions/confirm",
            params={"action": "activate", "scope": "camera:cam-1", "version": published.adapted},
        )
        r = admin.post(
            f"{base}/versions/activate",
            data={"csrf": csrf_of(step.text), "scope": "camera:cam-1", "version": published.adapted},
        )
        assert r.status_code == 200 and registry.active("cam-1") == published.adapted
        r = admin.post(f"{base}/versions/rollback", data={"csrf": admin_csrf, "scope": "camera:cam-1"})
        assert r.status_code == 200 and registry.active("cam-1") == published.base
        assert requests.get(f"{base}/readyz").status_code == 200

    # The worker takes the confirmations (consumer group, Lua, buffer) and an adaptation reads them.
    store = VerdictStore(worker, cs.KEYS, 3600, 3600, 100_000)
    assert ConfirmationProcessor(store, ConfirmationsSection(), "w-1").process(10).accepted == 5
    buffer = AdaptationBuffer(worker, cs.KEYS)
    assert [f.operator for f in buffer.frames("cam-1", 10)] == ["otto"] * 5
    lock = worker.lock(cs.KEYS.adapt_lock("cam-1"), timeout=5, thread_local=False)
    assert lock.acquire(blocking=False) and lock.extend(5) and lock.release() is None
    assert buffer.trim("cam-1", 0) == 5

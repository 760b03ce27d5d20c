"""The operator console over HTTP against a real Redis: pages, who may do what, and every refusal.

Redis is seeded through the worker's own classes (console_support.py); the console runs in uvicorn on a
loopback port and is driven with plain HTTP requests. Each refused request is checked to have written
nothing: the confirmations stream and the events stream keep their length.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import console_support as cs
import pytest
import redis
import requests
from PIL import Image
from torch import Tensor

from cli.main import main
from console.data import VerdictTail
from console.users import read_users
from csflow.model import CSFlow
from daemon.config import ConfirmationsSection, Settings
from daemon.confirmations import ConfirmationProcessor, recent_verdicts
from daemon.events import Event, EventKind, EventLog
from daemon.registry import ModelRegistry
from daemon.store import Verdict, VerdictStore
from lab.services import LocalRedis, free_port

KEYS = cs.KEYS
TEN_MB = 10 * 1024 * 1024


@dataclass
class Console:
    base: str
    settings: Settings
    client: redis.Redis
    seeded: cs.Seeded


@pytest.fixture
def console(redis_server: LocalRedis, client: redis.Redis, tmp_path: Path) -> Iterator[Console]:
    seeded = cs.seed(client)
    settings = cs.settings_for(redis_server.url, tmp_path)
    cs.make_users(settings)
    with cs.serving(settings) as base:
        yield Console(base, settings, client, seeded)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def login(base: str, name: str, password: str = cs.PASSWORD) -> tuple[requests.Session, str]:
    """A logged-in HTTP session and its CSRF token."""
    s = requests.Session()
    form = s.get(f"{base}/login")
    r = s.post(
        f"{base}/login", data={"csrf": csrf_of(form.text), "username": name, "password": password, "next": "/line"}
    )
    assert r.status_code == 200 and r.url.endswith("/line"), r.text
    return s, csrf_of(r.text)


def written(client: redis.Redis) -> tuple[int, int]:
    return client.xlen(KEYS.confirmations), client.xlen(KEYS.events)


def test_pages_show_the_line_a_camera_versions_and_events(console: Console) -> None:
    s, _ = login(console.base, "vera")
    line = s.get(f"{console.base}/line").text
    assert re.search(r'class="tile drift-alarm" href="/cameras/cam-1"', line)
    assert re.search(r'class="tile drift-ok" href="/cameras/cam-2"', line)
    assert "/thumbs/cam-1-f109" in line and "drift_alarm" in line

    camera = s.get(f"{console.base}/cameras/cam-1").text
    assert '<svg class="timeline"' in camera and 'class="marker marker-drift_alarm"' in camera
    assert camera.count('class="threshold"') == 1  # one version, one threshold
    queue = re.findall(r'<label class="frame" data-frame="([^"]+)"', camera)
    scores = [float(x) for x in re.findall(r'<span class="score">([^<]+)</span>', camera)]
    assert queue and set(queue) <= set(console.seeded.alarm_frames) and scores == sorted(scores, reverse=True)
    assert 'name="frame_id"' not in camera  # a viewer gets no selection
    assert "5 more confirmation(s) needed" in camera

    events = s.get(f"{console.base}/events", params={"camera": "cam-2", "kind": "drift_alarm"}).text
    assert "No event." in events
    events = s.get(f"{console.base}/events", params={"camera": "cam-1", "kind": "drift_alarm"}).text
    assert events.count("<td>drift_alarm</td>") == 1

    thumb = s.get(f"{console.base}/thumbs/{queue[0]}")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= console.settings.console.thumb_px
    assert s.get(f"{console.base}/thumbs/no-such-frame").status_code == 404
    assert s.get(f"{console.base}/cameras/no-such-camera").status_code == 404


def test_pages_need_a_login_and_send_safe_headers(console: Console) -> None:
    r = requests.get(f"{console.base}/cameras/cam-1", allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert requests.get(f"{console.base}/thumbs/cam-1-f000", allow_redirects=False).status_code == 303
    s = requests.Session()
    form = s.get(f"{console.base}/login")
    assert "script-src 'self'" in form.headers["content-security-policy"]
    r = s.post(
        f"{console.base}/login",
        data={"csrf": csrf_of(form.text), "username": "otto", "password": cs.PASSWORD},
        allow_redirects=False,
    )
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_operator_confirms_frames_as_themself(console: Console) -> None:
    s, csrf = login(console.base, "otto")
    picked = console.seeded.alarm_frames[-5:]
    note = '<script>alert("x")</script> & <b>bold</b>'
    r = s.post(
        f"{console.base}/cameras/cam-1/confirm",
        data={"csrf": csrf, "frame_id": picked, "note": note, "operator": "mallory"},  # a forged operator field
    )
    assert r.status_code == 200 and "5 frame(s) confirmed as normal by otto" in r.text
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in console.client.xrange(KEYS.confirmations)]
    assert [e["frame_id"] for e in entries] == picked
    assert {e["operator"] for e in entries} == {"otto"} and {e["note"] for e in entries} == {note}
    event = json.loads(console.client.xrevrange(KEYS.events, count=1)[0][1][b"detail"])
    assert event == {"operator": "otto", "frame_ids": picked}

    # The worker's own processor takes them into the buffer; the page shows the note escaped.
    store = VerdictStore(console.client, KEYS, 3600, 3600, 100_000)
    counts = ConfirmationProcessor(store, ConfirmationsSection(), "w-1").process(10)
    assert counts.accepted == 5
    camera = s.get(f"{console.base}/cameras/cam-1").text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in camera
    assert "<script>alert" not in camera and "<b>bold" not in camera
    assert not set(picked) & set(re.findall(r'data-frame="([^"]+)"', camera))  # buffered: out of the queue
    assert "Enough confirmed frames (5)" in camera

    # A worker adapts (its lock), then records the outcome: the page shows the progress and the gate's figures.
    console.client.set(KEYS.adapt_lock("cam-1"), "worker-1", px=60_000)
    assert "Adapting now on 5 confirmed frame(s)" in s.get(f"{console.base}/cameras/cam-1").text
    console.client.delete(KEYS.adapt_lock("cam-1"))
    figures = {"defect_detection": 0.9, "shots_fpr": 0.0}
    EventLog(console.client, KEYS, 1000).append(
        Event(EventKind.ADAPTATION_ACCEPTED, "cam-1", "v-new", {"figures": figures, "reasons": ["PASS recovery"]})
    )
    console.client.set(KEYS.adapt_attempt("cam-1"), json.dumps({"newest_frame_id": picked[-1]}))
    camera = s.get(f"{console.base}/cameras/cam-1").text
    last = camera[camera.index('id="last-adaptation"') :]
    assert "adaptation accepted" in last and "defect_detection" in last and "PASS recovery" in last
    assert "1 more confirmation(s) needed" in camera and "the last attempt used the newest frame" in camera


def test_bad_confirmations_are_refused_and_nothing_is_written(console: Console) -> None:
    s, csrf = login(console.base, "otto")
    url = f"{console.base}/cameras/cam-1/confirm"
    good = console.seeded.alarm_frames[:2]
    before = written(console.client)
    cases = {
        "unknown frame": ({"frame_id": [*good, "no-such-frame"]}, 400, "unknown frame"),
        "another camera's frame": ({"frame_id": [*good, console.seeded.other_frames[0]]}, 400, "another camera"),
        "nothing selected": ({}, 400, "no frame selected"),
        "too many frames": ({"frame_id": [f"f{i}" for i in range(51)]}, 400, "at most 50"),
        "note too long": ({"frame_id": good, "note": "x" * 501}, 400, "note"),
    }
    for name, (fields, status, says) in cases.items():
        r = s.post(url, data={"csrf": csrf, **fields})
        assert (r.status_code, says in r.text) == (status, True), name
    console.client.delete(KEYS.frame(good[0]))
    r = s.post(url, data={"csrf": csrf, "frame_id": good})
    assert r.status_code == 400 and "no longer cached" in r.text

    r = s.post(url, data={"csrf": "forged" + csrf[6:], "frame_id": good[1:]})
    assert r.status_code == 403 and "CSRF" in r.text
    r = s.post(url, data={"frame_id": good[1:]})
    assert r.status_code == 403
    r = s.post(url, data={"csrf": csrf, "frame_id": good[1:], "note": "x" * TEN_MB})
    assert r.status_code == 413

    viewer, viewer_csrf = login(console.base, "vera")
    assert viewer.post(url, data={"csrf": viewer_csrf, "frame_id": good[1:]}).status_code == 403

    stolen = s.cookies.get("inspectd_session")
    assert s.post(f"{console.base}/logout", data={"csrf": csrf}).url.endswith("/login")
    replay = requests.post(url, data={"csrf": csrf, "frame_id": good[1:]}, cookies={"inspectd_session": stolen})
    assert replay.status_code == 403 and "log in again" in replay.text
    r = requests.get(f"{console.base}/line", cookies={"inspectd_session": stolen}, allow_redirects=False)
    assert r.status_code == 303
    assert written(console.client) == before


@pytest.fixture(scope="module")
def tiny_model(make_tiny_model: Callable[..., CSFlow]) -> CSFlow:
    return make_tiny_model(seed=6)


def test_only_an_admin_activates_and_rolls_back(
    console: Console, tiny_model: CSFlow, make_images: Callable[..., Tensor], tmp_path: Path
) -> None:
    registry = ModelRegistry.from_settings(console.client, console.settings)
    published = cs.publish_versions(registry, tiny_model, make_images(6, seed=1), tmp_path / "versions")
    before = written(console.client)

    s, csrf = login(console.base, "otto")
    page = s.get(f"{console.base}/versions").text
    assert published.adapted[:12] in page and "defect_detection 0.95" in page
    assert "Activate…" not in page and "Roll back…" not in page
    assert s.get(f"{console.base}/versions/confirm", params={"action": "rollback", "scope": "x"}).status_code == 403
    r = s.post(
        f"{console.base}/versions/activate", data={"csrf": csrf, "scope": "camera:cam-1", "version": published.adapted}
    )
    assert r.status_code == 403
    assert s.post(f"{console.base}/versions/rollback", data={"csrf": csrf, "scope": "default"}).status_code == 403
    assert registry.active("cam-1") == published.base and written(console.client) == before

    admin, admin_csrf = login(console.base, "ada")
    step = admin.get(
        f"{console.base}/versions/confirm",
        params={"action": "activate", "scope": "camera:cam-1", "version": published.adapted},
    )
    assert step.status_code == 200 and published.adapted in step.text
    assert registry.active("cam-1") == published.base  # the confirmation step changes nothing
    r = admin.post(
        f"{console.base}/versions/activate",
        data={"csrf": csrf_of(step.text), "scope": "camera:cam-1", "version": published.adapted},
    )
    assert r.status_code == 200 and registry.active("cam-1") == published.adapted
    event = console.client.xrevrange(KEYS.events, count=1)[0][1]
    assert event[b"kind"] == b"version_activated" and json.loads(event[b"detail"])["author"] == "ada"
    assert "by ada" in r.text

    r = admin.post(f"{console.base}/versions/rollback", data={"csrf": admin_csrf, "scope": "camera:cam-1"})
    assert r.status_code == 200 and registry.active("cam-1") == published.base
    r = admin.post(f"{console.base}/versions/activate", data={"csrf": admin_csrf, "scope": "cam 1", "version": "x"})
    assert r.status_code == 400
    # Scopes are typed: a bare camera id (or a camera called "default" as a bare name) is not a scope.
    assert 'value="camera:cam-1"' in admin.get(f"{console.base}/versions").text
    step = admin.get(f"{console.base}/versions/confirm", params={"action": "rollback", "scope": "cam-1"})
    assert step.status_code == 400 and "did you mean camera:cam-1 or line:cam-1" in step.text
    before = written(console.client)
    for scope in ("cam-1", "line-3", "camera:cam 1"):
        r = admin.post(
            f"{console.base}/versions/activate",
            data={"csrf": admin_csrf, "scope": scope, "version": published.adapted},
        )
        assert r.status_code == 400 and "scope" in r.text, scope
    assert written(console.client) == before and registry.active("cam-1") == published.base


def test_a_version_the_gate_refused_is_marked_and_the_console_does_not_activate_it(
    console: Console, tiny_model: CSFlow, make_images: Callable[..., Tensor], tmp_path: Path
) -> None:
    """A worker keeps a candidate its shadow refused; activating it needs the command line's --force."""
    registry = ModelRegistry.from_settings(console.client, console.settings)
    failed = ["FAIL shadow sensitivity: 61% of 188 graded synthetic defects above the new threshold, the source 73%"]
    published = cs.publish_versions(registry, tiny_model, make_images(6, seed=1), tmp_path / "versions", failed)

    admin, csrf = login(console.base, "ada")
    page = admin.get(f"{console.base}/versions").text
    assert "refused by the gate" in page and "FAIL shadow sensitivity: 61%" in page
    before = written(console.client)
    r = admin.post(
        f"{console.base}/versions/activate", data={"csrf": csrf, "scope": "camera:cam-1", "version": published.adapted}
    )
    assert r.status_code == 400 and "refused by the adaptation gate" in r.text and "--force" in r.text
    assert registry.active("cam-1") == published.base and written(console.client) == before

    registry.activate("camera:cam-1", published.adapted, force=True)  # what `models activate --force` does
    assert registry.active("cam-1") == published.adapted


def test_logins_are_rate_limited(console: Console) -> None:
    s = requests.Session()
    statuses = []
    for password in ["wrong-1", "wrong-2", "wrong-3", "wrong-4", "wrong-5", cs.PASSWORD]:
        form = s.get(f"{console.base}/login")
        r = s.post(f"{console.base}/login", data={"csrf": csrf_of(form.text), "username": "otto", "password": password})
        statuses.append(r.status_code)
    assert statuses == [401] * 5 + [429]
    form = s.get(f"{console.base}/login")  # no valid login-form token: refused before the password is checked
    r = s.post(f"{console.base}/login", data={"csrf": "guess", "username": "ada", "password": cs.PASSWORD})
    assert r.status_code == 403


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: a Redis that hangs."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_hanging_redis_gives_an_error_banner_not_a_hang(silent_redis: str, tmp_path: Path) -> None:
    settings = cs.settings_for(silent_redis, tmp_path)
    cs.make_users(settings)
    with cs.serving(settings) as base:
        s = requests.Session()  # logging in needs no Redis
        form = s.get(f"{base}/login")
        data = {"csrf": csrf_of(form.text), "username": "vera", "password": cs.PASSWORD}
        assert s.post(f"{base}/login", data=data, allow_redirects=False).status_code == 303
        for path in ["/line", "/line/tiles", "/cameras/cam-1", "/versions", "/events", "/readyz"]:
            started = time.monotonic()
            r = s.get(base + path, timeout=10)
            took = time.monotonic() - started
            assert r.status_code == 503 and took < 4 * settings.console.redis_timeout_s, (path, took)
            assert path == "/readyz" or "Redis did not answer" in r.text
        assert requests.get(f"{base}/healthz").status_code == 200


def test_verdict_tail_reads_only_new_entries_and_matches_the_stream(client: redis.Redis) -> None:
    cs.seed(client, frames=30)
    tail = VerdictTail(client, KEYS, size=50)
    assert tail.read() == recent_verdicts(client, KEYS, 50)
    cs.seed(client, frames=10)  # same ids: no new verdicts
    assert tail.read() == recent_verdicts(client, KEYS, 50)
    store = VerdictStore(client, KEYS, 3600, 3600, 100_000)
    for burst in (3, 60):  # a few new ones, then more than the tail keeps
        ids = [f"new-{burst}-{i}" for i in range(burst)]
        store.write([Verdict(i, "cam-3", cs.START_MS, 0.5, 1.0, False, "v", 1.0) for i in ids], [])
        assert tail.read() == recent_verdicts(client, KEYS, 50)


def test_inspectd_console_add_user_then_serve(
    redis_server: LocalRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = tmp_path / "users.json"
    port = free_port()
    env = {
        "INSPECTD_CONSOLE__USERS_FILE": str(users),
        "INSPECTD_CONSOLE__PORT": str(port),
        "INSPECTD_REDIS__URL": redis_server.url,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no config.toml here: defaults + environment
    monkeypatch.setattr("sys.stdin", io.StringIO(cs.PASSWORD + "\n"))
    assert main(["console", "add-user", "ana", "--role", "operator", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["console", "add-user", "bob", "--role", "viewer", "--password-stdin"]) == 1
    assert sorted(read_users(users)) == ["ana"]

    process = subprocess.Popen([sys.executable, "-m", "cli", "console"], env={**os.environ, **env}, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # the first import of the model stack is slow on a busy machine
        while True:
            assert process.poll() is None, "inspectd console exited"
            try:
                if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "inspectd console did not start"
            time.sleep(0.2)
        login(base, "ana")
        assert requests.get(f"{base}/readyz").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0

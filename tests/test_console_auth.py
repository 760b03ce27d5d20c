"""Console users, sessions and login limits, without a server: the pieces the web layer trusts."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from console.sessions import LoginLimiter, SessionStore
from console.users import Users, UsersError, add_user, read_users


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_users_file_holds_argon2_hashes_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    assert add_user(path, "ana", "operator", "long enough 1") is True
    assert add_user(path, "ana", "admin", "long enough 2") is False  # replaced, not added
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())["users"]["ana"]
    assert stored["role"] == "admin" and stored["password_hash"].startswith("$argon2id$")
    assert "long enough" not in path.read_text()
    users = Users(path)
    assert users.authenticate("ana", "long enough 2").role == "admin"
    assert users.authenticate("ana", "long enough 1") is None
    assert users.authenticate("nobody", "long enough 2") is None
    assert users.get("ana").may("operator") and not read_users(path)["ana"].role == "viewer"


@pytest.mark.parametrize(
    ("name", "role", "password", "says"),
    [
        ("bad name", "viewer", "long enough", "user name"),
        ("<b>", "viewer", "long enough", "user name"),
        ("ana", "root", "long enough", "role"),
        ("ana", "viewer", "short", "at least"),
    ],
)
def test_bad_users_are_refused(tmp_path: Path, name: str, role: str, password: str, says: str) -> None:
    with pytest.raises(UsersError, match=says):
        add_user(tmp_path / "users.json", name, role, password)  # type: ignore[arg-type]
    assert read_users(tmp_path / "users.json") == {}


def test_users_file_changes_are_picked_up_and_a_broken_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    users = Users(path)
    assert users.get("ana") is None
    add_user(path, "ana", "viewer", "long enough")
    assert users.get("ana").role == "viewer"
    path.write_text('{"users": {"ana": {"role": "god", "password_hash": "x"}}}')
    with pytest.raises(UsersError, match="unknown role"):
        users.get("ana")


def test_sessions_end_at_logout_and_expiry_and_refuse_tampered_cookies() -> None:
    clock = Clock()
    store = SessionStore(ttl_s=60, clock=clock)
    session, cookie = store.create("ana")
    assert store.lookup(cookie) == session
    assert store.lookup(cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")) is None
    assert store.lookup(session.sid) is None  # the bare id, unsigned
    store.revoke(session.sid)
    assert store.lookup(cookie) is None
    session, cookie = store.create("ana")
    clock.now += 61
    assert store.lookup(cookie) is None
    token, signed = store.login_token()
    assert store.check_login_token(signed, token) and not store.check_login_token(signed, token + "x")
    assert not store.check_login_token(None, token) and not SessionStore(60).check_login_token(signed, token)


def test_login_limiter_counts_failures_within_its_window() -> None:
    clock = Clock()
    limiter = LoginLimiter(max_failures=2, window_s=10, clock=clock)
    limiter.failed(["user:ana"])
    assert not limiter.blocked(["user:ana"])
    limiter.failed(["user:ana"])
    assert limiter.blocked(["user:ana", "user:bob"]) and not limiter.blocked(["user:bob"])
    clock.now += 10.5
    assert not limiter.blocked(["user:ana"])


def test_the_command_line_offers_the_console_roles() -> None:
    from cli.console import ROLES as CLI_ROLES
    from console.users import ROLES

    assert CLI_ROLES == ROLES

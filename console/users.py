"""Console users: names, roles and argon2 password hashes in one JSON file (`[console] users_file`).

The file is re-read when it changes, so `inspectd console add-user` takes effect without a restart, and a
user removed from it loses their sessions at their next request.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
RANK = {role: i for i, role in enumerate(ROLES)}  # each role may do what the ones before it may
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_CHARS = 8
FILE_MODE = 0o600

_hasher = PasswordHasher()
# Checked against when the user does not exist, so that a login takes as long for unknown names.
_DUMMY_HASH = _hasher.hash("not a password of anyone")


class UsersError(ValueError):
    """The users file or a requested change is invalid; the message says which and why."""


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    password_hash: str

    def may(self, role: Role) -> bool:
        """Whether this user has at least `role`'s rights."""
        return RANK[self.role] >= RANK[role]


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise UsersError(f"user name {name!r}: 1-64 letters, digits or . _ @ -, starting with a letter or digit")
    return name


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise UsersError(f"password: at least {MIN_PASSWORD_CHARS} characters")
    return _hasher.hash(password)


def _parse(text: str, path: Path) -> dict[str, User]:
    try:
        raw = json.loads(text)
        users = {}
        for name, entry in raw["users"].items():
            if entry["role"] not in ROLES:
                raise UsersError(f"{path}: user {name!r} has unknown role {entry['role']!r}")
            users[check_name(name)] = User(name, entry["role"], entry["password_hash"])
        return users
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsersError(f"{path}: not a console users file ({exc})") from exc


def read_users(path: str | Path) -> dict[str, User]:
    """The users in `path`; an absent file means no users (nobody can log in yet)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    return _parse(text, path)


def add_user(path: str | Path, name: str, role: Role, password: str) -> bool:
    """Add the user or replace their role and password; True when the user is new. The file is replaced
    atomically and readable by its owner only."""
    path = Path(path)
    users = read_users(path)
    if role not in ROLES:
        raise UsersError(f"role {role!r} is not one of: {', '.join(ROLES)}")
    new = check_name(name) not in users
    users[name] = User(name, role, hash_password(password))
    content = {"users": {u.name: {"role": u.role, "password_hash": u.password_hash} for u in users.values()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return new


class Users:
    """The users file, re-read when its modification time or size changes (thread-safe)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, User] = {}

    def get(self, name: str) -> User | None:
        return self._current().get(name)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when the password matches, else None (in about the same time for unknown names)."""
        user = self.get(name)
        try:
            _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return None
        return user

    def _current(self) -> dict[str, User]:
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp or stamp is None:
                self._users = read_users(self.path) if stamp is not None else {}
                self._stamp = stamp
            return self._users

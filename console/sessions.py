"""Sessions, CSRF tokens and login rate limiting, kept in the console process.

The session cookie carries only a random session id, signed (itsdangerous) with a key drawn when the process
starts; the session itself (user, CSRF token, expiry) lives here. So logging out really ends a session: a
copy of the cookie replayed afterwards names a session that no longer exists. A restart logs everyone out,
and the console runs as one process (one replica).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

SESSION_COOKIE = "inspectd_session"
LOGIN_COOKIE = "inspectd_login"  # the login form's CSRF token, before there is a session
TOKEN_BYTES = 32
MAX_TRACKED = 10_000  # keys with failed logins kept before the expired ones are dropped


@dataclass(frozen=True)
class Session:
    sid: str
    user: str
    csrf: str
    expires: float


def same_token(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token; a missing one never matches."""
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())


class SessionStore:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._signer = URLSafeTimedSerializer(secrets.token_bytes(TOKEN_BYTES), salt="inspectd-console")
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: str) -> tuple[Session, str]:
        """A new session and its signed cookie value."""
        session = Session(
            secrets.token_urlsafe(TOKEN_BYTES), user, secrets.token_urlsafe(TOKEN_BYTES), self.clock() + self.ttl_s
        )
        with self._lock:
            self._expire()
            self._sessions[session.sid] = session
        return session, self._signer.dumps(session.sid)

    def lookup(self, cookie: str | None) -> Session | None:
        """The live session the cookie names, if its signature is valid."""
        sid = self._unsign(cookie, "session")
        with self._lock:
            session = self._sessions.get(sid) if sid else None
            if session is not None and session.expires <= self.clock():
                del self._sessions[sid]
                return None
            return session

    def revoke(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def login_token(self) -> tuple[str, str]:
        """A CSRF token for the login form and its signed cookie value (double submit)."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        return token, self._signer.dumps(token, salt="login")

    def check_login_token(self, cookie: str | None, given: str | None) -> bool:
        token = self._unsign(cookie, "login")
        return token is not None and same_token(token, given)

    def _unsign(self, value: str | None, kind: str) -> str | None:
        if not value:
            return None
        try:
            if kind == "login":
                return str(self._signer.loads(value, salt="login", max_age=self.ttl_s))
            return str(self._signer.loads(value, max_age=self.ttl_s))
        except BadSignature:
            return None

    def _expire(self) -> None:
        now = self.clock()
        for sid in [s.sid for s in self._sessions.values() if s.expires <= now]:
            del self._sessions[sid]


class LoginLimiter:
    """At most `max_failures` failed logins per key (a user name, a client address) within `window_s`."""

    def __init__(self, max_failures: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, keys: Iterable[str]) -> bool:
        with self._lock:
            return any(len(self._recent(k)) >= self.max_failures for k in keys)

    def failed(self, keys: Iterable[str]) -> None:
        with self._lock:
            now = self.clock()
            for k in keys:
                self._recent(k, create=True).append(now)
            if len(self._failures) > MAX_TRACKED:  # guessed names must not grow memory without bound
                for k in [k for k in self._failures if not self._recent(k)]:
                    del self._failures[k]

    def _recent(self, key: str, create: bool = False) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            if not create:
                return deque()
            times = self._failures[key] = deque()
        cutoff = self.clock() - self.window_s
        while times and times[0] <= cutoff:
            times.popleft()
        return times

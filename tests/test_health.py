"""The health server under clients that misbehave: a connection that sends nothing (or half a request)
neither blocks other probes nor holds its socket past `[worker] http_timeout_s`."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from daemon.health import HealthServer

TIMEOUT_S = 1.0
ANSWER_WITHIN_S = 2.0


@pytest.fixture
def server() -> Iterator[HealthServer]:
    health = HealthServer("127.0.0.1", 0, CollectorRegistry(), lambda: {}, lambda: None, TIMEOUT_S)
    health.start()
    yield health
    health.stop()


def test_a_half_request_does_not_block_probes_and_is_dropped_after_the_timeout(server: HealthServer) -> None:
    idle = socket.create_connection(("127.0.0.1", server.port))
    try:
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: the request never ends
        opened = time.monotonic()
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=ANSWER_WITHIN_S) as answer:
            assert answer.status == 200
        assert time.monotonic() - started < ANSWER_WITHIN_S
        idle.settimeout(TIMEOUT_S + 5.0)
        try:
            data = idle.recv(1024)  # b"" once the server closes it (a 408-like answer would do as well)
        except ConnectionResetError:
            data = b""
        except TimeoutError:
            pytest.fail("the idle connection was still open 5 s after the server's timeout")
        assert time.monotonic() - opened >= TIMEOUT_S * 0.9
        assert not data or not data.startswith(b"HTTP/1.1 200")
    finally:
        idle.close()


def test_a_silent_connection_is_closed_after_the_timeout(server: HealthServer) -> None:
    idle = socket.create_connection(("127.0.0.1", server.port))
    try:
        idle.settimeout(TIMEOUT_S + 5.0)
        try:
            assert idle.recv(1024) == b""
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail("the silent connection was still open 5 s after the server's timeout")
    finally:
        idle.close()

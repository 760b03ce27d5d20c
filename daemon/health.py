"""The HTTP endpoint: /healthz (alive: the loop makes progress), /readyz (model loaded, Kafka and Redis
reachable, the DLQ accepting dead letters; each not-ready part with its reason), /metrics.

Each connection has its own thread and a socket timeout (`[worker] http_timeout_s`): a client that opens a
connection and sends nothing, or half a request, is disconnected after the timeout instead of holding its
thread (and socket) for ever, and never delays other clients' probes."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class HealthServer:
    """Serves in a daemon thread; `readiness()` returns what is not ready, by name, with the reason."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Callable[[], dict[str, str]],
        liveness: Callable[[], str | None],
        timeout_s: float,
        models: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        """`liveness()` returns why the process is stuck, or None; `timeout_s` bounds each socket read
        and write of a connection; `models()` says what the model loader is doing (shown by /readyz: a
        version loading or failing to load does not make the worker unready, its cameras keep a version)."""
        registry_, readiness_, liveness_, models_ = registry, readiness, liveness, models

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s  # StreamRequestHandler sets it on the socket: an idle client is dropped

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    stuck = liveness_()
                    body = json.dumps({"status": "stalled", "reason": stuck} if stuck else {"status": "ok"})
                    self._send(503 if stuck else 200, "application/json", body.encode())
                elif self.path == "/readyz":
                    problems = readiness_()
                    body = json.dumps(
                        {"ready": not problems, "not_ready": sorted(problems), "reasons": problems, "models": models_()}
                    ).encode()
                    self._send(503 if problems else 200, "application/json", body)
                elif self.path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry_))
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # keep probes out of the logs
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

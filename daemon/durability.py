"""`[redis] durability`: what must hold before the worker commits a batch's Kafka offsets.

A committed offset says "this frame has its verdict". A verdict that Redis acknowledged and then lost
(a crash before its AOF reached the disk, a failover to a replica that never got it) is a frame that
never gets a verdict: nothing redelivers it. So the worker waits for the promise the mode names:

- ``fsync``: Redis fsyncs its AOF before it answers a write (``appendonly yes`` + ``appendfsync
  always``). Checked once at start with ``CONFIG GET``; any other setting refuses the start with the
  fix. Nothing to wait for per batch: the write's reply already means "on disk".
- ``fsync-assume``: the same promise where ``CONFIG`` is refused (managed Redis, a least-privilege ACL
  user): the operator vouches for the server's settings. Still refused when ``CONFIG`` answers otherwise.
- ``replicas:N``: after each batch, ``WAIT N timeout``: N replicas hold its writes (a failover to one
  of them keeps them; a crash of every copy does not). Fewer acks is an outage: retried, not committed.
- ``waitaof``: after each batch, ``WAITAOF 1 0 timeout``: the local AOF fsynced its writes, whatever
  ``appendfsync`` says (with ``everysec`` a batch waits up to ~1 s). Redis >= 7.2; refused at start
  on older servers.
- ``none``: no check. With ``appendfsync everysec`` a host crash loses up to ~1 s of acknowledged
  writes (~2 s when the disk stalls): verdicts whose offsets may already be committed.

WAIT and WAITAOF count the writes of *the connection that calls them*, and redis-py spreads calls over a
pool of connections; so the wait is sent in one pipeline behind a write of its own (an INCR of a barrier
key). Redis replicates and appends to its AOF in one ordered log, so that write's offset covers every
write acknowledged before it, on any connection.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
import structlog

from daemon.config import ConfigError, RedisSection

FSYNC, ASSUME, WAITAOF, NONE, REPLICAS = "fsync", "fsync-assume", "waitaof", "none", "replicas"
FIX_CONF = (
    "in redis.conf `appendonly yes` and `appendfsync always` (at run time: CONFIG SET appendonly yes,"
    " CONFIG SET appendfsync always, CONFIG REWRITE)"
)


class DurabilityRefused(ConfigError):
    """The Redis server cannot keep the configured `[redis] durability` promise: the worker does not start."""


class NotDurable(redis.TimeoutError):
    """A batch's writes were not acknowledged as durable within `[redis] durability_timeout_ms` (too few
    replicas, no fsync): an outage, retried like a timeout; the batch's offsets are not committed."""


@dataclass(frozen=True)
class Mode:
    kind: str
    replicas: int = 0

    @classmethod
    def parse(cls, value: str) -> Mode:
        """From a value `RedisSection` validated: fsync, fsync-assume, waitaof, none or replicas:N."""
        kind, _, n = value.partition(":")
        return cls(kind, int(n)) if kind == REPLICAS else cls(kind)

    def __str__(self) -> str:
        return f"{REPLICAS}:{self.replicas}" if self.kind == REPLICAS else self.kind


class Durability:
    """The start-up check (:meth:`check`) and the wait after each batch's writes (:meth:`after_write`)."""

    def __init__(self, client: redis.Redis, section: RedisSection) -> None:
        self.client = client
        self.mode = Mode.parse(section.durability)
        self.timeout_ms = section.durability_timeout_ms
        self.barrier_key = f"{section.key_prefix}durability:barrier"
        self._log = structlog.get_logger()

    @classmethod
    def checked(cls, client: redis.Redis, section: RedisSection) -> Durability:
        guard = cls(client, section)
        guard.check()
        return guard

    # start -----------------------------------------------------------------------------------------
    def check(self) -> str:
        """Refuse (DurabilityRefused) a server that cannot keep the mode's promise; what holds, for the log.
        Connection errors propagate (the caller retries them)."""
        kind = self.mode.kind
        if kind in (FSYNC, ASSUME):
            detail = self._check_fsync(assume=kind == ASSUME)
        elif kind == WAITAOF:
            detail = self._check_waitaof()
        elif kind == REPLICAS:
            detail = self._check_replicas()
        else:
            detail = self._describe_none()
        log = self._log.warning if kind in (NONE, ASSUME) else self._log.info
        log("redis durability", mode=str(self.mode), detail=detail)
        return detail

    def _config(self) -> dict[str, str] | str:
        """appendonly and appendfsync, or why CONFIG GET was refused."""
        try:
            got = {k: self.client.config_get(k).get(k, "") for k in ("appendonly", "appendfsync")}
        except redis.exceptions.ResponseError as exc:  # NOPERM, or unknown command (renamed, managed Redis)
            return f"{type(exc).__name__}: {exc}"
        return {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in got.items()}

    def _check_fsync(self, assume: bool) -> str:
        conf = self._config()
        if isinstance(conf, str):
            if assume:
                return f"CONFIG GET refused ({conf}): assuming appendonly yes + appendfsync always, as configured"
            raise DurabilityRefused(
                f'[redis] durability = "fsync" checks that Redis fsyncs every write (CONFIG GET appendonly'
                f" appendfsync), but this server refuses CONFIG ({conf}). Either allow it (ACL: +config|get"
                f" for the worker's user) or, if the server does run appendonly yes + appendfsync always, set"
                f' [redis] durability = "fsync-assume" (INSPECTD_REDIS__DURABILITY=fsync-assume); on a server'
                f' you cannot check, "replicas:N" or "waitaof" check each batch instead'
            )
        if conf.get("appendonly") == "yes" and conf.get("appendfsync") == "always":
            return "appendonly yes, appendfsync always: every acknowledged write is on disk"
        raise DurabilityRefused(
            f'[redis] durability = "{self.mode}" needs Redis to fsync every write before answering, but it runs'
            f" appendonly {conf.get('appendonly')!r}, appendfsync {conf.get('appendfsync')!r}: a crash could"
            f" lose verdicts whose offsets are committed. Fix the server: {FIX_CONF}; or choose another"
            f' [redis] durability: "waitaof" (Redis >= 7.2), "replicas:N", or "none" (accepts losing up to'
            f" ~1 s of verdicts on a crash)"
        )

    def _version(self) -> str:
        try:
            return str(self.client.info("server").get("redis_version", "unknown"))
        except redis.exceptions.ResponseError:
            return "unknown"

    def _check_waitaof(self) -> str:
        try:
            local, _ = self.client.execute_command("WAITAOF", 1, 0, self.timeout_ms)
        except redis.exceptions.ResponseError as exc:
            text = str(exc).lower()
            if "unknown command" in text:
                why = f"this server (Redis {self._version()}) has no WAITAOF, which came with Redis 7.2"
                fix = f'upgrade Redis, or use [redis] durability = "fsync" with {FIX_CONF}, or "replicas:N"'
            elif "appendonly" in text:
                why = "WAITAOF needs the AOF, and this server runs appendonly no"
                fix = "set `appendonly yes` in redis.conf (CONFIG SET appendonly yes, CONFIG REWRITE)"
            else:
                why = f"WAITAOF was refused ({type(exc).__name__}: {exc})"
                fix = "allow it (ACL: +waitaof for the worker's user), or choose another [redis] durability"
            raise DurabilityRefused(f'[redis] durability = "waitaof": {why}. Fix: {fix}') from exc
        if int(local) < 1:
            raise NotDurable(f"WAITAOF 1 0 {self.timeout_ms}: the local AOF did not fsync in time")
        return "WAITAOF 1 0 after each batch: its writes are fsynced before the commit"

    def _check_replicas(self) -> str:
        try:
            self.client.execute_command("WAIT", 0, 0)  # returns at once: only checks that WAIT is allowed
        except redis.exceptions.ResponseError as exc:
            raise DurabilityRefused(
                f'[redis] durability = "{self.mode}": WAIT was refused ({type(exc).__name__}: {exc}); allow'
                " it (ACL: +wait for the worker's user) or choose another [redis] durability"
            ) from exc
        connected = self._replicas_connected()
        if connected is not None and connected < self.mode.replicas:
            self._log.warning(
                "fewer replicas than [redis] durability needs: batches are not committed until they connect",
                connected=connected,
                needed=self.mode.replicas,
            )
        seen = "unknown" if connected is None else str(connected)
        return f"WAIT {self.mode.replicas} {self.timeout_ms} after each batch ({seen} replicas connected now)"

    def _replicas_connected(self) -> int | None:
        try:
            return int(self.client.info("replication").get("connected_slaves", 0))
        except redis.exceptions.ResponseError:
            return None

    def _describe_none(self) -> str:
        conf = self._config()
        if isinstance(conf, str):
            return "not checked (CONFIG refused): a crash may lose acknowledged verdicts whose offsets are committed"
        if conf.get("appendonly") == "yes" and conf.get("appendfsync") == "always":
            return "not checked; the server fsyncs every write (durability = fsync would say so)"
        if conf.get("appendonly") != "yes":
            window = "no AOF: a crash loses every write since the last RDB snapshot"
        elif conf.get("appendfsync") == "everysec":
            window = "appendfsync everysec: a host crash loses the last ~1 s of writes (~2 s when the disk stalls)"
        else:
            window = f"appendfsync {conf.get('appendfsync')}: a host crash loses what the OS had not yet flushed"
        return f"not checked; {window}, verdicts whose offsets may be committed"

    # each batch ------------------------------------------------------------------------------------
    def after_write(self) -> None:
        """Between a batch's Redis writes and its offset commit: wait for the mode's acknowledgement, or
        raise NotDurable (an outage: the caller retries, nothing is committed meanwhile)."""
        kind = self.mode.kind
        if kind not in (REPLICAS, WAITAOF):
            return  # fsync: the writes' replies already meant "on disk"; none: nothing is promised
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(self.barrier_key)  # this connection's offset now covers every earlier write
        if kind == REPLICAS:
            pipe.execute_command("WAIT", self.mode.replicas, self.timeout_ms)
        else:
            pipe.execute_command("WAITAOF", 1, 0, self.timeout_ms)
        _, acks = pipe.execute()
        if kind == REPLICAS and int(acks) < self.mode.replicas:
            raise NotDurable(
                f"WAIT {self.mode.replicas} {self.timeout_ms}: {acks} of {self.mode.replicas} replicas"
                " acknowledged the batch's writes in time"
            )
        if kind == WAITAOF and int(acks[0]) < 1:
            raise NotDurable(f"WAITAOF 1 0 {self.timeout_ms}: the local AOF did not fsync the batch in time")

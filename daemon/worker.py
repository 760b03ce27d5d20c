"""The streaming worker: frames from Kafka, CS-Flow verdicts into Redis, offsets committed last.

Each iteration: collect a batch (size or max wait), parse and decode (thread pool), score each camera's
frames with the version it is served (daemon/serving.py), update the cameras' drift monitors
(daemon/drift_watch.py), write verdicts and drift states to Redis, send bad frames to the dead-letter
topic, commit that batch's offsets. Under a backlog (a full batch), where `[worker] decode_ahead` says so,
the next batch is polled before the current one is scored, so that the pool decodes it meanwhile; it is
committed only once it is done itself, and a stop leaves it uncommitted, to be redelivered. Where `[worker]
write_behind` says so, a batch's Redis writes run in a thread of their own while the next batch is scored,
and it is committed after them, before the next batch's writes start. Between
batches: operator confirmations, model swaps announced by the registry, and the adaptation controller
(daemon/controller.py, whose runs are in the background). Outages are retried with backoff while /readyz
reports not-ready; nothing is committed before it is durable, so a crash at any point only causes
redelivery, and idempotent verdict writes turn that into exactly one verdict.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import redis
import structlog
import torch
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, CorruptRecordError, InvalidRecordError, KafkaError, RebalanceInProgressError
from kafka.structs import OffsetAndMetadata

from csflow.artifacts import ModelVersion
from csflow.data import to_tensor
from csflow.model import CSFlow
from csflow.scoring import score_images
from csflow.serving_options import ServingOptions, forward_batch, overlaps_forward
from daemon import dead_letters
from daemon.attempts import CRASH_LOOP, Attempts
from daemon.config import Settings
from daemon.confirmations import AdaptationBuffer, ConfirmationProcessor
from daemon.controller import AdaptationController
from daemon.dead_letters import DeadLetter, DeadLetterRefused
from daemon.drift_watch import DriftSave, DriftWatch
from daemon.durability import Durability
from daemon.events import EventLog
from daemon.frames import BadFrame, Frame, decode_frame, parse_record
from daemon.health import HealthServer
from daemon.kafka_clients import make_consumer, make_producer
from daemon.metrics import WorkerMetrics
from daemon.registry import ModelRegistry
from daemon.serving import ServedModels, Swap
from daemon.store import Keys, Verdict, VerdictStore

T = TypeVar("T")
OUTAGE_ERRORS = (redis.RedisError, KafkaError, OSError)
# Redis errors that a retry can outlast (restart, failover, loading); any other is permanent (NOPERM,
# WRONGTYPE, OOM command not allowed, a script error): the loop holds at the longest backoff and /readyz
# names the error, since retrying cannot fix it but an operator can.
TRANSIENT_REDIS_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError,
)
# Out of poll(), these concern one record (kafka-python wraps a header it cannot decode as corrupt).
RECORD_ERRORS = (CorruptRecordError, InvalidRecordError)
MAX_DETAIL_CHARS = 500
# A NaN or infinite score is a broken model or input, never "normal": the frame is judged anomalous and
# its verdict says why (`nan > threshold` is False, so a plain comparison would pass it).
NON_FINITE = "non_finite_score"
REBALANCE_ERRORS = (CommitFailedError, RebalanceInProgressError)
STATUS_INTERVAL_S = 1.0
KAFKA_CALL_TIMEOUT_MS = 10_000  # a blocking broker call never holds the loop (and SIGTERM) longer


class DrainTimeout(RuntimeError):
    """Stopping was requested but Kafka or Redis stayed unreachable past the drain timeout."""


class Stopped(Exception):
    """Stopping was requested while retrying with no batch in flight: nothing to finish, exit now."""


@dataclass
class Batch:
    """Records polled together and what is known of them before scoring: the dead letters found so far
    (records poll() could not read, frames that do not parse) and, on the hot path, the parsed frames with
    their decodes running in the pool. `counts`: the records' attempts when one of them was in flight at a
    crash; such a batch is not decoded ahead but taken one record at a time (`Worker._attempt`)."""

    records: list[Any]
    dead: list[DeadLetter]
    counts: list[int] | None = None
    parsed: list[tuple[Any, Frame]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    decoded: Iterator[torch.Tensor | BadFrame] = field(default_factory=lambda: iter(()))

    @property
    def offsets(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """What committing this batch commits: past its last record or dead letter in each partition. Not the
        consumer's positions: under a backlog those are already past the next batch, polled ahead."""
        last: dict[TopicPartition, int] = {}
        for item in [*self.records, *self.dead]:
            tp = TopicPartition(item.topic, item.partition)
            last[tp] = max(last.get(tp, -1), item.offset)
        return {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in last.items()}


@dataclass
class Scored:
    """A batch scored, its Redis writes still to do: what `Worker._write` writes and what `Worker._finish`
    needs afterwards. `records`: those whose attempt counters finishing clears; `sources`: the record of each
    frame source, for a duplicate id's dead letter; `stages`: seconds spent decoding and scoring."""

    polled: int
    records: list[Any]
    offsets: dict[TopicPartition, OffsetAndMetadata]
    verdicts: list[Verdict]
    frames: list[Frame]
    images: list[torch.Tensor]
    dead: list[DeadLetter]
    sources: dict[str, Any]
    drift: DriftSave
    stages: dict[str, float]


@dataclass(frozen=True)
class Written:
    """What a batch's writes returned: verdicts new to Redis, positions of reused frame ids, drift alarms
    announced (summaries by camera), the seconds they took and when they were done (ms since the epoch)."""

    new: int
    duplicates: list[int]
    alarms: dict[str, dict]
    seconds: float
    at_ms: float


class CameraPartitions(ConsumerRebalanceListener):
    """Which partitions carry each camera, learnt from the frames that arrive, least recently seen first (so
    that `idle` can name the cameras to forget beyond [worker] max_cameras). When partitions are revoked,
    the cameras that no other assigned partition carries are handed to `drop`: their per-camera state (the
    drift monitor, its metric series) moves with the partition. The worker that gets the partition resumes
    the state saved in Redis, and so does this one if the partition comes back. Under the eager protocol
    (kafka-python's default) a rebalance revokes every partition first, so every camera is resumed from
    Redis by its next frame: one read per camera per rebalance. A lost membership (`on_partitions_lost`)
    counts as a revocation."""

    def __init__(self, drop: Callable[[set[str]], None]) -> None:
        self._drop = drop
        self._partitions: OrderedDict[str, set[tuple[str, int]]] = OrderedDict()

    def seen(self, camera: str, topic: str, partition: int) -> None:
        self._partitions.setdefault(camera, set()).add((topic, partition))
        self._partitions.move_to_end(camera)

    def idle(self, keep: int) -> set[str]:
        """Forget all but the `keep` most recently seen cameras; returns the forgotten ones."""
        gone = set()
        while len(self._partitions) > keep:
            gone.add(self._partitions.popitem(last=False)[0])
        return gone

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in revoked}
        dropped = set()
        for camera, partitions in list(self._partitions.items()):
            partitions -= gone
            if not partitions:
                dropped.add(camera)
                del self._partitions[camera]
        if dropped:
            self._drop(dropped)

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        pass  # a camera's state is resumed from Redis by its next frame


class Worker:
    def __init__(self, settings: Settings, model: ModelVersion, device: torch.device) -> None:
        """`model` is the configured version ([worker] model_dir): the registry's default when it has none,
        and what a camera is served when its version cannot be loaded. Every served version runs under
        `options` ([model] precision, channels_last; fold_batch_norm and a bf16 extractor are refused here,
        see `ModelSection.worker_serving_options`)."""
        self.settings = settings
        self.options = settings.model.worker_serving_options()
        self.model = model
        self.device = device
        self.metrics = WorkerMetrics(settings.worker.max_camera_series)
        self._limits = settings.limits.to_limits()  # built once, not per frame on the decode path
        cfg = settings.worker
        cores, threads = len(os.sched_getaffinity(0)), torch.get_num_threads()
        self._decode_ahead = overlaps_forward(cfg.decode_ahead, device.type, cores, threads, cfg.decode_threads)
        self._write_behind = overlaps_forward(cfg.write_behind, device.type, cores, threads, 1)  # one writer thread
        self.status = {"model": True, "kafka": False, "redis": False, "dlq": True}
        self.reasons: dict[str, str] = {"kafka": "not connected yet", "redis": "not connected yet"}
        self._stubs: list[DeadLetter] = []  # records poll() could not deserialise, skipped by offset
        self.http_port: int | None = None
        self._stop = threading.Event()
        self._in_flight = False  # a batch is being handled (polled, scored, written unless behind)
        # a batch scored and being written behind the next batch's forward pass, not yet committed
        self._pending: tuple[Scored, Future[Written]] | None = None
        self._client: redis.Redis | None = None
        self._stop_deadline: float | None = None
        self._next_lag_check = 0.0
        self._next_status_check = 0.0
        self._beat = time.monotonic()  # the loop's last sign of progress (an iteration or a retry)
        self._log = structlog.get_logger()

    # lifecycle ---------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Finish the current batch, commit, exit. Safe to call from a signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def _busy(self) -> bool:
        """A batch is between fetch and commit (being scored, or written behind): a stop finishes it first."""
        return self._in_flight or self._pending is not None

    def not_ready(self) -> dict[str, str]:
        """What is not ready, with the reason when one is known."""
        return {name: self.reasons.get(name, "") for name, ok in self.status.items() if not ok}

    def stalled(self) -> str | None:
        """Why the loop is not alive: no iteration and no retry for [kafka] max_poll_interval_ms (a decode
        or a forward pass that hangs, a deadlock). Waiting out an outage is progress: a retry beats."""
        idle = time.monotonic() - self._beat
        limit = self.settings.kafka.max_poll_interval_ms / 1000
        return f"no progress for {idle:.0f} s (limit {limit:.0f} s)" if idle > limit else None

    def _set_status(self, target: str, ok: bool, reason: str = "") -> None:
        self.status[target] = ok
        if ok:
            self.reasons.pop(target, None)
        elif reason:
            self.reasons[target] = reason[:MAX_DETAIL_CHARS]

    def run(self) -> int:
        cfg = self.settings
        with ExitStack() as stack:
            health = HealthServer(
                cfg.worker.http_host,
                cfg.worker.http_port,
                self.metrics.registry,
                self.not_ready,
                self.stalled,
                cfg.worker.http_timeout_s,
                lambda: self.models.load_state() if hasattr(self, "models") else {},
            )
            health.start()
            stack.callback(health.stop)
            self.http_port = health.port
            try:
                return self._serve(stack)
            except Stopped as exc:
                self._log.info("worker stopped while waiting", reason=str(exc))
                return 0
            except DrainTimeout as exc:
                self._log.error("drain timed out, exiting without commit", reason=str(exc))
                return 1

    def _serve(self, stack: ExitStack) -> int:
        """Connect (retrying), then score until stopped; `stack` closes what was opened."""
        cfg = self.settings
        client = self._client = cfg.redis.client()  # first: its readiness is probed while Kafka is awaited
        stack.callback(client.close)
        self._probe_redis()
        self.cameras = CameraPartitions(self._revoked)
        self.consumer: KafkaConsumer = self._retry(
            "kafka", lambda: make_consumer(cfg.kafka, cfg.worker.batch_size, self.cameras)
        )
        stack.callback(self.consumer.close)
        self.producer: KafkaProducer = self._retry("kafka", lambda: make_producer(cfg.kafka))
        stack.callback(self.producer.close)
        self.store = VerdictStore(
            client,
            Keys(cfg.redis.key_prefix),
            cfg.redis.verdict_ttl_s,
            cfg.redis.frame_ttl_s,
            cfg.redis.stream_max_len,
            cfg.redis.cache_policy(),
            cfg.redis.stream_retention_s,
        )
        self._retry("redis", client.ping)
        self.attempts = Attempts(client, cfg.redis.key_prefix, cfg.worker.attempts_ttl_s)
        self.durability = self._retry("redis", lambda: Durability.checked(client, cfg.redis))  # or refuse to start
        self.confirmations = ConfirmationProcessor(
            self.store, cfg.confirmations, consumer=f"{socket.gethostname()}-{os.getpid()}"
        )
        registry = ModelRegistry.from_settings(client, cfg)
        events = EventLog(client, self.store.keys, cfg.redis.events_max_len)
        self.drift = DriftWatch(client, self.store.keys, events, cfg.drift.to_config(), cfg.redis.drift_state_ttl_s)
        self.models = ServedModels(
            registry,
            cfg.registry.cache_dir,
            self.device,
            cfg.registry.refresh_s,
            self.model,
            self._swapped,
            on_load_failed=lambda version, error: self.metrics.model_load_failures.inc(),
            load_queue=cfg.registry.load_queue,
            load_retry_s=cfg.registry.load_retry_s,
            options=self.options,
        )
        stack.callback(self.models.close)
        self._retry("redis", lambda: self.models.bootstrap(cfg.worker.model_dir))
        buffer = AdaptationBuffer(client, self.store.keys)
        self.controller = AdaptationController(cfg, registry, buffer, events, self.metrics)
        stack.callback(self.controller.close)
        pool = stack.enter_context(ThreadPoolExecutor(cfg.worker.decode_threads, thread_name_prefix="decode"))
        self._writer = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="write"))
        self._log.info(
            "worker started",
            topic=cfg.kafka.topic,
            group=cfg.kafka.group_id,
            configured_version=self.model.version,
            device=str(self.device),
            serving=str(self.options),
            decode_ahead=self._decode_ahead,
            write_behind=self._write_behind,
            http_port=self.http_port,
        )
        ahead: Batch | None = None  # polled while the batch before it was scored (a backlog)
        try:
            while not self._stop.is_set():
                self._beat = time.monotonic()
                batch, ahead = ahead or self._next_batch(pool), None
                if batch is not None:
                    self._in_flight = True
                    try:
                        backlog = len(batch.records) >= cfg.worker.batch_size
                        if backlog and self._decode_ahead and batch.counts is None:
                            ahead = self._next_batch(pool)  # a backlog: it decodes while this batch is scored
                            batch = self._still_held(batch)  # that poll may have rebalanced the group
                        self._attempt(batch, pool)
                    except DrainTimeout:  # not a crash: leave no count behind if Redis lets us (Kafka was out)
                        self._release(batch)
                        raise
                    finally:
                        self._in_flight = False  # a batch polled ahead is not finished on a stop
                        self._beat = time.monotonic()  # a finished batch is progress, before the next poll returns
                else:  # idle: the batch written behind is committed now, and its attempt counters cleared
                    self._finish_pending()
                    if self.attempts.pending:
                        self._retry("redis", self.attempts.flush)
                self._confirm()
                self._follow_models()
                self._check_kafka()
            self._finish_pending()  # a stop: the batch written behind is committed like the one before it
        finally:  # however the loop ends, the batch polled ahead is not committed: it is redelivered whole
            self._release(ahead)
            self._drop_pending()
        if self.attempts.pending:
            self._retry("redis", self.attempts.flush)
        self._log.info("worker stopped")
        return 0

    # one iteration -----------------------------------------------------------------------------
    def _collect(self) -> list[Any]:
        """Up to batch_size records; waits at most max_wait_ms after the first one arrives."""
        cfg = self.settings.worker
        max_wait = cfg.max_wait_ms / 1000
        records: list[Any] = []
        first_at: float | None = None
        while len(records) < cfg.batch_size and not self._stop.is_set():
            left = max_wait if first_at is None else max_wait - (time.monotonic() - first_at)
            if left <= 0:
                break
            try:
                polled = self.consumer.poll(
                    timeout_ms=max(1, int(left * 1000)), max_records=cfg.batch_size - len(records)
                )
            except Exception as exc:
                if self._skip_unreadable(exc):
                    continue
                self._set_status("kafka", False, f"poll: {type(exc).__name__}: {exc}")
                self._log.warning("kafka poll failed", error=f"{type(exc).__name__}: {exc}")
                self._stop.wait(cfg.retry_backoff_s)
                break
            got = [r for batch in polled.values() for r in batch]
            if not got and first_at is None:
                break
            if got and first_at is None:
                first_at = time.monotonic()
            records += got
        return records

    def _next_batch(self, pool: ThreadPoolExecutor) -> Batch | None:
        """Poll a batch and count its attempt (before anything decodes it: a decoder that kills the process
        must find its record counted); on the hot path, parse it and start decoding it in the pool."""
        records = self._collect()
        stubs, self._stubs = self._stubs, []
        if not records and not stubs:
            return None
        counts = self._retry("redis", lambda: self.attempts.begin(records)) if records else None
        return Batch(records, stubs, counts) if counts is not None else self._prepare(records, stubs, pool)

    def _prepare(self, records: list[Any], dead: list[DeadLetter], pool: ThreadPoolExecutor) -> Batch:
        """Parse the records (one that does not parse is a dead letter) and start decoding their frames in the
        pool, at the input size of the version each camera is served now."""
        dead = list(dead)
        parsed: list[tuple[Any, Frame]] = []
        for record in records:
            try:
                parsed.append((record, parse_record(record, self.settings.kafka.max_message_bytes)))
            except BadFrame as exc:
                dead.append(DeadLetter.of(record, exc.reason, exc.detail))
            except Exception as exc:
                dead.append(DeadLetter.of(record, "parse_error", _describe(exc)))
        for record, frame in parsed:
            self.cameras.seen(frame.camera_id, record.topic, record.partition)
        served = self._retry("redis", lambda: self.models.models({f.camera_id for _, f in parsed}))
        sizes = [served[f.camera_id].model.image_size for _, f in parsed]
        return Batch(records, dead, None, parsed, sizes, pool.map(self._decode, [f for _, f in parsed], sizes))

    def _still_held(self, batch: Batch) -> Batch:
        """The batch without the records of partitions that a rebalance (inside the poll ahead) took away while
        it waited: their new owner scores them from its committed offset, and two workers must not feed one
        camera's drift monitor. Their attempt counters are cleared with the next call."""
        assigned = self.consumer.assignment()

        def held(item: Any) -> bool:
            return TopicPartition(item.topic, item.partition) in assigned

        if all(held(item) for item in [*batch.records, *batch.dead]):
            return batch
        gone = [r for r in batch.records if not held(r)]
        self.attempts.finish(gone)
        self._log.info("records of revoked partitions left to their new owner", records=len(gone))
        decoded = zip(batch.parsed, batch.sizes, batch.decoded, strict=True)
        kept = [(parsed, size, image) for parsed, size, image in decoded if held(parsed[0])]
        return Batch(
            [r for r in batch.records if held(r)],
            [d for d in batch.dead if held(d)],
            batch.counts,
            [p for p, _, _ in kept],
            [size for _, size, _ in kept],
            iter([image for _, _, image in kept]),
        )

    def _release(self, batch: Batch | None) -> None:
        """A batch left unfinished on the way out: its records were not in flight at a crash, so their attempt
        counts go (best effort). A batch that carries a crash's counts keeps them."""
        if batch is not None and batch.counts is None and batch.records:
            self.attempts.abandon(batch.records)

    def _skip_unreadable(self, exc: Exception) -> bool:
        """An exception out of poll() that concerns one record (not the broker): skip that record by offset
        and queue a stub dead letter naming it. kafka-python parses a whole record batch at once, so the
        records after it in the same producer batch fail the same way and are stubbed one by one.
        False when the exception is an outage or its record cannot be located."""
        if isinstance(exc, KafkaError) and not isinstance(exc, RECORD_ERRORS):
            return False
        # The partition whose records were being unpacked (kafka-python keeps it while it raises).
        part = getattr(getattr(self.consumer, "_fetcher", None), "_next_partition_records", None)
        tp = getattr(part, "topic_partition", None)
        if tp is None or tp not in self.consumer.assignment():
            self._log.error("unreadable record in an unknown partition", error=f"{type(exc).__name__}: {exc}")
            return False
        offset = self.consumer.position(tp, timeout_ms=KAFKA_CALL_TIMEOUT_MS)
        self.consumer.seek(tp, offset + 1)
        detail = _describe(exc)
        self._stubs.append(DeadLetter.stub(tp.topic, tp.partition, offset, "unreadable_record", detail))
        self._log.warning("unreadable record skipped", source=f"{tp.topic}:{tp.partition}:{offset}", error=detail)
        return True

    def _attempt(self, batch: Batch, pool: ThreadPoolExecutor) -> None:
        """One batch, its attempt counted when it was polled (daemon/attempts.py). If one of its records was in
        flight when a process died, the records are taken one at a time, each counted and committed on its
        own, so that only the record that kills the process is counted again; one that has reached
        [worker] max_attempts is dead-lettered (crash_loop) without being decoded."""
        records = batch.records
        if batch.counts is None:  # the hot path: nothing of this batch was in flight at a crash
            self._handle(batch, pool)
            return
        self._finish_pending()  # committed in order: the batch before this one first
        cap = self.settings.worker.max_attempts
        self._log.warning(
            "records in flight at a crash: one at a time",
            sources=[f"{r.topic}:{r.partition}:{r.offset}" for r, n in zip(records, batch.counts, strict=True) if n],
        )
        stubs = batch.dead  # sent with the first record, committed with the batch (they may lie past it)
        for record, count in zip(records, batch.counts, strict=True):
            if count >= cap:
                detail = f"in flight when the process died {count} times ([worker] max_attempts {cap})"
                one = Batch([], [*stubs, DeadLetter.of(record, CRASH_LOOP, detail)])
            else:
                self._retry("redis", lambda record=record: self.attempts.start(record))
                one = self._prepare([record], stubs, pool)
            # committed by itself: a later death redelivers only the rest
            self._handle(one, pool, Batch([record], []).offsets, [record])
            stubs = []
        self._commit(batch.offsets)

    def _handle(
        self,
        batch: Batch,
        pool: ThreadPoolExecutor,
        offsets: dict[TopicPartition, OffsetAndMetadata] | None = None,
        done: list[Any] | None = None,
    ) -> None:
        """One batch, committed up to `offsets` (default: the whole batch), the attempt counters of `done`
        (default: its records) cleared. On the hot path with `[worker] write_behind`, its writes run while
        the next batch is scored; otherwise they run now."""
        scored = self._score_batch(batch, offsets or batch.offsets, batch.records if done is None else done)
        if self._write_behind and offsets is None:
            self._finish_pending()  # the batch before: its writes ran during this batch's forward pass
            # PNG-encoded on the writer's own thread: the next batch's decodes wait on the pool, not on this
            self._pending = scored, self._writer.submit(self._write, scored, None)
        else:
            self._finish(scored, self._write(scored, pool))

    def _score_batch(self, batch: Batch, offsets: dict[TopicPartition, OffsetAndMetadata], done: list[Any]) -> Scored:
        """Decode (already running in the pool), score, update the drift monitors and the shadow. Whatever one
        frame does (unparsable, undecodable, the model raising on it) sends that frame to the DLQ with a reason
        code; the others get their verdicts."""
        t0 = time.perf_counter()
        dead, parsed = list(batch.dead), batch.parsed
        # again: a swap between polling and now may serve a camera a version with another input size
        served = self._retry("redis", lambda: self.models.models({f.camera_id for _, f in parsed}))
        decoded_ok: list[tuple[Any, Frame, torch.Tensor]] = []
        for (record, frame), size, image in zip(parsed, batch.sizes, batch.decoded, strict=True):
            if served[frame.camera_id].model.image_size != size:
                image = self._decode(frame, served[frame.camera_id].model.image_size)
            if isinstance(image, BadFrame):
                dead.append(DeadLetter.of(record, image.reason, image.detail))
            else:
                decoded_ok.append((record, frame, image))
        t1 = time.perf_counter()
        scores, failed = self._score([served[f.camera_id] for _, f, _ in decoded_ok], [i for _, _, i in decoded_ok])
        good: list[tuple[Frame, torch.Tensor]] = []
        kept: list[float] = []
        for i, (record, frame, image) in enumerate(decoded_ok):
            if i in failed:
                dead.append(DeadLetter.of(record, "score_error", failed[i]))
            else:
                good.append((frame, image))
                kept.append(float(scores[i]))
        scores = np.asarray(kept)
        versions = [served[f.camera_id] for f, _ in good]
        cameras = {f.camera_id: served[f.camera_id] for f, _ in good}
        self._retry("redis", lambda: self.drift.prepare(cameras))
        fresh = self._retry("redis", lambda: self._fresh([f for f, _ in good]))
        drift_states = self._observe_drift(good, versions, scores, fresh)
        self._score_shadow(good, versions, scores, fresh)
        now_ms = time.time() * 1000
        verdicts = [
            Verdict(
                f.frame_id,
                f.camera_id,
                f.ts_ms,
                float(s),
                v.threshold,
                not math.isfinite(s) or bool(s > v.threshold),
                v.version,
                round(now_ms - f.ts_ms, 1),
                d,
                "" if math.isfinite(s) else NON_FINITE,
                f.sha256,
            )
            for (f, _), v, s, d in zip(good, versions, scores, drift_states, strict=True)
        ]
        return Scored(
            len(batch.records),
            done,
            offsets,
            verdicts,
            [f for f, _ in good],
            [image for _, image in good],
            dead,
            {frame.source: record for record, frame, _ in decoded_ok},
            self.drift.snapshot(),
            {"decode": t1 - t0, "score": time.perf_counter() - t1},
        )

    def _write(self, scored: Scored, pool: ThreadPoolExecutor | None) -> Written:
        """The batch's Redis writes, durable before it returns: cached frames (PNG-encoded in `pool`, or on this
        thread; only those an operator may confirm, as the model saw them), verdicts, drift states and alarms."""
        t0 = time.perf_counter()
        cache = self.store.to_cache(scored.verdicts, scored.frames, scored.images, pool)
        new, duplicates = self._retry("redis", lambda: self.store.write_all(scored.verdicts, cache))
        alarms = self._retry("redis", lambda: self.drift.write(scored.drift))
        self._retry("redis", self.durability.after_write)  # [redis] durability: the writes are safe to commit
        return Written(new, duplicates, alarms, time.perf_counter() - t0, time.time() * 1000)

    def _finish(self, scored: Scored, written: Written) -> None:
        """After the batch's writes: reused frame ids and bad frames to the DLQ, then its offsets committed and
        its attempt counters cleared; metrics and the batch's log line."""
        t0 = time.perf_counter()
        dead, verdicts = list(scored.dead), scored.verdicts
        for i in written.duplicates:  # the id has a verdict for other bytes: never a silent drop
            frame = scored.frames[i]
            dead.append(DeadLetter.of(scored.sources[frame.source], "duplicate_frame_id", f"frame_id {frame.frame_id}"))
        if written.duplicates:
            reused = set(written.duplicates)
            verdicts = [v for i, v in enumerate(verdicts) if i not in reused]
        for camera, summary in written.alarms.items():
            self._log.warning("drift alarm", camera_id=camera, model_version=scored.drift.alarms[camera][0], **summary)
        if dead:
            self._dead_letter(dead)
        self._commit(scored.offsets)
        self.attempts.finish(scored.records)
        if idle := self.cameras.idle(self.settings.worker.max_cameras):  # after the batch's drift states are saved
            self._forget(idle, "cameras idle longest beyond [worker] max_cameras forgotten")
        stages = {**scored.stages, "redis": written.seconds, "commit": time.perf_counter() - t0}
        self._observe(verdicts, dead, stages, written.at_ms)
        self._log.info(
            "batch",
            frames=scored.polled,
            scored=len(verdicts),
            new_verdicts=written.new,
            dead_lettered=len(dead),
            anomalous=sum(v.anomalous for v in verdicts),
            versions={version: len(idx) for version, idx in _groups(v.model_version for v in verdicts).items()},
            ms={k: round(v * 1000, 1) for k, v in stages.items()},
        )

    def _finish_pending(self) -> None:
        """The batch written behind: wait for its writes, then finish it. Should they fail (a drain timeout, a
        stop while Redis is out), its records stay uncommitted and their attempt counters go."""
        if self._pending is None:
            return
        scored, write = self._pending
        try:
            self._finish(scored, write.result())
        except BaseException:
            self.attempts.abandon(scored.records)
            raise
        finally:
            self._pending = None

    def _drop_pending(self) -> None:
        """On the way out by an exception: the batch written behind ends its writes and stays uncommitted, to be
        redelivered (its verdicts are then found written); its attempt counters go (best effort)."""
        if self._pending is None:
            return
        (scored, write), self._pending = self._pending, None
        wait([write])
        self.attempts.abandon(scored.records)

    def _decode(self, frame: Frame, size: int) -> torch.Tensor | BadFrame:
        try:
            return to_tensor(decode_frame(frame, self._limits), size)
        except BadFrame as exc:
            return exc
        except Exception as exc:  # a decoder bug or an input Pillow does not wrap (e.g. a truncated IHDR)
            return BadFrame("decode_error", _describe(exc))

    def _score(self, versions: list[ModelVersion], images: list[torch.Tensor]) -> tuple[np.ndarray, dict[int, str]]:
        """Scores in frame order, one forward pass per model version in the batch; and the frames the model
        raised on, with the error. A group that raises is scored frame by frame, so that one frame that
        breaks the model does not take the others with it."""
        scores = np.full(len(images), np.nan)
        failed: dict[int, str] = {}
        for idx in _groups(v.version for v in versions).values():
            model = versions[idx[0]]
            try:
                scores[idx] = self._forward(model, [images[i] for i in idx])
                continue
            except Exception as exc:
                if len(idx) == 1:
                    failed[idx[0]] = _describe(exc)
                    continue
                self._log.warning("batch forward failed, scoring frame by frame", error=_describe(exc))
            for i in idx:
                try:
                    scores[i] = self._forward(model, [images[i]])[0]
                except Exception as exc:
                    failed[i] = _describe(exc)
        return scores, failed

    @torch.inference_mode()
    def _forward(self, version: ModelVersion, images: list[torch.Tensor]) -> np.ndarray:
        """Scores of one version's frames, `[worker] forward_batch` at a time (on a CPU, large images one
        by one: a batch's activations outgrow the caches)."""
        batch = torch.stack(images)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        size = version.model.image_size
        step = forward_batch(self.settings.worker.forward_batch, self.device.type, size, len(images))
        return score_images(version.model, batch, batch_size=step, options=self.options).image

    def _fresh(self, frames: list[Frame]) -> list[bool]:
        """Which frames have no verdict yet (one pipelined EXISTS per batch) and come first in the batch
        under their id: only those feed the drift monitors and a shadow. A redelivered frame (after a
        crash, a rebalance, a producer's retry) was counted when its verdict was written, and a reused id
        is a dead letter."""
        if not frames:
            return []
        pipe = self.store.client.pipeline(transaction=False)
        for frame in frames:
            pipe.exists(self.store.keys.verdict(frame.frame_id))
        present = pipe.execute()
        # the batch written behind may not have reached Redis yet: its frames were counted all the same
        seen = {f.frame_id for f in self._pending[0].frames} if self._pending is not None else set()
        fresh = []
        for frame, exists in zip(frames, present, strict=True):
            fresh.append(not exists and frame.frame_id not in seen)
            seen.add(frame.frame_id)
        return fresh

    def _score_shadow(
        self,
        good: list[tuple[Frame, torch.Tensor]],
        versions: list[ModelVersion],
        scores: np.ndarray,
        fresh: list[bool],
    ) -> None:
        """A candidate in shadow scores its camera's fresh frames of this batch beside the parent, whose
        scores are the verdicts, and each frame's sensitivity probes; the parent scores the same probes (its
        sensitivity on the same frames) and, with [adapt] recalibrate, the frames again for their NLLs (what
        its recalibration needs). Without a candidate (the parent alone is recalibrated) the parent's columns
        stand for the candidate's. The controller decides once it has seen enough (adapters/shadow.py). The
        candidate is built on the served parent (its flow, its layout), so both run under `options`."""
        shadow = self.controller.shadow
        if shadow is None:
            return
        camera, candidate = shadow
        idx = [
            i for i, (frame, _) in enumerate(good) if frame.camera_id == camera and fresh[i] and np.isfinite(scores[i])
        ]
        if not idx:
            return
        t0 = time.perf_counter()
        images = torch.stack([good[i][1] for i in idx])
        probes = self.controller.shadow_probes(images).to(images.dtype)
        # the parent's frames again only for their NLLs, which only its recalibration uses
        frames = candidate is None or self.settings.adapt.recalibrate
        parent = shadow_pass(versions[idx[0]].model, images, probes, self.options, frames)
        if parent.error is not None:  # the parent's columns are figures or a recalibration's: the batch goes on
            self._log.warning("shadow parent pass failed", camera_id=camera, error=parent.error)
        if candidate is None:
            ours = parent
        else:
            ours = shadow_pass(candidate, images, probes, self.options)
            if ours.error is not None:  # a broken candidate must not cost the batch: it fails its shadow instead
                self._log.warning("shadow candidate failed", camera_id=camera, error=ours.error)
        self.metrics.shadow_frames.inc(len(idx))
        self.metrics.shadow_seconds.inc(time.perf_counter() - t0)
        self.controller.observe_shadow(
            [float(scores[i]) for i in idx], ours.scores, ours.nll, ours.probes, parent.probes, parent.nll
        )

    def _observe_drift(
        self,
        good: list[tuple[Frame, torch.Tensor]],
        versions: list[ModelVersion],
        scores: np.ndarray,
        fresh: list[bool],
    ) -> list[str]:
        """Each camera's monitor takes its fresh frames' scores in order; the drift state after each frame."""
        states = [""] * len(good)
        for camera, idx in _groups(f.camera_id for f, _ in good).items():
            observed = self.drift.observe(
                camera, versions[idx[0]], [float(scores[i]) for i in idx], [fresh[i] for i in idx]
            )
            for i, state in zip(idx, observed, strict=True):
                states[i] = state
            self.metrics.drift_alarm.labels(self.metrics.camera(camera)).set(observed[-1] == "alarm")
        return states

    def _dead_letter(self, dead: list[DeadLetter]) -> None:
        """Send to the DLQ (outages retried); a letter the DLQ refuses for good is noted in Redis instead,
        counted, and /readyz names the error until a later dead letter goes through."""
        cfg = self.settings.kafka
        for letter in dead:
            self._log.warning("frame dead-lettered", reason=letter.reason, detail=letter.detail, source=letter.source)
        refused = self._retry(
            "kafka", lambda: dead_letters.send(self.producer, cfg, dead, KAFKA_CALL_TIMEOUT_MS / 1000)
        )
        if not refused:
            self._set_status("dlq", True)
            return
        for r in refused:
            self.metrics.dlq_refused.labels(type(r.error).__name__).inc()
            self._log.error(
                "the DLQ refused a dead letter", source=r.letter.source, reason=r.letter.reason, error=str(r)
            )
        self._set_status("dlq", False, f"{cfg.dlq_topic} refuses dead letters: {refused[-1]}")
        self._retry("redis", lambda: self._note_refused(refused))

    def _note_refused(self, refused: list[DeadLetterRefused]) -> None:
        pipe = self.store.client.pipeline(transaction=False)
        for r in refused:
            fields = {
                "source": r.letter.source,
                "reason": r.letter.reason,
                "detail": r.letter.detail[:MAX_DETAIL_CHARS],
            }
            fields["error"] = str(r)[:MAX_DETAIL_CHARS]
            pipe.xadd(
                self.store.keys.refused_dead_letters,
                fields,
                maxlen=self.settings.kafka.dlq_refused_max_len,
                approximate=True,
            )
        pipe.execute()

    def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Commit these offsets, for the partitions this worker still holds: one that a rebalance moved away
        is another worker's now, which re-scores from its committed offset (idempotently)."""
        assigned = self.consumer.assignment()
        held = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if not held:
            return
        try:
            self._retry("kafka", lambda: self.consumer.commit(held, timeout_ms=KAFKA_CALL_TIMEOUT_MS))
        except REBALANCE_ERRORS as exc:  # partitions moved to another worker: it re-scores, idempotently
            self._log.warning("commit failed after a rebalance", error=str(exc))

    def _observe(
        self, verdicts: list[Verdict], dead: list[DeadLetter], stages: dict[str, float], now_ms: float
    ) -> None:
        m = self.metrics
        m.frames.labels("scored").inc(len(verdicts))
        m.frames.labels("dead_lettered").inc(len(dead))
        for letter in dead:
            m.bad_frames.labels(letter.reason).inc()
        m.batch_size.observe(len(verdicts) + len(dead))
        for stage, seconds in stages.items():
            m.stage_seconds.labels(stage).observe(seconds)
        for v in verdicts:
            m.e2e_latency.observe(max(0.0, now_ms - v.ts) / 1000)
            if v.flag == NON_FINITE:
                m.non_finite_scores.inc()
            else:
                m.scores.observe(v.score)
            if v.anomalous:
                m.anomalous.labels(m.camera(v.camera_id)).inc()

    def _confirm(self) -> None:
        """Operator confirmations, between batches: a non-blocking read, so an idle stream costs two calls."""
        if self._stop.is_set():
            return
        cfg = self.settings.confirmations
        counts = self._retry("redis", lambda: self.confirmations.process(cfg.batch_size))
        if counts.total:
            for outcome, n in asdict(counts).items():
                self.metrics.confirmations.labels(outcome).inc(n)
            self._log.info("confirmations", **asdict(counts))

    def _follow_models(self) -> None:
        """Between batches: swaps the registry announced (or a periodic re-read found), then adaptation."""
        if self._stop.is_set():
            return
        self._retry("redis", self.models.follow)
        self._retry("redis", lambda: self.controller.step(self.drift.alarms()))

    def _revoked(self, cameras: set[str]) -> None:
        """Partitions were revoked (inside poll()): drop the state of the cameras none of ours carries now, once
        the batch written behind has saved their drift states for the worker that takes them over."""
        if self._pending is not None:
            wait([self._pending[1]])
        self._forget(cameras, "cameras moved away with their partitions")

    def _forget(self, cameras: set[str], why: str) -> None:
        """Drop the cameras' state in this worker: drift monitor, served version, metric series. Their drift
        states are in Redis already (saved with each batch, before its commit): a camera that sends again
        resumes there."""
        drift, models = getattr(self, "drift", None), getattr(self, "models", None)
        if models is not None:
            models.forget(cameras)
        for camera in cameras:
            if drift is not None:
                drift.drop(camera)
            for series in (self.metrics.drift_alarm, self.metrics.model):
                with contextlib.suppress(KeyError):  # never labelled, or counted under "_other"
                    series.remove(camera)
        self._log.info(why, cameras=len(cameras))

    def _swapped(self, swap: Swap) -> None:
        """A camera is served another version from its next frame on: a new drift reference too."""
        self.drift.forget(swap.camera)
        self.metrics.model.labels(self.metrics.camera(swap.camera)).info({"version": swap.current.version})
        self._log.info("camera model", camera_id=swap.camera, version=swap.current.version, previous=swap.previous)

    def _check_kafka(self) -> None:
        """Readiness from the client's open connections (each second); consumer lag every lag_interval_s."""
        now = time.monotonic()
        if now >= self._next_status_check:
            self._next_status_check = now + STATUS_INTERVAL_S
            connections = self.consumer.metrics().get("consumer-metrics", {}).get("connection-count", 0)
            self.status["kafka"] = connections > 0
        if now < self._next_lag_check:
            return
        self._next_lag_check = now + self.settings.worker.lag_interval_s
        try:
            assigned = list(self.consumer.assignment())
            ends = self.consumer.end_offsets(assigned, timeout_ms=KAFKA_CALL_TIMEOUT_MS) if assigned else {}
            self.metrics.consumer_lag.clear()  # partitions lost in a rebalance must not keep a stale value
            for tp in assigned:
                lag = max(0, ends[tp] - self.consumer.position(tp))
                self.metrics.consumer_lag.labels(str(tp.partition)).set(lag)
        except KafkaError as exc:
            self._log.debug("lag check failed", error=str(exc))

    # retries -----------------------------------------------------------------------------------
    def _retry(self, target: str, fn: Callable[[], T]) -> T:
        """Call fn until it works, backing off; not-ready meanwhile. Gives up only when draining.
        A permanent Redis error is not an outage: it is counted, /readyz names it, and the loop holds at
        the longest backoff until an operator fixes it (nothing is committed meanwhile)."""
        cfg = self.settings.worker
        backoff, attempt = cfg.retry_backoff_s, 0
        while True:
            try:
                result = fn()
                self._set_status(target, True)
                return result
            except REBALANCE_ERRORS:
                raise
            except OUTAGE_ERRORS as exc:
                self._beat = time.monotonic()
                attempt += 1
                self._set_status(target, False, _describe(exc))
                if isinstance(exc, redis.RedisError) and not isinstance(exc, TRANSIENT_REDIS_ERRORS):
                    self.metrics.permanent_errors.labels(target, type(exc).__name__).inc()
                    backoff = cfg.retry_backoff_max_s
                else:
                    self.metrics.retries.labels(target).inc()
                if target == "kafka":
                    self._probe_redis()  # its readiness is its own, also while Kafka is awaited
                if self._stop.is_set():
                    if not self._busy:
                        raise Stopped(f"{target} unreachable: {exc}") from exc
                    self._stop_deadline = self._stop_deadline or time.monotonic() + cfg.drain_timeout_s
                    if time.monotonic() > self._stop_deadline:
                        raise DrainTimeout(f"{target} unreachable: {exc}") from exc
                self._log.warning("retrying", target=target, attempt=attempt, backoff_s=backoff, error=str(exc))
                if self._stop.is_set():
                    time.sleep(backoff)  # draining a batch: keep the backoff
                elif self._stop.wait(backoff) and not self._busy:
                    raise Stopped(f"{target} unreachable: {exc}") from exc
                backoff = min(backoff * 2, cfg.retry_backoff_max_s)

    def _probe_redis(self) -> None:
        if self._client is None:
            return
        try:
            self._client.ping()
            self._set_status("redis", True)
        except redis.RedisError as exc:
            self._set_status("redis", False, _describe(exc))


@dataclass(frozen=True)
class ShadowPass:
    """One model's scores and NLLs of a shadow camera's frames and its scores of their probes; when the pass
    failed, `error`, NaN scores and NLLs (a candidate fails its shadow on them) and no probe scores (none is
    a figure: NaN would read as a blind parent)."""

    scores: list[float]
    nll: list[float]
    probes: list[list[float]]
    error: str | None = None


def shadow_pass(
    model: CSFlow, images: torch.Tensor, probes: torch.Tensor, options: ServingOptions, frames: bool = True
) -> ShadowPass:
    """The frames and their probes in one pass; `frames` False: the probes only (the frames' scores and NLLs
    are then NaN, as not measured)."""
    n, per_frame = len(images), len(probes) // len(images)
    nan = [float("nan")] * n
    try:
        out = score_images(model, torch.cat([images, probes]) if frames else probes, nll=frames, options=options)
    except Exception as exc:
        return ShadowPass(nan, nan, [[] for _ in range(n)], _describe(exc))
    if not frames:
        return ShadowPass(nan, nan, out.image.reshape(n, per_frame).tolist())
    return ShadowPass(
        out.image[:n].tolist(), np.asarray(out.nll)[:n].tolist(), out.image[n:].reshape(n, per_frame).tolist()
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_DETAIL_CHARS]


def _groups(keys: Iterable[Hashable]) -> dict[Hashable, list[int]]:
    """Positions of each key, in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups

"""Dead letters: bad records sent to `<topic>.dlq`, built so that sending them cannot fail on their content.

A dead letter keeps the record's key, value and headers where they fit the [kafka] dlq_* caps, and adds
`reason` (a code from daemon.frames.REASONS), `detail` (free text, capped), `source`
(`topic:partition:offset`) and, when something was cut, `cut` (what and how much). Null header values are
dropped (the producer refuses them), as are headers past the count cap and oversize ones.

Send failures are sorted: a broker outage (connection, timeout) is transient and the worker retries it; a
refusal that retrying cannot change (record too large for the topic, unknown or invalid topic, missing
authorization, a record the client refuses) is permanent: `send` returns it as `DeadLetterRefused`, and the
worker marks itself not ready with the reason, counts it, keeps a note of the record in Redis and goes on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kafka import KafkaProducer
from kafka.errors import (
    AuthorizationError,
    CorruptRecordError,
    InvalidRecordError,
    InvalidRequiredAcksError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    SaslAuthenticationFailedError,
    UnknownTopicOrPartitionError,
    UnsupportedVersionError,
)

from daemon.config import KafkaSection

ADDED_HEADERS = ("reason", "detail", "source", "cut")  # set by the worker; a record's own are dropped
PERMANENT_SEND_ERRORS: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
    UnknownTopicOrPartitionError,
    AuthorizationError,
    SaslAuthenticationFailedError,
    PolicyViolationError,
    InvalidRecordError,
    CorruptRecordError,
    InvalidRequiredAcksError,
    UnsupportedVersionError,
    ValueError,  # kafka-python refuses an illegal topic name or record before sending
    TypeError,
)


@dataclass(frozen=True)
class DeadLetter:
    """A record for the DLQ: `value` None for a stub (the record could not be read at all)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]]
    reason: str
    detail: str = ""

    @property
    def source(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    @classmethod
    def of(cls, record: object, reason: str, detail: str = "") -> DeadLetter:
        """From a kafka-python ConsumerRecord."""
        return cls(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value,
            list(record.headers or []),
            reason,
            detail,
        )

    @classmethod
    def stub(cls, topic: str, partition: int, offset: int, reason: str, detail: str) -> DeadLetter:
        return cls(topic, partition, offset, None, None, [], reason, detail)


class DeadLetterRefused(RuntimeError):
    """The DLQ refused a dead letter for a reason retrying cannot change."""

    def __init__(self, letter: DeadLetter, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.letter = letter
        self.error = error


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, PERMANENT_SEND_ERRORS)


def sanitise(letter: DeadLetter, cfg: KafkaSection) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """Key, value and headers that the producer and the DLQ topic accept, whatever the record held."""
    cut: list[str] = []
    cap = cfg.dlq_max_header_bytes
    key = letter.key
    if key is not None and len(key) > cap:
        cut.append(f"key {len(key)} B")
        key = None
    value = letter.value or b""
    if len(value) > cfg.dlq_max_value_bytes:
        cut.append(f"value {len(value)} B")
        value = b""
    room = cfg.dlq_max_headers - len(ADDED_HEADERS)
    headers: list[tuple[str, bytes]] = []
    dropped = {"null": 0, "oversize": 0, "over count": 0}
    for name, header_value in letter.headers:
        if name in ADDED_HEADERS:
            continue
        if header_value is None:
            dropped["null"] += 1
        elif len(name.encode(errors="replace")) + len(header_value) > cap:
            dropped["oversize"] += 1
        elif len(headers) >= room:
            dropped["over count"] += 1
        else:
            headers.append((name, bytes(header_value)))
    if any(dropped.values()):
        cut.append("headers " + ", ".join(f"{n} {why}" for why, n in dropped.items() if n))
    note = [
        ("reason", letter.reason.encode()),
        ("detail", _capped(letter.detail, cap)),
        ("source", _capped(letter.source, cap)),
    ]
    if cut:
        note.append(("cut", _capped("; ".join(cut), cap)))
    return key, value, headers + note


def _capped(text: str, cap: int) -> bytes:
    data = text.encode(errors="replace")
    return data if len(data) <= cap else data[: cap - 3] + b"..."


def send(
    producer: KafkaProducer, cfg: KafkaSection, letters: Iterable[DeadLetter], timeout_s: float
) -> list[DeadLetterRefused]:
    """Send and wait for the broker's acknowledgements; returns the letters refused for good (the others
    were sent). Raises KafkaError for an outage: the caller retries them all (the DLQ is at-least-once)."""
    pending = []
    refused: list[DeadLetterRefused] = []
    for letter in letters:
        key, value, headers = sanitise(letter, cfg)
        try:
            pending.append((letter, producer.send(cfg.dlq_topic, key=key, value=value, headers=headers)))
        except Exception as exc:
            if not is_permanent(exc):
                raise
            refused.append(DeadLetterRefused(letter, exc))
    producer.flush(timeout=timeout_s)
    for letter, future in pending:
        try:
            future.get(timeout=timeout_s)
        except KafkaError as exc:
            if not is_permanent(exc):
                raise
            refused.append(DeadLetterRefused(letter, exc))
    return refused

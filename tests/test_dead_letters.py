"""Dead letters are sanitised so that the producer and the DLQ topic accept them, whatever the record held."""

from __future__ import annotations

from kafka import KafkaProducer
from kafka.errors import KafkaConnectionError, MessageSizeTooLargeError, TopicAuthorizationFailedError

from daemon.config import KafkaSection
from daemon.dead_letters import DeadLetter, is_permanent, sanitise

CFG = KafkaSection(dlq_max_value_bytes=1000, dlq_max_headers=8, dlq_max_header_bytes=100)


def letter(**changes: object) -> DeadLetter:
    base = dict(topic="frames", partition=1, offset=7, key=b"cam-1", value=b"v", headers=[("a", b"1")])
    return DeadLetter(**{**base, **changes}, reason="bad_header", detail="why")  # type: ignore[arg-type]


def test_a_clean_record_keeps_everything_and_gets_reason_detail_source() -> None:
    key, value, headers = sanitise(letter(), CFG)
    assert (key, value) == (b"cam-1", b"v")
    assert headers == [("a", b"1"), ("reason", b"bad_header"), ("detail", b"why"), ("source", b"frames:1:7")]


def test_null_oversize_and_surplus_headers_are_dropped_with_a_note() -> None:
    raw = [("null", None), ("big", b"x" * 500), *[(f"h{i}", b"v") for i in range(20)], ("reason", b"forged")]
    key, value, headers = sanitise(letter(key=b"k" * 200, value=b"x" * 2000, headers=raw), CFG)
    names = [name for name, _ in headers]
    assert key is None and value == b""
    assert len(headers) <= CFG.dlq_max_headers and all(v is not None for _, v in headers)
    assert names.count("reason") == 1 and dict(headers)["reason"] == b"bad_header"
    cut = dict(headers)["cut"].decode()
    assert cut == "key 200 B; value 2000 B; headers 1 null, 1 oversize, 16 over count"
    assert all(len(n) + len(v) <= CFG.dlq_max_header_bytes for n, v in headers)


def test_a_sanitised_letter_is_accepted_by_the_producer_client() -> None:
    """KafkaProducer validates headers and sizes in send() before it needs a broker connection."""
    producer = KafkaProducer(bootstrap_servers="127.0.0.1:1", max_block_ms=1, api_version=(3, 0))
    try:
        key, value, headers = sanitise(letter(headers=[("null", None), ("x", b"y" * 10_000)]), CFG)
        assert producer._estimate_size_in_bytes(key, value, headers) < 2 * CFG.dlq_max_value_bytes
        assert all(isinstance(n, str) and isinstance(v, bytes) for n, v in headers)
    finally:
        producer.close(timeout=0)


def test_permanent_and_transient_send_errors() -> None:
    assert is_permanent(MessageSizeTooLargeError()) and is_permanent(TopicAuthorizationFailedError())
    assert is_permanent(ValueError("Topic name is illegal"))
    assert not is_permanent(KafkaConnectionError())

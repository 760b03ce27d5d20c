"""kafka-python clients built from the `[kafka]` settings (security included)."""

from __future__ import annotations

from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer

from daemon.config import KafkaSection

FETCH_HEADROOM = 64 * 1024  # record and batch overhead above the largest frame


def security_config(cfg: KafkaSection) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers.split(","),
        "security_protocol": cfg.security_protocol,
    }
    if cfg.security_protocol.startswith("SASL"):
        conf |= {
            "sasl_mechanism": cfg.sasl_mechanism,
            "sasl_plain_username": cfg.sasl_username,
            "sasl_plain_password": cfg.password(),
        }
    if cfg.security_protocol.endswith("SSL"):
        conf |= {
            k: v
            for k, v in (
                ("ssl_cafile", cfg.ssl_cafile),
                ("ssl_certfile", cfg.ssl_certfile),
                ("ssl_keyfile", cfg.ssl_keyfile),
            )
            if v
        }
    return conf


def make_consumer(
    cfg: KafkaSection, max_poll_records: int, listener: ConsumerRebalanceListener | None = None
) -> KafkaConsumer:
    """Subscribed to [kafka] topic; `listener` hears of partitions assigned and revoked."""
    consumer = KafkaConsumer(
        **security_config(cfg),
        group_id=cfg.group_id,
        client_id="inspectd",
        enable_auto_commit=False,  # offsets are committed only after verdicts are in Redis
        auto_offset_reset="earliest",
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        max_poll_interval_ms=cfg.max_poll_interval_ms,
        max_poll_records=max_poll_records,
        bootstrap_timeout_ms=cfg.bootstrap_timeout_ms,
        max_partition_fetch_bytes=cfg.max_message_bytes + FETCH_HEADROOM,
        fetch_max_bytes=max(52_428_800, cfg.max_message_bytes + FETCH_HEADROOM),
    )
    consumer.subscribe([cfg.topic], listener=listener)
    return consumer


def make_producer(cfg: KafkaSection) -> KafkaProducer:
    return KafkaProducer(
        **security_config(cfg),
        client_id="inspectd",
        bootstrap_timeout_ms=cfg.bootstrap_timeout_ms,
        acks="all",
        # Dead letters are at-least-once anyway; an idempotent producer can get stuck for good on
        # UnknownProducerId after a broker loses its state, which would stall the worker.
        enable_idempotence=False,
        max_request_size=cfg.max_message_bytes + FETCH_HEADROOM,
        retries=5,
    )

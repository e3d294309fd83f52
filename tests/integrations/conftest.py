"""Fixtures the integration suites share: a PostgreSQL database per module, a URL per backend,
a Database, and the multi-node Redis rigs (a cluster, a Sentinel group)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from polydatum.sqlalchemy import Database
from tests.support.redis_rigs import RedisClusterRig, RedisSentinelRig
from tests.support.sql import Base, fresh_postgres_database


@pytest.fixture(name="pg_url", scope="module")
def fixture_pg_url(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL database of this module's own, dropped afterwards."""
    with fresh_postgres_database(postgres_url) as url:
        yield url


@pytest.fixture(name="backend", params=["sqlite", "postgresql"])
def fixture_backend(request: pytest.FixtureRequest) -> str:
    """The SQL backend a test runs on: a SQLite file, then PostgreSQL."""
    return str(request.param)


@pytest.fixture(name="url")
def fixture_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL of the backend: a SQLite file, or this module's PostgreSQL database."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    return str(request.getfixturevalue("pg_url"))


def _with_tables(url: str) -> Iterator[Database]:
    """A Database on ``url`` with the test tables (tests/support/sql.py), dropped and disposed afterwards."""
    db = Database(url)
    Base.metadata.create_all(db.engine)
    yield db
    Base.metadata.drop_all(db.engine)
    db.dispose()


@pytest.fixture(name="db")
def fixture_db(url: str) -> Iterator[Database]:
    """A Database on each backend with the test tables, dropped afterwards."""
    yield from _with_tables(url)


@pytest.fixture(name="pg_db")
def fixture_pg_db(pg_url: str) -> Iterator[Database]:
    """A sync Database on this module's PostgreSQL database, with the test tables, dropped afterwards."""
    yield from _with_tables(pg_url)


@pytest.fixture(name="redis_cluster", scope="session")
def fixture_redis_cluster() -> Iterator[RedisClusterRig]:
    """A private Redis Cluster (3 primaries, 3 replicas) shared by the session, stopped afterwards.

    Shared, so no test may stop or kill its nodes: a fault test takes
    ``private_redis_cluster`` instead.
    """
    rig = RedisClusterRig()
    try:
        rig.start()
        yield rig
    finally:
        rig.close()


@pytest.fixture(name="redis_sentinel", scope="session")
def fixture_redis_sentinel() -> Iterator[RedisSentinelRig]:
    """A private Sentinel group (primary, replica, 3 sentinels) shared by the session, stopped afterwards.

    Shared, so no test may stop or kill its nodes: a fault test takes
    ``private_redis_sentinel`` instead.
    """
    rig = RedisSentinelRig()
    try:
        rig.start()
        yield rig
    finally:
        rig.close()


@pytest.fixture(name="private_redis_cluster")
def fixture_private_redis_cluster() -> Iterator[RedisClusterRig]:
    """A Redis Cluster of this test's own, which it may break."""
    rig = RedisClusterRig()
    try:
        yield rig.start()
    finally:
        rig.close()


@pytest.fixture(name="private_redis_sentinel")
def fixture_private_redis_sentinel() -> Iterator[RedisSentinelRig]:
    """A Sentinel group of this test's own, which it may break."""
    rig = RedisSentinelRig()
    try:
        yield rig.start()
    finally:
        rig.close()


REDIS_KINDS = ("redis", "cluster", "sentinel")


def redis_target(request: pytest.FixtureRequest, kind: str) -> tuple[str, dict[str, Any]]:
    """The URL and keyword arguments of ``Redis()`` for a node kind: one server, a cluster, Sentinel."""
    if kind == "cluster":
        return request.getfixturevalue("redis_cluster").url, {}
    if kind == "sentinel":
        rig = request.getfixturevalue("redis_sentinel")
        return rig.url, {"service_name": rig.service}
    return request.getfixturevalue("redis_url"), {}

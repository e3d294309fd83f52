"""The notes example on real servers, served in this process, for the load, fault and bad-input tests.

:class:`Stack` wires one run: a database (a fresh one on the shared
PostgreSQL, or a private cluster for tests that restart it), a private
redis-server (so ``CLIENT LIST`` counts only this app), S3 on moto's server
reached through a :class:`~tests.load.proxy.FaultProxy` (so S3 can "go
away" without losing its objects), Celery in eager mode, and Werkzeug's
threaded server on 127.0.0.1.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from tests.examples.conftest import serving
from tests.load.audit import AuditReport, ProcessSnapshot, audit, server_ports
from tests.load.driver import Load, Record
from tests.load.proxy import FaultProxy
from tests.support.s3 import REGION, MotoServer
from tests.support.s3 import moto_server_fixture as moto_server_fixture
from tests.support.servers import PrivatePostgres, PrivateRedis
from tests.support.sql import fresh_postgres_database


class Stack:
    """One running notes app and the servers behind it; ``load()`` and ``audit()`` it."""

    def __init__(
        self,
        stack: ExitStack,
        *,
        server_url: str,
        redis: PrivateRedis,
        moto: MotoServer,
        database_query: str = "",
    ) -> None:
        from notes import Settings, build

        self.redis = redis
        self.moto = moto
        self.database_url = stack.enter_context(fresh_postgres_database(server_url))
        self.proxy = FaultProxy(moto.port).start()
        stack.callback(self.proxy.close)
        self.bucket = moto.create_bucket(f"load-{uuid.uuid4().hex[:12]}")
        env = stack.enter_context(pytest.MonkeyPatch.context())
        for name, value in (
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", REGION),
        ):
            env.setenv(name, value)
        self.app = build(
            Settings.from_env(
                {
                    "DATABASE_URL": self.database_url + database_query,
                    "REDIS_URL": redis.url,
                    "BLOB_URL": f"s3://{self.bucket}/notes-app",
                    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.proxy.port}",
                }
            )
        )
        stack.callback(self.app.close)
        self.app.check()
        self.app.create_tables()
        self.wsgi: Any = self.app.wsgi()
        self.url = stack.enter_context(serving(lambda environ, start: self.wsgi(environ, start)))
        self.ports = [*server_ports(self.database_url, redis.url), self.proxy.port, moto.port]
        self.baseline: list[ProcessSnapshot] = []

    def load(self, clients: int = 6, **options: Any) -> Load:
        """Sign the load's users up, then record this process's baseline (fds, threads)."""
        load = Load(self.url, clients, **options).setup()
        self.baseline = [_quiet_snapshot(self.ports)]
        return load

    def audit(self, records: list[Record], settle: float = 10.0) -> AuditReport:
        """The audit of :mod:`tests.load.audit` for this app, with this process as the server."""
        return audit(
            self.database_url,
            self.app.blobs,
            records,
            redis_url=self.redis.url,
            pids=[os.getpid()],
            baseline=self.baseline,
            server_ports=self.ports,
            settle=settle,
            outbox=self.app.outbox,
        )


def _quiet_snapshot(ports: list[int]) -> ProcessSnapshot:
    # Werkzeug's per-connection threads of the sign-ups end shortly after their sockets close.
    deadline = time.monotonic() + 5
    while threading.active_count() > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return ProcessSnapshot.take(os.getpid(), ports)


@pytest.fixture(scope="session")
def load_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of the load tests' own: they restart it, and its connection count is theirs.

    (The shared server's ``max_connections`` is used up by the rest of the suite
    running in parallel; these tests must not fail for that.)
    """
    server = PrivatePostgres().start()
    yield server
    server.close()


@pytest.fixture
def stack(
    load_postgres: PrivatePostgres, private_redis: PrivateRedis, moto_server: MotoServer
) -> Iterator[Stack]:
    """The app on a fresh database of the private PostgreSQL, a private Redis and S3 behind a fault proxy."""
    with ExitStack() as stack:
        yield Stack(stack, server_url=load_postgres.url, redis=private_redis, moto=moto_server)

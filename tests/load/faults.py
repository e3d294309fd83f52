"""The faults, each a callable run in the middle of a load: shared by tests/load and benchmarks/load.py.

Every fault waits ``before`` seconds (the load warms up), breaks one part,
repairs it (``repaired`` is when the part was back), and returns; the load
goes on meanwhile. Only private servers are stopped: the private
PostgreSQL cluster and redis-server of the run, the S3 proxy, and the
app's own sessions on the database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool


class Fault:
    """A named fault: ``inject()`` breaks and repairs; ``repaired`` is when the part was back."""

    def __init__(self, name: str, action: Callable[[], object], before: float = 0.8) -> None:
        self.name = name
        self.action = action
        self.before = before
        self.repaired = 0.0

    def inject(self) -> None:
        time.sleep(self.before)
        self.repaired = time.monotonic()  # an instant fault is repaired when it happened
        self.action()
        self.repaired = max(self.repaired, time.monotonic())


def postgres_restart(server: Any, pause: float = 0.0) -> Fault:
    """``pg_ctl restart -m fast``: every session is cut, the server is away for a moment."""

    def act() -> None:
        if pause:
            server.stop()
            time.sleep(pause)
            server._ctl("start")
        else:
            server.restart()

    return Fault("postgres-restart", act)


def redis_restart(server: Any, down: float = 2.0) -> Fault:
    """Stop redis-server, wait ``down`` seconds, start it again (empty: no persistence)."""

    def act() -> None:
        server.stop()
        time.sleep(down)
        server.start()

    return Fault("redis-restart", act)


def s3_down(proxy: Any, down: float = 3.0) -> Fault:
    """S3 refuses connections (and resets the open ones) for ``down`` seconds."""

    def act() -> None:
        proxy.down()
        time.sleep(down)
        proxy.up()

    return Fault("s3-down", act)


def pg_terminate(database_url: str, rounds: int = 2, interval: float = 0.5) -> Fault:
    """``pg_terminate_backend`` on every session of the app's database, ``rounds`` times."""

    def act() -> None:
        url = make_url(database_url)
        engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            for i in range(rounds):
                with engine.connect() as conn:
                    conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                      "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": url.database})
                if i < rounds - 1:
                    time.sleep(interval)
        finally:
            engine.dispose()

    return Fault("pg-terminate", act)


def slow_query(route: Any, calls: int = 3) -> Fault:
    """``calls`` concurrent requests whose SQL outlasts the statement timeout (see test_faults)."""

    def act() -> None:
        threads = [threading.Thread(target=route.call) for _ in range(calls)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return Fault("slow-query", act)


FAULTS: dict[str, Callable[..., Fault]] = {
    "postgres-restart": postgres_restart,
    "redis-restart": redis_restart,
    "s3-down": s3_down,
    "pg-terminate": pg_terminate,
    "slow-query": slow_query,
}

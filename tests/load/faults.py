"""The faults, each a callable run in the middle of a load: shared by tests/load and benchmarks/load.py.

Every fault waits ``before`` seconds (the load warms up), breaks one part,
repairs it (``repaired`` is when the part was back), and returns; the load
goes on meanwhile. Only private servers are stopped: the private
PostgreSQL cluster and redis-server of the run, the S3 proxy, and the
app's own sessions on the database.
"""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.load.driver import Client, Record


class Fault:
    """A named fault: ``inject()`` breaks and repairs; ``repaired`` is when the part was back."""

    def __init__(self, name: str, action: Callable[[], object], before: float = 0.8) -> None:
        self.name = name
        self.action = action
        self.before = before
        self.repaired = 0.0
        #: What the fault did, for checks that it was felt (e.g. sessions terminated per round).
        self.effect: list[Any] = []

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
                    killed = conn.execute(
                        text(
                            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = :d AND pid <> pg_backend_pid()"
                        ),
                        {"d": url.database},
                    ).scalar_one()
                fault.effect.append(killed)
                if i < rounds - 1:
                    time.sleep(interval)
        finally:
            engine.dispose()

    fault = Fault("pg-terminate", act)
    return fault


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


# -- the slow path: a test-only service and route, registered on a built app -------------------


class SlowRoute:
    """The client side of ``POST /__test/slow?marker=...&seconds=...`` (see :func:`with_slow_route`)."""

    def __init__(self, url: str, seconds: float = 3.0) -> None:
        self.url = url
        self.seconds = seconds
        self.records: list[Record] = []

    def call(self) -> Record:
        client = Client(self.url)
        marker = f"slow-{uuid.uuid4().hex[:16]}"
        record = Record("slow", time.monotonic(), 0.0, None, marker=marker)
        try:
            path = f"/__test/slow?marker={marker}&seconds={self.seconds}"
            record.status, _, _ = client.request("POST", path)
        except (OSError, http.client.HTTPException) as exc:
            record.error = type(exc).__name__
        finally:
            client.close()
        record.elapsed = time.monotonic() - record.start
        self.records.append(record)
        return record

    def committed(self, database_url: str) -> int:
        """How many of the slow requests' user rows exist (each request inserts one, then sleeps)."""
        engine = create_engine(database_url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return int(
                    conn.execute(
                        text("SELECT count(*) FROM users WHERE name = ANY(:m)"),
                        {"m": [r.marker for r in self.records]},
                    ).scalar_one()
                )
        finally:
            engine.dispose()


def with_slow_route(app: Any, wsgi: Any) -> Any:
    """``wsgi`` plus ``POST /__test/slow``: a service that inserts a user, then ``pg_sleep``s.

    Registered on the built app from outside (the example's code is untouched);
    its own :class:`~polydatum.werkzeug.PolydatumWSGIMiddleware` opens the context.
    """
    from notes.auth import public
    from werkzeug.wrappers import Request, Response

    from polydatum import Service
    from polydatum.werkzeug import PolydatumWSGIMiddleware, request_context

    class Slow(Service):
        @public
        def sleep(self, marker: str, seconds: float) -> None:
            db = self._ctx.db
            db.execute(text("INSERT INTO users (name) VALUES (:n)"), {"n": marker})
            db.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})

    app.dm.register_services(slow=Slow())

    @Request.application  # type: ignore[untyped-decorator]
    def view(request: Request) -> Response:
        request_context().dal.slow.sleep(request.args["marker"], float(request.args.get("seconds", 3)))
        return Response("slept", 200)

    slow_app = PolydatumWSGIMiddleware(view, app.dm)

    def dispatch(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") == "/__test/slow":
            return slow_app(environ, start_response)
        return wsgi(environ, start_response)

    return dispatch

"""Fault scenarios, short form: real servers, a few seconds of load each, a fault midway, then the audit.

Six clients (three users, two clients each, so their edits conflict) drive
the notes example (:mod:`tests.load.driver`) served by Werkzeug's threaded
server in this process, on PostgreSQL, a private Redis, S3 on moto's server
(behind a proxy that can drop it) and Celery in eager mode. During the
load one part fails; afterwards:

- the audit passes (:mod:`tests.load.audit`): no acknowledged write lost or
  duplicated, nothing refused kept, no blob missing, every orphan swept,
  connections back in their pools, no fd or thread left behind;
- the app has recovered: a create, read, update, attach, fetch and delete
  for every user all succeed right away.

``benchmarks/load.py --faults`` runs the same scenarios longer, under more load.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.load.conftest import Stack
from tests.load.driver import Load, time_to_recover
from tests.load.faults import FAULTS, Fault, SlowRoute, with_slow_route
from tests.support.servers import PrivatePostgres

pytestmark = pytest.mark.slow

LOAD = 4.0  # seconds of load per scenario


def run_scenario(stack: Stack, fault: Fault, *, clients: int = 6) -> tuple[Load, Any]:
    load = stack.load(clients)
    load.run(LOAD, during=fault.inject)
    recovered = load.check_recovered()
    failed = [f"{r.op} {r.error}" for r in recovered if r.outcome != "acked"]
    assert not failed, f"after {fault.name} the app did not recover: {failed}"
    report = stack.audit(load.records).check()
    writes = [r for r in load.records if r.op in ("create", "update", "attach", "delete")]
    assert report.acked_writes > 0
    assert any(r.outcome == "acked" for r in writes if r.start >= fault.repaired)
    assert time_to_recover(load.records, fault.repaired) is not None
    stats = load.stats()
    recovery = time_to_recover(load.records, fault.repaired)
    # Shown with pytest -s: what the fault did to the clients.
    print(
        f"\n{fault.name}: {stats['requests']} requests, {report.acked_writes} acked writes, "
        f"{report.in_doubt} in doubt ({report.in_doubt_committed} committed), {report.orphans} orphans "
        f"swept, errors {stats['errors']}, "
        f"recovered in {recovery:.2f}s {report.committed_despite_error}"
    )
    return load, report


def test_no_fault(stack: Stack) -> None:
    """The baseline: the mix alone loses nothing and leaks nothing; conflicts happen for real."""
    load, report = run_scenario(stack, Fault("none", lambda: None))
    assert report.lost_writes == 0
    assert report.orphans == 0
    assert any(r.status == 409 for r in load.records)  # the mix does exercise conflicts
    # Without a fault, no request fails: races between a note's attaches, edits and deletes are
    # 404s and 409s (see test_an_attach_racing_a_delete_is_not_a_500).
    failed = [(r.op, r.error) for r in load.records if r.outcome in ("failed", "unknown")]
    assert not failed


def test_postgres_restart(stack: Stack, load_postgres: PrivatePostgres) -> None:
    started = postmaster_started(stack.database_url)
    _, report = run_scenario(stack, FAULTS["postgres-restart"](load_postgres))
    assert report.lost_writes == 0
    assert postmaster_started(stack.database_url) > started  # it did restart


def test_redis_stop_and_restart(stack: Stack) -> None:
    assert stack.redis.proc is not None
    pid = stack.redis.proc.pid
    _, report = run_scenario(stack, FAULTS["redis-restart"](stack.redis))
    assert report.lost_writes == 0
    assert stack.redis.proc is not None
    assert stack.redis.proc.pid != pid  # another redis-server, empty (no persistence)


def postmaster_started(database_url: str) -> Any:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT pg_postmaster_start_time()")).scalar_one()
    finally:
        engine.dispose()


def test_s3_goes_away(stack: Stack) -> None:
    load, report = run_scenario(stack, FAULTS["s3-down"](stack.proxy))
    assert report.lost_writes == 0
    # The fault was felt: attachments sent while S3 was away were not acknowledged.
    assert any(r.op == "attach" and r.outcome != "acked" for r in load.records)


def test_database_connections_killed(stack: Stack) -> None:
    fault = FAULTS["pg-terminate"](stack.database_url)
    _, report = run_scenario(stack, fault)
    assert report.lost_writes == 0
    assert sum(fault.effect) > 0  # the app's sessions were there, and were terminated


def test_statement_timeout(load_postgres: PrivatePostgres, private_redis: Any, moto_server: Any) -> None:
    """A query past the engine's statement_timeout fails alone: its write is gone, its connection is back."""
    from contextlib import ExitStack

    with ExitStack() as es:
        # The timeout as a user would set it: libpq options in DATABASE_URL.
        stack = Stack(
            es,
            server_url=load_postgres.url,
            redis=private_redis,
            moto=moto_server,
            database_query="?options=-c%20statement_timeout%3D1000",
        )
        stack.wsgi = with_slow_route(stack.app, stack.wsgi)
        slow = SlowRoute(stack.url)
        fault = FAULTS["slow-query"](slow)
        _, report = run_scenario(stack, fault)
        assert report.lost_writes == 0
        assert slow.records
        assert all(r.status is not None and r.status >= 500 for r in slow.records)
        assert slow.committed(stack.database_url) == 0


def test_the_audit_sees_leaks(stack: Stack, tmp_path: Any) -> None:
    """A connection kept out of the pool in a transaction, and a file left open, fail the audit."""
    from contextlib import ExitStack

    from sqlalchemy import text

    stack.load(2)  # the baseline
    with ExitStack() as es:
        conn = es.enter_context(stack.app.db.engine.connect())
        conn.execute(text("SELECT 1"))  # begins a transaction: "idle in transaction"
        for i in range(6):  # more than the audit's slack of 4
            es.enter_context(open(tmp_path / str(i), "w"))
        report = stack.audit([], settle=0.5)
        assert report.pg_busy == 1
        assert report.leaked_fds >= 1
        assert any("not back in a pool" in p for p in report.problems)
    assert stack.audit([]).problems == []


def test_an_attach_racing_a_delete_is_not_a_500(stack: Stack) -> None:
    """The attach passed its ownership check, then the note was deleted before its row went in."""
    import socket

    from tests.load.driver import Client, sign_up

    account = sign_up(stack.url)
    client = Client(stack.url)
    client.headers["Authorization"] = f"Bearer {account.token}"
    status, note = client.json("POST", f"/notebooks/{account.notebook_id}/notes", {"title": "racy"})
    assert status == 201
    body = b"x" * 1000
    with socket.create_connection(("127.0.0.1", int(stack.url.rsplit(":", 1)[1]))) as sock:
        # Headers and half the body: the view runs (ownership checked) and blocks reading the rest.
        sock.sendall(
            (
                f"POST /notes/{note['id']}/attachments?name=racy.bin HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {account.token}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            + body[:500]
        )
        wait_until_in_transaction(stack.database_url)  # the view checked ownership, now reads the body
        status, _ = client.json("DELETE", f"/notes/{note['id']}")
        assert status == 204
        sock.sendall(body[500:])
        answer = sock.makefile("rb").readline()
    client.close()
    assert int(answer.split()[1]) < 500, answer


def wait_until_in_transaction(database_url: str, timeout: float = 30.0) -> None:
    """Block until a session of the database is idle in a transaction (a request waiting mid-way)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    engine = create_engine(database_url, poolclass=NullPool)
    deadline = time.monotonic() + timeout
    try:
        with engine.connect() as conn:
            while time.monotonic() < deadline:
                waiting = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = :d AND state = 'idle in transaction'"
                    ),
                    {"d": make_url(database_url).database},
                ).scalar_one()
                conn.rollback()
                if waiting:
                    return
                time.sleep(0.02)
    finally:
        engine.dispose()
    raise AssertionError(f"no request was waiting in a transaction after {timeout} s")

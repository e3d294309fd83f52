"""The outbox's promises at full size, with real servers stopped, restarted and killed.

- the Celery broker (a private redis-server) down for 30 s while 20 writers commit;
- S3 (moto's server, over HTTP) down while contexts delete blobs and fail after puts;
- relays as processes (``python -m polydatum.outbox``): one SIGKILLed mid-batch, 2 and 4 at once.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from polydatum import DataManager
from polydatum.celery import install
from polydatum.outbox import Outbox, Status
from polydatum.s3 import S3BlobStore
from polydatum.sqlalchemy import Database
from tests.support.celery_worker import in_thread_worker, suite_app
from tests.support.outbox import flush_outboxes  # noqa: F401  # autouse
from tests.support.s3 import MotoServer
from tests.support.servers import PrivateRedis
from tests.support.sql import fresh_postgres_database

DEADLINE = 60.0  # seconds; a ceiling for waiting, never a pass/fail timing
OUTAGE = 30.0  # seconds the broker is down (the figure)
WRITERS = 20

REPORT: dict[str, object] = {}  # figures for the report (printed with -s), never asserted as timings


@pytest.fixture(name="pg_url", scope="module")
def fixture_pg_url(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL database of this module's own, dropped afterwards."""
    with fresh_postgres_database(postgres_url) as url:
        yield url


def count(url: str, sql: str) -> int:
    """The single integer ``sql`` returns on ``url``."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())
    finally:
        engine.dispose()


# -- the broker down for 30 s ---------------------------------------------------------------------


@pytest.fixture(name="broker_app")
def fixture_broker_app(pg_url: str, redis_url: str) -> Iterator[SimpleNamespace]:
    """A private, persistent redis-server as the broker; PostgreSQL; an outbox with its inbox; a worker."""
    run = uuid.uuid4().hex[:10]
    broker = PrivateRedis(persistent=True).start()
    setup = create_engine(pg_url, poolclass=NullPool)
    with setup.begin() as conn:
        conn.execute(text(f"CREATE TABLE sent_{run} (body text PRIMARY KEY)"))
        conn.execute(text(f"CREATE TABLE ran_{run} (body text NOT NULL)"))
    dm = DataManager()
    db = Database(pg_url, pool_size=WRITERS + 5).install(dm)
    # Retried at most every 2 s, so that the sends land soon after the broker is back; with
    # that pace, 10 attempts (the default) would dead-letter them within the 30 s outage.
    outbox = Outbox(
        db, table=f"outbox_{run}", inbox_table=f"inbox_{run}", backoff=0.5, max_backoff=2.0, max_attempts=1000
    )
    outbox.install(dm)
    outbox.create_table()
    app = suite_app("polydatum_outbox_faults", broker.url, redis_url, f"pd-faults-{run}", f"pd-faults-{run}:")
    app.conf.task_ignore_result = True  # nothing waits on results: the runs are counted in SQL
    install(app, dm, outbox=outbox, inbox=True)
    runs: dict[str, int] = {}
    lock = threading.Lock()

    @app.task(shared=False, name="pdfaults.record")
    def record(body: str) -> None:
        with lock:
            runs[body] = runs.get(body, 0) + 1
        dm.require_active_context().db.execute(text(f"INSERT INTO ran_{run} (body) VALUES (:b)"), {"b": body})

    try:
        yield SimpleNamespace(
            broker=broker, dm=dm, db=db, outbox=outbox, app=app, record=record, runs=runs, run=run, url=pg_url
        )
    finally:
        app.close()
        outbox.flush()
        db.dispose()
        with setup.begin() as conn:
            for table in (f"sent_{run}", f"ran_{run}", f"outbox_{run}", f"inbox_{run}"):
                conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        setup.dispose()
        broker.close()


def test_broker_down_30s_with_20_writers_loses_nothing_and_blocks_no_request(
    broker_app: SimpleNamespace,
) -> None:
    """Broker down 30 s under 20 writers: every task runs once later; no context outlasts the send timeout."""
    a = broker_app
    send_timeout = float(a.app.conf.broker_connection_timeout)  # the outbox's send timeout (4 s by default)
    stop = threading.Event()
    down = threading.Event()
    times: dict[str, list[float]] = {"up": [], "down": []}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            body = f"w{n}-{i}"
            i += 1
            phase = "down" if down.is_set() else "up"
            start = time.monotonic()
            try:
                with a.dm.context() as ctx:
                    ctx.db.execute(text(f"INSERT INTO sent_{a.run} (body) VALUES (:b)"), {"b": body})
                    a.record.delay(body)
            except BaseException as exc:  # reported below
                errors.append(exc)
                return
            with lock:
                times[phase].append(time.monotonic() - start)
            stop.wait(random.uniform(2.0, 3.0))  # about 8 contexts/s in all: the machine is shared

    # A relay thread in the web process, as the guide suggests. The worker
    # (the checker) starts when the broker is back: its reconnection delays
    # are Celery's business, not the outbox's.
    relay = a.outbox.relay(poll=0.5)
    relay_thread = relay.start()
    threads = [threading.Thread(target=writer, args=(n,), name=f"writer-{n}") for n in range(WRITERS)]
    for t in threads:
        t.start()
    with ExitStack() as stack:
        try:
            time.sleep(2)
            down.set()
            a.broker.stop()
            time.sleep(OUTAGE)
            pending_in_outage = a.outbox.status().pending
            a.broker.start()  # the same port, with its append-only file: what it had queued is back
            down.clear()
            stack.enter_context(in_thread_worker(a.app))
            time.sleep(2)
        finally:
            stop.set()
            for t in threads:
                t.join(DEADLINE)
        assert errors == []
        sent = count(a.url, f"SELECT count(*) FROM sent_{a.run}")
        end = time.monotonic() + DEADLINE
        while count(a.url, f"SELECT count(*) FROM ran_{a.run}") < sent and time.monotonic() < end:
            time.sleep(0.25)
    relay.stop()
    relay_thread.join(DEADLINE)
    ran = count(a.url, f"SELECT count(*) FROM ran_{a.run}")
    lost = count(
        a.url,
        f"SELECT count(*) FROM sent_{a.run} s "
        f"WHERE NOT EXISTS (SELECT 1 FROM ran_{a.run} r WHERE r.body = s.body)",
    )
    twice = count(
        a.url, f"SELECT count(*) FROM (SELECT body FROM ran_{a.run} GROUP BY body HAVING count(*) > 1) d"
    )
    slowest = max(times["up"] + times["down"])
    REPORT["broker"] = {
        "sent": sent,
        "ran": ran,
        "lost": lost,
        "twice": twice,
        "pending_during_outage": pending_in_outage,
        "contexts_while_down": len(times["down"]),
        "median_context_s_down": statistics.median(times["down"]),
        "slowest_context_s": slowest,
        "send_timeout_s": send_timeout,
        "body_runs": sum(a.runs.values()),
    }
    print(REPORT["broker"])
    assert pending_in_outage > 0  # the sends did wait in the outbox
    assert lost == 0
    assert twice == 0
    assert ran == sent
    assert slowest < send_timeout  # no request waited on the dead broker longer than the send timeout
    assert a.outbox.status().pending == 0


# -- S3 down ---------------------------------------------------------------------------------------


def test_s3_down_deletes_wait_and_failed_contexts_blobs_are_removed(pg_url: str) -> None:
    """S3 stopped under open contexts: their deletes wait and land, failed contexts' puts are undone later."""
    run = uuid.uuid4().hex[:10]
    server = MotoServer().start()  # a private one: this test stops it
    try:
        bucket = server.create_bucket(f"faults-{run}")
        store = S3BlobStore(bucket, max_attempts=1, connect_timeout=1.0, **server.client_options())
        n = 5
        dm = DataManager()
        db = Database(pg_url, pool_size=2 * n + 5).install(dm)  # 2 n contexts open at once
        outbox = Outbox(db, table=f"outbox_{run}", inbox_table=f"inbox_{run}", backoff=0.2, max_backoff=1.0)
        outbox.install(dm)
        outbox.create_table()
        store.install(dm, outbox=outbox, orphan_after=0.5)  # no relay runs before S3 is back
        for i in range(n):
            store.put(f"doomed/{i}", b"to delete")
            store.put(f"kept/{i}", b"v1")
        store.put("untouched", b"control")
        ready = threading.Barrier(2 * n + 1)
        go = threading.Event()
        outcomes: list[str] = []

        def deleter(i: int) -> None:
            with dm.context() as ctx:
                ctx.db.execute(text("SELECT 1"))
                ctx.blobs.delete(f"doomed/{i}")
                ready.wait(DEADLINE)
                go.wait(DEADLINE)  # commits once S3 is down: the delete cannot reach it
            outcomes.append("committed")

        def failer(i: int) -> None:
            try:
                with dm.context() as ctx:
                    ctx.blobs.put(f"failed/{i}", b"written by a context that fails")
                    ctx.blobs.put(f"kept/{i}", b"overwritten by a context that fails")
                    ready.wait(DEADLINE)
                    go.wait(DEADLINE)  # fails once S3 is down: the rollback hook cannot reach it
                    raise LookupError(i)
            except LookupError:
                outcomes.append("rolled back")

        threads = [threading.Thread(target=deleter, args=(i,)) for i in range(n)]
        threads += [threading.Thread(target=failer, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        ready.wait(DEADLINE)
        state = server.snapshot()  # what S3 holds when it goes down
        port = server.port
        server.stop()
        go.set()
        for t in threads:
            t.join(DEADLINE)
        assert sorted(outcomes) == ["committed"] * n + ["rolled back"] * n
        pending = outbox.status().pending
        dead = outbox.status().dead
        server.start(port=port)
        server.restore(state)  # moto forgets on stop; the objects S3 had come back
        assert store.exists("doomed/0")
        assert store.exists("failed/0")
        relay = outbox.relay()
        end = time.monotonic() + DEADLINE
        while outbox.status().pending and time.monotonic() < end:
            if relay.run_once() == 0:
                time.sleep(0.1)
        left = sorted(store.list(""))
        REPORT["s3"] = {"pending_while_down": pending, "dead": dead, "left": len(left)}
        print(REPORT["s3"])
        assert (
            pending == 3 * n
        )  # n deletes, and 2 n cleanups (a new key, an overwrite) of the failed contexts
        assert outbox.status() == Status(0, 0.0, 0)
        assert left == sorted([f"kept/{i}" for i in range(n)] + ["untouched"])  # no undo copy left either
        assert {store.get(f"kept/{i}") for i in range(n)} == {b"v1"}  # the overwrites were undone
        db.dispose()
    finally:
        server.stop()


# -- relays as processes ---------------------------------------------------------------------------

RELAY_APP = """
import os, time
from sqlalchemy import text
from polydatum import DataManager
from polydatum.outbox import Inbox, Outbox
from polydatum.sqlalchemy import Database

run, table = os.environ["FAULT_RUN"], os.environ["FAULT_TABLE"]
dm = DataManager()
db = Database(os.environ["FAULT_DB"]).install(dm)
outbox = Outbox(db, table=table, inbox_table=f"inbox_{run}", lease=float(os.environ["FAULT_LEASE"]))
inbox = Inbox(outbox)
slow = float(os.environ["FAULT_SLOW"])
use_inbox = os.environ["FAULT_INBOX"] == "1"

@outbox.handler("job")
def job(effect):
    # Every delivery is recorded in a transaction of its own (duplicates show);
    # the run goes through the inbox, in the context's transaction (once per row).
    with db.engine.begin() as conn:
        conn.execute(
            text(f"INSERT INTO deliveries_{run} (tbl, row_id, k, pid) VALUES (:t, :r, :k, :p)"),
            {"t": table, "r": effect.id, "k": effect.key, "p": os.getpid()},
        )
    if use_inbox:
        with dm.context() as ctx:
            if not inbox.seen(ctx, f"outbox-{effect.id}"):
                ctx.db.execute(text(f"INSERT INTO runs_{run} (row_id) VALUES (:r)"), {"r": effect.id})
    time.sleep(slow)
"""


@pytest.fixture(name="relay_app")
def fixture_relay_app(pg_url: str, tmp_path: Path) -> Iterator[SimpleNamespace]:
    """The tables, an outbox that leaves its rows to relays, and a module the relay command loads."""
    run = uuid.uuid4().hex[:10]
    dm = DataManager()
    db = Database(pg_url).install(dm)
    # Two outboxes, so that two sets of relays can start at once (each takes seconds to import).
    outboxes = {}
    for name in ("a", "b"):
        box = Outbox(db, table=f"outbox_{run}_{name}", inbox_table=f"inbox_{run}", deliver_on_commit=False)
        box.install(dm, name=f"outbox_{name}")
        box.create_table()
        outboxes[name] = box
    with db.engine.begin() as conn:
        conn.execute(
            text(f"CREATE TABLE deliveries_{run} (n bigserial, tbl text, row_id bigint, k text, pid int)")
        )
        conn.execute(text(f"CREATE TABLE runs_{run} (row_id bigint)"))
    (tmp_path / f"faultrelay_{run}.py").write_text(textwrap.dedent(RELAY_APP))
    procs: list[subprocess.Popen[str]] = []

    def start(
        lease: float = 30.0,
        slow: float = 0.0,
        batch: int = 10,
        inbox: bool = False,
        wait: bool = True,
        box: str = "a",
    ) -> subprocess.Popen[str]:
        options = ["--batch", str(batch), "--poll", "0.2"]
        env = dict(os.environ, FAULT_RUN=run, FAULT_DB=pg_url, FAULT_LEASE=str(lease), FAULT_SLOW=str(slow))
        env["FAULT_INBOX"] = "1" if inbox else "0"
        env["FAULT_TABLE"] = f"outbox_{run}_{box}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "polydatum.outbox", f"faultrelay_{run}:outbox", *options],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        if wait:
            ready(proc)
        return proc

    def ready(proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:  # its log says when it delivers: then it competes for rows
            if " delivering " in line:
                break
        else:
            pytest.fail(f"the relay exited {proc.wait()} before delivering")
        # The rest of its log is read, so that it never blocks on a full pipe.
        threading.Thread(target=proc.stderr.read, daemon=True).start()

    def deliveries(box: str = "a") -> list[tuple[int, int, str, int]]:
        with db.engine.connect() as conn:
            q = text(f"SELECT n, row_id, k, pid FROM deliveries_{run} WHERE tbl = :t ORDER BY n")
            return [tuple(r) for r in conn.execute(q, {"t": f"outbox_{run}_{box}"})]

    def runs() -> dict[int, int]:
        with db.engine.connect() as conn:
            q = text(f"SELECT row_id, count(*) FROM runs_{run} GROUP BY row_id")
            return {int(r): int(c) for r, c in conn.execute(q)}

    def write(total: int, keys: int, box: str = "a") -> list[int]:
        ids = []
        for start_at in range(0, total, 20):  # commits of 20 rows
            with dm.context() as ctx:
                sender = getattr(ctx, f"outbox_{box}")
                for seq in range(start_at, min(total, start_at + 20)):
                    ids.append(sender.add("job", {"seq": seq}, key=f"k{seq % keys}"))
        return ids

    def wait_drained(box: str = "a") -> None:
        end = time.monotonic() + DEADLINE
        while outboxes[box].status().pending:
            assert time.monotonic() < end, "the relays did not deliver before the deadline"
            time.sleep(0.1)

    def stop_all() -> list[int | None]:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in procs:
            try:
                proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            codes.append(proc.returncode)
        return codes

    try:
        yield SimpleNamespace(
            start=start,
            ready=ready,
            deliveries=deliveries,
            runs=runs,
            write=write,
            wait_drained=wait_drained,
            stop_all=stop_all,
            procs=procs,
        )
    finally:
        stop_all()
        for proc in procs:
            if proc.stderr is not None:
                proc.stderr.close()
        with db.engine.begin() as conn:
            for table in (
                f"deliveries_{run}",
                f"runs_{run}",
                f"outbox_{run}_a",
                f"outbox_{run}_b",
                f"inbox_{run}",
            ):
                conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        db.dispose()


def test_relay_process_killed_mid_batch_duplicates_only_in_flight_rows_and_inbox_runs_each_once(
    relay_app: SimpleNamespace,
) -> None:
    """Two relay processes, one SIGKILLed mid-batch: the other delivers its rows once the leases lapse."""
    r = relay_app
    ids = r.write(100, keys=20)
    doomed = r.start(lease=3.0, slow=0.1, batch=10, inbox=True, wait=False)
    other = r.start(lease=3.0, slow=0.1, batch=10, inbox=True, wait=False)
    r.ready(doomed)
    r.ready(other)
    end = time.monotonic() + DEADLINE
    while sum(1 for *_, pid in r.deliveries() if pid == doomed.pid) < 5:  # in the middle of a batch
        assert time.monotonic() < end, "the relay to kill delivered nothing"
        time.sleep(0.02)
    doomed.kill()
    doomed.wait()
    delivered_by_killed = {row for _, row, _, pid in r.deliveries() if pid == doomed.pid}
    r.wait_drained()
    codes = r.stop_all()
    log = r.deliveries()
    per_row: dict[int, int] = {}
    for _, row, _, _ in log:
        per_row[row] = per_row.get(row, 0) + 1
    duplicated = {row for row, c in per_row.items() if c > 1}
    REPORT["relay_killed"] = {
        "rows": len(ids),
        "deliveries": len(log),
        "delivered_by_killed": len(delivered_by_killed),
        "duplicated": len(duplicated),
        "runs": sum(r.runs().values()),
    }
    print(REPORT["relay_killed"])
    assert codes == [-signal.SIGKILL, 0]  # the survivor exits 0 on SIGTERM
    assert sorted(per_row) == sorted(ids)  # every row delivered
    assert duplicated  # the killed relay had delivered rows it could not delete
    assert duplicated <= delivered_by_killed  # duplicates only for rows in flight in the killed relay
    assert set(per_row.values()) <= {1, 2}
    assert r.runs() == dict.fromkeys(ids, 1)  # the inbox ran each row once, duplicates included


def test_two_and_four_relay_processes_deliver_every_row_once_in_key_order(relay_app: SimpleNamespace) -> None:
    """2 and 4 relay processes on PostgreSQL: every row delivered, none by two relays, each key in order."""
    r = relay_app
    counts = {"a": 2, "b": 4}  # 2 relays on one outbox, 4 on another, all started at once
    started = [r.start(batch=7, wait=False, box=box) for box, n in counts.items() for _ in range(n)]
    for proc in started:
        r.ready(proc)
    written = {box: r.write(200, keys=16, box=box) for box in counts}
    for box, relays in counts.items():
        r.wait_drained(box)
        log = r.deliveries(box)
        rows = [row for _, row, _, _ in log]
        by_key: dict[str, list[int]] = {}
        for _, row, key, _ in log:
            by_key.setdefault(key, []).append(row)
        pids = {pid for _, _, _, pid in log}
        REPORT[f"relays_{relays}"] = {
            "rows": len(written[box]),
            "deliveries": len(log),
            "by_relay": sorted(sum(1 for *_, p in log if p == pid) for pid in pids),
        }
        print(REPORT[f"relays_{relays}"])
        assert sorted(rows) == sorted(written[box])  # every row once: none delivered by two relays
        for seq in by_key.values():
            assert seq == sorted(seq)  # rows of a key in commit (id) order, across relays
        assert len(pids) > 1  # the relays shared the work
    assert r.stop_all() == [0] * 6  # SIGTERM: the batch in hand finished, exit 0

"""The outbox on PostgreSQL: request overhead, relay throughput, commit-to-delivery latency.

Run: .venv/bin/python benchmarks/outbox.py [--quick] [--only=overhead|throughput|latency|backlog] [--rows N]

Needs PostgreSQL on 127.0.0.1:5432 (db ``test``); the Celery rows also need
RabbitMQ on 127.0.0.1:5672 and are skipped without it. Each part creates its
own tables in a fresh database and drops it afterwards.

1. **Request overhead**: a committed context that writes one row of its own
   and one effect through the outbox (INSERT, COMMIT, then delivery to a
   no-op handler and the DELETE), against the hand-written baseline of
   today: the same write plus an ``on_commit`` hook calling the handler.
   With RabbitMQ, the same for one Celery send (outbox vs on-commit send).
2. **Relay throughput**: N pending generic effects drained by one relay
   (batch 500), against a hand-written loop that claims with ``FOR UPDATE
   SKIP LOCKED`` and deletes each batch (no leases, no key order).
3. **Latency** at a steady 200 effects/s with ``deliver_on_commit=False``:
   a relay woken by LISTEN/NOTIFY; p50 and p99 from the row's created_at
   to the handler call.

4. **Backlog**: ``--rows`` (default 1,000,000; 20,000 with ``--quick``)
   pending generic effects, written server-side, drained by one relay
   *process* (``python -m polydatum.outbox ... --once --batch 500``): its
   drain rate and peak RSS (from ``wait4``), against a hand-written
   claim-and-delete loop in a process of its own, and the floor (a process
   with the same imports that runs one query).

Variants of part 1 are interleaved in short rounds; the ratio is the median
of the per-round ratios, measured in the same run.
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sqlalchemy import Engine, create_engine, event, text

from polydatum import DataManager
from polydatum.outbox import Outbox
from polydatum.sqlalchemy import Database
from tests.support.sql import fresh_postgres_database

QUICK = "--quick" in sys.argv


def _rows_option() -> int:
    if "--rows" not in sys.argv:
        return 20_000 if QUICK else 1_000_000
    at = sys.argv.index("--rows") + 1
    if at >= len(sys.argv) or not sys.argv[at].isdigit() or int(sys.argv[at]) < 1:
        sys.exit("--rows takes a positive number of rows, e.g. --rows 100000")
    return int(sys.argv[at])


ROWS = _rows_option()
SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ROUNDS = 5 if QUICK else 11


def reachable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RoundTrips:
    """Counts what a variant asks of the server, on the request's thread and off it.

    Statements and COMMITs through SQLAlchemy, plus pool checkouts (each
    pings the server first: ``pool_pre_ping``). Unlike wall time, these do
    not depend on how busy the machine is, and each is a round trip.
    """

    def __init__(self) -> None:
        self.request = 0
        self.background = 0
        self.main = threading.get_ident()

    def count(self, *args: object, **kwargs: object) -> None:
        if threading.get_ident() == self.main:
            self.request += 1
        else:
            self.background += 1

    def watch(self, engine: Engine) -> None:
        for name in ("before_cursor_execute", "commit"):
            event.listen(engine, name, self.count)
        event.listen(engine.pool, "checkout", self.count)


TRIPS = RoundTrips()


def interleave(variants: dict[str, Callable[[], None]], loops: int, baselines: dict[str, str]) -> None:
    """Run the variants in rotating order; print µs/op, CPU µs/op, round trips/op and median ratios.

    The ratio is the median of the per-round ratios to each one's baseline;
    CPU time is this process's, all threads (the background DELETEs included).
    """
    ns: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    trips: dict[str, list[int]] = {k: [0, 0] for k in variants}
    names = list(variants)
    for r in range(ROUNDS):
        order = names[r % len(names) :] + names[: r % len(names)]
        got = {}
        for name in order:
            fn = variants[name]
            time.sleep(0.02)  # the previous variant's background DELETEs land outside this one's time
            TRIPS.request = TRIPS.background = 0
            start, start_cpu = time.perf_counter_ns(), time.process_time_ns()
            for _ in range(loops):
                fn()
            got[name] = (time.perf_counter_ns() - start) / loops
            cpu[name].append((time.process_time_ns() - start_cpu) / loops)
            ns[name].append(got[name])
            time.sleep(0.02)
            trips[name][0] += TRIPS.request
            trips[name][1] += TRIPS.background
        for name in names:
            ratios[name].append(got[name] / got[baselines[name]])
    runs = ROUNDS * loops
    for name in names:
        print(
            f"  {name:<36} {statistics.median(ns[name]) / 1000:9.1f} µs/op"
            f"   x{statistics.median(ratios[name]):.2f} of {baselines[name]}"
            f"   CPU {statistics.median(cpu[name]) / 1000:6.0f} µs/op"
            f"   round trips/op {trips[name][0] / runs:.2f} (+{trips[name][1] / runs:.2f} off the request)"
        )


def request_overhead(url: str) -> None:
    print("1. request overhead (one committed context, one effect)")
    dm = DataManager()
    db = Database(url).install(dm)
    TRIPS.watch(db.engine)
    with db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE bench (id serial PRIMARY KEY, n int)"))
    outbox = Outbox(db).install(dm)
    outbox.create_table()
    outbox.handler("noop")(lambda effect: None)
    insert = text("INSERT INTO bench (n) VALUES (1)")

    def noop(payload: object) -> None:
        return None

    def on_commit() -> None:
        with dm.context() as ctx:
            ctx.db.execute(insert)
            ctx.on_commit(noop, {"order": 7})

    def through_outbox() -> None:
        with dm.context() as ctx:
            ctx.db.execute(insert)
            ctx.outbox.add("noop", {"order": 7})

    variants: dict[str, Callable[[], None]] = {
        "generic: on_commit hook (baseline)": on_commit,
        "generic: outbox": through_outbox,
    }
    app = None
    if reachable(5672):
        from celery import Celery

        from polydatum.celery import install

        # Two apps on the same broker and queue: one plain on-commit, one through the outbox.
        dm2 = DataManager()
        db.install(dm2)
        outbox2 = Outbox(db, table="bench_outbox2").install(dm2)
        outbox2.create_table()
        plain = Celery("bench_plain", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
        boxed = Celery("bench_boxed", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
        for a in (plain, boxed):
            a.conf.update(task_default_queue="polydatum-bench-outbox", task_serializer="json")
        install(plain, dm)
        install(boxed, dm2, outbox=outbox2)

        def echo(n: int) -> int:
            return n

        t_plain = plain.task(name="bench.t", shared=False)(echo)
        t_boxed = boxed.task(name="bench.t", shared=False)(echo)
        app = (plain, boxed)

        def celery_hook() -> None:
            with dm.context() as ctx:
                ctx.db.execute(insert)
                t_plain.delay(1)

        def celery_outbox() -> None:
            with dm2.context() as ctx:
                ctx.db.execute(insert)
                t_boxed.delay(1)

        variants["celery: on-commit send"] = celery_hook
        variants["celery: outbox send"] = celery_outbox
    else:
        print("  (no RabbitMQ on 127.0.0.1:5672: Celery rows skipped)")
    baselines = dict.fromkeys(variants, "generic: on_commit hook (baseline)")
    if "celery: outbox send" in variants:
        baselines["celery: on-commit send"] = baselines["celery: outbox send"] = "celery: on-commit send"
    interleave(variants, 50 if QUICK else 200, baselines)
    if app is not None:
        with app[0].connection_for_write() as conn:
            conn.default_channel.queue_delete("polydatum-bench-outbox")
        for a in app:
            a.close()
    db.dispose()


def relay_throughput(url: str) -> None:
    n = 5_000 if QUICK else 20_000
    print(f"2. relay throughput ({n} pending generic effects, batch 500)")
    dm = DataManager()
    db = Database(url).install(dm)
    outbox = Outbox(db, deliver_on_commit=False).install(dm)
    outbox.create_table()
    outbox.handler("noop")(lambda effect: None)

    def fill() -> None:
        for start in range(0, n, 1000):
            with dm.context() as ctx:
                for i in range(start, start + 1000):
                    ctx.outbox.add("noop", {"i": i})

    fill()
    relay = outbox.relay(batch=500)
    start = time.perf_counter()
    while relay.run_once():
        pass
    ours = n / (time.perf_counter() - start)
    fill()
    claim = text("SELECT id, payload FROM polydatum_outbox ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED")
    start = time.perf_counter()
    while True:
        with db.engine.begin() as conn:
            got = conn.execute(claim).all()
            if not got:
                break
            conn.execute(
                text("DELETE FROM polydatum_outbox WHERE id = ANY(:ids)"), {"ids": [r[0] for r in got]}
            )
    hand = n / (time.perf_counter() - start)
    print(f"  relay                 {ours:10.0f} effects/s  ({hand / ours:.2f}x slower than hand-written)")
    print(f"  hand-written claim    {hand:10.0f} effects/s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  max RSS of this process so far: {rss:.0f} MiB (the relay holds one batch at a time)")
    if reachable(5672):
        from celery import Celery

        from polydatum.celery import install

        sends = 2_000 if QUICK else 10_000
        dm2 = DataManager()
        db.install(dm2)
        boxed = Outbox(db, table="bench_celery_outbox", deliver_on_commit=False).install(dm2)
        boxed.create_table()
        app = Celery("bench_relay", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
        app.conf.update(task_default_queue="polydatum-bench-relay", task_serializer="json")
        install(app, dm2, outbox=boxed)

        def echo(n: int) -> int:
            return n

        task = app.task(name="bench.relay", shared=False)(echo)
        for start in range(0, sends, 500):
            with dm2.context():
                for i in range(start, start + 500):
                    task.delay(i)
        relay = boxed.relay(batch=500)
        start_t = time.perf_counter()
        while relay.run_once():
            pass
        rate = sends / (time.perf_counter() - start_t)
        print(f"  relay, Celery sends   {rate:10.0f} sends/s to RabbitMQ")
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete("polydatum-bench-relay")
        app.close()
    db.dispose()


def latency(url: str) -> None:
    seconds = 3 if QUICK else 10
    print(f"3. commit-to-delivery latency at 200 effects/s for {seconds} s (LISTEN/NOTIFY)")
    dm = DataManager()
    db = Database(url).install(dm)
    outbox = Outbox(db, deliver_on_commit=False, table="bench_latency").install(dm)
    outbox.create_table()
    lags: list[float] = []
    outbox.handler("t")(lambda effect: lags.append(time.time() - effect.created_at))
    relay = outbox.relay(poll=5.0)
    thread = relay.start()
    time.sleep(0.5)
    due = time.monotonic()
    for _ in range(200 * seconds):
        with dm.context() as ctx:
            ctx.outbox.add("t", {})
        due += 1 / 200
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    end = time.monotonic() + 10
    while len(lags) < 200 * seconds and time.monotonic() < end:
        time.sleep(0.05)
    relay.stop()
    with dm.context() as ctx:
        ctx.outbox.add("t", {})  # wakes the relay to see the stop
    thread.join(10)
    lags.sort()
    p50 = lags[len(lags) // 2] * 1000
    p99 = lags[int(len(lags) * 0.99)] * 1000
    print(f"  delivered {len(lags)}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    db.dispose()


RELAY_MODULE = """
import atexit, os, time
from polydatum.outbox import Outbox
from polydatum.sqlalchemy import Database

outbox = Outbox(Database(os.environ["BENCH_DB"]), table="bench_backlog")
seen = []

@outbox.handler("noop")
def noop(effect):
    if not seen:
        seen.append(time.perf_counter())

@atexit.register
def report():  # from the first delivery to the end: start-up left out
    with open(os.environ["BENCH_OUT"], "w") as out:
        out.write(str(time.perf_counter() - seen[0]))
"""

HAND_WRITTEN = """
import os, time
from sqlalchemy import create_engine, text

engine = create_engine(os.environ["BENCH_DB"])
claim = text("SELECT id, payload FROM bench_backlog ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED")
start = time.perf_counter()
while True:
    with engine.begin() as conn:
        got = conn.execute(claim).all()
        if not got:
            break
        conn.execute(text("DELETE FROM bench_backlog WHERE id = ANY(:ids)"), {"ids": [r[0] for r in got]})
with open(os.environ["BENCH_OUT"], "w") as out:
    out.write(str(time.perf_counter() - start))
"""

FLOOR = """
import os
from sqlalchemy import create_engine, text
from polydatum.outbox import Outbox
from polydatum.sqlalchemy import Database

db = Database(os.environ["BENCH_DB"])
with db.engine.connect() as conn:
    conn.execute(text("SELECT 1"))
"""


def _child(argv: list[str], cwd: str, url: str) -> tuple[float, float]:
    """Run a child process to its end; the time it wrote to BENCH_OUT (s) and its peak RSS (MiB).

    The peak is the child's VmHWM, read from /proc while it runs: the
    ``ru_maxrss`` that wait4 reports survives exec, so a child started by this
    (bigger) process would report this process's size.
    """
    out = Path(cwd, "elapsed")
    out.write_text("0")
    env = dict(os.environ, BENCH_DB=url, BENCH_OUT=str(out), PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL)
    peak_kib = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peak_kib = max(peak_kib, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            pass  # it just ended
        time.sleep(0.02)
    if proc.returncode != 0:
        sys.exit(f"{argv} exited {proc.returncode}")
    return float(out.read_text()), peak_kib / 1024


def _fill_backlog(url: str, rows: int) -> None:
    """``rows`` pending generic effects, written server-side (as a long outage would leave them)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO bench_backlog (topic, key, payload, created_at, available_at, attempts, dead) "
                "SELECT 'noop', NULL, '{\"i\":' || g || '}', extract(epoch from now()), "
                "extract(epoch from now()), 0, false FROM generate_series(1, :n) g"
            ),
            {"n": rows},
        )
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE bench_backlog"))
    engine.dispose()


def backlog(url: str) -> None:
    rows = ROWS
    print(f"4. backlog: {rows:,} pending generic effects drained by one relay process (batch 500)")
    db = Database(url)
    Outbox(db, table="bench_backlog").create_table()
    db.dispose()
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "benchrelay.py").write_text(RELAY_MODULE)
        _fill_backlog(url, rows)
        wall, rss = _child(
            [sys.executable, "-m", "polydatum.outbox", "benchrelay:outbox", "--once", "--batch", "500"],
            folder,
            url,
        )
        _fill_backlog(url, rows)
        hand, hand_rss = _child([sys.executable, "-c", HAND_WRITTEN], folder, url)
        _, floor = _child([sys.executable, "-c", FLOOR], folder, url)
    print(
        f"  relay process (python -m polydatum.outbox --once)  {rows / wall:7.0f} effects/s"
        f"  {wall * 1e6 / rows:6.1f} µs/effect  peak RSS {rss:5.1f} MiB  x{wall / hand:.2f} the loop's time"
    )
    print(
        f"  hand-written claim+delete loop                     {rows / hand:7.0f} effects/s"
        f"  {hand * 1e6 / rows:6.1f} µs/effect  peak RSS {hand_rss:5.1f} MiB"
    )
    print(f"  floor: a process with the same imports, one query  peak RSS {floor:5.1f} MiB")


PARTS = {
    "overhead": request_overhead,
    "throughput": relay_throughput,
    "latency": latency,
    "backlog": backlog,
}


def main() -> None:
    if not reachable(5432):
        sys.exit("benchmarks/outbox.py needs PostgreSQL on 127.0.0.1:5432")
    only = [a.removeprefix("--only=") for a in sys.argv if a.startswith("--only=")]
    for name in only:
        if name not in PARTS:
            sys.exit(f"--only= takes one of {', '.join(PARTS)}, got {name!r}")
    for part in [PARTS[n] for n in only] or PARTS.values():
        with fresh_postgres_database(SERVER) as url:
            part(url)


if __name__ == "__main__":
    main()

"""Load and faults: the notes example under concurrent clients, its numbers, and proof that nothing is lost.

Run:  python benchmarks/load.py [--quick] [--clients 50] [--duration 60] [--faults] [--no-celery]
      [--twin [--asgi]]

Everything runs on 127.0.0.1 and stops by itself: a private PostgreSQL
cluster and redis-server (started here, so faults may restart them), S3 on
moto's server behind a proxy that can drop it, RabbitMQ (the shared one,
a queue of this run's own) with a real Celery worker (``polydatum-notes
worker``), and the app served by gunicorn with 4 worker processes (gthread).

1. **Load**: ``--clients`` threads (pairs share a user, so edits conflict)
   drive the mix of tests/load/driver.py (create, cached read, update with
   stale versions, attach, fetch an attachment, delete) for ``--duration``
   seconds: throughput, p50/p95/p99 latency of acknowledged requests,
   errors by kind; then the audit (tests/load/audit.py).
2. **Framework share**: the same mix, in alternating rounds, against the
   example and against the same endpoints written by hand
   (benchmarks/load_apps.py: SQLAlchemy Core, redis-py, boto3, Celery's
   send_task; no polydatum), both under gunicorn at once. Printed: req/s,
   latency, server CPU per request, and polydatum's share of each.
3. ``--faults``: each fault scenario of tests/load/faults.py under the load
   (fresh database, bucket and servers' state each), then the audit: a table
   of requests, acknowledged writes, lost writes, errors seen by clients,
   time to recover and leaked connections; and how many notes' word index
   (built by the Celery job, derived data) is still missing or behind once
   the queue settled: a job lost to a fault shows up there.

``--twin`` runs only this: the example and benchmarks/twin (its feature-equal
hand-written twin: the same statements, row locks, auth checks, cache,
blob and Celery work, no polydatum) under gunicorn at once, on the same
servers, the same mix in interleaved rounds; req/s, p50/p95/p99 and server
CPU per request of each and their ratios. The last line is
``polydatum/twin: throughput X.XX, p99 Y.YY``. ``--twin --asgi`` does the
same for the ASGI pair: the example's FastAPI entry point (notes.asgi)
and the FastAPI twin (benchmarks/twin/asgi.py), under uvicorn with 4
workers.

The short versions of the fault scenarios run in the test suite
(tests/load/test_faults.py); this is the long form with more clients.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "notes"
for path in (str(REPO), str(EXAMPLE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from tests.load.audit import AuditReport, Limits, ProcessSnapshot, audit, server_ports  # noqa: E402
from tests.load.driver import Load, summarize, time_to_recover  # noqa: E402
from tests.load.faults import FAULTS, Fault, SlowRoute  # noqa: E402
from tests.load.proxy import FaultProxy  # noqa: E402
from tests.support.s3 import REGION, MotoServer  # noqa: E402
from tests.support.servers import PrivatePostgres, PrivateRedis, free_port, reachable, wait_for  # noqa: E402

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
WORKERS = 4
THREADS = 8
STATEMENT_TIMEOUT_MS = 2000
LOGS = Path(tempfile.mkdtemp(prefix="polydatum-load-"))


# -- processes ------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Gunicorn:
    """``gunicorn -w 4 -k gthread`` serving ``spec`` (a factory in benchmarks/load_apps.py)."""

    def __init__(self, spec: str, env: dict[str, str], name: str) -> None:
        self.spec, self.env, self.name = spec, env, name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(WORKERS),
            "--worker-class",
            "gthread",
            "--threads",
            str(THREADS),
            "--keep-alive",
            "5",
            "--graceful-timeout",
            "5",
            "--timeout",
            "120",
            "--log-level",
            "warning",
            "--pythonpath",
            f"{REPO},{REPO / 'benchmarks'},{EXAMPLE}",
            self.spec,
        ]

    def start(self) -> Gunicorn:
        log = open(LOGS / f"{self.name}.log", "ab")  # noqa: SIM115  # closed with the process
        self.proc = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
        log.close()
        wait_for(self.port, timeout=60)
        deadline = time.monotonic() + 30
        while WORKERS > 1 and len(self.workers()) < WORKERS and time.monotonic() < deadline:
            time.sleep(0.1)
        return self

    def workers(self) -> list[int]:
        return children(self.proc.pid) if self.proc else []

    def cpu(self) -> float:
        assert self.proc is not None
        return cpu_seconds([self.proc.pid, *self.workers()])

    def usage(self) -> tuple[float, float, int, int]:
        """User and system CPU seconds, voluntary and involuntary context switches (all threads)."""
        assert self.proc is not None
        user = system = voluntary = involuntary = 0
        for pid in (self.proc.pid, *self.workers()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                user, system = user + int(fields[11]), system + int(fields[12])
                for task in Path(f"/proc/{pid}/task").iterdir():
                    for line in (task / "status").read_text().splitlines():
                        if line.startswith("voluntary_ctxt_switches"):
                            voluntary += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            involuntary += int(line.split()[1])
            except OSError:
                continue
        tick = os.sysconf("SC_CLK_TCK")
        return user / tick, system / tick, voluntary, involuntary

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Uvicorn(Gunicorn):
    """``uvicorn --workers 4`` serving ``spec`` (an ASGI app factory in benchmarks/load_apps.py).

    FastAPI's thread pool (anyio's default: 40 threads per worker) runs the
    apps' sync endpoints, as it would in production.
    """

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(WORKERS),
            "--timeout-keep-alive",
            "5",
            "--timeout-graceful-shutdown",
            "5",
            "--log-level",
            "warning",
            "--no-access-log",
            "--app-dir",
            str(REPO / "benchmarks"),
            self.spec,
        ]


class CeleryWorker:
    """``polydatum-notes worker`` (the example's own command) in a child process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CeleryWorker:
        log = open(LOGS / "celery.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "notes", "worker", "--loglevel", "warning"],
            env=self.env,
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
        log.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# -- servers and one app ---------------------------------------------------------------------


class Servers:
    def __init__(self, stack: ExitStack, celery: bool) -> None:
        self.pg = PrivatePostgres().start()
        stack.callback(self.pg.close)
        self.redis = PrivateRedis().start()
        stack.callback(self.redis.close)
        self.moto = MotoServer().start()
        stack.callback(self.moto.stop)
        self.proxy = FaultProxy(self.moto.port).start()
        stack.callback(self.proxy.close)
        self.celery = celery and reachable("127.0.0.1", 5672)
        if celery and not self.celery:
            print("RabbitMQ is not running on 127.0.0.1:5672: Celery runs eager (in the web processes)")


@contextmanager
def running_app(
    servers: Servers, *, hand: bool = False, twin: bool = False, slow_route: bool = False, asgi: bool = False
) -> Iterator[Any]:
    """A fresh database and bucket, the Celery worker and gunicorn(s); yields a namespace of it all.

    With ``asgi``, the example's ASGI API (notes.asgi) and, with ``twin``, the
    FastAPI twin, each under uvicorn instead.
    """
    from types import SimpleNamespace

    from notes import Settings, build

    from polydatum.s3 import S3BlobStore

    name = f"load_{uuid.uuid4().hex[:10]}"
    admin = create_engine(servers.pg.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    database_url = make_url(servers.pg.url).set(database=name).render_as_string(hide_password=False)
    bucket = servers.moto.create_bucket(f"load-{uuid.uuid4().hex[:12]}")
    queue = f"load-{uuid.uuid4().hex[:10]}"
    env = dict(
        os.environ,
        PYTHONPATH=f"{REPO}:{EXAMPLE}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION=REGION,
        DATABASE_URL=f"{database_url}?options=-c%20statement_timeout%3D{STATEMENT_TIMEOUT_MS}",
        REDIS_URL=servers.redis.url,
        BLOB_URL=f"s3://{bucket}/notes-app",
        CELERY_QUEUE=queue,
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{servers.proxy.port}",
        CACHE_NAMESPACE=name,
        LOAD_SLOW_ROUTE="1" if slow_route else "0",
    )
    if servers.celery:
        env["CELERY_BROKER_URL"] = RABBITMQ
    else:
        env.pop("CELERY_BROKER_URL", None)
    setup = build(Settings.from_env(env))
    setup.create_tables()
    with ExitStack() as stack:
        stack.callback(setup.close)
        if servers.celery:
            worker = CeleryWorker(env).start()
            stack.callback(worker.stop)

            def delete_queue() -> None:
                with setup.celery.connection_for_write() as conn:
                    conn.default_channel.queue_delete(queue)

            stack.callback(delete_queue)
        if asgi:
            poly: Gunicorn = Uvicorn("load_apps:polydatum_asgi_app", env, "polydatum-asgi").start()
        else:
            poly = Gunicorn("load_apps:polydatum_app()", env, "polydatum").start()
        stack.callback(poly.stop)
        by_hand = None
        if hand:
            by_hand = Gunicorn("load_apps:hand_app()", env, "hand").start()
            stack.callback(by_hand.stop)
        twin_app = None
        if twin:
            # Its own cache namespace: the apps' cached notes do not serve each other.
            twin_env = dict(env, CACHE_NAMESPACE=f"{name}-twin")
            if asgi:
                twin_app = Uvicorn("load_apps:twin_asgi_app", twin_env, "twin-asgi").start()
            else:
                twin_app = Gunicorn("load_apps:twin_app()", twin_env, "twin").start()
            stack.callback(twin_app.stop)
        blobs = S3BlobStore(bucket, prefix="notes-app", **servers.moto.client_options())
        ports = [*server_ports(database_url, servers.redis.url), servers.proxy.port, 5672]
        try:
            yield SimpleNamespace(
                database_url=database_url,
                env=env,
                poly=poly,
                hand=by_hand,
                twin=twin_app,
                blobs=blobs,
                ports=ports,
                redis_url=servers.redis.url,
            )
        finally:
            stack.close()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


def index_lag(database_url: str, wait: float = 15.0) -> int:
    """Notes whose word index (built by the Celery job) is missing or older than the note, once jobs settle.

    Derived data, not an acknowledged write: reported, not audited. Waits up to
    ``wait`` seconds for the worker to drain its queue.
    """
    engine = create_engine(database_url, poolclass=NullPool)
    deadline = time.monotonic() + wait
    try:
        while True:
            with engine.connect() as conn:
                behind = int(
                    conn.execute(
                        text(
                            "SELECT count(*) FROM notes n LEFT JOIN note_index i ON i.note_id = n.id "
                            "WHERE i.version IS NULL OR i.version < n.version"
                        )
                    ).scalar_one()
                )
            if behind == 0 or time.monotonic() > deadline:
                return behind
            time.sleep(0.5)
    finally:
        engine.dispose()


def run_audit(app: Any, load: Load, baseline: list[ProcessSnapshot]) -> AuditReport:
    # Connections: 15 per gunicorn worker, and the Celery worker's processes on the same database.
    limits = Limits(pg=15 + 12, thread_slack=THREADS + 2, fd_slack=THREADS + 4)
    pids = [s.pid for s in baseline if os.path.exists(f"/proc/{s.pid}")]
    return audit(
        app.database_url,
        app.blobs,
        load.records,
        redis_url=app.redis_url,
        pids=pids,
        baseline=baseline,
        server_ports=app.ports,
        limits=limits,
    )


# -- the three parts ---------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value:.1f}"


def part_load(servers: Servers, clients: int, duration: float, compare: float, rounds: int) -> None:
    with running_app(servers, hand=True) as app:
        load = Load(app.poly.url, clients, timeout=60).setup()
        baseline = [ProcessSnapshot.take(pid, app.ports) for pid in app.poly.workers()]
        print(
            f"\n## Load: {clients} clients for {duration:.0f} s on gunicorn ({WORKERS} workers x {THREADS} "
            f"threads), PostgreSQL, Redis, S3 (moto), Celery {'worker' if servers.celery else 'eager'}\n"
        )
        cpu0 = app.poly.cpu()
        load.run(duration)
        cpu = app.poly.cpu() - cpu0
        stats = summarize(load.records)
        print(
            "| requests | req/s | p50 ms | p95 ms | p99 ms | acked writes | 409 conflicts "
            "| server CPU ms/req |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print(
            f"| {stats['requests']} | {stats['throughput']:.0f} | {ms(stats['p50'])} "
            f"| {ms(stats['p95'])} | "
            f"{ms(stats['p99'])} | {stats['acked_writes']} | {stats['conflicts']} | "
            f"{1000 * cpu / max(1, stats['requests']):.2f} |"
        )
        by_op = {}
        for op in ("create", "read", "update", "attach", "fetch", "delete"):
            by_op[op] = summarize(r for r in load.records if r.op == op)
        print("\n| operation | requests | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|")
        for op, s in by_op.items():
            print(f"| {op} | {s['requests']} | {ms(s['p50'])} | {ms(s['p95'])} | {ms(s['p99'])} |")
        print(f"\nErrors by kind: {stats['errors'] or 'none'}")
        report = run_audit(app, load, baseline)
        print_audit(report)
        print(
            f"Word index (Celery job) missing or behind the note, after the queue settled: "
            f"{index_lag(app.database_url)} notes"
        )

        print(
            f"\n## Framework share: the same mix, polydatum vs by hand, {rounds} alternating rounds of "
            f"{compare:.0f} s each, {clients} clients\n"
        )
        loads = {"polydatum": load, "by hand": Load(app.hand.url, clients, timeout=60).setup()}
        servers_of = {"polydatum": app.poly, "by hand": app.hand}
        results: dict[str, list[tuple[list[Any], float]]] = {k: [] for k in loads}
        for i in range(rounds):
            order = list(loads) if i % 2 == 0 else list(reversed(loads))
            for name in order:
                since = time.monotonic()
                before = servers_of[name].cpu()
                loads[name].run(compare)
                used = servers_of[name].cpu() - before
                results[name].append(([r for r in loads[name].records if r.start >= since], used))
        table = {}
        for name, runs in results.items():
            records = [r for rs, _ in runs for r in rs]
            stats = summarize(records)
            stats["throughput"] = len(records) / (compare * rounds)  # the rounds are not contiguous
            mean = sum(r.elapsed for r in records) / max(1, len(records)) * 1000
            table[name] = (stats, mean, 1000 * sum(c for _, c in runs) / max(1, len(records)))
        print("| app | requests | req/s | mean ms | p50 ms | p95 ms | p99 ms | server CPU ms/req | errors |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, (stats, mean, cpu_ms) in table.items():
            print(
                f"| {name} | {stats['requests']} | {stats['throughput']:.0f} | {ms(mean)} "
                f"| {ms(stats['p50'])} "
                f"| {ms(stats['p95'])} | {ms(stats['p99'])} | {cpu_ms:.2f} | {stats['client_errors']} |"
            )
        (poly, poly_mean, poly_cpu), (hand, hand_mean, hand_cpu) = table["polydatum"], table["by hand"]
        print(
            f"\npolydatum's share: {100 * (poly_cpu - hand_cpu) / poly_cpu:.0f}% of the server CPU per "
            f"request, {100 * (poly_mean - hand_mean) / poly_mean:.0f}% of the mean request time "
            f"(req/s {poly['throughput'] / hand['throughput']:.2f}x the hand-written app's)"
        )


def py_spy(pid: int, output: Path, seconds: float, fmt: str) -> subprocess.Popen[bytes]:
    """``py-spy record`` of gunicorn ``pid`` and its workers, for ``seconds``, in the background."""
    return subprocess.Popen(
        [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--nonblocking",
            "--duration",
            str(int(seconds)),
            "--format",
            fmt,
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


#: polydatum's parts, by the file a sampled frame is in.
PARTS = {
    "context.py": "context",
    "dal.py": "DAL calls",
    "_commands.py": "DAL calls",
    "services.py": "DAL calls",
    "middleware.py": "method middleware",
    "_stack.py": "method middleware",
    "resources.py": "resources",
    "_factories.py": "resources",
    "_wiring.py": "resources",
    "werkzeug.py": "web middleware",
    "asgi.py": "web middleware",
    "_web.py": "web middleware",
}


FOLDERS = {
    "cache": "cache",
    "blob": "blob bookkeeping",
    "outbox": "outbox",
    "sqlalchemy": "SQL (Store, Database)",
}


def attribute(raw: Path) -> tuple[int, Counter[str]]:
    """Samples in all, and samples whose innermost polydatum or notes frame is in each part.

    A sample counts for polydatum's part when the nearest project frame
    above it (the leaf first) is in polydatum: its own code and the library
    calls it makes; work the example's own code asked for counts for
    "example code".
    """
    total, parts = 0, Counter[str]()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        if stack.rpartition(";")[2].rpartition("(")[2].startswith("polydatum/"):
            parts["(polydatum's own lines: leaf frames)"] += n
        for frame in reversed(stack.split(";")):
            # py-spy names files relative to their sys.path entry: "polydatum/dal.py:120)".
            where = frame.rpartition("(")[2].split(":", 1)[0]
            if where.startswith("polydatum/"):
                path = where.removeprefix("polydatum/")
                folder, _, name = path.rpartition("/")
                parts[FOLDERS.get(folder) or PARTS.get(name, name.removesuffix(".py"))] += n
                break
            if where.startswith(("notes/", "twin/")):
                parts["example code" if where.startswith("notes/") else "twin code"] += n
                break
    return total, parts


def part_twin(
    servers: Servers, clients: int, compare: float, rounds: int, profile: bool = False, asgi: bool = False
) -> None:
    """The example against its feature-equal hand-written twin, interleaved in rounds, same servers.

    With ``asgi``: the example's FastAPI entry point (notes.asgi) against the
    FastAPI twin (benchmarks/twin/asgi.py), both under uvicorn.
    """
    with running_app(servers, twin=True, asgi=asgi) as app:
        pool = os.environ.get("LOAD_ASGI_THREADS") or "40"
        server = (
            f"uvicorn ({WORKERS} workers x {pool} threads in FastAPI's pool), notes.asgi vs twin.asgi"
            if asgi
            else f"gunicorn ({WORKERS} workers x {THREADS} threads)"
        )
        print(
            f"\n## polydatum vs the hand-written twin (benchmarks/twin): {rounds} interleaved rounds of "
            f"{compare:.0f} s each, {clients} clients, {server}, "
            f"PostgreSQL, Redis, S3 (moto), Celery {'worker' if servers.celery else 'eager'}\n"
        )
        loads = {
            "polydatum": Load(app.poly.url, clients, timeout=60),
            "twin": Load(app.twin.url, clients, timeout=60),
        }
        for load in loads.values():
            load.setup()
            load.run(min(2.0, compare))  # warm-up: connections, imports, caches
        servers_of = {"polydatum": app.poly, "twin": app.twin}
        results: dict[str, list[tuple[list[Any], float]]] = {k: [] for k in loads}
        usage = {k: [0.0, 0.0, 0.0, 0.0] for k in loads}
        for i in range(rounds):
            order = list(loads) if i % 2 == 0 else list(reversed(loads))
            for name in order:
                since = time.monotonic()
                before = servers_of[name].cpu()
                counts = servers_of[name].usage()
                loads[name].run(compare)
                used = servers_of[name].cpu() - before
                after = servers_of[name].usage()
                usage[name] = [u + b - a for u, a, b in zip(usage[name], counts, after, strict=True)]
                results[name].append(([r for r in loads[name].records if r.start >= since], used))
        table = {}
        print("| app | requests | req/s | p50 ms | p95 ms | p99 ms | server CPU ms/req | errors |")
        print("|---|---|---|---|---|---|---|---|")
        for name, runs in results.items():
            records = [r for rs, _ in runs for r in rs]
            stats = summarize(records)
            stats["throughput"] = len(records) / (compare * rounds)  # the rounds are not contiguous
            stats["cpu"] = 1000 * sum(c for _, c in runs) / max(1, len(records))
            table[name] = stats
            print(
                f"| {name} | {stats['requests']} | {stats['throughput']:.0f} | {ms(stats['p50'])} "
                f"| {ms(stats['p95'])} | {ms(stats['p99'])} | {stats['cpu']:.2f} | {stats['client_errors']} |"
            )
        print("\n| app | user CPU ms/req | system CPU ms/req | voluntary switches/req | involuntary/req |")
        print("|---|---|---|---|---|")
        for name, (user, system, voluntary, involuntary) in usage.items():
            n = max(1, table[name]["requests"])
            print(
                f"| {name} | {1000 * user / n:.2f} | {1000 * system / n:.2f} | {voluntary / n:.1f} "
                f"| {involuntary / n:.1f} |"
            )
        poly, twin = table["polydatum"], table["twin"]
        print_round_ratios(results, compare)
        print(
            f"\nRatios polydatum/twin: req/s {poly['throughput'] / twin['throughput']:.2f}, "
            f"p50 {poly['p50'] / twin['p50']:.2f}, p95 {poly['p95'] / twin['p95']:.2f}, "
            f"p99 {poly['p99'] / twin['p99']:.2f}, server CPU per request {poly['cpu'] / twin['cpu']:.2f}"
        )
        if profile:
            profile_twin(loads, servers_of, compare, table, suffix="-asgi" if asgi else "")
        print(
            f"polydatum/twin: throughput {poly['throughput'] / twin['throughput']:.2f}, "
            f"p99 {poly['p99'] / twin['p99']:.2f}"
        )


def print_round_ratios(results: dict[str, list[tuple[list[Any], float]]], seconds: float) -> None:
    """Each round's pair (the two apps back to back, a minute apart at most) as ratios, and their median.

    The machine's speed drifts over a run (the database grows, a neighbour
    wakes up), and a pair of adjacent windows shares that drift where the
    pooled figures do not: the median of the rounds' ratios is the steadier
    answer, the spread shows how far one round can be trusted.
    """
    rows = []
    for i, ((poly, poly_cpu), (twin, twin_cpu)) in enumerate(
        zip(results["polydatum"], results["twin"], strict=True), 1
    ):
        if not poly or not twin:
            continue
        p, t = summarize(poly), summarize(twin)
        rows.append(
            (
                i,
                len(poly) / len(twin),
                p["p99"] / t["p99"],
                (poly_cpu / len(poly)) / (twin_cpu / len(twin)) if twin_cpu else float("nan"),
            )
        )
    if not rows:
        return
    print("\n| round | req/s polydatum/twin | p99 polydatum/twin | CPU per request polydatum/twin |")
    print("|---|---|---|---|")
    for i, throughput, p99, cpu in rows:
        print(f"| {i} | {throughput:.2f} | {p99:.2f} | {cpu:.2f} |")
    medians = [statistics.median(r[k] for r in rows) for k in (1, 2, 3)]
    print(
        f"| median of {len(rows)} | {medians[0]:.2f} | {medians[1]:.2f} | {medians[2]:.2f} |"
        f" (each round {seconds:.0f} s per app)"
    )


def profile_twin(
    loads: dict[str, Load],
    servers_of: dict[str, Gunicorn],
    seconds: float,
    table: dict[str, Any],
    suffix: str = "",
) -> None:
    """py-spy under the same load: a flame graph of each app into docs/, and where polydatum's CPU goes."""
    print(f"\n## Profile (py-spy, {seconds:.0f} s of load per app and per recording)\n")
    samples: dict[str, tuple[int, Counter[str]]] = {}
    for name, load in loads.items():
        pid = servers_of[name].proc.pid  # type: ignore[union-attr]
        for fmt in ("flamegraph", "raw"):
            kind = "svg" if fmt == "flamegraph" else "txt"
            output = (
                (REPO / "docs" / f"twin-flame-{name}{suffix}.svg")
                if fmt == "flamegraph"
                else LOGS / f"{name}.{kind}"
            )
            spy = py_spy(pid, output, seconds, fmt)
            load.run(seconds)
            spy.wait(seconds + 60)
        samples[name] = attribute(LOGS / f"{name}.txt")
        print(f"{name}: flame graph docs/twin-flame-{name}{suffix}.svg, {samples[name][0]} samples")
    total, parts = samples["polydatum"]
    cpu = table["polydatum"]["cpu"]
    print("\n| where (example's workers) | share of samples | ≈ CPU ms per request |\n|---|---|---|")
    for part, n in parts.most_common():
        print(f"| {part} | {100 * n / max(1, total):.1f}% | {cpu * n / max(1, total):.2f} |")


def print_audit(report: AuditReport) -> None:
    print(
        f"\nAudit: {report.acked_writes} acknowledged writes, {report.lost_writes} lost, "
        f"{report.duplicates} duplicated, {report.refused_present} refused-but-kept, {report.in_doubt} in "
        f"doubt (5xx/no answer; {report.in_doubt_committed} committed anyway), "
        f"{report.missing_blobs} missing "
        f"blobs, {report.orphans} orphans ({report.orphans_swept} swept), {report.pg_connections} database "
        f"sessions ({report.pg_busy} busy), {report.redis_clients} Redis clients, "
        f"{report.leaked_connections} leaked connections, {report.leaked_fds} leaked fds, "
        f"{report.leaked_threads} leaked threads: {'PASS' if not report.problems else 'FAIL'}"
    )
    for problem in report.problems[:20]:
        print(f"  - {problem}")


def part_faults(servers: Servers, clients: int, duration: float) -> bool:
    print(
        f"\n## Faults: {clients} clients for {duration:.0f} s each, the fault after "
        f"{duration / 4:.0f} s (gunicorn {WORKERS} workers)\n"
    )

    def slow(app: Any) -> Fault:
        route = SlowRoute(app.poly.url, seconds=STATEMENT_TIMEOUT_MS / 1000 * 2)
        app.slow = route
        return FAULTS["slow-query"](route, calls=5)

    scenarios: list[tuple[str, Callable[[Any], Fault]]] = [
        ("none", lambda app: Fault("none", lambda: None)),
        ("postgres-restart", lambda app: FAULTS["postgres-restart"](servers.pg)),
        ("redis-restart", lambda app: FAULTS["redis-restart"](servers.redis, down=3.0)),
        ("s3-down", lambda app: FAULTS["s3-down"](servers.proxy, down=5.0)),
        ("pg-terminate", lambda app: FAULTS["pg-terminate"](app.database_url, rounds=3, interval=1.0)),
        ("slow-query", slow),
    ]
    rows = []
    ok = True
    for name, make in scenarios:
        with running_app(servers, slow_route=name == "slow-query") as app:
            load = Load(app.poly.url, clients, timeout=60).setup()
            baseline = [ProcessSnapshot.take(pid, app.ports) for pid in app.poly.workers()]
            fault = make(app)
            fault.before = duration / 4
            load.run(duration, during=fault.inject)
            recovered = load.check_recovered()
            recover = time_to_recover(load.records, fault.repaired)
            report = run_audit(app, load, baseline)
            behind = index_lag(app.database_url)
            stats = summarize(load.records)
            not_recovered = [f"{r.op} {r.error}" for r in recovered if r.outcome != "acked"]
            extra = ""
            if name == "slow-query":
                slow_statuses = sorted({r.status or 0 for r in app.slow.records})
                kept = app.slow.committed(app.database_url)
                extra = f"; slow requests answered {slow_statuses}, {kept} kept"
            passed = not report.problems
            ok &= passed
            rows.append((name, stats, report, recover, behind, passed, not_recovered))
            print(
                f"{name}: audit {'PASS' if passed else 'FAIL'}; errors {stats['errors'] or 'none'}{extra}",
                flush=True,
            )
            if not_recovered:
                print(
                    f"  the requests right after the load (one of each per user) did not all succeed: "
                    f"{not_recovered}; see {LOGS}/polydatum.log"
                )
            for problem in report.problems[:10]:
                print(f"  - {problem}")
    print(
        "\n| scenario | requests | acked writes | lost writes | errors seen by clients | in doubt "
        "(committed) | orphans swept | time to recover | next requests | leaked connections | index behind "
        "| audit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, stats, report, recover, behind, passed, not_recovered in rows:
        after = "all ok" if not not_recovered else f"{len(not_recovered)} failed"
        rec = "n/a" if recover is None else f"{recover:.2f} s"
        print(
            f"| {name} | {stats['requests']} | {report.acked_writes} | {report.lost_writes} | "
            f"{stats['client_errors']} | {report.in_doubt} ({report.in_doubt_committed}) | "
            f"{report.orphans_swept}/{report.orphans} | {rec} | {after} | {report.leaked_connections} | "
            f"{behind} | "
            f"{'pass' if passed else 'FAIL'} |"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    global WORKERS  # read by the server classes as they start
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 clients, 8 s: a quick look")
    parser.add_argument("--clients", type=int, help="concurrent clients (default 50; 10 with --quick)")
    parser.add_argument("--duration", type=float, help="seconds of load (default 60; 8 with --quick)")
    parser.add_argument("--faults", action="store_true", help="also run every fault scenario under load")
    parser.add_argument("--faults-only", action="store_true", help="only the fault scenarios")
    parser.add_argument("--no-celery", action="store_true", help="Celery eager instead of a real worker")
    parser.add_argument(
        "--twin",
        action="store_true",
        help="only the example against its hand-written twin (benchmarks/twin), interleaved rounds",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="with --twin: py-spy flame graphs of both apps into docs/ and where polydatum's CPU goes",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="with --twin: interleaved rounds of 10 s per app (default 4; 2 with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="with --asgi: FastAPI's thread pool size per worker (default: anyio's 40)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=WORKERS,
        help=f"server worker processes per app (default {WORKERS})",
    )
    parser.add_argument(
        "--asgi",
        action="store_true",
        help="with --twin: the example's FastAPI entry point and the FastAPI twin, under uvicorn",
    )
    args = parser.parse_args(argv)
    WORKERS = args.workers
    clients = args.clients or (10 if args.quick else 50)
    duration = args.duration or (8.0 if args.quick else 60.0)
    compare, rounds = (4.0, 2) if args.quick else (10.0, 4)
    if args.rounds < 0:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    rounds = args.rounds or rounds
    print(f"# benchmarks/load.py (logs of the servers: {LOGS})")
    ok = True
    with ExitStack() as stack:
        servers = Servers(stack, celery=not args.no_celery)
        if args.twin:
            if not servers.celery:
                print("the twin sends its jobs to RabbitMQ: start it on 127.0.0.1:5672 (no --no-celery)")
                return 1
            if args.threads:
                os.environ["LOAD_ASGI_THREADS"] = str(args.threads)  # read by load_apps in each worker
            part_twin(servers, clients, compare, rounds, profile=args.profile, asgi=args.asgi)
            return 0
        if not args.faults_only:
            part_load(servers, clients, duration, compare, rounds)
        if args.faults or args.faults_only:
            fault_duration = min(duration, 8.0) if args.quick else max(10.0, duration / 3)
            ok = part_faults(servers, clients, fault_duration)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

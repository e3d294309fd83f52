"""polydatum.celery against plain Celery: µs per task run and per send, and the overhead.

Run: .venv/bin/python benchmarks/celery_tasks.py [--quick]
(Not named celery.py: run as a script, that would shadow the celery package.)

1. Running a task: ``task.apply()`` of a task that does nothing (Celery's
   whole tracer, in this process), plain Celery vs a polydatum task, whose
   run opens and closes a context with task meta (empty DataManager), and
   one whose DataManager has a SQLite ``Database`` installed but untouched
   (its transaction middleware runs; no connection is checked out).
2. Sending a task to the real RabbitMQ on 127.0.0.1:5672, one context per
   send: plain ``delay()`` inside ``with dm.context():`` (sent at once), the
   polydatum task sent on commit (hook, arguments checked at the call, send
   at commit), and with ``polydatum_immediate=True``. Messages go to a queue
   of this run's own, deleted at the end.

Times are CPU time of this process (``time.process_time``), not wall time:
on a shared machine other processes' load then barely moves them, and what
polydatum adds is CPU work in the caller. (For sends, the broker round trip
is thus left out; it is the same for every variant.) Variants are
interleaved in short rounds; the overhead is the median of the per-round
ratios to the baseline.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from celery import Celery

from polydatum import DataManager
from polydatum.celery import install
from polydatum.sqlalchemy import Database

QUICK = "--quick" in sys.argv
ROUNDS = 5 if QUICK else 15
BROKER = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def measure(variants: dict[str, Callable[[], object]], loops: int, baseline: str) -> None:
    """Run every variant once per round in a rotating order; print µs/op and the median ratio."""
    for fn in variants.values():
        fn()  # warm up: connections, caches
    micros: dict[str, list[float]] = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_number in range(ROUNDS):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            fn = variants[name]
            start = time.process_time()
            for _ in range(loops):
                fn()
            micros[name].append((time.process_time() - start) / loops * 1e6)
        for name in names:
            ratios[name].append(micros[name][-1] / micros[baseline][-1])
    for name in names:
        print(
            f"  {name:<46} {statistics.median(micros[name]):9.1f} µs CPU   "
            f"{statistics.median(ratios[name]):5.2f}x"
        )


def app(name: str, queue: str, dm: DataManager | None = None) -> Celery:
    made = Celery(name, broker=BROKER, set_as_current=False)
    made.conf.update(
        task_default_queue=queue, task_ignore_result=True, broker_connection_retry_on_startup=True
    )
    if dm is not None:
        install(made, dm)
    return made


def main() -> None:
    queue = f"polydatum-bench-celery-{uuid.uuid4().hex[:8]}"
    plain_app = app("bench_plain", queue)
    empty_dm = DataManager()
    polydatum_app = app("bench_polydatum", queue, empty_dm)
    sql_dm = DataManager()
    workdir = tempfile.mkdtemp()
    db = Database(f"sqlite:///{os.path.join(workdir, 'bench.db')}").install(sql_dm)
    sql_app = app("bench_polydatum_sql", queue, sql_dm)

    @plain_app.task(name="bench.plain")
    def plain(x: int) -> int:
        return x

    @polydatum_app.task(name="bench.polydatum")
    def in_context(x: int) -> int:
        return x

    @sql_app.task(name="bench.polydatum_sql")
    def in_sql_context(x: int) -> int:
        return x

    print(f"1. task.apply() of a no-op task ({ROUNDS} rounds)")
    measure(
        {
            "plain Celery task": lambda: plain.apply((1,)),
            "polydatum task (context per run)": lambda: in_context.apply((1,)),
            "polydatum task, SQLite Database installed": lambda: in_sql_context.apply((1,)),
        },
        loops=200 if QUICK else 1000,
        baseline="plain Celery task",
    )

    def plain_send() -> None:
        with empty_dm.context():
            plain.delay(1)

    def send_on_commit() -> None:
        with empty_dm.context():
            in_context.delay(1)

    def send_immediately() -> None:
        with empty_dm.context():
            in_context.apply_async((1,), polydatum_immediate=True)

    print(f"2. send to RabbitMQ, one context per send ({ROUNDS} rounds)")
    try:
        measure(
            {
                "plain delay() in a context": plain_send,
                "polydatum delay(), sent on commit": send_on_commit,
                "polydatum apply_async(polydatum_immediate=True)": send_immediately,
            },
            loops=50 if QUICK else 200,
            baseline="plain delay() in a context",
        )
    finally:
        with plain_app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        for made in (plain_app, polydatum_app, sql_app):
            made.close()
        db.dispose()


if __name__ == "__main__":
    main()

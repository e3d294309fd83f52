"""CPU per request of the notes example and its hand-written twin, in one process, without HTTP.

Run: .venv/bin/python benchmarks/twin_cpu.py [--threads 8] [--rounds 6] [--requests 400]
     (DATABASE_URL, REDIS_URL and RABBITMQ_URL override the local servers; S3 is a moto server
     started here)

``load.py --twin`` measures the two apps under gunicorn, where the clients,
the servers and both apps share the machine's cores and each figure moves
by 10-20 % from run to run. This takes the servers' and the HTTP layer's
share out: both apps are built in this process, each on a fresh database,
cache namespace, bucket and queue, and each round runs the scripted
session of tests/load/twin_session.py (``--requests`` requests, in
``--threads`` threads at once, each with users of its own) against one app,
then the other (the order flips every round). The figure is the process's
CPU time (all threads: the requests and the apps' background threads)
per request, the garbage collector's share of it, and per round the ratio
example/twin; the last line is the median of those ratios.

Both apps share the process, so a collection started by one app's garbage
also walks the other's objects: the collector's share is printed so a
difference there shows.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks", REPO / "examples" / "notes"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from tests.load import twin_session  # noqa: E402
from tests.support.s3 import REGION, MotoServer  # noqa: E402
from tests.support.sql import fresh_postgres_database  # noqa: E402

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Collector:
    """The garbage collector's time, from its callbacks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


def environment(stack: ExitStack, moto: MotoServer) -> dict[str, str]:
    """A fresh database, cache namespace, bucket and queue for one app."""
    run = uuid.uuid4().hex[:10]
    return {
        "DATABASE_URL": stack.enter_context(fresh_postgres_database(DATABASE_URL)),
        "REDIS_URL": REDIS_URL,
        "CACHE_NAMESPACE": f"twin-cpu-{run}",
        "BLOB_URL": f"s3://{moto.create_bucket(f'twin-cpu-{run}')}/notes-app",
        "AWS_ENDPOINT_URL": moto.endpoint_url,
        "CELERY_BROKER_URL": RABBITMQ_URL,
        "CELERY_QUEUE": f"twin-cpu-{run}",
    }


def build_example(stack: ExitStack, env: dict[str, str]) -> Any:
    from notes import Settings, build

    app = build(Settings.from_env(env))
    stack.callback(app.close)
    app.create_tables()
    stack.callback(_delete_queue, env, app.celery)
    stack.callback(app.cache.clear)
    return app.wsgi()


def build_twin(stack: ExitStack, env: dict[str, str]) -> Any:
    import twin
    from twin.models import Base

    app = twin.wsgi(env)
    stack.callback(app.r.close)
    Base.metadata.create_all(app.r.engine)
    stack.callback(_delete_queue, env, app.r.celery)
    stack.callback(_clear_namespace, app.r.redis, env["CACHE_NAMESPACE"])
    return app


def _delete_queue(env: dict[str, str], celery: Any) -> None:
    with celery.connection_for_write() as conn:
        conn.default_channel.queue_delete(env["CELERY_QUEUE"])


def _clear_namespace(client: Any, namespace: str) -> None:
    for key in client.scan_iter(match=f"{namespace}:*"):
        client.delete(key)


# Each session signs up its users; a suffix per thread and round keeps the names free.
_suffix = threading.local()
_sign_up = twin_session.Session.sign_up


def _own_users(self: twin_session.Session, name: str) -> None:
    _sign_up(self, name + getattr(_suffix, "value", ""))


def run_round(app: Any, threads: int, requests: int, tag: str) -> None:
    def session(n: int) -> None:
        _suffix.value = f"-{tag}-{n}"
        twin_session.run_session(app, requests=requests)

    workers = [threading.Thread(target=session, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=8, help="sessions at once (default 8)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per app (default 6)")
    parser.add_argument("--requests", type=int, default=400, help="requests per session (default 400)")
    args = parser.parse_args(argv)
    for name in ("threads", "rounds", "requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", REGION),
    ):
        os.environ.setdefault(name, value)
    twin_session.Session.sign_up = _own_users  # type: ignore[method-assign]
    moto = MotoServer().start()
    collector = Collector()
    cpu: dict[str, list[float]] = {"example": [], "twin": []}
    collected: dict[str, float] = {"example": 0.0, "twin": 0.0}
    try:
        with ExitStack() as stack:
            builders: dict[str, Callable[[ExitStack, dict[str, str]], Any]] = {
                "example": build_example,
                "twin": build_twin,
            }
            apps = {name: build(stack, environment(stack, moto)) for name, build in builders.items()}
            for name, app in apps.items():
                run_round(app, args.threads, min(args.requests, 100), f"warm-{name}")
            for i in range(args.rounds):
                order = list(apps) if i % 2 == 0 else list(reversed(apps))
                for name in order:
                    gc.collect()
                    before, collector_before = cpu_seconds(), collector.seconds
                    run_round(apps[name], args.threads, args.requests, f"{i}")
                    served = args.threads * args.requests
                    cpu[name].append(1000 * (cpu_seconds() - before) / served)
                    collected[name] += 1000 * (collector.seconds - collector_before) / served
    finally:
        moto.stop()
    print(
        f"# benchmarks/twin_cpu.py: {args.rounds} rounds per app, {args.threads} threads x "
        f"{args.requests} requests each, one process\n"
    )
    print("| round | example CPU ms/req | twin CPU ms/req | example/twin |\n|---|---|---|---|")
    ratios = []
    for i, (e, t) in enumerate(zip(cpu["example"], cpu["twin"], strict=True), 1):
        ratios.append(e / t)
        print(f"| {i} | {e:.2f} | {t:.2f} | {e / t:.2f} |")
    print(
        f"\ngarbage collector, ms per request: example {collected['example'] / args.rounds:.3f}, "
        f"twin {collected['twin'] / args.rounds:.3f}"
    )
    print(
        f"example/twin CPU per request: median {statistics.median(ratios):.2f} "
        f"(lowest {min(ratios):.2f}, highest {max(ratios):.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""polydatum's cache on Redis: what a hit costs, and what a cached DAL method saves.

Run: .venv/bin/python benchmarks/cache.py [--quick]
     (REDIS_URL and DATABASE_URL override 127.0.0.1:6379 and :5432)

1. ``Cache.get`` hit vs hand-written redis-py ``client.get`` + ``json.loads``
   on the same pool and value, bare, and inside a context (``ctx.cache.get``
   vs ``ctx.redis.get``: a per-context resource each). Target: <= 10 %.
2. A ``cached`` DAL method, one context per call as a request would do:
   - the uncached method: an aggregate (GROUP BY over 5,000 rows) on
     PostgreSQL through the polydatum.sqlalchemy session resource;
   - the same method ``@cached``, served from Redis (the speed-up);
   - a context doing a hand-written ``client.get`` + ``json.loads`` of the
     same entry: the least a Redis hit can cost, so ``cached()``'s own
     overhead shows;
   - the same pair for a primary-key read, which a warm PostgreSQL serves
     about as fast as Redis: caching it buys nothing.
Rounds are short and interleaved (the order flips every round); ratios are
the median of each round's ratio, which keeps the machine's drift out.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import redis as redis_py
from sqlalchemy import text

from polydatum import DataManager, Service
from polydatum.cache import cached
from polydatum.redis import Redis
from polydatum.sqlalchemy import Database

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
QUICK = "--quick" in sys.argv
OPS = 200 if QUICK else 250
ROUNDS = 8 if QUICK else 60
TABLE = f"bench_cache_orders_{os.getpid()}"  # this process's own: runs never collide
ROWS = 5000
VALUE = {
    "id": 1,
    "name": "Ada Lovelace",
    "email": "ada@example.com",
    "active": True,
    "roles": ["admin", "author"],
    "score": 97.5,
}


def round_us(fn: Callable[[], Any], n: int = OPS) -> tuple[float, float]:
    """Wall-clock and CPU (this process only) µs per call of one round."""
    gc.collect()
    cpu = time.process_time_ns()
    start = time.perf_counter_ns()
    for _ in range(n):
        fn()
    wall = time.perf_counter_ns() - start
    return wall / n / 1000, (time.process_time_ns() - cpu) / n / 1000


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


Runs = dict[str, tuple[list[float], list[float]]]


def measure(cases: dict[str, Callable[[], Any]]) -> Runs:
    """Wall and CPU µs/op of every case in each of ROUNDS interleaved rounds."""
    runs: Runs = {name: ([], []) for name in cases}
    items = list(cases.items())
    for _, fn in items:
        round_us(fn, 100)  # warm up pools, statement caches, scripts
    for i in range(ROUNDS):
        for name, fn in items if i % 2 else items[::-1]:
            wall, cpu = round_us(fn)
            runs[name][0].append(wall)
            runs[name][1].append(cpu)
    return runs


def ratio(runs: Runs, name: str, base: str, kind: int = 0) -> float:
    """Median over rounds of each round's ratio (kind 0: wall, 1: CPU)."""
    return median([a / b for a, b in zip(runs[name][kind], runs[base][kind], strict=True)])


def line(runs: Runs, name: str, label: str, base: str | None = None, what: str = "") -> None:
    wall, cpu = median(runs[name][0]), median(runs[name][1])
    note = ""
    if base is not None:
        w, c = ratio(runs, name, base), ratio(runs, name, base, 1)
        if what == "speed-up":
            note = f"speed-up x{1 / w:.1f} wall, x{1 / c:.1f} CPU"
        else:
            note = f"{what} {100 * (w - 1):+.1f}% wall, {100 * (c - 1):+.1f}% CPU"
    print(f"   {label:<42}{wall:>8.1f} µs wall {cpu:>7.1f} µs CPU   {note}")


def cache_get_benchmark() -> None:
    redis = Redis(REDIS_URL)
    cache = redis.cache(namespace=f"bench-{os.getpid()}")
    cache.set("user:1", VALUE)
    client = redis_py.Redis(connection_pool=redis.pool)
    raw_key = f"bench-{os.getpid()}:raw:user:1"
    client.set(raw_key, json.dumps(VALUE))
    assert cache.get("user:1") == json.loads(client.get(raw_key))  # type: ignore[arg-type]
    dm = DataManager()
    redis.install(dm, name="redis")
    cache.install(dm, name="cache")

    def raw() -> Any:
        return json.loads(client.get(raw_key))  # type: ignore[arg-type]

    def ours() -> Any:
        return cache.get("user:1")

    def raw_ctx() -> Any:
        # Like for like: a per-context resource each (the client, the cache).
        with dm.context() as ctx:
            return json.loads(ctx.redis.get(raw_key))

    def ours_ctx() -> Any:
        with dm.context() as ctx:
            return ctx.cache.get("user:1")

    runs = measure({"raw": raw, "ours": ours, "raw_ctx": raw_ctx, "ours_ctx": ours_ctx})
    print(f"1. Cache.get hit vs redis-py get + json.loads ({ROUNDS} rounds x {OPS} ops)")
    line(runs, "raw", "redis-py client.get + json.loads")
    line(runs, "ours", "Cache.get", "raw", "overhead")
    line(runs, "raw_ctx", "context + ctx.redis.get + json.loads")
    line(runs, "ours_ctx", "context + ctx.cache.get", "raw_ctx", "overhead")
    cache.clear()
    client.delete(raw_key)
    redis.close()


TOTALS = text(
    f"SELECT status, count(*), sum(amount), avg(amount), max(placed) FROM {TABLE} "
    "GROUP BY status ORDER BY status"
)
BY_ID = text(f"SELECT id, status, amount FROM {TABLE} WHERE id = :id")


class Orders(Service):
    """The same two reads, plain and cached."""

    def totals(self) -> list[list[Any]]:
        rows = self._ctx.db.execute(TOTALS).all()
        return [[s, n, str(total), str(avg), placed.isoformat()] for s, n, total, avg, placed in rows]

    @cached(ttl=300, key="orders:totals")
    def cached_totals(self) -> list[list[Any]]:
        return self.totals()

    def get(self, order_id: int) -> list[Any] | None:
        row = self._ctx.db.execute(BY_ID, {"id": order_id}).one_or_none()
        return None if row is None else [row[0], row[1], str(row[2])]

    @cached(ttl=300, key="orders:{order_id}")
    def cached_get(self, order_id: int) -> list[Any] | None:
        return self.get(order_id)


def cached_method_benchmark() -> None:
    db = Database(DATABASE_URL)
    with db.engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE {TABLE} (id int PRIMARY KEY, status text NOT NULL, "
                "amount numeric(10, 2) NOT NULL, placed timestamptz NOT NULL)"
            )
        )
        conn.execute(
            text(
                f"INSERT INTO {TABLE} SELECT i, (ARRAY['new','paid','shipped','returned'])[i % 4 + 1], "
                f"(i % 997) * 1.25, now() - i * interval '1 minute' FROM generate_series(1, {ROWS}) i"
            )
        )
        conn.execute(text(f"ANALYZE {TABLE}"))
    redis = Redis(REDIS_URL)
    namespace = f"bench-dal-{os.getpid()}"
    cache = redis.cache(namespace=namespace)
    client = redis_py.Redis(connection_pool=redis.pool)
    dm = DataManager()
    db.install(dm)
    cache.install(dm, name="cache")
    dm.register_services(orders=Orders())
    try:
        with dm.dal() as dal:
            assert dal.orders.cached_totals() == dal.orders.totals()
            assert dal.orders.cached_get(7) == dal.orders.get(7)
        prefix = cache.key("")

        def by_hand(key: str) -> Callable[[], Any]:
            full = prefix + key

            def hit() -> Any:
                with dm.context():
                    # The entry is [fresh_until, value] after a one-byte tag.
                    return json.loads(client.get(full)[1:])[1]  # type: ignore[index]

            return hit

        def call(method: str, *args: Any) -> Callable[[], Any]:
            def run() -> Any:
                with dm.dal() as dal:
                    return getattr(dal.orders, method)(*args)

            return run

        runs = measure(
            {
                "agg": call("totals"),
                "agg_cached": call("cached_totals"),
                "agg_hand": by_hand("orders:totals"),
                "pk": call("get", 7),
                "pk_cached": call("cached_get", 7),
                "pk_hand": by_hand("orders:7"),
            }
        )
    finally:
        cache.clear()
        redis.close()
        with db.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {TABLE}"))
        db.dispose()

    print(f"2. a cached DAL method, one context per call ({ROUNDS} rounds x {OPS} ops)")
    print(f"   aggregate: GROUP BY over {ROWS:,} rows")
    line(runs, "agg", "uncached: PostgreSQL via ctx.db")
    line(runs, "agg_hand", "context + hand-written GET + json.loads")
    line(runs, "agg_cached", "@cached hit (Redis)", "agg", "speed-up")
    line(runs, "agg_cached", "  the same hit vs the hand-written GET", "agg_hand", "cached() adds")
    print("   primary-key read")
    line(runs, "pk", "uncached: PostgreSQL via ctx.db")
    line(runs, "pk_hand", "context + hand-written GET + json.loads")
    line(runs, "pk_cached", "@cached hit (Redis)", "pk", "speed-up")
    line(runs, "pk_cached", "  the same hit vs the hand-written GET", "pk_hand", "cached() adds")


if __name__ == "__main__":
    cache_get_benchmark()
    cached_method_benchmark()

"""A cache hit on a Redis Cluster vs on one Redis server, in the same run.

Run: .venv/bin/python benchmarks/scale_redis.py [--quick]

Starts a private redis-server and a private Redis Cluster (3 primaries, 3
replicas, tests/support/redis_rigs.py) on loopback, stores one entry in each,
and times, in short interleaved rounds (order flipped every round):

- ``Cache.get`` hit on the single server (the baseline);
- ``Cache.get`` hit on the cluster (target: <= 1.15x the baseline);
- ``cached()`` DAL method hit, one context per call, on each;
- redis-py's own ``get`` on each (``Redis.get`` / ``RedisCluster.get``), to
  show what the cluster client itself adds.

Ratios are the median of each round's ratio, which keeps the machine's drift out.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polydatum import DataManager, Service
from polydatum.cache import cached
from polydatum.redis import Redis
from tests.support.redis_rigs import RedisClusterRig
from tests.support.servers import PrivateRedis

QUICK = "--quick" in sys.argv
OPS = 200 if QUICK else 300
ROUNDS = 8 if QUICK else 40
VALUE = {"id": 1, "name": "Ada Lovelace", "roles": ["admin", "author"], "score": 97.5}


class Users(Service):
    @cached(ttl=600, key="user:{uid}")
    def get(self, uid: int) -> dict[str, Any]:
        return VALUE


def round_us(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and CPU (this process only) µs per call of one round."""
    gc.collect()
    cpu = time.process_time_ns()
    start = time.perf_counter_ns()
    for _ in range(OPS):
        fn()
    wall = time.perf_counter_ns() - start
    return wall / OPS / 1000, (time.process_time_ns() - cpu) / OPS / 1000


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def app(redis: Redis) -> DataManager:
    dm = DataManager()
    redis.cache(namespace="bench").install(dm)
    dm.register_services(users=Users())
    return dm


def main() -> None:
    single = PrivateRedis().start()
    cluster = RedisClusterRig().start()
    try:
        one, many = Redis(single.url), Redis(cluster.url)
        caches = {"single": one.cache(namespace="bench"), "cluster": many.cache(namespace="bench")}
        for cache in caches.values():
            cache.set("user", VALUE)
        dms = {"single": app(one), "cluster": app(many)}
        for dm in dms.values():
            with dm.dal() as dal:
                dal.users.get(1)  # warm the entry

        def dal_hit(dm: DataManager) -> Callable[[], Any]:
            def call() -> Any:
                with dm.dal() as dal:
                    return dal.users.get(1)

            return call

        key = caches["single"].key("user")
        raw_one, raw_many = one.client(), many.client()
        cases: dict[str, Callable[[], Any]] = {
            "Cache.get hit, single": lambda: caches["single"].get("user"),
            "Cache.get hit, cluster": lambda: caches["cluster"].get("user"),
            "cached() DAL hit, single": dal_hit(dms["single"]),
            "cached() DAL hit, cluster": dal_hit(dms["cluster"]),
            "redis-py get, single": lambda: raw_one.get(key),
            "redis-py get, cluster": lambda: raw_many.get(key),
        }
        for fn in cases.values():  # warm up
            round_us(fn)
        walls: dict[str, list[float]] = {name: [] for name in cases}
        cpus: dict[str, list[float]] = {name: [] for name in cases}
        items = list(cases.items())
        for i in range(ROUNDS):
            for name, fn in items if i % 2 == 0 else reversed(items):
                wall, cpu = round_us(fn)
                walls[name].append(wall)
                cpus[name].append(cpu)
        print(f"{ROUNDS} rounds of {OPS} ops; µs per op (median of rounds): wall, CPU of this process")
        for name in cases:
            print(f"  {name:28s} {median(walls[name]):8.1f} µs  {median(cpus[name]):8.1f} µs CPU")
        print("ratio cluster/single (median of each round's ratio): wall, CPU")
        for what in ("Cache.get hit", "cached() DAL hit", "redis-py get"):
            ratios = []
            for runs in (walls, cpus):
                a, b = runs[f"{what}, cluster"], runs[f"{what}, single"]
                ratios.append(median([x / y for x, y in zip(a, b, strict=True)]))
            print(f"  {what:28s} {ratios[0]:.3f}x  {ratios[1]:.3f}x CPU")
        one.close()
        many.close()
    finally:
        cluster.close()
        single.close()


if __name__ == "__main__":
    main()

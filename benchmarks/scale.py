"""Read replicas: the routing overhead per context, and how reads spread over two replicas.

Run: python benchmarks/scale.py [--quick]

Starts a private PostgreSQL primary with two streaming replicas on loopback
(the test suite's rig: initdb, pg_basebackup -R, pg_ctl; needs Debian's
``postgresql`` package), or uses ``PRIMARY_URL`` and ``REPLICA_URLS``
(comma-separated) when both are set.

Compared, in the same run, interleaved round by round (the order flips
every round):
  primary only    ``Database(primary)``: a context doing one Store.get by primary key
  with replicas   ``Database(primary, replicas=[r1, r2])``: the same context, its read
                  routed to a replica (health cached, checked every 0.5 s)
Both check out one pooled connection (with pre-ping), run one SELECT and
commit, so the difference is the routing: the per-session route, the
replica choice and the health bookkeeping. The overhead is the median over
rounds of each round's difference, in CPU µs (this process only; the
servers' time is not in it) and in wall µs (noisy on a busy machine).

Routing decisions alone, no I/O, so none of the servers' noise: per
context, a session answers ``get_bind`` for three SELECTs (SQLAlchemy's own
``get_bind`` on the primary-only side); the routed one also gets a fresh
route, its ``min_position`` and a replica from the router (health cached,
re-checked every 0.5 s). The session and the connection checkout, the same
on both sides, are left out. The difference is the routing's own CPU cost
per context, the figure the 5 µs target is about.

Spread: contexts that only read, counted per replica that served them
(``inet_server_port()``), sequentially and from 4 threads.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polydatum import DataManager
from polydatum.sqlalchemy import Database, Store
from polydatum.sqlalchemy._replicas import Route, positions_needed

QUICK = "--quick" in sys.argv
OPS = 100 if QUICK else 200
ROUNDS = 10 if QUICK else 40
SPREAD = 400 if QUICK else 2000
TARGET_US = 5.0
TARGET_SPREAD = 10.0


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = f"bench_scale_{os.getpid()}"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Items(Store[Item]):
    pass


def time_us(fn: Callable[[int], object]) -> tuple[float, float]:
    """Wall-clock and CPU µs per operation of one round of ``fn``."""
    gc.collect()
    cpu = time.process_time_ns()
    start = time.perf_counter_ns()
    fn(OPS)
    wall = time.perf_counter_ns() - start
    return wall / OPS / 1000, (time.process_time_ns() - cpu) / OPS / 1000


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def servers() -> tuple[str, list[str], Callable[[], None]]:
    """The primary's URL, the replicas' URLs, and what stops them (nothing when given)."""
    primary, replicas = os.environ.get("PRIMARY_URL"), os.environ.get("REPLICA_URLS")
    if primary and replicas:
        return primary, replicas.split(","), lambda: None
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.support.replication import ReplicatedPostgres

    started = time.monotonic()
    rig = ReplicatedPostgres(replicas=2).start()
    print(f"private primary + 2 replicas started in {time.monotonic() - started:.1f} s")
    return rig.primary.url, [node.url for node in rig.replicas], rig.close


def installed(db: Database) -> DataManager:
    dm = DataManager()
    db.install(dm)
    dm.register_services(items=Items())
    return dm


def overhead(primary: str, replicas: list[str]) -> None:
    plain = Database(primary)
    routed = Database(primary, replicas=replicas)
    try:
        Base.metadata.create_all(plain.engine)
        with plain.session() as session:
            session.add(Item(id=1, name="one"))
            session.commit()
        time.sleep(0.5)  # replayed on the replicas
        cases = {"primary only": installed(plain), "with replicas": installed(routed)}

        def run(dm: DataManager) -> Callable[[int], None]:
            def contexts(n: int) -> None:
                for _ in range(n):
                    with dm.dal() as dal:
                        dal.items.get(1)

            return contexts

        fns = [(name, run(dm)) for name, dm in cases.items()]
        for _, fn in fns:
            fn(200)  # warm the pools and the statement caches
        wall: dict[str, list[float]] = {name: [] for name in cases}
        cpu: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(ROUNDS):
            for name, fn in fns if i % 2 else fns[::-1]:
                w, c = time_us(fn)
                wall[name].append(w)
                cpu[name].append(c)
        Base.metadata.drop_all(plain.engine)
    finally:
        plain.dispose()
        routed.dispose()
    print(f"\none Store.get by primary key per context, {ROUNDS} rounds x {OPS} contexts")
    print(f"{'case':<16}{'wall µs/op':>12}{'CPU µs/op':>12}")
    for name in cases:
        print(f"{name:<16}{median(wall[name]):>12.1f}{median(cpu[name]):>12.1f}")
    extra_cpu = median([r - p for r, p in zip(cpu["with replicas"], cpu["primary only"], strict=True)])
    extra_wall = median([r - p for r, p in zip(wall["with replicas"], wall["primary only"], strict=True)])
    ratio = median([r / p for r, p in zip(cpu["with replicas"], cpu["primary only"], strict=True)])
    verdict = "met" if extra_cpu <= TARGET_US else "MISSED"
    print(
        f"routing overhead: {extra_cpu:+.1f} µs CPU per context (ratio {ratio:.3f}; "
        f"target <= {TARGET_US:.0f} µs: {verdict}); {extra_wall:+.1f} µs wall"
    )


def routing_alone(primary: str, replicas: list[str]) -> None:
    plain = Database(primary)
    # Health checks are paid per second, not per context: measured apart below.
    routed = Database(primary, replicas=replicas, check_interval=3600)
    router = routed.router
    assert router is not None
    query = select(Item).where(Item.id == 1)
    meta = DataManager().context().meta
    plain_session = plain.session()
    routed_session = routed.session()
    route = routed_session.route  # type: ignore[attr-defined]

    def plain_decisions(n: int) -> None:
        get_bind = plain_session.get_bind
        for _ in range(n):
            for _ in range(3):
                get_bind(Item, clause=query)

    def routed_decisions(n: int) -> None:
        get_bind = routed_session.get_bind
        for _ in range(n):
            # What a context's session gets: a fresh route, its min_position,
            # a replica from the router (Route.read_bind minus the checkout).
            routed_session.route = Route(router, routed.engine, routed.engine)
            routed_session.route.minimum = positions_needed(meta, "db")
            routed_session.route.replica = next(router.candidates()).engine
            for _ in range(3):
                get_bind(Item, clause=query)

    fns = [("primary only", plain_decisions), ("with replicas", routed_decisions)]
    cpu: dict[str, list[float]] = {name: [] for name, _ in fns}
    checks: list[float] = []
    try:
        for _, fn in fns:
            fn(200)
        for i in range(ROUNDS * 2):
            for name, fn in fns if i % 2 else fns[::-1]:
                cpu[name].append(time_us(fn)[1])
        for _ in range(ROUNDS):
            started = time.process_time_ns()
            router.check(router.nodes[0], wait=True)
            checks.append((time.process_time_ns() - started) / 1000)
    finally:
        routed_session.route = route
        plain_session.close()
        routed_session.close()
        plain.dispose()
        routed.dispose()
    extra = median([r - p for r, p in zip(cpu["with replicas"], cpu["primary only"], strict=True)])
    verdict = "met" if extra <= TARGET_US else "MISSED"
    what = "route, min_position, replica choice, 3 x get_bind; no I/O"
    print(f"\nrouting decisions per context ({what}), {ROUNDS * 2} rounds x {OPS}")
    for name in cpu:
        print(f"{name:<16}{median(cpu[name]):>12.2f} CPU µs/op")
    print(f"routing overhead: {extra:+.2f} µs CPU per context (target <= {TARGET_US:.0f} µs: {verdict})")
    per_check = median(checks)
    per_second = per_check * len(replicas) / 0.5
    print(
        f"health check: {per_check:.0f} µs CPU each; at check_interval=0.5 s and {len(replicas)} replicas "
        f"{per_second:.0f} µs CPU per second whatever the traffic ({per_second / 1000:.2f} µs per context "
        "at 1000 contexts/s)"
    )


def spread(primary: str, replicas: list[str]) -> None:
    db = Database(primary, replicas=replicas)
    dm = installed(db)
    port_of: dict[int, str] = {}
    for i, url in enumerate(replicas, 1):
        port = Database(url).engine.url.port
        port_of[port or 5432] = f"replica {i}"

    def read(counts: Counter[str], n: int) -> None:
        for _ in range(n):
            with dm.context() as ctx:
                port = ctx.db.execute(select(func.inet_server_port())).scalar_one()
                counts[port_of.get(port, "primary")] += 1

    try:
        print(f"\nreads spread over {len(replicas)} replicas, {SPREAD} read-only contexts")
        sequential: Counter[str] = Counter()
        read(sequential, SPREAD)
        threaded: Counter[str] = Counter()
        lock = threading.Lock()

        def worker() -> None:
            mine: Counter[str] = Counter()
            read(mine, SPREAD // 4)
            with lock:
                threaded.update(mine)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        db.dispose()
    for label, counts in (("sequential", sequential), ("4 threads", threaded)):
        total = sum(counts.values())
        fair = total / len(replicas)
        worst = max(abs(counts[name] - fair) / fair * 100 for name in port_of.values())
        verdict = "met" if worst <= TARGET_SPREAD and counts["primary"] == 0 else "MISSED"
        shares = ", ".join(f"{name} {counts[name]}" for name in sorted(port_of.values()))
        print(
            f"{label:<12}{shares}, primary {counts['primary']}: worst {worst:.1f}% from an even split "
            f"(target <= {TARGET_SPREAD:.0f}%: {verdict})"
        )


def main() -> None:
    primary, replicas, stop = servers()
    try:
        overhead(primary, replicas)
        routing_alone(primary, replicas)
        spread(primary, replicas)
    finally:
        stop()


if __name__ == "__main__":
    main()

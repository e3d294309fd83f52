"""polydatum.sqlalchemy overhead: a context doing one primary-key Store.get on PostgreSQL.

Run: python benchmarks/sql.py [--quick]     (DATABASE_URL overrides the server)

Compared, in the same run and on the same Engine (so the same pool and
``pool_pre_ping``):
  polydatum   ``with dm.dal() as dal: dal.items.get(1)`` (session resource,
              transaction middleware committing, session closed at teardown)
  by hand     ``session = Session(); session.get(Item, 1); session.commit(); session.close()``
A third line shows the hand-written version on an engine without pre-ping,
to tell what the (default-on) pre-ping costs apart from polydatum itself.
Rounds are short and interleaved (the order flips every round); the overhead
is the median over rounds of each round's ratio, which keeps the server's and
the machine's drift out of it. Wall-clock time is what the target is about;
CPU time (this process only, not the server's) shows the client-side cost.
On a busy machine the round-to-round noise is larger than polydatum's own cost.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable

from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from polydatum import DataManager
from polydatum.sqlalchemy import Database, Store

URL = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
QUICK = "--quick" in sys.argv
OPS = 100 if QUICK else 150
ROUNDS = 20 if QUICK else 80


class Base(DeclarativeBase):
    pass


class Item(Base):
    # A table of this process's own, so concurrent runs never collide.
    __tablename__ = f"bench_items_{os.getpid()}"

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


def main() -> None:
    db = Database(URL)
    Base.metadata.create_all(db.engine)
    try:
        with db.session() as session:
            session.add(Item(id=1, name="one"))
            session.commit()
        dm = DataManager()
        db.install(dm)
        dm.register_services(items=Items())

        def with_polydatum(n: int) -> None:
            for _ in range(n):
                with dm.dal() as dal:
                    dal.items.get(1)

        by_hand_sessions = sessionmaker(bind=db.engine)

        def by_hand(n: int) -> None:
            for _ in range(n):
                session = by_hand_sessions()
                session.get(Item, 1)
                session.commit()
                session.close()

        no_ping_engine = create_engine(URL, pool_pre_ping=False)
        no_ping_sessions = sessionmaker(bind=no_ping_engine)

        def by_hand_no_ping(n: int) -> None:
            for _ in range(n):
                session = no_ping_sessions()
                session.get(Item, 1)
                session.commit()
                session.close()

        runs: dict[str, list[float]] = {"polydatum": [], "by hand": [], "by hand, no pre-ping": []}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        cases = list(zip(runs, (with_polydatum, by_hand, by_hand_no_ping), strict=True))
        for _, fn in cases:
            fn(200)  # warm the pool, the statement cache and the identity map code
        for i in range(ROUNDS):
            for name, fn in cases if i % 2 else cases[::-1]:
                wall_us, cpu_us = time_us(fn)
                runs[name].append(wall_us)
                cpu[name].append(cpu_us)
        no_ping_engine.dispose()
    finally:
        Base.metadata.drop_all(db.engine)
        db.dispose()

    print(f"one Store.get by primary key per context, PostgreSQL, {ROUNDS} rounds x {OPS} ops")
    print(f"{'case':<22}{'wall µs/op':>11}{'median':>8}{'ratio':>8}{'CPU µs/op':>11}{'ratio':>8}")
    ratios = {}
    for name in runs:
        wall = median(ratio_per_round(runs[name], runs["by hand"]))
        cpu_ratio = median(ratio_per_round(cpu[name], cpu["by hand"]))
        ratios[name] = wall
        print(
            f"{name:<22}{min(runs[name]):>11.1f}{median(runs[name]):>8.1f}{wall:>8.3f}"
            f"{median(cpu[name]):>11.1f}{cpu_ratio:>8.3f}"
        )
    overhead = (ratios["polydatum"] - 1) * 100
    verdict = "met" if overhead <= TARGET else "MISSED"
    extra_cpu = median([p - h for p, h in zip(cpu["polydatum"], cpu["by hand"], strict=True)])
    print(
        f"polydatum overhead: {overhead:+.1f}% of the hand-written time "
        f"(target <= {TARGET:.0f}%: {verdict}); {extra_cpu:+.1f} µs CPU per context"
    )


TARGET = 10.0


def ratio_per_round(values: list[float], base: list[float]) -> list[float]:
    """Each round's ratio to the same round of ``base`` (rounds are interleaved)."""
    return [v / b for v, b in zip(values, base, strict=True)]


if __name__ == "__main__":
    main()

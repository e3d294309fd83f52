"""polydatum.documents on PostgreSQL: keyed put and get against hand-written SQLAlchemy, and an indexed query.

Run: python benchmarks/documents.py [--quick] [--rows N]   (DATABASE_URL overrides the server)

Part 1, keyed operations, one transaction each, interleaved rounds on the same Engine:
  put        ``ctx.docs.collection("items").put(key, doc, expected_version=v)`` (checked: the
             version rides in the UPDATE's WHERE) in a ``with dm.context()`` block
  by hand    ``UPDATE ... SET body = :doc, version = version + 1 WHERE key = :k AND version = :v
             RETURNING version`` on a JSONB column (the dict serialized by SQLAlchemy), in a
             plain Session committed and closed
  get        ``collection.get(key)`` against ``SELECT body ... WHERE key = :k`` by hand
A third line per operation runs the same hand-written SQL through ``ctx.db`` inside a polydatum
context, which separates the cost of the documents layer from the cost of a context.
The ratio is the median over rounds of each round's ratio (the machine's drift stays out of it).

CPU time (this process only) shows the client-side cost apart from the server's.

Part 2: ``--rows`` documents (default 20,000) in a collection indexed on ``status`` and ``n``;
the EXPLAIN of ``find({"status": "rare"}, limit=50)`` and of a range ordered by ``-n`` shows
the expression indexes in use, with the time of each query.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from collections.abc import Callable

from sqlalchemy import BigInteger, Column, MetaData, String, Table, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import sessionmaker

from polydatum import DataManager
from polydatum.documents import Documents
from polydatum.documents._query import Query
from polydatum.sqlalchemy import Database

URL = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
QUICK = "--quick" in sys.argv
OPS = 50 if QUICK else 100
ROUNDS = 10 if QUICK else 30
KEYS = 20
TARGET = 1.15


def rows_option() -> int:
    if "--rows" in sys.argv:
        return int(sys.argv[sys.argv.index("--rows") + 1])
    return 20_000


def document(i: int) -> dict[str, object]:
    """A cart-like document of about 600 bytes, plain JSON."""
    return {
        "status": "open",
        "n": i,
        "customer": {"id": 1000 + i, "name": "Ada Lovelace", "email": "ada@example.com", "city": "London"},
        "lines": [{"sku": f"sku-{j}", "qty": j, "price": 9.5 + j, "tags": ["a", "b"]} for j in range(5)],
        "notes": "leave at the door",
        "total": 123.45,
    }


def time_us(fn: Callable[[int], object]) -> tuple[float, float]:
    """Wall-clock and CPU (this process only, not the server's) µs per operation of one round."""
    gc.collect()
    cpu = time.process_time_ns()
    start = time.perf_counter_ns()
    fn(OPS)
    wall = time.perf_counter_ns() - start
    return wall / OPS / 1000, (time.process_time_ns() - cpu) / OPS / 1000


def keyed(db: Database, data_manager: DataManager) -> None:
    hand_meta = MetaData()
    hand = Table(
        f"bench_hand_docs_{os.getpid()}",
        hand_meta,
        Column("key", String(255), primary_key=True),
        Column("version", BigInteger, nullable=False),
        Column("body", JSONB, nullable=False),
    )
    hand_meta.create_all(db.engine)
    try:
        with db.engine.begin() as conn:
            conn.execute(
                hand.insert(), [{"key": f"k{i}", "version": 1, "body": document(i)} for i in range(KEYS)]
            )
        with data_manager.context() as ctx:
            items = ctx.docs.collection("items")
            for i in range(KEYS):
                items.put(f"k{i}", document(i))
        versions = {"docs": dict.fromkeys(range(KEYS), 1), "hand": dict.fromkeys(range(KEYS), 1)}
        sessions = sessionmaker(bind=db.engine)
        hand_update = (
            update(hand)
            .where(hand.c.key == bindparam("k"), hand.c.version == bindparam("v"))
            .values(body=bindparam("b", type_=JSONB), version=hand.c.version + 1)
            .returning(hand.c.version)
        )
        hand_get = select(hand.c.body).where(hand.c.key == bindparam("k"))

        def docs_put(n: int) -> None:
            seen = versions["docs"]
            for j in range(n):
                i = j % KEYS
                with data_manager.context() as ctx:
                    seen[i] = (
                        ctx.docs.collection("items")
                        .put(f"k{i}", document(i), expected_version=seen[i])
                        .version
                    )

        def hand_put(n: int) -> None:
            seen = versions["hand"]
            for j in range(n):
                i = j % KEYS
                session = sessions()
                seen[i] = session.execute(
                    hand_update, {"k": f"k{i}", "v": seen[i], "b": document(i)}
                ).scalar_one()
                session.commit()
                session.close()

        def hand_put_in_context(n: int) -> None:
            seen = versions["hand"]
            for j in range(n):
                i = j % KEYS
                with data_manager.context() as ctx:
                    params = {"k": f"k{i}", "v": seen[i], "b": document(i)}
                    seen[i] = ctx.db.execute(hand_update, params).scalar_one()

        def docs_get(n: int) -> None:
            for j in range(n):
                with data_manager.context() as ctx:
                    ctx.docs.collection("items").get(f"k{j % KEYS}")

        def hand_get_plain(n: int) -> None:
            for j in range(n):
                session = sessions()
                session.execute(hand_get, {"k": f"k{j % KEYS}"}).scalar_one()
                session.commit()
                session.close()

        def hand_get_in_context(n: int) -> None:
            for j in range(n):
                with data_manager.context() as ctx:
                    ctx.db.execute(hand_get, {"k": f"k{j % KEYS}"}).scalar_one()

        for label, cases in (
            (
                "put (checked)",
                {"documents": docs_put, "by hand": hand_put, "by hand in a context": hand_put_in_context},
            ),
            (
                "get",
                {
                    "documents": docs_get,
                    "by hand": hand_get_plain,
                    "by hand in a context": hand_get_in_context,
                },
            ),
        ):
            runs: dict[str, list[float]] = {name: [] for name in cases}
            cpu: dict[str, list[float]] = {name: [] for name in cases}
            order = list(cases.items())
            for _, fn in order:
                fn(100)  # warm the pool and the statement caches
            for r in range(ROUNDS):
                for name, fn in order if r % 2 else order[::-1]:
                    wall_us, cpu_us = time_us(fn)
                    runs[name].append(wall_us)
                    cpu[name].append(cpu_us)
            print(f"\n{label}: one transaction per op, {ROUNDS} rounds x {OPS} ops, ~600-byte documents")
            print(f"{'case':<24}{'wall µs/op':>12}{'ratio':>8}{'CPU µs/op':>11}{'ratio':>8}")
            for name, values in runs.items():
                ratio = statistics.median(v / b for v, b in zip(values, runs["by hand"], strict=True))
                cpu_ratio = statistics.median(v / b for v, b in zip(cpu[name], cpu["by hand"], strict=True))
                print(
                    f"{name:<24}{statistics.median(values):>12.1f}{ratio:>8.3f}"
                    f"{statistics.median(cpu[name]):>11.1f}{cpu_ratio:>8.3f}"
                )
            ratio = statistics.median(d / b for d, b in zip(runs["documents"], runs["by hand"], strict=True))
            layer = statistics.median(
                d / b for d, b in zip(runs["documents"], runs["by hand in a context"], strict=True)
            )
            verdict = "met" if ratio <= TARGET else "MISSED"
            print(
                f"documents / by hand: {ratio:.3f} (target <= {TARGET}: {verdict}); "
                f"documents layer alone: {layer:.3f}"
            )
    finally:
        hand_meta.drop_all(db.engine)


def indexed_query(db: Database, docs: Documents, data_manager: DataManager, rows: int) -> None:
    table = docs.definition("many").table
    start = time.perf_counter()
    with db.engine.begin() as conn:
        conn.execute(
            text(
                f"INSERT INTO {table.name} (key, version, body) "
                "SELECT 'k' || i, 1, jsonb_build_object('status', CASE WHEN i % 1000 = 0 THEN 'rare' "
                "ELSE 'common' END, 'n', i, 'tags', jsonb_build_array('t' || (i % 997)), "
                "'pad', repeat('x', 100)) "
                "FROM generate_series(1, :rows) AS i"
            ),
            {"rows": rows},
        )
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"ANALYZE {table.name}"))
    print(f"\n{rows:,} documents loaded in {time.perf_counter() - start:.1f} s")
    for filters, order_by in (
        ({"status": "rare"}, None),
        ({"n__gte": rows - 100}, "-n"),
        ({"tags__contains": "t5"}, None),
    ):
        with data_manager.context() as ctx:
            many = ctx.docs.collection("many")
            query = Query(docs.definition("many"))  # the statement find() runs, for EXPLAIN
            stmt, _, _ = query.find(filters, order_by, 50, None, False, ctx.db.get_bind().dialect)
            sql = str(stmt.compile(dialect=ctx.db.get_bind().dialect, compile_kwargs={"literal_binds": True}))
            plan = [row[0] for row in ctx.db.execute(text("EXPLAIN " + sql))]
            timings = []
            for _ in range(5):
                began = time.perf_counter()
                found = many.find(filters, order_by=order_by, limit=50)
                timings.append((time.perf_counter() - began) * 1000)
        uses = any(docs.definition("many").table.name in line and "Index" in line for line in plan)
        print(
            f"\nfind({filters!r}, order_by={order_by!r}, limit=50): {len(found)} documents, "
            f"{statistics.median(timings):.2f} ms (median of 5); uses an index: {uses}"
        )
        for line in plan:
            print("   ", line)


def main() -> None:
    db = Database(URL)
    data_manager = DataManager()
    db.install(data_manager)
    docs = Documents(db, prefix=f"bench{os.getpid()}_")
    docs.define("items", indexes={"status": str})
    docs.define("many", indexes={"status": str, "n": int, "tags": list})
    docs.install(data_manager)
    docs.create_tables()
    try:
        keyed(db, data_manager)
        indexed_query(db, docs, data_manager, rows_option())
    finally:
        docs.metadata.drop_all(db.engine)
        db.dispose()


if __name__ == "__main__":
    main()

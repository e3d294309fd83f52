"""Dataset.build from CSV against a hand-written sqlite3 ``executemany``, in the same run.

Run: python benchmarks/dataset.py [--quick] [--rows N]     (default 1,000,000 rows; --quick 100,000)

One CSV of ``--rows`` rows (an integer key, two text columns, a nullable
integer and a float) is written once, then loaded in interleaved rounds by:
  build      ``Dataset.build(path, City, "cities.csv", progress=False)``: every value checked and
             converted by its column, indexes, ANALYZE, VACUUM, fsync and the rename into place
  by hand    ``csv.reader`` + ``int()``/``float()`` by hand + ``executemany`` of the same INSERT
             into the same table (the DDL SQLAlchemy compiles), the same index, one transaction,
             the same PRAGMAs (journal off, synchronous off); no checks, no ANALYZE/VACUUM
The ratio is (rows/s of build) / (rows/s by hand) in each round, and the median over rounds is
reported; the target is >= 0.8. Wall-clock time is what the target is about. CPU time (this
process only) is printed beside it: on a machine shared with other work, the wall-clock ratio of
one round swings with the neighbours' load, the CPU ratio much less.
"""

from __future__ import annotations

import csv
import gc
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import String
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import CreateIndex, CreateTable

from polydatum.sqlalchemy import Dataset

QUICK = "--quick" in sys.argv
ROWS = (
    int(sys.argv[sys.argv.index("--rows") + 1]) if "--rows" in sys.argv else (100_000 if QUICK else 1_000_000)
)
ROUNDS = 3 if QUICK else 5


class Base(DeclarativeBase):
    pass


class City(Base):
    __tablename__ = "cities"

    id: Mapped[int] = mapped_column(primary_key=True)
    country: Mapped[str] = mapped_column(String(2), index=True)
    name: Mapped[str]
    population: Mapped[int | None]
    area: Mapped[float]


def write_csv(path: Path) -> None:
    rng = random.Random(7)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "country", "name", "population", "area"])
        for i in range(1, ROWS + 1):
            population = "" if i % 10 == 0 else str(rng.randrange(100, 10_000_000))
            writer.writerow(
                [i, rng.choice(("fr", "de", "jp", "br")), f"City {i}", population, rng.random() * 900]
            )


def by_hand(source: Path, target: Path) -> None:
    dialect = sqlite.dialect()
    conn = sqlite3.connect(target, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    conn.execute(str(CreateTable(City.__table__).compile(dialect=dialect)))
    with open(source, newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        next(reader)
        conn.executemany(
            "INSERT INTO cities (id, country, name, population, area) VALUES (?, ?, ?, ?, ?)",
            ((int(i), c, n, int(p) if p else None, float(a)) for i, c, n, p, a in reader),
        )
    for index in City.__table__.indexes:
        conn.execute(str(CreateIndex(index).compile(dialect=dialect)))
    conn.execute("COMMIT")
    conn.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        source = work / "cities.csv"
        write_csv(source)
        print(f"{ROWS:,} rows, {source.stat().st_size / 1e6:.1f} MB of CSV, {ROUNDS} rounds")
        ratios, cpu_ratios, builds, hands = [], [], [], []
        for round_ in range(ROUNDS):
            order = ("build", "hand") if round_ % 2 == 0 else ("hand", "build")
            took, cpu = {}, {}
            for which in order:
                target = work / f"{which}.sqlite"
                target.unlink(missing_ok=True)
                gc.collect()
                start, start_cpu = time.perf_counter(), time.process_time()
                if which == "build":
                    Dataset.build(target, City, source, progress=False)
                else:
                    by_hand(source, target)
                took[which] = time.perf_counter() - start
                cpu[which] = time.process_time() - start_cpu
            builds.append(ROWS / took["build"])
            hands.append(ROWS / took["hand"])
            ratios.append(took["hand"] / took["build"])
            cpu_ratios.append(cpu["hand"] / cpu["build"])
            print(
                f"  round {round_ + 1}: build {ROWS / took['build']:>10,.0f} rows/s   "
                f"by hand {ROWS / took['hand']:>10,.0f} rows/s   ratio {ratios[-1]:.2f}   "
                f"(CPU ratio {cpu_ratios[-1]:.2f})"
            )
        with sqlite3.connect(work / "build.sqlite") as conn:
            assert conn.execute("SELECT count(*) FROM cities").fetchone()[0] == ROWS
        conn.close()
        print(f"build    {statistics.median(builds):>10,.0f} rows/s (median)")
        print(f"by hand  {statistics.median(hands):>10,.0f} rows/s (median)")
        print(
            f"build/by hand: {statistics.median(ratios):.2f} (target >= 0.80); "
            f"CPU time: {statistics.median(cpu_ratios):.2f}"
        )
        os.sync()


if __name__ == "__main__":
    main()

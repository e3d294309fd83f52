"""Documents under concurrent writers (threads, PostgreSQL), and through AsyncDatabase."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from polydatum import DataManager
from polydatum.documents import Documents
from polydatum.errors import ConcurrencyConflict, InvalidInput
from polydatum.sqlalchemy import AsyncDatabase, Database

WRITERS = 20
ROUNDS = 3


@pytest.fixture(name="counters")
def fixture_counters(pg_url: str) -> Iterator[tuple[DataManager, Documents]]:
    """A DataManager on PostgreSQL with a ``counters`` collection and a pool for every writer."""
    db = Database(pg_url, pool_size=WRITERS, max_overflow=0)
    dm = DataManager()
    db.install(dm)
    docs = Documents(db, prefix=f"r{uuid.uuid4().hex[:8]}_")
    docs.define("counters")
    docs.install(dm)
    docs.create_tables()
    with dm.context() as ctx:
        ctx.docs.collection("counters").put("c", {"n": 0, "by": []})
    yield dm, docs
    docs.metadata.drop_all(db.engine)
    db.dispose()


def race(dm: DataManager, write: Any) -> tuple[int, int, list[BaseException]]:
    """WRITERS threads call ``write(ctx, writer)`` ROUNDS times, lined up by a barrier each round."""
    barrier = threading.Barrier(WRITERS)
    applied = refused = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        nonlocal applied, refused
        for _ in range(ROUNDS):
            barrier.wait(timeout=30)
            try:
                with dm.context() as ctx:
                    write(ctx, i)
            except ConcurrencyConflict:
                with lock:
                    refused += 1
            except BaseException as exc:  # reported by the test
                errors.append(exc)
            else:
                with lock:
                    applied += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return applied, refused, errors


def test_racing_checked_writers_lose_nothing(counters: tuple[DataManager, Documents]) -> None:
    """20 writers read and put with the version they read: each write applies or conflicts, none is lost."""
    dm, _ = counters

    def increment(ctx: Any, i: int) -> None:
        collection = ctx.docs.collection("counters")
        doc = collection.require("c")
        value = {"n": doc.value["n"] + 1, "by": [*doc.value["by"], i]}
        collection.put("c", value, expected_version=doc.version)

    applied, refused, errors = race(dm, increment)
    assert errors == []
    assert applied + refused == WRITERS * ROUNDS
    assert applied >= ROUNDS  # someone wins every round
    with dm.context() as ctx:
        doc = ctx.docs.collection("counters").require("c")
    assert doc.value["n"] == applied == len(doc.value["by"])
    assert doc.version == applied + 1


def test_racing_forced_writers_each_bump_the_version(counters: tuple[DataManager, Documents]) -> None:
    """force=True never conflicts, and the version counts every write: none overwrote another's bump."""
    dm, _ = counters

    def overwrite(ctx: Any, i: int) -> None:
        ctx.docs.collection("counters").put("c", {"n": -1, "by": [i]}, force=True)

    applied, refused, errors = race(dm, overwrite)
    assert (applied, refused, errors) == (WRITERS * ROUNDS, 0, [])
    with dm.context() as ctx:
        assert ctx.docs.collection("counters").require("c").version == WRITERS * ROUNDS + 1


@pytest.fixture(name="async_url", params=["aiosqlite", "postgresql"])
def fixture_async_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An async URL: a SQLite file through aiosqlite, then PostgreSQL through psycopg's async mode."""
    if request.param == "aiosqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    return str(request.getfixturevalue("pg_url"))


async def test_async_collections_do_what_sync_ones_do(async_url: str) -> None:
    """get, put (checked, conflicting, forced), find, count and delete through an AsyncDatabase."""
    db = AsyncDatabase(async_url)
    dm = DataManager()
    db.install(dm)
    docs = Documents(db, prefix=f"a{uuid.uuid4().hex[:8]}_")
    docs.define("notes", indexes={"n": int, "tags": list})
    docs.install(dm)
    await docs.acreate_tables()
    try:
        async with dm.context() as ctx:
            notes = (await ctx.aget("docs")).collection("notes")
            assert (await notes.put("a", {"n": 1, "tags": ["x"]})).version == 1
            await notes.put("b", {"n": 2})
            assert await notes.get("zz") is None
        async with dm.context() as ctx:
            notes = (await ctx.aget("docs")).collection("notes")
            doc = await notes.require("a")
            assert (await notes.put("a", {"n": 3, "tags": ["x"]}, expected_version=doc.version)).version == 2
            with pytest.raises(ConcurrencyConflict):
                await notes.put("a", {"n": 4}, expected_version=1)
        async with dm.context() as ctx:
            notes = (await ctx.aget("docs")).collection("notes")
            assert [d.key for d in await notes.find({"n__gte": 2}, order_by="-n")] == ["a", "b"]
            assert [d.key for d in await notes.find({"tags__contains": "x"})] == ["a"]
            page = await notes.find(order_by="n", limit=1)
            assert [d.key for d in await notes.find(order_by="n", limit=1, after=page.next_cursor)] == ["a"]
            assert await notes.count({"n__lt": 3}) == 1
            assert (await notes.put("b", {"n": 5}, force=True)).version == 2
            with pytest.raises(InvalidInput, match="has no index"):
                await notes.find({"other": 1})
            assert await notes.delete("b", expected_version=2) is True
            assert await notes.delete("b") is False
        with dm.context() as ctx:  # the sync side of the AsyncDatabase reads the same collection
            assert ctx.docs.collection("notes").require("a").value == {"n": 3, "tags": ["x"]}
    finally:
        async with db.engine.begin() as conn:
            await conn.run_sync(lambda sync: docs.metadata.drop_all(sync))
        await db.dispose()

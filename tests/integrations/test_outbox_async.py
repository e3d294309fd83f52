"""The outbox from ``async with`` contexts: sync integrations write through the AsyncSession.

Celery's ``delay()``, cache invalidations and blob deletes are sync calls; in
an ``async with`` context their rows are written through the context's
AsyncSession just before its COMMIT, in the same transaction. Each test runs
on SQLite (aiosqlite) and PostgreSQL (psycopg's async side).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import Column, Integer, MetaData, Table, func, select, text

from polydatum import DataManager
from polydatum.blob import FileSystemBlobStore
from polydatum.cache import AsyncCache, AsyncCacheBackend
from polydatum.celery import install
from polydatum.outbox import Effect, Outbox
from polydatum.redis import AsyncRedis, Redis
from polydatum.sqlalchemy import AsyncDatabase, Database
from tests.support.outbox import flush_outboxes  # noqa: F401  # autouse
from tests.support.servers import PrivateRedis
from tests.support.sql import fresh_postgres_database

DEADLINE = 30.0  # seconds; a ceiling for waiting, never a pass/fail timing

NOTES = MetaData()
notes = Table("notes", NOTES, Column("id", Integer, primary_key=True), Column("n", Integer))


@pytest.fixture(name="pg_url", scope="module")
def fixture_pg_url(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL database of this module's own, dropped afterwards."""
    with fresh_postgres_database(postgres_url) as url:
        yield url


@pytest.fixture(name="url", params=["sqlite", "postgresql"])
def fixture_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The async database URL of each backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(name="app")
async def fixture_app(url: str) -> AsyncIterator[SimpleNamespace]:
    """An AsyncDatabase with the notes table and an outbox, all dropped afterwards."""
    dm = DataManager()
    adb = AsyncDatabase(url).install(dm)
    outbox = Outbox(adb, backoff=0.05, max_backoff=0.1).install(dm)
    NOTES.create_all(outbox.engine)
    outbox.create_table()
    yield SimpleNamespace(dm=dm, adb=adb, outbox=outbox)
    outbox.flush()
    NOTES.drop_all(outbox.engine)
    with outbox.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS polydatum_outbox"))
        conn.execute(text("DROP TABLE IF EXISTS polydatum_inbox"))
    await adb.dispose()


def rows(outbox: Outbox) -> list[dict[str, Any]]:
    """Every row of the outbox table, oldest first (deletes of delivered rows done first)."""
    outbox.flush()
    t = outbox.table
    with outbox.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(t).order_by(t.c.id))]


def count_notes(outbox: Outbox) -> int:
    """How many committed notes there are."""
    with outbox.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(notes)).scalar_one())


def drain(outbox: Outbox) -> None:
    """Run a relay until nothing is pending; fail after the deadline."""
    relay = outbox.relay()
    end = time.monotonic() + DEADLINE
    while outbox.status().pending:
        if time.monotonic() > end:
            pytest.fail("the relay did not deliver before the deadline")
        if relay.run_once() == 0:
            time.sleep(0.05)


# -- generic effects from sync code ---------------------------------------------------------------


async def test_sync_adds_commit_with_the_data_in_one_transaction(app: SimpleNamespace) -> None:
    """outbox.add(ctx, ...) in an async context: rows written before the COMMIT, delivered in order."""
    seen: list[Effect] = []
    app.outbox.handler("t")(seen.append)
    async with app.dm.context() as ctx:
        session = await ctx.aget("db")
        await session.execute(notes.insert().values(n=1))
        app.outbox.add(ctx, "t", {"i": 1}, key="k")
        await (await ctx.aget("outbox")).add("t", {"i": 2}, key="k")  # awaited: the pending one goes first
        app.outbox.add(ctx, "t", {"i": 3}, key="k")
        app.outbox.add(ctx, "t", {"i": 4})
        assert seen == []  # nothing before the commit
    assert [e.payload for e in seen] == [{"i": 1}, {"i": 2}, {"i": 3}, {"i": 4}]
    assert [e.id for e in seen] == sorted(e.id for e in seen)  # ids follow the order of adds
    assert count_notes(app.outbox) == 1
    assert rows(app.outbox) == []


async def test_context_that_never_used_its_session_still_commits_the_row(app: SimpleNamespace) -> None:
    """A context whose only write is a sync add gets its session made and committed for the row."""
    seen: list[Any] = []
    app.outbox.handler("t")(lambda e: seen.append(e.payload))
    async with app.dm.context() as ctx:
        app.outbox.add(ctx, "t", "only")
    assert seen == ["only"]
    assert rows(app.outbox) == []


async def test_rolled_back_async_context_records_nothing(app: SimpleNamespace) -> None:
    """A sync add in an async context that raises leaves no row and calls no handler."""
    seen: list[Any] = []
    app.outbox.handler("t")(seen.append)

    async def fail() -> None:
        async with app.dm.context() as ctx:
            session = await ctx.aget("db")
            await session.execute(notes.insert().values(n=1))
            app.outbox.add(ctx, "t", {})
            raise LookupError("roll back")

    with pytest.raises(LookupError):
        await fail()
    assert seen == []
    assert rows(app.outbox) == []
    assert count_notes(app.outbox) == 0


async def test_relay_delivers_what_the_commit_could_not(app: SimpleNamespace) -> None:
    """The handler fails right after the commit: the row waits, and a relay delivers it."""
    calls: list[Any] = []

    def flaky(effect: Effect) -> None:
        calls.append(effect.payload)
        if len(calls) == 1:
            raise ConnectionError("target down")

    app.outbox.handler("t")(flaky)
    async with app.dm.context() as ctx:
        app.outbox.add(ctx, "t", {"n": 7})
    (row,) = rows(app.outbox)
    assert row["attempts"] == 1
    assert "ConnectionError: target down" in row["last_error"]
    drain(app.outbox)
    assert calls == [{"n": 7}, {"n": 7}]
    assert rows(app.outbox) == []


async def test_unserializable_payload_fails_at_the_sync_add(app: SimpleNamespace) -> None:
    """A payload JSON cannot carry fails at outbox.add(), inside the context, which rolls back."""
    app.outbox.handler("t")(lambda e: None)

    async def send() -> None:
        async with app.dm.context() as ctx:
            session = await ctx.aget("db")
            await session.execute(notes.insert().values(n=1))
            app.outbox.add(ctx, "t", {"when": {1, 2}})

    with pytest.raises(TypeError, match=r"payload\['when'\] is a set"):
        await send()
    assert count_notes(app.outbox) == 0
    assert rows(app.outbox) == []


async def test_add_after_the_rows_were_written_says_why(app: SimpleNamespace) -> None:
    """A sync add from a commit hook comes too late for the transaction: a RuntimeError says what to do."""
    app.outbox.handler("t")(lambda e: None)
    async with app.dm.context() as ctx:
        app.outbox.add(ctx, "t", 1)
        ctx.on_commit(app.outbox.add, ctx, "t", 2)
        ctx.on_commit(ctx.outbox.add, "t", 3)  # awaited by the hook runner
    errors = ctx.get_hook_errors()
    assert [e[0] for e in errors] == [RuntimeError, RuntimeError]
    assert all("add effects in the context's body" in str(e[1]) for e in errors)
    assert rows(app.outbox) == []


# -- Celery ---------------------------------------------------------------------------------------


def celery_app(dm: DataManager, outbox: Outbox, broker: str, queue: str) -> tuple[Celery, Any]:
    """A Celery app on ``broker`` sending through ``outbox`` to ``queue``; nothing consumes it."""
    app = Celery("polydatum_outbox_async", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=False,
        task_serializer="json",
    )
    install(app, dm, outbox=outbox)

    @app.task(shared=False, name="pdoutbox.async_work")
    def work(n: int) -> None:
        return None

    return app, work


def queued_ids(broker: str, queue: str) -> list[str]:
    """The task ids of the messages waiting in ``queue`` of a Redis broker."""
    client = redis.Redis.from_url(broker)
    try:
        return sorted(json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1))
    finally:
        client.delete(queue)
        client.close()


async def test_delay_in_an_async_context_sends_after_the_commit(app: SimpleNamespace, redis_url: str) -> None:
    """delay() in 'async with' is an outbox row sent right after the commit; a rollback sends none."""
    queue = f"pd-outbox-async-{uuid.uuid4().hex[:10]}"
    capp, work = celery_app(app.dm, app.outbox, redis_url, queue)
    try:
        async with app.dm.context() as ctx:
            session = await ctx.aget("db")
            await session.execute(notes.insert().values(n=1))
            sent = work.delay(1)

        async def fail() -> None:
            async with app.dm.context():
                work.delay(2)
                raise LookupError("roll back")

        with pytest.raises(LookupError):
            await fail()
        assert sent.outcome == "in outbox"
        assert queued_ids(redis_url, queue) == [sent.id]
        assert rows(app.outbox) == []
    finally:
        capp.close()


async def test_delay_waits_while_the_broker_is_down_and_a_relay_sends_it(app: SimpleNamespace) -> None:
    """Broker down at the commit of an async context: the row waits, and a relay sends it once it is back."""
    broker = PrivateRedis(persistent=True).start()  # a broker keeps its queues over a restart
    capp, work = celery_app(app.dm, app.outbox, broker.url, "outboxq")
    try:
        broker.stop()
        async with app.dm.context():
            sent = work.delay(1)
        (row,) = rows(app.outbox)
        assert row["attempts"] == 1
        broker.start()
        # The sender defers sends for a moment after a failed connection; the
        # row waits that out without spending attempts (this fixture's backoff
        # is far shorter), so a plain drain delivers it.
        drain(app.outbox)
        assert app.outbox.status().dead == 0
        assert queued_ids(broker.url, "outboxq") == [sent.id]
    finally:
        capp.close()
        broker.close()


# -- caches ---------------------------------------------------------------------------------------


async def test_async_redis_cache_invalidates_through_the_outbox(app: SimpleNamespace, redis_url: str) -> None:
    """AsyncRedis.cache(outbox=): a committed invalidation deletes after the commit, a rollback never."""
    aredis = AsyncRedis(redis_url)
    cache = aredis.cache(namespace=f"pd-async-{uuid.uuid4().hex[:10]}", outbox=app.outbox).install(app.dm)
    try:
        await cache.set("a", 1)
        await cache.set("b", 2)

        async def fail() -> None:
            async with app.dm.context() as ctx:
                ctx.cache.invalidate("a")
                raise LookupError("roll back")

        with pytest.raises(LookupError):
            await fail()
        assert await cache.get("a") == 1
        async with app.dm.context() as ctx:
            ctx.cache.invalidate("b")
            assert await cache.get("b") == 2  # not before the commit
        assert await cache.get("b") is None
        assert await cache.get("a") == 1
        assert rows(app.outbox) == []
        await cache.clear()
    finally:
        await aredis.aclose()


async def test_async_cache_invalidation_waits_while_redis_is_down(app: SimpleNamespace) -> None:
    """Redis down at the commit: the invalidation waits in the outbox; a relay deletes the entry later."""
    private = PrivateRedis().start()
    aredis = AsyncRedis(private.url)
    cache = aredis.cache(namespace="shop", outbox=app.outbox).install(app.dm)
    try:
        private.stop()
        async with app.dm.context() as ctx:
            ctx.cache.invalidate("price")
        assert app.outbox.status().pending == 1
        private.start()  # the same port
        raw = redis.Redis.from_url(private.url)
        raw.set(cache.key("price"), b"old")  # as if Redis had kept the stale entry
        drain(app.outbox)
        assert raw.get(cache.key("price")) is None  # no stale read after delivery
        raw.close()
    finally:
        await aredis.aclose()
        private.close()


async def test_sync_cache_invalidation_in_an_async_context(app: SimpleNamespace, redis_url: str) -> None:
    """The sync Cache(outbox=) invalidated from an async context: the row joins the AsyncSession's commit."""
    client = Redis(redis_url)
    cache = client.cache(namespace=f"pd-sync-{uuid.uuid4().hex[:10]}", outbox=app.outbox).install(app.dm)
    try:
        cache.set("k", "v")
        async with app.dm.context() as ctx:
            session = await ctx.aget("db")
            await session.execute(notes.insert().values(n=1))
            ctx.cache.invalidate("k")
        assert cache.get("k") is None
        assert rows(app.outbox) == []
        cache.clear()
    finally:
        client.close()


def test_async_cache_with_an_outbox_needs_a_sync_backend(tmp_path: Path) -> None:
    """AsyncCache(outbox=) on a backend it cannot reach from a thread says to pass sync_backend=."""
    dm = DataManager()
    adb = AsyncDatabase(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}").install(dm)
    outbox = Outbox(adb).install(dm)

    class Opaque:
        """An async backend of unknown kind."""

    backend: AsyncCacheBackend = Opaque()  # type: ignore[assignment]
    with pytest.raises(TypeError, match="needs sync_backend="):
        AsyncCache(backend, outbox=outbox)
    with pytest.raises(TypeError, match=r"outbox must be a polydatum\.outbox\.Outbox"):
        AsyncCache(outbox="nope")
    assert AsyncCache(outbox=outbox).sync_backend is not None  # the memory backend's own


# -- blobs ----------------------------------------------------------------------------------------


async def test_blob_delete_in_an_async_context_lands_after_the_commit(
    app: SimpleNamespace, tmp_path: Path
) -> None:
    """A blob delete in 'async with' is an outbox row of the commit; a failed context's puts are undone."""
    store = FileSystemBlobStore(tmp_path / "blobs")
    store.install(app.dm, outbox=app.outbox)
    store.put("old", b"old")
    store.put("kept", b"v1")
    async with app.dm.context() as ctx:
        session = await ctx.aget("db")
        await session.execute(notes.insert().values(n=1))
        ctx.blobs.put("new", b"new")
        ctx.blobs.delete("old")
        assert store.exists("old")  # not before the commit
    assert not store.exists("old")
    assert store.get("new") == b"new"
    assert rows(app.outbox) == []  # the cleanup rows went with the commit

    async def fail() -> None:
        async with app.dm.context() as ctx:
            ctx.blobs.put("doomed", b"x")
            ctx.blobs.put("kept", b"v2")
            ctx.blobs.delete("new")
            raise LookupError("roll back")

    with pytest.raises(LookupError):
        await fail()
    assert not store.exists("doomed")
    assert store.get("kept") == b"v1"
    assert store.get("new") == b"new"
    # What is left are the cleanups committed before the writes, due after orphan_after: harmless.
    assert {r["available_at"] > time.time() + 60 for r in rows(app.outbox)} <= {True}


# -- a sync Database in async contexts (sync services an ASGI app runs in its thread pool) -----


@pytest.fixture(name="sync_app", params=["sqlite", "postgresql"])
def fixture_sync_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SimpleNamespace]:
    """A sync Database with the notes table and an outbox, entered with ``async with``."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'app.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
    dm = DataManager()
    db = Database(url).install(dm)
    outbox = Outbox(db).install(dm)
    NOTES.create_all(db.engine)
    outbox.create_table()
    yield SimpleNamespace(dm=dm, db=db, outbox=outbox)
    outbox.flush()
    NOTES.drop_all(db.engine)
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS polydatum_outbox"))
        conn.execute(text("DROP TABLE IF EXISTS polydatum_inbox"))
    db.dispose()


async def test_sync_database_in_an_async_context_commits_and_delivers_its_rows(
    sync_app: SimpleNamespace,
) -> None:
    """Rows added through a sync Session (in a worker thread) commit with the data and are delivered after."""
    seen: list[tuple[Any, bool]] = []
    loop_thread = threading.get_ident()
    sync_app.outbox.handler("t")(lambda e: seen.append((e.payload, threading.get_ident() == loop_thread)))

    def work(ctx: Any) -> None:  # what a sync endpoint does in FastAPI's thread pool
        ctx.db.execute(notes.insert().values(n=1))
        sync_app.outbox.add(ctx, "t", {"i": 1})
        ctx.outbox.add("t", {"i": 2})

    async with sync_app.dm.context() as ctx:
        await asyncio.to_thread(work, ctx)
        assert seen == []  # nothing before the commit
    # Delivered in order, off the event loop's thread (the handlers block).
    assert seen == [({"i": 1}, False), ({"i": 2}, False)]
    assert count_notes(sync_app.outbox) == 1
    assert rows(sync_app.outbox) == []


async def test_sync_database_in_a_rolled_back_async_context_leaves_nothing(
    sync_app: SimpleNamespace,
) -> None:
    """An async context that raises rolls the sync Session's rows back: no row, no delivery."""
    seen: list[Any] = []
    sync_app.outbox.handler("t")(seen.append)

    def work(ctx: Any) -> None:
        ctx.db.execute(notes.insert().values(n=1))
        ctx.outbox.add("t", {"i": 1})
        raise LookupError("refused")

    with pytest.raises(LookupError, match="refused"):
        async with sync_app.dm.context() as ctx:
            await asyncio.to_thread(work, ctx)
    assert seen == []
    assert count_notes(sync_app.outbox) == 0
    assert rows(sync_app.outbox) == []

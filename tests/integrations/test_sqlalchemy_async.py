"""AsyncDatabase and AsyncStore on PostgreSQL (psycopg async) and SQLite (aiosqlite)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.dal import DataAccessLayer
from polydatum.errors import ConcurrencyConflict, NotFound, ResourceException
from polydatum.sqlalchemy import AsyncDatabase, Database, ReadOnlyError, aretry, read_only
from tests.support.servers import free_port
from tests.support.sql import (
    AsyncItems,
    Base,
    Counter,
    Item,
    Items,
    server_connections,
)


@pytest.fixture(name="url", params=["aiosqlite", "postgresql"])
def fixture_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """The async database URL of each backend."""
    if request.param == "aiosqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(name="db")
async def fixture_db(url: str) -> AsyncIterator[AsyncDatabase]:
    """An AsyncDatabase with the test tables, emptied afterwards."""
    db = AsyncDatabase(url)
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield db
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
    await db.dispose()


@pytest.fixture(name="dm")
def fixture_dm(db: AsyncDatabase) -> DataManager:
    """A DataManager with ``db`` installed and the async item store registered."""
    dm = DataManager()
    db.install(dm)
    dm.register_services(items=AsyncItems())
    return dm


async def names(db: AsyncDatabase) -> list[str]:
    """Item names as a separate connection sees them."""
    async with db.engine.connect() as conn:
        return sorted((await conn.execute(select(Item.name))).scalars())


class Boom(Exception):
    pass


async def run(dm: DataManager, body: Callable[[DataAccessContext], Awaitable[object]]) -> None:
    """Run ``await body(ctx)`` in a new async context of ``dm``."""
    async with dm.context() as ctx:
        await body(ctx)


class TestTransactions:
    async def test_commit_and_rollback(self, dm: DataManager, db: AsyncDatabase) -> None:
        """A clean async context commits; a raising one leaves no row."""
        async with dm.dal() as dal:
            await dal.items.create(name="kept")

        async def body(ctx: DataAccessContext) -> None:
            await ctx.dal.items.create(name="lost")
            raise Boom

        with pytest.raises(Boom):
            await run(dm, body)
        assert await names(db) == ["kept"]

    async def test_hooks_follow_the_outcome(self, dm: DataManager, db: AsyncDatabase) -> None:
        """An async on_commit hook sees the committed row; on_rollback runs after a failure."""
        seen: list[Any] = []

        async def after_commit() -> None:
            seen.append(await names(db))

        async with dm.context() as ctx:
            await ctx.dal.items.create(name="a")
            ctx.on_commit(after_commit)
            ctx.on_rollback(seen.append, "rolled back")

        async def body(ctx: DataAccessContext) -> None:
            ctx.on_commit(seen.append, "committed")
            ctx.on_rollback(seen.append, "rolled back")
            await ctx.dal.items.create(name="b")
            raise Boom

        with pytest.raises(Boom):
            await run(dm, body)
        assert seen == [["a"], "rolled back"]

    async def test_unused_context_checks_out_nothing(self, dm: DataManager, db: AsyncDatabase) -> None:
        """An async context that never asks for the session checks out no connection."""
        async with dm.context() as ctx:
            assert "db" not in ctx
            assert db.engine.pool.checkedout() == 0
        async with dm.context() as ctx:
            session = await ctx.aget("db")
            await session.execute(text("SELECT 1"))
            assert db.engine.pool.checkedout() == 1
        assert db.engine.pool.checkedout() == 0

    async def test_no_leak_after_many_contexts(
        self, dm: DataManager, db: AsyncDatabase, url: str, postgres_url: str
    ) -> None:
        """500 async contexts, a third raising, leave nothing checked out and few on the server."""
        for i in range(500):
            try:
                async with dm.dal() as dal:
                    await dal.items.create(name=f"item{i}")
                    if i % 3 == 0:
                        raise Boom
            except Boom:
                pass
        assert db.engine.pool.checkedout() == 0
        assert len(await names(db)) == 500 - 167
        if db.engine.dialect.name == "postgresql":
            database = make_url(url).database
            assert database is not None
            count = await asyncio.to_thread(server_connections, postgres_url, database)
            assert count <= db.engine.pool.size()

    async def test_savepoint(self, dm: DataManager, db: AsyncDatabase) -> None:
        """A failing begin_nested() block is undone and the rest of the context commits."""
        async with dm.context() as ctx:
            session: AsyncSession = await ctx.aget("db")
            await ctx.dal.items.create(name="outer")
            savepoint = await session.begin_nested()
            await ctx.dal.items.create(name="inner")
            await savepoint.rollback()
        assert await names(db) == ["outer"]

    async def test_without_middleware_nothing_is_committed(self, db: AsyncDatabase) -> None:
        """With transaction=False what the code does not commit is rolled back at close."""
        dm = DataManager()
        db.install(dm, transaction=False)
        async with dm.context() as ctx:
            session = await ctx.aget("db")
            session.add(Item(name="kept"))
            await session.commit()
            session.add(Item(name="dropped"))
        assert await names(db) == ["kept"]

    async def test_cancelled_task_rolls_back_and_returns_the_connection(
        self, dm: DataManager, db: AsyncDatabase
    ) -> None:
        """A task cancelled inside its context rolls back, closes the session and stays cancelled."""
        started = asyncio.Event()
        seen: list[str] = []

        async def body(ctx: DataAccessContext) -> None:
            await ctx.dal.items.create(name="cancelled")
            ctx.on_commit(seen.append, "committed")
            ctx.on_rollback(seen.append, "rolled back")
            started.set()
            await asyncio.Event().wait()  # until cancelled

        task = asyncio.create_task(run(dm, body))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["rolled back"]
        assert await names(db) == []
        assert db.engine.pool.checkedout() == 0

    async def test_failed_commit_runs_rollback_hooks(self, dm: DataManager, db: AsyncDatabase) -> None:
        """A commit that fails raises from the context, runs on_rollback hooks and keeps nothing."""
        seen: list[str] = []

        async def body(ctx: DataAccessContext) -> None:
            session: AsyncSession = await ctx.aget("db")
            session.add_all([Item(name="same"), Item(name="same")])  # flushed at commit
            ctx.on_commit(seen.append, "committed")
            ctx.on_rollback(seen.append, "rolled back")

        with pytest.raises(IntegrityError):
            await run(dm, body)
        assert seen == ["rolled back"]
        assert await names(db) == []
        assert db.engine.pool.checkedout() == 0

    async def test_two_named_databases(self, dm: DataManager, db: AsyncDatabase, tmp_path: Any) -> None:
        """Two AsyncDatabases under two names: separate sessions, both commit or neither does."""
        analytics = AsyncDatabase(f"sqlite+aiosqlite:///{tmp_path / 'analytics.db'}")
        async with analytics.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        analytics.install(dm, name="analytics")
        dm.register_services(stats=AsyncItems(database="analytics"))
        async with dm.context() as ctx:
            await ctx.dal.items.create(name="main")
            await ctx.dal.stats.create(name="event")
            assert await ctx.aget("db") is not await ctx.aget("analytics")

        async def body(ctx: DataAccessContext) -> None:
            await ctx.dal.items.create(name="lost")
            await ctx.dal.stats.create(name="lost")
            raise Boom

        with pytest.raises(Boom):
            await run(dm, body)
        assert await names(db) == ["main"]
        assert await names(analytics) == ["event"]
        assert analytics.engine.pool.checkedout() == 0
        await analytics.dispose()


class TestStore:
    async def test_crud_and_search(self, dm: DataManager) -> None:
        """AsyncStore creates, reads, updates, pages through, counts and deletes."""
        async with dm.dal() as dal:
            for i in range(7):
                await dal.items.create(name=f"n{i}", qty=i % 3)
            assert await dal.items.get(404) is None
            with pytest.raises(NotFound):
                await dal.items.require(404)
            first = await dal.items.search(order_by=["-qty", "name"], limit=4)
            rest = await dal.items.search(order_by=["-qty", "name"], after=first.next_cursor)
            assert [i.name for i in [*first, *rest]] == ["n2", "n5", "n1", "n4", "n0", "n3", "n6"]
            assert await dal.items.count({"qty": 0}) == 3
            assert await dal.items.exists({"name": "n6"})
            item = await dal.items.update(first.items[0].id, expected_version=1, qty=9)
            assert (item.qty, item.version) == (9, 2)
            with pytest.raises(ConcurrencyConflict, match="version 2, not 1"):
                await dal.items.delete(item.id, expected_version=1)
            assert await dal.items.delete(item.id, expected_version=2)
            assert not await dal.items.delete(item.id)
            assert (await dal.items.require(first.items[1].id)).name == "n5"

    async def test_validation_errors(self, dm: DataManager) -> None:
        """AsyncStore validates attributes and filters like Store."""
        async with dm.dal() as dal:
            with pytest.raises(ValueError, match="unknown attribute 'colour'"):
                await dal.items.create(name="a", colour="red")
            with pytest.raises(ValueError, match="unknown operator 'near'"):
                await dal.items.search({"qty__near": 1})

    async def test_an_async_store_in_a_sync_context_says_so_before_any_sql(
        self, dm: DataManager, db: AsyncDatabase
    ) -> None:
        """In a ``with`` context an AsyncStore refuses clearly, writing nothing.

        (It used to flush through the sync session, then fail to await the result.)
        """
        with dm.dal() as dal:
            for call in (
                lambda: dal.items.count(),
                lambda: dal.items.create(name="x"),
                lambda: dal.items.get(1),
            ):
                with pytest.raises(
                    ResourceException, match='AsyncStore: its methods need a context entered with "async with'
                ):
                    await call()
        assert await names(db) == []


async def test_async_dal_writes_in_hooks_are_committed(dm: DataManager, db: AsyncDatabase) -> None:
    """An AsyncDatabase: a commit hook's write through the DAL is committed as the session closes."""

    async def hook(ctx: DataAccessContext) -> None:
        await ctx.dal.items.create(name="commit hook")

    async with dm.context() as ctx:
        await ctx.dal.items.create(name="body")
        ctx.on_commit(hook, ctx)
    assert await names(db) == ["body", "commit hook"]
    assert ctx.get_hook_errors() == ctx.get_resource_exit_errors() == []


async def test_async_a_failed_commits_rollback_hook_can_write(dm: DataManager, db: AsyncDatabase) -> None:
    """AsyncDatabase: the body's COMMIT fails; the rollback hook's failure record is committed."""
    ctx = dm.context()

    async def record() -> None:
        await ctx.dal.items.create(name="failure record")

    async def body() -> None:
        async with ctx:
            session = await ctx.aget("db")
            session.add_all([Item(name="same"), Item(name="same")])  # flushed by the COMMIT
            ctx.on_rollback(record)

    with pytest.raises(IntegrityError):
        await body()
    assert await names(db) == ["failure record"]
    assert ctx.get_hook_errors() == []


class TestReadOnly:
    async def test_read_only_install_refuses_writes(self, dm: DataManager, db: AsyncDatabase) -> None:
        """An AsyncDatabase installed read-only refuses ORM and raw writes."""
        db.install(dm, name="replica", read_only=True)
        dm.register_services(replica=AsyncItems(database="replica"))

        async def orm(ctx: DataAccessContext) -> None:
            await ctx.dal.replica.create(name="a")

        async def raw(ctx: DataAccessContext) -> None:
            session = await ctx.aget("replica")
            await session.execute(insert(Item).values(name="b", version=1))

        for body in (orm, raw):
            with pytest.raises(ReadOnlyError):
                await run(dm, body)
        assert await names(db) == []

    async def test_read_only_context_is_rolled_back(self, dm: DataManager, db: AsyncDatabase) -> None:
        """read_only(async_session) makes one context read-only; the next one writes again."""
        async with dm.context() as ctx:
            session = await ctx.aget("db")
            read_only(session)
            assert await ctx.dal.items.count() == 0
            session.add(Item(name="dropped"))
            with pytest.raises(ReadOnlyError):
                await session.flush()
        async with dm.dal() as dal:
            await dal.items.create(name="kept")
        assert await names(db) == ["kept"]


def bump_version(session: Session, item_id: int) -> None:
    session.execute(
        update(Item).where(Item.id == item_id).values(version=Item.version + 1),
        execution_options={"synchronize_session": False},
    )


class TestConcurrency:
    async def test_two_tasks_one_version_one_wins(self, dm: DataManager) -> None:
        """Two tasks update the same seen version: one commits, the other gets a conflict."""
        async with dm.dal() as dal:
            item_id = (await dal.items.create(name="orig")).id

        async def writer(name: str) -> str:
            try:
                async with dm.dal() as dal:
                    await dal.items.update(item_id, expected_version=1, name=name)
            except ConcurrencyConflict:
                return "conflict"
            return "won"

        outcome = await asyncio.gather(writer("t1"), writer("t2"))
        assert sorted(outcome) == ["conflict", "won"]
        async with dm.dal() as dal:
            row = await dal.items.require(item_id)
            assert row.name == ("t1" if outcome[0] == "won" else "t2")
            assert row.version == 2

    @pytest.mark.parametrize("when", ["body", "commit"])
    @pytest.mark.parametrize("session_class", ["polydatum", "plain"])
    async def test_stale_flush_is_a_conflict(
        self, db: AsyncDatabase, url: str, session_class: str, when: str
    ) -> None:
        """A stale row flushed in the body or at commit is a ConcurrencyConflict, any session class."""
        options = {"sync_session_class": Session} if session_class == "plain" else {}
        other = AsyncDatabase(url, session_options=options)
        dm = DataManager()
        other.install(dm)
        dm.register_services(items=AsyncItems())
        async with dm.dal() as dal:
            item_id = (await dal.items.create(name="a")).id

        async def body(ctx: DataAccessContext) -> None:
            session: AsyncSession = await ctx.aget("db")
            item = await session.get(Item, item_id)
            assert item is not None
            await session.run_sync(bump_version, item_id)
            item.qty = 3
            if when == "body":
                await session.flush()

        with pytest.raises(ConcurrencyConflict):
            await run(dm, body)
        await other.dispose()


class Counters(Service):
    async def bump(self, gate: asyncio.Event | None, arrived: list[int]) -> None:
        session: AsyncSession = await self._ctx.aget("db")
        counter = await session.get(Counter, 1)
        assert counter is not None
        if gate is not None:
            arrived.append(1)
            if len(arrived) == 2:
                gate.set()
            await gate.wait()
        counter.value += 1
        await session.flush()


async def test_aretry_makes_conflicting_serializable_tasks_serial(pg_url: str) -> None:
    """PostgreSQL: two SERIALIZABLE tasks that conflict both commit with aretry()."""
    db = AsyncDatabase(pg_url, isolation_level="SERIALIZABLE")
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(insert(Counter).values(id=1, value=0))
    dm = DataManager()
    db.install(dm)
    dm.register_services(counters=Counters())
    gate = asyncio.Event()
    arrived: list[int] = []
    attempts: list[str] = []

    def work(name: str) -> Callable[[DataAccessLayer], Awaitable[None]]:
        async def unit(dal: DataAccessLayer) -> None:
            first = name not in attempts
            attempts.append(name)
            await dal.counters.bump(gate if first else None, arrived)

        return unit

    try:
        await asyncio.gather(
            aretry(dm, work("a"), attempts=5, backoff=0.01),
            aretry(dm, work("b"), attempts=5, backoff=0.01),
        )
        assert len(attempts) == 3
        async with db.engine.connect() as conn:
            assert (await conn.execute(select(Counter.value))).scalar_one() == 2
    finally:
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
        await db.dispose()


async def test_aretry_never_repeats_a_committed_attempt(dm: DataManager, db: AsyncDatabase) -> None:
    """aretry() raises, without another attempt, once the unit of work committed by itself."""
    calls: list[int] = []

    async def work(dal: DataAccessLayer) -> None:
        calls.append(1)
        await dal.items.create(name="once")
        session: AsyncSession = await dm.require_active_context().aget("db")
        await session.commit()
        raise Boom

    with pytest.raises(Boom):
        await aretry(dm, work, attempts=3, backoff=0, retry_if=lambda exc: isinstance(exc, Boom))
    assert len(calls) == 1
    assert await names(db) == ["once"]


async def test_aretry_gives_up_after_its_attempts(dm: DataManager, db: AsyncDatabase) -> None:
    """aretry() runs a transiently failing unit of work `attempts` times, then raises; nothing kept."""
    calls: list[int] = []

    async def work(dal: DataAccessLayer) -> None:
        calls.append(1)
        await dal.items.create(name=f"try{len(calls)}")
        raise Boom

    with pytest.raises(Boom):
        await aretry(dm, work, attempts=3, backoff=0, retry_if=lambda exc: isinstance(exc, Boom))
    assert len(calls) == 3
    assert await names(db) == []
    with pytest.raises(ValueError, match="attempts must be an int"):
        await aretry(dm, work, attempts=0)


def test_async_database_in_a_sync_context_gives_a_session(tmp_path: Any) -> None:
    """An AsyncDatabase serves `with dm.context()` too, with a Session of its sync side."""
    dm = DataManager()
    db = AsyncDatabase(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}").install(dm)
    Base.metadata.create_all(db.sync.engine)
    dm.register_services(items=Items())
    with dm.dal() as dal:
        assert dal.items.create(name="sync").id == 1
    with dm.context() as ctx:
        assert isinstance(ctx.db, Session)
        assert ctx.db.scalars(select(Item.name)).all() == ["sync"]
    db.sync.dispose()


async def test_sync_database_in_an_async_context(tmp_path: Any) -> None:
    """A sync Database works inside `async with dm.context()`: commit and rollback as usual."""
    sync_db = Database(f"sqlite:///{tmp_path / 'sync.db'}")
    Base.metadata.create_all(sync_db.engine)
    dm = DataManager()
    sync_db.install(dm)
    dm.register_services(items=Items())
    async with dm.dal() as dal:
        dal.items.create(name="kept")

    async def body(ctx: DataAccessContext) -> None:
        ctx.dal.items.create(name="lost")
        raise Boom

    with pytest.raises(Boom):
        await run(dm, body)
    with sync_db.session() as session:
        assert [i.name for i in session.scalars(select(Item))] == ["kept"]
    assert sync_db.engine.pool.checkedout() == 0
    sync_db.dispose()


async def test_ping(db: AsyncDatabase) -> None:
    """await ping() is True on a reachable database; await health() reports the primary."""
    assert await db.ping() is True
    assert [node.ok for node in await db.health()] == [True]


async def test_ping_is_false_when_unreachable() -> None:
    """await ping() is False when nothing listens; await health() raises OperationalError saying why."""
    db = AsyncDatabase(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
        connect_args={"connect_timeout": 2},
    )
    assert await db.ping() is False
    with pytest.raises(OperationalError):
        await db.health()
    await db.dispose()


async def test_own_read_only_session(db: AsyncDatabase) -> None:
    """AsyncDatabase.session(read_only=True) refuses to flush changes."""
    session = db.session(read_only=True)
    session.add(Item(name="a"))
    with pytest.raises(ReadOnlyError):
        await session.flush()
    await session.close()

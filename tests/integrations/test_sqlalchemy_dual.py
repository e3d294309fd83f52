"""One AsyncDatabase serving ``with`` and ``async with`` contexts: the sync side, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import AsyncAdaptedQueuePool

from polydatum import DataManager
from polydatum.context import DataAccessContext
from polydatum.sqlalchemy import AsyncDatabase, Database, ReadOnlyError, read_only
from polydatum.testing import async_transactional_database, transactional_database
from tests.support.servers import free_port
from tests.support.sql import AsyncItems, Base, Item, Items


class Boom(Exception):
    """Raised to make a context roll back."""


@pytest.fixture(name="url", params=["aiosqlite", "postgresql"])
def fixture_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The async URL of each backend."""
    if request.param == "aiosqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(name="adb")
async def fixture_adb(url: str) -> AsyncIterator[AsyncDatabase]:
    """An AsyncDatabase with the test tables, dropped afterwards."""
    adb = AsyncDatabase(url)
    async with adb.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield adb
    async with adb.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
    await adb.dispose()


def wire(adb: AsyncDatabase, **install: Any) -> DataManager:
    """One DataManager: the database, a sync store and an async store of the same table."""
    dm = DataManager()
    adb.install(dm, **install)
    dm.register_services(items=Items(), aitems=AsyncItems())
    return dm


def in_context(dm: DataManager, body: Callable[[DataAccessContext], object]) -> None:
    """Run ``body(ctx)`` in a new sync context of ``dm``."""
    with dm.context() as ctx:
        body(ctx)


def create_then_fail(ctx: DataAccessContext) -> None:
    """Write a row, then raise so that the context rolls back."""
    ctx.dal.items.create(name="lost", qty=1)
    raise Boom


async def names(adb: AsyncDatabase) -> list[str]:
    """Item names as a connection of the async engine sees them."""
    async with adb.engine.connect() as conn:
        return sorted((await conn.execute(select(Item.name))).scalars())


class TestBothKinds:
    """``with`` and ``async with`` contexts of one DataManager read and write the same rows."""

    async def test_each_kind_of_context_gets_its_kind_of_session(self, adb: AsyncDatabase) -> None:
        """A ``with`` context's ``ctx.db`` is a Session; an ``async with`` one's is an AsyncSession."""
        dm = wire(adb)
        with dm.context() as ctx:
            assert type(ctx.db) is not AsyncSession
            assert isinstance(ctx.db, Session)
        async with dm.context() as actx:
            assert isinstance(await actx.aget("db"), AsyncSession)

    async def test_sync_and_async_contexts_share_rows(self, adb: AsyncDatabase) -> None:
        """What a sync context commits an async one reads, and the other way round."""
        dm = wire(adb)
        with dm.dal() as dal:
            made = dal.items.create(name="from a worker", qty=1)
        async with dm.dal() as adal:
            assert (await adal.aitems.require(made.id)).name == "from a worker"
            other = await adal.aitems.create(name="from the web", qty=2)
        with dm.dal() as dal:
            assert dal.items.require(other.id).qty == 2
            dal.items.update(other.id, qty=3)
        async with dm.dal() as adal:
            assert (await adal.aitems.require(other.id)).qty == 3
        assert await names(adb) == ["from a worker", "from the web"]

    async def test_a_failing_sync_context_rolls_back(self, adb: AsyncDatabase) -> None:
        """A sync context that raises leaves nothing, runs its rollback hooks, returns its connection."""
        dm = wire(adb)
        events: list[str] = []

        def body(ctx: DataAccessContext) -> None:
            ctx.on_rollback(events.append, "rolled back")
            create_then_fail(ctx)

        with pytest.raises(Boom):
            in_context(dm, body)
        assert events == ["rolled back"]
        assert await names(adb) == []
        assert adb.sync.engine.pool.checkedout() == 0

    async def test_sync_contexts_in_threads(self, adb: AsyncDatabase) -> None:
        """Sync contexts in several threads (a threaded worker pool) each commit their own row."""
        dm = wire(adb)
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                with dm.dal() as dal:
                    dal.items.create(name=f"thread-{i}", qty=i)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert await names(adb) == sorted(f"thread-{i}" for i in range(8))

    async def test_without_transaction_a_sync_context_commits_nothing(self, adb: AsyncDatabase) -> None:
        """install(transaction=False): the sync side's uncommitted work is rolled back at close."""
        dm = wire(adb, transaction=False)
        with dm.dal() as dal:
            dal.items.create(name="never committed", qty=1)
        with dm.context() as ctx:
            ctx.dal.items.create(name="committed by hand", qty=1)
            ctx.db.commit()
        assert await names(adb) == ["committed by hand"]

    async def test_read_only_install_covers_both_sides(self, adb: AsyncDatabase) -> None:
        """install(read_only=True) refuses writes in sync and async contexts alike."""
        dm = wire(adb, read_only=True)
        with pytest.raises(ReadOnlyError), dm.dal() as dal:
            dal.items.create(name="sync write", qty=1)
        with pytest.raises(ReadOnlyError):
            async with dm.dal() as adal:
                await adal.aitems.create(name="async write", qty=1)
        with pytest.raises(ReadOnlyError), dm.context() as ctx:  # raw SQL, refused by the database
            ctx.db.execute(text("INSERT INTO items (name, version) VALUES ('raw', 1)"))
        assert await names(adb) == []

    async def test_read_only_call_on_a_sync_session(self, adb: AsyncDatabase) -> None:
        """read_only(ctx.db) in a sync context of an AsyncDatabase refuses the context's writes."""
        dm = wire(adb)

        def body(ctx: DataAccessContext) -> None:
            read_only(ctx.db)
            ctx.dal.items.create(name="refused", qty=1)

        with pytest.raises(ReadOnlyError):
            in_context(dm, body)
        assert await names(adb) == []


class TestSyncSide:
    """How the sync side is made, configured and refused."""

    async def test_pure_async_use_makes_no_sync_engine(self, tmp_path: Path) -> None:
        """Async contexts, and sync contexts that never read the session, create no sync engine."""
        adb = AsyncDatabase(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
        dm = wire(adb)
        async with dm.context() as ctx:
            await ctx.aget("db")
        with dm.context():
            pass
        assert adb._sync is None
        await adb.dispose()

    @pytest.mark.parametrize(
        ("url", "sync_driver"),
        [
            ("postgresql+psycopg://app@127.0.0.1:1/app", "postgresql+psycopg"),
            ("postgresql+psycopg_async://app@127.0.0.1:1/app", "postgresql+psycopg"),
            ("sqlite+aiosqlite:///app.db", "sqlite"),
        ],
    )
    def test_the_sync_url_is_derived_from_the_async_one(self, url: str, sync_driver: str) -> None:
        """The sync side uses the same database through the matching sync driver."""
        adb = AsyncDatabase(url)
        assert isinstance(adb.sync, Database)
        assert adb.sync.url.drivername == sync_driver
        assert adb.sync.url.database == adb.url.database
        assert adb.sync is adb.sync  # made once

    def test_asyncpg_maps_to_psycopg(self) -> None:
        """postgresql+asyncpg (not installed here) maps to postgresql+psycopg, keeping host and user."""
        from sqlalchemy.engine import make_url

        from polydatum.sqlalchemy._database import _derive_sync_url

        derived = _derive_sync_url(make_url("postgresql+asyncpg://app:pw@db.internal:5433/app"))
        assert not isinstance(derived, str)
        assert derived.render_as_string(hide_password=False) == (
            "postgresql+psycopg://app:pw@db.internal:5433/app"
        )

    async def test_explicit_sync_url_and_options(self, tmp_path: Path) -> None:
        """sync_url= and sync_engine_options= configure the sync side; session options carry over."""

        class MySession(Session):
            pass

        adb = AsyncDatabase(
            f"sqlite+aiosqlite:///{tmp_path / 'a.db'}",
            sync_url=f"sqlite:///{tmp_path / 'a.db'}",
            sync_engine_options={"echo": False, "pool_size": 3},
            session_options={"sync_session_class": MySession, "autoflush": False},
        )
        assert adb.sync.engine.pool.size() == 3  # type: ignore[attr-defined]
        with adb.sync.session() as session:
            assert isinstance(session, MySession)
            assert session.autoflush is False
            assert session.expire_on_commit is False
        await adb.dispose()

    def test_an_async_sync_url_is_refused(self, tmp_path: Path) -> None:
        """sync_url with an async driver raises ValueError at construction, hiding the password."""
        with pytest.raises(ValueError, match="names an async driver") as refused:
            AsyncDatabase(
                f"sqlite+aiosqlite:///{tmp_path / 'a.db'}",
                sync_url="postgresql+psycopg_async://app:hunter2@db/app",
            )
        assert "hunter2" not in str(refused.value)

    async def test_private_memory_database_cannot_serve_sync_contexts(self) -> None:
        """sqlite+aiosqlite:// in a sync context raises RuntimeError naming sync_url=; unused, it is fine."""
        adb = AsyncDatabase("sqlite+aiosqlite://")
        dm = wire(adb)
        with dm.context():
            pass  # the session is never read: nothing to refuse
        with pytest.raises(RuntimeError, match=r"cannot serve a sync.*in-memory.*sync_url="):
            in_context(dm, lambda ctx: ctx.db)
        with pytest.raises(RuntimeError, match="sync_url="):
            adb.sync.ping()
        await adb.dispose()

    async def test_shared_memory_database_is_one_database(self) -> None:
        """A shared-cache in-memory SQLite URL is the same data on both sides."""
        name = f"file:dual{free_port()}?mode=memory&cache=shared&uri=true"
        adb = AsyncDatabase(
            f"sqlite+aiosqlite:///{name}", poolclass=AsyncAdaptedQueuePool, sync_engine_options={}
        )
        dm = wire(adb)
        async with adb.engine.begin() as conn:  # keeps the memory database alive meanwhile
            await conn.run_sync(Base.metadata.create_all)
        keep = await adb.engine.connect()
        with dm.dal() as dal:
            dal.items.create(name="shared", qty=1)
        async with dm.dal() as adal:
            assert [i.name for i in await adal.aitems.search()] == ["shared"]
        await keep.close()
        await adb.dispose()


class TestHealthAndPools:
    """ping, check and dispose cover both engines."""

    async def test_ping_check_and_dispose(self, adb: AsyncDatabase) -> None:
        """sync.ping() checks the sync side, await ping() the async one; health() both; dispose() both."""
        assert adb.sync.ping() is True
        assert await adb.ping() is True
        assert [node.name for node in await adb.health()] == ["primary"]
        dm = wire(adb)
        with dm.dal() as dal:
            dal.items.create(name="x", qty=1)
        assert adb.sync.engine.pool.checkedin() >= 1  # type: ignore[attr-defined]
        await adb.dispose()
        assert adb.sync.engine.pool.checkedin() == 0  # type: ignore[attr-defined]

    async def test_ping_is_false_and_check_raises_when_unreachable(self) -> None:
        """Both pings return False when nothing listens; health() raises OperationalError saying why."""
        adb = AsyncDatabase(
            f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
            connect_args={"connect_timeout": 2},
        )
        assert adb.sync.ping() is False
        assert await adb.ping() is False
        with pytest.raises(OperationalError):
            await adb.health()
        await adb.dispose()


@pytest.fixture(name="pg_adb")
async def fixture_pg_adb(pg_url: str) -> AsyncIterator[AsyncDatabase]:
    """An AsyncDatabase on PostgreSQL with the test tables, dropped afterwards."""
    adb = AsyncDatabase(pg_url)
    async with adb.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield adb
    async with adb.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
    await adb.dispose()


class TestPinning:
    """The testing helpers roll back both sides."""

    async def test_async_transactional_database_pins_the_sync_side_too(self, pg_adb: AsyncDatabase) -> None:
        """Sync and async contexts inside the block commit to savepoints; all of it is gone after."""
        dm = wire(pg_adb)
        async with async_transactional_database(pg_adb):
            async with dm.dal() as adal:
                await adal.aitems.create(name="async, pinned", qty=1)
            with dm.dal() as dal:
                dal.items.create(name="sync, pinned", qty=1)
            with dm.dal() as dal:
                assert [i.name for i in dal.items.search()] == ["sync, pinned"]
            with pytest.raises(Boom):
                in_context(dm, create_then_fail)
        assert await names(pg_adb) == []
        assert pg_adb.sync.engine.pool.checkedout() == 0
        with dm.dal() as dal:  # unpinned: real commits again
            dal.items.create(name="real", qty=1)
        assert await names(pg_adb) == ["real"]

    async def test_async_pin_without_sync_use_makes_no_sync_engine(self, adb: AsyncDatabase) -> None:
        """A pinned test that runs only async contexts never creates the sync side."""
        dm = wire(adb)
        async with async_transactional_database(adb), dm.dal() as adal:
            await adal.aitems.create(name="a", qty=1)
        assert adb._sync is None
        assert await names(adb) == []

    async def test_transactional_database_pins_the_sync_side(self, adb: AsyncDatabase) -> None:
        """transactional_database(adb) pins the sessions of sync contexts and refuses to nest."""
        dm = wire(adb)
        with transactional_database(adb) as connection:
            with dm.dal() as dal:
                dal.items.create(name="rolled back", qty=1)
            assert connection.execute(text("SELECT count(*) FROM items")).scalar_one() == 1
            with pytest.raises(RuntimeError, match="do not nest"):
                transactional_database(adb).__enter__()
        assert await names(adb) == []
        assert adb.sync.engine.pool.checkedout() == 0

    async def test_both_pins_on_postgresql(self, pg_adb: AsyncDatabase) -> None:
        """With both helpers, each side keeps its own pinned transaction; nothing survives."""
        dm = wire(pg_adb)
        with transactional_database(pg_adb):
            async with async_transactional_database(pg_adb):
                with dm.dal() as dal:
                    dal.items.create(name="sync", qty=1)
                async with dm.dal() as adal:
                    await adal.aitems.create(name="async", qty=1)
                    assert [i.name for i in await adal.aitems.search()] == ["async"]
        assert await names(pg_adb) == []

    async def test_sqlite_refuses_pinning_both_sides(self, tmp_path: Path) -> None:
        """On SQLite a second pinned side raises RuntimeError at once instead of waiting for the lock."""
        adb = AsyncDatabase(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
        async with adb.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        dm = wire(adb)
        async with async_transactional_database(adb):
            with pytest.raises(RuntimeError, match="one side per test"), dm.dal() as dal:
                dal.items.create(name="sync", qty=1)
            with pytest.raises(RuntimeError, match="one side per test"):
                transactional_database(adb).__enter__()
        with transactional_database(adb), pytest.raises(RuntimeError, match="one side per test"):
            await async_transactional_database(adb).__aenter__()
        assert await names(adb) == []
        await adb.dispose()

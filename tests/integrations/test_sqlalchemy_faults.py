"""Faults: PostgreSQL restarting or going away between contexts, and forked processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import OperationalError

from polydatum import DataManager
from polydatum.dal import DataAccessLayer
from polydatum.sqlalchemy import AsyncDatabase, Database
from tests.support.servers import PrivatePostgres
from tests.support.sql import AsyncItems, Base, Item, Items, fresh_postgres_database


def wire(db: Database) -> DataManager:
    dm = DataManager()
    db.install(dm)
    dm.register_services(items=Items())
    return dm


@pytest.mark.slow
class TestServerRestart:
    def test_next_context_works_after_a_restart(self, private_postgres: PrivatePostgres) -> None:
        """After pg_ctl restart between two contexts, the second context succeeds."""
        db = Database(private_postgres.url)
        Base.metadata.create_all(db.engine)
        dm = wire(db)
        with dm.dal() as dal:
            dal.items.create(name="before")
        private_postgres.restart()  # the pooled connection is now dead
        with dm.dal() as dal:
            dal.items.create(name="after")
            assert dal.items.count() == 2
        assert db.ping() is True
        assert db.engine.pool.checkedout() == 0
        db.dispose()

    def test_server_gone_mid_context_then_back(self, private_postgres: PrivatePostgres) -> None:
        """A context whose server stops raises OperationalError, leaks nothing, and later ones work."""
        db = Database(private_postgres.url)
        Base.metadata.create_all(db.engine)
        dm = wire(db)

        def body(dal: DataAccessLayer) -> None:
            dal.items.create(name="lost")
            private_postgres.stop(mode="immediate")
            dal.items.count()

        with pytest.raises(OperationalError):
            run(dm, body)
        assert db.engine.pool.checkedout() == 0
        assert db.ping() is False
        with pytest.raises(OperationalError):
            db.health()
        private_postgres.start()
        assert db.ping() is True
        with dm.dal() as dal:
            assert dal.items.count() == 0
        db.dispose()

    def test_failed_rollback_is_logged_and_the_body_error_wins(
        self, private_postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The server dies, then the body raises: the failed ROLLBACK is logged, Boom propagates."""
        db = Database(private_postgres.url)
        Base.metadata.create_all(db.engine)
        dm = wire(db)

        def body(dal: DataAccessLayer) -> None:
            dal.items.create(name="lost")
            private_postgres.stop(mode="immediate")
            raise Boom

        with caplog.at_level(logging.WARNING, logger="polydatum.sqlalchemy"), pytest.raises(Boom):
            run(dm, body)
        failed = [r for r in caplog.records if r.getMessage() == "rollback of 'db' failed"]
        assert len(failed) == 1
        assert failed[0].exc_info is not None
        assert db.engine.pool.checkedout() == 0
        private_postgres.start()
        with dm.dal() as dal:
            assert dal.items.count() == 0
        db.dispose()

    async def test_async_failed_rollback_is_logged_and_the_body_error_wins(
        self, private_postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture
    ) -> None:
        """AsyncDatabase: a ROLLBACK on a dead server is logged; the body's error propagates."""
        db = AsyncDatabase(private_postgres.url)
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        dm = DataManager()
        db.install(dm)
        dm.register_services(items=AsyncItems())

        async def body() -> None:
            async with dm.dal() as dal:
                await dal.items.create(name="lost")
                await asyncio.to_thread(private_postgres.stop, mode="immediate")
                raise Boom

        with caplog.at_level(logging.WARNING, logger="polydatum.sqlalchemy"), pytest.raises(Boom):
            await body()
        assert [r.getMessage() for r in caplog.records].count("rollback of 'db' failed") == 1
        assert db.engine.pool.checkedout() == 0
        await asyncio.to_thread(private_postgres.start)
        async with dm.dal() as dal:
            assert await dal.items.count() == 0
        await db.dispose()

    def test_without_pre_ping_one_context_fails_then_all_work(
        self, private_postgres: PrivatePostgres
    ) -> None:
        """With pool_pre_ping=False the first context after a restart fails; the next one works."""
        db = Database(private_postgres.url, pool_pre_ping=False)
        Base.metadata.create_all(db.engine)
        dm = wire(db)
        with dm.dal() as dal:
            dal.items.create(name="before")
        private_postgres.restart()
        with pytest.raises(OperationalError), dm.dal() as dal:
            dal.items.count()
        assert db.engine.pool.checkedout() == 0
        with dm.dal() as dal:
            dal.items.create(name="after")
            assert dal.items.count() == 2
        db.dispose()

    async def test_async_next_context_works_after_a_restart(self, private_postgres: PrivatePostgres) -> None:
        """AsyncDatabase: after pg_ctl restart between two contexts, the second one succeeds."""
        db = AsyncDatabase(private_postgres.url)
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        dm = DataManager()
        db.install(dm)
        dm.register_services(items=AsyncItems())
        async with dm.dal() as dal:
            await dal.items.create(name="before")
        await asyncio.to_thread(private_postgres.restart)
        async with dm.dal() as dal:
            await dal.items.create(name="after")
            assert await dal.items.count() == 2
        assert await db.ping() is True
        assert db.engine.pool.checkedout() == 0
        await db.dispose()


class Boom(Exception):
    pass


def run(dm: DataManager, body: Any) -> None:
    with dm.dal() as dal:
        body(dal)


@pytest.fixture(name="fork_url", params=["sqlite", "postgresql"])
def fixture_fork_url(request: pytest.FixtureRequest, tmp_path: Any, postgres_url: str) -> Iterator[str]:
    """A database of this test's own on each backend."""
    if request.param == "sqlite":
        # Four writer processes take turns on one file; on a loaded machine a
        # turn can take longer than sqlite3's 5 s default wait for the lock.
        yield f"sqlite:///{tmp_path / 'fork.db'}?timeout=120"
        return
    with fresh_postgres_database(postgres_url) as url:
        yield url


CHILDREN = 4
CONTEXTS = 50


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_children_never_share_a_connection(fork_url: str) -> None:
    """Four children of a parent that used the pool run 50 contexts each on connections of their own."""
    db = Database(fork_url)
    is_pg = db.engine.dialect.name == "postgresql"

    # Every connection remembers the process that opened it; a checkout in any
    # other process is a shared connection.
    @event.listens_for(db.engine, "connect")
    def born(dbapi_connection: Any, record: Any) -> None:
        record.info["born_in"] = os.getpid()

    misuse: list[int] = []

    @event.listens_for(db.engine, "checkout")
    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.get("born_in") != os.getpid():
            misuse.append(os.getpid())

    Base.metadata.create_all(db.engine)

    def backend(dal: DataAccessLayer) -> int:
        session = dm.require_active_context().db
        return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one()) if is_pg else 0

    dm = wire(db)
    with dm.dal() as dal:
        dal.items.create(name="parent")
        parent_backend = backend(dal)
    assert db.engine.pool.checkedin() == 1  # a pooled connection the children must not use

    children: list[tuple[int, int]] = []
    for k in range(CHILDREN):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            os.close(read_end)
            code = 1
            try:
                backends = set()
                for i in range(CONTEXTS):
                    with dm.dal() as dal:
                        dal.items.create(name=f"child{k}-{i}")
                        backends.add(backend(dal))
                report: dict[str, Any] = {"backends": sorted(backends), "misuse": len(misuse)}
                code = 0
            except BaseException:  # reported to the parent through the pipe
                report = {"error": traceback.format_exc()}
            os.write(write_end, json.dumps(report).encode())
            os._exit(code)
        os.close(write_end)
        children.append((pid, read_end))

    reports = []
    for pid, read_end in children:
        with os.fdopen(read_end, "rb") as pipe:
            reports.append(json.loads(pipe.read() or b'{"error": "no report"}'))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, reports[-1]

    assert all(r["misuse"] == 0 for r in reports), reports
    assert misuse == []
    if is_pg:
        seen = [set(r["backends"]) for r in reports] + [{parent_backend}]
        assert sum(len(s) for s in seen) == len(set().union(*seen)), "a backend was shared"
    with dm.dal() as dal:
        assert backend(dal) == parent_backend  # the parent's connection survived the children
        assert dal.items.count() == 1 + CHILDREN * CONTEXTS
    with db.engine.connect() as conn:
        assert len(conn.execute(select(Item.id)).all()) == 1 + CHILDREN * CONTEXTS
    Base.metadata.drop_all(db.engine)
    db.dispose()

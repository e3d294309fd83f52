"""polydatum.sqlalchemy on SQLite and PostgreSQL: sessions, transactions, read-only, health."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, InvalidRequestError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from polydatum import DataManager
from polydatum.context import DataAccessContext
from polydatum.errors import ConcurrencyConflict
from polydatum.sqlalchemy import (
    AsyncDatabase,
    Database,
    ReadOnlyError,
    read_only,
    transaction_middleware,
)
from tests.support.servers import free_port
from tests.support.sql import (
    Base,
    Item,
    Items,
    Tags,
    server_connections,
)


@pytest.fixture(name="dm")
def fixture_dm(db: Database) -> DataManager:
    """A DataManager with ``db`` installed and the test stores registered."""
    dm = DataManager()
    db.install(dm, name="db")
    dm.register_services(items=Items(), tags=Tags())
    return dm


def names(db: Database) -> list[str]:
    """Item names as a separate connection sees them (so only committed rows)."""
    with db.engine.connect() as conn:
        return sorted(conn.execute(select(Item.name)).scalars())


class Boom(Exception):
    pass


def run(dm: DataManager, body: Callable[[DataAccessContext], object]) -> DataAccessContext:
    """Run ``body(ctx)`` in a new context of ``dm``; return the (exited) context."""
    ctx = dm.context()
    with ctx:
        body(ctx)
    return ctx


def run_in(ctx: DataAccessContext, body: Callable[[DataAccessContext], object]) -> None:
    """Run ``body(ctx)`` inside ``ctx``."""
    with ctx:
        body(ctx)


def raise_boom(ctx: DataAccessContext) -> None:
    raise Boom


class TestTransactions:
    def test_clean_context_commits_every_write(self, dm: DataManager, db: Database) -> None:
        """A context that ends cleanly commits all of its writes."""
        with dm.dal() as dal:
            dal.items.create(name="a")
            dal.items.create(name="b")
        assert names(db) == ["a", "b"]

    def test_raising_context_leaves_no_row(self, dm: DataManager, db: Database) -> None:
        """A context that raises rolls back every write it made and re-raises."""

        def body(ctx: DataAccessContext) -> None:
            ctx.dal.items.create(name="a")
            ctx.dal.items.create(name="b")
            raise Boom

        with pytest.raises(Boom):
            run(dm, body)
        assert names(db) == []

    def test_on_commit_hook_runs_after_a_durable_commit(self, dm: DataManager, db: Database) -> None:
        """on_commit hooks run after the commit: another connection already sees the row."""
        seen: list[list[str]] = []
        with dm.context() as ctx:
            ctx.dal.items.create(name="a")
            ctx.on_commit(lambda: seen.append(names(db)))
            ctx.on_rollback(lambda: seen.append(["rolled back"]))
        assert seen == [["a"]]
        assert ctx.get_hook_errors() == []

    def test_on_rollback_hook_runs_and_nothing_is_committed(self, dm: DataManager, db: Database) -> None:
        """on_rollback hooks run (and on_commit ones do not) when the context raises."""
        seen: list[str] = []

        def body(ctx: DataAccessContext) -> None:
            ctx.dal.items.create(name="a")
            ctx.on_commit(seen.append, "committed")
            ctx.on_rollback(seen.append, "rolled back")
            raise Boom

        with pytest.raises(Boom):
            run(dm, body)
        assert seen == ["rolled back"]
        assert names(db) == []

    def test_dal_writes_in_hooks_and_teardowns_are_committed(self, dm: DataManager, db: Database) -> None:
        """Writes after the context's COMMIT (a commit hook, a resource's teardown) are kept, not lost.

        They run in a transaction of their own, committed as the session
        closes; closing alone used to roll them back without a word.
        """

        def audit(ctx: DataAccessContext) -> Any:
            yield None
            ctx.dal.items.create(name="audit")  # a 1.0-style buffer flushed through a service

        dm.register_resources(audit=audit)
        with dm.context() as ctx:
            ctx.dal.items.create(name="body")
            ctx.on_commit(lambda: ctx.dal.items.create(name="commit hook"))
            ctx.on_rollback(lambda: ctx.dal.items.create(name="never"))
            assert ctx.audit is None
        assert names(db) == ["audit", "body", "commit hook"]
        assert ctx.get_hook_errors() == ctx.get_resource_exit_errors() == []

    def test_a_rollback_hooks_writes_are_kept_and_the_bodys_are_not(
        self, dm: DataManager, db: Database
    ) -> None:
        """A failed context: its body's write is rolled back, what its rollback hook wrote stays."""

        def body(ctx: DataAccessContext) -> None:
            ctx.dal.items.create(name="body")
            ctx.on_rollback(lambda: ctx.dal.items.create(name="failure record"))
            raise Boom

        with pytest.raises(Boom):
            run(dm, body)
        assert names(db) == ["failure record"]

    def test_a_hook_that_makes_the_session_first_commits_its_write(
        self, dm: DataManager, db: Database
    ) -> None:
        """The body failed before any SQL: the session is made by the rollback hook, and its write is kept."""

        def body(ctx: DataAccessContext) -> None:
            ctx.on_rollback(lambda: ctx.dal.items.create(name="failure record"))
            raise Boom

        with pytest.raises(Boom):
            run(dm, body)
        assert names(db) == ["failure record"]

    def test_a_failed_commits_rollback_hook_can_write(self, dm: DataManager, db: Database) -> None:
        """The body's COMMIT fails (a duplicate flushed at commit): the rollback hook's failure record stays.

        (The session was left in its failed transaction, so the hook's write raised.)
        """

        def body(ctx: DataAccessContext) -> None:
            ctx.db.add_all([Item(name="same"), Item(name="same")])  # flushed by the COMMIT
            ctx.on_rollback(lambda: ctx.dal.items.create(name="failure record"))

        ctx = dm.context()
        with pytest.raises(IntegrityError):
            run_in(ctx, body)
        assert names(db) == ["failure record"]
        assert ctx.get_hook_errors() == []

    def test_a_failing_write_after_the_commit_is_reported_and_keeps_the_commit(
        self, dm: DataManager, db: Database, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A hook's write that fails at its own COMMIT: logged, collected, and the context's commit stands."""
        with dm.context() as ctx:
            ctx.dal.items.create(name="taken")
            ctx.on_commit(lambda: ctx.db.add(Item(name="taken")))  # flushed at the closing COMMIT
        assert names(db) == ["taken"]
        errors = ctx.get_resource_exit_errors()
        assert [type(e[1]) for e in errors] == [IntegrityError]
        assert "failed while closing" in caplog.text

    def test_reads_in_a_hook_commit_nothing_of_the_body(self, dm: DataManager, db: Database) -> None:
        """A failed context whose rollback hook only reads: nothing of the body is committed."""
        counts: list[int] = []

        def body(ctx: DataAccessContext) -> None:
            ctx.dal.items.create(name="body")
            ctx.on_rollback(lambda: counts.append(ctx.dal.items.count()))
            raise Boom

        with pytest.raises(Boom):
            run(dm, body)
        assert counts == [0]
        assert names(db) == []

    def test_failed_commit_raises_and_runs_rollback_hooks(self, dm: DataManager, db: Database) -> None:
        """A commit that fails raises from the context, runs on_rollback hooks, keeps nothing."""
        seen: list[str] = []

        def body(ctx: DataAccessContext) -> None:
            ctx.db.add_all([Item(name="same"), Item(name="same")])  # flushed at commit
            ctx.on_commit(seen.append, "committed")
            ctx.on_rollback(seen.append, "rolled back")

        with pytest.raises(IntegrityError):
            run(dm, body)
        assert seen == ["rolled back"]
        assert names(db) == []
        assert db.engine.pool.checkedout() == 0

    def test_unused_session_checks_out_no_connection(self, dm: DataManager, db: Database) -> None:
        """A context that never touches SQL creates no session and checks out no connection."""
        checkouts: list[object] = []
        event.listen(db.engine, "checkout", lambda *args: checkouts.append(args))
        with dm.context() as ctx:
            assert "db" not in ctx
        assert checkouts == []
        with dm.context() as ctx:
            ctx.db.execute(text("SELECT 1"))
            assert "db" in ctx
        assert len(checkouts) == 1

    def test_error_path_closes_session_and_returns_connection(self, dm: DataManager, db: Database) -> None:
        """After a raising context the session is closed and its connection is back in the pool."""
        sessions: list[Session] = []

        def body(ctx: DataAccessContext) -> None:
            sessions.append(ctx.db)
            ctx.db.execute(text("SELECT 1"))
            assert db.engine.pool.checkedout() == 1
            raise Boom

        with pytest.raises(Boom):
            run(dm, body)
        assert db.engine.pool.checkedout() == 0
        assert not sessions[0].in_transaction()

    @pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
    def test_interrupt_rolls_back_and_returns_the_connection(
        self, dm: DataManager, db: Database, interrupt: type[BaseException]
    ) -> None:
        """Ctrl-C (or SystemExit) in the body rolls back, closes the session and propagates."""
        seen: list[str] = []
        sessions: list[Session] = []

        def body(ctx: DataAccessContext) -> None:
            ctx.dal.items.create(name="interrupted")
            sessions.append(ctx.db)
            ctx.on_commit(seen.append, "committed")
            ctx.on_rollback(seen.append, "rolled back")
            raise interrupt

        with pytest.raises(interrupt):
            run(dm, body)
        assert seen == ["rolled back"]
        assert names(db) == []
        assert db.engine.pool.checkedout() == 0
        assert not sessions[0].in_transaction()

    def test_interrupt_during_commit_keeps_nothing(self, dm: DataManager, db: Database) -> None:
        """Ctrl-C arriving while the middleware commits: nothing kept, connection returned."""
        seen: list[str] = []

        def interrupt(session: Session) -> None:
            raise KeyboardInterrupt

        def body(ctx: DataAccessContext) -> None:
            ctx.dal.items.create(name="a")
            event.listen(ctx.db, "before_commit", interrupt)
            ctx.on_commit(seen.append, "committed")
            ctx.on_rollback(seen.append, "rolled back")

        with pytest.raises(KeyboardInterrupt):
            run(dm, body)
        assert seen == ["rolled back"]
        assert names(db) == []
        assert db.engine.pool.checkedout() == 0

    def test_each_context_gets_its_own_session(self, dm: DataManager) -> None:
        """Nested and sibling contexts each get a session of their own."""
        with dm.context() as outer:
            with dm.context() as inner:
                inner_session = inner.db
            assert outer.db is not inner_session
        with dm.context() as sibling:
            assert sibling.db is not inner_session

    def test_without_transaction_middleware_commits_are_explicit(self, db: Database) -> None:
        """With transaction=False only what the code commits is kept."""
        dm = DataManager()
        db.install(dm, name="db", transaction=False)
        with dm.context() as ctx:
            ctx.db.add(Item(name="kept"))
            ctx.db.commit()
            ctx.db.add(Item(name="dropped"))
        assert names(db) == ["kept"]

    def test_savepoint_rolls_back_only_the_inner_work(self, dm: DataManager, db: Database) -> None:
        """A failing begin_nested() block is undone while the rest of the context commits."""
        with dm.context() as ctx:
            ctx.dal.items.create(name="outer")
            savepoint = ctx.db.begin_nested()
            ctx.dal.items.create(name="inner")
            with pytest.raises(Boom), savepoint:
                raise_boom(ctx)
            ctx.dal.items.create(name="after")
        assert names(db) == ["after", "outer"]

    def test_released_savepoint_is_undone_by_the_outer_rollback(self, dm: DataManager, db: Database) -> None:
        """Work in a released savepoint is still rolled back when the context raises."""

        def body(ctx: DataAccessContext) -> None:
            with ctx.db.begin_nested():
                ctx.dal.items.create(name="inner")
            raise Boom

        with pytest.raises(Boom):
            run(dm, body)
        assert names(db) == []

    def test_two_named_databases_commit_and_roll_back_together(
        self, dm: DataManager, db: Database, tmp_path: Any
    ) -> None:
        """Each named database has its own session; both commit, or neither does."""
        analytics = Database(f"sqlite:///{tmp_path / 'analytics.db'}")
        Base.metadata.create_all(analytics.engine)
        analytics.install(dm, name="analytics")
        dm.register_services(stats=Items(database="analytics"))
        with dm.context() as ctx:
            ctx.dal.items.create(name="main")
            ctx.dal.stats.create(name="event")
            assert ctx.db is not ctx.analytics

        def body(ctx: DataAccessContext) -> None:
            ctx.dal.items.create(name="lost")
            ctx.dal.stats.create(name="lost")
            raise Boom

        with pytest.raises(Boom):
            run(dm, body)
        assert names(db) == ["main"]
        assert names(analytics) == ["event"]
        analytics.dispose()

    def test_middleware_can_be_registered_by_hand(self, db: Database) -> None:
        """transaction_middleware(name) commits a resource registered without install()."""
        dm = DataManager()
        db.install(dm, name="db", transaction=False)
        dm.register_context_middleware(transaction_middleware("db"))
        dm.register_services(items=Items())
        with dm.dal() as dal:
            dal.items.create(name="a")
        assert names(db) == ["a"]

    def test_no_connection_leaks_after_500_contexts(
        self, dm: DataManager, db: Database, url: str, postgres_url: str
    ) -> None:
        """500 contexts, a third raising, leave no connection checked out and few on the server."""
        for i in range(500):
            try:
                with dm.dal() as dal:
                    dal.items.create(name=f"item{i}")
                    if i % 3 == 0:
                        raise Boom
            except Boom:
                pass
        assert db.engine.pool.checkedout() == 0
        with db.engine.connect() as conn:
            assert conn.execute(select(Item.id)).all().__len__() == 500 - 167
        if db.engine.dialect.name == "postgresql":
            database = make_url(url).database
            assert database is not None
            assert server_connections(postgres_url, database) <= db.engine.pool.size()


class TestReadOnly:
    def test_read_only_install_refuses_orm_and_sql_writes(self, dm: DataManager, db: Database) -> None:
        """A database installed read-only refuses flushes and raw INSERTs with ReadOnlyError."""
        db.install(dm, name="replica", read_only=True)
        dm.register_services(replica_items=Items(database="replica"))
        with pytest.raises(ReadOnlyError, match="read-only"), dm.dal() as dal:
            dal.replica_items.create(name="a")
        with pytest.raises(ReadOnlyError, match="read-only"), dm.context() as ctx:
            ctx.replica.execute(insert(Item).values(name="b", version=1))
        assert names(db) == []

    def test_read_only_context_reads_and_is_not_committed(self, dm: DataManager, db: Database) -> None:
        """read_only(session) lets a context read, refuses its writes, and rolls it back."""
        with dm.dal() as dal:
            dal.items.create(name="a")
        with dm.context() as ctx:
            read_only(ctx.db)
            read_only(ctx.db)  # a second call changes nothing
            assert ctx.dal.items.count() == 1
            with pytest.raises(ReadOnlyError):
                ctx.db.execute(insert(Item).values(name="raw", version=1))

        def write(ctx: DataAccessContext) -> None:
            read_only(ctx.db)
            ctx.dal.items.require(1).name = "changed"
            ctx.db.flush()

        with pytest.raises(ReadOnlyError, match="refuses to flush"):
            run(dm, write)
        assert names(db) == ["a"]

    def test_read_only_after_the_first_query_is_refused(self, dm: DataManager) -> None:
        """Calling read_only() once the session began its transaction raises RuntimeError."""

        def body(ctx: DataAccessContext) -> None:
            ctx.db.execute(text("SELECT 1"))
            read_only(ctx.db)

        with pytest.raises(RuntimeError, match="before the first query"):
            run(dm, body)

    def test_read_only_does_not_leak_into_the_next_context(self, dm: DataManager, db: Database) -> None:
        """A pooled connection used read-only accepts writes again in the next context."""
        with dm.context() as ctx:
            read_only(ctx.db)
            ctx.db.execute(text("SELECT 1"))
        with dm.dal() as dal:
            dal.items.create(name="a")
        assert names(db) == ["a"]

    def test_read_only_session_outside_a_context(self, db: Database) -> None:
        """Database.session(read_only=True) gives a session that refuses writes."""
        with db.session(read_only=True) as session:
            session.add(Item(name="a"))
            with pytest.raises(ReadOnlyError):
                session.flush()


def bump_version_behind_the_session(session: Session, item_id: int) -> None:
    """Change the row's version with Core, as another writer would, leaving the ORM object stale."""
    session.execute(
        update(Item).where(Item.id == item_id).values(version=Item.version + 1),
        execution_options={"synchronize_session": False},
    )


class TestVersioned:
    def test_version_counts_updates(self, dm: DataManager) -> None:
        """A Versioned row starts at version 1 and each update adds one."""
        with dm.dal() as dal:
            item = dal.items.create(name="a")
            assert item.version == 1
        with dm.dal() as dal:
            assert dal.items.update(item.id, expected_version=1, qty=3).version == 2

    def test_stale_write_raises_conflict_and_rolls_back(self, dm: DataManager, db: Database) -> None:
        """A flush of a row changed behind the session's back is a ConcurrencyConflict."""
        with dm.dal() as dal:
            item_id = dal.items.create(name="a").id

        def body(ctx: DataAccessContext) -> None:
            ctx.dal.items.create(name="half-written")
            item = ctx.dal.items.require(item_id)
            bump_version_behind_the_session(ctx.db, item_id)
            item.qty = 5
            ctx.db.flush()

        with pytest.raises(ConcurrencyConflict, match="reload it"):
            run(dm, body)
        assert names(db) == ["a"]

    def test_stale_delete_raises_conflict_and_keeps_the_row(self, dm: DataManager, db: Database) -> None:
        """Deleting a row that another writer changed since it was read is a conflict too."""
        with dm.dal() as dal:
            item_id = dal.items.create(name="a").id

        def body(ctx: DataAccessContext) -> None:
            _seen = ctx.dal.items.require(item_id)  # kept: the identity map holds it weakly
            bump_version_behind_the_session(ctx.db, item_id)
            ctx.dal.items.delete(item_id)

        with pytest.raises(ConcurrencyConflict) as info:
            run(dm, body)
        assert info.value.code == 409
        assert names(db) == ["a"]

    @pytest.mark.parametrize("when", ["body", "commit"])
    def test_middleware_maps_stale_data_of_plain_sessions(self, db: Database, when: str) -> None:
        """With a plain Session class the middleware still turns StaleDataError into a conflict."""
        plain = Database(db.url, session_options={"class_": Session})
        dm = DataManager()
        plain.install(dm, name="db")
        dm.register_services(items=Items())
        with dm.dal() as dal:
            item_id = dal.items.create(name="a").id

        def body(ctx: DataAccessContext) -> None:
            item = ctx.db.get(Item, item_id)
            bump_version_behind_the_session(ctx.db, item_id)
            item.qty = 5
            if when == "body":
                ctx.db.flush()

        with pytest.raises(ConcurrencyConflict):
            run(dm, body)
        plain.dispose()

    def test_expected_version_mismatch_is_a_conflict(self, dm: DataManager) -> None:
        """update(expected_version=...) with an old version raises ConcurrencyConflict."""
        with dm.dal() as dal:
            item = dal.items.create(name="a")
            dal.items.update(item.id, qty=1)
        with pytest.raises(ConcurrencyConflict, match="version 2, not 1") as info, dm.dal() as dal:
            dal.items.update(item.id, expected_version=1, qty=2)
        assert info.value.code == 409
        with dm.dal() as dal:
            assert dal.items.require(item.id).qty == 1

    def test_delete_with_an_old_expected_version_is_a_conflict(self, dm: DataManager, db: Database) -> None:
        """delete(expected_version=...) refuses to delete a row someone changed since; the row stays."""
        with dm.dal() as dal:
            item = dal.items.create(name="a")
            dal.items.update(item.id, qty=1)
        with pytest.raises(ConcurrencyConflict, match="version 2, not 1"), dm.dal() as dal:
            dal.items.delete(item.id, expected_version=1)
        assert names(db) == ["a"]
        with dm.dal() as dal:
            assert dal.items.delete(item.id, expected_version=2)
        assert names(db) == []

    def test_expected_version_needs_a_versioned_model(self, dm: DataManager) -> None:
        """expected_version on a model without version column is a ValueError saying so."""
        with dm.dal() as dal:
            dal.tags.create(code="t")
            with pytest.raises(ValueError, match="Versioned mixin"):
                dal.tags.update("t", expected_version=1, item_id=None)

    def test_two_threads_updating_the_same_version_one_wins(self, dm: DataManager, db: Database) -> None:
        """Two threads update the same seen version: one commits, the other gets a conflict."""
        with dm.dal() as dal:
            item_id = dal.items.create(name="orig").id
        barrier = threading.Barrier(2)
        outcome: dict[str, str] = {}

        def writer(name: str) -> None:
            barrier.wait(timeout=10)
            try:
                with dm.dal() as dal:
                    dal.items.create(name=f"side-{name}")  # must vanish with the loser
                    dal.items.update(item_id, expected_version=1, name=name)
                outcome[name] = "won"
            except ConcurrencyConflict as exc:
                outcome[name] = f"conflict {exc.code}"

        threads = [threading.Thread(target=writer, args=(n,)) for n in ("t1", "t2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcome.values()) == ["conflict 409", "won"]
        winner = next(n for n, o in outcome.items() if o == "won")
        with dm.dal() as dal:
            row = dal.items.require(item_id)
            assert (row.name, row.version) == (winner, 2)
        assert names(db) == sorted([winner, f"side-{winner}"])
        assert db.engine.pool.checkedout() == 0

    def test_two_threads_stale_objects_conflict_at_commit(self, pg_url: str) -> None:
        """PostgreSQL: two contexts load one row and both change it; the later commit conflicts."""
        db = Database(pg_url)
        Base.metadata.create_all(db.engine)
        dm = DataManager()
        db.install(dm, name="db")
        dm.register_services(items=Items())
        try:
            with dm.dal() as dal:
                item_id = dal.items.create(name="orig").id
            loaded = threading.Barrier(2)
            outcome: dict[str, str] = {}

            def writer(name: str) -> None:
                try:
                    with dm.context() as ctx:
                        item = ctx.db.get(Item, item_id)
                        loaded.wait(timeout=10)
                        item.name = name
                    outcome[name] = "won"
                except ConcurrencyConflict:
                    outcome[name] = "conflict"

            threads = [threading.Thread(target=writer, args=(n,)) for n in ("t1", "t2")]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert sorted(outcome.values()) == ["conflict", "won"]
            winner = next(n for n, o in outcome.items() if o == "won")
            assert names(db) == [winner]
        finally:
            Base.metadata.drop_all(db.engine)
            db.dispose()


class TestEngine:
    def test_ping_answers(self, db: Database) -> None:
        """ping() runs SELECT 1 and returns True on a reachable database; health() reports the primary."""
        assert db.ping() is True
        assert [node.name for node in db.health()] == ["primary"]
        assert db.engine.pool.checkedout() == 0

    def test_dispose_closes_pooled_connections_and_the_next_context_reconnects(
        self, dm: DataManager, db: Database
    ) -> None:
        """dispose() empties the pool; the next context opens a new connection and works."""
        connects: list[object] = []
        event.listen(db.engine, "connect", lambda *args: connects.append(args))
        with dm.dal() as dal:
            dal.items.create(name="a")
        assert db.engine.pool.checkedin() == 1
        db.dispose()
        assert db.engine.pool.checkedin() == 0
        with dm.dal() as dal:
            assert dal.items.count() == 1
        assert len(connects) == 1  # the pool made after dispose() connected once

    def test_ping_is_false_when_the_server_is_unreachable(self) -> None:
        """ping() returns False when nothing listens; health() raises OperationalError saying why."""
        db = Database(
            f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
            connect_args={"connect_timeout": 2},
        )
        assert db.ping() is False
        with pytest.raises(OperationalError):
            db.health()
        db.dispose()

    def test_ping_raises_on_a_programming_error(self) -> None:
        """ping() on an engine whose dialect cannot run SELECT 1 is no outage: the error is raised."""
        db = Database("sqlite://")
        event.listen(db.engine, "before_cursor_execute", _refuse_statements)
        with pytest.raises(RuntimeError, match="no statements here"):
            db.ping()
        db.dispose()

    def test_pre_ping_is_on_for_servers_only(self, pg_url: str, tmp_path: Any) -> None:
        """pool_pre_ping defaults to True for PostgreSQL, off for SQLite, and can be overridden."""
        assert Database(pg_url).engine.pool._pre_ping
        assert not Database(pg_url, pool_pre_ping=False).engine.pool._pre_ping
        assert not Database(f"sqlite:///{tmp_path / 'x.db'}").engine.pool._pre_ping

    def test_memory_database_is_shared_by_threads(self) -> None:
        """An in-memory SQLite Database uses one connection, so every thread sees the same data."""
        db = Database("sqlite://")
        assert isinstance(db.engine.pool, StaticPool)
        Base.metadata.create_all(db.engine)
        dm = DataManager()
        db.install(dm)
        dm.register_services(items=Items())
        with dm.dal() as dal:
            dal.items.create(name="a")
        counts: list[int] = []

        def count() -> None:
            with dm.dal() as dal:
                counts.append(dal.items.count())

        thread = threading.Thread(target=count)
        thread.start()
        thread.join(10)
        assert counts == [1]
        db.dispose()

    def test_bad_sqlite_begin_is_refused(self) -> None:
        """An unknown sqlite_begin mode is a ValueError listing the valid ones."""
        with pytest.raises(ValueError, match="'DEFERRED', 'IMMEDIATE' or 'EXCLUSIVE'"):
            Database("sqlite://", sqlite_begin="LATER")  # type: ignore[arg-type]

    def test_sqlite_autocommit_is_left_to_the_driver(self, tmp_path: Any) -> None:
        """With isolation_level AUTOCOMMIT (engine or connection) SQLite writes are kept at once."""
        db = Database(f"sqlite:///{tmp_path / 'auto.db'}", isolation_level="AUTOCOMMIT")
        Base.metadata.create_all(db.engine)
        with db.session() as session:
            session.add(Item(name="auto"))
            session.flush()
        assert names(db) == ["auto"]
        db.dispose()
        db = Database(f"sqlite:///{tmp_path / 'auto.db'}")
        with db.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(insert(Item).values(name="conn", version=1))
        assert names(db) == ["auto", "conn"]
        db.dispose()

    def test_missing_sqlalchemy_says_how_to_install_it(self) -> None:
        """Importing polydatum.sqlalchemy without SQLAlchemy names the extra to install."""
        code = (
            "import sys; sys.modules['sqlalchemy'] = None\n"
            "try:\n    import polydatum.sqlalchemy\n"
            "except ImportError as exc:\n    print(exc)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert 'pip install "polydatum[sqlalchemy]"' in out.stdout

    @pytest.mark.parametrize(
        ("factory", "url", "module"),
        [
            (Database, "mysql://app:secret@127.0.0.1/app", "MySQLdb"),
            (AsyncDatabase, "postgresql+psycopg2://app@127.0.0.1/app", "psycopg2"),
        ],
    )
    def test_missing_driver_says_what_to_install(
        self, factory: Callable[[str], object], url: str, module: str
    ) -> None:
        """A URL whose driver is not installed names the module and a driver that is, hiding the password."""
        expected = f"driver module '{module}'.*postgresql\\+psycopg"
        with pytest.raises(ModuleNotFoundError, match=expected) as info:
            factory(url)
        assert info.value.name == module
        assert "secret" not in str(info.value)

    def test_async_database_needs_an_async_driver(self, tmp_path: Any) -> None:
        """AsyncDatabase over a sync-only driver fails at construction, saying it needs an async one."""
        with pytest.raises(InvalidRequestError, match="requires an async driver"):
            AsyncDatabase(f"sqlite:///{tmp_path / 'x.db'}")

    def test_repr_hides_the_password(self) -> None:
        """The repr names the URL without its password."""
        db = Database("postgresql+psycopg://app:secret@127.0.0.1:1/app")
        assert "secret" not in repr(db)
        assert repr(db).startswith("Database('postgresql+psycopg://app:***@")

    @pytest.mark.parametrize(
        "key",
        ["password", "PASSWORD", "passwd", "pwd", "sslpassword", "secret", "token", "auth_token", "api_key"],
    )
    def test_repr_hides_secrets_in_the_query_string(self, key: str) -> None:
        """A secret-looking query value is masked in the repr; other query values stay."""
        db = Database(f"postgresql+psycopg://app@127.0.0.1:1/app?{key}=hunter2&sslmode=require")
        assert "hunter2" not in repr(db)
        assert f"{key}=***" in repr(db)
        assert "sslmode=require" in repr(db)
        adb = AsyncDatabase(f"postgresql+psycopg://app@127.0.0.1:1/app?{key}=hunter2")
        assert "hunter2" not in repr(adb)
        assert "hunter2" not in repr(adb.sync)

    def test_errors_naming_the_url_hide_query_secrets(self, tmp_path: Any) -> None:
        """The missing-driver, read-only and pinning messages never repeat a query-string password."""
        with pytest.raises(ModuleNotFoundError) as missing:
            Database("mysql://app@127.0.0.1/app?password=hunter2")
        assert "password=***" in str(missing.value)
        assert "hunter2" not in str(missing.value)
        db = Database(f"sqlite:///file:{tmp_path / 'x.db'}?uri=true&password=hunter2")
        Base.metadata.create_all(db.engine)
        with db.session(read_only=True) as session, pytest.raises(ReadOnlyError) as refused:
            session.execute(insert(Item).values(name="x"))
        assert "hunter2" not in str(refused.value)
        db._pin(db.engine.connect())
        with pytest.raises(RuntimeError, match="do not nest") as nested:
            db._refuse_pinned()
        assert "hunter2" not in str(nested.value)
        db._pin(None)
        db.dispose()

    def test_session_outside_a_context(self, db: Database) -> None:
        """Database.session() gives an ordinary session for scripts, committed by hand."""
        with db.session() as session:
            session.add(Item(name="script"))
            session.commit()
        assert names(db) == ["script"]


def _refuse_statements(*args: object) -> None:
    msg = "no statements here"
    raise RuntimeError(msg)

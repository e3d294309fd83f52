"""retry(): serialization failures and deadlocks are run again in a fresh context."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from polydatum import DataManager, Service
from polydatum.dal import DataAccessLayer
from polydatum.sqlalchemy import Database, is_transient, retry
from polydatum.sqlalchemy._retry import _delay
from tests.support.sql import Base, Counter, Items


class Counters(Service):
    def bump(self, counter_id: int, wait: threading.Barrier | None = None) -> None:
        """Read a counter, optionally wait for the other thread to read too, then add one."""
        session = self._ctx.db
        counter = session.get(Counter, counter_id)
        if wait is not None:
            wait.wait(timeout=20)
        counter.value += 1
        session.flush()

    def values(self) -> list[int]:
        return [c.value for c in self._ctx.db.query(Counter).order_by(Counter.id)]


@pytest.fixture(name="serializable", params=["sqlite", "postgresql"])
def fixture_serializable(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[DataManager]:
    """A DataManager on a SERIALIZABLE database holding counters 1 and 2 at zero.

    SQLite begins DEFERRED here, so two transactions can both read before
    either writes, which is what makes them conflict.
    """
    if request.param == "sqlite":
        db = Database(
            f"sqlite:///{tmp_path / 'retry.db'}", sqlite_begin="DEFERRED", isolation_level="SERIALIZABLE"
        )
    else:
        db = Database(request.getfixturevalue("pg_url"), isolation_level="SERIALIZABLE")
    Base.metadata.create_all(db.engine)
    with db.session() as session:
        session.add_all([Counter(id=1, value=0), Counter(id=2, value=0)])
        session.commit()
    dm = DataManager()
    db.install(dm)
    dm.register_services(counters=Counters(), items=Items())
    yield dm
    Base.metadata.drop_all(db.engine)
    db.dispose()


def in_threads(*targets: Any) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)


class TestRetry:
    def test_conflicting_serializable_contexts_both_commit(self, serializable: DataManager) -> None:
        """Two contexts that read then write one counter both commit, as if run one after other."""
        dm = serializable
        barrier = threading.Barrier(2)
        attempts: list[str] = []
        errors: list[BaseException] = []

        def worker(name: str) -> None:
            def work(dal: DataAccessLayer) -> None:
                first = name not in attempts
                attempts.append(name)
                dal.counters.bump(1, barrier if first else None)

            try:
                retry(dm, work, attempts=5, backoff=0.01)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        in_threads(lambda: worker("a"), lambda: worker("b"))
        assert errors == []
        assert len(attempts) == 3  # the loser ran twice
        with dm.dal() as dal:
            assert dal.counters.values() == [2, 0]

    def test_write_skew_ends_in_a_serial_order(self, serializable: DataManager) -> None:
        """Two contexts that each write 1 only if the total is 0: with retry, exactly one does.

        Neither writes what the other read, so on PostgreSQL the conflict shows
        only at COMMIT (read/write dependencies), and that failed commit is retried.
        """
        dm = serializable
        barrier = threading.Barrier(2)
        attempts: list[str] = []
        errors: list[BaseException] = []

        def worker(name: str, counter_id: int) -> None:
            def work(dal: DataAccessLayer) -> None:
                first = name not in attempts
                attempts.append(name)
                total = sum(dal.counters.values())
                if first:
                    barrier.wait(timeout=20)
                if total == 0:
                    dal.counters.bump(counter_id)

            try:
                retry(dm, work, attempts=5, backoff=0.01)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        in_threads(lambda: worker("a", 1), lambda: worker("b", 2))
        assert errors == []
        assert len(attempts) == 3
        with dm.dal() as dal:
            assert sorted(dal.counters.values()) == [0, 1]  # what either serial order gives

    def test_deadlock_is_retried(self, pg_url: str) -> None:
        """PostgreSQL: two contexts locking two rows in opposite order both end committed."""
        db = Database(pg_url)
        Base.metadata.create_all(db.engine)
        with db.session() as session:
            session.add_all([Counter(id=1, value=0), Counter(id=2, value=0)])
            session.commit()
        dm = DataManager()
        db.install(dm)
        dm.register_services(counters=Counters())
        barrier = threading.Barrier(2)
        attempts: list[str] = []
        errors: list[BaseException] = []

        def worker(name: str, order: tuple[int, int]) -> None:
            def work(dal: DataAccessLayer) -> None:
                first = name not in attempts
                attempts.append(name)
                session = dm.require_active_context().db
                # Detect the deadlock quickly instead of after the default second.
                session.execute(text("SET LOCAL deadlock_timeout = '50ms'"))
                dal.counters.bump(order[0])
                if first:
                    barrier.wait(timeout=20)
                dal.counters.bump(order[1])

            try:
                retry(dm, work, attempts=5, backoff=0.01)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        try:
            in_threads(lambda: worker("a", (1, 2)), lambda: worker("b", (2, 1)))
            assert errors == []
            assert len(attempts) == 3
            with dm.dal() as dal:
                assert dal.counters.values() == [2, 2]
        finally:
            Base.metadata.drop_all(db.engine)
            db.dispose()

    def test_attempts_run_out(self, serializable: DataManager) -> None:
        """When every attempt fails transiently, the last error is raised after `attempts` tries."""
        calls: list[int] = []

        def work(dal: DataAccessLayer) -> None:
            calls.append(1)
            raise Transient

        with pytest.raises(Transient):
            retry(serializable, work, attempts=3, backoff=0, retry_if=is_fake_transient)
        assert len(calls) == 3

    def test_other_errors_are_not_retried(self, serializable: DataManager) -> None:
        """An error that is not transient is raised at once."""
        calls: list[int] = []

        def work(dal: DataAccessLayer) -> None:
            calls.append(1)
            raise KeyError("x")

        with pytest.raises(KeyError):
            retry(serializable, work, backoff=0)
        assert len(calls) == 1

    def test_no_retry_after_an_acknowledged_commit(self, serializable: DataManager) -> None:
        """A unit of work whose nested context committed is never repeated."""
        dm = serializable
        calls: list[int] = []

        def work(dal: DataAccessLayer) -> None:
            calls.append(1)
            with dm.dal() as inner:
                inner.items.create(name=f"once-{len(calls)}")
            raise Transient

        with pytest.raises(Transient):
            retry(dm, work, attempts=3, backoff=0, retry_if=is_fake_transient)
        assert len(calls) == 1
        with dm.dal() as dal:
            assert dal.items.count() == 1

    def test_no_retry_after_the_code_committed_itself(self, serializable: DataManager) -> None:
        """A unit of work that called session.commit() before failing is never repeated."""
        dm = serializable
        calls: list[int] = []

        def work(dal: DataAccessLayer) -> None:
            calls.append(1)
            dal.items.create(name=f"once-{len(calls)}")
            dm.require_active_context().db.commit()
            raise Transient

        with pytest.raises(Transient):
            retry(dm, work, attempts=3, backoff=0, retry_if=is_fake_transient)
        assert len(calls) == 1
        with dm.dal() as dal:
            assert dal.items.count() == 1

    def test_an_empty_commit_does_not_stop_retries(self, serializable: DataManager) -> None:
        """session.commit() with no transaction begun acknowledges nothing, so retries go on."""
        dm = serializable
        calls: list[int] = []

        def work(dal: DataAccessLayer) -> None:
            calls.append(1)
            dm.require_active_context().db.commit()
            raise Transient

        with pytest.raises(Transient):
            retry(dm, work, attempts=3, backoff=0, retry_if=is_fake_transient)
        assert len(calls) == 3

    def test_a_rollback_hooks_write_does_not_stop_retries(self, serializable: DataManager) -> None:
        """A failed attempt's rollback hook records the failure: kept, and the unit of work runs again."""
        dm = serializable
        calls: list[int] = []

        def work(dal: DataAccessLayer) -> None:
            calls.append(1)
            ctx = dm.require_active_context()
            ctx.on_rollback(lambda: dal.items.create(name=f"failed attempt {len(calls)}"))
            if len(calls) < 3:
                raise Transient

        retry(dm, work, attempts=3, backoff=0, retry_if=is_fake_transient)
        assert len(calls) == 3
        with dm.dal() as dal:
            assert dal.items.count() == 2  # one failure record per failed attempt

    def test_interrupts_are_never_retried(self, serializable: DataManager) -> None:
        """KeyboardInterrupt propagates from the first attempt, even if retry_if would accept it."""
        calls: list[int] = []

        def work(dal: DataAccessLayer) -> None:
            calls.append(1)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            retry(serializable, work, attempts=3, backoff=0, retry_if=lambda exc: True)
        assert len(calls) == 1

    def test_nested_retry_reports_its_commits_outward(self, serializable: DataManager) -> None:
        """A commit made inside an inner retry() also stops the outer one from repeating."""
        dm = serializable
        calls: list[int] = []

        def inner(dal: DataAccessLayer) -> None:
            dal.items.create(name="inner")

        def outer(dal: DataAccessLayer) -> None:
            calls.append(1)
            retry(dm, inner)
            raise Transient

        with pytest.raises(Transient):
            retry(dm, outer, attempts=3, backoff=0, retry_if=is_fake_transient)
        assert len(calls) == 1

    def test_result_is_returned(self, serializable: DataManager) -> None:
        """retry() returns what the unit of work returned."""
        assert retry(serializable, lambda dal: dal.counters.values()) == [0, 0]

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"attempts": 0}, "attempts must be an int of at least 1"),
            ({"attempts": True}, "attempts must be an int of at least 1"),
            ({"backoff": -1}, "must not be negative"),
            ({"max_backoff": -1}, "must not be negative"),
        ],
    )
    def test_bad_arguments_are_refused(self, kwargs: dict[str, Any], match: str) -> None:
        """Invalid attempts or backoff raise ValueError before any context opens."""
        with pytest.raises(ValueError, match=match):
            retry(DataManager(), lambda dal: None, **kwargs)


class TestBackoff:
    @pytest.mark.parametrize(("backoff", "max_backoff"), [(0.05, 1.0), (0.2, 0.3), (0.0, 1.0)])
    def test_waits_double_with_jitter_up_to_the_maximum(self, backoff: float, max_backoff: float) -> None:
        """The wait before attempt n+1 is between half and all of min(max, backoff * 2**(n-1))."""
        for attempt in range(1, 15):
            cap = min(max_backoff, backoff * 2 ** (attempt - 1))
            for _ in range(20):
                assert cap / 2 <= _delay(attempt, backoff, max_backoff) <= cap


class Transient(Exception):
    pass


def is_fake_transient(exc: BaseException) -> bool:
    return isinstance(exc, Transient)


class TestIsTransient:
    def test_plain_errors_are_not_transient(self) -> None:
        """Errors without a transient SQLSTATE or SQLite code are not transient."""
        assert not is_transient(KeyError("x"))
        assert not is_transient(OperationalError("SELECT 1", {}, Exception("boom")))

    def test_real_postgres_errors(self, pg_url: str) -> None:
        """A real serialization failure is transient; a real syntax error is not."""
        db = Database(pg_url)
        with db.engine.connect() as conn, pytest.raises(DBAPIError) as syntax:
            conn.execute(text("SELEC 1"))
        assert not is_transient(syntax.value)
        with db.engine.connect() as conn, pytest.raises(DBAPIError) as failure:
            conn.execute(
                text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$")
            )
        assert is_transient(failure.value)
        wrapped = RuntimeError("service failed")
        wrapped.__cause__ = failure.value
        assert is_transient(wrapped)
        db.dispose()

"""A sync Database in ``async with`` contexts commits in a worker thread, never on the event loop.

FastAPI's plain ``def`` routes use a sync Session inside the ASGI middleware's
``async with`` context; its COMMIT waiting on PostgreSQL must not stall the
loop, and a request cancelled mid-COMMIT must not close the session under it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from polydatum import DataManager
from polydatum._blocking import run_blocking
from polydatum.sqlalchemy import Database
from tests.support.sql import Base, Item

pytestmark = pytest.mark.asyncio


def wired(db: Database) -> DataManager:
    """A DataManager with ``db`` installed as ``ctx.db``."""
    dm = DataManager()
    db.install(dm)
    return dm


def count_items(db: Database) -> int:
    """The rows of ``items``, read outside any context."""
    with Session(db.engine) as session:
        return int(session.scalar(select(func.count()).select_from(Item)) or 0)


def commit_threads(db: Database) -> list[int]:
    """The thread of every COMMIT sent through ``db``'s engine, in order."""
    threads: list[int] = []
    event.listen(db.engine, "commit", lambda _conn: threads.append(threading.get_ident()))
    return threads


async def test_commit_runs_off_the_event_loop(pg_db: Database) -> None:
    """The COMMIT of a context entered with ``async with`` runs in another thread than the loop's."""
    dm = wired(pg_db)
    threads = commit_threads(pg_db)
    loop_thread = threading.get_ident()
    async with dm.context() as ctx:
        ctx.db.add(Item(name="a"))
    assert len(threads) == 1
    assert threads[0] != loop_thread
    assert count_items(pg_db) == 1


async def test_the_loop_serves_others_while_a_commit_waits(pg_db: Database) -> None:
    """A COMMIT held up does not hold up the loop: a coroutine on the loop is what releases it.

    With the COMMIT on the loop this would wait for the event until the timeout.
    """
    dm = wired(pg_db)
    released = threading.Event()
    waited: list[bool] = []

    def hold(_session: Session) -> None:
        waited.append(released.wait(timeout=10))

    async def release() -> None:
        await asyncio.sleep(0)
        released.set()

    async def request() -> None:
        async with dm.context() as ctx:
            ctx.db.add(Item(name="held"))
            event.listen(ctx.db, "before_commit", hold)

    await asyncio.gather(request(), release())
    assert waited == [True]
    assert count_items(pg_db) == 1


async def test_a_request_cancelled_mid_commit_waits_for_it(
    pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled while its COMMIT runs: the commit finishes, the hooks of a commit run,
    the session closes after it (no IllegalStateChangeError), then the task ends cancelled."""
    dm = wired(pg_db)
    committing = threading.Event()
    go_on = threading.Event()
    ran: list[str] = []

    def hold(_session: Session) -> None:
        committing.set()
        go_on.wait(timeout=10)

    async def request() -> None:
        async with dm.context() as ctx:
            ctx.db.add(Item(name="cancelled"))
            event.listen(ctx.db, "before_commit", hold)
            ctx.on_commit(ran.append, "commit")
            ctx.on_rollback(ran.append, "rollback")
        await asyncio.sleep(10)  # the cancellation arrives here, the first await after the context

    task = asyncio.create_task(request())
    await asyncio.get_running_loop().run_in_executor(None, committing.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)  # the task sees the cancellation while the COMMIT is held
    assert not task.done()
    go_on.set()
    with caplog.at_level(logging.WARNING), pytest.raises(asyncio.CancelledError):
        await task
    assert ran == ["commit"]
    assert count_items(pg_db) == 1
    assert pg_db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_failing_commit_is_raised_and_rolls_back(pg_db: Database) -> None:
    """A COMMIT refused by the server (a duplicate) raises from ``async with``; rollback hooks run."""
    dm = wired(pg_db)
    async with dm.context() as ctx:
        ctx.db.add(Item(name="dup"))
    ran: list[str] = []

    async def duplicate() -> None:
        async with dm.context() as ctx:
            ctx.on_commit(ran.append, "commit")
            ctx.on_rollback(ran.append, "rollback")
            ctx.db.add(Item(name="dup"))

    with pytest.raises(IntegrityError):
        await duplicate()
    assert ran == ["rollback"]
    assert count_items(pg_db) == 1
    assert pg_db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_failing_body_rolls_back_in_a_thread(pg_db: Database) -> None:
    """The body raises: the ROLLBACK runs off the loop too, and the body's error leaves the block."""
    dm = wired(pg_db)
    rollbacks: list[int] = []
    event.listen(pg_db.engine, "rollback", lambda _conn: rollbacks.append(threading.get_ident()))

    async def failing() -> None:
        async with dm.context() as ctx:
            ctx.db.add(Item(name="lost"))
            ctx.db.flush()
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await failing()
    assert rollbacks
    assert rollbacks[0] != threading.get_ident()
    assert count_items(pg_db) == 0


async def test_a_commit_does_not_wait_behind_the_default_executor(pg_db: Database) -> None:
    """COMMITs have the database's own threads: a default executor kept busy does not hold them up.

    The loop's default executor also runs the outbox's deliveries and any
    ``asyncio.to_thread``; a COMMIT queued behind them would keep its row locks.
    """
    dm = wired(pg_db)
    threads = commit_threads(pg_db)
    busy = threading.Event()
    loop = asyncio.get_running_loop()
    hogs = [loop.run_in_executor(None, busy.wait, 10) for _ in range(40)]
    try:

        async def request() -> None:
            async with dm.context() as ctx:
                ctx.db.add(Item(name="behind"))

        task = asyncio.create_task(request())
        done, _ = await asyncio.wait({task}, timeout=5)
    finally:
        busy.set()
        await asyncio.gather(*hogs)
    assert task in done
    await task
    assert count_items(pg_db) == 1
    assert len(threads) == 1


async def test_threaded_transaction_middleware_takes_an_executor(pg_db: Database) -> None:
    """The middleware registered by hand commits in the executor it was given."""
    from concurrent.futures import ThreadPoolExecutor

    from polydatum.resources import Dual
    from polydatum.sqlalchemy import threaded_transaction_middleware, transaction_middleware

    dm = DataManager()
    pg_db.install(dm, transaction=False)
    with ThreadPoolExecutor(1, thread_name_prefix="mine") as mine:
        dm.register_context_middleware(
            Dual(transaction_middleware("db"), threaded_transaction_middleware("db", mine))
        )
        names: list[str] = []
        event.listen(pg_db.engine, "commit", lambda _conn: names.append(threading.current_thread().name))
        async with dm.context() as ctx:
            ctx.db.add(Item(name="mine"))
    assert len(names) == 1
    assert names[0].startswith("mine")
    assert count_items(pg_db) == 1


async def test_sqlite_commits_stay_on_the_loop_thread(tmp_path: Path) -> None:
    """SQLite connections may belong to the thread that made them: an in-memory one still commits."""
    for url in ("sqlite://", f"sqlite:///{tmp_path / 'app.db'}"):
        db = Database(url)
        Base.metadata.create_all(db.engine)
        dm = wired(db)
        threads = commit_threads(db)
        async with dm.context() as ctx:
            ctx.db.add(Item(name="a"))
        async with dm.context() as ctx:
            assert ctx.db.scalar(select(func.count()).select_from(Item)) == 1
        assert threads == [threading.get_ident()] * 2  # the write's COMMIT, then the read's
        db.dispose()


async def test_sync_contexts_commit_in_their_own_thread(pg_db: Database) -> None:
    """``with`` contexts are unchanged: the COMMIT runs where the context closes."""
    dm = wired(pg_db)
    threads = commit_threads(pg_db)
    with dm.context() as ctx:
        ctx.db.add(Item(name="sync"))
    assert threads == [threading.get_ident()]


class TestRunBlocking:
    """``polydatum._blocking.run_blocking``: work that a cancellation neither abandons nor hides."""

    async def test_returns_the_result_and_sees_context_variables(self) -> None:
        """The call runs in another thread, with the caller's context variables."""
        import contextvars

        var: contextvars.ContextVar[str] = contextvars.ContextVar("var")
        var.set("caller's")
        where = await run_blocking(lambda: (threading.get_ident(), var.get()))
        assert where[0] != threading.get_ident()
        assert where[1] == "caller's"

    async def test_raises_the_works_error(self) -> None:
        """An error of the work is raised in the awaiting task."""

        def fail() -> None:
            raise LookupError("from the thread")

        with pytest.raises(LookupError, match="from the thread"):
            await run_blocking(fail)

    async def test_a_timeout_waits_for_the_work_then_fires(self) -> None:
        """asyncio.timeout() expiring mid-work: the work completes, then TimeoutError (not CancelledError)."""
        if not hasattr(asyncio, "timeout"):
            pytest.skip("asyncio.timeout() is Python 3.11+")
        done: list[str] = []
        release = threading.Event()

        def work() -> str:
            release.wait(timeout=10)
            done.append("work")
            return "result"

        got: list[Any] = []

        async def body() -> None:
            async with asyncio.timeout(0.05):
                got.append(await run_blocking(work))
                await asyncio.sleep(10)

        task = asyncio.create_task(body())
        await asyncio.sleep(0.2)
        assert not task.done()  # the timeout fired; the work holds the task
        release.set()
        with pytest.raises(TimeoutError):
            await task
        assert done == ["work"]
        assert got == ["result"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
async def test_a_forked_child_commits_in_threads_of_its_own(pg_db: Database) -> None:
    """gunicorn --preload forks after the parent committed: the child starts its own commit threads.

    The parent's executor, copied into the child, believes its (now missing)
    idle thread will take the work: a COMMIT submitted to it never runs.
    """
    dm = wired(pg_db)
    async with dm.context() as ctx:
        ctx.db.add(Item(name="parent"))
    await asyncio.sleep(0.2)  # its commit thread goes idle, as it is when a server forks

    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its context committed in time
        code = 1
        try:

            async def child() -> bool:
                async def request() -> None:
                    async with dm.context() as ctx:
                        ctx.db.add(Item(name="child"))

                done, _ = await asyncio.wait({asyncio.create_task(request())}, timeout=10)
                return bool(done)

            # Not asyncio.run(): its clean-up would wait for a COMMIT that never runs.
            code = 0 if asyncio.new_event_loop().run_until_complete(child()) else 3
        finally:
            os._exit(code)

    def reap() -> int:
        for _ in range(300):  # the child gives up after 10 s; never wait forever
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            threading.Event().wait(0.1)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return -9

    assert await asyncio.get_running_loop().run_in_executor(None, reap) == 0
    assert count_items(pg_db) == 2


class TestOneTripToAThread:
    """A sync Database's transaction as a context's only middleware: COMMIT and hooks share one thread.

    One trip from the loop per context instead of one for the COMMIT and one
    per blocking hook (the outbox's delivery): fewer threads awake at once,
    which is what a FastAPI app over a sync Database pays for in GIL
    contention (docs/benchmarks.md).
    """

    async def test_the_commit_and_a_sync_hook_run_in_the_same_worker_thread(self, pg_db: Database) -> None:
        dm = wired(pg_db)
        commits = commit_threads(pg_db)
        hooks: list[str] = []
        async with dm.context() as ctx:
            ctx.db.add(Item(name="one trip"))
            ctx.on_commit(lambda: hooks.append(threading.current_thread().name))
        assert len(commits) == 1
        assert commits[0] != threading.get_ident()
        assert len(hooks) == 1
        assert hooks[0].startswith("polydatum-commit")
        assert count_items(pg_db) == 1

    async def test_a_rollback_and_its_hooks_run_in_the_worker_thread(self, pg_db: Database) -> None:
        dm = wired(pg_db)
        seen: list[str] = []
        event.listen(pg_db.engine, "rollback", lambda _conn: seen.append(threading.current_thread().name))

        async def request() -> None:
            async with dm.context() as ctx:
                ctx.db.add(Item(name="gone"))
                ctx.db.flush()
                ctx.on_rollback(lambda: seen.append(threading.current_thread().name))
                raise KeyError("body failed")

        with pytest.raises(KeyError):
            await request()
        assert len(seen) >= 2
        assert all(name.startswith("polydatum-commit") for name in seen)
        assert count_items(pg_db) == 0

    async def test_an_async_hook_still_runs_on_the_loop(self, pg_db: Database) -> None:
        dm = wired(pg_db)
        loop_thread = threading.get_ident()
        ran: list[int] = []

        async def notify(tag: str) -> None:
            await asyncio.sleep(0)
            ran.append(threading.get_ident())

        async with dm.context() as ctx:
            ctx.db.add(Item(name="async hook"))
            ctx.on_commit(notify, "x")
        assert ran == [loop_thread]

    async def test_failing_hooks_are_collected_and_the_outcome_stays(self, pg_db: Database) -> None:
        dm = wired(pg_db)

        def broken() -> None:
            raise RuntimeError("sync hook failed")

        async def broken_async() -> None:
            raise ValueError("async hook failed")

        after: list[str] = []
        async with dm.context() as ctx:
            ctx.db.add(Item(name="kept"))
            ctx.on_commit(broken)
            ctx.on_commit(broken_async)
            ctx.on_commit(after.append, "still ran")
        errors = [type(err).__name__ for _, err, _ in ctx.get_hook_errors()]
        assert errors == ["RuntimeError", "ValueError"]
        assert after == ["still ran"]
        assert count_items(pg_db) == 1

    async def test_the_dal_works_in_a_hook_in_the_thread(self, pg_db: Database) -> None:
        """A hook sees the closing context (a hook may call the DAL): the context variables came along."""
        dm = wired(pg_db)
        seen: list[Any] = []
        async with dm.context() as ctx:
            ctx.db.add(Item(name="x"))
            ctx.on_commit(lambda: seen.append(dm.get_active_context()))
        assert seen == [ctx]

    async def test_another_middleware_keeps_the_commit_thread_and_the_hooks_on_the_loop(
        self, pg_db: Database
    ) -> None:
        """A middleware that is not the database's may need the loop: the close then works as before."""
        dm = wired(pg_db)
        around: list[str] = []

        def mine(_ctx: Any) -> Iterator[None]:
            yield
            around.append(threading.current_thread().name)

        dm.register_context_middleware(mine)
        commits = commit_threads(pg_db)
        hooks: list[int] = []
        async with dm.context() as ctx:
            ctx.db.add(Item(name="two trips"))
            ctx.on_commit(lambda: hooks.append(threading.get_ident()))
        assert commits
        assert commits[0] != threading.get_ident()
        assert hooks == [threading.get_ident()]
        assert around == [threading.current_thread().name]

    async def test_a_request_cancelled_in_a_hook_waits_for_it(self, pg_db: Database) -> None:
        """Cancelled while an after-commit hook runs in the thread: the hook ends, then the cancellation."""
        dm = wired(pg_db)
        hooking = threading.Event()
        go_on = threading.Event()
        done: list[str] = []

        def slow_hook() -> None:
            hooking.set()
            go_on.wait(timeout=10)
            done.append("hook")

        async def request() -> None:
            async with dm.context() as ctx:
                ctx.db.add(Item(name="h"))
                ctx.on_commit(slow_hook)
            await asyncio.sleep(10)

        task = asyncio.create_task(request())
        await asyncio.get_running_loop().run_in_executor(None, hooking.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done == ["hook"]
        assert count_items(pg_db) == 1
        assert pg_db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


class TestCommitThreads:
    async def test_a_stuck_commit_thread_gets_company(self, pg_url: str) -> None:
        """commit_threads=1 and its COMMIT held: the next context's COMMIT runs in a thread started for it."""
        db = Database(pg_url, commit_threads=1)
        Base.metadata.create_all(db.engine)
        try:
            dm = wired(db)
            release = threading.Event()
            names: list[str] = []

            def held(_session: Session) -> None:
                names.append(threading.current_thread().name)
                release.wait(timeout=10)

            async def request(i: int, hold: bool) -> None:
                async with dm.context() as ctx:
                    ctx.db.add(Item(name=f"c{i}"))
                    if hold:
                        event.listen(ctx.db, "before_commit", held)

            first = asyncio.create_task(request(0, hold=True))
            for _ in range(200):
                if names:
                    break
                await asyncio.sleep(0.01)
            async with asyncio.timeout(5):
                await request(1, hold=False)  # not stuck behind the held one
            assert count_items(db) == 1
            release.set()
            await first
            assert count_items(db) == 2
        finally:
            Base.metadata.drop_all(db.engine)
            db.dispose()

    async def test_a_hook_waiting_for_the_pool_does_not_deadlock_the_commits(self, pg_url: str) -> None:
        """A hook waits for a pooled connection that a context queued behind it holds: a thread is added.

        One COMMIT thread and one pooled connection. A commits, and its
        connection goes to B, which was waiting for it; A's hook then waits
        for a connection in the COMMIT thread, while B's close waits for that
        thread. A pool that never adds a thread waits out the pool's timeout
        (the hook fails); this one starts a thread for B, whose COMMIT frees
        the connection for A's hook.
        """
        from sqlalchemy import text

        db = Database(pg_url, commit_threads=1, pool_size=1, max_overflow=0, pool_timeout=3)
        Base.metadata.create_all(db.engine)
        dm = wired(db)
        b_started = threading.Event()
        hook_read: list[int] = []

        b_has_it = threading.Event()

        def read_in_hook() -> None:
            b_has_it.wait(5)  # the connection A's COMMIT released went to B
            with db.engine.connect() as conn:
                hook_read.append(int(conn.execute(text("SELECT count(*) FROM items")).scalar_one()))

        def body(ctx: Any, name: str) -> None:
            if name == "b":
                b_started.set()
            ctx.db.add(Item(name=name))
            ctx.db.flush()  # takes the pool's only connection (B waits here for A's)
            if name == "b":
                b_has_it.set()

        async def a() -> None:
            async with dm.context() as ctx:
                await asyncio.to_thread(body, ctx, "a")
                ctx.on_commit(read_in_hook)
                await asyncio.to_thread(b_started.wait, 5)
                await asyncio.sleep(0.2)  # B is now waiting for the connection

        async def b() -> None:
            await asyncio.sleep(0.05)
            async with dm.context() as ctx:
                await asyncio.to_thread(body, ctx, "b")

        try:
            async with asyncio.timeout(2.5):  # under the pool's 3 s timeout
                await asyncio.gather(a(), b())
            assert hook_read
            assert count_items(db) == 2
        finally:
            Base.metadata.drop_all(db.engine)
            db.dispose()

    @pytest.mark.parametrize("bad", [0, -1, True, 1.5, "4", None])
    async def test_a_bad_count_is_refused(self, pg_url: str, bad: Any) -> None:
        with pytest.raises(ValueError, match="commit_threads must be a whole number of threads, 1 or more"):
            Database(pg_url, commit_threads=bad)


def thread_names(pool: Any, count: int, seconds: float) -> set[str]:
    """Queue ``count`` items that each sleep ``seconds`` on ``pool`` at once; the threads that ran them.

    The pool is shut down afterwards.
    """

    def step() -> str:
        time.sleep(seconds)
        return threading.current_thread().name

    try:
        futures = [pool.submit(step) for _ in range(count)]
        return {f.result(timeout=10) for f in futures}
    finally:
        pool.shutdown()


class TestElasticThreads:
    """The executor behind commit_threads: few threads while work is quick, more only while they are stuck."""

    async def test_quick_work_stays_on_the_core_threads(self) -> None:
        from polydatum._blocking import ElasticThreads

        pool = ElasticThreads(2, 32, name="quick", patience=5.0)
        try:
            names = await asyncio.gather(
                *(run_blocking(lambda: threading.current_thread().name, executor=pool) for _ in range(200))
            )
        finally:
            pool.shutdown()
        assert len(set(names)) <= 2
        assert all(name.startswith("quick") for name in names)

    async def test_busy_threads_that_progress_get_no_company(self) -> None:
        """Work queued behind one thread that keeps finishing things waits for it: no thread is added."""
        from polydatum._blocking import ElasticThreads

        pool = ElasticThreads(1, 8, name="busy", patience=0.2)
        names = thread_names(pool, 100, 0.005)  # 0.5 s of work queued at once
        assert len(names) == 1

    async def test_with_grow_after_waiting_work_gets_threads_though_others_progress(self) -> None:
        """The rule for I/O-bound work: slow items that waited ``grow_after`` get threads, up to the limit."""
        from polydatum._blocking import ElasticThreads

        pool = ElasticThreads(1, 6, name="io", grow_after=0.02)
        names = thread_names(pool, 30, 0.06)  # keeps finishing things: the stuck rule would add no thread
        assert 1 < len(names) <= 6

    async def test_with_grow_after_quick_items_get_no_company(self) -> None:
        """Items that each take a moment, queued deep: the threads cycle through them, none is added."""
        from polydatum._blocking import ElasticThreads

        pool = ElasticThreads(1, 6, name="quickio", grow_after=0.05)
        names = thread_names(pool, 150, 0.002)  # 0.3 s of work queued at once
        assert len(names) == 1

    async def test_stuck_threads_get_company_up_to_the_limit(self) -> None:
        from polydatum._blocking import ElasticThreads

        pool = ElasticThreads(1, 3, name="stuck", patience=0.02)
        release = threading.Event()
        started: list[str] = []

        def stuck() -> str:
            started.append(threading.current_thread().name)
            release.wait(timeout=10)
            return threading.current_thread().name

        try:
            futures = [pool.submit(stuck) for _ in range(5)]
            for _ in range(300):
                if len(started) >= 3:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            assert len(started) == 3  # the limit: the other two wait
            release.set()
            names = [f.result(timeout=5) for f in futures]
        finally:
            pool.shutdown()
        assert len(set(names)) == 3

    async def test_errors_reach_the_caller_and_shutdown_refuses_work(self) -> None:
        from polydatum._blocking import ElasticThreads

        pool = ElasticThreads(1, 2, name="err")

        def fail(what: str, *, why: str) -> None:
            raise LookupError(f"{what}: {why}")

        with pytest.raises(LookupError, match="a: b"):
            pool.submit(fail, "a", why="b").result(timeout=5)
        assert pool.submit(lambda x: x * 2, 21).result(timeout=5) == 42
        pool.shutdown()
        with pytest.raises(RuntimeError, match="cannot schedule new work after shutdown"):
            pool.submit(print)

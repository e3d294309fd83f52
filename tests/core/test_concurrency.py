"""Isolation of contexts across threads, tasks and DataManagers; cancellation and interrupts.

Each DataManager (docs/concepts/data-manager.md) keeps its active-context stack in its own
ContextVar, so threads and asyncio tasks are isolated. §1.8: a context is
never shared across tasks by accident: using an exited context raises.

Overlap is forced with barriers and events, never with sleeps: every
assertion holds whatever the scheduler does.
"""

from __future__ import annotations

import asyncio
import contextvars
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.errors import ContextStateError, NoActiveContextError

N_THREADS = 32
N_TASKS = 1000
READS = 4
WAIT = 30.0  # generous upper bound for an Event/Barrier; reached only if a test is broken

Log = list[Any]


class Probe(Service):
    """Reads the context's meta and its resource several times, with switches in between."""

    def check(self, barrier: threading.Barrier) -> list[tuple[Any, Any, int, int]]:
        seen = []
        for _ in range(READS):
            ctx = self._ctx
            conn = ctx.conn
            seen.append((ctx.meta.worker, conn["worker"], id(conn), id(ctx)))
            # Every thread is inside this method at once before anyone reads again.
            barrier.wait(WAIT)
        return seen

    async def acheck(self) -> list[tuple[Any, Any, Any, int]]:
        seen = []
        for _ in range(READS):
            ctx = self._ctx
            conn = await ctx.aget("aconn")
            sync_conn = ctx.conn
            seen.append((ctx.meta.worker, conn["worker"], sync_conn["worker"], id(ctx)))
            await asyncio.sleep(0)
        return seen

    def whoami(self) -> Any:
        return self._ctx.meta.worker


def conn_resource(log: Log) -> Callable[[DataAccessContext], Iterator[dict[str, Any]]]:
    def conn(ctx: DataAccessContext) -> Iterator[dict[str, Any]]:
        value = {"worker": ctx.meta.worker}
        yield value
        log.append(("closed", ctx.meta.worker, value["worker"]))

    return conn


def aconn_resource(log: Log) -> Callable[[DataAccessContext], AsyncIterator[dict[str, Any]]]:
    async def aconn(ctx: DataAccessContext) -> AsyncIterator[dict[str, Any]]:
        await asyncio.sleep(0)
        value = {"worker": ctx.meta.worker}
        yield value
        await asyncio.sleep(0)
        log.append(("aclosed", ctx.meta.worker, value["worker"]))

    return aconn


@pytest.fixture(name="dm")
def fixture_dm() -> DataManager:
    dm = DataManager()
    dm.register_services(probe=Probe())
    return dm


@pytest.fixture(name="fast_switching")
def fixture_fast_switching() -> Iterator[None]:
    """Make the interpreter switch threads as often as it can, to shake out sharing."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


# -- threads -----------------------------------------------------------------------


@pytest.mark.usefixtures("fast_switching")
def test_threads_each_see_only_their_own_context(dm: DataManager) -> None:
    closed: Log = []
    dm.register_resources(conn=conn_resource(closed))
    all_open = threading.Barrier(N_THREADS)
    in_method = threading.Barrier(N_THREADS)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            assert dm.get_active_context() is None
            with dm.dal({"worker": i}) as dal:
                ctx = dm.require_active_context()
                all_open.wait(WAIT)  # all 32 contexts are open at the same time
                seen = dal.probe.check(in_method)
                # A nested context in the same thread shadows, then restores, ours.
                with dm.dal({"worker": f"{i}-inner"}) as inner_dal:
                    assert inner_dal.probe.whoami() == f"{i}-inner"
                    assert dm.get_active_context() is not ctx
                assert dm.get_active_context() is ctx
                assert dal.probe.whoami() == i
                results[i] = (seen, id(ctx))
            assert dm.get_active_context() is None
        except BaseException as exc:
            errors.append(exc)
            all_open.abort()
            in_method.abort()
            raise

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert errors == []
    assert sorted(results) == list(range(N_THREADS))
    conn_ids = set()
    for i, (seen, ctx_id) in results.items():
        assert len(seen) == READS
        assert {(worker, conn_worker, ctx) for worker, conn_worker, _, ctx in seen} == {(i, i, ctx_id)}
        # One resource per context, the same object on every read.
        ids = {conn_id for _, _, conn_id, _ in seen}
        assert len(ids) == 1
        conn_ids |= ids
    assert len(conn_ids) == N_THREADS
    # Each context closed its own resource, exactly once (inner contexts never used it).
    assert sorted(closed, key=lambda c: c[1]) == [("closed", i, i) for i in range(N_THREADS)]


def test_a_context_opened_in_a_thread_is_not_visible_in_another(dm: DataManager) -> None:
    opened = threading.Event()
    release = threading.Event()
    inside: Log = []

    def holder() -> None:
        with dm.dal({"worker": "holder"}) as dal:
            inside.append(dal.probe.whoami())
            opened.set()
            release.wait(WAIT)
            inside.append(dal.probe.whoami())

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert opened.wait(WAIT)
        assert dm.get_active_context() is None
        with pytest.raises(NoActiveContextError, match=r'no active polydatum context.*"with dm.context'):
            dm.require_active_context()
        with pytest.raises(NoActiveContextError):
            dm.get_dal().probe.whoami()
        # A context of our own here does not disturb the holder's.
        with dm.dal({"worker": "main"}) as dal:
            assert dal.probe.whoami() == "main"
    finally:
        release.set()
        thread.join(WAIT)
    assert inside == ["holder", "holder"]


def test_threads_started_inside_a_context_do_not_inherit_it(dm: DataManager) -> None:
    seen: Log = []

    def look() -> None:
        seen.append(dm.get_active_context())
        try:
            dm.get_dal().probe.whoami()
        except NoActiveContextError as exc:
            seen.append(type(exc))

    with dm.dal({"worker": "main"}) as dal:
        thread = threading.Thread(target=look)
        thread.start()
        thread.join(WAIT)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(look).result(WAIT)
        assert dal.probe.whoami() == "main"
    assert seen == [None, NoActiveContextError, None, NoActiveContextError]


def test_two_data_managers_in_one_thread_do_not_see_each_other() -> None:
    dm1, dm2 = DataManager(), DataManager()
    closed: Log = []
    for dm in (dm1, dm2):
        dm.register_services(probe=Probe())
        dm.register_resources(conn=conn_resource(closed))
    with dm1.dal({"worker": "one"}) as dal1:
        ctx1 = dm1.require_active_context()
        assert dm2.get_active_context() is None
        with pytest.raises(NoActiveContextError):
            dm2.get_dal().probe.whoami()
        with dm2.dal({"worker": "two"}) as dal2:
            ctx2 = dm2.require_active_context()
            assert ctx2 is not ctx1
            assert dm1.get_active_context() is ctx1
            assert dal1.probe.whoami() == "one"
            assert dal2.probe.whoami() == "two"
            assert ctx1.conn["worker"] == "one"
            assert ctx2.conn["worker"] == "two"
        assert dm2.get_active_context() is None
        assert dm1.get_active_context() is ctx1
        assert dal1.probe.whoami() == "one"
    assert closed == [("closed", "two", "two"), ("closed", "one", "one")]


# -- asyncio tasks ---------------------------------------------------------------------


async def test_a_thousand_tasks_each_see_only_their_own_context(dm: DataManager) -> None:
    closed: Log = []
    dm.register_resources(aconn=aconn_resource(closed), conn=conn_resource(closed))
    middleware_seen: Log = []

    async def tag(ctx: DataAccessContext) -> AsyncIterator[None]:
        worker = ctx.meta.worker
        await asyncio.sleep(0)
        yield
        await asyncio.sleep(0)
        middleware_seen.append((worker, ctx.meta.worker, dm.get_active_context() is ctx))

    dm.register_context_middleware(tag)
    all_open = asyncio.Barrier(N_TASKS)

    async def task(i: int) -> tuple[list[Any], int]:
        assert dm.get_active_context() is None
        async with dm.dal({"worker": i}) as dal:
            ctx = dm.require_active_context()
            await all_open.wait()  # all 1,000 contexts are open at the same time
            seen = await dal.probe.acheck()
            assert dm.get_active_context() is ctx
            return seen, id(ctx)

    results = await asyncio.wait_for(asyncio.gather(*(task(i) for i in range(N_TASKS))), WAIT)
    assert len({ctx_id for _, ctx_id in results}) == N_TASKS
    for i, (seen, ctx_id) in enumerate(results):
        assert seen == [(i, i, i, ctx_id)] * READS
    assert sorted(middleware_seen) == [(i, i, True) for i in range(N_TASKS)]
    assert sorted(c for c in closed if c[0] == "aclosed") == [("aclosed", i, i) for i in range(N_TASKS)]
    assert sorted(c for c in closed if c[0] == "closed") == [("closed", i, i) for i in range(N_TASKS)]
    assert dm.get_active_context() is None


@pytest.mark.usefixtures("fast_switching")
def test_threads_each_running_an_event_loop_of_tasks(dm: DataManager) -> None:
    threads_n, tasks_n = 8, 100
    closed: Log = []
    dm.register_resources(aconn=aconn_resource(closed), conn=conn_resource(closed))
    every_loop_ready = threading.Barrier(threads_n)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    async def loop_main(t: int) -> list[Any]:
        all_open = asyncio.Barrier(tasks_n + 1)
        release = asyncio.Event()

        async def task(i: int) -> list[Any]:
            async with dm.dal({"worker": (t, i)}) as dal:
                await all_open.wait()
                await release.wait()
                return await dal.probe.acheck()

        tasks = [asyncio.create_task(task(i)) for i in range(tasks_n)]
        await all_open.wait()
        # Every loop has all its contexts open before any task reads.
        await asyncio.to_thread(every_loop_ready.wait, WAIT)
        release.set()
        return await asyncio.gather(*tasks)

    def thread_main(t: int) -> None:
        try:
            results[t] = asyncio.run(loop_main(t))
        except BaseException as exc:
            errors.append(exc)
            every_loop_ready.abort()
            raise

    threads = [threading.Thread(target=thread_main, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert errors == []
    for t in range(threads_n):
        for i, seen in enumerate(results[t]):
            assert [(w, c, s) for w, c, s, _ in seen] == [((t, i), (t, i), (t, i))] * READS
            assert len({ctx_id for *_, ctx_id in seen}) == 1
    assert len(closed) == 2 * threads_n * tasks_n
    assert all(owner == value for _, owner, value in closed)


async def test_a_task_that_outlives_its_context_gets_a_clear_error(dm: DataManager) -> None:
    log: Log = []
    dm.register_resources(conn=conn_resource(log), aconn=aconn_resource(log))
    started = asyncio.Event()
    go_on = asyncio.Event()
    outcomes: dict[str, Any] = {}

    async def late() -> None:
        # Spawned inside the context: it inherits it, and may use it while it is open.
        assert dm.require_active_context() is ctx
        started.set()
        await go_on.wait()
        outcomes["active"] = dm.get_active_context()
        for name, attempt in [
            ("require", lambda: dm.require_active_context()),
            ("dal", lambda: dm.get_dal().probe.whoami()),
            ("resource", lambda: ctx.conn),
        ]:
            try:
                attempt()
            except ContextStateError as exc:
                outcomes[name] = str(exc)
        try:
            await ctx.aget("aconn")
        except ContextStateError as exc:
            outcomes["aget"] = str(exc)
        # A fresh context in the late task works, and is its own.
        async with dm.dal({"worker": "fresh"}) as dal:
            outcomes["fresh"] = dal.probe.whoami()

    async with dm.context({"worker": "parent"}) as ctx:
        task = asyncio.create_task(late())
        await asyncio.wait_for(started.wait(), WAIT)
    go_on.set()
    await asyncio.wait_for(task, WAIT)
    assert outcomes["active"] is None
    for name in ("require", "dal", "resource", "aget"):
        assert "has already exited" in outcomes[name], name
        assert "outlived it" in outcomes[name], name
    assert outcomes["fresh"] == "fresh"
    assert log == []  # the exited context created nothing on the late task's behalf


def test_a_copied_contextvars_context_or_thread_that_outlives_the_context() -> None:
    dm = DataManager()
    dm.register_services(probe=Probe())
    with dm.dal({"worker": "parent"}):
        copied = contextvars.copy_context()
        assert copied.run(dm.get_dal().probe.whoami) == "parent"
    with pytest.raises(ContextStateError, match="has already exited"):
        copied.run(dm.require_active_context)
    with pytest.raises(ContextStateError, match="has already exited"):
        copied.run(dm.get_dal().probe.whoami)


async def test_to_thread_that_outlives_the_context(dm: DataManager) -> None:
    # asyncio.to_thread copies the contextvars: the thread shares the open context,
    # and gets a clear error once the context has exited.
    in_thread = threading.Event()
    go_on = threading.Event()

    def job() -> str:
        assert dm.get_dal().probe.whoami() == "parent"
        in_thread.set()
        assert go_on.wait(WAIT)
        try:
            dm.get_dal().probe.whoami()
        except ContextStateError as exc:
            return str(exc)
        return "no error"  # pragma: no cover

    async with dm.dal({"worker": "parent"}):
        pending = asyncio.ensure_future(asyncio.to_thread(job))
        assert await asyncio.to_thread(in_thread.wait, WAIT)
    go_on.set()
    assert "has already exited" in await asyncio.wait_for(pending, WAIT)


# -- cancellation ----------------------------------------------------------------------


def recording_async_resource(log: Log, name: str) -> Callable[[DataAccessContext], AsyncIterator[str]]:
    async def resource(ctx: DataAccessContext) -> AsyncIterator[str]:
        await asyncio.sleep(0)
        log.append(f"{name} setup")
        try:
            yield name
        except BaseException as exc:
            log.append(f"{name} saw {type(exc).__name__}")
            await asyncio.sleep(0)  # teardown may still await after a cancellation
            log.append(f"{name} closed")
            raise
        log.append(f"{name} closed")

    return resource


def recording_async_middleware(log: Log, name: str) -> Callable[[DataAccessContext], AsyncIterator[None]]:
    async def middleware(ctx: DataAccessContext) -> AsyncIterator[None]:
        log.append(f"{name} setup")
        try:
            yield
        except BaseException as exc:
            log.append(f"{name} saw {type(exc).__name__}")
            raise
        log.append(f"{name} teardown")

    return middleware


async def run_until_cancelled(body: Callable[[], Any], ready: asyncio.Event) -> asyncio.Task[Any]:
    """Start ``body`` as a task, cancel it once it sets ``ready``, and wait for it to end."""
    task = asyncio.create_task(body())
    await asyncio.wait_for(ready.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    return task


async def test_cancelled_task_tears_down_its_three_async_resources(dm: DataManager) -> None:
    log: Log = []
    dm.register_resources(**{n: recording_async_resource(log, n) for n in ("a", "b", "c")})
    dm.register_context_middleware(recording_async_middleware(log, "mw"))
    ready = asyncio.Event()
    never = asyncio.Event()
    contexts: Log = []

    async def body() -> None:
        async with dm.context() as ctx:
            contexts.append(ctx)
            ctx.on_commit(log.append, "commit")
            ctx.on_rollback(log.append, "rollback")
            for name in ("a", "b", "c"):
                await ctx.aget(name)
            ready.set()
            await never.wait()

    task = await run_until_cancelled(body, ready)
    assert task.cancelled()
    assert log == [
        "mw setup",
        "a setup",
        "b setup",
        "c setup",
        "mw saw CancelledError",
        "rollback",
        "c saw CancelledError",
        "c closed",
        "b saw CancelledError",
        "b closed",
        "a saw CancelledError",
        "a closed",
    ]
    [ctx] = contexts
    assert ctx.get_resource_exit_errors() == []
    assert dm.get_active_context() is None


async def test_cancelled_during_an_async_resource_setup(dm: DataManager) -> None:
    log: Log = []
    ready = asyncio.Event()
    never = asyncio.Event()

    async def slow(ctx: DataAccessContext) -> AsyncIterator[str]:
        log.append("slow setup started")
        try:
            ready.set()
            await never.wait()
        except asyncio.CancelledError:
            log.append("slow setup cancelled")
            raise
        yield "never"  # pragma: no cover

    dm.register_resources(
        a=recording_async_resource(log, "a"), b=recording_async_resource(log, "b"), slow=slow
    )
    contexts: Log = []

    async def body() -> None:
        async with dm.context() as ctx:
            contexts.append(ctx)
            await ctx.aget("a")
            await ctx.aget("b")
            try:
                await ctx.aget("slow")
            finally:
                log.append(("slow created", "slow" in ctx))

    task = await run_until_cancelled(body, ready)
    assert task.cancelled()
    assert log == [
        "a setup",
        "b setup",
        "slow setup started",
        "slow setup cancelled",
        ("slow created", False),
        "b saw CancelledError",
        "b closed",
        "a saw CancelledError",
        "a closed",
    ]
    assert contexts[0].get_resource_exit_errors() == []


async def test_cancelled_during_an_async_middleware_setup(dm: DataManager) -> None:
    log: Log = []
    ready = asyncio.Event()
    never = asyncio.Event()

    async def slow(ctx: DataAccessContext) -> AsyncIterator[None]:
        log.append("slow setup started")
        ready.set()
        await never.wait()
        yield  # pragma: no cover

    dm.register_context_middleware(recording_async_middleware(log, "m1"), slow)

    async def body() -> None:
        async with dm.context():
            log.append("body")  # pragma: no cover

    task = await run_until_cancelled(body, ready)
    assert task.cancelled()
    assert log == ["m1 setup", "slow setup started", "m1 saw CancelledError"]


async def test_cancelled_during_an_async_middleware_teardown(dm: DataManager) -> None:
    log: Log = []
    ready = asyncio.Event()
    never = asyncio.Event()

    async def slow_commit(ctx: DataAccessContext) -> AsyncIterator[None]:
        log.append("slow setup")
        yield
        log.append("slow teardown started")
        try:
            ready.set()
            await never.wait()
        except asyncio.CancelledError:
            log.append("slow teardown cancelled")
            raise

    dm.register_context_middleware(recording_async_middleware(log, "outer"), slow_commit)
    dm.register_resources(r=recording_async_resource(log, "r"))

    async def body() -> None:
        async with dm.context() as ctx:
            ctx.on_commit(log.append, "commit")
            ctx.on_rollback(log.append, "rollback")
            await ctx.aget("r")
            log.append("body done")

    task = await run_until_cancelled(body, ready)
    assert task.cancelled()
    # The cancellation replaces the success: the rest of the teardown sees it.
    assert log == [
        "outer setup",
        "slow setup",
        "r setup",
        "body done",
        "slow teardown started",
        "slow teardown cancelled",
        "outer saw CancelledError",
        "rollback",
        "r saw CancelledError",
        "r closed",
    ]


async def test_cancelled_during_an_async_resource_teardown(dm: DataManager) -> None:
    log: Log = []
    ready = asyncio.Event()
    never = asyncio.Event()

    async def slow_close(ctx: DataAccessContext) -> AsyncIterator[str]:
        yield "slow"
        log.append("slow closing")
        ready.set()
        await never.wait()

    dm.register_resources(
        a=recording_async_resource(log, "a"), slow=slow_close, c=recording_async_resource(log, "c")
    )
    contexts: Log = []

    async def body() -> None:
        async with dm.context() as ctx:
            contexts.append(ctx)
            for name in ("a", "slow", "c"):
                await ctx.aget(name)

    task = await run_until_cancelled(body, ready)
    assert task.cancelled()
    # The remaining resource is still closed, then the cancellation propagates.
    # The docs are silent on interrupts in resource teardown; the code collects the
    # CancelledError as an exit error and re-raises it once everything is closed.
    assert log == ["a setup", "c setup", "c closed", "slow closing", "a closed"]
    [(exc_type, _, _)] = contexts[0].get_resource_exit_errors()
    assert exc_type is asyncio.CancelledError


# -- KeyboardInterrupt and SystemExit ------------------------------------------------------

INTERRUPTS = [KeyboardInterrupt, SystemExit]


@pytest.mark.parametrize("interrupt", INTERRUPTS)
async def test_interrupt_in_an_async_body_tears_everything_down(
    dm: DataManager, interrupt: type[BaseException]
) -> None:
    log: Log = []
    dm.register_resources(**{n: recording_async_resource(log, n) for n in ("a", "b", "c")})
    dm.register_context_middleware(
        recording_async_middleware(log, "m1"), recording_async_middleware(log, "m2")
    )
    ctx = dm.context()
    raised = interrupt()

    async def body() -> None:
        async with ctx:
            ctx.on_commit(log.append, "commit")
            ctx.on_rollback(log.append, "rollback")
            for name in ("a", "b", "c"):
                await ctx.aget(name)
            raise raised

    with pytest.raises(interrupt) as caught:
        await body()
    assert caught.value is raised
    name = interrupt.__name__
    assert log == [
        "m1 setup",
        "m2 setup",
        "a setup",
        "b setup",
        "c setup",
        f"m2 saw {name}",
        f"m1 saw {name}",
        "rollback",
        f"c saw {name}",
        "c closed",
        f"b saw {name}",
        "b closed",
        f"a saw {name}",
        "a closed",
    ]
    assert ctx.get_resource_exit_errors() == []
    assert dm.get_active_context() is None


@pytest.mark.parametrize("interrupt", INTERRUPTS)
async def test_interrupt_in_an_async_resource_teardown_propagates_after_the_rest(
    dm: DataManager, interrupt: type[BaseException]
) -> None:
    # docs/hooks.md says resource exit errors are never raised; it is silent on
    # interrupts. The code collects the interrupt and re-raises it once every
    # resource is closed, so Ctrl-C is not swallowed.
    log: Log = []

    async def interrupted(ctx: DataAccessContext) -> AsyncIterator[str]:
        yield "x"
        await asyncio.sleep(0)
        raise interrupt()

    dm.register_resources(
        a=recording_async_resource(log, "a"), x=interrupted, c=recording_async_resource(log, "c")
    )
    ctx = dm.context()

    async def body() -> None:
        async with ctx:
            ctx.on_commit(log.append, "commit")
            for name in ("a", "x", "c"):
                await ctx.aget(name)

    with pytest.raises(interrupt):
        await body()
    assert log == ["a setup", "c setup", "commit", "c closed", "a closed"]
    [(exc_type, _, _)] = ctx.get_resource_exit_errors()
    assert exc_type is interrupt


@pytest.mark.parametrize("interrupt", INTERRUPTS)
async def test_interrupt_in_an_async_hook_propagates_after_resources_close(
    dm: DataManager, interrupt: type[BaseException]
) -> None:
    log: Log = []
    dm.register_resources(a=recording_async_resource(log, "a"))

    async def hook() -> None:
        await asyncio.sleep(0)
        raise interrupt()

    ctx = dm.context()

    async def body() -> None:
        async with ctx:
            await ctx.aget("a")
            ctx.on_commit(hook)
            ctx.on_commit(log.append, "later hook")

    with pytest.raises(interrupt):
        await body()
    assert log == ["a setup", "later hook", "a closed"]
    [(exc_type, _, _)] = ctx.get_hook_errors()
    assert exc_type is interrupt


@pytest.mark.parametrize("interrupt", INTERRUPTS)
async def test_interrupt_in_an_async_middleware_teardown(
    dm: DataManager, interrupt: type[BaseException]
) -> None:
    log: Log = []

    async def interrupted(ctx: DataAccessContext) -> AsyncIterator[None]:
        yield
        await asyncio.sleep(0)
        raise interrupt()

    dm.register_context_middleware(recording_async_middleware(log, "outer"), interrupted)
    dm.register_resources(a=recording_async_resource(log, "a"))

    async def body() -> None:
        async with dm.context() as ctx:
            ctx.on_rollback(log.append, "rollback")
            await ctx.aget("a")

    with pytest.raises(interrupt):
        await body()
    name = interrupt.__name__
    assert log == ["outer setup", "a setup", f"outer saw {name}", "rollback", f"a saw {name}", "a closed"]


@pytest.mark.parametrize("interrupt", INTERRUPTS)
def test_interrupt_out_of_asyncio_run(interrupt: type[BaseException]) -> None:
    """The whole way out of a real event loop, as Ctrl-C in a script would go."""
    dm = DataManager()
    log: Log = []
    dm.register_resources(**{n: recording_async_resource(log, n) for n in ("a", "b")})
    dm.register_context_middleware(recording_async_middleware(log, "mw"))

    async def main() -> None:
        async with dm.context() as ctx:
            await ctx.aget("a")
            await ctx.aget("b")
            raise interrupt()

    with pytest.raises(interrupt):
        asyncio.run(main())
    name = interrupt.__name__
    assert log == [
        "mw setup",
        "a setup",
        "b setup",
        f"mw saw {name}",
        f"b saw {name}",
        "b closed",
        f"a saw {name}",
        "a closed",
    ]


def test_ctrl_c_in_asyncio_run_tears_everything_down() -> None:
    """A real SIGINT: asyncio.run cancels the main task, then raises KeyboardInterrupt."""
    # asyncio only turns SIGINT into a cancellation from the main thread with
    # Python's default handler in place, as under pytest.
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    dm = DataManager()
    log: Log = []
    dm.register_resources(**{n: recording_async_resource(log, n) for n in ("a", "b", "c")})
    dm.register_context_middleware(recording_async_middleware(log, "mw"))

    async def main() -> None:
        async with dm.context() as ctx:
            ctx.on_rollback(log.append, "rollback")
            for name in ("a", "b", "c"):
                await ctx.aget(name)
            signal.raise_signal(signal.SIGINT)
            await asyncio.Event().wait()  # cancelled here

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(main())
    assert log == [
        "mw setup",
        "a setup",
        "b setup",
        "c setup",
        "mw saw CancelledError",
        "rollback",
        "c saw CancelledError",
        "c closed",
        "b saw CancelledError",
        "b closed",
        "a saw CancelledError",
        "a closed",
    ]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

"""The async side of the core (docs/concepts/async.md): contexts, resources, hooks under ``async with``.

Every test runs on pytest-asyncio's loop (``asyncio_mode = auto``); the
scenarios use real generators, services and middleware, no mocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.errors import (
    ContextStateError,
    DalMethodError,
    MiddlewareSetupException,
    NoActiveContextError,
    ResourceException,
    ResourceSetupException,
)
from polydatum.middleware import DalCommandRequest
from polydatum.observer import Observer
from polydatum.resources import Resource

Log = list[Any]


class Boom(Exception):
    """A tagged error, so a test can tell which part raised it."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.tag = tag


# -- building blocks ------------------------------------------------------------


def async_resource(
    log: Log, name: str, value: Any = None
) -> Callable[[DataAccessContext], AsyncIterator[Any]]:
    """An async generator resource that records setup, what it saw and teardown."""

    async def resource(ctx: DataAccessContext) -> AsyncIterator[Any]:
        log.append(f"{name} setup")
        await asyncio.sleep(0)  # a real suspension point inside setup
        try:
            yield value if value is not None else {"name": name, "ctx": ctx}
        except BaseException as exc:
            log.append(f"{name} teardown {type(exc).__name__}")
            raise
        await asyncio.sleep(0)
        log.append(f"{name} teardown")

    return resource


def sync_resource(log: Log, name: str) -> Callable[[DataAccessContext], Iterator[Any]]:
    """The sync twin of ``async_resource``: records setup, the error thrown in and teardown."""

    def resource(ctx: DataAccessContext) -> Iterator[Any]:
        log.append(f"{name} setup")
        try:
            yield {"name": name, "ctx": ctx}
        except BaseException as exc:
            log.append(f"{name} teardown {type(exc).__name__}")
            raise
        log.append(f"{name} teardown")

    return resource


def async_middleware(log: Log, name: str) -> Callable[[DataAccessContext], AsyncIterator[None]]:
    """Async context middleware that lets exceptions through, recording them."""

    async def middleware(ctx: DataAccessContext) -> AsyncIterator[None]:
        log.append(f"{name} setup")
        await asyncio.sleep(0)
        try:
            yield
        except BaseException as exc:
            log.append(f"{name} teardown {exc!r}")
            raise
        await asyncio.sleep(0)
        log.append(f"{name} teardown")

    return middleware


def sync_middleware(log: Log, name: str) -> Callable[[DataAccessContext], Iterator[None]]:
    """The sync twin of ``async_middleware``: lets exceptions through, recording them."""

    def middleware(ctx: DataAccessContext) -> Iterator[None]:
        log.append(f"{name} setup")
        try:
            yield
        except BaseException as exc:
            log.append(f"{name} teardown {exc!r}")
            raise
        log.append(f"{name} teardown")

    return middleware


class Profiles(Service):
    async def get(self, user_id: int) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"profile": user_id, "user": self._ctx.meta.user}


class Users(Service):
    async def get(self, user_id: int) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"id": user_id, "user": self._ctx.meta.user}

    def count(self) -> int:
        return 3

    async def with_profile(self, user_id: int) -> dict[str, Any]:
        assert self._dal is not None
        profile = await self._dal.users.profile.get(user_id)
        return {"id": user_id, **profile}

    async def conn(self) -> Any:
        return await self._ctx.aget("conn")

    async def fail(self) -> None:
        await asyncio.sleep(0)
        raise Boom("service")


@pytest.fixture(name="dm")
def fixture_dm() -> DataManager:
    """A DataManager with the ``users`` service and its ``profile`` sub-service."""
    dm = DataManager()
    dm.register_services(users=Users().register_services(profile=Profiles()))
    return dm


# -- contexts and the DAL ----------------------------------------------------------


async def test_async_with_context_is_active_and_carries_meta(dm: DataManager) -> None:
    """``async with dm.context(meta)`` is active, across awaits, with that meta, and is popped at exit."""
    assert dm.get_active_context() is None
    async with dm.context({"user": "ann"}) as ctx:
        assert isinstance(ctx, DataAccessContext)
        assert dm.get_active_context() is ctx
        assert dm.require_active_context() is ctx
        assert ctx.meta.user == "ann"
        await asyncio.sleep(0)
        assert dm.get_active_context() is ctx
    assert dm.get_active_context() is None


async def test_async_with_dal_awaits_async_service_methods(dm: DataManager) -> None:
    """Under ``async with dm.dal()``, async methods are awaited (nested, by path,
    from a service), sync ones not."""
    async with dm.dal({"user": "ann"}) as dal:
        assert dal is dm.get_dal()
        assert await dal.users.get(1) == {"id": 1, "user": "ann"}
        assert await dal.users.profile.get(2) == {"profile": 2, "user": "ann"}
        assert await dal["users.get"](3) == {"id": 3, "user": "ann"}
        # An async service reaching another one through self._dal.
        assert await dal.users.with_profile(4) == {"id": 4, "profile": 4, "user": "ann"}
        # Sync methods stay sync inside an async context.
        assert dal.users.count() == 3
    assert dm.get_active_context() is None


async def test_async_service_error_propagates_out_of_the_context(dm: DataManager) -> None:
    """An async service's error goes through the context middleware and out of ``async with dm.dal()``."""
    log: Log = []
    dm.register_context_middleware(async_middleware(log, "mw"))
    with pytest.raises(Boom, match="service"):
        async with dm.dal() as dal:
            await dal.users.fail()
    assert log == ["mw setup", "mw teardown Boom('service')"]


async def test_async_contexts_nest_with_their_own_meta_and_resources(dm: DataManager) -> None:
    """A nested async context has its own meta and resources, torn down at its exit, and then
    the outer one is active again."""
    log: Log = []
    dm.register_resources(conn=async_resource(log, "conn"))
    async with dm.dal({"user": "outer"}) as dal:
        outer = dm.require_active_context()
        outer_conn = await dal.users.conn()
        async with dm.dal({"user": "inner"}) as inner_dal:
            inner = dm.require_active_context()
            assert inner is not outer
            assert await inner_dal.users.get(1) == {"id": 1, "user": "inner"}
            inner_conn = await dal.users.conn()
            assert inner_conn is not outer_conn
            assert inner_conn["ctx"] is inner
        assert log == ["conn setup", "conn setup", "conn teardown"]
        assert dm.get_active_context() is outer
        assert await dal.users.get(1) == {"id": 1, "user": "outer"}
        assert await dal.users.conn() is outer_conn
    assert log == ["conn setup", "conn setup", "conn teardown", "conn teardown"]


# -- async resources ---------------------------------------------------------------


async def test_async_resource_is_created_lazily_once_per_context(dm: DataManager) -> None:
    """An async resource is set up at the first ``aget()``, shared in its context, made anew in the next."""
    log: Log = []
    dm.register_resources(conn=async_resource(log, "conn"))
    async with dm.context() as ctx:
        assert "conn" not in ctx
        assert log == []
        first = await ctx.aget("conn")
        assert "conn" in ctx
        assert first["ctx"] is ctx
        assert await ctx.aget("conn") is first
        # Once created, the plain attribute works too.
        assert ctx.conn is first
        assert log == ["conn setup"]
    assert log == ["conn setup", "conn teardown"]
    async with dm.context() as ctx2:
        assert await ctx2.aget("conn") is not first
    assert log == ["conn setup", "conn teardown", "conn setup", "conn teardown"]


async def test_tasks_reading_an_async_resource_first_at_once_share_one(dm: DataManager) -> None:
    """Two tasks of one context (``asyncio.gather``) read an async resource whose setup awaits: one is made.

    (Each used to make its own; the second replaced the first in the context,
    so the first was torn down unseen, its pending work lost.)
    """
    made: list[object] = []
    closed: list[object] = []

    async def conn(ctx: DataAccessContext) -> AsyncIterator[object]:
        value = object()
        await asyncio.sleep(0.01)  # a connect round trip
        made.append(value)
        try:
            yield value
        finally:
            closed.append(value)

    dm.register_resources(conn=conn)
    async with dm.context() as ctx:
        values = await asyncio.gather(*(ctx.aget("conn") for _ in range(3)))
        assert values[0] is values[1] is values[2]
    assert made == closed == [values[0]]


@pytest.mark.parametrize("failure", ["error", "cancel"])
async def test_a_task_waiting_for_a_failed_first_read_makes_the_resource_itself(
    dm: DataManager, failure: str
) -> None:
    """The task creating the resource fails or is cancelled: the one that waited for it creates it."""
    attempts: list[int] = []
    first_started = asyncio.Event()

    async def conn(ctx: DataAccessContext) -> AsyncIterator[int]:
        attempts.append(len(attempts))
        if len(attempts) == 1:
            first_started.set()
            await asyncio.sleep(0.05)
            raise Boom("connect")
        yield len(attempts)

    dm.register_resources(conn=conn)
    async with dm.context() as ctx:
        first = asyncio.ensure_future(ctx.aget("conn"))
        await first_started.wait()
        second = asyncio.ensure_future(ctx.aget("conn"))
        await asyncio.sleep(0)
        if failure == "cancel":
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
        else:
            with pytest.raises(Boom):
                await first
        assert await second == 2
        assert await ctx.aget("conn") == 2
    assert attempts == [0, 1]


async def test_a_factory_failing_before_its_generator_exists_can_be_read_again(dm: DataManager) -> None:
    """A decorator raising before the async generator exists: the next aget() tries again (it hung)."""
    failures = [ConnectionError("circuit open")]

    def breaker(func: Any) -> Any:
        @functools.wraps(func)
        def wrapper(ctx: DataAccessContext) -> Any:
            if failures:
                raise failures.pop()
            return func(ctx)

        return wrapper

    @breaker
    async def conn(ctx: DataAccessContext) -> AsyncIterator[str]:
        yield "conn"

    dm.register_resources(conn=conn)
    async with dm.context() as ctx:
        with pytest.raises(ConnectionError):
            await ctx.aget("conn")
        assert await asyncio.wait_for(ctx.aget("conn"), 5) == "conn"


async def test_a_teardown_reads_async_resources_not_yet_torn_down(dm: DataManager) -> None:
    """In an async context, a resource's teardown may read one created before it (torn down after it)."""
    seen: list[Any] = []

    async def first(ctx: DataAccessContext) -> AsyncIterator[str]:
        yield "first"
        seen.append("first closed")

    async def second(ctx: DataAccessContext) -> AsyncIterator[str]:
        yield "second"
        seen.append(await ctx.aget("first"))

    dm.register_resources(first=first, second=second)
    async with dm.context() as ctx:
        await ctx.aget("first")
        await ctx.aget("second")
    assert seen == ["first", "first closed"]
    assert ctx.get_resource_exit_errors() == []


async def test_async_resource_never_accessed_is_never_created(dm: DataManager) -> None:
    """An async resource that nobody asks for is never set up or torn down."""
    log: Log = []
    dm.register_resources(conn=async_resource(log, "conn"))
    async with dm.context() as ctx:
        pass
    assert log == []
    assert ctx.get_resource_exit_errors() == []


async def test_resources_are_torn_down_in_reverse_order_of_creation(dm: DataManager) -> None:
    """Async and sync resources are torn down in reverse order of creation, not of registration."""
    log: Log = []
    dm.register_resources(
        a=async_resource(log, "a"),
        b=async_resource(log, "b"),
        c=async_resource(log, "c"),
        s=sync_resource(log, "s"),
    )
    async with dm.context() as ctx:
        await ctx.aget("b")
        ctx.s  # a sync resource, created by plain attribute access
        await ctx.aget("c")
        await ctx.aget("a")
        log.append("body")
    assert log == [
        "b setup",
        "s setup",
        "c setup",
        "a setup",
        "body",
        "a teardown",
        "c teardown",
        "s teardown",
        "b teardown",
    ]
    assert ctx.get_resource_exit_errors() == []


async def test_body_exception_is_thrown_into_async_resources_and_still_propagates(dm: DataManager) -> None:
    """The body's error is thrown into each async resource and propagates even if a resource swallows it."""
    log: Log = []
    seen: Log = []

    async def swallowing(ctx: DataAccessContext) -> AsyncIterator[str]:
        try:
            yield "value"
        except Boom as exc:
            seen.append(exc)  # a resource cannot suppress the context's exception

    dm.register_resources(a=async_resource(log, "a"), swallow=swallowing)
    ctx = dm.context()

    async def body() -> None:
        async with ctx:
            await ctx.aget("a")
            await ctx.aget("swallow")
            raise Boom("body")

    with pytest.raises(Boom, match="body") as raised:
        await body()
    assert seen == [raised.value]
    assert log == ["a setup", "a teardown Boom"]
    assert ctx.get_resource_exit_errors() == []


async def test_async_resource_teardown_error_is_collected_logged_never_raised(
    dm: DataManager, caplog: pytest.LogCaptureFixture
) -> None:
    """An async resource's teardown error is collected and logged, not raised; later teardowns still run."""
    log: Log = []

    async def broken(ctx: DataAccessContext) -> AsyncIterator[str]:
        yield "value"
        await asyncio.sleep(0)
        raise Boom("teardown")

    dm.register_resources(first=async_resource(log, "first"), broken=broken, last=async_resource(log, "last"))
    with caplog.at_level(logging.WARNING, logger="polydatum"):
        async with dm.context() as ctx:
            await ctx.aget("first")
            await ctx.aget("broken")
            await ctx.aget("last")
    # The error did not stop the other teardowns.
    assert log == ["first setup", "last setup", "last teardown", "first teardown"]
    errors = ctx.get_resource_exit_errors()
    assert len(errors) == 1
    exc_type, exc, tb = errors[0]
    assert exc_type is Boom
    assert isinstance(exc, Boom)
    assert exc.tag == "teardown"
    assert tb is exc.__traceback__ is not None
    records = [r for r in caplog.records if r.name == "polydatum"]
    assert len(records) == 1
    assert "'broken'" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert records[0].exc_info[1] is exc


async def test_async_resource_setup_error_propagates_from_aget(dm: DataManager) -> None:
    """An async resource's setup error raises from ``aget()`` and is thrown into resources already made."""
    log: Log = []

    async def failing(ctx: DataAccessContext) -> AsyncIterator[str]:
        await asyncio.sleep(0)
        raise Boom("setup")
        yield "never"  # pragma: no cover

    dm.register_resources(ok=async_resource(log, "ok"), failing=failing)
    ctx = dm.context()

    async def body() -> None:
        async with ctx:
            await ctx.aget("ok")
            try:
                await ctx.aget("failing")
            finally:
                assert "failing" not in ctx

    with pytest.raises(Boom, match="setup"):
        await body()
    assert log == ["ok setup", "ok teardown Boom"]
    assert ctx.get_resource_exit_errors() == []


async def test_async_resource_that_does_not_yield(dm: DataManager) -> None:
    """``aget()`` of an async resource that never yields raises ResourceSetupException and stores nothing."""

    async def empty(ctx: DataAccessContext) -> AsyncIterator[str]:
        if False:  # pragma: no cover
            yield "never"

    dm.register_resources(empty=empty)
    async with dm.context() as ctx:
        with pytest.raises(ResourceSetupException, match=r"resource 'empty' did not yield on setup"):
            await ctx.aget("empty")
        assert "empty" not in ctx


async def test_async_resource_that_yields_twice_is_an_exit_error(dm: DataManager) -> None:
    """An async resource that yields twice is closed and collected as a RuntimeError naming it."""
    closed: Log = []

    async def twice(ctx: DataAccessContext) -> AsyncIterator[str]:
        try:
            yield "one"
            yield "two"
        finally:
            closed.append("closed")

    dm.register_resources(twice=twice)
    async with dm.context() as ctx:
        assert await ctx.aget("twice") == "one"
    assert closed == ["closed"]
    [(exc_type, exc, _)] = ctx.get_resource_exit_errors()
    assert exc_type is RuntimeError
    assert "yielded more than once" in str(exc)
    assert "'twice'" in str(exc)


async def test_async_resource_that_yields_again_after_an_exception(dm: DataManager) -> None:
    """An async resource yielding again after the body's error was thrown in is collected as RuntimeError."""

    async def stubborn(ctx: DataAccessContext) -> AsyncIterator[str]:
        try:
            yield "one"
        except Boom:
            yield "again"

    dm.register_resources(stubborn=stubborn)
    ctx = dm.context()

    async def body() -> None:
        async with ctx:
            await ctx.aget("stubborn")
            raise Boom("body")

    with pytest.raises(Boom, match="body"):
        await body()
    [(exc_type, exc, _)] = ctx.get_resource_exit_errors()
    assert exc_type is RuntimeError
    assert "yielded again after an exception" in str(exc)


async def test_sync_resources_work_in_async_contexts(dm: DataManager) -> None:
    """A sync resource in an async context is one shared value, by attribute and through ``aget()``."""
    log: Log = []
    dm.register_resources(s=sync_resource(log, "s"))
    async with dm.context() as ctx:
        value = ctx.s
        assert value["ctx"] is ctx
        assert await ctx.aget("s") is value
        assert ctx.s is value
    assert log == ["s setup", "s teardown"]


async def test_asynccontextmanager_and_class_based_async_resources(dm: DataManager) -> None:
    """``@asynccontextmanager`` functions and Resource classes with an async ``__call__`` are resources."""
    log: Log = []

    @asynccontextmanager
    async def managed(ctx: DataAccessContext) -> AsyncIterator[str]:
        log.append("managed setup")
        yield "managed"
        log.append("managed teardown")

    class Pool(Resource):
        async def __call__(self, context: DataAccessContext) -> AsyncIterator[str]:  # type: ignore[override]
            log.append("pool setup")
            yield "pool"
            log.append("pool teardown")

    dm.register_resources(managed=managed, pool=Pool())
    async with dm.context() as ctx:
        assert await ctx.aget("managed") == "managed"
        assert await ctx.aget("pool") == "pool"
    assert log == ["managed setup", "pool setup", "pool teardown", "managed teardown"]


async def test_async_service_creates_resources_through_self_ctx(dm: DataManager) -> None:
    """An async service gets a resource through ``self._ctx.aget()``: the same one the context hands out."""
    log: Log = []
    dm.register_resources(conn=async_resource(log, "conn"))
    async with dm.dal() as dal:
        ctx = dm.require_active_context()
        conn = await dal.users.conn()
        assert conn["ctx"] is ctx
        assert await ctx.aget("conn") is conn
    assert log == ["conn setup", "conn teardown"]


# -- async context middleware ------------------------------------------------------


async def test_context_middleware_set_up_in_order_torn_down_in_reverse(dm: DataManager) -> None:
    """Sync and async context middleware set up in order and tear down in reverse, before the resources."""
    log: Log = []
    dm.register_context_middleware(
        async_middleware(log, "m1"), sync_middleware(log, "m2"), async_middleware(log, "m3")
    )
    dm.register_resources(conn=async_resource(log, "conn"))
    async with dm.context() as ctx:
        log.append("body")
        await ctx.aget("conn")
    # Middleware teardown (step 4) comes before resource teardown (step 6).
    assert log == [
        "m1 setup",
        "m2 setup",
        "m3 setup",
        "body",
        "conn setup",
        "m3 teardown",
        "m2 teardown",
        "m1 teardown",
        "conn teardown",
    ]


async def test_body_exception_is_thrown_into_each_middleware_in_reverse(dm: DataManager) -> None:
    """The body's error is thrown into each sync and async context middleware, innermost first."""
    log: Log = []
    dm.register_context_middleware(async_middleware(log, "m1"), sync_middleware(log, "m2"))
    with pytest.raises(Boom, match="body"):
        async with dm.context():
            raise Boom("body")
    assert log == ["m1 setup", "m2 setup", "m2 teardown Boom('body')", "m1 teardown Boom('body')"]


async def test_async_middleware_cannot_suppress_the_exception(dm: DataManager) -> None:
    """A middleware that swallows the body's error leaves it in flight: outer middleware, resources
    and the caller see it, and the outcome is rollback."""
    log: Log = []

    async def suppress(ctx: DataAccessContext) -> AsyncIterator[None]:
        try:
            yield
        except Boom as exc:
            await asyncio.sleep(0)
            log.append(f"suppressed {exc.tag}")

    dm.register_context_middleware(async_middleware(log, "outer"), suppress)
    dm.register_resources(conn=async_resource(log, "conn"))

    async def body() -> None:
        async with dm.context() as ctx:
            ctx.on_commit(log.append, "commit")
            ctx.on_rollback(log.append, "rollback")
            await ctx.aget("conn")
            raise Boom("body")

    with pytest.raises(Boom, match="body"):
        await body()
    assert log[:3] == ["outer setup", "conn setup", "suppressed body"]
    assert "commit" not in log
    assert "rollback" in log


async def test_async_middleware_may_replace_the_exception(dm: DataManager) -> None:
    """An async middleware may replace the body's error; outer middleware, resources and caller see that."""
    log: Log = []

    async def replace(ctx: DataAccessContext) -> AsyncIterator[None]:
        try:
            yield
        except Boom as exc:
            raise ValueError(f"replaced {exc.tag}") from exc

    dm.register_context_middleware(async_middleware(log, "outer"), replace)
    dm.register_resources(conn=async_resource(log, "conn"))

    async def body() -> None:
        async with dm.context() as ctx:
            await ctx.aget("conn")
            raise Boom("body")

    with pytest.raises(ValueError, match="replaced body") as raised:
        await body()
    assert isinstance(raised.value.__cause__, Boom)
    assert log == [
        "outer setup",
        "conn setup",
        "outer teardown ValueError('replaced body')",
        "conn teardown ValueError",
    ]


async def test_async_middleware_teardown_error_replaces_success(dm: DataManager) -> None:
    """An async middleware failing after a clean body raises through outer ones; the rollback hooks run."""
    log: Log = []

    async def failing_commit(ctx: DataAccessContext) -> AsyncIterator[None]:
        yield
        await asyncio.sleep(0)
        raise Boom("commit failed")

    dm.register_context_middleware(async_middleware(log, "outer"), failing_commit)

    async def body() -> None:
        async with dm.context() as ctx:
            ctx.on_commit(log.append, "commit")
            ctx.on_rollback(log.append, "rollback")

    with pytest.raises(Boom, match="commit failed"):
        await body()
    assert log == ["outer setup", "outer teardown Boom('commit failed')", "rollback"]


async def test_async_middleware_setup_error_tears_down_earlier_ones(dm: DataManager) -> None:
    """An async middleware's setup error is thrown into the middleware and resources set up before it."""
    log: Log = []

    async def failing(ctx: DataAccessContext) -> AsyncIterator[None]:
        log.append("failing setup")
        await asyncio.sleep(0)
        raise Boom("setup")
        yield  # pragma: no cover

    async def uses_resource(ctx: DataAccessContext) -> AsyncIterator[None]:
        await ctx.aget("conn")
        yield

    dm.register_context_middleware(
        async_middleware(log, "m1"), uses_resource, failing, async_middleware(log, "never")
    )
    dm.register_resources(conn=async_resource(log, "conn"))
    ctx = dm.context()
    with pytest.raises(Boom, match="setup"):
        async with ctx:
            log.append("body")  # pragma: no cover
    assert log == [
        "m1 setup",
        "conn setup",
        "failing setup",
        "m1 teardown Boom('setup')",
        "conn teardown Boom",
    ]
    assert dm.get_active_context() is None
    with pytest.raises(ContextStateError):
        await ctx.aget("conn")


async def test_async_middleware_that_does_not_yield(dm: DataManager) -> None:
    """An async middleware that never yields raises MiddlewareSetupException naming it, via earlier ones."""
    log: Log = []

    async def empty(ctx: DataAccessContext) -> AsyncIterator[None]:
        log.append("empty ran")
        if False:  # pragma: no cover
            yield

    dm.register_context_middleware(async_middleware(log, "m1"), empty)
    with pytest.raises(MiddlewareSetupException, match="did not yield on setup") as raised:
        async with dm.context():
            log.append("body")  # pragma: no cover
    assert "empty" in str(raised.value)
    assert log == ["m1 setup", "empty ran", f"m1 teardown {raised.value!r}"]
    assert dm.get_active_context() is None


async def test_async_middleware_that_yields_twice(dm: DataManager) -> None:
    """An async middleware that yields twice is closed; a RuntimeError naming it goes through outer ones."""
    log: Log = []

    async def twice(ctx: DataAccessContext) -> AsyncIterator[None]:
        try:
            yield
            yield
        finally:
            log.append("twice closed")

    dm.register_context_middleware(async_middleware(log, "m1"), twice)
    with pytest.raises(RuntimeError, match="yielded more than once") as raised:
        async with dm.context():
            pass
    assert "twice" in str(raised.value)
    # The generator was closed, and the error went through the outer middleware.
    assert log == ["m1 setup", "twice closed", f"m1 teardown {raised.value!r}"]


async def test_async_middleware_that_yields_again_after_an_exception(dm: DataManager) -> None:
    """An async middleware yielding again after the body's error was thrown in raises a RuntimeError."""
    log: Log = []

    async def stubborn(ctx: DataAccessContext) -> AsyncIterator[None]:
        try:
            yield
        except Boom:
            yield

    dm.register_context_middleware(async_middleware(log, "m1"), stubborn)
    with pytest.raises(RuntimeError, match="yielded again after an exception was thrown into it"):
        async with dm.context():
            raise Boom("body")
    assert log[0] == "m1 setup"
    assert log[1].startswith("m1 teardown RuntimeError(")


async def test_async_middleware_reads_meta_and_resources(dm: DataManager) -> None:
    """An async middleware reads the meta and awaits a resource, which is still there at its teardown."""
    log: Log = []
    seen: Log = []

    async def tenant(ctx: DataAccessContext) -> AsyncIterator[None]:
        conn = await ctx.aget("conn")
        seen.append((ctx.meta.tenant, conn["ctx"] is ctx))
        yield
        seen.append(("end", "conn" in ctx))

    dm.register_context_middleware(tenant)
    dm.register_resources(conn=async_resource(log, "conn"))
    async with dm.context({"tenant": "acme"}):
        pass
    assert seen == [("acme", True), ("end", True)]
    assert log == ["conn setup", "conn teardown"]


# -- async method middleware --------------------------------------------------------


async def test_async_method_middleware_chain_runs_outermost_first(dm: DataManager) -> None:
    """Async and sync method middleware run outermost first and may change the arguments and the result."""
    log: Log = []

    async def outer(request: DalCommandRequest, handler: Callable[..., Awaitable[Any]]) -> Any:
        log.append(("outer in", request.path_name, request.dal_method is None))
        request.args = tuple(a * 10 for a in request.args)
        result = await handler(request)
        log.append(("outer out", request.dal_method is not None))
        return {**result, "outer": True}

    async def middle(request: DalCommandRequest, handler: Callable[..., Awaitable[Any]]) -> Any:
        log.append(("middle in", request.args))
        assert request.ctx is dm.get_active_context()
        await asyncio.sleep(0)
        result = await handler(request)
        log.append("middle out")
        return result

    def inner(request: DalCommandRequest, handler: Callable[..., Any]) -> Any:
        # A sync middleware inside async ones: returns the service's coroutine as is.
        log.append("inner")
        return handler(request)

    dm.register_method_middleware(outer, middle, inner)
    async with dm.dal({"user": "ann"}) as dal:
        assert await dal.users.get(1) == {"id": 10, "user": "ann", "outer": True}
    assert log == [
        ("outer in", "users.get", True),
        ("middle in", (10,)),
        "inner",
        "middle out",
        ("outer out", True),
    ]


async def test_async_method_middleware_around_a_sync_method(dm: DataManager) -> None:
    """Under async method middleware, a sync service method returns a coroutine that gives its result."""
    calls: Log = []

    async def audit(request: DalCommandRequest, handler: Callable[..., Awaitable[Any]]) -> Any:
        calls.append(request.path_name)
        return await handler(request)

    dm.register_method_middleware(audit)
    async with dm.dal() as dal:
        pending = dal.users.count()
        assert asyncio.iscoroutine(pending)
        assert await pending == 3
    assert calls == ["users.count"]


async def test_class_based_async_method_middleware_is_instantiated(dm: DataManager) -> None:
    """A class given as async method middleware is instantiated once, and its instance wraps every call."""

    class Tag:
        instances = 0

        def __init__(self) -> None:
            Tag.instances += 1

        async def __call__(self, request: DalCommandRequest, handler: Callable[..., Awaitable[Any]]) -> Any:
            return ("tagged", await handler(request))

    dm.register_method_middleware(Tag)
    async with dm.dal({"user": "ann"}) as dal:
        assert await dal.users.get(1) == ("tagged", {"id": 1, "user": "ann"})
        assert await dal.users.get(2) == ("tagged", {"id": 2, "user": "ann"})
    assert Tag.instances == 1


async def test_async_method_middleware_sees_and_may_translate_service_errors(dm: DataManager) -> None:
    """Async method middleware may turn a service error into another; unknown methods raise DalMethodError."""

    async def translate(request: DalCommandRequest, handler: Callable[..., Awaitable[Any]]) -> Any:
        try:
            return await handler(request)
        except Boom as exc:
            raise LookupError(f"{request.path_name}: {exc.tag}") from exc

    dm.register_method_middleware(translate)
    async with dm.dal() as dal:
        with pytest.raises(LookupError, match=r"users\.fail: service"):
            await dal.users.fail()
        with pytest.raises(DalMethodError, match="nope"):
            await dal.users.nope()


async def test_async_method_middleware_refuses_calls_from_a_sync_context(dm: DataManager) -> None:
    """Under async method middleware, a DAL call in a sync context raises NoActiveContextError."""

    async def audit(request: DalCommandRequest, handler: Callable[..., Awaitable[Any]]) -> Any:
        return await handler(request)  # pragma: no cover - never reached

    dm.register_method_middleware(audit)
    with dm.dal() as dal:
        with pytest.raises(
            NoActiveContextError, match=r'dal\.users\.count: .* must be awaited inside "async with'
        ):
            dal.users.count()
        with pytest.raises(NoActiveContextError, match="must be awaited"):
            dal["users.get"](1)
    # The same DAL works once the context is async.
    async with dm.dal() as dal:
        assert await dal.users.count() == 3


# -- commit and rollback hooks ---------------------------------------------------------


async def test_commit_hooks_sync_and_async_run_in_order_after_middleware_before_resources(
    dm: DataManager,
) -> None:
    """After a clean body, sync and async commit hooks run in order, after middleware, before resources."""
    log: Log = []

    async def async_hook(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0)
        log.append(("async hook", args, kwargs))

    def sync_hook(*args: Any, **kwargs: Any) -> None:
        log.append(("sync hook", args, kwargs))

    dm.register_context_middleware(async_middleware(log, "mw"))
    dm.register_resources(conn=async_resource(log, "conn"))
    async with dm.context() as ctx:
        await ctx.aget("conn")
        ctx.on_commit(async_hook, 1, key="a")
        ctx.on_rollback(log.append, "rollback")
        ctx.on_commit(sync_hook, 2)
    assert log == [
        "mw setup",
        "conn setup",
        "mw teardown",
        ("async hook", (1,), {"key": "a"}),
        ("sync hook", (2,), {}),
        "conn teardown",
    ]
    assert ctx.get_hook_errors() == []


async def test_rollback_hooks_run_when_the_context_ends_with_an_exception(dm: DataManager) -> None:
    """When the body raises, the sync and async rollback hooks run in order, and the commit hooks do not."""
    log: Log = []

    async def async_rollback(tag: str) -> None:
        await asyncio.sleep(0)
        log.append(f"async rollback {tag}")

    async def body() -> None:
        async with dm.context() as ctx:
            ctx.on_commit(log.append, "commit")
            ctx.on_rollback(async_rollback, "x")
            ctx.on_rollback(log.append, "sync rollback")
            raise Boom("body")

    with pytest.raises(Boom):
        await body()
    assert log == ["async rollback x", "sync rollback"]


async def test_hook_errors_are_collected_and_logged_and_later_hooks_still_run(
    dm: DataManager, caplog: pytest.LogCaptureFixture
) -> None:
    """Sync and async hook errors are collected and logged, not raised, and the hooks after them still run."""
    log: Log = []

    async def async_failing() -> None:
        await asyncio.sleep(0)
        raise Boom("async hook")

    def sync_failing() -> None:
        raise Boom("sync hook")

    with caplog.at_level(logging.WARNING, logger="polydatum"):
        async with dm.context() as ctx:
            ctx.on_commit(async_failing)
            ctx.on_commit(sync_failing)
            ctx.on_commit(log.append, "still runs")
    assert log == ["still runs"]
    errors = ctx.get_hook_errors()
    assert [e[1].tag for e in errors] == ["async hook", "sync hook"]  # type: ignore[attr-defined]
    assert ctx.get_resource_exit_errors() == []
    messages = [r.getMessage() for r in caplog.records if r.name == "polydatum"]
    assert len(messages) == 2
    assert all("hook" in m and "failed" in m for m in messages)


async def test_hooks_may_use_resources_and_register_more_hooks(dm: DataManager) -> None:
    """A commit hook may create a resource, torn down after the hooks, and register a hook that runs too."""
    log: Log = []
    dm.register_resources(conn=async_resource(log, "conn"))

    async def first(ctx: DataAccessContext) -> None:
        conn = await ctx.aget("conn")  # created during the hooks, still torn down
        log.append(("first", conn["name"]))
        ctx.on_commit(log.append, "registered by a hook")

    async with dm.context() as ctx:
        ctx.on_commit(first, ctx)
    assert log == ["conn setup", ("first", "conn"), "registered by a hook", "conn teardown"]


@pytest.mark.parametrize(
    "wrap",
    [lambda fn: fn, lambda fn: functools.partial(fn), lambda fn: AsyncCall(fn)],
    ids=["coroutine function", "partial", "async __call__"],
)
async def test_an_async_hook_in_a_sync_context_is_refused_where_it_is_registered(
    dm: DataManager, wrap: Callable[[Any], Any]
) -> None:
    """A hook declared async, registered in a sync context, is a TypeError at once naming ``async with``."""
    ran: Log = []

    async def async_hook() -> None:
        ran.append("ran")  # pragma: no cover - never called

    with dm.context() as ctx:
        with pytest.raises(TypeError, match='enter the context with "async with"'):
            ctx.on_commit(wrap(async_hook))
        ctx.on_commit(ran.append, "sync")
    assert ran == ["sync"]
    assert ctx.get_hook_errors() == []


async def test_a_hook_returning_an_awaitable_in_a_sync_context_is_a_collected_type_error(
    dm: DataManager,
) -> None:
    """A sync callable that returns a coroutine is only known at the commit: closed unrun, collected."""
    ran: Log = []

    async def async_hook() -> None:
        ran.append("ran")  # pragma: no cover - never awaited

    with dm.context() as ctx:
        ctx.on_commit(lambda: async_hook())
        ctx.on_commit(ran.append, "sync")
    gc.collect()  # an un-closed coroutine would warn here (warnings are errors)
    assert ran == ["sync"]
    [(exc_type, exc, _)] = ctx.get_hook_errors()
    assert exc_type is TypeError
    assert 'enter the context with "async with"' in str(exc)


class AsyncCall:
    """An object whose ``__call__`` is a coroutine function."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    async def __call__(self) -> None:
        await self.fn()  # pragma: no cover - never called


# -- error paths ---------------------------------------------------------------


async def test_async_resource_read_as_an_attribute_is_refused(dm: DataManager) -> None:
    """Reading an async resource as an attribute raises ResourceException pointing at ``aget()``."""
    log: Log = []
    dm.register_resources(conn=async_resource(log, "conn"))
    async with dm.context() as ctx:
        with pytest.raises(
            ResourceException, match=r"resource 'conn' is async; get it with \"await ctx\.aget"
        ):
            ctx.conn
        assert "conn" not in ctx
    with dm.context() as sync_ctx, pytest.raises(ResourceException, match="is async"):
        sync_ctx.conn
    assert log == []


async def test_awaiting_an_async_resource_in_a_sync_context_is_refused(dm: DataManager) -> None:
    """In a sync context, ``aget()`` refuses an async resource with ResourceException but gives a sync one."""
    log: Log = []
    dm.register_resources(conn=async_resource(log, "conn"), s=sync_resource(log, "s"))
    with dm.context() as ctx:
        with pytest.raises(ResourceException, match=r'enter the context with "async with dm.context\(\):"'):
            await ctx.aget("conn")
        assert "conn" not in ctx
        # Sync resources are fine through aget() in a sync context.
        assert (await ctx.aget("s"))["name"] == "s"
    assert log == ["s setup", "s teardown"]


async def test_async_service_reaching_an_async_resource_from_a_sync_context(dm: DataManager) -> None:
    """An async service awaited in a sync context gets ResourceException from an async resource."""
    # The docs are silent on async def services in a sync context: the DAL hands back
    # the coroutine (no async method middleware, so nothing refuses it); the async
    # resource it reaches for is refused with the same clear message.
    dm.register_resources(conn=async_resource([], "conn"))
    with dm.dal() as dal, pytest.raises(ResourceException, match=r'"async with dm\.context'):
        await dal.users.conn()


async def test_async_context_middleware_in_a_sync_context_is_refused(dm: DataManager) -> None:
    """Async context middleware under plain ``with`` raises MiddlewareSetupException through earlier ones."""
    log: Log = []
    dm.register_context_middleware(sync_middleware(log, "m1"), async_middleware(log, "am"))

    def body() -> None:
        with dm.context():
            log.append("body")  # pragma: no cover

    with pytest.raises(MiddlewareSetupException, match=r'is async; enter the context with "async with'):
        body()
    assert log[0] == "m1 setup"
    assert log[1].startswith("m1 teardown MiddlewareSetupException(")
    assert len(log) == 2
    assert dm.get_active_context() is None
    # The same manager works with "async with".
    async with dm.context():
        log.append("body")
    assert log[2:] == ["m1 setup", "am setup", "body", "am teardown", "m1 teardown"]


async def test_unknown_resource_through_aget(dm: DataManager) -> None:
    """``aget()`` of an unregistered name raises AttributeError listing the registered resources."""
    dm.register_resources(conn=async_resource([], "conn"))
    async with dm.context() as ctx:
        with pytest.raises(AttributeError, match=r"no resource named 'nope'.*registered resources: conn"):
            await ctx.aget("nope")


async def test_a_context_cannot_be_used_after_it_exited(dm: DataManager) -> None:
    """An exited context cannot be re-entered, read, given hooks or exited again; its DAL commands fail."""
    log: Log = []
    dm.register_resources(conn=async_resource(log, "conn"), s=sync_resource(log, "s"))
    ctx = dm.context()
    async with ctx:
        await ctx.aget("conn")
        command = ctx.dal.users.get
    with pytest.raises(ContextStateError, match="single-use") as raised:
        async with ctx:
            pass  # pragma: no cover
    assert isinstance(raised.value, RuntimeError)
    with pytest.raises(ContextStateError, match="already exited"):
        await ctx.aget("conn")
    with pytest.raises(ContextStateError, match="already exited"):
        ctx.s
    with pytest.raises(ContextStateError, match="already ended"):
        ctx.on_commit(log.append, "late")
    with pytest.raises(ContextStateError, match="not open"):
        await ctx.__aexit__(None, None, None)
    # In the task that opened it, the DAL has no context any more.
    with pytest.raises(NoActiveContextError, match="no active polydatum context"):
        await command(1)
    assert log == ["conn setup", "conn teardown"]


async def test_a_context_that_was_never_entered_says_so(dm: DataManager) -> None:
    """``aget()`` on a context that was never entered raises ContextStateError saying so."""
    dm.register_resources(conn=async_resource([], "conn"))
    ctx = dm.context()
    with pytest.raises(ContextStateError, match="never entered"):
        await ctx.aget("conn")


async def test_a_coroutine_awaited_after_its_context_exited(dm: DataManager) -> None:
    """A service coroutine awaited after its context exited raises NoActiveContextError."""
    async with dm.dal({"user": "ann"}) as dal:
        pending = dal.users.get(1)  # created inside, awaited outside
    with pytest.raises(NoActiveContextError, match=r'no active polydatum context.*"async with dm.context'):
        await pending


async def test_a_kept_dal_command_works_in_a_later_context(dm: DataManager) -> None:
    """A DAL command kept from one context runs in whichever context is active when it is called."""
    async with dm.dal({"user": "ann"}) as dal:
        get = dal.users.get
        assert await get(1) == {"id": 1, "user": "ann"}
    async with dm.dal({"user": "bob"}):
        assert await get(2) == {"id": 2, "user": "bob"}


async def test_a_plain_async_context_lets_the_body_exception_through_and_pops(dm: DataManager) -> None:
    """Async contexts without middleware, resources or hooks let the body's error out and are popped."""
    # No middleware, resources or hooks: the cheap exit path.
    outer = dm.context()

    async def body() -> None:
        async with outer, dm.context() as inner:
            assert dm.get_active_context() is inner
            raise Boom("body")

    with pytest.raises(Boom, match="body"):
        await body()
    assert dm.get_active_context() is None
    with pytest.raises(ContextStateError):
        await outer.__aenter__()


async def test_dal_scope_error_survives_an_async_middleware_that_swallows_it(dm: DataManager) -> None:
    """``async with dm.dal()`` lets the body's error out even when a middleware swallowed it."""

    async def suppress(ctx: DataAccessContext) -> AsyncIterator[None]:
        try:
            yield
        except Boom:
            pass

    dm.register_context_middleware(suppress)
    with pytest.raises(Boom):
        async with dm.dal() as dal:
            await dal.users.fail()
    assert dm.get_active_context() is None


async def test_per_context_async_middleware_from_get_middleware() -> None:
    """A DataManager's ``get_middleware()`` override picks each context's async middleware from its meta."""
    log: Log = []

    class PerTenant(DataManager):
        def get_middleware(self, context: DataAccessContext) -> list[Any]:
            # Chosen per context, from its meta.
            if context.meta.tenant == "audited":
                return [async_middleware(log, "audit")]
            return []

    dm = PerTenant()
    dm.register_services(users=Users())
    async with dm.dal({"tenant": "audited", "user": "ann"}) as dal:
        assert await dal.users.get(1) == {"id": 1, "user": "ann"}
    async with dm.dal({"tenant": "other"}):
        log.append("plain body")
    assert log == ["audit setup", "audit teardown", "plain body"]


# -- the lean exit: a context whose only teardown is its async resources ---------------------


class ExitRecorder(Observer):
    """Records the context events, with the resources' log interleaved."""

    def __init__(self, log: Log) -> None:
        self.log = log

    def context_entered(self, ctx: DataAccessContext) -> Any:
        self.log.append("entered")
        return "state"

    def context_exiting(self, ctx: DataAccessContext, state: Any) -> None:
        self.log.append(f"exiting {state}")

    def context_exited(self, ctx: DataAccessContext, state: Any, exc: BaseException | None) -> None:
        self.log.append(f"exited {state} {type(exc).__name__ if exc else None}")


@pytest.mark.parametrize("fail", [False, True])
async def test_observer_sees_a_context_with_only_async_resources_exit_before_they_close(
    dm: DataManager, fail: bool
) -> None:
    """With an observer and no middleware or hooks, it is told of the exit, then the resource closes."""
    log: Log = []
    dm.register_resources(conn=async_resource(log, "conn"))
    dm.set_observer(ExitRecorder(log))
    with pytest.raises(Boom) if fail else contextlib.nullcontext():
        async with dm.context() as ctx:
            await ctx.aget("conn")
            if fail:
                raise Boom("body")
    outcome = ["exited state Boom", "conn teardown Boom"] if fail else ["exited state None", "conn teardown"]
    assert log == ["entered", "conn setup", "exiting state", *outcome]
    assert dm.get_active_context() is None
    assert "conn" not in ctx


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
async def test_interrupt_in_an_async_resource_teardown_without_hooks_propagates_after_the_rest(
    dm: DataManager, interrupt: type[BaseException]
) -> None:
    """No hooks or middleware: an interrupt in one async resource's teardown closes the rest, then rises."""
    log: Log = []

    async def interrupted(ctx: DataAccessContext) -> AsyncIterator[str]:
        yield "x"
        await asyncio.sleep(0)
        raise interrupt()

    dm.register_resources(a=async_resource(log, "a"), x=interrupted, c=async_resource(log, "c"))
    ctx = dm.context()

    async def body() -> None:
        async with ctx:
            for name in ("a", "x", "c"):
                await ctx.aget(name)

    with pytest.raises(interrupt):
        await body()
    assert log == ["a setup", "c setup", "c teardown", "a teardown"]
    [(exc_type, _, _)] = ctx.get_resource_exit_errors()
    assert exc_type is interrupt
    assert dm.get_active_context() is None


async def test_context_with_async_resources_exited_in_another_task_closes_them_and_is_not_left_active(
    dm: DataManager,
) -> None:
    """Entered in one task, exited in another: the resources close and neither task sees it active after."""
    log: Log = []
    dm.register_resources(conn=async_resource(log, "conn"))
    ctx = dm.context()
    await ctx.__aenter__()
    await ctx.aget("conn")

    async def exit_elsewhere() -> DataAccessContext | None:
        await ctx.__aexit__(None, None, None)
        return dm.get_active_context()

    # The task runs in a copy of this task's contextvars, so the stack's token is not its own.
    assert await asyncio.create_task(exit_elsewhere()) is None
    assert dm.get_active_context() is None
    assert log == ["conn setup", "conn teardown"]
    assert repr(ctx).startswith(f"<{type(ctx).__name__} exited")
    with pytest.raises(ContextStateError, match="already used"):
        async with ctx:
            pass

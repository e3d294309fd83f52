"""The observer seam: what a DataManager's observer is told, and when."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from polydatum import DataManager, Service
from polydatum.errors import DalMethodError, NotFound
from polydatum.observer import Observer, Proceed


class Users(Service):
    def get(self, user_id: int) -> int:
        if user_id < 0:
            raise NotFound(f"no user {user_id}")
        return user_id

    def twice(self, user_id: int) -> list[int]:
        return [self._dal.users.get(user_id), self._dal.users.get(user_id)]

    async def aget(self, user_id: int) -> int:
        await asyncio.sleep(0)
        return user_id


class Recorder(Observer):
    """Writes every event to a list."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.count = 0

    def context_entered(self, ctx: Any) -> Any:
        self.count += 1
        self.events.append(("enter", self.count))
        return self.count

    def context_exited(self, ctx: Any, state: Any, exc: BaseException | None) -> None:
        self.events.append(("exit", state, type(exc).__name__ if exc else None, len(ctx.get_hook_errors())))

    def dal_call(self, ctx: Any, state: Any, path: Any, proceed: Proceed, args: Any, kwargs: Any) -> Any:
        name = ".".join(p.name for p in path)
        self.events.append(("call", state, name, args))
        try:
            return proceed(ctx, args, kwargs)
        finally:
            self.events.append(("done", name))


@pytest.fixture(name="dm")
def fixture_dm() -> DataManager:
    """A DataManager with the Users service."""
    dm = DataManager()
    dm.register_services(users=Users())
    return dm


def test_the_observer_sees_contexts_calls_and_nested_calls_in_order(dm: DataManager) -> None:
    """An observer is told of the context's entry, each call around its nested calls, and the exit."""
    recorder = Recorder()
    dm.set_observer(recorder)
    with dm.dal() as dal:
        assert dal.users.twice(3) == [3, 3]
    assert recorder.events == [
        ("enter", 1),
        ("call", 1, "users.twice", (3,)),
        ("call", 1, "users.get", (3,)),
        ("done", "users.get"),
        ("call", 1, "users.get", (3,)),
        ("done", "users.get"),
        ("done", "users.twice"),
        ("exit", 1, None, 0),
    ]


def test_exit_comes_after_middleware_and_hooks_and_sees_the_final_exception(dm: DataManager) -> None:
    """The observer is outside every context middleware: it sees a commit that failed, and hook errors."""
    recorder = Recorder()
    order: list[str] = []

    def failing_commit(ctx: Any) -> Iterator[None]:
        order.append("middleware in")
        yield
        order.append("middleware out")
        raise RuntimeError("commit failed")

    def broken() -> None:
        raise ValueError("hook")

    dm.register_context_middleware(failing_commit)
    dm.set_observer(recorder)
    with pytest.raises(RuntimeError), dm.context() as ctx:
        ctx.on_rollback(broken)
    assert order == ["middleware in", "middleware out"]
    assert recorder.events == [("enter", 1), ("exit", 1, "RuntimeError", 1)]


def test_method_middleware_runs_inside_the_observer(dm: DataManager) -> None:
    """Method middleware registered before and after the observer runs inside its dal_call."""
    recorder = Recorder()

    def middleware(request: Any, handler: Any) -> Any:
        recorder.events.append(("middleware", request.path_name))
        return handler(request)

    dm.register_method_middleware(middleware)
    dm.set_observer(recorder)
    with dm.dal() as dal:
        dal.users.get(1)
    assert recorder.events[1:4] == [
        ("call", 1, "users.get", (1,)),
        ("middleware", "users.get"),
        ("done", "users.get"),
    ]


async def test_async_contexts_and_calls_are_observed(dm: DataManager) -> None:
    """``async with`` contexts are observed; an async call's proceed() gives the awaitable."""
    recorder = Recorder()
    dm.set_observer(recorder)
    async with dm.dal() as dal:
        assert await dal.users.aget(2) == 2
    assert [e[0] for e in recorder.events] == ["enter", "call", "done", "exit"]


def test_failing_calls_and_unknown_paths_go_through_the_observer(dm: DataManager) -> None:
    """A call that raises and a path that does not resolve are both observed, and raise as before."""
    recorder = Recorder()
    dm.set_observer(recorder)
    with pytest.raises(NotFound), dm.dal() as dal:
        dal.users.get(-1)
    with pytest.raises(DalMethodError, match="did you mean"), dm.dal() as dal:
        dal.users.gett(1)
    calls = [e[2] for e in recorder.events if e[0] == "call"]
    assert calls == ["users.get", "users.gett"]
    assert [e[2] for e in recorder.events if e[0] == "exit"] == ["NotFound", "DalMethodError"]


def test_removing_the_observer_restores_the_fast_paths(dm: DataManager) -> None:
    """Setting None stops observing; the manager is plain and its calls direct again."""
    recorder = Recorder()
    dal = dm.get_dal()
    with dm.context():
        dal.users.get(1)  # a cached direct route, re-routed by set_observer
    dm.set_observer(recorder)
    assert not dm.wiring.plain
    assert dm.observer is recorder
    with dm.context():
        dal.users.get(1)
    dm.set_observer(None)
    assert dm.wiring.plain
    assert dm.observer is None
    with dm.context():
        dal.users.get(1)
    assert [e[0] for e in recorder.events] == ["enter", "call", "done", "exit"]


def test_a_chain_route_cached_without_an_observer_is_re_routed_when_one_is_set(dm: DataManager) -> None:
    """With method middleware, a command's route holds the chain without the observer test; setting and
    removing an observer re-routes it, the middleware running every time."""
    recorder = Recorder()
    seen: list[str] = []

    def middleware(request: Any, handler: Any) -> Any:
        seen.append(request.path_name)
        return handler(request)

    dm.register_method_middleware(middleware)
    dal = dm.get_dal()
    with dm.context():
        dal.users.get(1)  # routes through the chain, no observer
    dm.set_observer(recorder)
    with dm.context():
        dal.users.get(2)
    dm.set_observer(None)
    with dm.context():
        dal.users.get(3)
    assert [e[0] for e in recorder.events] == ["enter", "call", "done", "exit"]
    assert recorder.events[1][3] == (2,)
    assert seen == ["users.get"] * 3


def test_a_context_entered_before_the_observer_gives_calls_no_state(dm: DataManager) -> None:
    """Calls in a context opened before set_observer are observed with state None; its exit is not."""
    recorder = Recorder()
    with dm.dal() as dal:
        dm.set_observer(recorder)
        dal.users.get(1)
    assert recorder.events == [("call", None, "users.get", (1,)), ("done", "users.get")]


def test_an_observer_failing_on_exit_is_collected_like_a_hook_error(
    dm: DataManager, caplog: pytest.LogCaptureFixture
) -> None:
    """context_exited raising does not fail the context: the error is logged and collected."""

    class Broken(Observer):
        def context_exited(self, ctx: Any, state: Any, exc: BaseException | None) -> None:
            raise RuntimeError("observer broke")

    dm.set_observer(Broken())
    with dm.context() as ctx:
        pass
    assert [type(e[1]) for e in ctx.get_hook_errors()] == [RuntimeError]


class FailsOnEntry(Observer):
    """An observer whose context_entered raises; records whether context_exited still came."""

    def __init__(self) -> None:
        self.exited = 0

    def context_entered(self, ctx: Any) -> Any:
        raise RuntimeError("observer broke on entry")

    def context_exited(self, ctx: Any, state: Any, exc: BaseException | None) -> None:
        self.exited += 1


def test_an_observer_failing_on_entry_fails_the_entry_and_leaves_no_context(dm: DataManager) -> None:
    """context_entered raising: the error escapes the with, the body never runs, no context stays active."""
    observer = FailsOnEntry()
    dm.set_observer(observer)
    ran = []
    with pytest.raises(RuntimeError, match="on entry"), dm.context():
        ran.append(1)  # pragma: no cover - the entry failed
    assert ran == []
    assert dm.get_active_context() is None
    assert observer.exited == 0, "an observer that never entered is not told of an exit"


async def test_an_observer_failing_on_async_entry_leaves_no_context(dm: DataManager) -> None:
    """The same through ``async with``: the lean async entry shares the sync one's observer call."""
    dm.set_observer(FailsOnEntry())
    with pytest.raises(RuntimeError, match="on entry"):
        async with dm.context():
            pass  # pragma: no cover - the entry failed
    assert dm.get_active_context() is None
    dm.set_observer(None)
    async with dm.context() as ctx:
        assert dm.get_active_context() is ctx, "the failed entry left nothing on the stack"


def test_set_observer_refuses_a_second_observer_and_non_observers(dm: DataManager) -> None:
    """One observer per manager: a second is refused naming the first; a non-Observer is a TypeError."""
    first = Recorder()
    dm.set_observer(first)
    dm.set_observer(first)  # the same one again: nothing changes
    with pytest.raises(ValueError, match="already has the observer"):
        dm.set_observer(Recorder())
    with pytest.raises(TypeError, match=r"must be a polydatum\.observer\.Observer"):
        dm.set_observer(object())  # type: ignore[arg-type]
    assert dm.observer is first


def test_the_base_observer_changes_nothing(dm: DataManager) -> None:
    """Observer() itself passes every call through and commits as usual."""
    dm.set_observer(Observer())
    committed: list[int] = []
    with dm.dal() as dal:
        assert dal.users.twice(4) == [4, 4]
        dm.require_active_context().on_commit(committed.append, 1)
    assert committed == [1]


def test_a_string_path_and_a_1_0_dal_subclass_are_observed() -> None:
    """dal["users.get"] and a DAL subclass that overrides _call (1.0 style) both reach the observer."""
    from polydatum import DataAccessLayer

    class LoggingDAL(DataAccessLayer):
        def _call(self, path: Any, *args: Any, **kwargs: Any) -> Any:
            return super()._call(path, *args, **kwargs)

    class Manager(DataManager):
        DataAccessLayer = LoggingDAL

    dm = Manager()
    dm.register_services(users=Users())
    recorder = Recorder()
    dm.set_observer(recorder)
    with dm.dal() as dal:
        assert dal["users.get"](5) == 5
        assert dal.users.get(6) == 6
    assert [e[3] for e in recorder.events if e[0] == "call"] == [(5,), (6,)]


def test_a_new_observer_never_gets_the_state_of_the_one_before(dm: DataManager) -> None:
    """Calls in a context entered under one observer get state None once another is set."""
    first, second = Recorder(), Recorder()
    dm.set_observer(first)
    with dm.dal() as dal:
        dm.set_observer(None)
        dm.set_observer(second)
        dal.users.get(1)
    assert second.events == [("call", None, "users.get", (1,)), ("done", "users.get")]
    assert first.events == [("enter", 1), ("exit", 1, None, 0)]


class FailsOnExiting(Observer):
    """An observer whose context_exiting raises; counts the exits it is still told of."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.exited: list[str | None] = []

    def context_exiting(self, ctx: Any, state: Any) -> None:
        raise self.error

    def context_exited(self, ctx: Any, state: Any, exc: BaseException | None) -> None:
        self.exited.append(type(exc).__name__ if exc else None)


def closing_resources(dm: DataManager) -> list[str]:
    """Register a sync and an async resource that log their teardown; return the log."""
    closed: list[str] = []

    def conn(ctx: Any) -> Iterator[str]:
        try:
            yield "conn"
        finally:
            closed.append("conn")

    async def aconn(ctx: Any) -> Any:
        try:
            yield "aconn"
        finally:
            closed.append("aconn")

    dm.register_resources(conn=conn, aconn=aconn)
    return closed


@pytest.mark.parametrize("middleware", [False, True], ids=["lean", "middleware"])
def test_an_observer_failing_while_exiting_is_collected_and_the_context_closes_whole(
    dm: DataManager, middleware: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """context_exiting raising is collected like a hook error; the exit is told, all closes, the stack pops"""
    closed = closing_resources(dm)
    if middleware:

        def transaction(ctx: Any) -> Iterator[None]:
            yield
            closed.append("middleware")

        dm.register_context_middleware(transaction)
    observer = FailsOnExiting(RuntimeError("observer broke while exiting"))
    dm.set_observer(observer)
    with dm.context() as ctx:
        assert ctx.conn == "conn"
    assert [type(e[1]) for e in ctx.get_hook_errors()] == [RuntimeError]
    assert "observer broke while exiting" in caplog.text
    assert observer.exited == [None], "context_exited still comes, with the context's outcome"
    assert closed == (["middleware", "conn"] if middleware else ["conn"])
    assert dm.get_active_context() is None
    with dm.context() as again:
        assert dm.get_active_context() is again


async def test_an_observer_failing_while_exiting_an_async_context_is_collected(dm: DataManager) -> None:
    """The async lean exit (an async resource to close) does the same."""
    closed = closing_resources(dm)
    observer = FailsOnExiting(RuntimeError("observer broke while exiting"))
    dm.set_observer(observer)
    entered: list[Any] = []

    async def failing_body() -> None:
        async with dm.context() as ctx:
            entered.append(ctx)
            assert await ctx.aget("aconn") == "aconn"
            raise KeyError("the body's own error")

    with pytest.raises(KeyError):
        await failing_body()
    [ctx] = entered
    assert [type(e[1]) for e in ctx.get_hook_errors()] == [RuntimeError]
    assert observer.exited == ["KeyError"]
    assert closed == ["aconn"]
    assert dm.get_active_context() is None


def test_an_interrupt_from_context_exiting_propagates_once_the_context_closed(dm: DataManager) -> None:
    """A KeyboardInterrupt in context_exiting is not swallowed: it escapes after the close, as from a hook."""
    closed = closing_resources(dm)
    observer = FailsOnExiting(KeyboardInterrupt())
    dm.set_observer(observer)
    with pytest.raises(KeyboardInterrupt), dm.context() as ctx:
        assert ctx.conn == "conn"
    assert closed == ["conn"]
    assert observer.exited == [None]
    assert dm.get_active_context() is None

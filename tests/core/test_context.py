"""The context lifecycle, resources and context middleware, sync (docs/concepts/contexts.md, resources.md)."""

from __future__ import annotations

import contextvars
import functools
import gc
import logging
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from polydatum import DataAccessContext, DataManager, Meta, Service
from polydatum.context import current_context, get_active_context
from polydatum.errors import (
    ContextStateError,
    MiddlewareSetupException,
    NoActiveContextError,
    ResourceException,
    ResourceSetupException,
)


class Boom(Exception):
    """The exception tests raise on purpose."""


class Other(Exception):
    """A second exception, to tell replacement from propagation."""


def resource(events: list[str], name: str, fail: BaseException | None = None) -> Callable[..., Any]:
    """A resource that records its setup, the exception thrown into it, and its teardown."""

    def factory(ctx: DataAccessContext) -> Iterator[str]:
        events.append(f"open {name}")
        try:
            yield f"value of {name}"
        except BaseException as exc:
            events.append(f"{name} got {type(exc).__name__}")
            raise
        finally:
            events.append(f"close {name}")
            if fail is not None:
                raise fail

    return factory


def middleware(
    events: list[str],
    name: str,
    fail: BaseException | None = None,
    suppress: bool = False,
    replace: BaseException | None = None,
) -> Callable[..., Any]:
    """A context middleware that records what it sees; it may fail, suppress or replace."""

    def mw(ctx: DataAccessContext) -> Iterator[None]:
        events.append(f"setup {name}")
        try:
            yield
        except BaseException as exc:
            events.append(f"{name} got {type(exc).__name__}")
            if suppress:
                return
            if replace is not None:
                raise replace from exc
            raise
        finally:
            events.append(f"teardown {name}")
            if fail is not None:
                raise fail

    return mw


class Body:
    """A context body run inside pytest.raises: read resources, then raise; keeps the context."""

    def __init__(self, dm: DataManager) -> None:
        self.dm = dm
        self.ctx: DataAccessContext | None = None

    def __call__(self, *names: str, error: BaseException | type[BaseException] | None = None) -> None:
        with self.dm.context() as ctx:
            self.ctx = ctx
            for name in names:
                getattr(ctx, name)
            if error is not None:
                raise error

    def exit_errors(self) -> list[Any]:
        assert self.ctx is not None
        return self.ctx.get_resource_exit_errors()


@pytest.fixture(name="events")
def _events() -> list[str]:
    return []


class TestLifecycleOrder:
    def test_full_order_on_success(self, events: list[str]) -> None:
        """Push, middleware in order, body, middleware reversed, hooks, resources reversed, pop."""
        dm = DataManager()
        dm.register_context_middleware(middleware(events, "m1"), middleware(events, "m2"))
        dm.register_resources(a=resource(events, "a"), b=resource(events, "b"))

        def active() -> str:
            return "active" if dm.get_active_context() is not None else "inactive"

        with dm.context() as ctx:
            events.append(f"body {active()}")
            assert ctx.a == "value of a"
            assert ctx.b == "value of b"
            ctx.on_commit(lambda: events.append(f"commit hook {active()}"))
        events.append(f"after {active()}")
        assert events == [
            "setup m1",
            "setup m2",
            "body active",
            "open a",
            "open b",
            "teardown m2",
            "teardown m1",
            "commit hook active",
            "close b",
            "close a",
            "after inactive",
        ]

    def test_middleware_sees_context_on_the_stack(self, events: list[str]) -> None:
        """Middleware set-up and teardown run with the context already pushed / not yet popped."""
        dm = DataManager()

        def mw(ctx: DataAccessContext) -> Iterator[None]:
            events.append(f"setup {dm.get_active_context() is ctx}")
            yield
            events.append(f"teardown {dm.get_active_context() is ctx}")

        dm.register_context_middleware(mw)
        with dm.context():
            pass
        assert events == ["setup True", "teardown True"]

    def test_resources_torn_down_in_reverse_order_of_creation(self, events: list[str]) -> None:
        """Teardown order follows creation, not registration."""
        dm = DataManager()
        dm.register_resources(a=resource(events, "a"), b=resource(events, "b"), c=resource(events, "c"))
        with dm.context() as ctx:
            ctx.c
            ctx.a
            ctx.b
        assert [e for e in events if e.startswith("close")] == ["close b", "close a", "close c"]

    def test_resources_are_lazy(self, events: list[str]) -> None:
        """A resource is created on first access only, and not at all if never used."""
        dm = DataManager()
        dm.register_resources(a=resource(events, "a"), b=resource(events, "b"))
        with dm.context() as ctx:
            assert events == []
            first = ctx.a
            assert events == ["open a"]
            assert ctx.a is first
            assert events == ["open a"]
        assert events == ["open a", "close a"]

    def test_resource_attribute_deleted_by_the_body_still_closes(self, events: list[str]) -> None:
        """A body that deletes the cached attribute neither leaks the resource nor breaks the exit."""
        dm = DataManager()
        dm.register_resources(a=resource(events, "a"))
        with dm.context() as ctx:
            ctx.a
            del ctx.a
        assert events == ["open a", "close a"]
        assert ctx.get_resource_exit_errors() == []
        with dm.context() as again:
            assert "a" not in vars(again)
            again.a
        assert "a" not in vars(again), "the attribute caching the value is gone after the exit"
        assert events == ["open a", "close a", "open a", "close a"]

    def test_resource_per_context(self) -> None:
        """Each context creates its own resource value."""
        made: list[object] = []

        def fresh(ctx: DataAccessContext) -> Iterator[object]:
            value = object()
            made.append(value)
            yield value

        dm = DataManager()
        dm.register_resources(fresh=fresh)
        with dm.context() as one:
            first = one.fresh
        with dm.context() as two:
            second = two.fresh
        assert first is not second
        assert made == [first, second]

    def test_resource_receives_the_context(self) -> None:
        """A resource factory is called with the context it is created in."""
        got: list[Any] = []

        def needs_ctx(ctx: DataAccessContext) -> Iterator[str]:
            got.append(ctx)
            yield ctx.meta.user

        dm = DataManager()
        dm.register_resources(who=needs_ctx)
        with dm.context({"user": "ann"}) as ctx:
            assert ctx.who == "ann"
        assert got == [ctx]

    def test_middleware_may_use_resources(self, events: list[str]) -> None:
        """Middleware can create resources during set-up and use them in teardown (1.0 behaviour)."""
        store: dict[str, str] = {}

        def store_resource(ctx: DataAccessContext) -> Iterator[dict[str, str]]:
            yield store

        def mw(ctx: DataAccessContext) -> Iterator[None]:
            ctx.store["state"] = "setup"
            yield
            ctx.store["state"] = "torn down"

        dm = DataManager()
        dm.register_resources(store=store_resource)
        dm.register_context_middleware(mw)
        with dm.context() as ctx:
            assert ctx.store["state"] == "setup"
        assert store["state"] == "torn down"

    def test_meta_dal_data_manager(self) -> None:
        """ctx.meta, ctx.dal and ctx.data_manager are available on the context."""
        dm = DataManager()
        ctx = dm.context({"user": "ann"})
        assert ctx.data_manager is dm
        assert ctx.dal is dm.get_dal()
        assert isinstance(ctx.meta, Meta)
        with ctx:
            assert ctx.meta.user == "ann"
            assert ctx.dal is dm.get_dal()

    def test_enter_returns_the_context(self) -> None:
        """with dm.context() as ctx binds the context itself."""
        dm = DataManager()
        context = dm.context()
        with context as ctx:
            assert ctx is context
            assert isinstance(ctx, DataAccessContext)


class TestExceptionsAndMiddleware:
    def test_body_exception_thrown_into_each_middleware_in_reverse(self, events: list[str]) -> None:
        """The in-context exception reaches every middleware (innermost first) and then resources."""
        dm = DataManager()
        dm.register_context_middleware(middleware(events, "m1"), middleware(events, "m2"))
        dm.register_resources(a=resource(events, "a"))
        with pytest.raises(Boom):
            Body(dm)("a", error=Boom)
        assert events == [
            "setup m1",
            "setup m2",
            "open a",
            "m2 got Boom",
            "teardown m2",
            "m1 got Boom",
            "teardown m1",
            "a got Boom",
            "close a",
        ]

    def test_the_same_exception_object_propagates(self) -> None:
        """The exception raised out of the context is the one raised in it."""
        dm = DataManager()
        dm.register_context_middleware(middleware([], "m"))
        error = Boom("original")
        with pytest.raises(Boom) as info, dm.context():
            raise error
        assert info.value is error

    def test_middleware_cannot_suppress(self, events: list[str]) -> None:
        """A middleware that swallows the exception leaves it in flight: outer ones, resources and
        the caller still see it (as in 1.0)."""
        dm = DataManager()
        dm.register_context_middleware(
            middleware(events, "outer"), middleware(events, "inner", suppress=True)
        )
        dm.register_resources(a=resource(events, "a"))

        def body() -> None:
            with dm.context() as ctx:
                ctx.a
                raise Boom

        with pytest.raises(Boom):
            body()
        assert "inner got Boom" in events
        assert "outer got Boom" in events
        assert "a got Boom" in events
        assert dm.get_active_context() is None

    def test_middleware_may_replace(self, events: list[str]) -> None:
        """A middleware that raises another exception replaces it for outer middleware and the caller."""
        dm = DataManager()
        dm.register_context_middleware(
            middleware(events, "outer"), middleware(events, "inner", replace=Other("replaced"))
        )
        dm.register_resources(a=resource(events, "a"))
        with pytest.raises(Other, match="replaced") as info:
            Body(dm)("a", error=Boom)
        assert isinstance(info.value.__cause__, Boom)
        assert events[events.index("inner got Boom") + 2] == "outer got Other"
        assert "a got Other" in events

    def test_middleware_teardown_error_on_success_propagates(self, events: list[str]) -> None:
        """An error raised in teardown after a clean body is raised out, and outer middleware sees it."""
        dm = DataManager()
        dm.register_context_middleware(middleware(events, "outer"), middleware(events, "inner", fail=Boom()))
        with pytest.raises(Boom), dm.context():
            pass
        assert "outer got Boom" in events
        assert dm.get_active_context() is None

    def test_stop_iteration_from_body_passes_middleware_unchanged(self) -> None:
        """A StopIteration raised in the body (e.g. next() on an empty iterator) propagates as is."""
        dm = DataManager()
        dm.register_context_middleware(middleware([], "m"))
        error = StopIteration("empty")
        with pytest.raises(StopIteration) as info:
            Body(dm)(error=error)
        assert info.value is error

    def test_stop_iteration_from_body_is_not_a_resource_exit_error(self) -> None:
        """A resource letting the body's StopIteration through has not failed to close."""
        dm = DataManager()
        dm.register_resources(a=resource([], "a"))
        body = Body(dm)
        with pytest.raises(StopIteration):
            body("a", error=StopIteration("empty"))
        assert body.exit_errors() == []

    def test_stop_iteration_from_body_without_middleware(self) -> None:
        """With no middleware or resources, a StopIteration from the body propagates as is."""
        dm = DataManager()
        error = StopIteration("empty")
        with pytest.raises(StopIteration) as info:
            Body(dm)(error=error)
        assert info.value is error

    def test_middleware_receives_the_context(self) -> None:
        """Context middleware is called with the context it wraps."""
        got: list[Any] = []

        def mw(ctx: DataAccessContext) -> Iterator[None]:
            got.append(ctx)
            yield

        dm = DataManager()
        dm.register_context_middleware(mw)
        with dm.context() as ctx:
            pass
        assert got == [ctx]

    def test_middleware_shapes(self, events: list[str]) -> None:
        """A @contextmanager function and an object with a generator __call__ are middleware too."""

        @contextmanager
        def managed(ctx: DataAccessContext) -> Iterator[None]:
            events.append("managed in")
            yield
            events.append("managed out")

        class Callable_:
            def __call__(self, ctx: DataAccessContext) -> Iterator[None]:
                events.append("object in")
                yield
                events.append("object out")

        dm = DataManager()
        dm.register_context_middleware(managed, Callable_())
        with dm.context():
            events.append("body")
        assert events == ["managed in", "object in", "body", "object out", "managed out"]

    def test_middleware_that_does_not_yield(self, events: list[str]) -> None:
        """Not yielding on setup raises MiddlewareSetupException naming it; the body never runs."""

        def lazy(ctx: DataAccessContext) -> Iterator[None]:
            events.append("lazy setup")
            if False:  # pragma: no cover - a generator that never yields
                yield

        dm = DataManager()
        dm.register_context_middleware(middleware(events, "first"), lazy)
        with pytest.raises(MiddlewareSetupException, match="did not yield on setup") as info:
            Body(dm)(error=AssertionError("body ran"))
        assert "lazy" in str(info.value)
        assert "body" not in events
        # The middleware already set up is torn down with the error.
        assert events == [
            "setup first",
            "lazy setup",
            "first got MiddlewareSetupException",
            "teardown first",
        ]
        assert dm.get_active_context() is None

    def test_middleware_that_yields_twice(self, events: list[str]) -> None:
        """Yielding twice raises a RuntimeError at exit; other middleware and resources still close."""

        def chatty(ctx: DataAccessContext) -> Iterator[None]:
            yield
            yield

        dm = DataManager()
        dm.register_context_middleware(middleware(events, "outer"), chatty)
        dm.register_resources(a=resource(events, "a"))
        with pytest.raises(RuntimeError, match="yielded more than once"), dm.context() as ctx:
            ctx.a
        assert events[-4:] == ["outer got RuntimeError", "teardown outer", "a got RuntimeError", "close a"]
        assert dm.get_active_context() is None

    def test_middleware_that_yields_again_after_exception(self) -> None:
        """A middleware that swallows the thrown exception and yields again raises a RuntimeError."""

        def stubborn(ctx: DataAccessContext) -> Iterator[None]:
            try:
                yield
            except Boom:
                yield

        dm = DataManager()
        dm.register_context_middleware(stubborn)
        with pytest.raises(RuntimeError, match="yielded again"), dm.context():
            raise Boom

    def test_middleware_setup_exception_propagates(self, events: list[str]) -> None:
        """An exception in middleware setup propagates; the body never runs; earlier middleware closes."""

        def broken(ctx: DataAccessContext) -> Iterator[None]:
            raise Boom("setup failed")
            yield  # pragma: no cover

        dm = DataManager()
        dm.register_context_middleware(middleware(events, "first"), broken, middleware(events, "never"))
        with pytest.raises(Boom, match="setup failed"), dm.context():
            events.append("body")
        assert events == ["setup first", "first got Boom", "teardown first"]
        assert dm.get_active_context() is None

    def test_setup_error_escapes_even_if_earlier_middleware_swallows(self, events: list[str]) -> None:
        """A set-up failure always propagates: the body never ran, whatever teardown does with it."""
        ran: list[str] = []

        def broken(ctx: DataAccessContext) -> Iterator[None]:
            raise Boom("setup failed")
            yield  # pragma: no cover

        dm = DataManager()
        dm.register_context_middleware(middleware(events, "swallower", suppress=True), broken)

        def run() -> None:
            with dm.context():
                ran.append("body")  # pragma: no cover

        with pytest.raises(Boom, match="setup failed"):
            run()
        assert ran == []
        assert events == ["setup swallower", "swallower got Boom", "teardown swallower"]
        assert dm.get_active_context() is None

    def test_async_middleware_in_sync_context(self) -> None:
        """An async middleware refuses a sync context with a message pointing to "async with"."""

        async def amw(ctx: DataAccessContext) -> AsyncIterator[None]:
            yield

        dm = DataManager()
        dm.register_context_middleware(amw)
        with pytest.raises(MiddlewareSetupException, match="async with"), dm.context():
            pass  # pragma: no cover
        assert dm.get_active_context() is None


class TestResources:
    def test_resource_that_does_not_yield(self) -> None:
        """Not yielding raises ResourceSetupException from the access, naming the resource."""

        def lazy(ctx: DataAccessContext) -> Iterator[None]:
            if False:  # pragma: no cover
                yield

        dm = DataManager()
        dm.register_resources(lazy=lazy)
        with dm.context() as ctx:
            with pytest.raises(ResourceSetupException, match="'lazy' did not yield"):
                ctx.lazy
            assert "lazy" not in ctx

    def test_resource_setup_exception_propagates_from_access(self, events: list[str]) -> None:
        """An exception in setup propagates from ctx.name; the resource is not torn down."""

        def broken(ctx: DataAccessContext) -> Iterator[None]:
            events.append("broken setup")
            raise Boom("no connection")
            yield  # pragma: no cover

        dm = DataManager()
        dm.register_resources(broken=broken)
        with dm.context() as ctx:
            with pytest.raises(Boom, match="no connection"):
                ctx.broken
            assert "broken" not in ctx
        assert events == ["broken setup"]

    def test_resource_that_yields_twice_is_an_exit_error(self, events: list[str]) -> None:
        """Yielding twice is collected as a RuntimeError exit error, not raised."""

        def chatty(ctx: DataAccessContext) -> Iterator[int]:
            yield 1
            yield 2

        dm = DataManager()
        dm.register_resources(chatty=chatty, a=resource(events, "a"))
        with dm.context() as ctx:
            ctx.a
            ctx.chatty
        errors = ctx.get_resource_exit_errors()
        assert len(errors) == 1
        assert errors[0][0] is RuntimeError
        assert "yielded more than once" in str(errors[0][1])
        assert errors[0][2] is not None  # a real exc_info triple: never raised, it still has one
        assert events[-1] == "close a"

    def test_exit_errors_collected_logged_never_raised(
        self, events: list[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        """Teardown errors are exc_info triples in teardown order, logged, and every resource closes."""
        dm = DataManager()
        dm.register_resources(
            a=resource(events, "a", fail=Boom("a failed")),
            b=resource(events, "b"),
            c=resource(events, "c", fail=Other("c failed")),
        )
        with caplog.at_level(logging.WARNING, logger="polydatum"), dm.context() as ctx:
            ctx.a
            ctx.b
            ctx.c
        assert events[-3:] == ["close c", "close b", "close a"]
        errors = ctx.get_resource_exit_errors()
        assert [(t, str(e)) for t, e, _ in errors] == [(Other, "c failed"), (Boom, "a failed")]
        for exc_type, exc, tb in errors:
            assert isinstance(exc, exc_type)
            assert tb is exc.__traceback__ is not None
        failures = [r for r in caplog.records if r.name == "polydatum"]
        assert len(failures) == 2
        assert all(r.levelno == logging.WARNING for r in failures)
        assert "'c'" in failures[0].getMessage()
        assert failures[0].exc_info is not None
        assert failures[0].exc_info[1] is errors[0][1]

    def test_exit_errors_do_not_replace_body_exception(self) -> None:
        """With a body exception, the body's exception propagates, not the resource's."""
        dm = DataManager()
        dm.register_resources(a=resource([], "a", fail=Other("close failed")))
        body = Body(dm)
        with pytest.raises(Boom):
            body("a", error=Boom)
        assert [t for t, _, _ in body.exit_errors()] == [Other]

    def test_no_exit_errors(self) -> None:
        """A clean context has an empty list of exit errors."""
        dm = DataManager()
        dm.register_resources(a=resource([], "a"))
        with dm.context() as ctx:
            ctx.a
        assert ctx.get_resource_exit_errors() == []

    def test_resource_may_suppress_nothing(self, events: list[str]) -> None:
        """A resource swallowing the thrown exception does not stop it from propagating."""

        def swallow(ctx: DataAccessContext) -> Iterator[int]:
            try:
                yield 1
            except Boom:
                events.append("swallowed")

        dm = DataManager()
        dm.register_resources(s=swallow)
        with pytest.raises(Boom):
            Body(dm)("s", error=Boom)
        assert events == ["swallowed"]

    @staticmethod
    def dependent(events: list[str]) -> DataManager:
        def session(ctx: DataAccessContext) -> Iterator[str]:
            engine = ctx.engine  # created inside this setup, so before the session
            events.append("open session")
            yield f"session on {engine}"
            events.append("close session")

        dm = DataManager()
        dm.register_resources(
            engine=resource(events, "engine"), session=session, other=resource(events, "other")
        )
        return dm

    def test_dependency_of_first_resource_stays_open(self, events: list[str]) -> None:
        """A resource created from the first resource's setup stays open and closes after it."""
        dm = self.dependent(events)
        with dm.context() as ctx:
            assert ctx.session == "session on value of engine"
            assert "engine" in ctx
            assert events == ["open engine", "open session"]
        assert events == ["open engine", "open session", "close session", "close engine"]

    def test_dependent_resource_closes_before_its_dependency(self, events: list[str]) -> None:
        """A resource created from another's setup is recorded after it, so it closes first."""
        dm = self.dependent(events)
        with dm.context() as ctx:
            ctx.other
            assert ctx.session == "session on value of engine"
        assert events == [
            "open other",
            "open engine",
            "open session",
            "close session",
            "close engine",
            "close other",
        ]

    def test_contextmanager_resource(self, events: list[str]) -> None:
        """A @contextmanager factory gets the body's exception at its yield and closes."""

        @contextmanager
        def managed(ctx: DataAccessContext) -> Iterator[str]:
            try:
                yield "managed"
            except Boom:
                events.append("managed got Boom")
                raise
            finally:
                events.append("managed closed")

        dm = DataManager()
        dm.register_resources(managed=managed)
        with pytest.raises(Boom):
            Body(dm)("managed", error=Boom)
        assert events == ["managed got Boom", "managed closed"]

    def test_generator_functions_under_wraps_decorators(self, events: list[str]) -> None:
        """A resource and a middleware wrapped by a functools.wraps decorator (tracing) are accepted.

        (They used to be refused at registration with a message naming the very
        function as "not a generator function".)
        """

        def traced(func: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(func)
            def wrapper(ctx: DataAccessContext) -> Any:
                events.append(f"trace {func.__name__}")
                return func(ctx)

            return wrapper

        @traced
        def session(ctx: DataAccessContext) -> Iterator[str]:
            yield "session"
            events.append("close session")

        @traced
        def transaction(ctx: DataAccessContext) -> Iterator[None]:
            yield
            events.append("commit")

        dm = DataManager()
        dm.register_resources(session=session)
        dm.register_context_middleware(transaction)
        with dm.context() as ctx:
            assert ctx.session == "session"
        assert events == ["trace transaction", "trace session", "commit", "close session"]

    def test_a_wrapper_that_returns_no_generator_is_refused_when_used(self) -> None:
        """A decorator that swallows the generator: the first use says what came back instead."""

        def broken(func: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(func)
            def wrapper(ctx: DataAccessContext) -> Any:
                return list(func(ctx))

            return wrapper

        @broken
        def session(ctx: DataAccessContext) -> Iterator[str]:
            yield "session"

        dm = DataManager()
        dm.register_resources(session=session)
        with (
            dm.context() as ctx,
            pytest.raises(TypeError, match=r"wraps a generator function but returned \['session'\]"),
        ):
            ctx.session

    def test_contextmanager_resource_that_does_not_yield(self) -> None:
        """A @contextmanager factory that never yields raises ResourceSetupException too."""

        @contextmanager
        def lazy(ctx: DataAccessContext) -> Iterator[None]:
            if False:  # pragma: no cover
                yield

        dm = DataManager()
        dm.register_resources(lazy=lazy)
        with dm.context() as ctx, pytest.raises(ResourceSetupException, match="'lazy' did not yield"):
            ctx.lazy

    def test_bound_contextmanager_method_resource(self, events: list[str]) -> None:
        """A @contextmanager method of an object (db.session) registers as a resource bound to it."""

        class Database:
            def __init__(self, url: str) -> None:
                self.url = url

            @contextmanager
            def session(self, ctx: DataAccessContext) -> Iterator[str]:
                events.append("open")
                yield f"session to {self.url}"
                events.append("close")

        dm = DataManager()
        dm.register_resources(session=Database("sqlite://").session)
        with dm.context() as ctx:
            assert ctx.session == "session to sqlite://"
        assert events == ["open", "close"]

    def test_resources_created_by_middleware_closed_when_setup_fails(self, events: list[str]) -> None:
        """If a later middleware fails to set up, resources the earlier ones created are closed."""

        def uses_a(ctx: DataAccessContext) -> Iterator[None]:
            ctx.a
            yield

        def broken(ctx: DataAccessContext) -> Iterator[None]:
            raise Boom
            yield  # pragma: no cover

        dm = DataManager()
        dm.register_resources(a=resource(events, "a"))
        dm.register_context_middleware(uses_a, broken)
        with pytest.raises(Boom):
            Body(dm)()
        assert events == ["open a", "a got Boom", "close a"]

    def test_resource_created_in_middleware_teardown_is_closed(self, events: list[str]) -> None:
        """A resource first used while middleware is torn down is still closed."""

        def late_user(ctx: DataAccessContext) -> Iterator[None]:
            yield
            ctx.a

        dm = DataManager()
        dm.register_resources(a=resource(events, "a"))
        dm.register_context_middleware(late_user)
        with dm.context():
            pass
        assert events == ["open a", "close a"]

    def test_contains_only_after_creation(self) -> None:
        """`name in ctx` is True only once the resource was created."""
        dm = DataManager()
        dm.register_resources(a=resource([], "a"), b=resource([], "b"))
        with dm.context() as ctx:
            assert "a" not in ctx
            ctx.a
            assert "a" in ctx
            assert "b" not in ctx
            assert "missing" not in ctx
        assert "a" not in ctx

    def test_access_before_enter(self) -> None:
        """Resource access on a context not yet entered raises a RuntimeError saying how to enter it."""
        dm = DataManager()
        dm.register_resources(a=resource([], "a"))
        ctx = dm.context()
        with pytest.raises(RuntimeError, match="never entered") as info:
            ctx.a
        assert isinstance(info.value, ContextStateError)

    def test_access_after_exit(self) -> None:
        """Resource access after exit raises a RuntimeError, even for a resource created inside."""
        dm = DataManager()
        dm.register_resources(a=resource([], "a"), b=resource([], "b"))
        with dm.context() as ctx:
            ctx.a
        with pytest.raises(RuntimeError, match="already exited"):
            ctx.a
        with pytest.raises(RuntimeError, match="already exited"):
            ctx.b

    def test_unknown_resource(self) -> None:
        """An unknown name raises AttributeError naming it."""
        dm = DataManager()
        dm.register_resources(db=resource([], "db"))
        with dm.context() as ctx, pytest.raises(AttributeError, match="'cache'"):
            ctx.cache

    def test_misspelt_resource_gets_a_suggestion(self) -> None:
        """A typo is Python's own AttributeError, and Python suggests the registered name.

        Contexts define no ``__getattr__`` on purpose (it costs every
        attribute read on them, about 20% of an empty context); resources are
        class attributes, so Python's "Did you mean" finds them.
        """
        dm = DataManager()
        dm.register_resources(cache=resource([], "cache"))
        with dm.context() as ctx:
            with pytest.raises(AttributeError) as caught:
                ctx.cahce
            assert caught.value.name == "cahce"
            assert caught.value.obj is ctx
        program = (
            "from polydatum import DataManager\n"
            "def cache(ctx):\n    yield 1\n"
            "dm = DataManager()\ndm.register_resources(cache=cache)\n"
            "with dm.context() as ctx:\n    ctx.cahce\n"
        )
        run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=False)
        assert run.returncode == 1
        assert "has no attribute 'cahce'. Did you mean: 'cache'?" in run.stderr

    def test_resource_replaced_between_contexts(self) -> None:
        """replace_resource takes effect for the next context."""
        dm = DataManager()
        dm.register_resources(a=resource([], "a"))
        with dm.context() as ctx:
            assert ctx.a == "value of a"
        dm.replace_resource("a", resource([], "new"))
        with dm.context() as ctx:
            assert ctx.a == "value of new"

    def test_async_resource_in_sync_context(self) -> None:
        """An async generator resource read as ctx.name raises ResourceException pointing to aget."""

        async def conn(ctx: DataAccessContext) -> AsyncIterator[int]:
            yield 1

        dm = DataManager()
        dm.register_resources(conn=conn)
        with dm.context() as ctx, pytest.raises(ResourceException, match=r"await ctx\.aget\('conn'\)"):
            ctx.conn


class TestSingleUseAndNesting:
    def test_reenter_after_exit(self) -> None:
        """Entering an exited context raises ContextStateError (a RuntimeError) saying to open a new one."""
        dm = DataManager()
        ctx = dm.context()
        with ctx:
            pass
        with pytest.raises(RuntimeError, match="single-use") as info, ctx:
            pass  # pragma: no cover
        assert isinstance(info.value, ContextStateError)
        assert dm.get_active_context() is None

    def test_reenter_while_open(self) -> None:
        """Entering an open context again raises, and leaves it active."""
        dm = DataManager()
        dm.register_context_middleware(middleware([], "m"))
        with dm.context() as ctx:
            with pytest.raises(ContextStateError), ctx:
                pass  # pragma: no cover
            assert dm.get_active_context() is ctx
        assert dm.get_active_context() is None

    def test_reenter_plain_context(self) -> None:
        """Single use holds for a context with no middleware or resources too."""
        dm = DataManager()
        ctx = dm.context()
        with ctx:
            pass
        with pytest.raises(ContextStateError), ctx:
            pass  # pragma: no cover

    def test_dal_scope_is_single_use(self) -> None:
        """The object dm.dal() returns wraps one context, so it cannot be entered twice either."""
        dm = DataManager()
        scope = dm.dal()
        with scope:
            pass
        with pytest.raises(ContextStateError), scope:
            pass  # pragma: no cover

    def test_exit_without_enter(self) -> None:
        """Exiting a context that was never entered raises ContextStateError."""
        dm = DataManager()
        with pytest.raises(ContextStateError, match="not open"):
            dm.context().__exit__(None, None, None)

    def test_nested_contexts_have_their_own_resources(self, events: list[str]) -> None:
        """A nested context pushes a new one, creates its own resources and closes only them."""
        dm = DataManager()
        dm.register_resources(a=resource(events, "a"))
        with dm.context() as outer:
            outer.a
            with dm.context() as inner:
                assert dm.get_active_context() is inner
                assert "a" not in inner
                inner.a
                assert events == ["open a", "open a"]
            assert events == ["open a", "open a", "close a"]
            assert dm.get_active_context() is outer
            assert "a" in outer
            assert outer.a == "value of a"
        assert events == ["open a", "open a", "close a", "close a"]

    def test_inner_exception_does_not_close_outer(self) -> None:
        """An exception leaving the inner context leaves the outer one open and usable."""
        dm = DataManager()
        dm.register_resources(a=resource([], "a"))
        with dm.context() as outer:
            with pytest.raises(Boom), dm.context():
                raise Boom
            assert dm.get_active_context() is outer
            assert outer.a == "value of a"

    def test_nested_dal_blocks(self) -> None:
        """Nested dm.dal() blocks share the DAL object but each opens its own context."""
        dm = DataManager()
        with dm.dal() as outer_dal:
            outer = dm.get_active_context()
            with dm.dal() as inner_dal:
                inner = dm.get_active_context()
                assert inner_dal is outer_dal
            assert dm.get_active_context() is outer
        assert outer is not None
        assert inner is not None
        assert inner is not outer

    def test_nested_middleware_runs_per_context(self, events: list[str]) -> None:
        """Each nested context runs the middleware around itself."""
        dm = DataManager()
        dm.register_context_middleware(middleware(events, "m"))
        with dm.context(), dm.context():
            events.append("body")
        assert events == ["setup m", "setup m", "body", "teardown m", "teardown m"]

    def test_deep_nesting(self) -> None:
        """Contexts nest to any depth and unwind to none."""
        dm = DataManager()
        opened: list[DataAccessContext] = []

        def dive(depth: int) -> None:
            if depth == 0:
                return
            with dm.context() as ctx:
                opened.append(ctx)
                assert dm.get_active_context() is ctx
                dive(depth - 1)
                assert dm.get_active_context() is ctx

        dive(50)
        assert len(set(map(id, opened))) == 50
        assert dm.get_active_context() is None


class TestInterrupts:
    @pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
    def test_interrupt_in_body(self, events: list[str], interrupt: type[BaseException]) -> None:
        """KeyboardInterrupt/SystemExit in the body tears everything down in reverse, then propagates."""
        dm = DataManager()
        dm.register_context_middleware(middleware(events, "m1"), middleware(events, "m2"))
        dm.register_resources(a=resource(events, "a"), b=resource(events, "b"))
        with pytest.raises(interrupt):
            Body(dm)("a", "b", error=interrupt)
        name = interrupt.__name__
        assert events[4:] == [
            f"m2 got {name}",
            "teardown m2",
            f"m1 got {name}",
            "teardown m1",
            f"b got {name}",
            "close b",
            f"a got {name}",
            "close a",
        ]
        assert dm.get_active_context() is None

    @pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
    def test_interrupt_in_middleware_teardown(
        self, events: list[str], interrupt: type[BaseException]
    ) -> None:
        """An interrupt in one middleware's teardown reaches the outer ones; every resource closes."""
        dm = DataManager()
        dm.register_context_middleware(
            middleware(events, "m1"), middleware(events, "m2", fail=interrupt()), middleware(events, "m3")
        )
        dm.register_resources(a=resource(events, "a"), b=resource(events, "b"))
        with pytest.raises(interrupt):
            Body(dm)("a", "b")
        name = interrupt.__name__
        assert events[5:] == [
            "teardown m3",
            "teardown m2",
            f"m1 got {name}",
            "teardown m1",
            f"b got {name}",
            "close b",
            f"a got {name}",
            "close a",
        ]
        assert dm.get_active_context() is None

    @pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
    def test_interrupt_in_resource_teardown(self, events: list[str], interrupt: type[BaseException]) -> None:
        """An interrupt in one resource's teardown: the others still close, then it propagates."""
        dm = DataManager()
        dm.register_resources(
            a=resource(events, "a"), b=resource(events, "b", fail=interrupt()), c=resource(events, "c")
        )
        with pytest.raises(interrupt):
            Body(dm)("a", "b", "c")
        assert events[3:] == ["close c", "close b", "close a"]
        assert dm.get_active_context() is None

    def test_interrupt_in_resource_teardown_after_body_error(self, events: list[str]) -> None:
        """A Ctrl-C during teardown is not lost because the body failed: it propagates after all closed."""
        dm = DataManager()
        dm.register_resources(a=resource(events, "a"), b=resource(events, "b", fail=KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            Body(dm)("a", "b", error=Boom)
        assert events[-1] == "close a"

    def test_interrupt_in_middleware_setup(self, events: list[str]) -> None:
        """An interrupt during middleware setup tears down what was set up, then propagates."""

        def interrupted(ctx: DataAccessContext) -> Iterator[None]:
            raise KeyboardInterrupt
            yield  # pragma: no cover

        dm = DataManager()
        dm.register_context_middleware(middleware(events, "m1"), interrupted)
        with pytest.raises(KeyboardInterrupt), dm.context():
            events.append("body")  # pragma: no cover
        assert events == ["setup m1", "m1 got KeyboardInterrupt", "teardown m1"]
        assert dm.get_active_context() is None


class TestUserAttributes:
    def test_users_may_set_and_delete_attributes_on_contexts(self) -> None:
        """A context is an ordinary object: user attributes can be set, read and deleted."""
        dm = DataManager()
        with dm.context() as ctx:
            ctx.request_started = 123
            assert ctx.request_started == 123
            del ctx.request_started
            assert not hasattr(ctx, "request_started")

    def test_user_attribute_does_not_leak_into_other_contexts(self) -> None:
        """An attribute set on one context is not seen on the next."""
        dm = DataManager()
        with dm.context() as ctx:
            ctx.flag = True
        with dm.context() as ctx2:
            assert not hasattr(ctx2, "flag")

    def test_context_subclass(self) -> None:
        """A DataAccessContext subclass works: instances get its methods and the manager's resources."""

        class AuditedContext(DataAccessContext):
            def who(self) -> str:
                return str(self.meta.user)

        dm = DataManager()
        dm.register_resources(a=resource([], "a"))
        with AuditedContext(dm, meta={"user": "ann"}) as ctx:
            assert isinstance(ctx, AuditedContext)
            assert ctx.who() == "ann"
            assert ctx.a == "value of a"
            assert dm.get_active_context() is ctx

    def test_repr_shows_state(self) -> None:
        """repr() tells created, open and exited apart."""
        dm = DataManager()
        ctx = dm.context()
        assert "created" in repr(ctx)
        with ctx:
            assert "open" in repr(ctx)
        assert "exited" in repr(ctx)


def _open_and_forget(dm: DataManager) -> None:
    """Enter a context in a throwaway contextvars.Context and drop every reference to it."""
    contextvars.copy_context().run(lambda: dm.context().__enter__())


def _open_and_forget_and_collect() -> None:
    """Make a manager (so it sees the current warning filters), leak an open context, collect."""
    _open_and_forget(DataManager())
    gc.collect()


class TestGarbageCollectedOpen:
    def test_open_context_collected_warns(self) -> None:
        """A context garbage-collected while open emits a ResourceWarning saying to use `with`."""
        with pytest.warns(ResourceWarning, match="garbage-collected while still open"):
            _open_and_forget_and_collect()

    def test_exited_context_collected_is_silent(self) -> None:
        """A properly exited context emits nothing when collected."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dm = DataManager()
            with dm.context():
                pass
            gc.collect()
        assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []

    def test_no_finaliser_when_resource_warnings_ignored(self) -> None:
        """A manager made while ResourceWarning is ignored adds no finaliser cost (and no warning)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("ignore", ResourceWarning)
            dm = DataManager()
            warnings.simplefilter("always")
            _open_and_forget(dm)
            gc.collect()
        assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


class TestDeprecated1Api:
    def test_get_active_context_warns_and_works(self) -> None:
        """polydatum.context.get_active_context() warns DeprecationWarning and returns the context."""
        dm = DataManager()
        with pytest.warns(DeprecationWarning, match=r"dm\.get_active_context\(\)"):
            assert get_active_context() is None
        with dm.context() as ctx, pytest.warns(DeprecationWarning, match="get_active_context"):
            assert get_active_context() is ctx

    def test_current_context_proxy_warns_and_forwards(self) -> None:
        """current_context forwards attribute access to the active context, with a DeprecationWarning."""
        dm = DataManager()
        dm.register_resources(a=resource([], "a"))
        with dm.context({"user": "ann"}) as ctx:
            assert bool(current_context)
            assert current_context == ctx
            with pytest.warns(DeprecationWarning, match="current_context is deprecated"):
                assert current_context.meta.user == "ann"
            with pytest.warns(DeprecationWarning, match="current_context"):
                assert current_context.a == "value of a"
            with pytest.warns(DeprecationWarning, match="current_context"):
                assert "a" in current_context
        assert not bool(current_context)

    def test_current_context_outside_a_context(self) -> None:
        """Using current_context with no open context raises NoActiveContextError."""
        with (
            pytest.warns(DeprecationWarning, match="current_context"),
            pytest.raises(NoActiveContextError, match="current_context"),
        ):
            current_context.meta

    def test_current_context_used_from_a_service(self) -> None:
        """1.0 services that read current_context keep working (with a warning)."""

        class Who(Service):
            def me(self) -> Any:
                return current_context.meta.user

        dm = DataManager()
        dm.register_services(who=Who())
        with dm.dal({"user": "ann"}) as dal, pytest.warns(DeprecationWarning, match="current_context"):
            assert dal.who.me() == "ann"

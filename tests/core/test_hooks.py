"""on_commit / on_rollback hooks in sync contexts (docs/hooks.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from polydatum import DataAccessContext, DataManager, Service
from polydatum.errors import ContextStateError


class Boom(Exception):
    """Raised on purpose."""


class FakeDatabase:
    """A transaction log standing in for a database: what was committed, what rolled back."""

    def __init__(self) -> None:
        self.committed: list[str] = []
        self.pending: list[str] = []
        self.events: list[str] = []

    def transaction(self, ctx: DataAccessContext) -> Iterator[None]:
        """Context middleware: commit on success, roll back on error."""
        self.pending = []
        try:
            yield
        except BaseException:
            self.pending = []
            self.events.append("rollback")
            raise
        self.committed.extend(self.pending)
        self.pending = []
        self.events.append("commit")


def make(events: list[str] | None = None) -> tuple[DataManager, FakeDatabase]:
    db = FakeDatabase()
    if events is not None:
        db.events = events
    dm = DataManager()
    dm.register_context_middleware(db.transaction)
    return dm, db


def recorder(events: list[str], label: str) -> Callable[..., None]:
    def hook(*args: Any, **kwargs: Any) -> None:
        events.append(f"{label} {args} {kwargs}" if args or kwargs else label)

    return hook


def failing(error: BaseException) -> Callable[[], None]:
    def hook() -> None:
        raise error

    return hook


def body(dm: DataManager, register: Callable[[DataAccessContext], None], error: Exception | None) -> None:
    """Open a context, register hooks, then raise ``error`` inside it (if given)."""
    with dm.context() as ctx:
        register(ctx)
        if error is not None:
            raise error


class TestWhenHooksRun:
    def test_on_commit_runs_after_clean_exit_after_commit(self) -> None:
        """on_commit hooks run once the context ended cleanly, after the transaction committed."""
        events: list[str] = []
        dm, _ = make(events)
        with dm.context() as ctx:
            ctx.on_commit(recorder(events, "commit hook"))
            ctx.on_rollback(recorder(events, "rollback hook"))
            events.append("body")
        assert events == ["body", "commit", "commit hook"]

    def test_on_rollback_runs_after_error_after_rollback(self) -> None:
        """on_rollback hooks run once the context ended with an exception, after rollback."""
        events: list[str] = []
        dm, _ = make(events)

        def register(ctx: DataAccessContext) -> None:
            ctx.on_commit(recorder(events, "commit hook"))
            ctx.on_rollback(recorder(events, "rollback hook"))

        with pytest.raises(Boom):
            body(dm, register, Boom())
        assert events == ["rollback", "rollback hook"]

    def test_hooks_get_their_arguments(self) -> None:
        """on_commit(fn, *args, **kwargs) calls fn(*args, **kwargs)."""
        events: list[str] = []
        dm = DataManager()
        with dm.context() as ctx:
            ctx.on_commit(recorder(events, "sent"), "welcome", 42, to="ann")
        assert events == ["sent ('welcome', 42) {'to': 'ann'}"]

    def test_hooks_run_in_registration_order(self) -> None:
        """Several hooks run in the order they were registered."""
        events: list[str] = []
        dm = DataManager()
        with dm.context() as ctx:
            for i in range(5):
                ctx.on_commit(recorder(events, f"hook {i}"))
        assert events == [f"hook {i}" for i in range(5)]

    def test_hooks_run_before_resources_close(self) -> None:
        """Hooks run while resources are still open, and may use them (and create new ones)."""
        events: list[str] = []

        def res(ctx: DataAccessContext) -> Iterator[str]:
            events.append("open")
            yield "value"
            events.append("close")

        dm = DataManager()
        dm.register_resources(res=res, late=res)
        with dm.context() as ctx:
            ctx.res
            ctx.on_commit(lambda: events.append(f"hook sees {ctx.res}"))
            ctx.on_commit(lambda: events.append(f"hook creates {ctx.late}"))
        assert events == ["open", "hook sees value", "open", "hook creates value", "close", "close"]

    def test_hook_sees_context_still_active(self) -> None:
        """During hooks the context is still the active one (services can be called)."""

        class Mailer(Service):
            def __init__(self) -> None:
                super().__init__()
                self.sent: list[Any] = []

            def send(self, to: str) -> None:
                self.sent.append((to, self._ctx.meta.user))

        mailer = Mailer()
        dm = DataManager()
        dm.register_services(mailer=mailer)
        with dm.dal({"user": "ann"}) as dal:
            ctx = dm.require_active_context()
            ctx.on_commit(lambda: dal.mailer.send("bob"))
        assert mailer.sent == [("bob", "ann")]

    def test_registered_from_a_service(self) -> None:
        """A service registers hooks on self._ctx; they run when the caller's context commits."""
        events: list[str] = []

        class Users(Service):
            def create(self, name: str) -> None:
                self._ctx.on_commit(events.append, f"welcome {name}")

        dm, _ = make(events)
        dm.register_services(users=Users())
        with dm.dal() as dal:
            dal.users.create("ann")
            assert events == []
        assert events == ["commit", "welcome ann"]

    def test_hook_may_register_another_hook(self) -> None:
        """A hook registering another hook of the same kind gets it run too."""
        events: list[str] = []
        dm = DataManager()
        with dm.context() as ctx:

            def first() -> None:
                events.append("first")
                ctx.on_commit(events.append, "second")

            ctx.on_commit(first)
        assert events == ["first", "second"]

    def test_no_hooks_run_for_other_outcome(self) -> None:
        """Rollback hooks do not run on commit, and the reverse."""
        events: list[str] = []
        dm = DataManager()
        with dm.context() as ctx:
            ctx.on_rollback(recorder(events, "rollback"))
        with pytest.raises(Boom):
            body(dm, lambda c: c.on_commit(recorder(events, "commit")), Boom())
        assert events == []

    def test_middleware_replacing_exception_still_rolls_back(self) -> None:
        """If a middleware replaces the body's exception, rollback hooks still run."""
        events: list[str] = []

        def translate(ctx: DataAccessContext) -> Iterator[None]:
            try:
                yield
            except Boom as exc:
                raise KeyError("translated") from exc

        dm = DataManager()
        dm.register_context_middleware(translate)
        with pytest.raises(KeyError):
            body(dm, lambda c: c.on_rollback(events.append, "rolled back"), Boom())
        assert events == ["rolled back"]

    def test_middleware_swallowing_the_exception_still_means_rollback(self) -> None:
        """A middleware that swallows the exception cannot suppress it: on_rollback runs, not on_commit."""
        events: list[str] = []

        def swallow(ctx: DataAccessContext) -> Iterator[None]:
            try:
                yield
            except Boom:
                events.append("swallowed")

        dm = DataManager()
        dm.register_context_middleware(swallow)

        def register(ctx: DataAccessContext) -> None:
            ctx.on_commit(events.append, "commit")
            ctx.on_rollback(events.append, "rb")

        with pytest.raises(Boom):
            body(dm, register, Boom())
        assert events == ["swallowed", "rb"]

    def test_failed_commit_runs_rollback_hooks(self) -> None:
        """If committing raises in middleware teardown, the context failed: on_rollback runs."""
        events: list[str] = []

        def failing_commit(ctx: DataAccessContext) -> Iterator[None]:
            yield
            raise Boom("commit failed")

        dm = DataManager()
        dm.register_context_middleware(failing_commit)

        def register(ctx: DataAccessContext) -> None:
            ctx.on_commit(events.append, "commit")
            ctx.on_rollback(events.append, "rb")

        with pytest.raises(Boom, match="commit failed"):
            body(dm, register, None)
        assert events == ["rb"]

    def test_middleware_may_register_hooks_in_teardown(self) -> None:
        """A middleware may register on_commit while it is torn down (after committing); it runs."""
        events: list[str] = []

        def tx(ctx: DataAccessContext) -> Iterator[None]:
            yield
            events.append("committed")
            ctx.on_commit(events.append, "registered by middleware")

        dm = DataManager()
        dm.register_context_middleware(tx)
        with dm.context():
            pass
        assert events == ["committed", "registered by middleware"]

    def test_failed_setup_runs_rollback_hooks(self) -> None:
        """Hooks registered by a middleware before a later one failed to set up roll back."""
        events: list[str] = []

        def registers(ctx: DataAccessContext) -> Iterator[None]:
            ctx.on_commit(events.append, "commit")
            ctx.on_rollback(events.append, "rollback")
            yield

        def swallowing(ctx: DataAccessContext) -> Iterator[None]:
            try:
                yield
            except Boom:
                events.append("swallowed")

        def broken(ctx: DataAccessContext) -> Iterator[None]:
            raise Boom
            yield  # pragma: no cover

        dm = DataManager()
        dm.register_context_middleware(registers, swallowing, broken)
        with pytest.raises(Boom):
            body(dm, lambda ctx: None, None)
        assert events == ["swallowed", "rollback"]

    def test_nested_context_hooks_are_its_own(self) -> None:
        """Hooks registered in an inner context run when the inner one ends, not the outer."""
        events: list[str] = []
        dm = DataManager()
        with dm.context() as outer:
            outer.on_commit(events.append, "outer")
            with dm.context() as inner:
                inner.on_commit(events.append, "inner")
            assert events == ["inner"]
        assert events == ["inner", "outer"]


class TestHookErrors:
    def test_every_hook_runs_when_one_fails(self, caplog: pytest.LogCaptureFixture) -> None:
        """A failing hook is logged and collected; the later hooks still run; nothing is raised."""
        events: list[str] = []
        dm = DataManager()
        error = Boom("mail server down")
        with caplog.at_level(logging.WARNING, logger="polydatum"), dm.context() as ctx:
            ctx.on_commit(events.append, "first")
            ctx.on_commit(failing(error))
            ctx.on_commit(events.append, "third")
        assert events == ["first", "third"]
        errors = ctx.get_hook_errors()
        assert len(errors) == 1
        exc_type, exc, tb = errors[0]
        assert exc_type is Boom
        assert exc is error
        assert tb is not None
        records = [r for r in caplog.records if r.name == "polydatum"]
        assert len(records) == 1
        assert records[0].levelno == logging.WARNING
        assert "mail server down" in records[0].getMessage()
        assert records[0].exc_info is not None

    def test_rollback_hook_errors_collected_body_error_propagates(self) -> None:
        """A failing rollback hook does not replace the body's exception."""
        dm = DataManager()
        holder: list[DataAccessContext] = []

        def register(ctx: DataAccessContext) -> None:
            holder.append(ctx)
            ctx.on_rollback(failing(KeyError("hook")))

        with pytest.raises(Boom):
            body(dm, register, Boom())
        assert [t for t, _, _ in holder[0].get_hook_errors()] == [KeyError]

    def test_hook_errors_never_undo_a_commit(self) -> None:
        """The transaction stays committed when an on_commit hook fails."""
        events: list[str] = []
        dm, db = make(events)
        with dm.context() as ctx:
            db.pending.append("row 1")
            ctx.on_commit(failing(Boom()))
        assert db.committed == ["row 1"]
        assert events == ["commit"]
        assert "rollback" not in events

    def test_hook_errors_beside_resource_exit_errors(self) -> None:
        """Hook errors and resource exit errors are collected separately."""

        def res(ctx: DataAccessContext) -> Iterator[int]:
            yield 1
            raise KeyError("close failed")

        dm = DataManager()
        dm.register_resources(res=res)
        with dm.context() as ctx:
            ctx.res
            ctx.on_commit(failing(Boom("hook failed")))
        assert [t for t, _, _ in ctx.get_hook_errors()] == [Boom]
        assert [t for t, _, _ in ctx.get_resource_exit_errors()] == [KeyError]

    def test_no_hook_errors(self) -> None:
        """A context without failing hooks has an empty list."""
        dm = DataManager()
        with dm.context() as ctx:
            ctx.on_commit(lambda: None)
        assert ctx.get_hook_errors() == []

    def test_interrupt_in_hook_runs_the_rest_then_propagates(self) -> None:
        """A KeyboardInterrupt in a hook: later hooks run and resources close, then it propagates."""
        events: list[str] = []

        def res(ctx: DataAccessContext) -> Iterator[int]:
            yield 1
            events.append("closed")

        dm = DataManager()
        dm.register_resources(res=res)

        def register(ctx: DataAccessContext) -> None:
            ctx.res
            ctx.on_commit(failing(KeyboardInterrupt()))
            ctx.on_commit(events.append, "second hook")

        with pytest.raises(KeyboardInterrupt):
            body(dm, register, None)
        assert events == ["second hook", "closed"]
        assert dm.get_active_context() is None

    def test_async_hook_in_sync_context(self) -> None:
        """A coroutine function as a hook in a sync context is refused at registration (never unawaited)."""

        async def notify() -> None:  # pragma: no cover - never called
            pass

        dm = DataManager()
        with dm.context() as ctx, pytest.raises(TypeError, match="async with"):
            ctx.on_rollback(notify)
        assert ctx.get_hook_errors() == []


class TestRegistrationErrors:
    @pytest.mark.parametrize("method", ["on_commit", "on_rollback"])
    def test_non_callable_refused(self, method: str) -> None:
        """A non-callable hook raises TypeError at registration, naming it."""
        dm = DataManager()
        with dm.context() as ctx, pytest.raises(TypeError, match=r"hook must be callable, got 42 \(int\)"):
            getattr(ctx, method)(42)

    @pytest.mark.parametrize("method", ["on_commit", "on_rollback"])
    def test_after_exit_refused(self, method: str) -> None:
        """Registering on an exited context raises ContextStateError (the hook would never run)."""
        dm = DataManager()
        with dm.context() as ctx:
            pass
        with pytest.raises(ContextStateError, match="already ended"):
            getattr(ctx, method)(lambda: None)

"""1.0 code that ran differently on 2.0 until the core's second pass, run as 1.0 users wrote it.

Each class is one of the ten differences found by running 1.0-era code
(the 1.0 README's examples, the polydatum_sqlalchemy side package, the
0.8/0.9 test suites' small applications); docs/migrating-from-1.0.md names
each one.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import polydatum.context
from polydatum import DataManager, Service
from polydatum.context import DataAccessContext, Meta
from polydatum.errors import ContextStateError
from polydatum.resources import ResourceManager


class Boom(Exception):
    pass


class Items(Service):
    def get(self, item_id: int) -> tuple[int, Any]:
        return item_id, self._ctx.meta.user

    def fail(self) -> None:
        raise Boom("in the body")


class FakeTransaction:
    """What the 1.0 README's ``context.db_resource.new_transaction()`` returns."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def start(self) -> None:
        self.log.append("start")

    def abort(self) -> None:
        self.log.append("abort")

    def commit(self) -> None:
        self.log.append("commit")


class TestMiddlewareCannotSuppress:
    """1: the 1.0 README's transaction_middleware swallows the error, and the error still leaves."""

    def _dm(self, log: list[str]) -> DataManager:
        class DbResource:
            def new_transaction(self) -> FakeTransaction:
                return FakeTransaction(log)

        def db_resource(context: Any) -> Iterator[DbResource]:
            yield DbResource()

        # The 1.0 README's middleware, verbatim.
        def transaction_middleware(context):  # type: ignore[no-untyped-def]
            trans = context.db_resource.new_transaction()
            trans.start()
            try:
                yield trans
            except:  # noqa: E722
                trans.abort()
            else:
                trans.commit()

        dm = DataManager()
        dm.register_resources(db_resource=db_resource)
        dm.register_context_middleware(transaction_middleware)
        dm.register_services(items=Items())
        return dm

    def test_the_body_error_leaves_the_with_block(self) -> None:
        """The body's exception escapes although the middleware caught it and aborted."""
        log: list[str] = []
        dm = self._dm(log)
        with pytest.raises(Boom, match="in the body"), dm.dal() as dal:
            dal.items.fail()
        assert log == ["start", "abort"]

    def test_the_outcome_is_rollback(self) -> None:
        """on_rollback hooks run and on_commit hooks (a task send, say) do not."""
        log: list[str] = []
        dm = self._dm(log)

        def body() -> None:
            with dm.context() as ctx:
                ctx.on_commit(log.append, "send task")
                ctx.on_rollback(log.append, "discard task")
                raise Boom

        with pytest.raises(Boom):
            body()
        assert log == ["start", "abort", "discard task"]

    def test_success_still_commits(self) -> None:
        """Without an error the same middleware commits and on_commit hooks run."""
        log: list[str] = []
        dm = self._dm(log)
        with dm.context() as ctx:
            ctx.on_commit(log.append, "send task")
        assert log == ["start", "commit", "send task"]

    def test_a_replacement_raised_by_middleware_wins(self) -> None:
        """A middleware may still replace the exception by raising another one."""
        dm = DataManager()

        def translate(context: Any) -> Iterator[None]:
            try:
                yield
            except Boom as exc:
                raise LookupError("translated") from exc

        dm.register_context_middleware(translate)
        with pytest.raises(LookupError, match="translated"), dm.context():
            raise Boom


class TestFinalHookCallsTheDal:
    """2: a ``_final_hook`` override may call the DAL, as in 1.0."""

    def test_final_hook_reaches_a_service(self) -> None:
        """The final hook runs while the context is still active, so DAL calls work."""
        seen: list[Any] = []

        class AuditedContext(DataAccessContext):
            def _final_hook(self, exception: BaseException | None) -> None:
                seen.append((self.dal.items.get(7), exception))

        class Manager(DataManager):
            def context(self, meta: Any = None) -> DataAccessContext:
                return AuditedContext(self, meta=meta)

        dm = Manager()
        dm.register_services(items=Items())
        with dm.context(meta={"user": "ann"}):
            pass
        assert seen == [((7, "ann"), None)]


class TestResourceTeardownCallsTheDal:
    """3: a resource teardown may call the DAL (an audit buffer flushed through a service)."""

    def test_teardown_flushes_through_a_service(self) -> None:
        """The flush reaches the service and nothing is collected as an exit error."""
        flushed: list[Any] = []

        class Audit(Service):
            def flush(self, entries: list[str]) -> None:
                flushed.append((entries, self._ctx.meta.user))

        dm = DataManager()
        dm.register_services(audit=Audit())

        def audit_buffer(context: Any) -> Iterator[list[str]]:
            entries: list[str] = []
            yield entries
            context.dal.audit.flush(entries)

        dm.register_resources(audit_buffer=audit_buffer)
        with dm.context(meta={"user": "bob"}) as ctx:
            ctx.audit_buffer.append("read 1")
        assert flushed == [(["read 1"], "bob")]
        assert ctx.get_resource_exit_errors() == []


class TestGetResourceOverride:
    """4: a DataManager subclass overriding ``get_resource`` is asked for every resource."""

    def test_contexts_use_the_override(self) -> None:
        """``ctx.<name>`` creates what ``get_resource(name)`` returns, registered or not."""
        asked: list[str] = []

        class Computed(DataManager):
            def get_resource(self, name: str) -> Any:
                asked.append(name)
                if name.startswith("shard_"):
                    number = name.removeprefix("shard_")

                    def shard(context: Any) -> Iterator[str]:
                        yield f"connection to shard {number}"

                    return shard
                return super().get_resource(name)

        dm = Computed()
        with dm.context() as ctx:
            assert ctx.shard_3 == "connection to shard 3"
            assert ctx.shard_3 == "connection to shard 3"  # created once
            with pytest.raises(AttributeError, match="no resource named 'nope'"):
                _ = ctx.nope
        assert asked == ["shard_3", "nope"]

    def test_a_registered_resource_still_goes_through_the_override(self) -> None:
        """The override decides even for names registered the usual way."""

        class Swapping(DataManager):
            def get_resource(self, name: str) -> Any:
                if name == "db":

                    def replacement(context: Any) -> Iterator[str]:
                        yield "replacement"

                    return replacement
                return super().get_resource(name)

        def db(context: Any) -> Iterator[str]:
            yield "original"

        dm = Swapping()
        dm.register_resources(db=db)
        with dm.context() as ctx:
            assert ctx.db == "replacement"


class TestCustomResourceManager:
    """5: a custom ResourceManager is consulted through ``__contains__`` and ``__getitem__``."""

    def test_lookups_go_through_the_manager(self) -> None:
        """Resources the manager answers for are created, and its lookups are called."""
        calls: list[str] = []

        class Prefixed(ResourceManager):
            def __contains__(self, name: object) -> bool:
                calls.append(f"contains {name}")
                return isinstance(name, str) and name.startswith("cfg_")

            def __getitem__(self, name: str) -> Any:
                calls.append(f"getitem {name}")

                def value(context: Any) -> Iterator[str]:
                    yield name.removeprefix("cfg_").upper()

                return value

        dm = DataManager(resource_manager=Prefixed(None))
        with dm.context() as ctx:
            assert ctx.cfg_region == "REGION"
        assert calls == ["contains cfg_region", "getitem cfg_region"]


class TestCtxStackPushPop:
    """6: ``dm.ctx_stack`` is a stack again: 1.0 code pushes a context in a worker thread."""

    def test_a_worker_thread_pushes_and_pops_the_request_context(self) -> None:
        """After ``push`` the worker's DAL calls run in the pushed context; ``pop`` ends that."""
        dm = DataManager()
        dm.register_services(items=Items())
        results: list[Any] = []

        with dm.context(meta={"user": "ann"}) as ctx:

            def worker() -> None:
                results.append(dm.ctx_stack.top)
                dm.ctx_stack.push(ctx)
                try:
                    results.append(dm.get_dal().items.get(1))
                    results.append(dm.ctx_stack.top is ctx)
                finally:
                    results.append(dm.ctx_stack.pop() is ctx)
                results.append(dm.ctx_stack.top)

            thread = threading.Thread(target=worker)
            thread.start()
            thread.join()
        assert results == [None, (1, "ann"), True, True, None]

    def test_pushing_a_context_that_was_never_entered_is_refused(self) -> None:
        """Only an entered, still open context of this manager can be pushed."""
        dm = DataManager()
        with pytest.raises(ContextStateError, match="cannot push"):
            dm.ctx_stack.push(dm.context())

    def test_pop_with_nothing_pushed_returns_none(self) -> None:
        """Like werkzeug's LocalStack, popping an empty stack gives None."""
        assert DataManager().ctx_stack.pop() is None

    def test_popping_a_context_entered_with_with_raises(self) -> None:
        """Nothing pushed, a ``with`` context on top: pop() says why it cannot (it used to do nothing)."""
        dm = DataManager()
        with dm.context() as ctx:
            with pytest.raises(ContextStateError, match=r'entered with "with".*not pushed'):
                dm.ctx_stack.pop()
            assert dm.get_active_context() is ctx

    def test_pop_does_not_remove_a_context_entered_with_with(self) -> None:
        """A context entered with ``with`` above a pushed one must end its block first."""
        dm = DataManager()
        with dm.context() as outer:
            done = threading.Event()
            errors: list[BaseException] = []

            def worker() -> None:
                dm.ctx_stack.push(outer)
                with dm.context():
                    try:
                        dm.ctx_stack.pop()
                    except ContextStateError as exc:
                        errors.append(exc)
                dm.ctx_stack.pop()
                done.set()

            thread = threading.Thread(target=worker)
            thread.start()
            thread.join()
        assert done.is_set()
        assert len(errors) == 1
        assert "leaves the stack when its block ends" in str(errors[0])


class TestDecorators:
    """7: ``@dm.dal()`` and ``@dm.context()`` decorate functions, as 1.0's contextmanagers did."""

    def test_dal_decorator_runs_each_call_in_a_new_context(self) -> None:
        """Each call of the decorated function has its own context with the given meta."""
        dm = DataManager()
        dm.register_services(items=Items())
        seen: list[Any] = []

        @dm.dal(meta={"user": "job"})
        def job(item_id: int) -> Any:
            ctx = dm.require_active_context()
            seen.append(ctx)
            return dm.get_dal().items.get(item_id)

        assert job(1) == (1, "job")
        assert job(2) == (2, "job")
        assert seen[0] is not seen[1]
        assert dm.get_active_context() is None

    def test_context_decorator_and_errors(self) -> None:
        """``@dm.context()`` lets the function's error out and rolls back."""
        dm = DataManager()
        log: list[str] = []

        @dm.context()
        def failing() -> None:
            dm.require_active_context().on_rollback(log.append, "rolled back")
            raise Boom

        with pytest.raises(Boom):
            failing()
        assert log == ["rolled back"]

    def test_async_functions_get_async_contexts(self) -> None:
        """Decorating a coroutine function opens an ``async with`` context per call."""
        dm = DataManager()

        @dm.dal(meta={"user": "async"})
        async def handler() -> Any:
            await asyncio.sleep(0)
            return dm.require_active_context().meta.user

        assert asyncio.run(handler()) == "async"

    def test_an_entered_context_cannot_decorate(self) -> None:
        """A context already in use is refused as a decorator, with the fix in the message."""
        dm = DataManager()
        with dm.context() as ctx, pytest.raises(ContextStateError, match=r"new dm\.context"):
            ctx(lambda: None)

    def test_a_generator_function_cannot_be_decorated(self) -> None:
        """@dm.context()/@dm.dal() on a (async) generator function: a TypeError saying where the context goes.

        (The context used to close once the generator object existed: the body
        then ran in no context, or silently in an outer one.)
        """
        dm = DataManager()

        def rows() -> Any:
            yield 1

        async def arows() -> Any:
            yield 1

        @functools.wraps(rows)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            return rows(*args, **kwargs)

        for decorator in (dm.context(), dm.dal()):
            for func in (rows, arows, wrapped):
                with pytest.raises(TypeError, match=r"generator function .*rows.* open the context inside"):
                    decorator(func)


class TestMetaSubclass:
    """8: a Meta subclass passed as meta is kept, with its methods."""

    def test_subclass_methods_survive(self) -> None:
        """``ctx.meta`` is the very object passed, so its methods work."""

        class UserMeta(Meta):
            def is_admin(self) -> bool:
                return self.get("role") == "admin"

        meta = UserMeta({"role": "admin"})
        dm = DataManager()
        with dm.context(meta=meta) as ctx:
            assert ctx.meta is meta
            assert ctx.meta.is_admin()


class TestCurrentContextProxy:
    """9: ``current_context`` passes isinstance checks and gives the context's own string."""

    def test_isinstance_and_str(self) -> None:
        """Like werkzeug's LocalProxy in 1.0, the proxy reports the context's class and str()."""
        dm = DataManager()
        with dm.context() as ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            proxy = polydatum.context.current_context
            assert isinstance(proxy, DataAccessContext)
            assert str(proxy) == str(ctx)


class TestCtxStackAlias:
    """10: ``from polydatum.context import _ctx_stack`` works again, with a warning."""

    def test_import_warns_at_the_users_line_and_works(self) -> None:
        """The alias warns (DeprecationWarning, pointing here) and its ``top`` is the active context."""
        dm = DataManager()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from polydatum.context import _ctx_stack
        assert [w.category for w in caught] == [DeprecationWarning]
        assert caught[0].filename == __file__
        with dm.context() as ctx:
            assert _ctx_stack.top is ctx
        assert _ctx_stack.top is None


class TestDeprecationWarningsPointAtTheCaller:
    """Every DeprecationWarning names the user's line, so ``-W error`` shows what to change."""

    def test_each_deprecated_name_warns_from_here(self) -> None:
        """get_active_context(), current_context and _ctx_stack all report this file."""
        dm = DataManager()
        with dm.context(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            polydatum.context.get_active_context()
            _ = polydatum.context.current_context.meta
            _ = polydatum.context._ctx_stack
        assert [w.category for w in caught] == [DeprecationWarning] * 3
        assert [w.filename for w in caught] == [__file__] * 3


class TestLookupEdges:
    """Managers that look resources up keep Python's attribute protocol intact."""

    def test_dunder_probes_are_plain_attribute_errors(self) -> None:
        """copy/pickle-style probes of a dunder name never reach get_resource."""
        asked: list[str] = []

        class Computed(DataManager):
            def get_resource(self, name: str) -> Any:
                asked.append(name)
                return super().get_resource(name)

        with Computed().context() as ctx:
            assert not hasattr(ctx, "__no_such_dunder__")
        assert asked == []

    def test_a_registered_underscore_name_is_reachable(self) -> None:
        """A resource registered under a single-underscore name is created through the override too."""

        class Computed(DataManager):
            def get_resource(self, name: str) -> Any:
                return super().get_resource(name)

        def hidden(context: Any) -> Iterator[str]:
            yield "hidden"

        dm = Computed()
        dm.register_resources(_hidden=hidden)
        with dm.context() as ctx:
            assert ctx._hidden == "hidden"

"""Contexts: one unit of work, with its meta data, resources and hooks.

A :class:`DataAccessContext` is opened by ``with dm.context(meta):`` (or
``async with``). Its lifecycle, in order:

1. it is pushed on its DataManager's active-context stack;
2. context middleware is set up in registration order;
3. the body runs; resources are created on first access;
4. middleware is torn down in reverse order, with the body's exception thrown
   into each; a middleware may replace it (raise another) but never suppress
   it: one that swallows it still leaves it in flight, as in polydatum 1.0;
5. the ``on_commit`` hooks run if no exception is left, else the
   ``on_rollback`` hooks;
6. resources are torn down in reverse order of creation; their errors are
   collected and logged, never raised;
7. the context is popped from the stack. It cannot be entered again.

The context is *active* (``dm.get_active_context()``, the DAL, services'
``self._ctx``) from step 1 to step 7, also while it closes: a resource's
teardown or a ``_final_hook`` may call the DAL, but resources cannot be
created once the middleware has finished.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Mapping
from functools import wraps
from inspect import isasyncgenfunction, isawaitable, iscoroutinefunction, isgeneratorfunction
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from polydatum import _factories
from polydatum._factories import DONE, OFFLOAD
from polydatum._generics import DalT

# current_context, get_active_context and Meta live in their own modules and
# are importable from here, as in polydatum 1.0.
from polydatum._legacy import LEGACY_STACK, current_context, get_active_context
from polydatum._stack import CLOSING, CREATED, EXITED, NO_CONTEXT, OPEN, no_context_error
from polydatum._wiring import Wiring
from polydatum.errors import (
    ContextStateError,
    MiddlewareSetupException,
    ResourceException,
    ResourceSetupException,
)
from polydatum.meta import EMPTY_META, Meta

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self

    from polydatum.dal import DataManager

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("polydatum")

_MW = "context middleware"
_RES = "resource"

ExcInfo = tuple[type[BaseException], BaseException, "TracebackType | None"]

__all__ = [
    "DataAccessContext",
    "Meta",
    "current_context",
    "get_active_context",
]


class DataAccessContext(Generic[DalT]):
    """One unit of work: meta data, lazily created resources, commit hooks.

    Normally made by :meth:`DataManager.context` and used once as a context
    manager. Resources are attributes: ``ctx.db`` creates the ``db`` resource
    the first time it is read in this context.

    Each DataManager gives its contexts a class of their own, carrying one
    accessor per registered resource and the manager's wiring (see
    ``_wiring.py``); that is why ``type(ctx)`` is a subclass of the class you
    asked for.

    Exiting takes one of three paths, the cheapest that fits:

    =================  ============================================  ==========================
    path               when                                          what it does
    =================  ============================================  ==========================
    pop only           nothing was set up, registered or created     reset the stack variable
                       (``_dirty`` is False)
    ``_exit_plain``    no context middleware, hooks or 1.0 hooks     tell the observer, close sync
                       (``_lean``), no async resource                resources, pop
    ``_close``         anything else (``_aclose`` for ``async``)     lifecycle steps 4 to 7
    =================  ============================================  ==========================

    Used as a decorator (``@dm.context(meta)``), it runs every call of the
    function in a new context with the same meta.

    Generic over the application's declaration of its services, which types
    ``ctx.dal`` (see docs/typing.md); a subclass annotating resources
    (``db: Session``) types ``ctx.db``.

    Attributes:
        data_manager: the owning DataManager.
        dal: the DataManager's DataAccessLayer.
        meta: read-only :class:`Meta`.
    """

    dal: DalT

    # Class-level defaults keep __init__ cheap: most contexts never need them.
    _state = CREATED
    _async = False
    _token: Any = None
    _middleware: list[tuple[Any, Any]] | None = None
    _created: dict[str, tuple[Any, bool, Any]] | None = None
    _hooks: list[tuple[bool, Callable[..., Any], tuple[Any, ...], dict[str, Any]]] | None = None
    _resource_exit_errors: list[ExcInfo] | None = None
    _hook_errors: list[ExcInfo] | None = None
    _interrupt: BaseException | None = None
    # Set only in contexts entered while the manager had an observer (see observer.py).
    _observer: Any = None
    _observed: Any = None
    # Set by an observer of this package (polydatum.otel) when its dal_call would only
    # pass calls through in this context (nothing recorded or measured): the DAL then
    # skips it. A private seam: Observer subclasses elsewhere are always called.
    _unobserved_calls = False
    _async_resources = False
    # Names of resources whose transaction a context middleware ended before the
    # context ever made them (set by polydatum.sqlalchemy): a session a hook makes
    # afterwards is a transaction of its own, committed as it closes.
    _ended: frozenset[str] = frozenset()
    # Async resources being created, by name: a future once a second task waits for one.
    _starting: dict[str, Any] | None = None
    _has_legacy_hooks = False
    # Set when every context middleware may run its sync form in a worker thread
    # (see _offload_threads): the executor getter for the close's one trip there.
    _close_threads: Callable[[], Any] | None = None
    # ``_plain`` (class level): the manager has no context middleware, no
    # observer and the class no legacy hooks, so entering is just a push. ``_dirty`` (instance):
    # middleware ran, a hook was registered or a resource created, so exiting
    # needs the full teardown. Together they keep the empty context cheap.
    _plain = False
    # ``_lean`` (class level): ``_plain`` but for an observer (see observer.py):
    # entering is a push and its call, exiting its calls, a pop and the resources.
    _lean = False
    _dirty = False
    # Bound classes carry their manager's wiring (see _wiring.ContextClasses).
    _wiring: Wiring

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # 1.0 subclasses could override these three; only pay for them then.
        base = DataAccessContext
        cls._has_legacy_hooks = (
            cls._setup_hook is not base._setup_hook
            or cls._teardown_hook is not base._teardown_hook
            or cls._final_hook is not base._final_hook
        )

    def __init__(self, data_manager: DataManager, meta: Mapping[str, Any] | None = None) -> None:
        self.data_manager = data_manager
        self.dal = data_manager.get_dal()  # type: ignore[assignment]
        if meta is None:
            self.meta = EMPTY_META
        else:
            # A Meta subclass is kept as it is (1.0 code passes its own).
            self.meta = meta if isinstance(meta, Meta) else Meta(meta)
        # The manager's class for this one, with its resource accessors and wiring.
        self.__class__ = data_manager.bind_context_class(type(self))

    def __repr__(self) -> str:
        state = ("created", "open", "closing", "exited")[self._state]
        return f"<{type(self).__name__} {state} at {id(self):#x}>"

    # -- resources ---------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        """True once the resource ``name`` was created in this context."""
        created = self._created
        return created is not None and name in created

    def _factory(self, name: str) -> _factories.Factory:
        wiring = self._wiring
        factory = wiring.resources.get(name)
        if factory is None and wiring.resource_for is not None:
            factory = wiring.resource_for(name)
        if factory is None:
            known = ", ".join(sorted(wiring.resources)) or "none"
            msg = f"no resource named {name!r} in this context; registered resources: {known}"
            raise AttributeError(msg)
        return factory

    def _creatable(self, name: str) -> None:
        """Raise unless resources may be created now (the context is open)."""
        if self._state != OPEN:
            if self._state == CLOSING:
                msg = (
                    f"{self!r} is closing: its middleware has finished, so resource {name!r} "
                    "cannot be created any more; create it in the context's body"
                )
                raise ContextStateError(msg)
            raise no_context_error(self, f"resource {name!r}")

    def _get_resource(self, name: str) -> Any:
        """Create the resource ``name`` on first use (called by its class attribute)."""
        created = self._created
        if created is not None and name in created:
            return created[name][2]
        factory = self._wiring.resources.get(name)
        if factory is None:
            factory = self._factory(name)
        if self._state != OPEN:
            self._creatable(name)
        if factory.is_async or (factory.alt is not None and self._async):
            msg = f'resource {name!r} is async; get it with "await ctx.aget({name!r})" inside "async with"'
            raise ResourceException(msg)
        gen = factory.make(self)
        value = next(gen, DONE)
        if value is DONE:
            raise _factories.did_not_yield(_factories.label(_RES, name), ResourceSetupException)
        # Read again: the factory may have created resources it depends on.
        created = self._created
        if created is None:
            created = self._created = {}
            self._dirty = True
        created[name] = (gen, False, value)
        # From now on the instance attribute shadows the class-level accessor.
        # (setattr, not __dict__: touching __dict__ would materialise it and
        # slow every later attribute access of this context.)
        setattr(self, name, value)
        return value

    async def aget(self, name: str) -> Any:
        """Get (creating on first use) the resource ``name``; works for async resources.

        Sync resources are returned as ``ctx.name`` would; async generator
        resources need a context entered with ``async with``.

        .. versionadded:: 2.0
        """
        created = self._created
        if created is not None and name in created:
            return created[name][2]
        factory = self._wiring.resources.get(name)
        if factory is None:
            factory = self._factory(name)
        if self._state != OPEN:
            self._creatable(name)
        if factory.alt is not None and self._async:
            factory = factory.alt
        if not factory.is_async:
            return self._get_resource(name)
        if not self._async:
            msg = f'resource {name!r} is async; enter the context with "async with dm.context():"'
            raise ResourceException(msg)
        starting = self._starting
        if starting is None:
            starting = self._starting = {}
        elif name in starting:
            # Another task of this context is creating it (asyncio.gather of two
            # first reads): wait for that one, never make a second.
            return await self._await_start(name, starting)
        starting[name] = None  # a future only if another task comes to wait
        try:
            agen = factory.make(self)
            # _factories.astart, inline: one coroutine less on every first read.
            value = await agen.__anext__()
        except StopAsyncIteration:
            raise _factories.did_not_yield(_factories.label(_RES, name), ResourceSetupException) from None
        else:
            self._remember(name, agen, True, value)
        finally:
            waiter = starting.pop(name)
            if waiter is not None:
                waiter.set_result(None)
        return value

    async def _await_start(self, name: str, starting: dict[str, Any]) -> Any:
        """Wait for the task creating resource ``name``, then read it (or create it, if that failed)."""
        import asyncio

        waiter = starting[name]
        if waiter is None:
            waiter = starting[name] = asyncio.get_running_loop().create_future()
        # Not "await waiter": cancelling this task must not cancel the others' wait.
        await asyncio.wait((waiter,))
        return await self.aget(name)

    def _remember(self, name: str, gen: Any, is_async: bool, value: Any) -> None:
        if is_async:
            self._async_resources = True
        if self._created is None:
            self._created = {}
            self._dirty = True
        self._created[name] = (gen, is_async, value)
        # Later reads become plain attribute lookups; removed at teardown.
        setattr(self, name, value)

    def get_resource_exit_errors(self) -> list[ExcInfo]:
        """Errors raised by resources while they were torn down.

        Returns:
            ``sys.exc_info()``-style triples, in teardown order.
        """
        if self._resource_exit_errors is None:
            self._resource_exit_errors = []
        return self._resource_exit_errors

    def get_hook_errors(self) -> list[ExcInfo]:
        """Errors raised by ``on_commit``/``on_rollback`` hooks.

        .. versionadded:: 2.0
        """
        if self._hook_errors is None:
            self._hook_errors = []
        return self._hook_errors

    # -- hooks -------------------------------------------------------------

    def on_commit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` once this context has ended without an exception.

        Hooks run after the context middleware was torn down (after a
        transaction middleware committed) and before resources are closed.
        Their errors are logged and collected in :meth:`get_hook_errors`,
        never raised. In an async context ``fn`` may be a coroutine function.

        .. versionadded:: 2.0
        """
        self._add_hook(True, fn, args, kwargs)

    def on_rollback(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` once this context has ended with an exception.

        .. versionadded:: 2.0
        """
        self._add_hook(False, fn, args, kwargs)

    def _add_hook(
        self, on_commit: bool, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if not callable(fn):
            msg = f"hook must be callable, got {_factories.describe(fn)}"
            raise TypeError(msg)
        if self._state != OPEN:
            msg = f"{self!r} has already ended; register hooks while it is open"
            raise ContextStateError(msg)
        if not self._async and _factories.is_async_callable(fn):
            # Refused here, where the mistake is, rather than collected unrun at the commit.
            msg = (
                f"hook {_factories.describe(fn)} is async and this context is sync (entered with "
                '"with", or the context of an endpoint under commit_in_endpoint, which runs in a '
                'thread): register a sync function, or enter the context with "async with"'
            )
            raise TypeError(msg)
        if self._hooks is None:
            self._hooks = []
            self._dirty = True
        self._hooks.append((on_commit, fn, args, kwargs))

    # -- entering ----------------------------------------------------------

    def _push(self, is_async: bool) -> None:
        if self._state != CREATED:
            msg = f"{self!r} was already used; a context is single-use, open a new one with dm.context()"
            raise ContextStateError(msg)
        self._token = self._wiring.stack.set(self)
        self._state = OPEN
        if is_async:
            self._async = True

    def _middleware_specs(self) -> tuple[_factories.Factory, ...]:
        wiring = self._wiring
        if wiring.middleware_for is None:
            return wiring.middleware
        return wiring.middleware_for(self)

    def __enter__(self) -> Self:
        if self._plain and self._state == CREATED:
            self._token = self._push_ctx(self)
            self._state = OPEN
            return self
        if self._lean and self._state == CREATED:
            self._token = self._push_ctx(self)
            self._state = OPEN
            self._dirty = True
            observer = self._wiring.observer
            if observer is not None:
                # Inline, not a helper's call: every instrumented request enters here.
                try:
                    self._observed = observer.context_entered(self)
                except BaseException as exc:
                    self._close(exc)
                    raise
                self._observer = observer
            return self
        self._push(False)
        self._dirty = True
        try:
            observer = self._wiring.observer
            if observer is not None:
                self._observed = observer.context_entered(self)
                self._observer = observer
            if self._has_legacy_hooks:
                self._setup_hook()
            specs = self._middleware_specs()
            if specs:
                self._setup_middleware(specs)
        except BaseException as exc:
            # Whatever failed, what was set up is torn down and the context popped;
            # the error escapes even if a middleware swallowed it, so hooks roll back.
            self._close(exc)
            raise
        return self

    def _push_ctx(self, ctx: DataAccessContext) -> Any:
        # Bound classes replace this with the stack variable's own ``set``.
        return self._wiring.stack.set(ctx)

    def _setup_middleware(self, specs: tuple[_factories.Factory, ...]) -> None:
        started: list[tuple[Any, Any]] = []
        self._middleware = started
        for spec in specs:
            if spec.is_async:
                what = _factories.label(_MW, spec.original)
                msg = f'{what} is async; enter the context with "async with dm.context():"'
                raise MiddlewareSetupException(msg)
            gen = spec.make(self)
            if next(gen, DONE) is DONE:
                what = _factories.label(_MW, spec.original)
                raise _factories.did_not_yield(what, MiddlewareSetupException)
            started.append((gen, spec.original))

    async def __aenter__(self) -> Self:
        if self._plain and self._state == CREATED:
            self._token = self._push_ctx(self)
            self._state = OPEN
            self._async = True
            return self
        if self._lean and self._state == CREATED:
            # The sync entry's lean branch (this class's own, whatever a subclass's
            # __enter__ does), on a context marked async first.
            self._async = True
            return DataAccessContext.__enter__(self)
        self._push(True)
        self._dirty = True
        try:
            observer = self._wiring.observer
            if observer is not None:
                self._observed = observer.context_entered(self)
                self._observer = observer
            if self._has_legacy_hooks:
                self._setup_hook()
            specs = self._middleware_specs()
            if specs:
                await self._asetup_middleware(specs)
        except BaseException as exc:
            await self._aclose(exc)
            raise
        return self

    async def _asetup_middleware(self, specs: tuple[_factories.Factory, ...]) -> None:
        started: list[tuple[Any, Any]] = []
        self._middleware = started
        threads = None if self._has_legacy_hooks else _offload_threads(specs)
        if threads is not None:
            # Blocking middleware only (a sync Database's transaction): their sync
            # forms start here and the close makes one trip to a worker thread for
            # the COMMIT and the hooks, where the async forms would make one each.
            self._close_threads = threads
            self._setup_middleware(specs)
            return
        for spec in specs:
            if spec.alt is not None:
                spec = spec.alt  # a Dual's async form
            gen = spec.make(self)
            # The label (a repr, possibly a costly one) is built only for the error.
            if spec.is_async:
                try:
                    await gen.__anext__()
                except StopAsyncIteration:
                    what = _factories.label(_MW, spec.original)
                    raise _factories.did_not_yield(what, MiddlewareSetupException) from None
            elif next(gen, DONE) is DONE:
                what = _factories.label(_MW, spec.original)
                raise _factories.did_not_yield(what, MiddlewareSetupException)
            started.append((gen, spec.original))

    # -- exiting -----------------------------------------------------------

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if not self._dirty and self._state == OPEN:
            # Nothing was set up, registered or created: just pop.
            self._state = EXITED
            try:
                self._wiring.stack.reset(self._token)
            except ValueError:
                self._state = OPEN
                self._finish(exc)
            return False
        if exc_type is not None and exc is None:
            exc = exc_type()
        if self._lean and self._hooks is None and self._state == OPEN:
            self._exit_plain(exc)
            return False
        final = self._close(exc)
        if final is None or final is exc:
            return False
        try:
            raise final
        finally:
            # The traceback holds this frame: without the name, no cycle through it.
            del final, exc

    def _exit_plain(self, exc: BaseException | None) -> None:
        """Exit when only sync resources need closing: no middleware, hooks or legacy hooks.

        The common case of a request that used a session, kept lean.
        """
        observer = self._observer
        if observer is not None:
            # _observer_exiting and _observer_exit, inline: every instrumented request leaves here.
            self._observer = None
            try:
                observer.context_exiting(self, self._observed)
            except BaseException as err:
                self._hook_failed(observer.context_exiting, err)
            try:
                observer.context_exited(self, self._observed, exc)
            except BaseException as err:
                self._hook_failed(observer.context_exited, err)
        self._state = CLOSING
        if self._created is not None:
            self._teardown_resources(exc)
        self._state = EXITED
        try:
            self._wiring.stack.reset(self._token)
        except ValueError:
            self._state = CLOSING
            self._finish(exc)
        # _escaping(exc), inline: this runs on every request that used a resource.
        interrupt = self._interrupt
        if interrupt is not None and interrupt is not exc and (exc is None or isinstance(exc, Exception)):
            raise interrupt

    async def _aexit_plain(self, exc: BaseException | None) -> None:
        """:meth:`_exit_plain` for a context that created async resources.

        The common case of an async request that used an async session.
        """
        if self._observer is not None:
            self._observer_exiting()
            self._observer_exit(exc)
        self._state = CLOSING
        if self._created is not None:
            await self._ateardown_resources(exc)
        self._state = EXITED
        try:
            self._wiring.stack.reset(self._token)
        except ValueError:
            self._state = CLOSING
            self._finish(exc)
        escaping = self._escaping(exc)
        if escaping is not None and escaping is not exc:
            raise escaping

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if not self._dirty and self._state == OPEN:
            self._state = EXITED
            try:
                self._wiring.stack.reset(self._token)
            except ValueError:
                self._state = OPEN
                self._finish(exc)
            return False
        if exc_type is not None and exc is None:
            exc = exc_type()
        if self._lean and self._hooks is None and self._state == OPEN:
            if self._async_resources:
                await self._aexit_plain(exc)
            else:
                self._exit_plain(exc)
            return False
        final = await self._aclose(exc)
        if final is None or final is exc:
            return False
        try:
            raise final
        finally:
            del final, exc  # see __exit__

    def _begin_close(self) -> None:
        if self._state != OPEN:
            msg = f"{self!r} is not open; it cannot be exited"
            raise ContextStateError(msg)

    def _close(self, exc: BaseException | None) -> BaseException | None:
        """Steps 4-7 of the lifecycle; returns the exception that escapes."""
        if self._state != OPEN:
            self._begin_close()
        try:
            if self._observer is not None:
                self._observer_exiting()
            middleware = self._middleware
            if middleware:
                self._middleware = None
                finish = _factories.finish
                while middleware:
                    gen, original = middleware.pop()
                    # None back while an exception is in flight is a middleware
                    # swallowing it: it stays in flight (it cannot be suppressed).
                    raised = finish(gen, exc, _MW, original)
                    if raised is not None:
                        exc = raised
            if self._has_legacy_hooks:
                self._legacy_teardown(exc)
            if self._hooks:
                self._run_hooks(exc is None)
        finally:
            if self._observer is not None:
                self._observer_exit(exc)
            self._state = CLOSING
            if self._created:
                self._teardown_resources(exc)
            self._finish(exc)
        try:
            return self._escaping(exc)
        finally:
            exc = raised = None  # a replacement's traceback holds this frame: no cycle through them

    async def _aclose(self, exc: BaseException | None) -> BaseException | None:
        self._begin_close()
        if self._close_threads is not None and (self._created or self._hooks):
            return await self._aclose_in_thread(exc)
        # (With no resource created and no hook, the blocking middleware have
        # nothing to COMMIT: their exits run here, without the trip.)
        try:
            if self._observer is not None:
                self._observer_exiting()
            middleware = self._middleware
            if middleware:
                self._middleware = None
                while middleware:
                    gen, original = middleware.pop()
                    if hasattr(gen, "athrow"):
                        raised = await _factories.afinish(gen, exc, _MW, original)
                    else:
                        raised = _factories.finish(gen, exc, _MW, original)
                    if raised is not None:
                        exc = raised
            if self._has_legacy_hooks:
                self._legacy_teardown(exc)
            if self._hooks:
                await self._arun_hooks(exc is None)
        finally:
            if self._observer is not None:
                self._observer_exit(exc)
            self._state = CLOSING
            if self._created:
                await self._ateardown_resources(exc)
            self._finish(exc)
        try:
            return self._escaping(exc)
        finally:
            exc = raised = None  # a replacement's traceback holds this frame: no cycle through them

    async def _aclose_in_thread(self, exc: BaseException | None) -> BaseException | None:
        """:meth:`_aclose` when the middleware started are blocking ones (see :meth:`_asetup_middleware`).

        Their exits and the hooks run in one worker thread, the observer's
        calls, the resources' teardown and the stack's reset on the loop, in
        the order :meth:`_aclose` keeps. A cancelled task waits for the thread
        (:func:`~polydatum._blocking.run_blocking`): no session closes under
        its COMMIT.
        """
        import asyncio

        from polydatum._blocking import run_blocking

        threads = self._close_threads
        assert threads is not None
        try:
            if self._observer is not None:
                self._observer_exiting()
            exc = await run_blocking(self._close_steps, exc, asyncio.get_running_loop(), executor=threads())
        finally:
            if self._observer is not None:
                self._observer_exit(exc)
            self._state = CLOSING
            if self._created:
                await self._ateardown_resources(exc)
            self._finish(exc)
        try:
            return self._escaping(exc)
        finally:
            exc = None  # a replacement's traceback holds this frame: no cycle through the name

    def _close_steps(self, exc: BaseException | None, loop: Any) -> BaseException | None:
        """The middleware's exits, then the hooks (in a worker thread); returns the exception in flight."""
        middleware = self._middleware
        if middleware:
            self._middleware = None
            finish = _factories.finish
            while middleware:
                gen, original = middleware.pop()
                raised = finish(gen, exc, _MW, original)
                if raised is not None:
                    exc = raised
        if self._hooks:
            self._run_hooks(exc is None, loop)
        return exc

    def _observer_exiting(self) -> None:
        # Like context_exited's, a failure is collected as a hook error: the
        # close goes on (middleware, hooks, resources, the stack) whatever the observer did.
        observer = self._observer
        try:
            observer.context_exiting(self, self._observed)
        except BaseException as err:
            self._hook_failed(observer.context_exiting, err)

    def _observer_exit(self, exc: BaseException | None) -> None:
        observer, self._observer = self._observer, None
        try:
            observer.context_exited(self, self._observed, exc)
        except BaseException as err:
            self._hook_failed(observer.context_exited, err)

    def _escaping(self, exc: BaseException | None) -> BaseException | None:
        """What leaves the context: ``exc``, unless an interrupt came up while closing.

        A KeyboardInterrupt/SystemExit/cancellation from a hook or resource
        teardown is not an error to collect: it propagates once all is closed,
        over an ordinary exception of the body (which becomes its __context__).
        """
        interrupt = self._interrupt
        if interrupt is not None and (exc is None or isinstance(exc, Exception)):
            return interrupt
        return exc

    def _teardown_resources(self, exc: BaseException | None) -> None:
        created = self._created
        if created is None:
            return
        # Popped one by one: a teardown may still read the resources not yet torn down.
        while created:
            name, (gen, is_async, _) = created.popitem()  # newest first
            _forget(self, name)
            if is_async:  # unreachable through aget(); kept as a guard
                self._resource_failed(name, RuntimeError(f"async resource {name!r} left open"))
                continue
            if exc is None:
                # _factories.finish's success branch, inline: a sync resource
                # closing after success is every request that used a session.
                try:
                    if next(gen, DONE) is DONE:
                        continue
                except BaseException as raised:
                    self._resource_failed(name, raised)
                    continue
                gen.close()
                self._resource_failed(name, _factories.yielded_twice(_RES, name))
                continue
            err = _factories.finish(gen, exc, _RES, name)
            if err is not exc and err is not None:
                self._resource_failed(name, err)
        self._created = None

    async def _ateardown_resources(self, exc: BaseException | None) -> None:
        created = self._created
        if created is None:
            return
        while created:
            name, (gen, is_async, _) = created.popitem()  # newest first
            _forget(self, name)
            if is_async:
                if exc is None:
                    # _factories.afinish's success branch, inline (see _teardown_resources).
                    try:
                        await gen.__anext__()
                    except StopAsyncIteration:
                        continue
                    except BaseException as raised:
                        self._resource_failed(name, raised)
                        continue
                    await gen.aclose()
                    self._resource_failed(name, _factories.yielded_twice(_RES, name))
                    continue
                err = await _factories.afinish(gen, exc, _RES, name)
            else:
                err = _factories.finish(gen, exc, _RES, name)
            if err is not None and err is not exc:
                self._resource_failed(name, err)
        self._created = None

    def _resource_failed(self, name: str, err: BaseException) -> None:
        if err.__traceback__ is None:
            # Built, never raised (a generator that yielded twice): give it the
            # traceback sys.exc_info() would, so the triple is a real one.
            try:
                raise err
            except BaseException:  # only to attach the traceback
                pass
        self.get_resource_exit_errors().append((type(err), err, err.__traceback__))
        logger.warning(
            "resource %r failed while closing: %r",
            name,
            err,
            exc_info=(type(err), err, err.__traceback__),
            extra={"polydatum_resource": name},
        )
        if not isinstance(err, Exception) and self._interrupt is None:
            self._interrupt = err

    def _run_hooks(self, committed: bool, loop: Any = None) -> None:
        """Run the hooks of the outcome; an async one's awaitable goes to ``loop`` (from a worker thread)."""
        hooks = self._hooks
        assert hooks is not None
        i = 0
        while i < len(hooks):  # hooks may register more hooks
            on_commit, fn, args, kwargs = hooks[i]
            i += 1
            if on_commit is not committed:
                continue
            try:
                result = fn(*args, **kwargs)
                if isawaitable(result) and loop is not None:
                    import asyncio

                    asyncio.run_coroutine_threadsafe(_awaited(result), loop).result()
                elif isawaitable(result):
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
                    msg = f'hook {fn!r} is async; enter the context with "async with" to use it'
                    raise TypeError(msg)
            except BaseException as err:
                self._hook_failed(fn, err)

    async def _arun_hooks(self, committed: bool) -> None:
        hooks = self._hooks
        assert hooks is not None
        i = 0
        while i < len(hooks):
            on_commit, fn, args, kwargs = hooks[i]
            i += 1
            if on_commit is not committed:
                continue
            try:
                result = fn(*args, **kwargs)
                if isawaitable(result):
                    await result
            except BaseException as err:
                self._hook_failed(fn, err)

    def _hook_failed(self, fn: Any, err: BaseException) -> None:
        self.get_hook_errors().append((type(err), err, err.__traceback__))
        logger.warning(
            "hook %r failed: %r",
            fn,
            err,
            exc_info=(type(err), err, err.__traceback__),
            extra={"polydatum_hook": getattr(fn, "__qualname__", repr(fn))},
        )
        if not isinstance(err, Exception) and self._interrupt is None:
            self._interrupt = err

    def _finish(self, exc: BaseException | None) -> None:
        try:
            if self._has_legacy_hooks:
                self._final_hook(exc)
        finally:
            # The hooks are bound methods of objects that hold this context (a
            # blob store, a deferral): dropped here, the pair is freed at once
            # rather than left as a cycle for the garbage collector.
            self._hooks = None
            token, self._token = self._token, None
            var = self._wiring.stack
            try:
                var.reset(token)
            except ValueError:
                # Exited in another thread or task than it was entered in: that
                # stack is not ours to reset, but do not leave ourselves on top.
                if var.get() is self:
                    var.set(token.old_value if token.old_value is not token.MISSING else NO_CONTEXT)
            self._state = EXITED

    def _legacy_teardown(self, exc: BaseException | None) -> None:
        try:
            self._teardown_hook(exc)
        except Exception:
            self.get_resource_exit_errors().append(sys.exc_info())  # type: ignore[arg-type]

    # -- as a decorator ----------------------------------------------------

    def __call__(self, func: F) -> F:
        """Decorate ``func`` so that each call runs in a new context with this meta.

        ``@dm.context(meta)`` and ``@dm.dal(meta)`` worked in 1.0, whose
        contexts were ``contextlib`` context managers.

        .. versionadded:: 2.0
        """
        if self._state != CREATED:
            msg = f"{self!r} was already entered; decorate with a new dm.context() instead"
            raise ContextStateError(msg)
        dm, meta = self.data_manager, self.meta
        inner = _factories.unwrapped(func)
        if isgeneratorfunction(inner) or isasyncgenfunction(inner):
            # The context would close once the generator object exists, before its
            # body runs; and a context kept open across yields would leak into the caller.
            name = getattr(func, "__qualname__", repr(func))
            msg = (
                f"cannot decorate the generator function {name} with a context: its body runs "
                f"only as it is iterated, after the call returned; open the context inside it "
                f'("with dm.context(meta):" around the work between yields)'
            )
            raise TypeError(msg)
        if iscoroutinefunction(func):

            @wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                async with dm.context(meta):
                    return await func(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            with dm.context(meta):
                return func(*args, **kwargs)

        return run  # type: ignore[return-value]

    # 1.0 extension points, kept for subclasses; they cost nothing unless overridden.
    def _setup_hook(self) -> None:
        """Called after the context is pushed, before middleware set-up."""

    def _teardown_hook(self, exception: BaseException | None) -> None:
        """Called after middleware teardown, before hooks and resources close."""

    def _final_hook(self, exception: BaseException | None) -> None:
        """Called last, just before the context is popped."""


def _forget(ctx: DataAccessContext[Any], name: str) -> None:
    """Drop the instance attribute that cached resource ``name``.

    ``delattr``, not ``ctx.__dict__.pop``: reading ``__dict__`` builds a dict
    object for a context whose attributes live inline (about 150 ns a context).
    """
    try:
        object.__delattr__(ctx, name)
    except AttributeError:
        pass  # already gone: the body deleted it


def _offload_threads(specs: tuple[_factories.Factory, ...]) -> Callable[[], Any] | None:
    """The executor getter when every middleware in ``specs`` may close in a worker thread, else None.

    That is a :class:`~polydatum.resources.Dual` whose async form is marked
    by :func:`polydatum._blocking.offloadable` (it only moves its sync form's
    blocking work off the loop); the first one's threads serve the close.
    """
    threads = None
    for spec in specs:
        alt = spec.alt
        getter = None if alt is None else getattr(alt.original, OFFLOAD, None)
        if getter is None:
            return None
        if threads is None:
            threads = getter
    return threads


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def __getattr__(name: str) -> Any:
    # 1.0's module-level stack, deprecated since 0.8.4: kept as a warning alias.
    if name == "_ctx_stack":
        warnings.warn(
            "polydatum.context._ctx_stack is deprecated since 0.8.4; use dm.ctx_stack, "
            "dm.get_active_context() or self._ctx in services",
            DeprecationWarning,
            stacklevel=2,
        )
        return LEGACY_STACK
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)

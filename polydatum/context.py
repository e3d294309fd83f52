"""Contexts: one unit of work, with its meta data, resources and hooks.

A :class:`DataAccessContext` is opened by ``with dm.context(meta):`` (or
``async with``). Its lifecycle, in order:

1. it is pushed on its DataManager's active-context stack;
2. context middleware is set up in registration order;
3. the body runs; resources are created on first access;
4. middleware is torn down in reverse order, with the body's exception thrown
   into each (a middleware may suppress it or replace it);
5. the ``on_commit`` hooks run if no exception is left, else the
   ``on_rollback`` hooks;
6. resources are torn down in reverse order of creation; their errors are
   collected and logged, never raised;
7. the context is popped from the stack. It cannot be entered again.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Mapping
from inspect import isawaitable
from typing import TYPE_CHECKING, Any

from polydatum import _factories

# current_context, get_active_context and Meta live in their own modules and
# are importable from here, as in polydatum 1.0.
from polydatum._legacy import current_context, get_active_context
from polydatum._stack import CLOSING, CREATED, EXITED, NO_CONTEXT, OPEN, no_context_error
from polydatum.errors import (
    ContextStateError,
    MiddlewareSetupException,
    ResourceException,
    ResourceSetupException,
)
from polydatum.meta import EMPTY_META, Meta

if TYPE_CHECKING:
    from types import TracebackType

    from polydatum.dal import DataAccessLayer, DataManager

logger = logging.getLogger("polydatum")

_DONE = _factories._DONE
_MW = "context middleware"
_RES = "resource"

ExcInfo = tuple[type[BaseException], BaseException, "TracebackType | None"]

__all__ = [
    "DataAccessContext",
    "Meta",
    "current_context",
    "get_active_context",
]




class ResourceAttribute:
    """Class-level accessor for one resource: creates it on first read.

    It defines only ``__get__``, so once the value is stored on the instance
    every later read is a plain attribute lookup.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, ctx: DataAccessContext | None, owner: type | None = None) -> Any:
        if ctx is None:
            return self
        return ctx._get_resource(self.name)

    def __repr__(self) -> str:
        return f"<resource {self.name!r}>"


class DataAccessContext:
    """One unit of work: meta data, lazily created resources, commit hooks.

    Normally made by :meth:`DataManager.context` and used once as a context
    manager. Resources are attributes: ``ctx.db`` creates the ``db`` resource
    the first time it is read in this context.

    Each DataManager gives its contexts a class of their own, carrying one
    accessor per registered resource; that is why ``type(ctx)`` is a
    subclass of the class you asked for.

    Attributes:
        data_manager: the owning DataManager.
        dal: the DataManager's DataAccessLayer.
        meta: read-only :class:`Meta`.
    """

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
    _async_resources = False
    _has_legacy_hooks = False
    # ``_plain`` (class level): the manager has no context middleware and the
    # class no legacy hooks, so entering is just a push. ``_dirty`` (instance):
    # middleware ran, a hook was registered or a resource created, so exiting
    # needs the full teardown. Together they keep the empty context cheap.
    _plain = False
    _dirty = False
    # Bound classes point this at their manager's resource specs.
    _specs: dict[str, _factories.Factory] | None = None

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
        self.dal: DataAccessLayer = data_manager.get_dal()
        if meta is None:
            self.meta = EMPTY_META
        else:
            self.meta = meta if type(meta) is Meta else Meta(meta)
        bind = getattr(data_manager, "_bind_context_class", None)
        if bind is not None:
            # Give the instance the manager's class with its resource accessors.
            self.__class__ = bind(type(self))

    def __repr__(self) -> str:
        state = ("created", "open", "closing", "exited")[self._state]
        return f"<{type(self).__name__} {state} at {id(self):#x}>"

    # -- resources ---------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        """True once the resource ``name`` was created in this context."""
        created = self._created
        return created is not None and name in created

    def _factory(self, name: str) -> _factories.Factory:
        manager = self.data_manager._resource_manager
        specs = getattr(manager, "_specs", None)
        if specs is not None:
            factory: _factories.Factory | None = specs.get(name)
            if factory is not None:
                return factory
        elif name in manager:
            found = _factories.as_factory(manager[name])
            if found is not None:
                return found
        known = ", ".join(sorted(specs or ())) or "none"
        msg = f"no resource named {name!r} in this context; registered resources: {known}"
        raise AttributeError(msg)

    def _get_resource(self, name: str) -> Any:
        """Create the resource ``name`` on first use (called by its class attribute)."""
        created = self._created
        if created is not None and name in created:
            return created[name][2]
        if self._state != OPEN:
            raise no_context_error(self, f"resource {name!r}")
        specs = self._specs
        factory = specs.get(name) if specs is not None else None
        if factory is None:
            factory = self._factory(name)
        if factory.is_async:
            msg = f'resource {name!r} is async; get it with "await ctx.aget({name!r})" inside "async with"'
            raise ResourceException(msg)
        gen = factory.make(self)
        value = next(gen, _DONE)
        if value is _DONE:
            msg = f"resource {name!r} did not yield on setup; it must yield exactly once"
            raise ResourceSetupException(msg)
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
        if self._state != OPEN:
            raise no_context_error(self, f"resource {name!r}")
        factory = self._factory(name)
        if not factory.is_async:
            return self._get_resource(name)
        if not self._async:
            msg = f'resource {name!r} is async; enter the context with "async with dm.context():"'
            raise ResourceException(msg)
        agen = factory.make(self)
        value = await _factories.astart(agen, f"resource {name!r}", ResourceSetupException)
        self._remember(name, agen, True, value)
        return value

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
        if self._state > OPEN:
            msg = f"{self!r} has already ended; register hooks while it is open"
            raise ContextStateError(msg)
        if self._hooks is None:
            self._hooks = []
            self._dirty = True
        self._hooks.append((on_commit, fn, args, kwargs))

    # -- entering ----------------------------------------------------------

    def _push(self, is_async: bool) -> None:
        if self._state != CREATED:
            msg = f"{self!r} was already used; a context is single-use, open a new one with dm.context()"
            raise ContextStateError(msg)
        self._token = self.data_manager._ctx_var.set(self)
        self._state = OPEN
        if is_async:
            self._async = True

    def __enter__(self) -> DataAccessContext:
        if self._plain and not self._state:
            self._token = self._push_ctx(self)
            self._state = OPEN
            return self
        self._push(False)
        self._dirty = True
        try:
            if self._has_legacy_hooks:
                self._setup_hook()
            dm = self.data_manager
            specs = dm._middleware_specs if dm._static_middleware else dm._dynamic_middleware(self)
            if specs:
                self._setup_middleware(specs)
        except BaseException as exc:
            # Whatever failed, what was set up is torn down and the context popped;
            # the error escapes even if a middleware swallowed it, so hooks roll back.
            self._close(exc, failed=True)
            raise
        return self

    def _push_ctx(self, ctx: DataAccessContext) -> Any:
        # Bound classes replace this with the stack variable's own ``set``.
        return self.data_manager._ctx_var.set(ctx)

    def _setup_middleware(self, specs: tuple[_factories.Factory, ...]) -> None:
        started: list[tuple[Any, Any]] = []
        self._middleware = started
        for spec in specs:
            if spec.is_async:
                what = _factories.label(_MW, spec.original)
                msg = f'{what} is async; enter the context with "async with dm.context():"'
                raise MiddlewareSetupException(msg)
            gen = spec.make(self)
            if next(gen, _DONE) is _DONE:
                what = _factories.label(_MW, spec.original)
                msg = f"{what} did not yield on setup; it must yield exactly once"
                raise MiddlewareSetupException(msg)
            started.append((gen, spec.original))

    async def __aenter__(self) -> DataAccessContext:
        if self._plain and not self._state:
            self._token = self._push_ctx(self)
            self._state = OPEN
            self._async = True
            return self
        self._push(True)
        self._dirty = True
        try:
            if self._has_legacy_hooks:
                self._setup_hook()
            dm = self.data_manager
            specs = dm._middleware_specs if dm._static_middleware else dm._dynamic_middleware(self)
            if specs:
                await self._asetup_middleware(specs)
        except BaseException as exc:
            await self._aclose(exc, failed=True)
            raise
        return self

    async def _asetup_middleware(self, specs: tuple[_factories.Factory, ...]) -> None:
        started: list[tuple[Any, Any]] = []
        self._middleware = started
        for spec in specs:
            what = _factories.label(_MW, spec.original)
            gen = spec.make(self)
            if spec.is_async:
                await _factories.astart(gen, what, MiddlewareSetupException)
            else:
                _factories.start(gen, what, MiddlewareSetupException)
            started.append((gen, spec.original))

    # -- exiting -----------------------------------------------------------

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if not self._dirty and self._state == OPEN:
            # Nothing was set up, registered or created: just pop.
            self._state = EXITED
            try:
                self.data_manager._ctx_var.reset(self._token)
            except ValueError:
                self._state = OPEN
                self._finish(exc)
            return False
        if exc_type is not None and exc is None:
            exc = exc_type()
        if self._plain and self._hooks is None and self._state == OPEN:
            self._exit_plain(exc)
            return False
        final = self._close(exc)
        if final is exc:
            return False
        if final is None:
            return True
        raise final

    def _exit_plain(self, exc: BaseException | None) -> None:
        """Exit when only sync resources need closing: no middleware, hooks or legacy hooks.

        The common case of a request that used a session, kept lean.
        """
        self._state = CLOSING
        if self._created is not None:
            self._teardown_resources(exc)
        self._state = EXITED
        try:
            self.data_manager._ctx_var.reset(self._token)
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
    ) -> bool:
        if not self._dirty and self._state == OPEN:
            self._state = EXITED
            try:
                self.data_manager._ctx_var.reset(self._token)
            except ValueError:
                self._state = OPEN
                self._finish(exc)
            return False
        if exc_type is not None and exc is None:
            exc = exc_type()
        if self._plain and self._hooks is None and self._state == OPEN and not self._async_resources:
            self._exit_plain(exc)
            return False
        final = await self._aclose(exc)
        if final is exc:
            return False
        if final is None:
            return True
        raise final

    def _begin_close(self) -> None:
        if self._state != OPEN:
            msg = f"{self!r} is not open; it cannot be exited"
            raise ContextStateError(msg)

    def _close(self, exc: BaseException | None, failed: bool = False) -> BaseException | None:
        """Steps 4-7 of the lifecycle; returns the exception that escapes."""
        if self._state != OPEN:
            self._begin_close()
        try:
            middleware = self._middleware
            if middleware:
                self._middleware = None
                finish = _factories.finish
                while middleware:
                    gen, original = middleware.pop()
                    exc = finish(gen, exc, _MW, original)
            if self._has_legacy_hooks:
                self._legacy_teardown(exc)
            if self._hooks:
                self._run_hooks(exc is None and not failed)
        finally:
            self._state = CLOSING
            if self._created:
                self._teardown_resources(exc)
            self._finish(exc)
        return self._escaping(exc)

    async def _aclose(self, exc: BaseException | None, failed: bool = False) -> BaseException | None:
        self._begin_close()
        try:
            middleware = self._middleware
            if middleware:
                self._middleware = None
                while middleware:
                    gen, original = middleware.pop()
                    if hasattr(gen, "athrow"):
                        exc = await _factories.afinish(gen, exc, _MW, original)
                    else:
                        exc = _factories.finish(gen, exc, _MW, original)
            if self._has_legacy_hooks:
                self._legacy_teardown(exc)
            if self._hooks:
                await self._arun_hooks(exc is None and not failed)
        finally:
            self._state = CLOSING
            if self._created:
                await self._ateardown_resources(exc)
            self._finish(exc)
        return self._escaping(exc)

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
        self._created = None
        pop = self.__dict__.pop
        while created:
            name, (gen, is_async, _) = created.popitem()  # newest first
            pop(name, None)
            if is_async:  # unreachable through aget(); kept as a guard
                self._resource_failed(name, RuntimeError(f"async resource {name!r} left open"))
                continue
            if exc is None:
                # _factories.finish's success branch, inline: a sync resource
                # closing after success is every request that used a session.
                try:
                    if next(gen, _DONE) is _DONE:
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

    async def _ateardown_resources(self, exc: BaseException | None) -> None:
        created = self._created
        if created is None:
            return
        self._created = None
        pop = self.__dict__.pop
        while created:
            name, (gen, is_async, _) = created.popitem()  # newest first
            pop(name, None)
            if is_async:
                err = await _factories.afinish(gen, exc, _RES, name)
            else:
                err = _factories.finish(gen, exc, _RES, name)
            if err is not None and err is not exc:
                self._resource_failed(name, err)

    def _resource_failed(self, name: str, err: BaseException) -> None:
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

    def _run_hooks(self, committed: bool) -> None:
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
                if isawaitable(result):
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
            token, self._token = self._token, None
            var = self.data_manager._ctx_var
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

    # 1.0 extension points, kept for subclasses; they cost nothing unless overridden.
    def _setup_hook(self) -> None:
        """Called after the context is pushed, before middleware set-up."""

    def _teardown_hook(self, exception: BaseException | None) -> None:
        """Called after middleware teardown, before hooks and resources close."""

    def _final_hook(self, exception: BaseException | None) -> None:
        """Called last, just before the context is popped."""



class WarnIfCollectedOpen:
    """Mixin: emit a ``ResourceWarning`` when an open context is garbage-collected.

    A finaliser costs every context on its way out, while ``ResourceWarning``
    is ignored by Python's default filters. A DataManager therefore mixes this
    into its context classes only when, at its creation, ResourceWarning is
    not ignored: under ``python -X dev``, ``-W default`` or pytest.
    """

    __slots__ = ()
    _state: int

    def __del__(self) -> None:
        if self._state == OPEN:
            warnings.warn(
                f"{self!r} was garbage-collected while still open; use it as "
                '"with dm.context():" so it is always exited',
                ResourceWarning,
                stacklevel=1,
            )


def resource_warnings_shown() -> bool:
    """Whether the current warning filters let a ResourceWarning through."""
    for action, message, category, module, _ in warnings.filters:
        if issubclass(ResourceWarning, category) and message is None and module is None:
            return action != "ignore"
    return True

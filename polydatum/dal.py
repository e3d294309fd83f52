"""The DataManager (the registry) and the DataAccessLayer (the way in).

::

    dm = DataManager()
    dm.register_resources(db=db_session)
    dm.register_context_middleware(transaction)
    dm.register_services(users=Users())

    with dm.dal(meta={"user": current_user}) as dal:
        dal.users.get(42)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from polydatum import _factories, _registry
from polydatum._legacy import track
from polydatum._stack import NO_CONTEXT, OPEN, new_stack_var, no_context_error
from polydatum.context import (
    DataAccessContext,
    ResourceAttribute,
    WarnIfCollectedOpen,
    resource_warnings_shown,
)
from polydatum.errors import (
    AlreadyExistsException,
    DalMethodError,
    InvalidMiddleware,
    NoActiveContextError,
)
from polydatum.meta import EMPTY_META, Meta
from polydatum.middleware import (
    DalCommand,
    DalCommandRequest,
    PathSegment,
    dal_method_resolver_middleware,
    dal_resolver,
    handle_dal_method,
    resolve_owner,
)
from polydatum.resources import ResourceManager
from polydatum.services import check_service

_Segment = PathSegment

__all__ = ["DataAccessLayer", "DataManager"]

Handler = Callable[[DalCommandRequest], Any]

# Attribute names of the DAL itself; never turned into commands.
_DAL_ATTRS = frozenset(
    {"_services", "_data_manager", "_handler", "_middleware", "_default_middleware",
     "_base_handler", "_direct", "_async_chain", "_by_string", "_fast_capable"}
)
_MAX_STRING_PATHS = 1024


def _is_async_callable(obj: Any) -> bool:
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - a coroutine __call__, not callability
    )


def _awaiting(handler: Handler) -> Callable[[DalCommandRequest], Any]:
    """Wrap the next handler for an async middleware, so it can always ``await`` it."""

    async def next_handler(request: DalCommandRequest) -> Any:
        result = handler(request)
        while inspect.isawaitable(result):
            result = await result
        return result

    return next_handler


def _link(middleware: Any, handler: Handler) -> Handler:
    """One step of the chain: ``middleware(request=..., handler=next step)``.

    Both by keyword, as polydatum 1.0 called them. A closure, not a
    ``functools.partial``: a partial merges its keywords into a new dict on
    every call, which costs twice as much.
    """

    def next_step(request: DalCommandRequest) -> Any:
        return middleware(request=request, handler=handler)

    return next_step


def _stale_get() -> Any:
    return NO_CONTEXT


# State of a command that must take the slow path: the context check fails.
_STALE: tuple[Any, Any, str, Callable[[], Any]] = (None, (), "", _stale_get)


class _ChainMarker(tuple):  # type: ignore[type-arg]
    """Truthy marker in a command's state: "run the middleware chain"."""


_CHAIN = _ChainMarker(("<chain>",))


class _Command(DalCommand):
    """The DAL's own commands: children and path resolution are cached.

    The fast path keeps everything it needs in one tuple, ``_st``: the
    top-level service (pure given the registry), the names in between, the
    method name and the stack getter. Intermediate names and the method are
    looked up at call time, so a patched sub-service or method takes effect
    on the very next call; registry changes reset ``_st`` to :data:`_STALE`.
    """

    _st = _STALE
    _resolved: tuple[int, tuple[str, ...]] | None = None

    def __init__(self, dal: DataAccessLayer, path: tuple[_Segment, ...]) -> None:
        self._handler = dal._call
        self.path = path
        self._dal = dal

    def __getattr__(self, name: str) -> DalCommand:
        if name[:2] == "__":
            raise AttributeError(name)
        child = _Command(self._dal, (*self.path, _Segment(name)))
        self.__dict__[name] = child
        return child

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner, middle, name, get_ctx = self._st
        ctx = get_ctx()
        if ctx._state != OPEN:
            return self._call_slow(args, kwargs)
        if middle:
            if middle is _CHAIN:
                return owner._dispatch(ctx, self, args, kwargs)
            try:
                for step in middle:
                    owner = getattr(owner, step)
            except AttributeError:
                return self._call_slow(args, kwargs)
        return getattr(owner, name)(*args, **kwargs)

    def _call_slow(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        dal = self._dal
        dm = dal._data_manager
        ctx = dm._ctx_var.get() if dm is not None else NO_CONTEXT
        if ctx._state != OPEN:
            raise no_context_error(ctx, f"dal.{self}")
        if dm is None:
            return dal._dispatch(ctx, self, args, kwargs)
        if dal._direct and len(self.path) > 1:
            # Raises DalMethodError naming the bad step.
            resolve_owner(dal._services, self.path, callable_only=True)
            names = self._names()
            self._st = (dal._services[names[0]], names[1:-1], names[-1], dm._ctx_var.get)
        else:
            # Calls go through the middleware chain; the resolver caches the target.
            self._st = (dal, _CHAIN, "", dm._ctx_var.get)
        _registry.track(self)
        return self(*args, **kwargs)

    def _names(self) -> tuple[str, ...]:
        return tuple(segment.name for segment in self.path)

    def _invalidate(self) -> None:
        self._st = _STALE
        self._resolved = None

    def _target_for(self, ctx: DataAccessContext) -> Any:
        """The callable this command names now (used by the resolver middleware).

        Only the validation is cached; the names are looked up again on every
        call, like the direct path does, so a patched method or sub-service
        is seen at once.
        """
        if ctx.dal is not self._dal:
            return dal_resolver(ctx, self.path)
        resolved = self._resolved
        services = self._dal._services
        if resolved is None or resolved[0] != _registry.version:
            _, target = resolve_owner(services, self.path, callable_only=True)
            self._resolved = (_registry.version, self._names())
            _registry.track(self)
            return target
        names = resolved[1]
        obj = services[names[0]]
        try:
            for step in names[1:]:
                obj = getattr(obj, step)
        except AttributeError:
            # Gone since validated (a patch undone badly, a deleted attribute):
            # validate again, which names the missing step.
            self._resolved = None
            return self._target_for(ctx)
        return obj


class DataAccessLayer:
    """Access to a DataManager's services: ``dal.users.get(42)``.

    Args:
        data_manager: the owning DataManager.
        middleware: method middleware, outermost first; classes are instantiated.
        default_middleware: the innermost middleware (the path resolver).
        handler: the end of the chain, calling the resolved method.

    Raises:
        InvalidMiddleware: if a middleware is not callable.
    """

    def __init__(
        self,
        data_manager: DataManager | None,
        middleware: Iterable[Any] | None = None,
        default_middleware: Iterable[Any] | None = (dal_method_resolver_middleware,),
        handler: Handler = handle_dal_method,
    ) -> None:
        self._services: dict[str, Any] = {}
        self._data_manager = data_manager
        self._base_handler = handler
        self._default_middleware = tuple(default_middleware or ())
        self._middleware: list[Any] = []
        self._by_string: dict[str, DalCommand] = {}
        # A subclass overriding _call or __getattr__ keeps full control of calls.
        cls = type(self)
        self._fast_capable = (
            cls._call is DataAccessLayer._call and cls.__getattr__ is DataAccessLayer.__getattr__
        )
        self._build_chain(list(middleware or ()))

    def _build_chain(self, middleware: list[Any]) -> None:
        chain = [self._instantiate(m) for m in [*middleware, *self._default_middleware]]
        handler: Handler = self._base_handler
        is_async = False
        for m in reversed(chain):
            if _is_async_callable(m):
                is_async = True
                handler = _link(m, _awaiting(handler))
            else:
                handler = _link(m, handler)
        self._middleware = chain[: len(middleware)]
        self._handler = handler
        self._async_chain = is_async
        # With only the stock resolver and handler, calls skip the chain.
        self._direct = (
            not middleware
            and self._default_middleware == (dal_method_resolver_middleware,)
            and self._base_handler is handle_dal_method
        )
        _registry.bump()

    @staticmethod
    def _instantiate(m: Any) -> Any:
        if inspect.isclass(m):
            m = m()
        if not callable(m):
            msg = (
                f"method middleware must be a callable (request, handler) -> result, "
                f"or a class whose instances are; got {_factories.describe(m)}"
            )
            raise InvalidMiddleware(msg)
        return m

    def add_middleware(self, *middleware: Any) -> None:
        """Append method middleware inside the existing ones (outermost first).

        .. versionadded:: 2.0
        """
        self._build_chain([*self._middleware, *middleware])

    # -- services ----------------------------------------------------------

    def register_services(self, **services: Any) -> DataAccessLayer:
        """Register services under their names.

        Raises:
            AlreadyExistsException: if a name is taken (use :meth:`replace_service`).
            TypeError: if a value is not a service.
        """
        for key, service in services.items():
            if key in self._services:
                msg = f"a service named {key!r} is already registered; use replace_service() to swap it"
                raise AlreadyExistsException(msg)
            self._check_name(key)
            check_service(key, service)
        for key, service in services.items():
            self._init_service(key, service)
        return self

    def replace_service(self, key: str, service: Any) -> Any:
        """Register ``service`` under ``key``, replacing any previous one (tests)."""
        self._check_name(key)
        check_service(key, service)
        return self._init_service(key, service)

    @classmethod
    def _check_name(cls, key: str) -> None:
        if key[:1] == "_" or hasattr(cls, key):
            msg = (
                f"cannot register a service named {key!r}: names starting with '_' and the "
                "DataAccessLayer's own attributes (register_services, add_middleware...) "
                "would not be reachable as dal.<name>; pick another name"
            )
            raise ValueError(msg)

    def _init_service(self, key: str, service: Any) -> Any:
        service.setup(self._data_manager)
        self._services[key] = service
        _registry.bump()
        return service

    # -- calls -------------------------------------------------------------

    def _new_command(self, path: tuple[PathSegment, ...]) -> DalCommand:
        if self._fast_capable:
            return _Command(self, path)
        return DalCommand(self._call, path)

    def __getattr__(self, name: str) -> DalCommand:
        if name[:2] == "__" or name in _DAL_ATTRS:
            raise AttributeError(name)
        command = self._new_command((PathSegment(name),))
        if self._fast_capable:
            # Cached as a plain attribute: the next ``dal.<name>`` is a dict hit.
            self.__dict__[name] = command
        return command

    def __getitem__(self, path: str) -> DalCommand:
        """A command by dotted path: ``dal["users.get"]`` (a leading ``dal.`` is ignored)."""
        command = self._by_string.get(path)
        if command is None:
            names = path.split(".")
            if names[0] == "dal":
                names = names[1:]
            if not names or not all(names):
                msg = f"invalid DAL path {path!r}; expected dotted names like 'users.get'"
                raise DalMethodError((), msg)
            command = self._new_command(tuple(PathSegment(n) for n in names))
            if len(self._by_string) >= _MAX_STRING_PATHS:
                self._by_string.clear()
            self._by_string[path] = command
        return command

    def _call(self, path: tuple[PathSegment, ...], *args: Any, **kwargs: Any) -> Any:
        """Run a call through the middleware chain (the 1.0 entry point)."""
        dm = self._data_manager
        if dm is None:
            msg = "this DataAccessLayer has no DataManager, so it has no context to run in"
            raise NoActiveContextError(msg)
        ctx = dm.require_active_context()
        return self._run_chain(ctx, DalCommandRequest(ctx, path, args, kwargs))

    def _dispatch(
        self, ctx: DataAccessContext, command: _Command, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        request = DalCommandRequest(ctx, command.path, args, kwargs)
        request._command = command
        if self._async_chain and not ctx._async:
            self._refuse_sync(request)
        return self._handler(request)

    def _run_chain(self, ctx: DataAccessContext, request: DalCommandRequest) -> Any:
        if self._async_chain and not ctx._async:
            self._refuse_sync(request)
        return self._handler(request)

    @staticmethod
    def _refuse_sync(request: DalCommandRequest) -> None:
        msg = (
            f"dal.{request.path_name}: the DAL has async method middleware, so calls must "
            'be awaited inside "async with dm.context():"'
        )
        raise NoActiveContextError(msg)


def _bound_init(self: DataAccessContext, meta: Mapping[str, Any] | None = None) -> None:
    if meta is not None:
        self.meta = meta if type(meta) is Meta else Meta(meta)


class _DalScope:
    """What ``dm.dal()`` returns: a context manager (sync or async) yielding the DAL."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: DataAccessContext) -> None:
        self._ctx = ctx

    def __enter__(self) -> DataAccessLayer:
        self._ctx.__enter__()
        return self._ctx.dal

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self._ctx.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> DataAccessLayer:
        await self._ctx.__aenter__()
        return self._ctx.dal

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return await self._ctx.__aexit__(exc_type, exc, tb)


class _StackView:
    """1.0's ``dm.ctx_stack``: read-only view with ``.top``."""

    __slots__ = ("_dm",)

    def __init__(self, dm: DataManager) -> None:
        self._dm = dm

    @property
    def top(self) -> DataAccessContext | None:
        return self._dm.get_active_context()


_DAL = DataAccessLayer


class DataManager:
    """The registry of services, resources and middleware of an application.

    Make one per process and open a context per unit of work.

    Args:
        resource_manager: a custom :class:`~polydatum.resources.ResourceManager`.
    """

    DataAccessLayer: Callable[..., Any] = DataAccessLayer

    def __init__(self, resource_manager: ResourceManager | None = None) -> None:
        # One ContextVar per DataManager keeps managers (and tests) isolated.
        self._ctx_var = new_stack_var(self)
        self._resource_manager = resource_manager or ResourceManager(self)
        self._middleware: list[Any] = []
        self._middleware_specs: tuple[_factories.Factory, ...] = ()
        cls = type(self)
        self._static_middleware = cls.get_middleware is DataManager.get_middleware
        self._dal: _DAL = self.DataAccessLayer(self)
        self._context_classes: dict[type[DataAccessContext], type[DataAccessContext]] = {}
        if cls.context is DataManager.context and cls.get_dal is DataManager.get_dal:
            # The bound class carries the manager and DAL as class attributes,
            # so ``dm.context()`` is an allocation plus a two-line __init__:
            # every request creates one.
            self.__dict__["context"] = self._bind_context_class(DataAccessContext)
        track(self)

    def _bind_context_class(self, cls: type[DataAccessContext]) -> type[DataAccessContext]:
        """The subclass of ``cls`` this manager's contexts use (with resource accessors)."""
        if cls.__dict__.get("_bound_to") is self:
            return cls
        bound = self._context_classes.get(cls)
        if bound is None:
            namespace: dict[str, Any] = {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
                "_bound_to": self,
            }
            if cls is DataAccessContext:
                namespace.update(
                    __init__=_bound_init, data_manager=self, dal=self._dal, meta=EMPTY_META
                )
            namespace["_push_ctx"] = staticmethod(self._ctx_var.set)
            namespace["_specs"] = getattr(self._resource_manager, "_specs", None)
            for name in getattr(self._resource_manager, "_resources", ()):
                namespace[name] = ResourceAttribute(name)
            bases: tuple[type, ...] = (cls,)
            if resource_warnings_shown():
                bases = (cls, WarnIfCollectedOpen)
            bound = type(cls.__name__, bases, namespace)
            self._context_classes[cls] = bound
            self._update_plain()
        return bound

    def _update_plain(self) -> None:
        plain = self._static_middleware and not self._middleware_specs
        for bound in getattr(self, "_context_classes", {}).values():
            bound._plain = plain and not bound._has_legacy_hooks

    def _add_resource_attributes(self, names: Iterable[str]) -> None:
        classes = getattr(self, "_context_classes", {})
        for name in names:
            for bound in classes.values():
                if not isinstance(bound.__dict__.get(name), ResourceAttribute):
                    setattr(bound, name, ResourceAttribute(name))

    # -- registration --------------------------------------------------------

    def register_context_middleware(self, *middleware: Any) -> None:
        """Add context middleware, in order of execution.

        Each is a generator callable taking the context and yielding once
        (or an async generator, for async contexts).

        Raises:
            InvalidMiddleware: if one is not such a callable.
        """
        specs = [self._middleware_factory(m) for m in middleware]
        self._middleware.extend(middleware)
        self._middleware_specs = (*self._middleware_specs, *specs)
        self._update_plain()

    @staticmethod
    def _middleware_factory(m: Any) -> _factories.Factory:
        spec = _factories.as_factory(m)
        if spec is None:
            msg = f"context middleware must be {_factories.ACCEPTED}; got {_factories.describe(m)}"
            raise InvalidMiddleware(msg)
        return spec

    def get_middleware(self, context: DataAccessContext) -> list[Any]:
        """All context middleware in order of execution (override to vary it per context)."""
        return self._middleware

    def _dynamic_middleware(self, context: DataAccessContext) -> tuple[_factories.Factory, ...]:
        return tuple(self._middleware_factory(m) for m in self.get_middleware(context))

    def register_method_middleware(self, *middleware: Any) -> None:
        """Add method middleware around every DAL call, outermost first.

        Each is a callable ``(request, handler) -> result``; a class is
        instantiated once.

        .. versionadded:: 2.0
        """
        self._dal.add_middleware(*middleware)

    def register_resources(self, **resources: Any) -> None:
        """Register resources by name (see :mod:`polydatum.resources`)."""
        self._resource_manager.register_resources(**resources)
        self._add_resource_attributes(resources)

    def replace_resource(self, key: str, resource: Any) -> None:
        """Replace the resource ``key`` (tests, alternative implementations)."""
        self._resource_manager.replace_resource(key, resource)
        self._add_resource_attributes([key])

    def register_services(self, **services: Any) -> None:
        """Register services by name on the DAL."""
        self._dal.register_services(**services)

    def replace_service(self, key: str, service: Any) -> None:
        """Replace the service ``key`` (tests, alternative implementations)."""
        self._dal.replace_service(key, service)

    def get_resource(self, name: str) -> Any:
        """The registered resource factory ``name``, or None."""
        if name in self._resource_manager:
            return self._resource_manager[name]
        return None

    def get_dal(self) -> _DAL:
        """This DataManager's DataAccessLayer."""
        return self._dal

    # -- contexts ------------------------------------------------------------

    def context(self, meta: Mapping[str, Any] | None = None) -> DataAccessContext:
        """A new, not yet entered context: ``with dm.context(meta) as ctx:``."""
        return DataAccessContext(self, meta=meta)

    def dal(self, meta: Mapping[str, Any] | None = None) -> _DalScope:
        """Open a new context and give its DAL: ``with dm.dal(meta) as dal:``.

        Works with ``async with`` too.
        """
        return _DalScope(self.context(meta))

    def get_active_context(self) -> DataAccessContext | None:
        """The innermost open context of this thread or task, or None."""
        ctx = self._ctx_var.get()
        return ctx if ctx._state == OPEN else None

    def require_active_context(self) -> DataAccessContext:
        """The innermost open context of this thread or task.

        Raises:
            NoActiveContextError: when none is open (a ``RuntimeError``).
            ContextStateError: when the context this task inherited has exited.
        """
        ctx = self._ctx_var.get()
        if ctx._state != OPEN:
            raise no_context_error(ctx)
        return ctx  # type: ignore[no-any-return]

    @property
    def ctx_stack(self) -> _StackView:
        """1.0 compatibility: ``dm.ctx_stack.top`` is the active context."""
        return _StackView(self)

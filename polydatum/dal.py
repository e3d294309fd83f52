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
from typing import Any, Generic, Literal, TypeVar

from polydatum import _factories, _invalidation
from polydatum._commands import (
    Command,
    DalCommand,
    DalCommandRequest,
    PathSegment,
    dal_method_resolver_middleware,
    handle_dal_method,
)
from polydatum._generics import CtxT, DalT
from polydatum._legacy import ContextStack, track
from polydatum._stack import CLOSING, OPEN, new_stack_var, no_context_error
from polydatum._wiring import ContextClasses, Wiring
from polydatum.context import DataAccessContext
from polydatum.errors import (
    AlreadyExistsException,
    DalMethodError,
    InvalidMiddleware,
    InvalidResource,
    NoActiveContextError,
)
from polydatum.observer import Observer
from polydatum.resources import ResourceManager
from polydatum.services import check_service

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["DataAccessLayer", "DataManager"]

Handler = Callable[[DalCommandRequest], Any]

# Attribute names of the DAL itself; never turned into commands.
_DAL_ATTRS = frozenset(
    {
        "_services",
        "_data_manager",
        "_handler",
        "_middleware",
        "_default_middleware",
        "_base_handler",
        "_direct",
        "_async_chain",
        "_by_string",
        "_fast_capable",
        "_observer",
    }
)
# dal.<name> is kept as an attribute only for registered names, so that a
# stream of unknown names (from a routing table, from a client) cannot grow it.
_MAX_STRING_PATHS = 1024


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
        self._observer: Observer | None = None
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
            if _factories.is_async_callable(m):
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
        _invalidation.bump()

    @staticmethod
    def _instantiate(m: Any) -> Any:
        if inspect.isclass(m):
            m = m()
        if not callable(m):
            msg = (
                f"method middleware must be a callable (request, handler) -> result (called "
                f"by keyword: name its parameters request and handler), "
                f"or a class whose instances are; got {_factories.describe(m)}"
            )
            raise InvalidMiddleware(msg)
        return m

    def add_middleware(self, *middleware: Any, outermost: bool = False) -> None:
        """Append method middleware inside the existing ones (outermost first).

        Args:
            outermost: put them outside the existing ones instead, so that
                every method middleware, registered before or after, runs
                inside them (instrumentation uses this).

        .. versionadded:: 2.0
        """
        if outermost:
            self._build_chain([*middleware, *self._middleware])
        else:
            self._build_chain([*self._middleware, *middleware])

    def remove_middleware(self, middleware: Any) -> None:
        """Remove a method middleware added earlier (the very object that was added).

        Raises:
            ValueError: if it is not registered.

        .. versionadded:: 2.0
        """
        kept = [m for m in self._middleware if m is not middleware]
        if len(kept) == len(self._middleware):
            msg = f"method middleware {_factories.describe(middleware)} is not registered; nothing to remove"
            raise ValueError(msg)
        self._build_chain(kept)

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
        """Register ``service`` under ``key``, replacing any previous one (tests).

        Returns:
            ``service``, set up (as in 1.0; :meth:`DataManager.replace_service`
            returns the one replaced).
        """
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
        _invalidation.bump()
        return service

    # -- calls -------------------------------------------------------------

    def _new_command(self, path: tuple[PathSegment, ...]) -> DalCommand:
        if self._fast_capable:
            return Command(self, path)
        return DalCommand(self._call, path)

    def __getattr__(self, name: str) -> DalCommand:
        if name[:2] == "__" or name in _DAL_ATTRS:
            raise AttributeError(name)
        command = self._new_command((PathSegment(name),))
        if self._fast_capable and name in self._services:
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
        self, ctx: DataAccessContext, command: Command, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        observer = self._observer
        if observer is not None:
            # The state is the observer's own only if it saw this context enter.
            if ctx._observer is observer:
                if ctx._unobserved_calls:
                    return command.proceed(ctx, args, kwargs)
                state = ctx._observed
            else:
                state = None
            return observer.dal_call(ctx, state, command.path, command.proceed, args, kwargs)
        return self._dispatch_chain(ctx, command, args, kwargs)

    def _dispatch_chain(
        self, ctx: DataAccessContext, command: Command, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # Command.proceed's chain branch, inline: S6 (method middleware) is this
        # path; a command's route calls it directly while no observer is set.
        request = DalCommandRequest(ctx, command.path, args, kwargs)
        request._command = command
        if self._async_chain and not ctx._async:
            self._refuse_sync(request)
        return self._handler(request)

    def _run_chain(self, ctx: DataAccessContext, request: DalCommandRequest) -> Any:
        observer = self._observer
        if observer is not None:
            handler = self._handler

            def proceed(ctx: DataAccessContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                request.args, request.kwargs = args, kwargs
                return handler(request)

            if self._async_chain and not ctx._async:
                self._refuse_sync(request)
            state = ctx._observed if ctx._observer is observer else None
            return observer.dal_call(ctx, state, request.path, proceed, request.args, request.kwargs)
        if self._async_chain and not ctx._async:
            self._refuse_sync(request)
        return self._handler(request)

    def _set_observer(self, observer: Observer | None) -> None:
        # Commands on the direct route never look for an observer: re-route them.
        self._observer = observer
        _invalidation.bump()

    @staticmethod
    def _refuse_sync(request: DalCommandRequest) -> None:
        msg = (
            f"dal.{request.path_name}: the DAL has async method middleware, so calls must "
            'be awaited inside "async with dm.context():"'
        )
        raise NoActiveContextError(msg)


class _DalScope(Generic[DalT]):
    """What ``dm.dal()`` returns: a context manager (sync or async) yielding the DAL.

    Like 1.0's ``@contextmanager``-based ``dm.dal()``, it also decorates a
    function: every call then runs in a context of its own. To type
    checkers it yields the application's declaration of its services.
    """

    __slots__ = ("_ctx",)

    def __init__(self, ctx: DataAccessContext) -> None:
        self._ctx = ctx

    def __enter__(self) -> DalT:
        self._ctx.__enter__()
        return self._ctx.dal  # type: ignore[no-any-return]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        return self._ctx.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> DalT:
        await self._ctx.__aenter__()
        return self._ctx.dal  # type: ignore[no-any-return]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        return await self._ctx.__aexit__(exc_type, exc, tb)

    def __call__(self, func: F) -> F:
        """Decorate ``func``: each call runs inside a new context with this meta.

        .. versionadded:: 2.0
        """
        return self._ctx(func)


_DAL = DataAccessLayer


def _custom_lookup(manager: Any) -> bool:
    """Whether a resource manager answers lookups its own way (1.0 allowed subclasses)."""
    cls = type(manager)
    return not isinstance(manager, ResourceManager) or (
        cls.__getitem__ is not ResourceManager.__getitem__
        or cls.__contains__ is not ResourceManager.__contains__
    )


class DataManager(Generic[DalT, CtxT]):
    """The registry of services, resources and middleware of an application.

    Make one per process and open a context per unit of work.

    Generic, for type checkers only, over the application's declaration of
    its services and its context class: ``DataManager[Dal, Ctx]()`` makes
    ``with dm.dal() as dal:`` give ``dal.users`` the type ``Users`` (see
    docs/typing.md). ``DataManager()`` keeps 1.0's untyped DAL.

    Args:
        resource_manager: a custom :class:`~polydatum.resources.ResourceManager`.
            One that overrides ``__contains__``/``__getitem__`` (like a
            DataManager subclass overriding :meth:`get_resource`) is asked
            for every resource a context creates, as in 1.0.

    Attributes:
        wiring: what this manager's contexts read from it, a frozen
            :class:`~polydatum._wiring.Wiring` rebuilt on every registration.
    """

    DataAccessLayer: Callable[..., Any] = DataAccessLayer

    def __init__(self, resource_manager: ResourceManager | None = None) -> None:
        # One ContextVar per DataManager keeps managers (and tests) isolated.
        self._stack_var = new_stack_var(self)
        self._resource_manager = resource_manager if resource_manager is not None else ResourceManager(self)
        self._middleware: list[Any] = []
        self._middleware_specs: tuple[_factories.Factory, ...] = ()
        self._observer: Observer | None = None
        cls = type(self)
        self._lookup_resources = cls.get_resource is not DataManager.get_resource or _custom_lookup(
            self._resource_manager
        )
        self._static_middleware = cls.get_middleware is DataManager.get_middleware
        self._dal: _DAL = self.DataAccessLayer(self)
        self.wiring = self._new_wiring()
        self._classes = ContextClasses(self, self.wiring)
        if cls.context is DataManager.context and cls.get_dal is DataManager.get_dal:
            # The bound class carries the manager and DAL as class attributes,
            # so ``dm.context()`` is an allocation plus a two-line __init__:
            # every request creates one.
            self.__dict__["context"] = self._classes.bind(DataAccessContext)
        track(self)

    # -- the seam to the contexts ---------------------------------------------

    def _new_wiring(self) -> Wiring:
        if self._lookup_resources:
            resources: dict[str, _factories.Factory] = {}
        else:
            manager = self._resource_manager
            resources = {name: self._normalise(name, manager[name]) for name in manager}
        specs = self._middleware_specs
        return Wiring(
            stack=self._stack_var,
            middleware=specs,
            middleware_for=None if self._static_middleware else self._dynamic_middleware,
            resources=resources,
            resource_for=self._looked_up if self._lookup_resources else None,
            observer=self._observer,
            lean=self._static_middleware and not specs,
            plain=self._static_middleware and not specs and self._observer is None,
        )

    def _rewire(self) -> None:
        self.wiring = self._new_wiring()
        self._classes.rewire(self.wiring)

    @staticmethod
    def _normalise(name: str, resource: Any) -> _factories.Factory:
        spec = _factories.as_factory(resource)
        if spec is None:
            msg = f"resource {name!r} must be {_factories.ACCEPTED}; got {_factories.describe(resource)}"
            raise InvalidResource(msg)
        return spec

    def _looked_up(self, name: str) -> _factories.Factory | None:
        resource = self.get_resource(name)
        return None if resource is None else self._normalise(name, resource)

    def bind_context_class(self, cls: type[DataAccessContext]) -> type[DataAccessContext]:
        """The subclass of ``cls`` this manager's contexts use (it carries the wiring).

        :class:`~polydatum.context.DataAccessContext` calls it on creation;
        you need it only to build contexts of your own class by hand.

        .. versionadded:: 2.0
        """
        return self._classes.bind(cls)

    @property
    def observer(self) -> Observer | None:
        """The :class:`~polydatum.observer.Observer` set with :meth:`set_observer`, or None.

        .. versionadded:: 2.0
        """
        return self._observer

    def set_observer(self, observer: Observer | None) -> None:
        """Tell ``observer`` about every context and DAL call from now on (None: stop).

        See :mod:`polydatum.observer`. A manager has one observer at most:
        instrumentation installs one, and uninstrumenting sets None back.

        Raises:
            TypeError: ``observer`` is not an :class:`~polydatum.observer.Observer`.
            ValueError: another observer is already set (set None first).

        .. versionadded:: 2.0
        """
        if observer is not None:
            if not isinstance(observer, Observer):
                msg = f"observer must be a polydatum.observer.Observer; got {_factories.describe(observer)}"
                raise TypeError(msg)
            if self._observer is not None and self._observer is not observer:
                msg = (
                    f"{self!r} already has the observer {self._observer!r}; "
                    "call set_observer(None) first to replace it"
                )
                raise ValueError(msg)
        self._observer = observer
        self._dal._set_observer(observer)
        self._rewire()

    # -- registration --------------------------------------------------------

    def register_context_middleware(self, *middleware: Any, outermost: bool = False) -> None:
        """Add context middleware, in order of execution.

        Each is a generator callable taking the context and yielding once
        (or an async generator, for async contexts, or a
        :class:`~polydatum.resources.Dual` of both).

        Args:
            outermost: set them up before (and tear them down after) the ones
                already registered, so that they see the exception every
                other middleware lets out (instrumentation uses this).

        Raises:
            InvalidMiddleware: if one is not such a callable.

        .. versionchanged:: 2.0
           The ``outermost`` keyword.
        """
        specs = tuple(self._middleware_factory(m) for m in middleware)
        if outermost:
            self._middleware[:0] = middleware
            self._middleware_specs = (*specs, *self._middleware_specs)
        else:
            self._middleware.extend(middleware)
            self._middleware_specs = (*self._middleware_specs, *specs)
        self._rewire()

    def remove_context_middleware(self, middleware: Any) -> None:
        """Remove a context middleware registered earlier (the very object registered).

        Contexts already open keep the middleware they were set up with.

        Raises:
            ValueError: if it is not registered.

        .. versionadded:: 2.0
        """
        if not any(m is middleware for m in self._middleware):
            msg = f"context middleware {_factories.describe(middleware)} is not registered; nothing to remove"
            raise ValueError(msg)
        self._middleware = [m for m in self._middleware if m is not middleware]
        self._middleware_specs = tuple(s for s in self._middleware_specs if s.original is not middleware)
        self._rewire()

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

    def register_method_middleware(self, *middleware: Any, outermost: bool = False) -> None:
        """Add method middleware around every DAL call, outermost first.

        Each is a callable ``(request, handler) -> result``, called with
        both by keyword (``request=``, ``handler=``, as polydatum 1.0 did),
        so its parameters carry those names; a class is instantiated once.

        Args:
            outermost: put them outside the ones already registered.

        .. versionadded:: 2.0
        """
        self._dal.add_middleware(*middleware, outermost=outermost)

    def remove_method_middleware(self, middleware: Any) -> None:
        """Remove a method middleware registered earlier (the very object registered).

        Raises:
            ValueError: if it is not registered.

        .. versionadded:: 2.0
        """
        self._dal.remove_middleware(middleware)

    def get_method_middleware(self) -> list[Any]:
        """The method middleware around every DAL call, outermost first (a copy).

        .. versionadded:: 2.0
        """
        return list(self._dal._middleware)

    def register_resources(self, **resources: Any) -> None:
        """Register resources by name (see :mod:`polydatum.resources`)."""
        self._resource_manager.register_resources(**resources)
        self._rewire()

    def replace_resource(self, key: str, resource: Any) -> Any:
        """Replace the resource ``key`` (tests, alternative implementations).

        Returns:
            the resource registered there before, or None.

        .. versionchanged:: 2.0
           Returns the replaced resource.
        """
        previous = self.get_resource(key)
        self._resource_manager.replace_resource(key, resource)
        self._rewire()
        return previous

    def register_services(self, **services: Any) -> None:
        """Register services by name on the DAL."""
        self._dal.register_services(**services)

    def replace_service(self, key: str, service: Any) -> Any:
        """Replace the service ``key``; a dotted key replaces a nested one (tests).

        Returns:
            the service registered there before, or None.

        .. versionchanged:: 2.0
           Returns the replaced service, and takes dotted keys.
        """
        *parents, name = key.split(".")
        if not parents:
            previous = self._dal._services.get(name)
            self._dal.replace_service(name, service)
            return previous
        owner = self.get_service(".".join(parents))
        if owner is None:
            msg = f"no service {'.'.join(parents)!r} to nest {name!r} under; register it first"
            raise LookupError(msg)
        check_service(key, service)
        nested = owner._sub_services() if hasattr(owner, "_sub_services") else owner._services
        previous = nested.get(name)
        service.setup(self)
        nested[name] = service
        _invalidation.bump()
        return previous

    def get_service(self, path: str) -> Any:
        """The service registered at ``path`` (``"users"``, or nested ``"users.profiles"``), or None.

        .. versionadded:: 2.0
        """
        first, *rest = path.split(".")
        service = self._dal._services.get(first)
        for name in rest:
            if service is None:
                return None
            nested = getattr(service, "_services", None)
            service = nested.get(name) if isinstance(nested, dict) else None
        return service

    def get_services(self, path: str = "") -> dict[str, Any]:
        """The services registered at the top (or nested under ``path``), by name.

        A copy: registering goes through :meth:`register_services`.

        .. versionadded:: 2.0
        """
        if not path:
            return dict(self._dal._services)
        nested = getattr(self.get_service(path), "_services", None)
        return dict(nested) if isinstance(nested, dict) else {}

    def get_resource(self, name: str) -> Any:
        """The registered resource factory ``name``, or None.

        A subclass may override it to compute resources; contexts then ask
        it for every resource they create, as in 1.0.
        """
        if name in self._resource_manager:
            return self._resource_manager[name]
        return None

    @property
    def resource_manager(self) -> ResourceManager:
        """The :class:`~polydatum.resources.ResourceManager` holding the resources.

        .. versionadded:: 2.0
        """
        return self._resource_manager

    def get_dal(self) -> _DAL:
        """This DataManager's DataAccessLayer."""
        return self._dal

    # -- contexts ------------------------------------------------------------

    def context(self, meta: Mapping[str, Any] | None = None) -> CtxT:
        """A new, not yet entered context: ``with dm.context(meta) as ctx:``.

        It also decorates a function (``@dm.context()``): every call then
        runs in a new context with this meta.
        """
        return DataAccessContext(self, meta=meta)  # type: ignore[return-value]

    def dal(self, meta: Mapping[str, Any] | None = None) -> _DalScope[DalT]:
        """Open a new context and give its DAL: ``with dm.dal(meta) as dal:``.

        Works with ``async with`` too, and as a decorator (``@dm.dal()``).
        """
        return _DalScope(self.context(meta))

    def get_active_context(self) -> CtxT | None:
        """The innermost context of this thread or task that has not exited, or None.

        A context is active from its entry until it has exited: also while
        it closes (its resources' teardown and its final hook may call the
        DAL, as in 1.0).
        """
        ctx = self._stack_var.get()
        state = ctx._state
        return ctx if state in (OPEN, CLOSING) else None

    def require_active_context(self) -> CtxT:
        """The innermost active context of this thread or task.

        Raises:
            NoActiveContextError: when none is open (a ``RuntimeError``).
            ContextStateError: when the context this task inherited has exited.
        """
        ctx = self._stack_var.get()
        state = ctx._state
        if state not in (OPEN, CLOSING):
            raise no_context_error(ctx)
        return ctx  # type: ignore[no-any-return]

    @property
    def ctx_stack(self) -> ContextStack:
        """1.0 compatibility: the stack of active contexts (``top``, ``push``, ``pop``)."""
        return ContextStack(self)

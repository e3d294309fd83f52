"""DAL commands and how their paths resolve to service methods.

``dal.users.get`` is a :class:`DalCommand`: a path of :class:`PathSegment`
resolved only when it is called. The DAL's own commands (:class:`Command`)
cache how their path resolved, and call the method directly when no method
middleware is registered; otherwise a call becomes a :class:`DalCommandRequest`
that runs through the chain, whose innermost step,
:func:`dal_method_resolver_middleware`, resolves the path and
:func:`handle_dal_method` calls it. The public face of this module is
:mod:`polydatum.middleware`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from polydatum import _invalidation
from polydatum._factories import describe
from polydatum._stack import NO_CONTEXT, OPEN, no_context_error
from polydatum.errors import DalMethodError
from polydatum.services import Service

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.dal import DataAccessLayer

__all__ = [
    "Command",
    "DalCommand",
    "DalCommandRequest",
    "DalMethodError",
    "PathSegment",
    "dal_method_resolver_middleware",
    "dal_resolver",
    "handle_dal_method",
    "resolve",
]


class PathSegment:
    """One name in a DAL path, with optional meta data for middleware.

    ``dal.users.profile.get`` is the path
    ``(PathSegment("users"), PathSegment("profile"), PathSegment("get"))``.
    """

    name: str
    meta: dict[str, Any]

    def __init__(self, name: str, **meta: Any) -> None:
        self.name = name
        self.meta = meta

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PathSegment) and self.name == other.name and self.meta == other.meta

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.meta.items())
        return f"PathSegment({self.name!r}{extra})"


# Inside DalCommand the name PathSegment is its class attribute; annotate with this.
_Segment = PathSegment


def path_name(path: Sequence[PathSegment]) -> str:
    """``users.profile.get`` for a path."""
    return ".".join(segment.name for segment in path)


class DalCommandRequest:
    """A DAL call on its way through the method middleware (mutable).

    Attributes:
        ctx: the active context.
        path: the tuple of :class:`PathSegment` that was called.
        args: positional arguments of the call.
        kwargs: keyword arguments of the call.
        dal_method: the resolved callable, set by the resolver middleware.
    """

    # Set by the DAL's own commands so the resolver can use their cached
    # resolution; None for requests built by hand.
    _command: Any = None

    def __init__(
        self,
        ctx: DataAccessContext,
        path: tuple[PathSegment, ...],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.ctx = ctx
        self.path = path
        self.args = args
        self.kwargs = kwargs
        self.dal_method: Callable[..., Any] | None = None

    @property
    def path_name(self) -> str:
        """The dotted path, e.g. ``"users.get"``.

        .. versionadded:: 2.0
        """
        return path_name(self.path)

    def __repr__(self) -> str:
        return f"<DalCommandRequest {self.path_name}>"


class DalCommand:
    """A deferred DAL call: attribute access extends the path, calling runs it.

    It is not bound to a context, so it can be kept and called later, in
    another context.

    Args:
        handler: called as ``handler(path, *args, **kwargs)``.
        path: the path so far.
    """

    # A subclass may bring its own segment type.
    PathSegment: type[Any] = PathSegment

    def __init__(self, handler: Callable[..., Any], path: tuple[_Segment, ...]) -> None:
        self._handler = handler
        self.path = path

    def __getattr__(self, name: str) -> DalCommand:
        if name[:2] == "__":
            raise AttributeError(name)
        segment: Any = self.PathSegment(name=name)
        return self.__class__(self._handler, (*self.path, segment))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._handler(self.path, *args, **kwargs)

    def __str__(self) -> str:
        return path_name(self.path)

    def __repr__(self) -> str:
        return f"<DalCommand dal.{self}>"


def resolve(
    ctx: DataAccessContext, path: Sequence[PathSegment]
) -> Iterator[tuple[tuple[PathSegment, ...], Any]]:
    """Walk ``path`` from the DAL's services, yielding ``(location, object)``.

    After the first name that does not exist, every further step yields
    ``(location, None)``.
    """
    return _walk(ctx.dal._services, path)


def _walk(
    services: dict[str, Any], path: Sequence[PathSegment]
) -> Iterator[tuple[tuple[PathSegment, ...], Any]]:
    current: Any = services
    location: list[PathSegment] = []
    for index, segment in enumerate(path):
        location.append(segment)
        if current is not None:
            current = services.get(segment.name) if index == 0 else getattr(current, segment.name, None)
        yield tuple(location), current


def _known_names(owner: Any) -> list[str]:
    if isinstance(owner, dict):
        return sorted(owner)
    names = set(getattr(owner, "__dict__", {}).get("_services", {}) or {})
    plumbing = set(dir(Service))
    for name in dir(owner):
        if not name.startswith("_") and name not in plumbing:
            names.add(name)
    return sorted(names)


def _unknown_path_error(
    path: tuple[PathSegment, ...], location: tuple[PathSegment, ...], owner: Any
) -> DalMethodError:
    name = location[-1].name
    where = "dal." + path_name(location[:-1]) if len(location) > 1 else "dal"
    known = _known_names(owner) if owner is not None else []
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    listing = ", ".join(known[:30]) + (", ..." if len(known) > 30 else "")
    msg = f"no {name!r} under {where!r}{hint} Known: {listing or 'nothing registered'}"
    return DalMethodError(path, msg)


# A Service's own methods: not service methods, never callable through a DAL path.
_FRAMEWORK_METHODS = frozenset({"setup", "register_services"})


def resolve_owner(
    services: dict[str, Any], path: tuple[PathSegment, ...], *, callable_only: bool = False
) -> tuple[Any, Any]:
    """Resolve ``path`` to ``(owner, target)``, validating every step.

    ``owner`` is the object holding the last name (the services dict for a
    one-name path), ``target`` what that name refers to now.

    Args:
        services: the DAL's top-level services.
        path: the path to resolve.
        callable_only: refuse a path ending at a service (it is about to be called).

    Raises:
        DalMethodError: naming the first unknown step and the nearest known names.
    """
    if not path:
        raise DalMethodError(path, "an empty DAL path cannot be called; name a service method")
    for index, segment in enumerate(path):
        name = segment.name
        # Paths may come from strings (routing tables, task names): private
        # names and the framework's own methods are never reachable through them.
        if name[:1] == "_" or (name in _FRAMEWORK_METHODS and index == len(path) - 1):
            msg = (
                f"dal.{path_name(path)}: {name!r} is not a service method; names starting with "
                "'_', setup() and register_services() belong to the framework and cannot be "
                "called through the DAL"
            )
            raise DalMethodError(path, msg)
    owner: Any = services
    target: Any = None
    for location, target in _walk(services, path):
        if target is None:
            raise _unknown_path_error(path, location, owner)
        # A service is anything registrable: a Service or an object with setup().
        if not (callable(target) or isinstance(target, Service) or callable(getattr(target, "setup", None))):
            msg = f"dal.{path_name(location)} is {describe(target)}, not a service or method"
            raise DalMethodError(path, msg)
        if len(location) < len(path):
            owner = target
    if callable_only and not callable(target):
        methods = sorted(
            name
            for name in dir(target)
            if not name.startswith("_")
            and name not in _FRAMEWORK_METHODS
            and callable(getattr(target, name, None))
        )
        shown = ", ".join(methods[:8]) or "none"
        msg = f"dal.{path_name(path)} is a service, not a method; call one of its methods ({shown})"
        raise DalMethodError(path, msg)
    return owner, target


def dal_resolver(ctx: DataAccessContext, request_path: Sequence[PathSegment]) -> Any:
    """Resolve a DAL path to the service or method it names.

    Raises:
        DalMethodError: if any step of the path does not exist.
    """
    return resolve_owner(ctx.dal._services, tuple(request_path))[1]


def dal_method_resolver_middleware(
    request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]
) -> Any:
    """The default innermost middleware: set ``request.dal_method``, then continue."""
    command = request._command
    if command is not None and request.path is command.path:
        request.dal_method = command._target_for(request.ctx)
    else:
        request.dal_method = dal_resolver(request.ctx, request.path)
    return handler(request)


def handle_dal_method(request: DalCommandRequest) -> Any:
    """The default handler at the end of the chain: call the resolved method."""
    method = request.dal_method
    if method is None:
        msg = (
            f"DAL method {request.path_name!r} was not resolved; the middleware chain must "
            "include dal_method_resolver_middleware or set request.dal_method"
        )
        raise DalMethodError(request.path, msg)
    if not callable(method):
        msg = f"dal.{request.path_name} is {describe(method)}, not a method; call one of its methods"
        raise DalMethodError(request.path, msg)
    return method(*request.args, **request.kwargs)


# -- the DAL's own commands ---------------------------------------------------


# How a Command runs: ``_route = (owner, steps, method, top)``, the one value
# its fast path reads. It is replaced whole, never mutated, so a call racing a
# registration sees one route or the other, never a mix. Three kinds:
#
#   STALE   steps ()            top() is never open: take the slow path, which
#                               validates the path and sets one of the two below
#   direct  names between       walk owner.<steps...>.<method> and call it (no
#           owner and method    method middleware, no observer)
#   chain   CHAIN               owner is the DAL's bound _dispatch (an observer is
#                               set: it wraps proceed(), the middleware chain or
#                               the method) or _dispatch_chain (none: the chain
#                               itself, S6's path, with no observer test); setting
#                               an observer bumps the routes
#
# A plain tuple, not a NamedTuple: CPython specialises unpacking an exact
# tuple only, and the NamedTuple cost 20-40 ns per DAL call (+12% on S4).
Route = tuple[Any, tuple[str, ...], str, Callable[[], Any]]


def _no_context() -> Any:
    return NO_CONTEXT


class _ChainMarker(tuple):  # type: ignore[type-arg]
    """Truthy ``steps`` value meaning "run the middleware chain"."""


CHAIN: tuple[str, ...] = _ChainMarker(("<chain>",))
STALE: Route = (None, (), "", _no_context)


class Command(DalCommand):
    """The DAL's own commands: children and path resolution are cached.

    The top-level service is pure given the registry, so the route keeps
    it; names below it and the method are looked up at call time, so a
    patched sub-service or method takes effect on the very next call.
    Registry changes reset the route to :data:`STALE`.
    """

    _route: Route = STALE
    _resolved: tuple[int, tuple[str, ...]] | None = None

    def __init__(self, dal: DataAccessLayer, path: tuple[_Segment, ...]) -> None:
        self._handler = dal._call
        self.path = path
        self._dal = dal

    def __getattr__(self, name: str) -> DalCommand:
        if name[:2] == "__":
            raise AttributeError(name)
        child = Command(self._dal, (*self.path, _Segment(name)))
        self.__dict__[name] = child
        return child

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner, steps, method, top = self._route
        ctx = top()
        if ctx._state != OPEN:
            return self._call_slow(args, kwargs)
        if steps:
            if steps is CHAIN:
                return owner(ctx, self, args, kwargs)
            try:
                for step in steps:
                    owner = getattr(owner, step)
            except AttributeError:
                return self._call_slow(args, kwargs)
        if kwargs:
            return getattr(owner, method)(*args, **kwargs)
        return getattr(owner, method)(*args)  # no empty dict built and merged: 15-25 ns a call

    def _call_slow(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        dal = self._dal
        dm = dal._data_manager
        if dm is None:
            raise no_context_error(NO_CONTEXT, f"dal.{self}")
        ctx = dm.get_active_context()
        if ctx is None:
            raise no_context_error(dm.wiring.stack.get(), f"dal.{self}")
        if not dal._direct or dal._observer is not None:
            # Calls go through the observer or the middleware chain; the resolver caches the target.
            dispatch = dal._dispatch if dal._observer is not None else dal._dispatch_chain
            self._route = (dispatch, CHAIN, "", dm.wiring.stack.get)
            _invalidation.track(self)
            return dal._dispatch(ctx, self, args, kwargs)
        _, target = resolve_owner(dal._services, self.path, callable_only=True)
        names = self._names()
        self._route = (dal._services[names[0]], names[1:-1], names[-1], dm.wiring.stack.get)
        _invalidation.track(self)
        if ctx._state != OPEN:
            # Closing (a resource's teardown or a final hook calls the DAL):
            # the route is for open contexts, so call what was just resolved.
            return target(*args, **kwargs)
        return self(*args, **kwargs)

    def proceed(self, ctx: DataAccessContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the call in ``ctx``: the method middleware chain, or the method when there is none."""
        dal = self._dal
        if dal._direct:
            if kwargs:
                return self._target_for(ctx)(*args, **kwargs)
            return self._target_for(ctx)(*args)
        request = DalCommandRequest(ctx, self.path, args, kwargs)
        request._command = self
        if dal._async_chain and not ctx._async:
            dal._refuse_sync(request)
        return dal._handler(request)

    def _names(self) -> tuple[str, ...]:
        return tuple(segment.name for segment in self.path)

    def _invalidate(self) -> None:
        self._route = STALE
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
        if resolved is None or resolved[0] != _invalidation.version:
            _, target = resolve_owner(services, self.path, callable_only=True)
            self._resolved = (_invalidation.version, self._names())
            _invalidation.track(self)
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

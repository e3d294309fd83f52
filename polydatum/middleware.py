"""DAL commands and method middleware.

``dal.users.get`` is a :class:`DalCommand`: a path of :class:`PathSegment`
that is resolved only when it is called. A call becomes a
:class:`DalCommandRequest` that runs through the method middleware chain,
outermost first; the default innermost middleware,
:func:`dal_method_resolver_middleware`, resolves the path to a service method
and :func:`handle_dal_method` calls it.

A method middleware is any callable ``(request, handler) -> result``::

    def audit(request, handler):
        log.info("calling %s as %s", request.path_name, request.ctx.meta.user)
        return handler(request)

    dm.register_method_middleware(audit)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from polydatum._factories import describe
from polydatum.errors import DalMethodError
from polydatum.services import Service

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext

__all__ = [
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
        return (
            isinstance(other, PathSegment) and self.name == other.name and self.meta == other.meta
        )

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
        # names and the framework's setup() are never reachable through them.
        if name[:1] == "_" or (name == "setup" and index == len(path) - 1):
            msg = (
                f"dal.{path_name(path)}: {name!r} is not a service method; names starting with "
                "'_' and setup() belong to the framework and cannot be called through the DAL"
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
            name for name in dir(target)
            if not name.startswith("_") and name != "setup" and callable(getattr(target, name, None))
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

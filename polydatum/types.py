"""The shapes polydatum accepts, as Protocols (for type checkers and docs).

.. versionadded:: 2.0
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.middleware import DalCommandRequest

__all__ = [
    "AsyncContextMiddleware",
    "AsyncResourceFactory",
    "ContextMiddleware",
    "MethodHandler",
    "MethodMiddleware",
    "ResourceFactory",
    "ResourceRegistry",
]

T_co = TypeVar("T_co", covariant=True)


@runtime_checkable
class ResourceFactory(Protocol[T_co]):
    """**Protocol:** ``factory(ctx)`` returns a generator yielding the resource once."""

    def __call__(self, context: DataAccessContext, /) -> Generator[T_co, None, None]: ...


@runtime_checkable
class AsyncResourceFactory(Protocol[T_co]):
    """**Protocol:** ``factory(ctx)`` returns an async generator yielding the resource once."""

    def __call__(self, context: DataAccessContext, /) -> AsyncGenerator[T_co, None]: ...


@runtime_checkable
class ContextMiddleware(Protocol):
    """**Protocol:** ``middleware(ctx)`` returns a generator yielding once around the body."""

    def __call__(self, context: DataAccessContext, /) -> Generator[Any, None, None]: ...


@runtime_checkable
class AsyncContextMiddleware(Protocol):
    """**Protocol:** the async twin of :class:`ContextMiddleware`."""

    def __call__(self, context: DataAccessContext, /) -> AsyncGenerator[Any, None]: ...


class MethodHandler(Protocol):
    """**Protocol:** the rest of the chain: ``handler(request) -> result``."""

    def __call__(self, request: DalCommandRequest, /) -> Any: ...


@runtime_checkable
class MethodMiddleware(Protocol):
    """**Protocol:** ``middleware(request=..., handler=...) -> result`` around every DAL call (by keyword)."""

    def __call__(self, request: DalCommandRequest, handler: MethodHandler) -> Any: ...


@runtime_checkable
class ResourceRegistry(Protocol):
    """**Protocol:** what an integration's ``install(dm, ...)`` registers on.

    A :class:`~polydatum.dal.DataManager` is one. An integration's
    ``install`` takes it as its first argument, named ``dm``, and returns the
    integration object itself, so ``db = Database(url).install(dm)`` works.

    .. versionadded:: 2.0
    """

    def register_resources(self, **resources: Any) -> None:
        """Register resources by name (see :mod:`polydatum.resources`)."""

    def register_context_middleware(self, *middleware: Any) -> None:
        """Add context middleware, in order of execution."""

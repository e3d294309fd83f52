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
    """**Protocol:** ``middleware(request, handler) -> result`` around every DAL call."""

    def __call__(self, request: DalCommandRequest, handler: MethodHandler) -> Any: ...

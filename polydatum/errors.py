"""Exceptions raised by polydatum.

The hierarchy::

    PolydatumException
    ├── ServiceError                 code 500: a service could not do its job
    │   ├── NotFound                 code 404
    │   └── ConcurrencyConflict      code 409: a stale write lost a race
    ├── AlreadyExistsException       duplicate registration, or a record that exists
    ├── NoActiveContextError         (also a RuntimeError and an AssertionError)
    ├── ContextStateError            (also a RuntimeError): re-entered or exited context
    ├── DalMethodError               an unknown DAL path
    ├── MiddlewareException
    │   ├── MiddlewareSetupException
    │   └── InvalidMiddleware        (also a TypeError)
    ├── ResourceException
    │   ├── ResourceSetupException
    │   └── InvalidResource          (also a TypeError)
    └── ErrorsOnClose                deprecated since 0.8.4

Where callers of polydatum 1.0 already caught a builtin (``RuntimeError`` when
no context is active), the new class keeps that builtin as a second base.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PolydatumException(Exception):
    """Base class of every exception polydatum raises on purpose."""


class ServiceError(PolydatumException):
    """A service could not do what was asked; ``code`` maps it to an HTTP status."""

    code = 500


class NotFound(ServiceError):
    """The requested object does not exist (HTTP 404)."""

    code = 404


class AlreadyExistsException(PolydatumException):
    """A service, resource or record with that name or key already exists (HTTP 409)."""

    code = 409


class ConcurrencyConflict(ServiceError):
    """A write was based on a stale version of a record (HTTP 409).

    The context that raises it rolls back; retrying the unit of work with
    fresh data is the usual answer.

    .. versionadded:: 2.0
    """

    code = 409


class NoActiveContextError(PolydatumException, RuntimeError, AssertionError):
    """Raised when the DAL, a service's ``_ctx`` or a resource is used outside a context.

    It is a ``RuntimeError`` (what ``require_active_context()`` raised in 1.0)
    and an ``AssertionError`` (what DAL access outside a context raised in 1.0).

    .. versionadded:: 2.0
    """


class ContextStateError(PolydatumException, RuntimeError):
    """A context was used in a state that does not allow it (entered twice, used after exit).

    .. versionadded:: 2.0
    """


class DalMethodError(PolydatumException):
    """A DAL path does not lead to a service method.

    Attributes:
        path: the tuple of :class:`~polydatum.middleware.PathSegment` that failed.
    """

    def __init__(self, path: Sequence[Any] | None = None, message: str | None = None) -> None:
        self.path = tuple(path) if path is not None else None
        if message is None:
            names = ".".join(getattr(p, "name", str(p)) for p in self.path or ())
            message = f"Invalid dal method: {names}"
        super().__init__(message)


class ErrorsOnClose(PolydatumException):
    """Deprecated since 0.8.4: resource exit errors are collected, not raised."""

    def __init__(self, message: str, exceptions: Sequence[Any]) -> None:
        super().__init__(message)
        self.message = message
        self.exceptions = exceptions

    def __str__(self) -> str:
        return f"<{self.__class__.__name__} {self.message}: {self.exceptions}>"


class MiddlewareException(PolydatumException):
    """Base class for context and method middleware problems."""


class MiddlewareSetupException(MiddlewareException):
    """A context middleware finished without yielding during setup."""


class InvalidMiddleware(MiddlewareException, TypeError):
    """Something that is not usable as middleware was registered."""


class ResourceException(PolydatumException):
    """Base class for resource problems."""


class ResourceSetupException(ResourceException):
    """A resource finished without yielding during setup."""


class InvalidResource(ResourceException, TypeError):
    """Something that is not a resource factory was registered as one.

    .. versionadded:: 2.0
    """

"""Exceptions raised by polydatum.

The hierarchy::

    PolydatumException
    ├── ServiceError                 code 500: a service could not do its job
    │   ├── NotFound                 code 404
    │   ├── InvalidInput             code 400 (also a ValueError): a client's value refused
    │   └── ConcurrencyConflict      code 409: a stale write lost a race
    │   ├── BlobError                polydatum.blob: the store could not do it (and its subclasses)
    │   └── ...                      (an integration's ServiceErrors)
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
    ├── EffectDeferred               an outbox handler did not try now; no attempt counted
    ├── ReadOnlyError                a write through a read-only session or dataset
    ├── DatasetError                 (also a ValueError): a dataset source or file refused
    ├── ReplicaMismatch              (also a ValueError): a replica of another cluster
    ├── TaskNotSent                  (also a RuntimeError): a Celery task not sent (yet)
    ├── CacheError                   polydatum.cache: the cache failed (and its subclasses)
    ├── SyncError                    polydatum.sync: a sync could not go on (and its subclasses)
    └── ErrorsOnClose                deprecated since 0.8.4

The integrations' errors are importable from here too (``from
polydatum.errors import BlobNotFound``), each the same class as in its own
module. Those of an integration are imported on first use, so naming one
never imports a third-party package it does not need; ``PoolTimeout``
(a ``redis.RedisError`` too) needs redis-py and is therefore left out of
``__all__``. Two web signals sit outside the tree: ``RollbackResponse``
(raise it to answer and roll back) and ``ResponseIncomplete`` (a response
the server did not finish sending).

Where callers of polydatum 1.0 already caught a builtin (``RuntimeError`` when
no context is active), the new class keeps that builtin as a second base.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from polydatum._web import ResponseIncomplete, RollbackResponse
    from polydatum.blob import (
        BlobError,
        BlobNotFound,
        BlobStoreUnavailable,
        InvalidKey,
        InvalidMetadata,
        UrlNotSupported,
    )
    from polydatum.cache import (
        CacheBusy,
        CacheError,
        CacheUnavailable,
        CounterError,
        ItemTooLarge,
        LockError,
        LockExpired,
        LockNotAcquired,
        RecordExists,
        RecordMissing,
        SerializationError,
        UpdateConflict,
    )
    from polydatum.redis import PoolTimeout as PoolTimeout
    from polydatum.sync import ApplyError, DuplicateKey, FingerprintError, SyncError, UnsortedInput

__all__ = [
    "AlreadyExistsException",
    "ApplyError",
    "BlobError",
    "BlobNotFound",
    "BlobStoreUnavailable",
    "CacheBusy",
    "CacheError",
    "CacheUnavailable",
    "ConcurrencyConflict",
    "ContextStateError",
    "CounterError",
    "DalMethodError",
    "DatasetError",
    "DuplicateKey",
    "EffectDeferred",
    "ErrorsOnClose",
    "FingerprintError",
    "InvalidInput",
    "InvalidKey",
    "InvalidMetadata",
    "InvalidMiddleware",
    "InvalidResource",
    "ItemTooLarge",
    "LockError",
    "LockExpired",
    "LockNotAcquired",
    "MiddlewareException",
    "MiddlewareSetupException",
    "NoActiveContextError",
    "NotFound",
    "PolydatumException",
    "ReadOnlyError",
    "RecordExists",
    "RecordMissing",
    "ReplicaMismatch",
    "ResourceException",
    "ResourceSetupException",
    "ResponseIncomplete",
    "RollbackResponse",
    "SerializationError",
    "ServiceError",
    "SyncError",
    "TaskNotSent",
    "UnsortedInput",
    "UpdateConflict",
    "UrlNotSupported",
]


class PolydatumException(Exception):
    """Base class of every exception polydatum raises on purpose."""


class ServiceError(PolydatumException):
    """A service could not do what was asked; ``code`` maps it to an HTTP status.

    The web middleware answers it with ``code`` and a JSON body whose
    ``message`` is :attr:`public_message`; the full message goes to the log.

    Args:
        *args: the message (what ``str(exc)`` and the log show).
        public_message: the text a client may see instead, when the message
            holds details that must stay on the server (a path, a host, a
            bucket, a table). Omitted: clients see the message itself.

    .. versionchanged:: 2.0
       ``public_message``.
    """

    code = 500
    # The class default, so a subclass whose __init__ skips ours still works.
    _public_message: str | None = None

    def __init__(self, *args: object, public_message: str | None = None) -> None:
        super().__init__(*args)
        if public_message is not None:
            self._public_message = public_message

    @property
    def public_message(self) -> str:
        """What a client may be shown: the ``public_message`` given, else the message.

        ``NotFound(f"no note {note_id}")`` shows its message to clients as it
        is; errors polydatum raises with server details in their message (a
        blob store's root or bucket, an endpoint URL, a table) carry a short
        safe text here instead. A subclass may fix the text for all its
        errors with a class attribute: ``public_message = "payments are
        down; try again later"``.

        .. versionadded:: 2.0
        """
        if self._public_message is not None:
            return self._public_message
        return str(self)


class NotFound(ServiceError):
    """The requested object does not exist (HTTP 404)."""

    code = 404


class InvalidInput(ServiceError, ValueError):
    """A value that came from a client (a filter, a page cursor, a form field) was refused (HTTP 400).

    It is a ``ValueError``, so code that validates input with ``except
    ValueError`` keeps working; the web middleware answers it with 400. Its
    message names what was wrong and never repeats a secret.

    .. versionadded:: 2.0
    """

    code = 400


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


class EffectDeferred(PolydatumException):
    """An outbox effect's handler did not try to deliver: its target is known to be down.

    Raised from a handler (``@outbox.handler``, the Celery sender while it
    waits after a failed connection), it puts the row back for
    ``retry_after`` seconds without counting an attempt, so a row is
    dead-lettered only after ``max_attempts`` real tries.

    Args:
        message: why, for the row's ``last_error``.
        retry_after: seconds before the row is due again (at least 0; 0: due at once).

    .. versionadded:: 2.0
    """

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = max(0.0, float(retry_after))


class ReadOnlyError(PolydatumException):
    """A write was attempted through a read-only session, context or dataset.

    Raised by :mod:`polydatum.sqlalchemy` (importable from there too).

    .. versionadded:: 2.0
    """


class DatasetError(PolydatumException, ValueError):
    """A source does not fit its model, or a dataset cannot be built or read as asked.

    The message says where (the source's file name, never its folder; the
    line, or the item of an iterable; the column) and what to fix. Raised by
    :mod:`polydatum.sqlalchemy` (importable from there too).

    Attributes:
        source: the file name, or ``"<Model> rows"`` for an iterable; None
            when the error is about the dataset itself.
        line: the line of the file (the item of an iterable, from 1), or None.
        column: the column's name, or None.

    .. versionadded:: 2.0
    """

    def __init__(
        self, problem: str, *, source: str | None = None, line: int | None = None, column: str | None = None
    ) -> None:
        self.source = source
        self.line = line
        self.column = column
        self.problem = problem
        position = None
        if line is not None:
            position = f"item {line}" if source is not None and source.endswith(" rows") else f"line {line}"
        where = [part for part in (source, position, column and f"column {column!r}") if part]
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


class ReplicaMismatch(PolydatumException, ValueError):
    """A replica URL names a server that is not a copy of the primary's cluster.

    Raised by :mod:`polydatum.sqlalchemy` (importable from there too).

    .. versionadded:: 2.0
    """


class TaskNotSent(PolydatumException, RuntimeError):
    """The result of a task that was not sent (yet, or ever) was asked for.

    A task sent inside a context is sent when that context commits; one sent
    in a context that rolled back is never sent. Raised by
    :mod:`polydatum.celery` (importable from there too).

    .. versionadded:: 2.0
    """


# Errors defined next to the code that raises them, served from here on first
# use: importing them eagerly would import every integration (and, for
# PoolTimeout, redis-py) with the core.
_ELSEWHERE = {
    "polydatum.blob": (
        "BlobError",
        "BlobNotFound",
        "BlobStoreUnavailable",
        "InvalidKey",
        "InvalidMetadata",
        "UrlNotSupported",
    ),
    "polydatum.cache": (
        "CacheBusy",
        "CacheError",
        "CacheUnavailable",
        "CounterError",
        "ItemTooLarge",
        "LockError",
        "LockExpired",
        "LockNotAcquired",
        "RecordExists",
        "RecordMissing",
        "SerializationError",
        "UpdateConflict",
    ),
    "polydatum.redis": ("PoolTimeout",),
    "polydatum.sync": ("ApplyError", "DuplicateKey", "FingerprintError", "SyncError", "UnsortedInput"),
    "polydatum._web": ("ResponseIncomplete", "RollbackResponse"),
}
_HOME = {name: module for module, names in _ELSEWHERE.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        msg = f"module 'polydatum.errors' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})

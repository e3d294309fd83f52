"""Exceptions of :mod:`polydatum.cache`."""

from __future__ import annotations

from polydatum.errors import PolydatumException


class CacheError(PolydatumException):
    """Base class of the errors raised by :mod:`polydatum.cache` and its backends.

    .. versionadded:: 2.0
    """


class SerializationError(CacheError, TypeError):
    """A value cannot be stored with the cache's serializer; the message names its type.

    .. versionadded:: 2.0
    """


class CacheUnavailable(CacheError):
    """The backend could not be reached (raised only with ``on_unavailable="raise"``).

    .. versionadded:: 2.0
    """


class CounterError(CacheError, ValueError):
    """``incr``/``decr`` was used on a value that is not an integer counter.

    .. versionadded:: 2.0
    """


class LockError(CacheError):
    """Base class of lock failures.

    .. versionadded:: 2.0
    """


class LockNotAcquired(LockError, TimeoutError):
    """Another holder kept the lock for longer than ``blocking_timeout``.

    .. versionadded:: 2.0
    """


class LockExpired(LockError):
    """The lock expired (``timeout`` passed) before it was released.

    .. versionadded:: 2.0
    """

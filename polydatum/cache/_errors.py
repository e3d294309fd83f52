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


class ItemTooLarge(CacheError, ValueError):
    """A value is larger than the backend stores in one item (memcached's ``-I``).

    The message names the limit and what to change.

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


class CacheBusy(CacheError):
    """The backend is up, but no connection to it came free in time (a full pool).

    Unlike :class:`CacheUnavailable` it is raised whatever ``on_unavailable``
    says and never puts the cache in degraded mode: nothing is wrong with the
    backend, this process runs more operations at once than its pool holds.

    .. versionadded:: 2.0
    """


class RecordExists(CacheError):
    """``create`` found a record under the key already (use ``save`` to overwrite).

    .. versionadded:: 2.0
    """


class RecordMissing(CacheError, KeyError):
    """``replace``, ``update``, ``incr`` or ``decr`` found no record under the key.

    .. versionadded:: 2.0
    """

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class UpdateConflict(CacheError):
    """A partial update lost its compare-and-set to other writers too many times in a row.

    .. versionadded:: 2.0
    """

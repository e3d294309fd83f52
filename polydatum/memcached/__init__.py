"""Memcached: a cache backend on pymemcache
==========================================

:class:`MemcachedBackend` stores a :class:`~polydatum.cache.Cache`'s entries
in memcached; :class:`AsyncMemcachedBackend` serves an
:class:`~polydatum.cache.AsyncCache` by running the same calls in worker
threads (pymemcache has no asyncio client)::

    from polydatum.cache import Cache
    from polydatum.memcached import MemcachedBackend

    Cache(MemcachedBackend("127.0.0.1:11211"), namespace="myapp").install(dm, name="cache")

It supports the whole Cache API: ``add``/``replace``, counters, locks and
:func:`~polydatum.cache.cached`'s claims (through CAS), and ``clear`` (through
a generation counter per namespace, as memcached cannot list keys). Keys that
memcached cannot take (over 250 bytes, spaces, control characters,
non-ASCII) are hashed; values over the item size limit raise
:class:`~polydatum.cache.ItemTooLarge`. When memcached is down the cache degrades as on Redis:
reads miss, writes are dropped with a warning, deletes are replayed. See
``docs/integrations/backends.md``.

Needs ``pip install "polydatum[memcached]"``.

.. versionadded:: 2.0
"""

from __future__ import annotations

try:
    import pymemcache  # noqa: F401  (only to say what is missing)
except ImportError:  # pragma: no cover - exercised only without the extra
    msg = 'polydatum.memcached needs pymemcache; install it with: pip install "polydatum[memcached]"'
    raise ImportError(msg) from None

from typing import Any

from polydatum.cache import ItemTooLarge as ItemTooLarge  # documented in polydatum.cache
from polydatum.cache._threaded import ThreadedAsyncBackend
from polydatum.memcached._backend import (
    DEFAULT_MAX_ITEM_SIZE,
    MAX_KEY_BYTES,
    MemcachedBackend,
    MemcachedLock,
    wire_key,
)


class AsyncMemcachedBackend(ThreadedAsyncBackend):
    """:class:`MemcachedBackend` for :class:`~polydatum.cache.AsyncCache`: each call in a worker thread.

    Takes the same arguments as :class:`MemcachedBackend` (or one, as
    ``backend=``, to share its connections and generations). Its ``sync``
    attribute is what ``AsyncCache(sync_backend=...)`` takes with an outbox.

    .. versionadded:: 2.0
    """

    sync: MemcachedBackend

    def __init__(self, *args: Any, backend: MemcachedBackend | None = None, **kwargs: Any) -> None:
        super().__init__(backend if backend is not None else MemcachedBackend(*args, **kwargs))


__all__ = [
    "DEFAULT_MAX_ITEM_SIZE",
    "MAX_KEY_BYTES",
    "AsyncMemcachedBackend",
    "MemcachedBackend",
    "MemcachedLock",
    "wire_key",
]

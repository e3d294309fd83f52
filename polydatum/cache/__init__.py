"""Caching: a key/value cache with serializers, TTLs and namespaces
====================================================================

:class:`Cache` stores Python values under string keys, with an optional TTL,
in a *backend*. The embedded default is :class:`MemoryBackend` (in-process,
thread-safe, bounded); :class:`FileSystemBackend` keeps entries in files that
several processes share; :mod:`polydatum.redis` and :mod:`polydatum.memcached`
provide Redis and memcached backends with the same interface. Nothing here imports a third-party package::

    from polydatum import DataManager, Service
    from polydatum.cache import Cache, cached

    class Users(Service):
        @cached(ttl=60, key="user:{user_id}")
        def get(self, user_id):
            return {"id": user_id, "name": "Ada"}   # the expensive part

        def rename(self, user_id, name):
            ...                                      # write to the database
            self.get.invalidate(user_id)             # deleted once the context commits

    dm = DataManager()
    Cache(namespace="myapp").install(dm, name="cache")
    dm.register_services(users=Users())
    with dm.dal() as dal:
        dal.users.get(1)      # computed and stored
        dal.users.get(1)      # served from the cache

Keys are stored as ``"<namespace>:<version>:<key>"``: bump ``version`` on a
deploy that changes what is cached and the old entries are never read again;
:meth:`Cache.clear` drops a whole namespace at once.

Values go through a serializer picked by name (:func:`get_serializer`):
``"json"`` (the default; datetimes, dates, times, decimals, UUIDs, bytes,
tuples, sets and non-string dict keys round-trip), ``"msgpack"`` (same types,
needs ``pip install "polydatum[msgpack]"``) and ``"pickle"`` (any picklable
object, only when asked for, and never for data an outsider could write).
Every stored value starts with its serializer's one-byte tag, so a value
written by another serializer or another program is a cache miss plus a
logged warning, never a crash and never an unpickling of foreign bytes.
Plain ``int`` values are stored as decimal digits so :meth:`Cache.incr` works
on them.

When the backend is unreachable, reads miss and writes are dropped with a
logged warning (``on_unavailable="raise"`` raises :class:`CacheUnavailable`
instead), and the backend is left alone for ``retry_interval`` seconds so a
dead server costs each request nothing. Deletes are not dropped: they are
kept (up to ``max_undelivered`` keys, then as one clear of the namespace) and
replayed before the cache's next operation once the backend answers, and by
a background retry every ``retry_interval``. Locks never degrade: they raise.
A backend that is up but has no free connection in time (a full pool) raises
:class:`CacheBusy`; that is not an outage and never degrades the cache.

.. versionadded:: 2.0
"""

from polydatum.cache._backends import (
    AsyncCacheBackend,
    AsyncMemoryBackend,
    CacheBackend,
    CacheLock,
    MemoryBackend,
)
from polydatum.cache._cache import AsyncCache, Cache
from polydatum.cache._cached import CachedFunction, CacheMiddleware, CachePolicy, cached
from polydatum.cache._errors import (
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
from polydatum.cache._filesystem import AsyncFileSystemBackend, FileSystemBackend, FileSystemLock
from polydatum.cache._locks import (
    AsyncLockBase,
    AsyncMemoryLock,
    BackendLock,
    LockBase,
    MemoryLock,
    TokenLock,
)
from polydatum.cache._serializers import (
    JSONSerializer,
    MsgpackSerializer,
    PickleSerializer,
    Serializer,
    get_serializer,
    register_serializer,
)
from polydatum.cache._threaded import ThreadedAsyncBackend, ThreadedAsyncLock

__all__ = [
    "AsyncCache",
    "AsyncCacheBackend",
    "AsyncFileSystemBackend",
    "AsyncLockBase",
    "AsyncMemoryBackend",
    "AsyncMemoryLock",
    "BackendLock",
    "Cache",
    "CacheBackend",
    "CacheBusy",
    "CacheError",
    "CacheLock",
    "CacheMiddleware",
    "CachePolicy",
    "CacheUnavailable",
    "CachedFunction",
    "CounterError",
    "FileSystemBackend",
    "FileSystemLock",
    "ItemTooLarge",
    "JSONSerializer",
    "LockBase",
    "LockError",
    "LockExpired",
    "LockNotAcquired",
    "MemoryBackend",
    "MemoryLock",
    "MsgpackSerializer",
    "PickleSerializer",
    "RecordExists",
    "RecordMissing",
    "SerializationError",
    "Serializer",
    "ThreadedAsyncBackend",
    "ThreadedAsyncLock",
    "TokenLock",
    "UpdateConflict",
    "cached",
    "get_serializer",
    "register_serializer",
]

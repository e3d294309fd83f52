"""Redis: a shared pool, a client per context, caches and locks
==============================================================

:class:`Redis` owns one :class:`redis.ConnectionPool` for the process. Install
it and every context gets a :class:`redis.Redis` client on that pool as
``ctx.redis``, created on first use (a context that never touches Redis takes
no connection). :meth:`Redis.cache` gives a :class:`~polydatum.cache.Cache`
stored in Redis, and :meth:`Redis.lock` a lock built on redis-py's ``Lock``::

    from polydatum import DataManager, Service
    from polydatum.cache import cached
    from polydatum.redis import Redis

    class Users(Service):
        @cached(ttl=60, key="user:{user_id}")
        def get(self, user_id):
            return {"id": user_id}

        def rebuild_report(self):
            with self._ctx.cache.lock("report", timeout=30):
                self._ctx.redis.set("report", "...")

    redis = Redis("redis://127.0.0.1:6379/0")
    redis.install(dm := DataManager(), name="redis")       # ctx.redis: redis.Redis
    redis.cache(namespace="myapp").install(dm, name="cache")  # ctx.cache: Cache
    dm.register_services(users=Users())
    with dm.dal() as dal:
        dal.users.get(1)

:class:`AsyncRedis` is the same on ``redis.asyncio`` with an
:class:`~polydatum.cache.AsyncCache`; create it inside the event loop that
uses it. When Redis is down a cache degrades to misses (see
:mod:`polydatum.cache`); the raw client and locks raise redis-py's or
:class:`~polydatum.cache.CacheUnavailable` errors as usual.

.. versionadded:: 2.0
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

try:
    import redis as _redis
    import redis.asyncio as _aredis
    from redis.backoff import NoBackoff
    from redis.exceptions import LockError as _RedisLockError
    from redis.exceptions import LockNotOwnedError
    from redis.retry import Retry
except ImportError:  # pragma: no cover - exercised only without the extra
    msg = 'polydatum.redis needs redis-py; install it with: pip install "polydatum[redis]"'
    raise ImportError(msg) from None

from polydatum.cache import (
    AsyncCache,
    Cache,
    CacheUnavailable,
    CounterError,
    LockError,
    LockExpired,
    LockNotAcquired,
    Serializer,
)
from polydatum.cache._backends import When, _expired_message, _not_acquired_message

if TYPE_CHECKING:
    from polydatum import DataManager
    from polydatum.context import DataAccessContext

__all__ = [
    "AsyncRedis",
    "AsyncRedisBackend",
    "AsyncRedisLock",
    "Redis",
    "RedisBackend",
    "RedisLock",
]

# Failures that mean "Redis cannot serve us now" (down, overloaded, full, or a
# replica during failover), as opposed to a bug in the command.
_UNAVAILABLE = (
    _redis.ConnectionError,
    _redis.TimeoutError,
    _redis.exceptions.OutOfMemoryError,
    _redis.exceptions.ReadOnlyError,
)


def _pool_options(options: Mapping[str, Any]) -> dict[str, Any]:
    # redis-py waits 5 s to connect and never retries; a cache should give up
    # sooner, and retry once so a connection gone stale (a Redis restart) is
    # replaced at once instead of failing the first command.
    merged: dict[str, Any] = {
        "max_connections": 50,
        "socket_connect_timeout": 1.0,
        "socket_timeout": 5.0,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
    }
    merged.update(options)
    return merged


def _unavailable(exc: BaseException) -> CacheUnavailable:
    return CacheUnavailable(f"Redis is unavailable: {type(exc).__name__}: {exc}")


def _check_bytes(client: _redis.Redis | _aredis.Redis) -> None:
    if client.get_connection_kwargs().get("decode_responses"):
        msg = (
            "a cache needs the raw bytes Redis stores, but this client has "
            "decode_responses=True; give the cache a Redis made without it"
        )
        raise ValueError(msg)


# KEYS[1] value key, KEYS[2] guard; ARGV value, token, ttl in ms ("" for none).
# A compare-and-set: a cached() result is stored only while its computing
# claim is intact, so an invalidation (which deletes the claim) voids it.
_SET_GUARDED = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('SET', KEYS[1], ARGV[1])
else redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3]) end
redis.call('DEL', KEYS[2])
return 1
"""
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _glob_escape(prefix: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in prefix)


class Redis:
    """One connection pool for the process, handing out clients, caches and locks.

    Args:
        url: a redis-py URL, e.g. ``redis://:password@host:6379/0``.
        pool_options: passed to :meth:`redis.ConnectionPool.from_url`. Defaults
            that differ from redis-py's: ``max_connections=50``,
            ``socket_connect_timeout=1.0``, ``retry=Retry(NoBackoff(), 1)``
            and ``health_check_interval=30``.

    .. versionadded:: 2.0
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", **pool_options: Any) -> None:
        self.url = url
        # redis-py's pool notices a fork and starts afresh in the child.
        self.pool: _redis.ConnectionPool = _redis.ConnectionPool.from_url(
            url, **_pool_options(pool_options)
        )
        self._client = _redis.Redis(connection_pool=self.pool)

    def __repr__(self) -> str:
        return f"<Redis {self.pool!r}>"

    def client(self) -> _redis.Redis:
        """A new :class:`redis.Redis` on the shared pool (it connects only when used)."""
        return _redis.Redis(connection_pool=self.pool)

    def install(self, dm: DataManager, name: str = "redis") -> Redis:
        """Register the resource ``name``: ``ctx.<name>`` is a client on the shared pool.

        Returns:
            this object.
        """

        template = self._client

        def redis_resource(ctx: DataAccessContext) -> Iterator[_redis.Redis]:
            # A shallow copy of a client on the pool: its own object for this
            # context, without redis.Redis.__init__, which costs more than a GET.
            client = copy.copy(template)
            try:
                yield client
            finally:
                client.close()  # returns a pinned connection, never closes the shared pool

        dm.register_resources(**{name: redis_resource})
        return self

    def cache(
        self,
        *,
        namespace: str = "default",
        version: int | str = 1,
        serializer: str | Serializer = "json",
        on_unavailable: Literal["warn", "raise"] = "warn",
        retry_interval: float = 1.0,
        max_undelivered: int = 10_000,
    ) -> Cache:
        """A :class:`~polydatum.cache.Cache` stored in this Redis (arguments as for ``Cache``)."""
        return Cache(
            RedisBackend(self), namespace=namespace, version=version, serializer=serializer,
            on_unavailable=on_unavailable, retry_interval=retry_interval,
            max_undelivered=max_undelivered,
        )

    def lock(
        self, name: str, timeout: float, *, blocking_timeout: float | None = 10.0
    ) -> RedisLock:
        """A lock on the Redis key ``name``, expiring ``timeout`` seconds after it is taken.

        Use as ``with redis.lock("report", timeout=30):``; see :class:`RedisLock`.
        """
        if not timeout > 0:
            msg = f"lock timeout must be positive seconds, got {timeout!r}; locks always expire"
            raise ValueError(msg)
        return RedisLock(self._client, name, timeout, blocking_timeout)

    def ping(self) -> bool:
        """True when Redis answers a PING; never raises."""
        try:
            return bool(self._client.ping())
        except _redis.RedisError:
            return False

    def close(self) -> None:
        """Close every connection of the pool (a later use reconnects)."""
        self.pool.disconnect()


class RedisBackend:
    """The :class:`~polydatum.cache.CacheBackend` storing entries in Redis.

    Args:
        redis: a :class:`Redis` (or a ``redis.Redis`` client) to use.

    .. versionadded:: 2.0
    """

    def __init__(self, redis: Redis | _redis.Redis) -> None:
        self.client = redis._client if isinstance(redis, Redis) else redis
        _check_bytes(self.client)
        # Script objects reload themselves after a restart empties the script cache.
        self._set_guarded = self.client.register_script(_SET_GUARDED)
        self._delete_if = self.client.register_script(_DELETE_IF)

    def get(self, key: str) -> bytes | None:
        """GET."""
        try:
            return cast("bytes | None", self.client.get(key))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """MGET."""
        try:
            return cast("list[bytes | None]", self.client.mget(keys))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def set(self, key: str, value: bytes, ttl_ms: int | None, when: When) -> bool:
        """SET with PX, and NX (``absent``) or XX (``present``)."""
        try:
            done = self.client.set(
                key, value, px=ttl_ms, nx=when == "absent", xx=when == "present"
            )
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        return bool(done)

    def set_many(self, items: Mapping[str, bytes], ttl_ms: int | None) -> None:
        """MSET, or one pipelined SET PX per item when there is a TTL."""
        try:
            if ttl_ms is None:
                self.client.mset(dict(items))
                return
            with self.client.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, value, px=ttl_ms)
                pipe.execute()
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def delete_many(self, keys: Sequence[str]) -> int:
        """UNLINK (memory is freed in the background); returns how many existed."""
        try:
            return int(self.client.unlink(*keys))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def incr(self, key: str, delta: int) -> int:
        """INCRBY."""
        try:
            return int(self.client.incrby(key, delta))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        except _redis.ResponseError as exc:
            raise CounterError(str(exc)) from None

    def pttl(self, key: str) -> int | None:
        """PTTL: milliseconds left, -1 for no expiry, None when missing."""
        try:
            ms = int(self.client.pttl(key))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        return None if ms == -2 else ms

    def clear(self, prefix: str) -> int:
        """SCAN for ``prefix*`` and UNLINK in batches (never the blocking KEYS)."""
        deleted = 0
        batch: list[bytes] = []
        try:
            for key in self.client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(self.client.unlink(*batch))
                    batch.clear()
            if batch:
                deleted += int(self.client.unlink(*batch))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        return deleted

    def set_guarded(
        self, key: str, value: bytes, ttl_ms: int | None, guard: str, token: bytes
    ) -> bool:
        """One Lua script: SET ``key`` and DEL ``guard`` only if ``guard`` holds ``token``."""
        try:
            ttl = b"" if ttl_ms is None else ttl_ms
            return bool(self._set_guarded(keys=[key, guard], args=[value, token, ttl]))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def delete_if(self, key: str, token: bytes) -> bool:
        """One Lua script: DEL ``key`` only if it holds ``token``."""
        try:
            return bool(self._delete_if(keys=[key], args=[token]))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def lock(self, key: str, timeout: float, blocking_timeout: float | None) -> RedisLock:
        """A :class:`RedisLock` on ``key``."""
        return RedisLock(self.client, key, timeout, blocking_timeout)

    def ping(self) -> bool:
        """PING."""
        try:
            return bool(self.client.ping())
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc


class RedisLock:
    """redis-py's ``Lock`` with polydatum's errors; use it with ``with``.

    Entering waits up to ``blocking_timeout`` seconds (None: forever), then
    raises :class:`~polydatum.cache.LockNotAcquired`. The lock expires
    ``timeout`` seconds after it was taken, so a crashed holder never blocks
    the others for good; leaving after it expired raises
    :class:`~polydatum.cache.LockExpired`, because someone else may have held
    it meanwhile. :class:`~polydatum.cache.CacheUnavailable` when Redis is down.

    .. versionadded:: 2.0
    """

    def __init__(
        self, client: _redis.Redis, name: str, timeout: float, blocking_timeout: float | None
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.blocking_timeout = blocking_timeout
        self.lock = client.lock(
            name, timeout=timeout, sleep=0.01, blocking_timeout=blocking_timeout
        )

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking``, retry until ``blocking_timeout`` passes."""
        try:
            return bool(self.lock.acquire(blocking=blocking))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def release(self) -> None:
        """Release the lock; :class:`~polydatum.cache.LockExpired` when it expired first."""
        try:
            self.lock.release()
        except LockNotOwnedError:
            raise LockExpired(_expired_message(self.name, self.timeout)) from None
        except _RedisLockError:
            msg = f"lock {self.name!r} is not held by this thread; acquire it before releasing"
            raise LockError(msg) from None
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def extend(self, seconds: float) -> None:
        """Give the held lock ``seconds`` more before it expires."""
        try:
            self.lock.extend(seconds)
        except LockNotOwnedError:
            raise LockExpired(_expired_message(self.name, self.timeout)) from None
        except _RedisLockError:
            msg = f"lock {self.name!r} is not held by this thread; acquire it before extending"
            raise LockError(msg) from None
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def locked(self) -> bool:
        """True when anyone holds the lock."""
        try:
            return bool(self.lock.locked())
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def __enter__(self) -> RedisLock:
        if not self.acquire():
            raise LockNotAcquired(_not_acquired_message(self.name, self.blocking_timeout))
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class AsyncRedis:
    """:class:`Redis` on ``redis.asyncio``: create it in the event loop that uses it.

    Same arguments as :class:`Redis`.

    .. versionadded:: 2.0
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", **pool_options: Any) -> None:
        self.url = url
        self.pool: _aredis.ConnectionPool = _aredis.ConnectionPool.from_url(
            url, **_pool_options(pool_options)
        )
        self._client = _aredis.Redis(connection_pool=self.pool)

    def __repr__(self) -> str:
        return f"<AsyncRedis {self.pool!r}>"

    def client(self) -> _aredis.Redis:
        """A new :class:`redis.asyncio.Redis` on the shared pool."""
        return _aredis.Redis(connection_pool=self.pool)

    def install(self, dm: DataManager, name: str = "redis") -> AsyncRedis:
        """Register the resource ``name``: ``ctx.<name>`` is an async client on the shared pool.

        It is a plain (sync) resource, so ``ctx.redis`` works without
        ``await ctx.aget(...)``: making the client does no I/O, and as it takes a
        pooled connection per command there is nothing to close afterwards.
        """

        template = self._client

        def redis_resource(ctx: DataAccessContext) -> Iterator[_aredis.Redis]:
            yield copy.copy(template)  # see Redis.install: cheaper than a new client

        dm.register_resources(**{name: redis_resource})
        return self

    def cache(
        self,
        *,
        namespace: str = "default",
        version: int | str = 1,
        serializer: str | Serializer = "json",
        on_unavailable: Literal["warn", "raise"] = "warn",
        retry_interval: float = 1.0,
        max_undelivered: int = 10_000,
    ) -> AsyncCache:
        """An :class:`~polydatum.cache.AsyncCache` stored in this Redis."""
        return AsyncCache(
            AsyncRedisBackend(self), namespace=namespace, version=version,
            serializer=serializer, on_unavailable=on_unavailable, retry_interval=retry_interval,
            max_undelivered=max_undelivered,
        )

    def lock(
        self, name: str, timeout: float, *, blocking_timeout: float | None = 10.0
    ) -> AsyncRedisLock:
        """See :meth:`Redis.lock`; use it with ``async with``."""
        if not timeout > 0:
            msg = f"lock timeout must be positive seconds, got {timeout!r}; locks always expire"
            raise ValueError(msg)
        return AsyncRedisLock(self._client, name, timeout, blocking_timeout)

    async def aping(self) -> bool:
        """True when Redis answers a PING; never raises."""
        try:
            return bool(await self._client.ping())
        except _redis.RedisError:
            return False

    async def aclose(self) -> None:
        """Close every connection of the pool."""
        await self.pool.aclose()


class AsyncRedisBackend:
    """The :class:`~polydatum.cache.AsyncCacheBackend` storing entries in Redis.

    .. versionadded:: 2.0
    """

    def __init__(self, redis: AsyncRedis | _aredis.Redis) -> None:
        self.client = redis._client if isinstance(redis, AsyncRedis) else redis
        _check_bytes(self.client)
        self._set_guarded = self.client.register_script(_SET_GUARDED)
        self._delete_if = self.client.register_script(_DELETE_IF)

    async def get(self, key: str) -> bytes | None:
        """GET."""
        try:
            return cast("bytes | None", await self.client.get(key))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """MGET."""
        try:
            return cast("list[bytes | None]", await self.client.mget(keys))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def set(self, key: str, value: bytes, ttl_ms: int | None, when: When) -> bool:
        """SET with PX and NX/XX."""
        try:
            done = await self.client.set(
                key, value, px=ttl_ms, nx=when == "absent", xx=when == "present"
            )
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        return bool(done)

    async def set_many(self, items: Mapping[str, bytes], ttl_ms: int | None) -> None:
        """MSET, or pipelined SET PX."""
        try:
            if ttl_ms is None:
                await self.client.mset(dict(items))
                return
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, value, px=ttl_ms)
                await pipe.execute()
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def delete_many(self, keys: Sequence[str]) -> int:
        """UNLINK."""
        try:
            return int(await self.client.unlink(*keys))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def incr(self, key: str, delta: int) -> int:
        """INCRBY."""
        try:
            return int(await self.client.incrby(key, delta))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        except _redis.ResponseError as exc:
            raise CounterError(str(exc)) from None

    async def pttl(self, key: str) -> int | None:
        """PTTL."""
        try:
            ms = int(await self.client.pttl(key))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        return None if ms == -2 else ms

    async def clear(self, prefix: str) -> int:
        """SCAN and UNLINK in batches."""
        deleted = 0
        batch: list[bytes] = []
        try:
            async for key in self.client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(await self.client.unlink(*batch))
                    batch.clear()
            if batch:
                deleted += int(await self.client.unlink(*batch))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        return deleted

    async def set_guarded(
        self, key: str, value: bytes, ttl_ms: int | None, guard: str, token: bytes
    ) -> bool:
        """See :meth:`RedisBackend.set_guarded`."""
        try:
            ttl = b"" if ttl_ms is None else ttl_ms
            return bool(await self._set_guarded(keys=[key, guard], args=[value, token, ttl]))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def delete_if(self, key: str, token: bytes) -> bool:
        """See :meth:`RedisBackend.delete_if`."""
        try:
            return bool(await self._delete_if(keys=[key], args=[token]))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def lock(self, key: str, timeout: float, blocking_timeout: float | None) -> AsyncRedisLock:
        """An :class:`AsyncRedisLock` on ``key``."""
        return AsyncRedisLock(self.client, key, timeout, blocking_timeout)

    async def ping(self) -> bool:
        """PING."""
        try:
            return bool(await self.client.ping())
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc


class AsyncRedisLock:
    """:class:`RedisLock` for ``async with``, on ``redis.asyncio``'s ``Lock``.

    .. versionadded:: 2.0
    """

    def __init__(
        self, client: _aredis.Redis, name: str, timeout: float, blocking_timeout: float | None
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.blocking_timeout = blocking_timeout
        # Tasks share a thread, so the token must not live in a thread-local.
        self.lock = client.lock(
            name, timeout=timeout, sleep=0.01, blocking_timeout=blocking_timeout,
            thread_local=False,
        )

    async def acquire(self, blocking: bool = True) -> bool:
        """Take the lock without blocking the event loop."""
        try:
            return bool(await self.lock.acquire(blocking=blocking))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def release(self) -> None:
        """Release; :class:`~polydatum.cache.LockExpired` when it expired first."""
        try:
            await self.lock.release()
        except LockNotOwnedError:
            raise LockExpired(_expired_message(self.name, self.timeout)) from None
        except _RedisLockError:
            msg = f"lock {self.name!r} is not held; acquire it before releasing"
            raise LockError(msg) from None
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def locked(self) -> bool:
        """True when anyone holds the lock."""
        try:
            return bool(await self.lock.locked())
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def __aenter__(self) -> AsyncRedisLock:
        if not await self.acquire():
            raise LockNotAcquired(_not_acquired_message(self.name, self.blocking_timeout))
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


"""Cache and AsyncCache: the API, over a backend.

What the two share without I/O is in ``_base.py``; the degraded mode (circuit
breaker and replay of missed deletes) in ``_health.py``; the invalidations
that wait for a commit in ``_deferral.py``; ``cached()``'s stampede claims in
``_claims.py``.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from polydatum import _telemetry
from polydatum.cache._backends import (
    AsyncCacheBackend,
    AsyncMemoryBackend,
    CacheBackend,
    CacheLock,
    MemoryBackend,
    When,
)
from polydatum.cache._base import MISS, TTL, lock_times, ttl_ms
from polydatum.cache._claims import AsyncClaims, Claims
from polydatum.cache._deprecated import aping_alias
from polydatum.cache._errors import CacheBusy, CacheUnavailable
from polydatum.cache._health import AsyncHealth, Health
from polydatum.cache._serializers import Serializer

if TYPE_CHECKING:
    from typing_extensions import Self

    from polydatum.cache.models._repo import AsyncModels, Models
    from polydatum.context import DataAccessContext
    from polydatum.types import ResourceRegistry

T = TypeVar("T")
M = TypeVar("M")

__all__ = ["AsyncCache", "Cache"]


class Cache(Claims):
    """A key/value cache on a :class:`CacheBackend` (memory by default).

    Args:
        backend: where entries live; a new :class:`MemoryBackend` when omitted.
        namespace: prefix of every key, e.g. the application's name.
        version: part of every key; bump it to stop reading older entries.
        serializer: a registered serializer name (``"json"``, ``"msgpack"``,
            ``"pickle"``) or a :class:`Serializer`.
        on_unavailable: ``"warn"`` (reads miss, writes are dropped, a warning is
            logged) or ``"raise"`` (:class:`CacheUnavailable`).
        retry_interval: seconds to leave a failed backend alone before trying
            it again.
        max_undelivered: how many missed deletes and clears to remember while
            the backend is down (they are replayed once it answers); past that,
            the whole namespace is cleared on recovery instead.
        outbox: a :class:`polydatum.outbox.Outbox` installed on the same
            DataManager: :meth:`invalidate` then writes the keys to delete as
            an outbox row of the context's transaction (topic
            ``"polydatum.cache:<namespace>"``), deleted right after the
            commit or, if the backend was down or the process died, by a
            relay once it answers. Without it the deletes are commit hooks.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        backend: CacheBackend | None = None,
        *,
        namespace: str = "default",
        version: int | str = 1,
        serializer: str | Serializer = "json",
        on_unavailable: Literal["warn", "raise"] = "warn",
        retry_interval: float = 1.0,
        max_undelivered: int = 10_000,
        outbox: Any = None,
    ) -> None:
        super().__init__(
            namespace=namespace,
            version=version,
            serializer=serializer,
            on_unavailable=on_unavailable,
            retry_interval=retry_interval,
            max_undelivered=max_undelivered,
        )
        self.backend: CacheBackend = backend if backend is not None else MemoryBackend()
        self._backend_obj = self.backend
        self._health = Health(
            self.backend,
            namespace=namespace,
            on_unavailable=on_unavailable,
            retry_interval=retry_interval,
            max_undelivered=max_undelivered,
        )
        self._deferral.use_outbox(outbox, self.backend)
        self._deliver_models_to(self.backend)

    def namespaced(self, name: str, *, version: int | str | None = None) -> Cache:
        """A cache on the same backend under ``"<namespace>:<name>"``.

        Clearing this cache's namespace also clears the child's.
        """
        return Cache(
            self.backend,
            namespace=f"{self.namespace}:{name}",
            version=self.version if version is None else version,
            serializer=self.serializer,
            on_unavailable=self.on_unavailable,
            retry_interval=self.retry_interval,
            max_undelivered=self.max_undelivered,
            outbox=self.outbox,
        )

    def install(self, dm: ResourceRegistry, *, name: str = "cache") -> Self:
        """Register this cache as the resource ``name``.

        ``ctx.<name>`` is then this cache, bound to the context so that
        :meth:`invalidate` waits for that context's commit. It costs nothing
        until used: the backend is only contacted by an operation.

        Returns:
            the cache itself.
        """
        self._resource(dm, name)
        return self

    def models(self, model: type[M], *, immediate: bool = False) -> Models[M]:
        """The records of the cache model ``model`` in this cache (see :mod:`polydatum.cache.models`).

        Args:
            model: a dataclass decorated with
                :func:`~polydatum.cache.models.cache_model`.
            immediate: write at once even inside a context (by default writes
                wait for the context's commit).

        Raises:
            TypeError: ``model`` is not a cache model, or has a field of an
                unsupported type.

        .. versionadded:: 2.0
        """
        from polydatum.cache.models._repo import Models

        return Models(self, model, immediate=immediate)

    def _call(self, op: str, fn: Callable[..., T], *args: Any) -> T | Any:
        # The hot path: one flag check when all is well (see _health.py).
        health = self._health
        if health.degraded and not health.ready(op):
            return MISS
        try:
            result = fn(*args)
        except CacheUnavailable as exc:
            health.failed(exc, op)
            return MISS
        if health.degraded:
            health.settle()
        return result

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value stored at ``key``, or ``default`` on a miss."""
        data = self._call("get", self.backend.get, self._prefix + key)
        if data is None or data is MISS:
            if _telemetry.sink is not None:
                _telemetry.sink.cache_lookup(self.namespace, 0, 1)
            return default
        value = self._decode(data, key)
        if _telemetry.sink is not None:
            _telemetry.sink.cache_lookup(self.namespace, value is not MISS, value is MISS)
        return default if value is MISS else value

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return ``{key: value}`` for the keys that are present."""
        keys = list(keys)
        found = self._call("get_many", self.backend.get_many, [self._prefix + k for k in keys])
        if found is MISS or not keys:
            return {}
        result = {}
        for key, data in zip(keys, found, strict=True):
            if data is not None and (value := self._decode(data, key)) is not MISS:
                result[key] = value
        if _telemetry.sink is not None:
            _telemetry.sink.cache_lookup(self.namespace, len(result), len(keys) - len(result))
        return result

    def _set(self, key: str, value: Any, ttl: TTL, when: When) -> bool:
        data = self._encode(value)
        done = self._call(when, self.backend.set, self._prefix + key, data, ttl_ms(ttl), when)
        return done is True

    def set(self, key: str, value: Any, ttl: TTL = None) -> bool:
        """Store ``value`` at ``key``, expiring after ``ttl`` seconds (never when None).

        Returns:
            True when stored; False when the backend was unavailable.

        Raises:
            SerializationError: the value has a type the serializer cannot store.
        """
        return self._set(key, value, ttl, "always")

    def add(self, key: str, value: Any, ttl: TTL = None) -> bool:
        """Store ``value`` only if ``key`` is absent; True when stored."""
        return self._set(key, value, ttl, "absent")

    def replace(self, key: str, value: Any, ttl: TTL = None) -> bool:
        """Store ``value`` only if ``key`` is present; True when stored."""
        return self._set(key, value, ttl, "present")

    def set_many(self, items: Mapping[str, Any], ttl: TTL = None) -> bool:
        """Store every item, all with the same ``ttl``; True when stored."""
        data = {self._prefix + k: self._encode(v) for k, v in items.items()}
        if not data:
            return True
        return self._call("set_many", self.backend.set_many, data, ttl_ms(ttl)) is None

    def delete(self, key: str) -> bool:
        """Delete ``key``; True when it existed."""
        return bool(self.delete_many([key]))

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete the keys; return how many existed.

        While the backend is unavailable the deletes are remembered and
        replayed before this cache does anything else once it answers again.
        """
        return self._delete([self._prefix + k for k in keys])

    def _delete(self, full: list[str]) -> int:
        if not full:
            return 0
        try:
            deleted = self._call("delete_many", self.backend.delete_many, full)
        except (CacheUnavailable, CacheBusy):
            self._health.hold(full)
            raise
        if deleted is MISS:
            self._health.hold(full)
            return 0
        return int(deleted)

    def incr(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` to the integer at ``key`` (a missing key counts from 0).

        The key keeps its TTL. Returns the new value, or None when the backend
        is unavailable.

        Raises:
            CounterError: the stored value is not an integer, or the result
                leaves the signed 64-bit range.
        """
        value = self._call("incr", self.backend.incr, self._prefix + key, delta)
        return None if value is MISS else int(value)

    def decr(self, key: str, delta: int = 1) -> int | None:
        """Subtract ``delta``; see :meth:`incr`."""
        return self.incr(key, -delta)

    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires: ``math.inf`` when never, None when it is missing."""
        ms = self._call("ttl", self.backend.pttl, self._prefix + key)
        if ms is None or ms is MISS:
            return None
        return math.inf if ms < 0 else ms / 1000

    def clear(self, namespace: str | None = None) -> int:
        """Delete every entry of this cache's namespace (all versions, child namespaces too).

        Locks are left alone: one that is held stays held.

        Args:
            namespace: clear only the child namespace ``"<namespace>:<name>"``
                (see :meth:`namespaced`).

        Returns:
            how many entries were deleted.
        """
        prefix = f"{self.namespace}:" if namespace is None else f"{self.namespace}:{namespace}:"
        try:
            deleted = self._call("clear", self.backend.clear, prefix)
        except (CacheUnavailable, CacheBusy):
            self._health.hold(prefix=prefix)
            raise
        if deleted is MISS:
            self._health.hold(prefix=prefix)
            return 0
        return int(deleted)

    def lock(self, name: str, timeout: float, *, blocking_timeout: float | None = 10.0) -> CacheLock:
        """A lock named ``name`` in this namespace, expiring ``timeout`` seconds after it is taken.

        Use it as ``with cache.lock("report", timeout=30):``. Entering raises
        :class:`LockNotAcquired` after ``blocking_timeout`` seconds (None waits
        forever); leaving raises :class:`LockExpired` when the lock ran out.
        Locks raise :class:`CacheUnavailable` when the backend is down, whatever
        ``on_unavailable`` says: a lock that silently does nothing is worse.
        :meth:`clear` never drops a lock, held or not.
        """
        timeout, blocking_timeout = lock_times(timeout, blocking_timeout)
        return self.backend.lock(self._locks + name, timeout, blocking_timeout)

    def ping(self) -> bool:
        """True when the backend answers; never raises."""
        try:
            return self.backend.ping()
        except (CacheUnavailable, CacheBusy):
            return False

    def invalidate(self, *keys: str, ctx: DataAccessContext | None = None) -> None:
        """Delete ``keys`` once the context commits; never if it ends with an exception.

        Until then, :func:`cached` methods in that context skip these keys, so
        the context reads its own writes.

        Args:
            keys: keys to delete.
            ctx: the context whose commit to wait for; by default the one this
                cache was handed to as ``ctx.<name>``.

        Raises:
            CacheError: no context is known.
        """
        self._invalidate(keys, ctx, self._flush)

    def _flush(self, ctx: DataAccessContext) -> int:
        return self._delete(self._deferral.pop(ctx))


class AsyncCache(AsyncClaims):
    """The awaitable twin of :class:`Cache`, on an :class:`AsyncCacheBackend`.

    Same arguments as :class:`Cache`; the default backend is an
    :class:`AsyncMemoryBackend`. Every method is a coroutine except
    :meth:`lock` (use ``async with``), :meth:`key` and :meth:`invalidate`.

    Args:
        sync_backend: with ``outbox=``, a :class:`CacheBackend` on the same
            store, which deliveries delete through: they run outside the
            event loop (in a worker thread after the commit, or in a relay).
            An :class:`AsyncMemoryBackend` gives its own; :meth:`AsyncRedis.cache
            <polydatum.redis.AsyncRedis.cache>` passes a Redis one.

    .. versionchanged:: 2.0
        ``outbox=`` and ``sync_backend=``.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        backend: AsyncCacheBackend | None = None,
        *,
        namespace: str = "default",
        version: int | str = 1,
        serializer: str | Serializer = "json",
        on_unavailable: Literal["warn", "raise"] = "warn",
        retry_interval: float = 1.0,
        max_undelivered: int = 10_000,
        outbox: Any = None,
        sync_backend: CacheBackend | None = None,
    ) -> None:
        super().__init__(
            namespace=namespace,
            version=version,
            serializer=serializer,
            on_unavailable=on_unavailable,
            retry_interval=retry_interval,
            max_undelivered=max_undelivered,
        )
        self.backend: AsyncCacheBackend = backend if backend is not None else AsyncMemoryBackend()
        self._backend_obj = self.backend
        if sync_backend is None and isinstance(self.backend, AsyncMemoryBackend):
            sync_backend = self.backend.sync
        if outbox is not None and sync_backend is None:
            msg = (
                f"AsyncCache(outbox=...) delivers invalidations outside the event loop (in a worker "
                f"thread after the commit, or in a relay), so it needs sync_backend=, a CacheBackend "
                f"on the same store as {type(self.backend).__name__}; AsyncRedis.cache(outbox=...) "
                f"makes one for you"
            )
            raise TypeError(msg)
        self.sync_backend = sync_backend
        self._health: AsyncHealth = AsyncHealth(
            self.backend,
            namespace=namespace,
            on_unavailable=on_unavailable,
            retry_interval=retry_interval,
            max_undelivered=max_undelivered,
        )
        self._deferral.use_outbox(outbox, sync_backend)
        self._deliver_models_to(sync_backend)

    def namespaced(self, name: str, *, version: int | str | None = None) -> AsyncCache:
        """See :meth:`Cache.namespaced`."""
        return AsyncCache(
            self.backend,
            namespace=f"{self.namespace}:{name}",
            version=self.version if version is None else version,
            serializer=self.serializer,
            on_unavailable=self.on_unavailable,
            retry_interval=self.retry_interval,
            max_undelivered=self.max_undelivered,
            outbox=self.outbox,
            sync_backend=self.sync_backend,
        )

    def install(self, dm: ResourceRegistry, *, name: str = "cache") -> Self:
        """Register this cache as the resource ``name`` (``ctx.<name>``, sync or async contexts).

        Returns:
            the cache itself.
        """
        self._resource(dm, name)
        return self

    def models(self, model: type[M], *, immediate: bool = False) -> AsyncModels[M]:
        """See :meth:`Cache.models`; every operation is awaited.

        .. versionadded:: 2.0
        """
        from polydatum.cache.models._repo import AsyncModels

        return AsyncModels(self, model, immediate=immediate)

    async def _call(self, op: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        health = self._health
        if health.degraded and not await health.ready(op):
            return MISS
        try:
            result = await fn(*args)
        except CacheUnavailable as exc:
            health.failed(exc, op)
            return MISS
        if health.degraded:
            health.settle()
        return result

    async def get(self, key: str, default: Any = None) -> Any:
        """See :meth:`Cache.get`."""
        data = await self._call("get", self.backend.get, self._prefix + key)
        if data is None or data is MISS:
            if _telemetry.sink is not None:
                _telemetry.sink.cache_lookup(self.namespace, 0, 1)
            return default
        value = self._decode(data, key)
        if _telemetry.sink is not None:
            _telemetry.sink.cache_lookup(self.namespace, value is not MISS, value is MISS)
        return default if value is MISS else value

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """See :meth:`Cache.get_many`."""
        keys = list(keys)
        full = [self._prefix + k for k in keys]
        found = await self._call("get_many", self.backend.get_many, full)
        if found is MISS or not keys:
            return {}
        result = {}
        for key, data in zip(keys, found, strict=True):
            if data is not None and (value := self._decode(data, key)) is not MISS:
                result[key] = value
        if _telemetry.sink is not None:
            _telemetry.sink.cache_lookup(self.namespace, len(result), len(keys) - len(result))
        return result

    async def _set(self, key: str, value: Any, ttl: TTL, when: When) -> bool:
        data = self._encode(value)
        done = await self._call(when, self.backend.set, self._prefix + key, data, ttl_ms(ttl), when)
        return done is True

    async def set(self, key: str, value: Any, ttl: TTL = None) -> bool:
        """See :meth:`Cache.set`."""
        return await self._set(key, value, ttl, "always")

    async def add(self, key: str, value: Any, ttl: TTL = None) -> bool:
        """See :meth:`Cache.add`."""
        return await self._set(key, value, ttl, "absent")

    async def replace(self, key: str, value: Any, ttl: TTL = None) -> bool:
        """See :meth:`Cache.replace`."""
        return await self._set(key, value, ttl, "present")

    async def set_many(self, items: Mapping[str, Any], ttl: TTL = None) -> bool:
        """See :meth:`Cache.set_many`."""
        data = {self._prefix + k: self._encode(v) for k, v in items.items()}
        if not data:
            return True
        return await self._call("set_many", self.backend.set_many, data, ttl_ms(ttl)) is None

    async def delete(self, key: str) -> bool:
        """See :meth:`Cache.delete`."""
        return bool(await self.delete_many([key]))

    async def delete_many(self, keys: Iterable[str]) -> int:
        """See :meth:`Cache.delete_many`."""
        return await self._delete([self._prefix + k for k in keys])

    async def _delete(self, full: list[str]) -> int:
        if not full:
            return 0
        try:
            deleted = await self._call("delete_many", self.backend.delete_many, full)
        except (CacheUnavailable, CacheBusy):
            self._health.hold(full)
            raise
        if deleted is MISS:
            self._health.hold(full)
            return 0
        return int(deleted)

    async def incr(self, key: str, delta: int = 1) -> int | None:
        """See :meth:`Cache.incr`."""
        value = await self._call("incr", self.backend.incr, self._prefix + key, delta)
        return None if value is MISS else int(value)

    async def decr(self, key: str, delta: int = 1) -> int | None:
        """See :meth:`Cache.decr`."""
        return await self.incr(key, -delta)

    async def ttl(self, key: str) -> float | None:
        """See :meth:`Cache.ttl`."""
        ms = await self._call("ttl", self.backend.pttl, self._prefix + key)
        if ms is None or ms is MISS:
            return None
        return math.inf if ms < 0 else ms / 1000

    async def clear(self, namespace: str | None = None) -> int:
        """See :meth:`Cache.clear`."""
        prefix = f"{self.namespace}:" if namespace is None else f"{self.namespace}:{namespace}:"
        try:
            deleted = await self._call("clear", self.backend.clear, prefix)
        except (CacheUnavailable, CacheBusy):
            self._health.hold(prefix=prefix)
            raise
        if deleted is MISS:
            self._health.hold(prefix=prefix)
            return 0
        return int(deleted)

    def lock(self, name: str, timeout: float, *, blocking_timeout: float | None = 10.0) -> Any:
        """See :meth:`Cache.lock`; use it as ``async with cache.lock(...):``."""
        timeout, blocking_timeout = lock_times(timeout, blocking_timeout)
        return self.backend.lock(self._locks + name, timeout, blocking_timeout)

    async def ping(self) -> bool:
        """True when the backend answers; never raises.

        .. versionchanged:: 2.0
            Renamed from ``aping()``, which is deprecated.
        """
        try:
            return await self.backend.ping()
        except (CacheUnavailable, CacheBusy):
            return False

    aping = aping_alias("AsyncCache", "cache")

    def invalidate(self, *keys: str, ctx: DataAccessContext | None = None) -> None:
        """See :meth:`Cache.invalidate`; the context awaits the deletion (``async with``).

        With ``outbox=``, the keys become an outbox row of the context's
        transaction (in an ``async with`` context, written through its
        AsyncSession just before the COMMIT), deleted through
        ``sync_backend`` right after the commit or by a relay.
        """
        self._invalidate(keys, ctx, self._flush)

    async def _flush(self, ctx: DataAccessContext) -> int:
        return await self._delete(self._deferral.pop(ctx))

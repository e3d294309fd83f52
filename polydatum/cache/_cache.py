"""Cache and AsyncCache: keys, encoding and failure handling over a backend."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from polydatum.cache._backends import (
    AsyncCacheBackend,
    AsyncMemoryBackend,
    CacheBackend,
    CacheLock,
    MemoryBackend,
    When,
)
from polydatum.cache._errors import CacheError, CacheUnavailable
from polydatum.cache._serializers import Serializer, get_serializer

if TYPE_CHECKING:
    from polydatum import DataManager
    from polydatum.context import DataAccessContext

logger = logging.getLogger("polydatum.cache")

TTL = float | timedelta | None
T = TypeVar("T")
C = TypeVar("C", bound="_CacheBase")

MISS: Any = object()
# Suffix of the key a cached() caller claims while it computes an entry.
CLAIM = ":computing"


def _ttl_ms(ttl: TTL) -> int | None:
    if ttl is None:
        return None
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else ttl
    if not seconds > 0:  # also refuses NaN
        msg = f"ttl must be positive seconds (or None for no expiry), got {ttl!r}"
        raise ValueError(msg)
    return max(1, math.ceil(seconds * 1000))


class _Health:
    """Mutable state shared by a cache and its per-context copies."""

    def __init__(self) -> None:
        self.down_until = 0.0
        self.down_since: float | None = None
        self.last_warning = 0.0
        # True while the backend failed lately or invalidations wait for it: the
        # one flag the fast path of every operation checks.
        self.degraded = False
        # context -> keys whose deletion waits for that context's commit.
        self.pending: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        # Deletes and clears the backend missed while down (full keys and
        # prefixes), replayed before anything else once it answers again.
        self.undelivered: set[str] = set()
        self.undelivered_prefixes: set[str] = set()
        self.mutex = threading.Lock()
        self.retry: Any = None  # the scheduled background replay, if any


class _CacheBase:
    """Keys, encoding and failure handling shared by :class:`Cache` and :class:`AsyncCache`."""

    def __init__(
        self,
        *,
        namespace: str,
        version: int | str,
        serializer: str | Serializer,
        on_unavailable: Literal["warn", "raise"],
        retry_interval: float,
        max_undelivered: int = 10_000,
    ) -> None:
        if not namespace or ":" in namespace[:1] + namespace[-1:]:
            msg = f"namespace must be non-empty and not start or end with ':', got {namespace!r}"
            raise ValueError(msg)
        if on_unavailable not in ("warn", "raise"):
            msg = f'on_unavailable must be "warn" or "raise", got {on_unavailable!r}'
            raise ValueError(msg)
        self.namespace = namespace
        self.version = version
        self.serializer = get_serializer(serializer) if isinstance(serializer, str) else serializer
        if max_undelivered < 0:
            msg = f"max_undelivered must be 0 or more keys, got {max_undelivered!r}"
            raise ValueError(msg)
        self.on_unavailable = on_unavailable
        self.retry_interval = retry_interval
        self.max_undelivered = max_undelivered
        self._prefix = f"{namespace}:{version}:"
        self._tag = self.serializer.tag
        self._dumps = self.serializer.dumps
        self._loads = self.serializer.loads
        self._health = _Health()
        self._ctx: DataAccessContext | None = None
        # Per-context copies die with their context; background work holds
        # (weakly) the cache they were copied from, which lives on.
        self._origin: _CacheBase | None = None

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} namespace={self.namespace!r} version={self.version!r} "
            f"serializer={self.serializer.name!r} backend={type(self._backend_obj).__name__}>"
        )

    _backend_obj: Any

    def key(self, key: str) -> str:
        """The full backend key for ``key``: ``"<namespace>:<version>:<key>"``."""
        return self._prefix + key

    def _encode(self, value: Any) -> bytes:
        if type(value) is int:
            return str(value).encode()
        return self._tag + self._dumps(value)

    def _decode(self, data: bytes, key: str) -> Any:
        if data[:1] == self._tag:
            try:
                return self._loads(data[1:])
            except Exception as exc:
                why = f"it does not decode ({type(exc).__name__}: {exc})"
        elif data[:1].isdigit() or data[:1] == b"-":
            try:
                return int(data)
            except ValueError:
                why = "it is not an integer"
        else:
            why = f"it was not written by the {self.serializer.name!r} serializer"
        logger.warning(
            "cache %s: ignoring the value at %r: %s; treating it as a miss",
            self.namespace, self._prefix + key, why,
            extra={"polydatum_cache": self.namespace},
        )
        return MISS

    def is_down(self) -> bool:
        """True while the backend is being left alone after a failure."""
        return self._health.down_until > time.monotonic()

    def _blocked(self) -> bool:
        """True while a recent failure says to leave the backend alone."""
        if self._health.down_until > time.monotonic():
            if self.on_unavailable == "raise":
                msg = (
                    f"cache {self.namespace!r}: the backend is unavailable (it failed less than "
                    f"retry_interval={self.retry_interval}s ago)"
                )
                raise CacheUnavailable(msg)
            return True
        return False

    def _mark_down(self) -> None:
        health = self._health
        now = time.monotonic()
        health.down_until = now + self.retry_interval
        if health.down_since is None:
            health.down_since = now
        health.degraded = True

    def _failed(self, exc: CacheUnavailable, op: str) -> None:
        self._mark_down()
        if self.on_unavailable == "raise":
            raise exc
        # One warning per outage and then one a minute, not one per request.
        health = self._health
        now = time.monotonic()
        if now - health.last_warning >= 60 or health.last_warning < (health.down_since or now):
            health.last_warning = now
            logger.warning(
                "cache %s: %s failed, the backend is unavailable (%s); reads miss and writes "
                "are dropped until it answers again",
                self.namespace, op, str(exc),
                extra={"polydatum_cache": self.namespace},
            )

    def _settle(self) -> None:
        """After a successful operation: log the recovery, clear the flag if nothing waits."""
        health = self._health
        if health.down_since is not None:
            logger.warning(
                "cache %s: backend reachable again after %.1fs",
                self.namespace, time.monotonic() - health.down_since,
                extra={"polydatum_cache": self.namespace},
            )
            health.down_since = None
        with health.mutex:
            health.degraded = bool(health.undelivered or health.undelivered_prefixes)

    def _keep_undelivered(self, keys: Sequence[str] = (), prefix: str | None = None) -> None:
        """Remember deletes the backend missed, to replay them before anything else."""
        health = self._health
        with health.mutex:
            if prefix is not None:
                health.undelivered_prefixes.add(prefix)
            elif len(health.undelivered) + len(keys) <= self.max_undelivered:
                health.undelivered.update(keys)
            else:
                # Too many to remember one by one: drop the whole namespace instead.
                health.undelivered.clear()
                health.undelivered_prefixes.add(f"{self.namespace}:")
            health.degraded = True
        self._schedule_replay()

    def _schedule_replay(self) -> None:  # pragma: no cover - overridden by both caches
        pass

    def _undelivered(self) -> tuple[list[str], list[str]]:
        health = self._health
        with health.mutex:
            return sorted(health.undelivered), sorted(health.undelivered_prefixes)

    def _delivered(self, keys: list[str], prefixes: list[str]) -> None:
        health = self._health
        with health.mutex:
            health.undelivered.difference_update(keys)
            health.undelivered_prefixes.difference_update(prefixes)
        logger.warning(
            "cache %s: delivered %d deletes and %d clears held while the backend was unavailable",
            self.namespace, len(keys), len(prefixes),
            extra={"polydatum_cache": self.namespace},
        )

    def _bind(self: C, ctx: DataAccessContext) -> C:
        """A copy of this cache for ``ctx`` (what ``ctx.<name>`` returns); state is shared."""
        # Cheaper than copy.copy, which matters once per context.
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)
        bound._ctx = ctx
        bound._origin = self._origin or self
        return bound

    def _resource(self, dm: DataManager, name: str) -> None:
        def cache_resource(ctx: DataAccessContext) -> Any:
            yield self._bind(ctx)

        dm.register_resources(**{name: cache_resource})

    def _defer(self, keys: Sequence[str], ctx: DataAccessContext | None, flush: Any) -> None:
        ctx = ctx if ctx is not None else self._ctx
        if ctx is None:
            msg = (
                "invalidate() must know which context's commit to wait for; call it on the "
                "cache resource (ctx.cache.invalidate(...)) or pass ctx=, or call delete_many() "
                "to delete at once"
            )
            raise CacheError(msg)
        pending = self._health.pending.setdefault(ctx, set())
        first = not pending
        pending.update(keys)
        if first:
            ctx.on_commit(flush, ctx)
            ctx.on_rollback(self._health.pending.pop, ctx, None)

    def is_pending(self, ctx: DataAccessContext | None, key: str) -> bool:
        """True when ``key`` was invalidated in ``ctx`` and waits for its commit."""
        waiting = self._health.pending
        if not waiting or ctx is None:  # the common case: nothing invalidated
            return False
        pending = waiting.get(ctx)
        return pending is not None and key in pending

    def _pop_pending(self, ctx: DataAccessContext) -> list[str]:
        # Each key goes with its claim, so a cached() caller that read the
        # database before the commit cannot store its stale result afterwards.
        keys = sorted(self._health.pending.pop(ctx, ()))
        return [*keys, *(k + CLAIM for k in keys)]

    def _new_token(self) -> bytes:
        return self._encode(uuid.uuid4().hex)


class Cache(_CacheBase):
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
        max_undelivered: how many missed deletes to remember while the backend
            is down (they are replayed once it answers); past that, the whole
            namespace is cleared on recovery instead.

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
    ) -> None:
        super().__init__(
            namespace=namespace, version=version, serializer=serializer,
            on_unavailable=on_unavailable, retry_interval=retry_interval,
            max_undelivered=max_undelivered,
        )
        self.backend: CacheBackend = backend if backend is not None else MemoryBackend()
        self._backend_obj = self.backend

    def namespaced(self, name: str, *, version: int | str | None = None) -> Cache:
        """A cache on the same backend under ``"<namespace>:<name>"``.

        Clearing this cache's namespace also clears the child's.
        """
        return Cache(
            self.backend, namespace=f"{self.namespace}:{name}",
            version=self.version if version is None else version, serializer=self.serializer,
            on_unavailable=self.on_unavailable, retry_interval=self.retry_interval,
            max_undelivered=self.max_undelivered,
        )

    def install(self, dm: DataManager, name: str = "cache") -> Cache:
        """Register this cache as the resource ``name``.

        ``ctx.<name>`` is then this cache, bound to the context so that
        :meth:`invalidate` waits for that context's commit. It costs nothing
        until used: the backend is only contacted by an operation.

        Returns:
            the cache itself.
        """
        self._resource(dm, name)
        return self

    def _call(self, op: str, fn: Callable[..., T], *args: Any) -> T | Any:
        if self._health.degraded and not self._ready(op):
            return MISS
        try:
            result = fn(*args)
        except CacheUnavailable as exc:
            self._failed(exc, op)
            return MISS
        if self._health.degraded:
            self._settle()
        return result

    def _ready(self, op: str) -> bool:
        """After a failure: False while the backend is left alone, else replay missed deletes."""
        if self._blocked():
            return False
        try:
            self._replay()
        except CacheUnavailable as exc:
            self._failed(exc, op)
            return False
        return True

    def _replay(self) -> None:
        keys, prefixes = self._undelivered()
        if not keys and not prefixes:
            return
        for prefix in prefixes:
            self.backend.clear(prefix)
        for i in range(0, len(keys), 1000):
            self.backend.delete_many(keys[i : i + 1000])
        self._delivered(keys, prefixes)

    def _schedule_replay(self) -> None:
        # A thread replays missed deletes every retry_interval until they are
        # delivered, so other processes stop reading stale entries soon after
        # the backend is back even when this process makes no cache call.
        health = self._health
        with health.mutex:
            if health.retry is not None:
                return
            timer = threading.Timer(
                max(self.retry_interval, 0.01), _replay_in_background, (weakref.ref(self._origin or self),)
            )
            timer.daemon = True
            health.retry = timer
        timer.start()

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value stored at ``key``, or ``default`` on a miss."""
        data = self._call("get", self.backend.get, self._prefix + key)
        if data is None or data is MISS:
            return default
        value = self._decode(data, key)
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
        return result

    def _set(self, key: str, value: Any, ttl: TTL, when: When) -> bool:
        data = self._encode(value)
        done = self._call(when, self.backend.set, self._prefix + key, data, _ttl_ms(ttl), when)
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
        return self._call("set_many", self.backend.set_many, data, _ttl_ms(ttl)) is None

    def delete(self, key: str) -> bool:
        """Delete ``key``; True when it existed."""
        return bool(self.delete_many([key]))

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete the keys; return how many existed.

        While the backend is unavailable the deletes are remembered and
        replayed before this cache does anything else once it answers again.
        """
        full = [self._prefix + k for k in keys]
        if not full:
            return 0
        try:
            deleted = self._call("delete_many", self.backend.delete_many, full)
        except CacheUnavailable:
            self._keep_undelivered(full)
            raise
        if deleted is MISS:
            self._keep_undelivered(full)
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

        Args:
            namespace: clear only the child namespace ``"<namespace>:<name>"``
                (see :meth:`namespaced`).

        Returns:
            how many entries were deleted.
        """
        prefix = f"{self.namespace}:" if namespace is None else f"{self.namespace}:{namespace}:"
        try:
            deleted = self._call("clear", self.backend.clear, prefix)
        except CacheUnavailable:
            self._keep_undelivered(prefix=prefix)
            raise
        if deleted is MISS:
            self._keep_undelivered(prefix=prefix)
            return 0
        return int(deleted)

    def lock(
        self, name: str, timeout: float, *, blocking_timeout: float | None = 10.0
    ) -> CacheLock:
        """A lock named ``name`` in this namespace, expiring ``timeout`` seconds after it is taken.

        Use it as ``with cache.lock("report", timeout=30):``. Entering raises
        :class:`LockNotAcquired` after ``blocking_timeout`` seconds (None waits
        forever); leaving raises :class:`LockExpired` when the lock ran out.
        Locks raise :class:`CacheUnavailable` when the backend is down, whatever
        ``on_unavailable`` says: a lock that silently does nothing is worse.
        """
        if not timeout > 0:
            msg = f"lock timeout must be positive seconds, got {timeout!r}; locks always expire"
            raise ValueError(msg)
        return self.backend.lock(f"{self.namespace}:lock:{name}", timeout, blocking_timeout)

    def ping(self) -> bool:
        """True when the backend answers; never raises."""
        try:
            return self.backend.ping()
        except CacheUnavailable:
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
        self._defer(keys, ctx, self._flush)

    def _flush(self, ctx: DataAccessContext) -> int:
        return self.delete_many(self._pop_pending(ctx))

    # -- claims, for cached() -------------------------------------------------

    def _claim(self, key: str, ttl: float) -> bytes | None:
        """Claim the computing of ``key`` for ``ttl`` seconds; the token, or None if taken."""
        token = self._new_token()
        claim = self._prefix + key + CLAIM
        done = self._call("add", self.backend.set, claim, token, _ttl_ms(ttl), "absent")
        return token if done is True else None

    def _is_claimed(self, key: str) -> bool:
        found = self._call("get", self.backend.get, self._prefix + key + CLAIM)
        return found is not None and found is not MISS

    def _store_claimed(self, key: str, value: Any, ttl: TTL, token: bytes) -> bool:
        """Store ``value`` only while our claim on ``key`` is intact; True when stored."""
        full = self._prefix + key
        data = self._encode(value)
        done = self._call("set", self.backend.set_guarded, full, data, _ttl_ms(ttl), full + CLAIM, token)
        return done is True

    def _release_claim(self, key: str, token: bytes) -> None:
        self._call("delete", self.backend.delete_if, self._prefix + key + CLAIM, token)


def _replay_in_background(ref: weakref.ref[Cache]) -> None:
    cache = ref()
    if cache is None:
        return  # nobody can read through this cache any more
    health = cache._health
    with health.mutex:
        health.retry = None
    try:
        cache._replay()
    except CacheUnavailable:
        cache._mark_down()
        cache._schedule_replay()
        return
    except Exception:  # a thread must not die with a traceback; keep trying
        logger.exception("cache %s: replaying missed deletes failed", cache.namespace)
        cache._schedule_replay()
        return
    cache._settle()


class AsyncCache(_CacheBase):
    """The awaitable twin of :class:`Cache`, on an :class:`AsyncCacheBackend`.

    Same arguments as :class:`Cache`; the default backend is an
    :class:`AsyncMemoryBackend`. Every method is a coroutine except
    :meth:`lock` (use ``async with``), :meth:`key` and :meth:`invalidate`.

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
    ) -> None:
        super().__init__(
            namespace=namespace, version=version, serializer=serializer,
            on_unavailable=on_unavailable, retry_interval=retry_interval,
            max_undelivered=max_undelivered,
        )
        self.backend: AsyncCacheBackend = (
            backend if backend is not None else AsyncMemoryBackend()
        )
        self._backend_obj = self.backend

    def namespaced(self, name: str, *, version: int | str | None = None) -> AsyncCache:
        """See :meth:`Cache.namespaced`."""
        return AsyncCache(
            self.backend, namespace=f"{self.namespace}:{name}",
            version=self.version if version is None else version, serializer=self.serializer,
            on_unavailable=self.on_unavailable, retry_interval=self.retry_interval,
            max_undelivered=self.max_undelivered,
        )

    def install(self, dm: DataManager, name: str = "cache") -> AsyncCache:
        """Register this cache as the resource ``name`` (``ctx.<name>``, sync or async contexts)."""
        self._resource(dm, name)
        return self

    async def _call(self, op: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if self._health.degraded and not await self._ready(op):
            return MISS
        try:
            result = await fn(*args)
        except CacheUnavailable as exc:
            self._failed(exc, op)
            return MISS
        if self._health.degraded:
            self._settle()
        return result

    async def _ready(self, op: str) -> bool:
        """See :meth:`Cache._ready`."""
        if self._blocked():
            return False
        try:
            await self._replay()
        except CacheUnavailable as exc:
            self._failed(exc, op)
            return False
        return True

    async def _replay(self) -> None:
        keys, prefixes = self._undelivered()
        if not keys and not prefixes:
            return
        for prefix in prefixes:
            await self.backend.clear(prefix)
        for i in range(0, len(keys), 1000):
            await self.backend.delete_many(keys[i : i + 1000])
        self._delivered(keys, prefixes)

    def _schedule_replay(self) -> None:
        # As Cache does with a thread, but on the running loop (the backend's
        # connections belong to it); outside a loop the next operation replays.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        health = self._health
        if health.retry is not None and not health.retry[0].is_closed():
            return
        ref = weakref.ref(cast("AsyncCache", self._origin or self))

        def fire() -> None:
            health.retry = None
            cache = ref()
            if cache is not None:
                task = loop.create_task(_areplay_in_background(cache))
                health.retry = (loop, task)  # keeps the task referenced while it runs

        health.retry = (loop, loop.call_later(max(self.retry_interval, 0.01), fire))

    async def get(self, key: str, default: Any = None) -> Any:
        """See :meth:`Cache.get`."""
        data = await self._call("get", self.backend.get, self._prefix + key)
        if data is None or data is MISS:
            return default
        value = self._decode(data, key)
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
        return result

    async def _set(self, key: str, value: Any, ttl: TTL, when: When) -> bool:
        data = self._encode(value)
        ttl_ms = _ttl_ms(ttl)
        done = await self._call(when, self.backend.set, self._prefix + key, data, ttl_ms, when)
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
        return await self._call("set_many", self.backend.set_many, data, _ttl_ms(ttl)) is None

    async def delete(self, key: str) -> bool:
        """See :meth:`Cache.delete`."""
        return bool(await self.delete_many([key]))

    async def delete_many(self, keys: Iterable[str]) -> int:
        """See :meth:`Cache.delete_many`."""
        full = [self._prefix + k for k in keys]
        if not full:
            return 0
        try:
            deleted = await self._call("delete_many", self.backend.delete_many, full)
        except CacheUnavailable:
            self._keep_undelivered(full)
            raise
        if deleted is MISS:
            self._keep_undelivered(full)
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
        except CacheUnavailable:
            self._keep_undelivered(prefix=prefix)
            raise
        if deleted is MISS:
            self._keep_undelivered(prefix=prefix)
            return 0
        return int(deleted)

    def lock(self, name: str, timeout: float, *, blocking_timeout: float | None = 10.0) -> Any:
        """See :meth:`Cache.lock`; use it as ``async with cache.lock(...):``."""
        if not timeout > 0:
            msg = f"lock timeout must be positive seconds, got {timeout!r}; locks always expire"
            raise ValueError(msg)
        return self.backend.lock(f"{self.namespace}:lock:{name}", timeout, blocking_timeout)

    async def aping(self) -> bool:
        """True when the backend answers; never raises."""
        try:
            return await self.backend.ping()
        except CacheUnavailable:
            return False

    def invalidate(self, *keys: str, ctx: DataAccessContext | None = None) -> None:
        """See :meth:`Cache.invalidate`; the context awaits the deletion (``async with``)."""
        self._defer(keys, ctx, self._flush)

    async def _flush(self, ctx: DataAccessContext) -> int:
        return await self.delete_many(self._pop_pending(ctx))

    # -- claims, for cached() (see Cache) ---------------------------------------

    async def _claim(self, key: str, ttl: float) -> bytes | None:
        token = self._new_token()
        claim = self._prefix + key + CLAIM
        done = await self._call("add", self.backend.set, claim, token, _ttl_ms(ttl), "absent")
        return token if done is True else None

    async def _is_claimed(self, key: str) -> bool:
        found = await self._call("get", self.backend.get, self._prefix + key + CLAIM)
        return found is not None and found is not MISS

    async def _store_claimed(self, key: str, value: Any, ttl: TTL, token: bytes) -> bool:
        full = self._prefix + key
        data = self._encode(value)
        done = await self._call(
            "set", self.backend.set_guarded, full, data, _ttl_ms(ttl), full + CLAIM, token
        )
        return done is True

    async def _release_claim(self, key: str, token: bytes) -> None:
        await self._call("delete", self.backend.delete_if, self._prefix + key + CLAIM, token)


async def _areplay_in_background(cache: AsyncCache) -> None:
    health = cache._health
    try:
        await cache._replay()
    except CacheUnavailable:
        health.retry = None
        cache._mark_down()
        cache._schedule_replay()
        return
    except Exception:  # keep trying rather than leave an exception in a forgotten task
        logger.exception("cache %s: replaying missed deletes failed", cache.namespace)
        health.retry = None
        cache._schedule_replay()
        return
    health.retry = None
    cache._settle()

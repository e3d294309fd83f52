"""The backend protocols and the in-process memory backend."""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Protocol

from polydatum.cache._errors import CounterError
from polydatum.cache._locks import AsyncMemoryLock, MemoryLock

_INT64 = (-(2**63), 2**63 - 1)
_INTEGER = re.compile(rb"-?[0-9]+")

When = Literal["always", "absent", "present"]


class CacheLock(Protocol):
    """**Protocol:** a named lock with an expiry, used as ``with cache.lock(...):``.

    .. versionadded:: 2.0
    """

    name: str

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock, waiting up to ``blocking_timeout``; False when not taken."""

    def release(self) -> None:
        """Give the lock back; :class:`LockExpired` when it had already expired."""

    def locked(self) -> bool:
        """True when anyone holds the lock."""

    def __enter__(self) -> CacheLock: ...

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class CacheBackend(Protocol):
    """**Protocol:** storage for :class:`Cache`, in full keys and raw bytes.

    Methods raise :class:`CacheUnavailable` when the store cannot be reached
    and :class:`CounterError` from :meth:`incr` on a non-integer value. TTLs
    are whole milliseconds; ``None`` means no expiry.

    .. versionadded:: 2.0
    """

    def get(self, key: str) -> bytes | None: ...
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...
    def set(self, key: str, value: bytes, ttl_ms: int | None, when: When) -> bool: ...
    def set_many(self, items: Mapping[str, bytes], ttl_ms: int | None) -> None: ...
    def delete_many(self, keys: Sequence[str]) -> int: ...
    def incr(self, key: str, delta: int) -> int: ...
    def pttl(self, key: str) -> int | None:
        """Milliseconds left, -1 when the key never expires, None when it is missing."""

    def clear(self, prefix: str) -> int: ...
    def set_guarded(self, key: str, value: bytes, ttl_ms: int | None, guard: str, token: bytes) -> bool:
        """Atomically: if ``guard`` holds ``token``, store ``value`` and delete ``guard``."""

    def delete_if(self, key: str, token: bytes) -> bool:
        """Atomically delete ``key`` if it holds ``token``; True when deleted."""

    def compare_and_set(self, key: str, expected: bytes, value: bytes) -> bool:
        """Atomically: if ``key`` holds ``expected``, store ``value`` keeping the key's TTL.

        False when the key holds anything else or is missing. Cache models
        build atomic partial updates and counters on it (read, change, retry).

        .. versionadded:: 2.0
        """

    def touch(self, key: str, ttl_ms: int | None) -> bool:
        """Give ``key`` a new TTL (None: never expire); False when it is missing.

        .. versionadded:: 2.0
        """

    def lock(self, key: str, timeout: float, blocking_timeout: float | None) -> CacheLock: ...
    def ping(self) -> bool: ...


class AsyncCacheBackend(Protocol):
    """**Protocol:** the awaitable twin of :class:`CacheBackend` for :class:`AsyncCache`.

    .. versionadded:: 2.0
    """

    async def get(self, key: str) -> bytes | None: ...
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...
    async def set(self, key: str, value: bytes, ttl_ms: int | None, when: When) -> bool: ...
    async def set_many(self, items: Mapping[str, bytes], ttl_ms: int | None) -> None: ...
    async def delete_many(self, keys: Sequence[str]) -> int: ...
    async def incr(self, key: str, delta: int) -> int: ...
    async def pttl(self, key: str) -> int | None: ...
    async def clear(self, prefix: str) -> int: ...
    async def set_guarded(
        self, key: str, value: bytes, ttl_ms: int | None, guard: str, token: bytes
    ) -> bool: ...
    async def delete_if(self, key: str, token: bytes) -> bool: ...
    async def compare_and_set(self, key: str, expected: bytes, value: bytes) -> bool: ...
    async def touch(self, key: str, ttl_ms: int | None) -> bool: ...
    def lock(self, key: str, timeout: float, blocking_timeout: float | None) -> Any: ...
    async def ping(self) -> bool: ...


class MemoryBackend:
    """An in-process backend: thread-safe, with TTLs and a bound on the entry count.

    Least recently used entries are evicted once ``max_entries`` is reached.
    Each process has its own copy, so it suits tests, scripts and single-process
    apps; share one instance between caches to share the data.

    Args:
        max_entries: the most entries kept at once.
        clock: seconds as a float, monotonic (tests may pass a fake).

    .. versionadded:: 2.0
    """

    def __init__(self, max_entries: int = 10_000, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            msg = f"max_entries must be at least 1, got {max_entries!r}"
            raise ValueError(msg)
        self.max_entries = max_entries
        self._clock = clock
        # key -> (value, expires_at or None); order = least recently used first.
        self._data: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            now = self._clock()
            return sum(1 for _, exp in self._data.values() if exp is None or exp > now)

    def _live(self, key: str, now: float) -> tuple[bytes, float | None] | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry

    def _store(self, key: str, value: bytes, expires: float | None) -> None:
        self._data[key] = (value, expires)
        self._data.move_to_end(key)
        if len(self._data) > self.max_entries:
            now = self._clock()
            expired = [k for k, (_, exp) in self._data.items() if exp is not None and exp <= now]
            for stale in expired:
                del self._data[stale]
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def _expiry(self, ttl_ms: int | None) -> float | None:
        return None if ttl_ms is None else self._clock() + ttl_ms / 1000

    def get(self, key: str) -> bytes | None:
        """Return the stored bytes, or None."""
        with self._lock:
            entry = self._live(key, self._clock())
            return None if entry is None else entry[0]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the stored bytes (or None) for each key, in order."""
        with self._lock:
            now = self._clock()
            return [None if (e := self._live(k, now)) is None else e[0] for k in keys]

    def set(self, key: str, value: bytes, ttl_ms: int | None, when: When) -> bool:
        """Store ``value``; ``when`` is ``"absent"`` (add) or ``"present"`` (replace) or both."""
        with self._lock:
            if when != "always":
                exists = self._live(key, self._clock()) is not None
                if exists != (when == "present"):
                    return False
            self._store(key, value, self._expiry(ttl_ms))
            return True

    def set_many(self, items: Mapping[str, bytes], ttl_ms: int | None) -> None:
        """Store every item with the same TTL."""
        with self._lock:
            expires = self._expiry(ttl_ms)
            for key, value in items.items():
                self._store(key, value, expires)

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete the keys; return how many existed."""
        with self._lock:
            now = self._clock()
            found = [k for k in keys if self._live(k, now) is not None]
            for key in found:
                del self._data[key]
            return len(found)

    def incr(self, key: str, delta: int) -> int:
        """Add ``delta`` to an integer counter (a missing one counts from 0), keeping its TTL."""
        with self._lock:
            entry = self._live(key, self._clock())
            value, expires = entry if entry is not None else (b"0", None)
            # Only the plain digits Cache stores for ints count, as in Redis.
            number = int(value) + delta if _INTEGER.fullmatch(value) else None
            if number is None or not _INT64[0] <= number <= _INT64[1]:
                msg = "value is not an integer or out of range"
                raise CounterError(msg)
            self._store(key, str(number).encode(), expires)
            return number

    def pttl(self, key: str) -> int | None:
        """Milliseconds left, -1 for no expiry, None when missing."""
        with self._lock:
            now = self._clock()
            entry = self._live(key, now)
            if entry is None:
                return None
            return -1 if entry[1] is None else max(1, math.ceil((entry[1] - now) * 1000))

    def clear(self, prefix: str) -> int:
        """Delete every key starting with ``prefix``; return how many."""
        with self._lock:
            doomed = [k for k in self._data if k.startswith(prefix)]
            for key in doomed:
                del self._data[key]
            return len(doomed)

    def set_guarded(self, key: str, value: bytes, ttl_ms: int | None, guard: str, token: bytes) -> bool:
        """If ``guard`` holds ``token``: store ``value`` at ``key``, delete ``guard``, True."""
        with self._lock:
            now = self._clock()
            entry = self._live(guard, now)
            if entry is None or entry[0] != token:
                return False
            del self._data[guard]
            self._store(key, value, self._expiry(ttl_ms))
            return True

    def delete_if(self, key: str, token: bytes) -> bool:
        """Delete ``key`` if it holds ``token``; True when deleted."""
        with self._lock:
            entry = self._live(key, self._clock())
            if entry is None or entry[0] != token:
                return False
            del self._data[key]
            return True

    def compare_and_set(self, key: str, expected: bytes, value: bytes) -> bool:
        """If ``key`` holds ``expected``: store ``value`` (same TTL), True."""
        with self._lock:
            entry = self._live(key, self._clock())
            if entry is None or entry[0] != expected:
                return False
            self._store(key, value, entry[1])
            return True

    def touch(self, key: str, ttl_ms: int | None) -> bool:
        """Give ``key`` a new TTL (None: never expire); False when missing."""
        with self._lock:
            entry = self._live(key, self._clock())
            if entry is None:
                return False
            self._store(key, entry[0], self._expiry(ttl_ms))
            return True

    def lock(self, key: str, timeout: float, blocking_timeout: float | None) -> MemoryLock:
        """An in-process lock stored in this backend (see :class:`MemoryLock`)."""
        return MemoryLock(self, key, timeout, blocking_timeout)

    def ping(self) -> bool:
        """Always True: the memory is right here."""
        return True


class AsyncMemoryBackend:
    """:class:`MemoryBackend` for :class:`AsyncCache` (pass one to share the data).

    .. versionadded:: 2.0
    """

    def __init__(self, backend: MemoryBackend | None = None) -> None:
        self.sync = backend if backend is not None else MemoryBackend()

    async def get(self, key: str) -> bytes | None:
        """See :meth:`MemoryBackend.get`."""
        return self.sync.get(key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """See :meth:`MemoryBackend.get_many`."""
        return self.sync.get_many(keys)

    async def set(self, key: str, value: bytes, ttl_ms: int | None, when: When) -> bool:
        """See :meth:`MemoryBackend.set`."""
        return self.sync.set(key, value, ttl_ms, when)

    async def set_many(self, items: Mapping[str, bytes], ttl_ms: int | None) -> None:
        """See :meth:`MemoryBackend.set_many`."""
        self.sync.set_many(items, ttl_ms)

    async def delete_many(self, keys: Sequence[str]) -> int:
        """See :meth:`MemoryBackend.delete_many`."""
        return self.sync.delete_many(keys)

    async def incr(self, key: str, delta: int) -> int:
        """See :meth:`MemoryBackend.incr`."""
        return self.sync.incr(key, delta)

    async def pttl(self, key: str) -> int | None:
        """See :meth:`MemoryBackend.pttl`."""
        return self.sync.pttl(key)

    async def clear(self, prefix: str) -> int:
        """See :meth:`MemoryBackend.clear`."""
        return self.sync.clear(prefix)

    async def set_guarded(self, key: str, value: bytes, ttl_ms: int | None, guard: str, token: bytes) -> bool:
        """See :meth:`MemoryBackend.set_guarded`."""
        return self.sync.set_guarded(key, value, ttl_ms, guard, token)

    async def delete_if(self, key: str, token: bytes) -> bool:
        """See :meth:`MemoryBackend.delete_if`."""
        return self.sync.delete_if(key, token)

    async def compare_and_set(self, key: str, expected: bytes, value: bytes) -> bool:
        """See :meth:`MemoryBackend.compare_and_set`."""
        return self.sync.compare_and_set(key, expected, value)

    async def touch(self, key: str, ttl_ms: int | None) -> bool:
        """See :meth:`MemoryBackend.touch`."""
        return self.sync.touch(key, ttl_ms)

    def lock(self, key: str, timeout: float, blocking_timeout: float | None) -> AsyncMemoryLock:
        """An awaitable in-process lock (``async with``)."""
        return AsyncMemoryLock(MemoryLock(self.sync, key, timeout, blocking_timeout))

    async def ping(self) -> bool:
        """Always True."""
        return True

"""An :class:`AsyncCacheBackend` made from a blocking one, each call in a worker thread.

For backends whose client has no asyncio flavour (pymemcache, the file
system): the event loop never blocks on their I/O, at the cost of a thread
hop per call (``asyncio.to_thread``, the loop's default executor).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from polydatum.cache._backends import CacheBackend, When
from polydatum.cache._locks import AsyncLockBase, deadline


class TokenLock(Protocol):
    """**Protocol:** a lock that can be taken and released by token (not thread-bound)."""

    name: str
    timeout: float
    blocking_timeout: float | None

    def take(self) -> bytes | None: ...
    def release_token(self, token: bytes | None) -> None: ...
    def locked(self) -> bool: ...


class ThreadedAsyncLock(AsyncLockBase):
    """``async with`` face of a token lock, its I/O in a worker thread.

    .. versionadded:: 2.0
    """

    def __init__(self, lock: TokenLock) -> None:
        super().__init__(lock.name, lock.timeout, lock.blocking_timeout)
        self._lock = lock
        self._token: bytes | None = None

    async def acquire(self, blocking: bool = True) -> bool:
        """Take the lock without blocking the event loop."""
        until = deadline(self.blocking_timeout)
        while True:
            # Tasks share a thread, so the token lives here, not thread-locally.
            self._token = await asyncio.to_thread(self._lock.take)
            if self._token is not None:
                return True
            if not blocking or (until is not None and time.monotonic() >= until):
                return False
            await asyncio.sleep(0.01)

    async def release(self) -> None:
        """Release the lock; :class:`LockExpired` when it expired first."""
        token, self._token = self._token, None
        await asyncio.to_thread(self._lock.release_token, token)

    async def locked(self) -> bool:
        """True when anyone holds the lock."""
        return await asyncio.to_thread(self._lock.locked)


class ThreadedAsyncBackend:
    """An :class:`AsyncCacheBackend` running a :class:`CacheBackend`'s calls in worker threads.

    Args:
        sync: the blocking backend; also what ``AsyncCache(sync_backend=...)``
            takes, as it is the same store.

    .. versionadded:: 2.0
    """

    def __init__(self, sync: CacheBackend) -> None:
        self.sync = sync

    async def get(self, key: str) -> bytes | None:
        """See :meth:`CacheBackend.get`."""
        return await asyncio.to_thread(self.sync.get, key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """See :meth:`CacheBackend.get_many`."""
        return await asyncio.to_thread(self.sync.get_many, keys)

    async def set(self, key: str, value: bytes, ttl_ms: int | None, when: When) -> bool:
        """See :meth:`CacheBackend.set`."""
        return await asyncio.to_thread(self.sync.set, key, value, ttl_ms, when)

    async def set_many(self, items: Mapping[str, bytes], ttl_ms: int | None) -> None:
        """See :meth:`CacheBackend.set_many`."""
        await asyncio.to_thread(self.sync.set_many, items, ttl_ms)

    async def delete_many(self, keys: Sequence[str]) -> int:
        """See :meth:`CacheBackend.delete_many`."""
        return await asyncio.to_thread(self.sync.delete_many, keys)

    async def incr(self, key: str, delta: int) -> int:
        """See :meth:`CacheBackend.incr`."""
        return await asyncio.to_thread(self.sync.incr, key, delta)

    async def pttl(self, key: str) -> int | None:
        """See :meth:`CacheBackend.pttl`."""
        return await asyncio.to_thread(self.sync.pttl, key)

    async def clear(self, prefix: str) -> int:
        """See :meth:`CacheBackend.clear`."""
        return await asyncio.to_thread(self.sync.clear, prefix)

    async def set_guarded(self, key: str, value: bytes, ttl_ms: int | None, guard: str, token: bytes) -> bool:
        """See :meth:`CacheBackend.set_guarded`."""
        return await asyncio.to_thread(self.sync.set_guarded, key, value, ttl_ms, guard, token)

    async def delete_if(self, key: str, token: bytes) -> bool:
        """See :meth:`CacheBackend.delete_if`."""
        return await asyncio.to_thread(self.sync.delete_if, key, token)

    async def compare_and_set(self, key: str, expected: bytes, value: bytes) -> bool:
        """See :meth:`CacheBackend.compare_and_set`."""
        return await asyncio.to_thread(self.sync.compare_and_set, key, expected, value)

    async def touch(self, key: str, ttl_ms: int | None) -> bool:
        """See :meth:`CacheBackend.touch`."""
        return await asyncio.to_thread(self.sync.touch, key, ttl_ms)

    def lock(self, key: str, timeout: float, blocking_timeout: float | None) -> ThreadedAsyncLock:
        """An ``async with`` lock on the blocking backend's lock (which must have ``take``)."""
        lock = self.sync.lock(key, timeout, blocking_timeout)
        if not hasattr(lock, "take") or not hasattr(lock, "release_token"):
            msg = (
                f"{type(lock).__name__} cannot be used from asyncio: it needs take() and "
                "release_token() (see polydatum.cache.MemoryLock)"
            )
            raise TypeError(msg)
        return ThreadedAsyncLock(lock)  # type: ignore[arg-type]

    async def ping(self) -> bool:
        """See :meth:`CacheBackend.ping`."""
        return await asyncio.to_thread(self.sync.ping)

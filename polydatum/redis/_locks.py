"""Locks on redis-py's ``Lock``, with polydatum's errors (see :class:`~polydatum.cache.LockBase`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from redis.exceptions import LockError as _RedisLockError
from redis.exceptions import LockNotOwnedError

from polydatum.cache import AsyncLockBase, LockBase
from polydatum.cache._base import lock_seconds
from polydatum.redis._connections import UNAVAILABLE, unavailable

if TYPE_CHECKING:
    from polydatum.redis._connections import AsyncClient, SyncClient


@contextmanager
def translated(lock: RedisLock | AsyncRedisLock, doing: str, *, by_thread: bool = True) -> Iterator[None]:
    """redis-py's lock errors as polydatum's, for ``doing`` (e.g. ``"releasing"``) ``lock``."""
    try:
        yield
    except LockNotOwnedError:
        raise lock.expired_error() from None
    except _RedisLockError:
        raise lock.not_held_error(doing, by_thread=by_thread) from None
    except UNAVAILABLE as exc:
        raise unavailable(exc) from exc


class RedisLock(LockBase):
    """redis-py's ``Lock`` with polydatum's errors; use it with ``with``.

    Entering waits up to ``blocking_timeout`` seconds (None: forever), then
    raises :class:`~polydatum.cache.LockNotAcquired`. The lock expires
    ``timeout`` seconds after it was taken, so a crashed holder never blocks
    the others for good; leaving after it expired raises
    :class:`~polydatum.cache.LockExpired`, because someone else may have held
    it meanwhile. :class:`~polydatum.cache.CacheUnavailable` when Redis is down.

    .. versionadded:: 2.0
    """

    def __init__(self, client: SyncClient, name: str, timeout: float, blocking_timeout: float | None) -> None:
        super().__init__(name, timeout, blocking_timeout)
        self.lock = client.lock(name, timeout=timeout, sleep=0.01, blocking_timeout=blocking_timeout)

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking``, retry until ``blocking_timeout`` passes."""
        try:
            return bool(self.lock.acquire(blocking=blocking))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    def _check_held(self, doing: str) -> None:
        # redis-py keeps the token in a thread-local that only the thread which
        # made the lock starts with: elsewhere it is missing (an AttributeError).
        if getattr(self.lock.local, "token", None) is None:
            raise self.not_held_error(doing)

    def release(self) -> None:
        """Release the lock; :class:`~polydatum.cache.LockExpired` when it expired first.

        Raises:
            LockError: this thread does not hold it (a lock is released by the
                thread that acquired it).
        """
        self._check_held("releasing")
        with translated(self, "releasing"):
            self.lock.release()

    def extend(self, seconds: float) -> None:
        """Give the held lock ``seconds`` more before it expires.

        Raises:
            TypeError: ``seconds`` is not a number of seconds.
            ValueError: ``seconds`` is under a millisecond (a negative one would
                shorten the lock) or not finite.
        """
        seconds = lock_seconds(seconds, "extend() seconds")
        self._check_held("extending")
        with translated(self, "extending"):
            self.lock.extend(seconds)

    def locked(self) -> bool:
        """True when anyone holds the lock."""
        try:
            return bool(self.lock.locked())
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc


class AsyncRedisLock(AsyncLockBase):
    """:class:`RedisLock` for ``async with``, on ``redis.asyncio``'s ``Lock``.

    .. versionadded:: 2.0
    """

    def __init__(
        self, client: AsyncClient, name: str, timeout: float, blocking_timeout: float | None
    ) -> None:
        super().__init__(name, timeout, blocking_timeout)
        # Tasks share a thread, so the token must not live in a thread-local.
        self.lock = client.lock(
            name,
            timeout=timeout,
            sleep=0.01,
            blocking_timeout=blocking_timeout,
            thread_local=False,
        )

    async def acquire(self, blocking: bool = True) -> bool:
        """Take the lock without blocking the event loop."""
        try:
            return bool(await self.lock.acquire(blocking=blocking))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    async def release(self) -> None:
        """Release; :class:`~polydatum.cache.LockExpired` when it expired first."""
        # Tasks share the token, so no "by this thread" here.
        with translated(self, "releasing", by_thread=False):
            await self.lock.release()

    async def locked(self) -> bool:
        """True when anyone holds the lock."""
        try:
            return bool(await self.lock.locked())
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

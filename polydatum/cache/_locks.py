"""Locks: the base classes every backend's lock shares, and the in-process lock.

A backend's lock (memory, Redis, Memcached...) subclasses :class:`LockBase`
(or :class:`AsyncLockBase`) and supplies the I/O: ``acquire``, ``release``
and ``locked``. The base gives it ``with`` (``async with``) and the errors,
so every backend refuses and reports the same way.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from types import TracebackType
from typing import TYPE_CHECKING

from polydatum.cache._errors import LockError, LockExpired, LockNotAcquired

if TYPE_CHECKING:
    from typing_extensions import Self

    from polydatum.cache._backends import CacheBackend


class _LockErrors:
    """A lock's name, timeouts and the errors built from them (for subclasses to raise)."""

    def __init__(self, name: str, timeout: float, blocking_timeout: float | None) -> None:
        self.name = name
        self.timeout = timeout
        self.blocking_timeout = blocking_timeout

    def not_acquired_error(self) -> LockNotAcquired:
        """The error for an ``acquire`` that gave up after ``blocking_timeout``."""
        msg = (
            f"could not acquire lock {self.name!r} within blocking_timeout={self.blocking_timeout}s: "
            "another holder has it; retry later or pass a longer blocking_timeout"
        )
        return LockNotAcquired(msg)

    def expired_error(self) -> LockExpired:
        """The error for a release (or extension) that found the lock expired (maybe taken since)."""
        msg = (
            f"lock {self.name!r} expired before it was released (held longer than "
            f"timeout={self.timeout}s), so another holder may have run at the same time; "
            "pass a longer timeout"
        )
        return LockExpired(msg)

    def not_held_error(self, doing: str, *, by_thread: bool = True) -> LockError:
        """The error for ``doing`` (e.g. ``"releasing"``) a lock its caller does not hold.

        Args:
            doing: what was attempted, as a gerund.
            by_thread: say "by this thread" (False where tasks share the lock's token).
        """
        holder = " by this thread" if by_thread else ""
        msg = f"lock {self.name!r} is not held{holder}; acquire it before {doing}"
        return LockError(msg)


class LockBase(_LockErrors):
    """Base class of a named lock with an expiry, used as ``with cache.lock(...):``.

    Subclasses implement :meth:`acquire`, :meth:`release` and :meth:`locked`;
    entering raises :class:`LockNotAcquired` when :meth:`acquire` gives up,
    leaving releases. They raise the errors the base builds, worded alike
    for every backend: ``not_acquired_error()``, ``expired_error()`` (a
    :class:`LockExpired`) and ``not_held_error(doing, by_thread=True)`` (a
    :class:`LockError`).

    Args:
        name: the lock's key in the backend.
        timeout: seconds after which a held lock expires.
        blocking_timeout: seconds :meth:`acquire` waits (None: forever).

    .. versionadded:: 2.0
    """

    def acquire(self, blocking: bool = True) -> bool:  # pragma: no cover - abstract
        """Take the lock, waiting up to ``blocking_timeout``; False when not taken."""
        raise NotImplementedError

    def release(self) -> None:  # pragma: no cover - abstract
        """Give the lock back; :class:`LockExpired` when it had already expired."""
        raise NotImplementedError

    def locked(self) -> bool:  # pragma: no cover - abstract
        """True when anyone holds the lock."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        if not self.acquire():
            raise self.not_acquired_error()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class AsyncLockBase(_LockErrors):
    """:class:`LockBase` for ``async with``: the three methods are coroutines.

    The same arguments and error builders as :class:`LockBase`.

    .. versionadded:: 2.0
    """

    async def acquire(self, blocking: bool = True) -> bool:  # pragma: no cover - abstract
        """Take the lock without blocking the event loop; False when not taken."""
        raise NotImplementedError

    async def release(self) -> None:  # pragma: no cover - abstract
        """Give the lock back; :class:`LockExpired` when it had already expired."""
        raise NotImplementedError

    async def locked(self) -> bool:  # pragma: no cover - abstract
        """True when anyone holds the lock."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        if not await self.acquire():
            raise self.not_acquired_error()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


def deadline(blocking_timeout: float | None) -> float | None:
    """When a wait of ``blocking_timeout`` seconds from now ends (monotonic), or None."""
    return None if blocking_timeout is None else time.monotonic() + blocking_timeout


class TokenLock(LockBase):
    """A lock held with a random token: :meth:`take` tries once, :meth:`release_token` gives it back.

    ``acquire``/``release`` keep the token per thread, as redis-py's ``Lock``
    does; a subclass supplies ``take``, ``release_token`` and ``locked``.

    .. versionadded:: 2.0
    """

    #: Seconds between two tries of a blocking ``acquire``.
    pause = 0.005

    def __init__(self, name: str, timeout: float, blocking_timeout: float | None) -> None:
        super().__init__(name, timeout, blocking_timeout)
        self._local = threading.local()

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking``, retry until ``blocking_timeout`` passes."""
        until = deadline(self.blocking_timeout)
        while True:
            token = self.take()
            if token is not None:
                self._local.token = token
                return True
            if not blocking or (until is not None and time.monotonic() >= until):
                return False
            time.sleep(self.pause)

    def release(self) -> None:
        """Release the lock; :class:`LockExpired` when it expired first."""
        token = getattr(self._local, "token", None)
        self._local.token = None
        self.release_token(token)

    def take(self) -> bytes | None:  # pragma: no cover - abstract
        """One try at the lock, not thread-bound: the token it is held with, or None."""
        raise NotImplementedError

    def release_token(self, token: bytes | None) -> None:  # pragma: no cover - abstract
        """Release the lock held with ``token`` (from :meth:`take`; None: not held)."""
        raise NotImplementedError


class BackendLock(TokenLock):
    """A token lock kept as an entry of any cache backend (an ``absent`` set, ``get``, ``delete_if``).

    It expires ``timeout`` seconds after it was taken, so a holder that dies
    never blocks the others for good; releasing an expired lock raises
    :class:`LockExpired`.

    .. versionadded:: 2.0
    """

    def __init__(
        self, backend: CacheBackend, name: str, timeout: float, blocking_timeout: float | None
    ) -> None:
        super().__init__(name, timeout, blocking_timeout)
        self._backend = backend

    def locked(self) -> bool:
        """True when anyone holds the lock."""
        return self._backend.get(self.name) is not None

    def take(self) -> bytes | None:
        """One try at the lock, not thread-bound: the token it is held with, or None."""
        token = uuid.uuid4().hex.encode()
        taken = self._backend.set(self.name, token, max(1, int(self.timeout * 1000)), "absent")
        return token if taken else None

    def release_token(self, token: bytes | None) -> None:
        """Release the lock held with ``token`` (from :meth:`take`; None: not held)."""
        if token is None:
            raise self.not_held_error("releasing")
        if not self._backend.delete_if(self.name, token):
            raise self.expired_error()


class MemoryLock(BackendLock):
    """A lock in a :class:`MemoryBackend`, with the semantics of redis-py's ``Lock``.

    It expires ``timeout`` seconds after it was taken, so a holder that dies
    never blocks the others for good; releasing an expired lock raises
    :class:`LockExpired`.

    .. versionadded:: 2.0
    """


class AsyncMemoryLock(AsyncLockBase):
    """``async with`` face of :class:`MemoryLock`; waits with ``asyncio.sleep``.

    .. versionadded:: 2.0
    """

    def __init__(self, lock: MemoryLock) -> None:
        super().__init__(lock.name, lock.timeout, lock.blocking_timeout)
        self._lock = lock
        self._token: bytes | None = None

    async def acquire(self, blocking: bool = True) -> bool:
        """Take the lock without blocking the event loop."""
        until = deadline(self.blocking_timeout)
        while True:
            # Tasks share a thread, so keep the token here, not thread-locally.
            self._token = self._lock.take()
            if self._token is not None:
                return True
            if not blocking or (until is not None and time.monotonic() >= until):
                return False
            await asyncio.sleep(0.005)

    async def release(self) -> None:
        """Release the lock; :class:`LockExpired` when it expired first."""
        token, self._token = self._token, None
        self._lock.release_token(token)

    async def locked(self) -> bool:
        """True when anyone holds the lock."""
        return self._lock.locked()

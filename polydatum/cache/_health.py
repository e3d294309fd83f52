"""Degraded mode: the circuit breaker and the replay of deletes a down backend missed.

One :class:`Health` (or :class:`AsyncHealth`) belongs to a cache and is shared
with its per-context copies. Its states, and what each cache operation does
in them:

=================================  ===========  ===================================
state                              ``degraded``  an operation
=================================  ===========  ===================================
healthy, nothing held              False        calls the backend (the fast path)
down (``down_until`` in future)    True         misses at once ("raise": raises)
retrying (``down_until`` passed)   True         replays held deletes, then calls
up, deletes still held             True         replays them first, then calls
=================================  ===========  ===================================

Deletes and clears the backend missed are held (up to ``max_undelivered``,
then as one clear of the namespace) and replayed before anything else once it
answers, and by a background retry every ``retry_interval`` (a thread for a
:class:`Cache`, a task on the running loop for an :class:`AsyncCache`), so
other processes stop reading stale entries even when this one is idle.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, Literal

from polydatum.cache._backends import AsyncCacheBackend, CacheBackend
from polydatum.cache._errors import CacheBusy, CacheUnavailable

logger = logging.getLogger("polydatum.cache")

# Keys deleted per backend call when replaying.
_BATCH = 1000


class Health:
    """The breaker and the held deletes of one cache on a :class:`CacheBackend`."""

    def __init__(
        self,
        backend: CacheBackend,
        *,
        namespace: str,
        on_unavailable: Literal["warn", "raise"],
        retry_interval: float,
        max_undelivered: int,
    ) -> None:
        self.backend = backend
        self.namespace = namespace
        self.on_unavailable = on_unavailable
        self.retry_interval = retry_interval
        self.max_undelivered = max_undelivered
        self.down_until = 0.0
        self.down_since: float | None = None
        self.last_warning = 0.0
        # True while the backend failed lately or deletes wait for it: the one
        # flag the fast path of every operation checks.
        self.degraded = False
        # Deletes and clears the backend missed while down (full keys and
        # prefixes), replayed before anything else once it answers again.
        self.undelivered_keys: set[str] = set()
        self.undelivered_prefixes: set[str] = set()
        self.mutex = threading.Lock()
        self.retry: Any = None  # the scheduled background replay, if any

    # -- the breaker ------------------------------------------------------------

    def is_down(self) -> bool:
        """True while the backend is being left alone after a failure."""
        return self.down_until > time.monotonic()

    def blocked(self) -> bool:
        """True while a recent failure says to leave the backend alone.

        Raises:
            CacheUnavailable: instead of True, with ``on_unavailable="raise"``.
        """
        if self.down_until > time.monotonic():
            if self.on_unavailable == "raise":
                msg = (
                    f"cache {self.namespace!r}: the backend is unavailable (it failed less than "
                    f"retry_interval={self.retry_interval}s ago)"
                )
                raise CacheUnavailable(msg)
            return True
        return False

    def mark_down(self) -> None:
        """Leave the backend alone for ``retry_interval`` seconds."""
        now = time.monotonic()
        self.down_until = now + self.retry_interval
        if self.down_since is None:
            self.down_since = now
        self.degraded = True

    def failed(self, exc: CacheUnavailable, op: str) -> None:
        """``op`` found the backend unavailable: mark it down, then warn or raise ``exc``."""
        self.mark_down()
        if self.on_unavailable == "raise":
            raise exc
        # One warning per outage and then one a minute, not one per request.
        now = time.monotonic()
        if now - self.last_warning >= 60 or self.last_warning < (self.down_since or now):
            self.last_warning = now
            logger.warning(
                "cache %s: %s failed, the backend is unavailable (%s); reads miss and writes "
                "are dropped until it answers again",
                self.namespace,
                op,
                str(exc),
                extra={"polydatum_cache": self.namespace},
            )

    def settle(self) -> None:
        """After a successful operation: log the recovery, clear the flag if nothing waits."""
        if self.down_since is not None:
            logger.warning(
                "cache %s: backend reachable again after %.1fs",
                self.namespace,
                time.monotonic() - self.down_since,
                extra={"polydatum_cache": self.namespace},
            )
            self.down_since = None
        with self.mutex:
            self.degraded = bool(self.undelivered_keys or self.undelivered_prefixes)

    # -- held deletes -------------------------------------------------------------

    def hold(self, keys: Sequence[str] = (), prefix: str | None = None) -> None:
        """Remember deletes (full keys) or a clear (``prefix``) the backend missed.

        At most ``max_undelivered`` keys and clears together; past that, or for a
        clear of the whole namespace, one clear of the namespace replaces them all
        (every key and clear held is under it). A replay is then scheduled.
        """
        everything = f"{self.namespace}:"
        with self.mutex:
            held = len(self.undelivered_keys) + len(self.undelivered_prefixes)
            if everything in self.undelivered_prefixes:
                pass  # already clearing the whole namespace: that covers these too
            elif prefix == everything or held + len(keys) + (prefix is not None) > self.max_undelivered:
                self.undelivered_keys.clear()
                self.undelivered_prefixes.clear()
                self.undelivered_prefixes.add(everything)
            elif prefix is not None:
                self.undelivered_prefixes.add(prefix)
            else:
                self.undelivered_keys.update(keys)
            self.degraded = True
        self.schedule_replay()

    def undelivered(self) -> tuple[list[str], list[str]]:
        """The held full keys and prefixes, sorted."""
        with self.mutex:
            return sorted(self.undelivered_keys), sorted(self.undelivered_prefixes)

    def delivered(self, keys: list[str], prefixes: list[str]) -> None:
        """Forget what a replay delivered."""
        with self.mutex:
            self.undelivered_keys.difference_update(keys)
            self.undelivered_prefixes.difference_update(prefixes)
        logger.warning(
            "cache %s: delivered %d deletes and %d clears held while the backend was unavailable",
            self.namespace,
            len(keys),
            len(prefixes),
            extra={"polydatum_cache": self.namespace},
        )

    # -- replay (the I/O: sync here, async in AsyncHealth) -------------------------

    def ready(self, op: str) -> bool:
        """After a failure: False while the backend is left alone, else replay held deletes."""
        if self.blocked():
            return False
        try:
            self.replay()
        except CacheUnavailable as exc:
            self.failed(exc, op)
            return False
        return True

    def replay(self) -> None:
        """Deliver the held clears, then the held deletes."""
        keys, prefixes = self.undelivered()
        if not keys and not prefixes:
            return
        for prefix in prefixes:
            self.backend.clear(prefix)
        for i in range(0, len(keys), _BATCH):
            self.backend.delete_many(keys[i : i + _BATCH])
        self.delivered(keys, prefixes)

    def schedule_replay(self) -> None:
        """Replay in a thread after ``retry_interval``, until delivered (once at a time)."""
        with self.mutex:
            if self.retry is not None:
                return
            # Weakly: a cache nobody holds any more stops retrying.
            timer = threading.Timer(
                max(self.retry_interval, 0.01), _replay_in_background, (weakref.ref(self),)
            )
            timer.daemon = True
            self.retry = timer
        timer.start()


def _replay_in_background(ref: weakref.ref[Health]) -> None:
    health = ref()
    if health is None:
        return  # nobody can read through this cache any more
    with health.mutex:
        health.retry = None
    try:
        health.replay()
    except CacheUnavailable:
        health.mark_down()
        health.schedule_replay()
        return
    except CacheBusy:  # the backend is fine, the pool full: try again, no outage
        health.schedule_replay()
        return
    except Exception:  # a thread must not die with a traceback; keep trying
        logger.exception("cache %s: replaying missed deletes failed", health.namespace)
        health.schedule_replay()
        return
    health.settle()


class AsyncHealth(Health):
    """:class:`Health` for an :class:`AsyncCacheBackend`: replays are awaited."""

    # The same state; only the I/O differs.
    backend: AsyncCacheBackend  # type: ignore[assignment]

    def __init__(
        self,
        backend: AsyncCacheBackend,
        *,
        namespace: str,
        on_unavailable: Literal["warn", "raise"],
        retry_interval: float,
        max_undelivered: int,
    ) -> None:
        super().__init__(
            backend,  # type: ignore[arg-type]
            namespace=namespace,
            on_unavailable=on_unavailable,
            retry_interval=retry_interval,
            max_undelivered=max_undelivered,
        )

    async def ready(self, op: str) -> bool:  # type: ignore[override]
        """See :meth:`Health.ready`."""
        if self.blocked():
            return False
        try:
            await self.replay()
        except CacheUnavailable as exc:
            self.failed(exc, op)
            return False
        return True

    async def replay(self) -> None:  # type: ignore[override]
        """See :meth:`Health.replay`."""
        keys, prefixes = self.undelivered()
        if not keys and not prefixes:
            return
        for prefix in prefixes:
            await self.backend.clear(prefix)
        for i in range(0, len(keys), _BATCH):
            await self.backend.delete_many(keys[i : i + _BATCH])
        self.delivered(keys, prefixes)

    def schedule_replay(self) -> None:
        """As :meth:`Health.schedule_replay`, but on the running loop (the backend's
        connections belong to it); outside a loop the next operation replays."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self.retry is not None and not self.retry[0].is_closed():
            return
        ref = weakref.ref(self)

        def fire() -> None:
            health = ref()
            if health is not None:
                health.retry = None
                task = loop.create_task(_areplay_in_background(health))
                health.retry = (loop, task)  # keeps the task referenced while it runs

        self.retry = (loop, loop.call_later(max(self.retry_interval, 0.01), fire))


async def _areplay_in_background(health: AsyncHealth) -> None:
    try:
        await health.replay()
    except CacheUnavailable:
        health.retry = None
        health.mark_down()
        health.schedule_replay()
        return
    except CacheBusy:
        health.retry = None
        health.schedule_replay()
        return
    except Exception:  # keep trying rather than leave an exception in a forgotten task
        logger.exception("cache %s: replaying missed deletes failed", health.namespace)
        health.retry = None
        health.schedule_replay()
        return
    health.retry = None
    health.settle()

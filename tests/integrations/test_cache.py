"""Cache and AsyncCache behaviour, run against the memory backend and Redis alike: one server,
a Redis Cluster and a Sentinel group."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from polydatum.cache import (
    AsyncCache,
    AsyncLockBase,
    AsyncMemoryBackend,
    Cache,
    CacheError,
    CounterError,
    LockBase,
    LockError,
    LockExpired,
    LockNotAcquired,
    MemoryBackend,
    MemoryLock,
    SerializationError,
    cached,
)
from polydatum.redis import AsyncRedis, Redis
from tests.integrations.conftest import REDIS_KINDS, redis_target

BACKENDS = ["memory", *REDIS_KINDS]


@pytest.fixture(name="redis_pools", scope="module")
def _redis_pools() -> Iterator[dict[str, Redis]]:
    """One Redis per node kind, made when first needed and closed after the module."""
    pools: dict[str, Redis] = {}
    yield pools
    for redis in pools.values():
        redis.close()


@pytest.fixture(name="cache", params=BACKENDS)
def _cache(request: pytest.FixtureRequest, redis_pools: dict[str, Redis]) -> Iterator[Cache]:
    """A cache on its own namespace, emptied afterwards."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    kind = request.param
    if kind in REDIS_KINDS:
        if kind not in redis_pools:
            url, options = redis_target(request, kind)
            redis_pools[kind] = Redis(url, **options)
        cache = redis_pools[kind].cache(namespace=namespace)
    else:
        cache = Cache(namespace=namespace)
    yield cache
    cache.clear()


@pytest.fixture(name="acache", params=BACKENDS)
async def _acache(request: pytest.FixtureRequest) -> AsyncIterator[AsyncCache]:
    """An async cache on its own namespace, emptied afterwards."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    redis = None
    if request.param in REDIS_KINDS:
        url, options = redis_target(request, request.param)
        redis = AsyncRedis(url, **options)
        cache = redis.cache(namespace=namespace)
    else:
        cache = AsyncCache(namespace=namespace)
    yield cache
    await cache.clear()
    if redis is not None:
        await redis.aclose()


def put_raw(cache: Cache, key: str, data: bytes) -> None:
    """Write bytes under ``key`` behind the cache's back."""
    cache.backend.set(cache.key(key), data, None, "always")


class TestBasics:
    def test_set_then_get_returns_the_value(self, cache: Cache) -> None:
        """A stored value comes back equal."""
        assert cache.set("k", {"a": [1, 2.5, "x", None, True]})
        assert cache.get("k") == {"a": [1, 2.5, "x", None, True]}

    def test_miss_returns_default(self, cache: Cache) -> None:
        """A missing key returns None, or the default given."""
        assert cache.get("nope") is None
        assert cache.get("nope", 42) == 42

    def test_none_is_stored_as_a_value(self, cache: Cache) -> None:
        """None is a value, distinguishable from a miss via the default."""
        cache.set("k", None)
        assert cache.get("k", "missing") is None

    def test_add_only_when_absent(self, cache: Cache) -> None:
        """add() stores only if the key is absent."""
        assert cache.add("k", 1)
        assert not cache.add("k", 2)
        assert cache.get("k") == 1

    def test_replace_only_when_present(self, cache: Cache) -> None:
        """replace() stores only if the key is present."""
        assert not cache.replace("k", 1)
        assert cache.get("k") is None
        cache.set("k", 1)
        assert cache.replace("k", 2)
        assert cache.get("k") == 2

    def test_delete(self, cache: Cache) -> None:
        """delete() says whether the key existed."""
        cache.set("k", 1)
        assert cache.delete("k")
        assert not cache.delete("k")
        assert cache.get("k") is None

    def test_many_operations(self, cache: Cache) -> None:
        """set_many/get_many/delete_many work on several keys, get_many returning only hits."""
        assert cache.set_many({"a": 1, "b": "two", "c": [3]}, ttl=30)
        assert cache.get_many(["a", "b", "c", "d"]) == {"a": 1, "b": "two", "c": [3]}
        assert cache.delete_many(["a", "b", "d"]) == 2
        assert cache.get_many(["a", "b", "c"]) == {"c": [3]}

    def test_many_operations_with_nothing(self, cache: Cache) -> None:
        """Empty many-operations are no-ops."""
        assert cache.get_many([]) == {}
        assert cache.set_many({})
        assert cache.delete_many([]) == 0

    def test_set_many_without_ttl(self, cache: Cache) -> None:
        """set_many without a TTL stores entries that never expire."""
        cache.set_many({"a": 1, "b": 2})
        assert cache.ttl("a") == math.inf

    def test_repr_names_namespace_and_backend(self, cache: Cache) -> None:
        """repr() shows what the cache is."""
        assert cache.namespace in repr(cache)
        assert "Backend" in repr(cache)


class TestTTL:
    def test_entry_expires(self, cache: Cache) -> None:
        """An entry is gone after its TTL."""
        cache.set("k", 1, ttl=0.05)
        time.sleep(0.12)
        assert cache.get("k") is None

    def test_ttl_reports_remaining_seconds(self, cache: Cache) -> None:
        """ttl() gives seconds left, inf for no expiry, None for a missing key."""
        cache.set("k", 1, ttl=timedelta(seconds=30))
        cache.set("forever", 1)
        remaining = cache.ttl("k")
        assert remaining is not None
        assert 0 < remaining <= 30
        assert cache.ttl("forever") == math.inf
        assert cache.ttl("missing") is None

    @pytest.mark.parametrize("bad", [0, -1, float("nan"), timedelta(0), float("inf")])
    def test_non_positive_ttl_is_refused(self, cache: Cache, bad: float) -> None:
        """A TTL that is not positive and finite raises ValueError saying what to pass."""
        with pytest.raises(ValueError, match="ttl must be positive, finite seconds"):
            cache.set("k", 1, ttl=bad)

    @pytest.mark.parametrize("good", [Decimal("60"), Fraction(3, 2), timedelta(minutes=1)])
    def test_any_real_number_of_seconds_is_a_ttl(self, cache: Cache, good: Any) -> None:
        """A Decimal or a Fraction is a ttl, as an int or a float is."""
        assert cache.set("k", 1, ttl=good)
        assert cache.get("k") == 1

    @pytest.mark.parametrize(
        ("bad", "error", "match"),
        [
            (10**20, ValueError, "over 3153600000 seconds"),
            ("60", TypeError, "number of seconds or a timedelta"),
            (True, TypeError, "number of seconds or a timedelta"),
        ],
    )
    def test_a_ttl_no_backend_takes_is_refused_alike(
        self, cache: Cache, bad: Any, error: type[Exception], match: str
    ) -> None:
        """Over 100 years, a str, a bool: the same error on every backend (Redis had its own)."""
        with pytest.raises(error, match=match):
            cache.set("k", 1, ttl=bad)
        assert cache.get("k") is None

    @pytest.mark.parametrize(
        ("options", "match"),
        [
            ({"ttl": "60"}, r"cached\(ttl=...\) must be a number of seconds"),
            ({"stale": float("nan")}, r"cached\(stale=...\) must be zero or more"),
            ({"wait": float("nan")}, r"cached\(wait=...\) must be zero or more"),
            ({"lock_timeout": 0}, r"cached\(lock_timeout=...\) must be positive"),
            ({"ttl": float("inf")}, r"cached\(ttl=...\) must be positive, finite"),
        ],
    )
    def test_cached_options_are_checked_naming_the_option(self, options: dict[str, Any], match: str) -> None:
        """Each bad option of cached() names itself (stale=nan used to blame ttl; wait=nan passed)."""
        with pytest.raises((TypeError, ValueError), match=match):
            cached(**({"ttl": 60} | options))


class TestCounters:
    def test_incr_and_decr(self, cache: Cache) -> None:
        """incr/decr count from 0 for a missing key and return the new value."""
        assert cache.incr("n") == 1
        assert cache.incr("n", 10) == 11
        assert cache.decr("n", 5) == 6
        assert cache.get("n") == 6

    def test_incr_on_a_stored_int(self, cache: Cache) -> None:
        """An int stored with set() can be incremented, and keeps its TTL."""
        cache.set("n", 41, ttl=30)
        assert cache.incr("n") == 42
        remaining = cache.ttl("n")
        assert remaining is not None
        assert remaining <= 30

    def test_incr_on_a_non_integer_raises(self, cache: Cache) -> None:
        """incr on a non-counter value raises CounterError."""
        cache.set("s", "text")
        with pytest.raises(CounterError):
            cache.incr("s")

    def test_incr_past_64_bits_raises(self, cache: Cache) -> None:
        """A counter leaving the signed 64-bit range raises CounterError."""
        cache.set("n", 2**63 - 1)
        with pytest.raises(CounterError):
            cache.incr("n")


class TestNamespaces:
    def test_namespaces_do_not_share_keys(self, cache: Cache) -> None:
        """Two namespaces on one backend keep separate keys."""
        other = cache.namespaced("other")
        cache.set("k", 1)
        other.set("k", 2)
        assert (cache.get("k"), other.get("k")) == (1, 2)

    def test_version_bump_hides_older_entries(self, cache: Cache) -> None:
        """A cache with a new version does not read the old version's entries."""
        cache.set("k", "old")
        newer = Cache(cache.backend, namespace=cache.namespace, version=2)
        assert newer.get("k") is None
        assert newer.key("k") == f"{cache.namespace}:2:k"

    def test_clear_drops_every_version_and_child(self, cache: Cache) -> None:
        """clear() deletes the whole namespace: all versions and child namespaces."""
        child = cache.namespaced("users")
        v2 = Cache(cache.backend, namespace=cache.namespace, version=2)
        outsider = Cache(cache.backend, namespace=cache.namespace + "x")
        cache.set("a", 1)
        v2.set("a", 2)
        child.set("a", 3)
        outsider.set("a", 4)
        assert cache.clear() == 3
        assert (cache.get("a"), v2.get("a"), child.get("a")) == (None, None, None)
        assert outsider.get("a") == 4
        outsider.clear()

    def test_clear_a_child_namespace_only(self, cache: Cache) -> None:
        """clear(name) deletes only that child namespace."""
        child = cache.namespaced("users")
        cache.set("a", 1)
        child.set("a", 2)
        assert cache.clear("users") == 1
        assert (cache.get("a"), child.get("a")) == (1, None)

    def test_glob_characters_in_namespace_are_literal(self, cache: Cache) -> None:
        """A namespace with glob characters clears only itself."""
        star = cache.namespaced("a*")
        plain = cache.namespaced("ab")
        star.set("k", 1)
        plain.set("k", 2)
        assert star.clear() == 1
        assert plain.get("k") == 2

    @pytest.mark.parametrize("bad", ["", ":x", "x:"])
    def test_bad_namespace_is_refused(self, bad: str) -> None:
        """An empty namespace, or one starting or ending with ':', raises ValueError."""
        with pytest.raises(ValueError, match="namespace"):
            Cache(namespace=bad)


class TestForeignValues:
    @pytest.mark.parametrize(
        "data",
        [b"not ours", b"j{broken json", b"p\x80\x04garbage", b"", b"-", b"12ab", b"m\xc1"],
    )
    def test_foreign_or_corrupt_value_is_a_miss_with_a_warning(
        self, cache: Cache, data: bytes, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A value this cache cannot read is a miss and logs a warning, never raises."""
        put_raw(cache, "k", data)
        with caplog.at_level(logging.WARNING, logger="polydatum.cache"):
            assert cache.get("k", "default") == "default"
            assert cache.get_many(["k"]) == {}
        assert "treating it as a miss" in caplog.text

    def test_pickled_value_is_never_unpickled_by_a_json_cache(self, cache: Cache) -> None:
        """Bytes tagged as pickle are foreign to a JSON cache, so nothing is unpickled."""
        pickler = Cache(cache.backend, namespace=cache.namespace, serializer="pickle")
        pickler.set("k", {"x": 1})
        assert cache.get("k") is None
        assert pickler.get("k") == {"x": 1}


class TestErrors:
    def test_unsupported_type_names_it(self, cache: Cache) -> None:
        """Storing an unsupported value raises SerializationError naming its type."""

        class Thing:
            pass

        with pytest.raises(SerializationError, match=r"test_cache\..*Thing.*'json'"):
            cache.set("k", Thing())
        with pytest.raises(TypeError):  # SerializationError is also a TypeError
            cache.set_many({"k": object()})

    def test_unknown_serializer_lists_known_ones(self) -> None:
        """An unknown serializer name raises ValueError listing the registered ones."""
        with pytest.raises(ValueError, match="known: json, msgpack, pickle"):
            Cache(serializer="yaml")

    def test_bad_on_unavailable_is_refused(self) -> None:
        """on_unavailable accepts only "warn" or "raise"."""
        with pytest.raises(ValueError, match="on_unavailable"):
            Cache(on_unavailable="ignore")  # type: ignore[arg-type]

    def test_invalidate_without_context_says_what_to_do(self, cache: Cache) -> None:
        """invalidate() on a cache not handed out by a context explains the fix."""
        with pytest.raises(CacheError, match=r"ctx\.cache\.invalidate"):
            cache.invalidate("k")

    def test_memory_backend_needs_room(self) -> None:
        """A MemoryBackend of size 0 is refused."""
        with pytest.raises(ValueError, match="max_entries"):
            MemoryBackend(0)


class TestLock:
    def test_two_threads_contend_one_waits(self, cache: Cache) -> None:
        """While one thread holds the lock the other waits, then gets it."""
        events: list[str] = []
        holding = threading.Event()

        def first() -> None:
            with cache.lock("job", timeout=5):
                events.append("first in")
                holding.set()
                time.sleep(0.2)
                events.append("first out")

        def second() -> None:
            holding.wait(5)
            with cache.lock("job", timeout=5, blocking_timeout=5):
                events.append("second in")

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert events == ["first in", "first out", "second in"]

    def test_blocking_timeout_raises_lock_not_acquired(self, cache: Cache) -> None:
        """A lock held elsewhere raises LockNotAcquired after blocking_timeout."""
        with cache.lock("job", timeout=5):
            other = cache.lock("job", timeout=5, blocking_timeout=0.05)
            assert not other.acquire(blocking=False)
            with pytest.raises(LockNotAcquired, match="blocking_timeout"), other:
                pass

    def test_lock_expires_and_late_release_raises(self, cache: Cache) -> None:
        """An expired lock can be taken by another holder; the late release raises LockExpired."""
        lock = cache.lock("job", timeout=0.05)
        assert lock.acquire()
        assert lock.locked()
        time.sleep(0.12)
        assert not lock.locked()
        with (
            cache.lock("job", timeout=5, blocking_timeout=0),
            pytest.raises(LockExpired, match="longer timeout"),
        ):
            lock.release()

    def test_release_without_acquire_raises(self, cache: Cache) -> None:
        """Releasing a lock never taken raises LockError."""
        with pytest.raises(LockError, match="acquire it"):
            cache.lock("job", timeout=1).release()

    def test_lock_timeout_must_be_positive(self, cache: Cache) -> None:
        """A lock without a positive timeout is refused: locks always expire."""
        with pytest.raises(ValueError, match="locks always expire"):
            cache.lock("job", timeout=0)

    @pytest.mark.parametrize(
        ("timeout", "blocking_timeout", "error", "match"),
        [
            (
                math.inf,
                1,
                ValueError,
                r"lock timeout must be finite seconds from 0\.001.*locks always expire",
            ),
            (math.nan, 1, ValueError, r"lock timeout must be finite seconds from 0\.001"),
            (10**10, 1, ValueError, r"to 3153600000 \(100 years\), got 10000000000; locks always expire"),
            (Decimal("sNaN"), 1, ValueError, r"lock timeout must be finite seconds"),
            (5, 10**10, ValueError, "None waits as long as it takes"),
            (0.0001, 1, ValueError, r"at least 0\.001 seconds"),
            (None, 1, TypeError, "lock timeout must be a number of seconds"),
            ("5", 1, TypeError, "lock timeout must be a number of seconds"),
            (5, math.nan, ValueError, "blocking_timeout must be zero or more, finite seconds"),
            (5, -1, ValueError, "blocking_timeout must be zero or more"),
            (5, math.inf, ValueError, "blocking_timeout must be zero or more, finite"),
            (5, "1", TypeError, "blocking_timeout must be a number of seconds"),
        ],
    )
    def test_lock_times_are_checked_before_any_command(
        self, cache: Cache, timeout: Any, blocking_timeout: Any, error: type[Exception], match: str
    ) -> None:
        """Every backend refuses the same lock times with the same words (a Redis lock used to fail with
        OverflowError for inf, a server error for 0.1 ms, and wait forever for a NaN wait)."""
        with pytest.raises(error, match=match):
            cache.lock("job", timeout=timeout, blocking_timeout=blocking_timeout)

    def test_lock_times_accept_timedeltas_and_no_wait(self, cache: Cache) -> None:
        """A timedelta is seconds; blocking_timeout=0 tries once; None waits as long as it takes."""
        with cache.lock("td", timeout=timedelta(seconds=2), blocking_timeout=0) as lock:
            assert lock.locked()
            assert not cache.lock("td", timeout=1, blocking_timeout=0).acquire()
        with cache.lock("td", timeout=0.001, blocking_timeout=None):
            pass

    def test_clear_leaves_held_locks_held(self, cache: Cache) -> None:
        """clear() of the namespace, of a parent or of a child drops entries, never a held lock."""
        child = cache.namespaced("c")
        lock, child_lock = cache.lock("job", timeout=30), child.lock("job", timeout=30)
        assert lock.acquire()
        assert child_lock.acquire()
        cache.set("k", 1)
        child.set("k", 2)
        cache.clear("c")
        child.clear()
        cache.clear()
        assert (cache.get("k"), child.get("k")) == (None, None)
        assert lock.locked()
        assert child_lock.locked()
        assert not cache.lock("job", timeout=30).acquire(blocking=False)  # still taken
        assert not child.lock("job", timeout=30).acquire(blocking=False)
        lock.release()  # no LockExpired: the holder still held it
        child_lock.release()
        assert not lock.locked()
        assert not child_lock.locked()


class _DictLock(LockBase):
    """The least a backend's lock supplies: the I/O, here on a shared dict."""

    def __init__(self, store: dict[str, str], name: str) -> None:
        super().__init__(name, timeout=5, blocking_timeout=0)
        self.store = store

    def acquire(self, blocking: bool = True) -> bool:
        if self.name in self.store:
            return False
        self.store[self.name] = "held"
        return True

    def release(self) -> None:
        if self.store.pop(self.name, None) is None:
            raise self.not_held_error("releasing")

    def locked(self) -> bool:
        return self.name in self.store


class _AsyncDictLock(AsyncLockBase):
    """:class:`_DictLock` for ``async with``: only the I/O, awaited."""

    def __init__(self, store: dict[str, str], name: str) -> None:
        super().__init__(name, timeout=5, blocking_timeout=0)
        self.store = store

    async def acquire(self, blocking: bool = True) -> bool:
        if self.name in self.store:
            return False
        self.store[self.name] = "held"
        return True

    async def release(self) -> None:
        if self.store.pop(self.name, None) is None:
            raise self.expired_error()

    async def locked(self) -> bool:
        return self.name in self.store


class TestLockBase:
    """Every backend's lock is a LockBase: the same ``with``, the same errors."""

    def test_every_backend_lock_is_a_lock_base(self, cache: Cache) -> None:
        """Memory and Redis locks alike subclass LockBase, and entering returns the lock."""
        lock = cache.lock("base", timeout=5)
        assert isinstance(lock, LockBase)
        with lock as entered:
            assert entered is lock
            assert lock.locked()
        assert not lock.locked()

    def test_errors_read_the_same_on_every_backend(self, cache: Cache) -> None:
        """Not acquired, not held and expired say the same words, naming the lock, whatever the backend."""
        name = cache.lock("same", timeout=5).name
        with (
            cache.lock("same", timeout=5),
            pytest.raises(LockNotAcquired) as not_acquired,
            cache.lock("same", timeout=5, blocking_timeout=0),
        ):
            pass  # pragma: no cover - never entered
        assert str(not_acquired.value) == (
            f"could not acquire lock {name!r} within blocking_timeout=0s: another holder has it; "
            "retry later or pass a longer blocking_timeout"
        )
        with pytest.raises(LockError) as not_held:
            cache.lock("same", timeout=5).release()
        assert str(not_held.value) == f"lock {name!r} is not held by this thread; acquire it before releasing"
        lock = cache.lock("short", timeout=0.05)
        with pytest.raises(LockExpired) as expired, lock:
            time.sleep(0.2)
        assert str(expired.value) == (
            f"lock {lock.name!r} expired before it was released (held longer than timeout=0.05s), "
            "so another holder may have run at the same time; pass a longer timeout"
        )

    def test_a_new_backend_supplies_only_the_io(self) -> None:
        """A subclass that does only acquire/release/locked gets ``with`` and the standard errors."""
        store: dict[str, str] = {}
        lock = _DictLock(store, "job")
        with lock as entered:
            assert entered is lock
            assert lock.locked()
            with pytest.raises(
                LockNotAcquired, match="could not acquire lock 'job' within blocking_timeout=0s"
            ):
                _DictLock(store, "job").__enter__()
        assert not lock.locked()
        with pytest.raises(
            LockError, match="lock 'job' is not held by this thread; acquire it before releasing"
        ):
            lock.release()

    def test_memory_lock_take_and_release_token(self) -> None:
        """take() tries once and hands back the token; release_token() refuses a missing or stale one."""
        lock = MemoryLock(MemoryBackend(), "job", timeout=5, blocking_timeout=0)
        token = lock.take()
        assert token is not None
        assert lock.take() is None  # held: one try, no wait
        with pytest.raises(
            LockError, match="lock 'job' is not held by this thread; acquire it before releasing"
        ):
            lock.release_token(None)
        with pytest.raises(LockExpired, match="lock 'job' expired before it was released"):
            lock.release_token(b"someone else's")
        lock.release_token(token)
        assert not lock.locked()

    def test_not_held_error_can_leave_the_thread_out(self) -> None:
        """not_held_error(by_thread=False) is for locks whose tasks share one token."""
        lock = _DictLock({}, "job")
        assert str(lock.not_held_error("extending", by_thread=False)) == (
            "lock 'job' is not held; acquire it before extending"
        )

    async def test_async_locks_share_the_async_base(self, acache: AsyncCache) -> None:
        """Memory and Redis async locks subclass AsyncLockBase; ``async with`` returns the lock."""
        lock = acache.lock("base", timeout=5, blocking_timeout=0)
        assert isinstance(lock, AsyncLockBase)
        async with lock as entered:
            assert entered is lock
            with pytest.raises(LockNotAcquired, match="within blocking_timeout=0s"):
                async with acache.lock("base", timeout=5, blocking_timeout=0):
                    pass  # pragma: no cover - never entered
        assert not await lock.locked()

    async def test_a_new_async_backend_supplies_only_the_io(self) -> None:
        """An AsyncLockBase subclass gets ``async with`` and the standard errors."""
        store: dict[str, str] = {}
        lock = _AsyncDictLock(store, "job")
        async with lock as entered:
            assert entered is lock
            with pytest.raises(LockNotAcquired, match="could not acquire lock 'job'"):
                async with _AsyncDictLock(store, "job"):
                    pass  # pragma: no cover - never entered
        with pytest.raises(LockExpired, match="lock 'job' expired before it was released"):
            async with lock:
                store.clear()  # as if it ran out and nobody held it


class TestHealth:
    def test_ping(self, cache: Cache) -> None:
        """ping() is True for a working backend."""
        assert cache.ping()


class TestMemoryBackend:
    def test_size_bound_evicts_least_recently_used(self) -> None:
        """Past max_entries the least recently used entry goes first."""
        cache = Cache(MemoryBackend(max_entries=3))
        for key in "abc":
            cache.set(key, key)
        cache.get("a")  # a is now the most recent
        cache.set("d", "d")
        assert cache.get_many("abcd") == {"a": "a", "c": "c", "d": "d"}
        assert len(cache.backend) == 3  # type: ignore[arg-type]

    def test_expired_entries_are_evicted_first(self) -> None:
        """When full, expired entries make room before live ones are evicted."""
        now = [0.0]
        cache = Cache(MemoryBackend(max_entries=2, clock=lambda: now[0]))
        cache.set("old", 1, ttl=1)
        cache.set("live", 2)
        now[0] = 5.0
        cache.set("new", 3)
        assert cache.get_many(["old", "live", "new"]) == {"live": 2, "new": 3}

    def test_threads_share_it_safely(self) -> None:
        """Concurrent increments from many threads lose no update."""
        cache = Cache()

        def bump() -> None:
            for _ in range(500):
                cache.incr("n")

        threads = [threading.Thread(target=bump) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert cache.get("n") == 4000


class TestAsync:
    async def test_round_trip_and_many(self, acache: AsyncCache) -> None:
        """The async twin stores, reads, counts and deletes like the sync cache."""
        assert await acache.set("k", {"a": 1}, ttl=30)
        assert await acache.get("k") == {"a": 1}
        assert not await acache.add("k", 2)
        assert await acache.replace("k", 3)
        assert await acache.set_many({"x": 1, "y": 2}, ttl=30)
        assert await acache.set_many({"z": 1})
        assert await acache.get_many(["k", "x", "y", "nope"]) == {"k": 3, "x": 1, "y": 2}
        assert await acache.incr("n", 2) == 2
        assert await acache.decr("n") == 1
        ttl = await acache.ttl("x")
        assert ttl is not None
        assert 0 < ttl <= 30
        assert await acache.ttl("z") == math.inf
        assert await acache.ttl("missing") is None
        assert await acache.delete("k")
        assert await acache.delete_many(["x", "y"]) == 2
        assert await acache.get("k") is None
        assert await acache.ping()

    async def test_aping_is_a_deprecated_ping(self, acache: AsyncCache) -> None:
        """``aping()`` still answers as ``ping()`` does, with a DeprecationWarning naming the new spelling."""
        with pytest.warns(
            DeprecationWarning, match=r"AsyncCache\.aping\(\) is deprecated; use `await cache\.ping\(\)`"
        ):
            assert await acache.aping() is True

    async def test_namespaces_and_clear(self, acache: AsyncCache) -> None:
        """Child namespaces are cleared with their parent, or alone."""
        child = acache.namespaced("c")
        await acache.set("a", 1)
        await child.set("a", 2)
        assert await acache.clear("c") == 1
        assert await acache.get("a") == 1
        assert await acache.clear() == 1

    async def test_lock_contention(self, acache: AsyncCache) -> None:
        """An async lock held by one task makes another wait or time out."""
        async with acache.lock("job", timeout=5):
            other = acache.lock("job", timeout=5, blocking_timeout=0.05)
            with pytest.raises(LockNotAcquired):
                async with other:
                    pass
            assert await other.locked()
        assert not await acache.lock("job", timeout=5).locked()

    async def test_clear_leaves_held_locks_held(self, acache: AsyncCache) -> None:
        """AsyncCache.clear() drops entries, never a held lock."""
        async with acache.lock("job", timeout=30) as lock:
            await acache.set("k", 1)
            await acache.clear()
            assert await acache.get("k") is None
            assert await lock.locked()
            assert not await acache.lock("job", timeout=30).acquire(blocking=False)
        assert not await lock.locked()

    async def test_lock_expiry(self, acache: AsyncCache) -> None:
        """Releasing an async lock after it expired raises LockExpired."""
        lock = acache.lock("job", timeout=0.05)
        assert await lock.acquire()
        time.sleep(0.12)
        with pytest.raises(LockExpired):
            await lock.release()

    async def test_foreign_value_and_counter_error(self, acache: AsyncCache) -> None:
        """Foreign bytes are a miss; incr on text raises CounterError."""
        await acache.backend.set(acache.key("k"), b"foreign", None, "always")
        assert await acache.get("k", 0) == 0
        assert await acache.get_many(["k"]) == {}
        await acache.set("s", "text")
        with pytest.raises(CounterError):
            await acache.incr("s")
        with pytest.raises(ValueError, match="locks always expire"):
            acache.lock("x", timeout=-1)

    async def test_memory_backends_share_data(self) -> None:
        """An AsyncMemoryBackend over a MemoryBackend sees the sync cache's entries."""
        memory = MemoryBackend()
        Cache(memory, namespace="shared").set("k", 1)
        assert await AsyncCache(AsyncMemoryBackend(memory), namespace="shared").get("k") == 1

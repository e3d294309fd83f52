"""One contract, four backends: the Cache's API on memory, Redis, memcached and the file system.

Every test here runs on each backend (a real Redis, a private memcached, a
temporary folder); what a backend cannot do the same way (memcached cannot
count what ``clear`` drops, and keeps TTLs in whole seconds) is said in the test.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from polydatum import DataManager, Service
from polydatum.cache import (
    AsyncCache,
    Cache,
    CounterError,
    LockBase,
    LockError,
    LockExpired,
    LockNotAcquired,
    cached,
)
from polydatum.memcached import MemcachedBackend
from polydatum.redis import AsyncRedis, Redis
from tests.support.cache_backends import CACHE_BACKENDS, make_async_backend, make_backend


@pytest.fixture(name="redis_pool", scope="module")
def _redis_pool(redis_url: str) -> Iterator[Redis]:
    redis = Redis(redis_url)
    yield redis
    redis.close()


@pytest.fixture(name="memcached", scope="module")
def _memcached(memcached_address: str) -> Iterator[MemcachedBackend]:
    backend = MemcachedBackend(memcached_address)
    yield backend
    backend.close()


@pytest.fixture(name="kind", params=CACHE_BACKENDS)
def _kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(name="backend")
def _backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    return make_backend(kind, request, tmp_path)


@pytest.fixture(name="cache")
def _cache(backend: Any) -> Iterator[Cache]:
    """A cache on its own namespace, emptied afterwards."""
    cache = Cache(backend, namespace=f"contract-{uuid.uuid4().hex[:12]}")
    yield cache
    cache.clear()


@pytest.fixture(name="acache")
async def _acache(kind: str, backend: Any, redis_url: str) -> AsyncIterator[AsyncCache]:
    """The async twin of ``cache`` on the same store."""
    namespace = f"contract-{uuid.uuid4().hex[:12]}"
    aredis = AsyncRedis(redis_url) if kind == "redis" else None
    acache = AsyncCache(make_async_backend(kind, backend, aredis), namespace=namespace)
    yield acache
    await acache.clear()
    if aredis is not None:
        await aredis.aclose()


def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for ``check`` to hold (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.02)


class TestValues:
    def test_set_get_and_miss(self, cache: Cache) -> None:
        """A stored value comes back; a missing key gives the default; None is a value."""
        assert cache.set("k", {"a": [1, 2.5, "x"]})
        assert cache.get("k") == {"a": [1, 2.5, "x"]}
        assert cache.get("missing", "dflt") == "dflt"
        cache.set("none", None)
        assert cache.get("none", "dflt") is None

    def test_add_and_replace(self, cache: Cache) -> None:
        """add only when absent, replace only when present."""
        assert not cache.replace("k", 1)
        assert cache.add("k", 1)
        assert not cache.add("k", 2)
        assert cache.replace("k", 3)
        assert cache.get("k") == 3

    def test_many_and_delete(self, cache: Cache) -> None:
        """set_many/get_many/delete_many, and delete saying whether the key existed."""
        assert cache.set_many({"a": 1, "b": "two", "c": [3]}, ttl=60)
        assert cache.get_many(["a", "b", "c", "d"]) == {"a": 1, "b": "two", "c": [3]}
        assert cache.delete("a")
        assert not cache.delete("a")
        assert cache.delete_many(["b", "c", "d"]) == 2
        assert cache.get_many(["a", "b", "c"]) == {}

    @pytest.mark.parametrize(
        "key",
        [
            "k" * 300,
            "with space",
            "tab\there",
            "new\nline",
            "ünïcødé",
            "../../etc/passwd",
            "a{b}c#d",
            "lone \udcff surrogate",
            "\udcff" * 300,
        ],
    )
    def test_any_key_round_trips(self, cache: Cache, key: str) -> None:
        """Keys no backend takes as they are (long, spaces, control characters, lone surrogates) work."""
        cache.set(key, "v")
        other = key + "!"
        cache.set(other, "w")
        assert (cache.get(key), cache.get(other)) == ("v", "w")
        assert cache.delete(key)
        assert cache.get(key) is None


class TestTTL:
    def test_ttl_reports_remaining_seconds(self, cache: Cache) -> None:
        """ttl(): seconds left (memcached: whole seconds), inf for none, None when missing."""
        cache.set("k", 1, ttl=30)
        cache.set("forever", 1)
        remaining = cache.ttl("k")
        assert remaining is not None
        assert 0 < remaining <= 30
        assert cache.ttl("forever") == math.inf
        assert cache.ttl("missing") is None

    def test_entry_expires(self, cache: Cache) -> None:
        """An entry is gone after its TTL (memcached rounds it up to a second)."""
        cache.set("k", 1, ttl=0.05)
        until(lambda: cache.get("k") is None, "the entry to expire")


class TestCounters:
    def test_incr_and_decr_below_zero(self, cache: Cache) -> None:
        """Counters start at 0, go below zero and come back; the value reads as an int."""
        assert cache.incr("n") == 1
        assert cache.incr("n", 10) == 11
        assert cache.decr("n", 20) == -9
        assert cache.incr("n", 4) == -5
        assert cache.get("n") == -5

    def test_incr_keeps_the_ttl(self, cache: Cache) -> None:
        """An int stored with a TTL keeps it when incremented."""
        cache.set("n", 41, ttl=30)
        assert cache.incr("n") == 42
        remaining = cache.ttl("n")
        assert remaining is not None
        assert remaining <= 30

    def test_non_integer_and_overflow_raise(self, cache: Cache) -> None:
        """CounterError on text and past the signed 64-bit range; the value is left alone."""
        cache.set("s", "text")
        with pytest.raises(CounterError):
            cache.incr("s")
        cache.set("n", 2**63 - 1)
        with pytest.raises(CounterError):
            cache.incr("n")
        assert cache.get("n") == 2**63 - 1
        cache.set("low", -(2**63))
        with pytest.raises(CounterError):
            cache.decr("low")


class TestCompareAndSetAndTouch:
    """The two primitives cache models build on, the same on every backend."""

    def test_compare_and_set_stores_only_over_the_expected_value_and_keeps_the_ttl(
        self, backend: Any
    ) -> None:
        key = f"cas-{uuid.uuid4().hex[:8]}"
        assert not backend.compare_and_set(key, b"old", b"new")  # missing
        assert backend.set(key, b"old", 60_000, "always")
        assert not backend.compare_and_set(key, b"other", b"new")
        assert backend.get(key) == b"old"
        assert backend.compare_and_set(key, b"old", b"new")
        assert backend.get(key) == b"new"
        left = backend.pttl(key)
        assert left is not None
        assert 0 < left <= 60_000  # the TTL stayed

    def test_touch_sets_a_new_ttl_or_none_and_misses_a_missing_key(self, backend: Any) -> None:
        key = f"touch-{uuid.uuid4().hex[:8]}"
        assert not backend.touch(key, 1000)
        assert backend.set(key, b"v", 1000, "always")
        assert backend.touch(key, 120_000)
        left = backend.pttl(key)
        assert left is not None
        assert 60_000 < left <= 120_000
        assert backend.touch(key, None)
        assert backend.pttl(key) == -1  # no expiry
        assert backend.get(key) == b"v"


class TestClear:
    def test_clear_drops_versions_and_children_only(self, cache: Cache, kind: str) -> None:
        """clear(): every version and child namespace, not a namespace that only shares a prefix."""
        child = cache.namespaced("users")
        v2 = Cache(cache.backend, namespace=cache.namespace, version=2)
        outsider = Cache(cache.backend, namespace=cache.namespace + "x")
        cache.set("a", 1)
        v2.set("a", 2)
        child.set("a", 3)
        outsider.set("a", 4)
        dropped = cache.clear()
        assert dropped == (0 if kind == "memcached" else 3)  # memcached cannot count
        assert (cache.get("a"), v2.get("a"), child.get("a")) == (None, None, None)
        assert outsider.get("a") == 4
        outsider.clear()

    def test_clear_a_child_only(self, cache: Cache) -> None:
        """clear(name) drops only that child namespace."""
        child = cache.namespaced("users")
        cache.set("a", 1)
        child.set("a", 2)
        cache.clear("users")
        assert (cache.get("a"), child.get("a")) == (1, None)
        child.set("a", 5)  # the child is usable again at once
        assert child.get("a") == 5

    def test_clear_leaves_held_locks_held(self, cache: Cache) -> None:
        """A lock outlives a clear of its namespace."""
        lock = cache.lock("job", timeout=30)
        with lock:
            cache.clear()
            assert lock.locked()
        assert not lock.locked()


class TestLocks:
    def test_lock_is_a_lock_base_and_excludes(self, cache: Cache) -> None:
        """One holder at a time; a second non-blocking acquire fails until release."""
        first = cache.lock("job", timeout=30)
        second = cache.lock("job", timeout=30)
        assert isinstance(first, LockBase)
        assert first.acquire()
        assert not second.acquire(blocking=False)
        first.release()
        assert second.acquire(blocking=False)
        second.release()

    def test_blocking_timeout_raises(self, cache: Cache) -> None:
        """Entering a held lock gives up after blocking_timeout with LockNotAcquired."""
        held = cache.lock("job", timeout=30)
        late = cache.lock("job", timeout=30, blocking_timeout=0.05)
        with held, pytest.raises(LockNotAcquired, match="job"), late:
            pass

    def test_release_of_an_expired_lock_raises(self, cache: Cache) -> None:
        """A lock that expired while held raises LockExpired on release (memcached: whole seconds)."""
        lock = cache.lock("job", timeout=0.05)
        assert lock.acquire()
        until(lambda: not lock.locked(), "the lock to expire")
        with pytest.raises(LockExpired, match="expired"):
            lock.release()

    def test_release_without_acquire_raises(self, cache: Cache) -> None:
        """Releasing a lock this thread does not hold raises LockError."""
        with pytest.raises(LockError, match="not held"):
            cache.lock("job", timeout=30).release()

    def test_threads_take_turns(self, cache: Cache) -> None:
        """Two threads increment under the lock without losing an update."""
        box = {"n": 0}

        def work() -> None:
            for _ in range(5):
                with cache.lock("counter", timeout=30):
                    n = box["n"]
                    time.sleep(0.001)
                    box["n"] = n + 1

        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert box["n"] == 10


class Profiles(Service):
    """A cached read over a dict standing in for the database; a gate pauses one read."""

    def __init__(self) -> None:
        super().__init__()
        self.db = {1: "old"}
        self.calls = 0
        self.read = threading.Event()
        self.go_on = threading.Event()
        self.pause = False

    @cached(ttl=60, key="profile:{pid}")
    def get(self, pid: int) -> str:
        self.calls += 1
        value = self.db[pid]
        if self.pause:
            self.pause = False
            self.read.set()
            assert self.go_on.wait(10)
        return value

    def rename(self, pid: int, name: str) -> None:
        self.db[pid] = name
        self.get.invalidate(pid)


def wire(cache: Cache) -> tuple[DataManager, Profiles]:
    dm = DataManager()
    cache.install(dm, name="cache")
    profiles = Profiles()
    dm.register_services(profiles=profiles)
    return dm, profiles


class TestCachedClaims:
    def test_computed_once_then_served(self, cache: Cache) -> None:
        """cached(): the first call computes and stores, the next is served from the cache."""
        dm, profiles = wire(cache)
        with dm.dal() as dal:
            assert dal.profiles.get(1) == "old"
            assert dal.profiles.get(1) == "old"
        assert profiles.calls == 1
        assert not cache._is_claimed("profile:1")

    def test_invalidation_waits_for_the_commit(self, cache: Cache) -> None:
        """invalidate() deletes at commit, and never on rollback."""
        dm, profiles = wire(cache)
        with dm.dal() as dal:
            dal.profiles.get(1)

        def rolled_back() -> None:
            with dm.dal() as dal:
                dal.profiles.rename(1, "ignored")
                raise RuntimeError("roll back")

        with pytest.raises(RuntimeError):
            rolled_back()
        assert cache.get("profile:1") is not None
        profiles.db[1] = "old"
        with dm.dal() as dal:
            dal.profiles.rename(1, "new")
            assert cache.get("profile:1") is not None  # not yet: the context has not committed
        assert cache.get("profile:1") is None
        with dm.dal() as dal:
            assert dal.profiles.get(1) == "new"

    def test_late_reader_does_not_store_after_an_invalidation(self, cache: Cache) -> None:
        """A reader that read before the commit cannot put its stale result back after it."""
        dm, profiles = wire(cache)
        profiles.pause = True
        out: list[str] = []

        def read() -> None:
            with dm.dal() as dal:
                out.append(dal.profiles.get(1))

        thread = threading.Thread(target=read)
        thread.start()
        assert profiles.read.wait(10)
        with dm.dal() as dal:
            dal.profiles.rename(1, "new")  # deletes the entry and the reader's claim
        profiles.go_on.set()
        thread.join(10)
        assert out == ["old"]
        assert cache.get("profile:1") is None
        with dm.dal() as dal:
            assert dal.profiles.get(1) == "new"

    def test_claims_are_compare_and_set(self, cache: Cache) -> None:
        """Only the claim's holder stores under it or releases it."""
        token = cache._claim("k", 30)
        assert token is not None
        assert cache._claim("k", 30) is None
        assert not cache._store_claimed("k", "theirs", 60, b"jnot-the-token")
        cache._release_claim("k", b"jnot-the-token")
        assert cache._is_claimed("k")
        assert cache._store_claimed("k", "mine", 60, token)
        assert cache.get("k") == "mine"
        assert not cache._is_claimed("k")


class TestAsync:
    async def test_round_trip_counters_clear_and_lock(self, acache: AsyncCache) -> None:
        """The AsyncCache API on each backend's async twin."""
        assert await acache.set("k", [1, "a"], ttl=60)
        assert await acache.add("k", 2) is False
        assert await acache.get_many(["k", "x"]) == {"k": [1, "a"]}
        assert await acache.incr("n", 3) == 3
        assert await acache.decr("n", 5) == -2
        ttl = await acache.ttl("k")
        assert ttl is not None
        assert 0 < ttl <= 60
        async with acache.lock("job", timeout=30):
            with pytest.raises(LockNotAcquired):
                async with acache.lock("job", timeout=30, blocking_timeout=0.05):
                    pass
        await acache.clear()
        assert await acache.get("k") is None
        assert await acache.ping()

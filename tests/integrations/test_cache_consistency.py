"""The cache never ends up behind the database: late readers and Redis outages.

Two gaps closed here, each tested with real interleavings (threads and
Events, never sleeps that hope for an order) against Redis and the memory
backend:

- a reader that read the database before a commit must not put its stale
  result back after the commit's invalidation (its claim is deleted with the
  entry, and it stores only while the claim is intact);
- an invalidation that cannot reach Redis is kept and replayed once Redis
  answers again: before this process's next cache operation, and by a
  background retry for the other processes' sake.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_py

from polydatum import DataManager, Service
from polydatum.cache import AsyncCache, Cache, CacheUnavailable, cached
from polydatum.redis import AsyncRedis, Redis
from tests.integrations.conftest import REDIS_KINDS, redis_target
from tests.support.servers import PrivateRedis


class Gate:
    """Pauses one compute after it read the "database", until the test lets it go on."""

    def __init__(self) -> None:
        self.read = threading.Event()
        self.go_on = threading.Event()

    def pause(self) -> None:
        self.read.set()
        assert self.go_on.wait(10), "the test never let the reader go on"


class Profiles(Service):
    """A cached read over a dict standing in for the database."""

    def __init__(self) -> None:
        super().__init__()
        self.db = {1: "old", 2: "other"}
        self.gates: dict[int, Gate] = {}
        self.calls = 0

    @cached(ttl=60, key="profile:{pid}", stale=60)
    def get(self, pid: int) -> str:
        self.calls += 1
        value = self.db[pid]
        gate = self.gates.pop(pid, None)
        if gate is not None:
            gate.pause()  # a slow reader: it has read, but not yet stored
        return value

    def plain(self, pid: int) -> str:
        value = self.db[pid]
        gate = self.gates.pop(pid, None)
        if gate is not None:
            gate.pause()
        return value

    def rename(self, pid: int, name: str) -> None:
        self.db[pid] = name
        self.get.invalidate(pid)

    @cached(ttl=60, key="profile:{pid}")
    async def aget(self, pid: int) -> str:
        value = self.db[pid]
        gate = self.gates.pop(pid, None)
        if gate is not None:
            await asyncio.to_thread(gate.pause)
        return value

    async def arename(self, pid: int, name: str) -> None:
        self.db[pid] = name
        self.aget.invalidate(pid)


@pytest.fixture(name="redis", scope="module")
def _redis(redis_url: str) -> Iterator[Redis]:
    redis = Redis(redis_url)
    yield redis
    redis.close()


@pytest.fixture(name="redis_pools", scope="module")
def _redis_pools() -> Iterator[dict[str, Redis]]:
    """One Redis per node kind (a cluster, Sentinel), made when first needed."""
    pools: dict[str, Redis] = {}
    yield pools
    for redis in pools.values():
        redis.close()


@pytest.fixture(name="cache", params=["memory", *REDIS_KINDS])
def _cache(request: pytest.FixtureRequest, redis_pools: dict[str, Redis]) -> Iterator[Cache]:
    """A cache in memory, then on one Redis server, a Redis Cluster and a Sentinel group."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    kind = request.param
    if kind == "redis":
        cache = request.getfixturevalue("redis").cache(namespace=namespace)
    elif kind in REDIS_KINDS:
        if kind not in redis_pools:
            url, options = redis_target(request, kind)
            redis_pools[kind] = Redis(url, **options)
        cache = redis_pools[kind].cache(namespace=namespace)
    else:
        cache = Cache(namespace=namespace)
    yield cache
    cache.clear()


def wire(cache: Cache | AsyncCache) -> tuple[DataManager, Profiles]:
    dm = DataManager()
    cache.install(dm, name="cache")
    profiles = Profiles()
    dm.register_services(profiles=profiles)
    return dm, profiles


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; its result (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed to the test, which re-raises
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


class TestLateReader:
    def test_reader_that_read_before_the_commit_does_not_store_after_it(self, cache: Cache) -> None:
        """Read old → commit + invalidate → the reader's store is refused; next read is new."""
        dm, profiles = wire(cache)
        gate = profiles.gates[1] = Gate()

        def read() -> str:
            with dm.dal() as dal:
                return str(dal.profiles.get(1))

        thread, out = in_thread(read)
        assert gate.read.wait(10)
        with dm.dal() as dal:
            dal.profiles.rename(1, "new")  # commits, then deletes the entry and the claim
        gate.go_on.set()
        thread.join(10)
        assert out == ["old"]  # it ran concurrently with the write: the old value is fair
        assert cache.get("profile:1") is None  # ...but it was not cached
        with dm.dal() as dal:
            assert dal.profiles.get(1) == "new"
        assert cache.get("profile:1")[1] == "new"

    def test_refresh_of_a_stale_entry_is_refused_after_an_invalidation(self, cache: Cache) -> None:
        """In the stale window: a refresher that read old data cannot overwrite the invalidation."""
        dm, profiles = wire(cache)
        cache.set("profile:1", [time.time() - 1, "older"], ttl=60)  # expired, within stale
        gate = profiles.gates[1] = Gate()

        def read() -> str:
            with dm.dal() as dal:
                return str(dal.profiles.get(1))

        thread, out = in_thread(read)
        assert gate.read.wait(10)
        with dm.dal() as dal:
            # While the refresh runs, other callers get the previous value at once.
            assert dal.profiles.get(1) == "older"
        with dm.dal() as dal:
            dal.profiles.rename(1, "new")
        gate.go_on.set()
        thread.join(10)
        assert out == ["old"]
        assert cache.get("profile:1") is None
        with dm.dal() as dal:
            assert dal.profiles.get(1) == "new"

    def test_middleware_reader_race(self, cache: Cache) -> None:
        """The same holds for cached(...).middleware() and its invalidate()."""
        dm, profiles = wire(cache)
        mw = cached(ttl=60, key="plain:{pid}").middleware("profiles.plain")
        dm.register_method_middleware(mw)
        gate = profiles.gates[1] = Gate()

        def read() -> str:
            with dm.dal() as dal:
                return str(dal.profiles.plain(1))

        thread, out = in_thread(read)
        assert gate.read.wait(10)
        with dm.context() as ctx:
            profiles.db[1] = "new"
            mw.invalidate(ctx, "profiles.plain", 1)
        gate.go_on.set()
        thread.join(10)
        assert out == ["old"]
        with dm.dal() as dal:
            assert dal.profiles.plain(1) == "new"

    def test_caller_without_the_claim_computes_but_never_stores(self, cache: Cache) -> None:
        """A caller that waited in vain for another's claim computes, and leaves the cache alone."""
        calls: list[int] = []

        @cached(ttl=60, key="k", using=cache, wait=0)
        def compute() -> int:
            calls.append(1)
            return len(calls)

        theirs = cache._claim("k", 30)
        assert theirs is not None
        assert compute() == 1
        assert cache.get("k") is None
        assert cache.backend.get(cache._claim_key("k")) == theirs  # their claim is untouched

    def test_failed_compute_releases_only_its_own_claim(self, cache: Cache) -> None:
        """An exception in the method releases the claim, so the next caller computes at once."""

        @cached(ttl=60, key="k", using=cache, wait=5)
        def compute(fail: bool) -> str:
            if fail:
                raise RuntimeError("database said no")
            return "ok"

        with pytest.raises(RuntimeError, match="said no"):
            compute(True)
        assert not cache._is_claimed("k")
        assert compute(False) == "ok"

    def test_computation_that_outlives_its_claim_is_not_stored(self, cache: Cache) -> None:
        """Past lock_timeout the claim lapses, and with it the right to store the result."""

        @cached(ttl=60, key="slow", using=cache, lock_timeout=0.05)
        def slow() -> str:
            until(lambda: not cache._is_claimed("slow"), "the claim to lapse")
            return "late"

        assert slow() == "late"
        assert cache.get("slow") is None

    async def test_async_reader_race(self, namespace_redis: AsyncRedis) -> None:
        """An async cached method on an AsyncCache: the late store is refused too."""
        acache = namespace_redis.cache(namespace=f"test-{uuid.uuid4().hex[:12]}")
        dm, profiles = wire(acache)
        gate = profiles.gates[1] = Gate()

        async def read() -> str:
            async with dm.dal() as dal:
                return str(await dal.profiles.aget(1))

        task = asyncio.create_task(read())
        assert await asyncio.to_thread(gate.read.wait, 10)
        async with dm.dal() as dal:
            await dal.profiles.arename(1, "new")
        gate.go_on.set()
        assert await task == "old"
        assert await acache.get("profile:1") is None
        async with dm.dal() as dal:
            assert await dal.profiles.aget(1) == "new"
        await acache.clear()


@pytest.fixture(name="namespace_redis")
async def _namespace_redis(redis_url: str) -> Any:
    aredis = AsyncRedis(redis_url)
    yield aredis
    await aredis.aclose()


def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for ``check`` to hold (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)


class Outage:
    """A private Redis whose data survives a restart (SAVE before stopping)."""

    def __init__(self, server: PrivateRedis) -> None:
        self.server = server
        self.observer = redis_py.Redis.from_url(server.url)

    def stop(self) -> None:
        self.observer.save()  # like a network partition: the entries outlive the outage
        self.server.stop()

    def start(self) -> None:
        self.server.start()

    def close(self) -> None:
        self.observer.close()


@pytest.fixture(name="outage")
def _outage(private_redis: PrivateRedis) -> Iterator[Outage]:
    outage = Outage(private_redis)
    yield outage
    outage.close()


class TestOutage:
    def test_claim_stranded_by_an_outage_is_deleted_when_redis_returns(self, outage: Outage) -> None:
        """A claim whose holder could not store or release it is deleted with the replayed deletes."""
        redis = Redis(outage.server.url)
        cache = redis.cache(namespace="app", retry_interval=0.05)

        class Reports:
            outages = 1

            @cached(ttl=60, key="report", using=cache, lock_timeout=60)
            def build(self) -> str:
                if self.outages:
                    self.outages -= 1
                    outage.stop()  # Redis goes away between the claim and the store
                return "built"

        reports = Reports()
        claim = cache._claim_key("report")
        cache.set("control", 1)
        assert reports.build() == "built"  # claimed, then could not store nor release
        outage.start()
        # The control entry came back with the restart, so the claim did too.
        assert outage.observer.exists(cache.key("control"))
        until(lambda: not outage.observer.exists(claim), "the stranded claim to be deleted")
        assert reports.build() == "built"
        assert cache.get("report") is not None  # stored: the key is not blocked for lock_timeout
        redis.close()

    def test_invalidation_during_an_outage_reaches_redis_when_it_returns(
        self, outage: Outage, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Committed while Redis is down: this process never reads the stale entry afterwards."""
        redis = Redis(outage.server.url)
        cache = redis.cache(namespace="app", retry_interval=0.05)
        dm, _ = wire(cache)
        with dm.dal() as dal:
            assert (dal.profiles.get(1), dal.profiles.get(2)) == ("old", "other")

        outage.stop()
        # The whole test runs under at_level: the replay may be logged by the
        # background retry after the last cache call, and without at_level that
        # record would depend on the root logger's level, which an earlier test
        # may have raised (an in-process Celery worker sets it to ERROR).
        with caplog.at_level(logging.WARNING, logger="polydatum.cache"):
            with dm.dal() as dal:
                dal.profiles.rename(1, "new")  # commits; the delete cannot be delivered
                assert dal.profiles.get(1) == "new"
            with dm.dal() as dal:
                assert dal.profiles.get(1) == "new"  # down: a miss, computed
            outage.start()
            with dm.dal() as dal:
                assert dal.profiles.get(1) == "new"
                assert dal.profiles.get(2) == "other"
            # The control entry came back with the restart, so "old" would have too.
            assert outage.observer.exists("app:1:profile:2")
            # Wait on the cache's own state, not on a log record: what was held is delivered.
            until(lambda: cache._undelivered() == ([], []), "the replay")
            until(lambda: "delivered 2 deletes" in caplog.text, "the replay's warning")

        def cached_fresh() -> bool:
            with dm.dal() as dal:
                assert dal.profiles.get(1) == "new"
            return cache.get("profile:1") is not None

        until(cached_fresh, "the fresh entry to be cached")
        assert cache.get("profile:1")[1] == "new"
        redis.close()

    def test_background_replay_serves_other_processes(self, outage: Outage) -> None:
        """With no further cache call here, the missed delete still reaches Redis."""
        redis = Redis(outage.server.url)
        cache = redis.cache(namespace="app", retry_interval=0.05)
        dm, _ = wire(cache)
        with dm.dal() as dal:
            dal.profiles.get(1)
            dal.profiles.get(2)
        outage.stop()
        with dm.dal() as dal:
            dal.profiles.rename(1, "new")  # through ctx.cache, a copy that dies with the context
        del dal
        gc.collect()
        outage.start()
        # Another process reading Redis directly stops seeing the stale entry.
        until(lambda: not outage.observer.exists("app:1:profile:1"), "the background replay")
        assert outage.observer.exists("app:1:profile:2")
        redis.close()

    def test_too_many_missed_deletes_clear_the_namespace(self, outage: Outage) -> None:
        """Past max_undelivered the namespace is cleared on recovery; others are untouched."""
        redis = Redis(outage.server.url)
        cache = redis.cache(namespace="app", retry_interval=0.05, max_undelivered=1)
        neighbour = redis.cache(namespace="neighbour")
        dm, _ = wire(cache)
        with dm.dal() as dal:
            dal.profiles.get(1)
            dal.profiles.get(2)
        neighbour.set("k", 1)
        outage.stop()
        with dm.dal() as dal:
            dal.profiles.rename(1, "new")  # two keys (entry + claim) > 1
        outage.start()
        until(lambda: not outage.observer.exists("app:1:profile:2"), "the namespace to clear")
        assert neighbour.get("k") == 1
        redis.close()

    def test_missed_clear_is_replayed(self, outage: Outage) -> None:
        """A clear() that could not reach Redis happens once it answers."""
        redis = Redis(outage.server.url)
        cache = redis.cache(namespace="app", retry_interval=0.05)
        cache.set("a", 1)
        outage.stop()
        assert cache.clear() == 0
        outage.start()
        until(lambda: not outage.observer.exists("app:1:a"), "the clear")
        redis.close()

    def test_raise_mode_raises_and_still_replays(self, outage: Outage) -> None:
        """With on_unavailable="raise" a delete raises CacheUnavailable, and is replayed later."""
        redis = Redis(outage.server.url)
        cache = redis.cache(namespace="app", on_unavailable="raise", retry_interval=0.05)
        cache.set("a", 1)
        outage.stop()
        with pytest.raises(CacheUnavailable, match="unavailable"):
            cache.delete("a")
        outage.start()
        until(lambda: not outage.observer.exists("app:1:a"), "the replayed delete")
        redis.close()

    async def test_async_cache_replays_missed_deletes(self, outage: Outage) -> None:
        """AsyncCache keeps missed deletes and replays them in the loop once Redis is back."""
        aredis = AsyncRedis(outage.server.url)
        acache = aredis.cache(namespace="app", retry_interval=0.05)
        await acache.set_many({"a": 1, "b": 2})
        outage.stop()
        assert await acache.delete("a") == 0
        assert await acache.clear("child") == 0
        outage.start()
        deadline = time.monotonic() + 10
        while outage.observer.exists("app:1:a"):
            assert time.monotonic() < deadline, "still waiting for the replay"
            await asyncio.sleep(0.01)
        assert await acache.get("a") is None
        assert await acache.get("b") == 2
        await aredis.aclose()

    def test_pending_clears_are_bounded_by_max_undelivered(self, outage: Outage) -> None:
        """5,000 clear(namespace=...) during an outage hold one clear of the namespace, not 5,000."""
        redis = Redis(outage.server.url)
        cache = redis.cache(namespace="app", retry_interval=0.05, max_undelivered=100)
        cache.set("a", 1)
        cache.namespaced("c1").set("b", 2)
        outage.stop()
        for i in range(5000):
            assert cache.clear(namespace=f"c{i}") == 0
        keys, prefixes = cache._undelivered()
        assert keys == []
        assert prefixes == ["app:"]  # the bound passed: one clear of the namespace covers all
        cache.delete("a")  # nothing more is held once the whole namespace is to be cleared
        assert cache._undelivered() == ([], ["app:"])
        outage.start()
        until(lambda: not outage.observer.exists("app:c1:1:b"), "the clear of the child")
        until(lambda: not outage.observer.exists("app:1:a"), "the clear of the namespace")
        redis.close()

    def test_max_undelivered_must_not_be_negative(self) -> None:
        """A negative max_undelivered is refused with what to pass."""
        with pytest.raises(ValueError, match="max_undelivered"):
            Cache(max_undelivered=-1)

"""polydatum.redis wired into a DataManager: resources, cached methods, faults and leaks."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_py

from polydatum import DataManager, Service
from polydatum.cache import (
    AsyncCache,
    Cache,
    CacheBusy,
    CacheError,
    CacheUnavailable,
    LockError,
    LockExpired,
    LockNotAcquired,
    MemoryBackend,
    SerializationError,
    cached,
)
from polydatum.redis import AsyncRedis, PoolTimeout, Redis, RedisBackend
from tests.integrations.conftest import REDIS_KINDS, redis_target
from tests.support.servers import PrivateRedis


class Users(Service):
    """A service whose reads are slow enough to be worth caching."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.names = {1: "ada", 2: "bob"}

    @cached(ttl=60, key="user:{user_id}")
    def get(self, user_id: int) -> dict[str, Any] | None:
        self.calls += 1
        name = self.names.get(user_id)
        return None if name is None else {"id": user_id, "name": name}

    def rename(self, user_id: int, name: str) -> None:
        self.names[user_id] = name
        self.get.invalidate(user_id)

    @cached(ttl=60)
    def search(self, prefix: str, limit: int = 10) -> list[int]:
        self.calls += 1
        return [k for k, v in self.names.items() if v.startswith(prefix)][:limit]

    def plain(self, user_id: int) -> str:
        self.calls += 1
        return self.names[user_id]

    @cached(ttl=60)
    def unstorable(self) -> object:
        return object()

    @cached(ttl=60, key="slow")
    def slow(self) -> int:
        self.calls += 1
        time.sleep(0.2)
        return self.calls

    @cached(ttl=60, key="user:{user_id}")
    async def aget(self, user_id: int) -> dict[str, Any] | None:
        self.calls += 1
        await asyncio.sleep(0)
        return {"id": user_id, "name": self.names[user_id]}

    async def arename(self, user_id: int, name: str) -> None:
        self.names[user_id] = name
        self.aget.invalidate(user_id)


@pytest.fixture(name="namespace")
def _namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


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
def _cache(request: pytest.FixtureRequest, namespace: str, redis_pools: dict[str, Redis]) -> Iterator[Cache]:
    """A cache in memory, then on one Redis server, a Redis Cluster and a Sentinel group."""
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


_SERVICES: dict[int, Users] = {}


@pytest.fixture(name="dm")
def _dm(cache: Cache) -> DataManager:
    dm = DataManager()
    cache.install(dm, name="cache")
    users = Users()
    dm.register_services(users=users)
    _SERVICES[id(dm)] = users
    return dm


def users_of(dm: DataManager) -> Users:
    """The Users service registered on ``dm``, to count its calls."""
    return _SERVICES[id(dm)]


def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for ``check`` to hold (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.005)


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in another thread and return what it returned or raised."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed back to the test
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    return out[0]


class TestResources:
    def test_context_gets_a_client_on_the_shared_pool(self, redis: Redis, namespace: str) -> None:
        """ctx.redis is a redis.Redis on the one pool, created on first use only."""
        dm = DataManager()
        redis.install(dm, name="redis")
        with dm.context() as ctx:
            assert "redis" not in ctx
            ctx.redis.set(f"{namespace}:k", b"v")
            assert "redis" in ctx
            assert isinstance(ctx.redis, redis_py.Redis)
            assert ctx.redis.connection_pool is redis.pool
            assert ctx.redis.getdel(f"{namespace}:k") == b"v"
            first = ctx.redis
        with dm.context() as ctx:
            assert ctx.redis is not first  # each context its own client, on the same pool
            assert ctx.redis.connection_pool is redis.pool
            assert ctx.redis.ping()

    def test_context_that_never_uses_redis_makes_no_connection(self, redis_url: str) -> None:
        """A context that does not touch Redis takes no connection from the pool."""
        fresh = Redis(redis_url)
        dm = DataManager()
        fresh.install(dm)
        with dm.context():
            pass
        assert not fresh.pool._connections
        fresh.close()

    def test_cache_resource_is_bound_to_its_context(self, dm: DataManager, cache: Cache) -> None:
        """ctx.cache is the installed cache (same namespace and state) bound to that context."""
        with dm.context() as ctx:
            assert ctx.cache.namespace == cache.namespace
            ctx.cache.set("k", 1)
            assert cache.get("k") == 1

    def test_ping(self, redis: Redis, redis_url: str) -> None:
        """ping() is True for a live server and False, without raising, for a dead one."""
        assert redis.ping()
        dead = Redis("redis://127.0.0.1:1/0")
        assert not dead.ping()
        assert not dead.cache().ping()

    def test_decode_responses_client_is_refused_for_a_cache(self, redis_url: str) -> None:
        """A cache on a decode_responses client would corrupt values, so it is refused."""
        client = redis_py.Redis.from_url(redis_url, decode_responses=True)
        with pytest.raises(ValueError, match="decode_responses"):
            RedisBackend(client)
        client.close()

    def test_a_client_side_cache_sees_the_keys_of_cache_reads(self, redis_url: str, namespace: str) -> None:
        """On a client with redis-py's client-side cache a read goes through Redis.get, which names the
        key for that cache; on a plain client it is a bare GET and still reads the value."""
        from redis.cache import CacheConfig

        class Recording(redis_py.Redis):
            gets: list[Any]

            def get(self, name: Any) -> Any:
                self.gets.append(name)
                return super().get(name)

        plain = Recording.from_url(redis_url)
        plain.gets = []
        plain.set(f"{namespace}:k", b"v")
        assert RedisBackend(plain).get(f"{namespace}:k") == b"v"
        assert plain.gets == []
        plain.delete(f"{namespace}:k")
        plain.close()
        cached = Recording.from_url(redis_url, protocol=3, cache_config=CacheConfig())
        cached.gets = []
        try:
            RedisBackend(cached).get(f"{namespace}:k")
        except CacheUnavailable:  # a server before Redis 7.4 refuses a client-side cache
            pass
        assert cached.gets == [f"{namespace}:k"]
        cached.close()

    def test_redis_lock_in_a_service(self, redis: Redis, namespace: str) -> None:
        """Redis.lock works as a context manager and can be extended."""
        with redis.lock(f"{namespace}:lock", timeout=1) as lock:
            assert lock.locked()
            lock.extend(5)
            assert redis.client().pttl(f"{namespace}:lock") > 1000
            # What extend() adds is checked like a timeout: a negative one would shorten the lock.
            for bad, error in (
                (-25, ValueError),
                (0.0001, ValueError),
                (float("inf"), ValueError),
                (None, TypeError),
            ):
                with pytest.raises(error, match="extend\\(\\) seconds must"):
                    lock.extend(bad)  # type: ignore[arg-type]
            assert redis.client().pttl(f"{namespace}:lock") > 5000
        assert not lock.locked()
        with pytest.raises(ValueError, match="locks always expire"):
            redis.lock("x", timeout=0)
        # Refused before any command: redis-py raised OverflowError for inf, the server an
        # error for 0.1 ms, and a NaN wait waited forever.
        with pytest.raises(ValueError, match=r"finite seconds from 0\.001.*locks always expire"):
            redis.lock("x", timeout=float("inf"))
        with pytest.raises(ValueError, match=r"at least 0\.001 seconds"):
            redis.lock("x", timeout=0.0001)
        with pytest.raises(TypeError, match="lock timeout must be a number of seconds"):
            redis.lock("x", timeout=None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="blocking_timeout must be zero or more, finite seconds"):
            redis.lock("x", timeout=1, blocking_timeout=float("nan"))


class WatchedQueue(queue.LifoQueue):  # type: ignore[type-arg]
    """The blocking pool's queue of free connections, counting takers that found it empty."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.found_empty = 0

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Count a taker that will have to wait, then take as usual."""
        with self.mutex:
            if not self._qsize():
                self.found_empty += 1
        return super().get(block, timeout)


class TestPool:
    def test_more_threads_than_connections_all_succeed(
        self, redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Three times max_connections threads, each in a context, wait for a connection and succeed."""
        redis = Redis(redis_url, max_connections=2, queue_class=WatchedQueue)
        cache = redis.cache(namespace=namespace)
        dm = DataManager()
        redis.install(dm)
        cache.install(dm)
        held = [redis.pool.get_connection() for _ in range(2)]  # the pool is full
        results: dict[int, tuple[Any, int]] = {}

        def work(i: int) -> None:
            with dm.context() as ctx:
                ctx.cache.set(f"k{i}", i)
                results[i] = (ctx.cache.get(f"k{i}"), ctx.redis.incr(f"{namespace}:n"))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        with caplog.at_level(logging.WARNING, logger="polydatum.cache"):
            for thread in threads:
                thread.start()
            # Each thread's first command found the pool empty and waits in it.
            until(lambda: redis.pool.pool.found_empty >= len(threads), "every thread to wait")
            for connection in held:
                redis.pool.release(connection)
            for thread in threads:
                thread.join(10)
        assert sorted(value for value, _ in results.values()) == list(range(6))
        assert sorted(n for _, n in results.values()) == list(range(1, 7))
        assert not cache.is_down()
        assert "unavailable" not in caplog.text
        redis.client().delete(f"{namespace}:n")
        redis.close()

    def test_full_pool_past_its_timeout_raises_pool_timeout_not_an_outage(
        self, redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A pool that stays full past pool_timeout raises PoolTimeout; the cache never degrades."""
        redis = Redis(redis_url, max_connections=1, pool_timeout=0.01)
        cache = redis.cache(namespace=namespace)
        cache.set("a", 1)
        held = redis.pool.get_connection()
        with caplog.at_level(logging.WARNING, logger="polydatum.cache"):
            with pytest.raises(PoolTimeout, match=r"pool_timeout=0\.01s: all max_connections=1"):
                cache.get("a")
            with pytest.raises(PoolTimeout, match="pool_timeout"):
                redis.client().get(f"{namespace}:raw")  # the raw client as well
            with pytest.raises(CacheBusy):
                cache.delete("a")  # kept, and delivered once a connection is free
            assert not cache.ping()
            assert not cache.is_down()
        assert "unavailable" not in caplog.text
        redis.pool.release(held)
        assert cache.get("a") is None
        assert cache.set("b", 2)
        assert cache.get("b") == 2
        assert redis.ping()
        redis.close()

    async def test_async_pool_waits_then_times_out(self, redis_url: str, namespace: str) -> None:
        """AsyncRedis: tasks beyond max_connections wait their turn; past pool_timeout, PoolTimeout."""
        aredis = AsyncRedis(redis_url, max_connections=2, pool_timeout=None)
        acache = aredis.cache(namespace=namespace)
        held = [await aredis.pool.get_connection() for _ in range(2)]

        async def work(i: int) -> Any:
            await acache.set(f"k{i}", i)
            return await acache.get(f"k{i}")

        tasks = [asyncio.create_task(work(i)) for i in range(6)]
        for _ in range(50):  # let every task run up to the pool
            await asyncio.sleep(0)
        assert not any(task.done() for task in tasks)  # waiting, neither failed nor missed
        for connection in held:
            await aredis.pool.release(connection)
        assert await asyncio.gather(*tasks) == list(range(6))
        assert not acache.is_down()
        await acache.clear()
        await aredis.aclose()

        aredis = AsyncRedis(redis_url, max_connections=1, pool_timeout=0.01)
        acache = aredis.cache(namespace=namespace)
        held = [await aredis.pool.get_connection()]
        with pytest.raises(PoolTimeout, match="max_connections=1"):
            await acache.get("a")
        assert not acache.is_down()
        assert not await acache.ping()
        await aredis.pool.release(held[0])
        assert await acache.get("a") is None
        await aredis.aclose()

    @pytest.mark.parametrize(
        ("options", "error", "match"),
        [
            ({"pool_timeout": 0}, ValueError, "pool_timeout must be positive"),
            ({"pool_timeout": "5"}, ValueError, "pool_timeout must be positive"),
            ({"timeout": 5}, TypeError, "pool_timeout=.*socket_timeout="),
        ],
    )
    def test_bad_pool_timeout_is_refused(
        self, options: dict[str, Any], error: type[Exception], match: str
    ) -> None:
        """A non-positive pool_timeout, or redis-py's ambiguous timeout=, says what to pass."""
        with pytest.raises(error, match=match):
            Redis("redis://127.0.0.1:6379/0", **options)
        with pytest.raises(error, match=match):
            AsyncRedis("redis://127.0.0.1:6379/0", **options)


class TestCached:
    def test_second_call_is_served_from_the_cache(self, dm: DataManager) -> None:
        """The method runs once; later calls, in later contexts too, read the cache."""
        users = users_of(dm)
        with dm.dal() as dal:
            assert dal.users.get(1) == {"id": 1, "name": "ada"}
            assert dal.users.get(1) == {"id": 1, "name": "ada"}
        with dm.dal() as dal:
            assert dal.users.get(1) == {"id": 1, "name": "ada"}
        assert users.calls == 1

    def test_none_results_are_cached(self, dm: DataManager) -> None:
        """A None result is cached like any other."""
        users = users_of(dm)
        with dm.dal() as dal:
            assert dal.users.get(99) is None
            assert dal.users.get(99) is None
        assert users.calls == 1

    def test_default_key_uses_name_and_bound_arguments(self, dm: DataManager) -> None:
        """Without key=, calls that bind to the same arguments share an entry."""
        users = users_of(dm)
        with dm.dal() as dal:
            assert dal.users.search("a") == [1]
            assert dal.users.search("a", 10) == [1]
            assert dal.users.search(prefix="a", limit=10) == [1]
            assert dal.users.search("a", 1) == [1]
        assert users.calls == 2
        assert users.search.key("a").startswith("tests.integrations.test_redis.Users.search:")

    def test_invalidation_in_a_committed_context_deletes(self, dm: DataManager) -> None:
        """invalidate() inside a context that succeeds deletes the entry at commit."""
        users = users_of(dm)
        with dm.dal() as dal:
            dal.users.get(1)
        with dm.dal() as dal:
            dal.users.rename(1, "ann")
            # Until the commit this context reads its own write, not the cache.
            assert dal.users.get(1) == {"id": 1, "name": "ann"}
        with dm.dal() as dal:
            assert dal.users.get(1) == {"id": 1, "name": "ann"}
        assert users.calls == 3

    def test_invalidation_in_a_failed_context_does_not_happen(self, dm: DataManager) -> None:
        """invalidate() inside a context that raises leaves the cached entry alone."""
        users = users_of(dm)
        with dm.dal() as dal:
            dal.users.get(1)

        def failing_unit_of_work() -> None:
            with dm.dal() as dal:
                dal.users.rename(1, "ann")
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            failing_unit_of_work()
        users.names[1] = "ada"  # the "database" rolled back too
        with dm.dal() as dal:
            assert dal.users.get(1) == {"id": 1, "name": "ada"}
        assert users.calls == 1

    def test_invalidate_on_the_cache_resource(self, dm: DataManager, cache: Cache) -> None:
        """ctx.cache.invalidate(key) waits for the commit."""
        cache.set("k", 1)
        with dm.context() as ctx:
            ctx.cache.invalidate("k")
            assert cache.get("k") == 1
        assert cache.get("k") is None

    def test_unstorable_result_names_the_method(self, dm: DataManager) -> None:
        """A result the serializer cannot store raises naming the method and the type."""
        with pytest.raises(SerializationError, match=r"Users\.unstorable.*object"), dm.dal() as dal:
            dal.users.unstorable()

    def test_bad_key_template_names_the_arguments(self, cache: Cache) -> None:
        """A key template naming a missing argument says which arguments exist."""

        class Bad(Service):
            @cached(ttl=1, key="x:{nope}")
            def get(self, user_id: int) -> int:
                return user_id

        dm = DataManager()
        cache.install(dm)
        dm.register_services(bad=Bad())
        with pytest.raises(CacheError, match="user_id"), dm.dal() as dal:
            dal.bad.get(1)

    def test_missing_cache_resource_says_how_to_install(self, cache: Cache) -> None:
        """Using a non-cache resource name explains how to install a cache."""

        class Svc(Service):
            @cached(ttl=1, using="db")
            def get(self) -> int:
                return 1

        dm = DataManager()

        def db(ctx: Any) -> Iterator[str]:
            yield "not a cache"

        dm.register_resources(db=db)
        dm.register_services(svc=Svc())
        with pytest.raises(CacheError, match=r"install\(dm, name='db'\)"), dm.dal() as dal:
            dal.svc.get()

    def test_cached_plain_function_with_a_cache_object(self, cache: Cache) -> None:
        """cached(using=<Cache>) also works on a plain function outside any context."""
        calls = []

        @cached(ttl=30, using=cache)
        def square(x: int) -> int:
            calls.append(x)
            return x * x

        assert square(3) == 9
        assert square(3) == 9
        assert calls == [3]

    def test_cached_plain_function_without_a_cache_explains(self) -> None:
        """A plain function looking its cache up by name needs a context, and says so."""

        @cached(ttl=30)
        def square(x: int) -> int:
            return x * x

        with pytest.raises(CacheError, match="using=<a Cache>"):
            square(3)

    @pytest.mark.parametrize("kwargs", [{"ttl": 0}, {"ttl": 1, "stale": -1}, {"ttl": 1, "key": 42}])
    def test_bad_arguments_are_refused(self, kwargs: dict[str, Any]) -> None:
        """cached() rejects a non-positive ttl, a negative stale and a non-str key."""
        with pytest.raises((ValueError, TypeError)):
            cached(**kwargs)


class TestKeys:
    def test_argument_cannot_take_over_another_keys_claim(self, cache: Cache) -> None:
        """name="victim:computing" writes neither the claim of "victim" nor stops it being cached."""
        calls: list[str] = []

        @cached(ttl=60, key="user:{name}", using=cache, wait=0)
        def get(name: str) -> str:
            calls.append(name)
            return name.upper()

        assert get("victim:computing") == "VICTIM:COMPUTING"
        assert get("victim") == "VICTIM"
        assert get("victim") == "VICTIM"  # cached at once, not computed again unstored
        assert calls == ["victim:computing", "victim"]

    def test_argument_cannot_reach_another_templates_entry(self, cache: Cache) -> None:
        """With "user:{name}" and "user:{name}:friends", name="ada:friends" keeps to its own entry."""

        @cached(ttl=60, key="user:{name}", using=cache)
        def user(name: str) -> dict[str, str]:
            return {"user": name}

        @cached(ttl=60, key="user:{name}:friends", using=cache)
        def friends(name: str) -> list[str]:
            return ["bob"]

        assert user("ada:friends") == {"user": "ada:friends"}
        assert friends("ada") == ["bob"]
        assert user("100%") == {"user": "100%"}
        assert user("100%25") == {"user": "100%25"}  # the escape itself is escaped

    def test_an_object_argument_cannot_reach_another_templates_entry(self, cache: Cache) -> None:
        """What a non-str argument writes (its __format__, a datetime's colons) is escaped too."""

        class Name:
            def __init__(self, text: str) -> None:
                self.text = text

            def __format__(self, spec: str) -> str:
                return self.text

        @cached(ttl=60, key="user:{name}", using=cache)
        def user(name: Any) -> str:
            return f"user {name}"

        @cached(ttl=60, key="user:{name}:friends", using=cache)
        def friends(name: str) -> str:
            return f"friends of {name}"

        assert friends("ada") == "friends of ada"
        assert user(Name("ada:friends")) == "user ada:friends"  # not the friends entry
        assert user(dt.datetime(2026, 12, 3, 18, 30)) == "user 2026-12-03 18:30:00"
        assert cache.get("user:2026-12-03 18%3A30%3A00") is not None
        assert user(7) == "user 7"
        assert cache.get("user:7") is not None  # numbers are written as they are

    def test_long_template_key_is_hashed(self, cache: Cache) -> None:
        """A 5 MB argument gives a short key: past 200 characters the key is "#" and its SHA-256."""
        calls: list[int] = []

        @cached(ttl=60, key="doc:{text}", using=cache)
        def size(text: str) -> int:
            calls.append(1)
            return len(text)

        big = "x" * 5_000_000
        assert size(big) == 5_000_000
        assert size(big) == 5_000_000
        assert calls == [1]
        hashed = "#" + hashlib.sha256(f"doc:{big}".encode()).hexdigest()
        assert cache.get(hashed)[1] == 5_000_000
        assert cache.get(f"doc:{big}") is None
        # An argument cannot forge a hashed key: "#" is escaped like ":".
        assert size(hashed[1:]) == 64
        assert cache.get(hashed)[1] == 5_000_000

    def test_long_callable_key_is_hashed(self, cache: Cache) -> None:
        """A key callable returning more than 200 characters is hashed the same way."""

        @cached(ttl=60, key=lambda text: f"doc:{text}", using=cache)
        def echo(text: str) -> str:
            return text

        assert echo("y" * 300) == "y" * 300
        assert cache.get("#" + hashlib.sha256(("doc:" + "y" * 300).encode()).hexdigest())


class TestMiddleware:
    def test_middleware_caches_an_undecorated_method(self, cache: Cache) -> None:
        """cached(...).middleware(path) caches a DAL method without touching the service."""
        dm = DataManager()
        cache.install(dm)
        users = Users()
        dm.register_services(users=users)
        policy = cached(ttl=30, key="plain:{user_id}")
        mw = policy.middleware("users.plain")
        dm.register_method_middleware(mw)
        with dm.dal() as dal:
            assert dal.users.plain(1) == "ada"
            assert dal.users.plain(user_id=1) == "ada"
            dal.users.search("a")  # another path passes straight through
        assert users.calls == 2
        with dm.context() as ctx:
            users.names[1] = "ann"
            mw.invalidate(ctx, "users.plain", 1)
        with dm.dal() as dal:
            assert dal.users.plain(1) == "ann"
        assert users.calls == 3

    def test_middleware_needs_paths(self) -> None:
        """middleware() without a path explains how to name one."""
        with pytest.raises(ValueError, match=r"users\.get"):
            cached(ttl=1).middleware()


class _ClaimRace(MemoryBackend):
    """A memory backend that, once, lets another caller run just before a claim lands."""

    def __init__(self) -> None:
        super().__init__()
        self.before_claim: Callable[[], None] | None = None

    def set(self, key: str, value: bytes, ttl_ms: int | None, when: Any) -> bool:
        hook, self.before_claim = self.before_claim, None
        if hook is not None and "#claim:" in key and when == "absent":
            hook()
        return super().set(key, value, ttl_ms, when)


class TestStampede:
    def test_claim_after_another_caller_stored_does_not_compute_again(self) -> None:
        """Missed, then another caller stored and released before our claim: we read its value."""
        backend = _ClaimRace()
        dm = DataManager()
        Cache(backend, namespace="race").install(dm)
        users = Users()
        dm.register_services(users=users)

        def other() -> None:
            with dm.dal() as dal:
                assert dal.users.get(1) == {"id": 1, "name": "ada"}

        backend.before_claim = other
        with dm.dal() as dal:
            assert dal.users.get(1) == {"id": 1, "name": "ada"}
        assert users.calls == 1

    def test_async_claim_after_another_caller_stored_does_not_compute_again(self) -> None:
        """The same race for an async cached method."""
        backend = _ClaimRace()
        dm = DataManager()
        Cache(backend, namespace="race").install(dm)
        users = Users()
        dm.register_services(users=users)

        def other() -> None:
            with dm.dal() as dal:
                dal.users.get(1)

        async def main() -> dict[str, Any] | None:
            async with dm.dal() as dal:
                return await dal.users.aget(1)

        backend.before_claim = other
        assert asyncio.run(main()) == {"id": 1, "name": "ada"}
        assert users.calls == 1

    def test_concurrent_misses_compute_once(self, dm: DataManager, caplog: pytest.LogCaptureFixture) -> None:
        """Threads missing the same key at once: one computes, the others wait for it."""
        caplog.set_level(logging.WARNING, logger="polydatum.cache")
        users = users_of(dm)
        results: list[int] = []

        def call() -> None:
            with dm.dal() as dal:
                results.append(dal.users.slow())

        threads = [threading.Thread(target=call) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        # Seen once in CI: [1, 1, 1, 1, 2]. A backend marked down (the one path that
        # computes again by design) logs a warning: show it if that is what happened.
        why = [r.getMessage() for r in caplog.records]
        assert results == [1] * 5, why
        assert users.calls == 1, why

    def test_stale_value_is_served_while_one_caller_refreshes(self, cache: Cache) -> None:
        """Past ttl but within stale, a caller that cannot claim the refresh gets the old value."""
        calls = []

        @cached(ttl=0.05, stale=30, key="s", using=cache)
        def compute() -> int:
            calls.append(1)
            return len(calls)

        assert compute() == 1
        time.sleep(0.1)
        token = cache._claim("s", 5)  # someone else is refreshing
        assert token is not None
        assert compute() == 1
        cache._release_claim("s", token)
        assert compute() == 2

    def test_waiter_computes_itself_when_the_claimer_vanishes(self, cache: Cache) -> None:
        """A waiter whose claimer's claim disappears without a value computes by itself."""

        @cached(ttl=30, key="w", using=cache, wait=5)
        def compute() -> str:
            return "mine"

        assert cache._claim("w", 0.05)  # a claimer that dies
        started = time.monotonic()
        assert compute() == "mine"
        assert time.monotonic() - started < 5


class TestAsync:
    async def test_aping_is_a_deprecated_ping(self, redis_url: str) -> None:
        """AsyncRedis.aping() answers as ping() does (False for a dead server), and warns."""
        aredis, dead = AsyncRedis(redis_url), AsyncRedis("redis://127.0.0.1:1/0")
        with pytest.warns(
            DeprecationWarning, match=r"AsyncRedis\.aping\(\) is deprecated; use `await redis\.ping\(\)`"
        ):
            assert await aredis.aping() is True
        with pytest.warns(DeprecationWarning, match="aping"):
            assert await dead.aping() is False
        assert await dead.ping() is False
        await aredis.aclose()
        await dead.aclose()

    async def test_install_returns_self_and_takes_name_by_keyword(self, redis_url: str) -> None:
        """install(dm, name=...) returns the object it was called on; the name is keyword-only."""
        aredis = AsyncRedis(redis_url)
        dm = DataManager()
        assert aredis.install(dm, name="r") is aredis
        cache = aredis.cache(namespace="install")
        assert cache.install(dm, name="c") is cache
        with pytest.raises(TypeError):
            aredis.install(dm, "other")  # type: ignore[call-arg]
        await aredis.aclose()

    async def test_async_cached_method_and_invalidation(self, namespace: str, redis_url: str) -> None:
        """An async cached method on an AsyncCache hits, and invalidates at commit."""
        aredis = AsyncRedis(redis_url)
        acache = aredis.cache(namespace=namespace)
        dm = DataManager()
        acache.install(dm)
        aredis.install(dm, name="redis")
        users = Users()
        dm.register_services(users=users)
        async with dm.dal() as dal:
            assert await dal.users.aget(1) == {"id": 1, "name": "ada"}
            assert await dal.users.aget(1) == {"id": 1, "name": "ada"}
        assert users.calls == 1
        async with dm.dal() as dal:
            await dal.users.arename(1, "ann")
        async with dm.context() as ctx:
            assert await ctx.dal.users.aget(1) == {"id": 1, "name": "ann"}
            assert await ctx.redis.ping()
        assert users.calls == 2
        assert await aredis.ping()
        assert await acache.clear() >= 1
        await aredis.aclose()

    async def test_async_method_on_a_sync_cache(self, dm: DataManager) -> None:
        """An async cached method may use a sync (memory or Redis) Cache."""
        users = users_of(dm)
        async with dm.dal() as dal:
            await dal.users.aget(2)
            await dal.users.aget(2)
        assert users.calls == 1

    async def test_async_stampede_computes_once(self, namespace: str) -> None:
        """Concurrent tasks missing the same key compute it once."""
        acache = AsyncCache(namespace=namespace)
        calls = []

        @cached(ttl=30, key="k", using=acache)
        async def compute() -> int:
            calls.append(1)
            await asyncio.sleep(0.1)
            return 7

        assert await asyncio.gather(*(compute() for _ in range(5))) == [7] * 5
        assert calls == [1]

    def test_sync_method_cannot_use_an_async_cache(self) -> None:
        """A sync function given an AsyncCache is told to become async."""

        @cached(ttl=1, using=AsyncCache())
        def f() -> int:
            return 1

        with pytest.raises(CacheError, match="async def"):
            f()


class TestRedisDown:
    def test_stopped_mid_run_then_restarted(
        self, private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Redis stopped: requests succeed with a warning; restarted: the cache is used again."""
        redis = Redis(private_redis.url)
        cache = redis.cache(namespace="fault", retry_interval=0.05)
        dm = DataManager()
        cache.install(dm)
        users = Users()
        dm.register_services(users=users)
        with dm.dal() as dal:
            dal.users.get(1)
            dal.users.get(1)
        assert users.calls == 1

        private_redis.stop()
        with caplog.at_level(logging.WARNING, logger="polydatum.cache"):
            for _ in range(3):
                with dm.dal() as dal:
                    assert dal.users.get(1) == {"id": 1, "name": "ada"}
                    dal.users.rename(1, "ada")
            assert cache.get("x", "default") == "default"
            assert not cache.set("x", 1)
            assert cache.get_many(["x"]) == {}
            assert cache.incr("n") is None
            assert cache.ttl("x") is None
            assert cache.delete_many(["x"]) == 0
            assert cache.clear() == 0
        assert users.calls == 4
        assert "backend is unavailable" in caplog.text
        # One warning per outage, not one per request.
        assert caplog.text.count("backend is unavailable") == 1
        assert not cache.ping()
        with pytest.raises(CacheUnavailable):
            cache.lock("l", timeout=1).acquire()

        # The recovery may be noticed by the background retry of the held
        # invalidation as soon as Redis is back, so capture from the restart on.
        with caplog.at_level(logging.WARNING, logger="polydatum.cache"):
            private_redis.start()
            time.sleep(0.06)  # past retry_interval
            with dm.dal() as dal:
                dal.users.get(1)
                dal.users.get(1)
        assert users.calls == 5
        assert "reachable again" in caplog.text
        redis.close()

    def test_on_unavailable_raise(self, private_redis: PrivateRedis) -> None:
        """With on_unavailable="raise" a down backend raises CacheUnavailable, also later."""
        redis = Redis(private_redis.url)
        cache = redis.cache(namespace="fault", on_unavailable="raise", retry_interval=30)
        private_redis.stop()
        with pytest.raises(CacheUnavailable, match="unavailable"):
            cache.get("k")
        with pytest.raises(CacheUnavailable, match="retry_interval"):
            cache.set("k", 1)
        redis.close()

    async def test_async_cache_down(
        self, private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The async cache also degrades to misses and recovers."""
        aredis = AsyncRedis(private_redis.url)
        acache = aredis.cache(namespace="fault", retry_interval=0.05)
        await acache.set("k", 1)
        private_redis.stop()
        with caplog.at_level(logging.WARNING, logger="polydatum.cache"):
            assert await acache.get("k") is None
            assert not await acache.set("k", 2)
            assert await acache.get_many(["k"]) == {}
        assert not await acache.ping()
        assert not await aredis.ping()
        private_redis.start()
        await asyncio.sleep(0.06)
        assert await acache.set("k", 3)
        assert await acache.get("k") == 3
        await aredis.aclose()

    def test_no_connection_leak_after_many_contexts(
        self, private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
    ) -> None:
        """1,000 contexts across a restart and a SIGKILL stay within the pool size.

        Contexts that run while the server is dead use only the cache, so they
        succeed with misses; CLIENT LIST afterwards shows no more connections
        than the pool may hold.
        """
        redis = Redis(private_redis.url, max_connections=10)
        cache = redis.cache(namespace="leak", retry_interval=0.01)
        dm = DataManager()
        redis.install(dm, name="redis")
        cache.install(dm, name="cache")
        users = Users()
        dm.register_services(users=users)
        down = range(600, 650)
        with caplog.at_level(logging.WARNING, logger="polydatum.cache"):
            for i in range(1000):
                if i == 300:
                    private_redis.restart()
                elif i == down.start:
                    private_redis.kill()
                elif i == down.stop:
                    private_redis.start()
                with dm.context() as ctx:
                    if i not in down:
                        ctx.redis.set("k", i)
                    ctx.cache.set("c", i)
                    ctx.cache.get("c")
                    assert ctx.dal.users.get(1) == {"id": 1, "name": "ada"}
        assert "reachable again" in caplog.text
        observer = redis_py.Redis.from_url(private_redis.url)
        clients = observer.client_list()
        assert int(observer.get("k")) == 999
        observer.close()
        # Our pool's connections plus the observer itself.
        assert len(clients) <= 10 + 1
        assert len(redis.pool._connections) <= 10
        redis.close()


class Reports(Service):
    """A service that takes a lock around its work, as the issue asks."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self.holding = threading.Event()
        self.release = threading.Event()

    def rebuild(self, who: str, hold: bool) -> None:
        with self._ctx.cache.lock("report", timeout=30, blocking_timeout=20):
            self.events.append(f"{who} in")
            if hold:
                self.holding.set()
                assert self.release.wait(10)
            self.events.append(f"{who} out")


class TestLocks:
    def test_lock_inside_a_service_makes_the_second_caller_wait(self, cache: Cache) -> None:
        """Two threads calling a locked service method: the second runs after the first."""
        dm = DataManager()
        cache.install(dm)
        reports = Reports()
        dm.register_services(reports=reports)

        def call(who: str, hold: bool) -> None:
            with dm.dal() as dal:
                dal.reports.rebuild(who, hold)

        first = threading.Thread(target=call, args=("first", True))
        first.start()
        assert reports.holding.wait(10)
        # Held now: a non-blocking attempt fails, so the second caller has to wait.
        assert not cache.lock("report", timeout=1).acquire(blocking=False)
        second = threading.Thread(target=call, args=("second", False))
        second.start()
        reports.release.set()
        first.join(10)
        second.join(10)
        assert reports.events == ["first in", "first out", "second in", "second out"]

    def test_extend_after_expiry_raises_lock_expired(self, redis: Redis, namespace: str) -> None:
        """Extending a Redis lock that already expired raises LockExpired."""
        lock = redis.lock(f"{namespace}:lock", timeout=0.05)
        assert lock.acquire()
        until_gone = time.monotonic() + 10
        while lock.locked():
            assert time.monotonic() < until_gone
            time.sleep(0.01)
        with pytest.raises(LockExpired, match="longer timeout"):
            lock.extend(5)
        with pytest.raises(LockError, match="acquire it before extending"):
            redis.lock(f"{namespace}:other", timeout=1).extend(5)

    def test_release_from_another_thread_raises_lock_error(
        self, cache: Cache, redis: Redis, namespace: str
    ) -> None:
        """Releasing or extending a lock another thread holds raises LockError, as MemoryLock does."""
        for lock in (cache.lock("held", timeout=30), redis.lock(f"{namespace}:held", timeout=30)):
            assert lock.acquire()
            error = in_thread(lock.release)
            assert isinstance(error, LockError)
            assert "not held by this thread" in str(error)
            if hasattr(lock, "extend"):
                error = in_thread(lambda lock=lock: lock.extend(5))
                assert isinstance(error, LockError)
                assert "not held by this thread" in str(error)
            assert lock.locked()  # still held by its owner, who releases it
            lock.release()
            assert not lock.locked()

    async def test_async_lock_errors(self, redis_url: str, namespace: str) -> None:
        """AsyncRedis locks: positive timeout required, release needs acquire, contention."""
        aredis = AsyncRedis(redis_url)
        with pytest.raises(ValueError, match="locks always expire"):
            aredis.lock("x", timeout=0)
        with pytest.raises(LockError, match="acquire it"):
            await aredis.lock(f"{namespace}:l", timeout=1).release()
        async with aredis.lock(f"{namespace}:l", timeout=5) as held:
            assert await held.locked()
            other = aredis.lock(f"{namespace}:l", timeout=5, blocking_timeout=0.05)
            with pytest.raises(LockNotAcquired, match="blocking_timeout"):
                async with other:
                    pass
        assert not await held.locked()
        await aredis.aclose()

    def test_locks_raise_when_redis_is_down(self, private_redis: PrivateRedis) -> None:
        """Every lock operation raises CacheUnavailable once Redis is gone, even in warn mode."""
        redis = Redis(private_redis.url)
        lock = redis.lock("l", timeout=30)
        assert lock.acquire()
        private_redis.kill()
        for op in (lock.locked, lambda: lock.extend(1), lock.release, redis.lock("m", 1).acquire):
            with pytest.raises(CacheUnavailable, match="Redis is unavailable"):
                op()
        redis.close()

    async def test_async_locks_raise_when_redis_is_down(self, private_redis: PrivateRedis) -> None:
        """The async lock raises CacheUnavailable too."""
        aredis = AsyncRedis(private_redis.url)
        lock = aredis.lock("l", timeout=30)
        assert await lock.acquire()
        private_redis.kill()
        with pytest.raises(CacheUnavailable):
            await lock.locked()
        with pytest.raises(CacheUnavailable):
            await lock.release()
        with pytest.raises(CacheUnavailable):
            await aredis.lock("m", 1).acquire()
        await aredis.aclose()


class TestMoreErrors:
    def test_call_that_does_not_fit_the_signature_names_the_method(self, dm: DataManager) -> None:
        """Arguments that do not bind to the method raise TypeError naming it."""
        with pytest.raises(TypeError, match=r"Users\.search\(\) called with arguments"), dm.dal() as dal:
            dal.users.search("a", 1, 2, 3)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"wait": -1}, r"cached\(wait=...\) must be zero or more"),
            ({"stale": -1}, r"cached\(stale=...\) must be zero or more"),
            ({"lock_timeout": 0}, r"cached\(lock_timeout=...\) must be positive"),
        ],
    )
    def test_bad_wait_or_lock_timeout_is_refused(self, kwargs: dict[str, Any], match: str) -> None:
        """cached() names the bad stale/wait/lock_timeout value."""
        with pytest.raises(ValueError, match=match):
            cached(ttl=1, **kwargs)

    def test_foreign_value_under_a_cached_key_is_recomputed(self, dm: DataManager, cache: Cache) -> None:
        """Something else stored under a cached() key: a miss, computed and overwritten."""
        cache.set("user:1", "not an entry")
        with dm.dal() as dal:
            assert dal.users.get(1) == {"id": 1, "name": "ada"}
        assert cache.get("user:1")[1] == {"id": 1, "name": "ada"}

    def test_msgpack_missing_says_how_to_install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without the msgpack package, asking for it says which extra to install."""
        from polydatum.cache import MsgpackSerializer

        monkeypatch.setitem(__import__("sys").modules, "msgpack", None)
        with pytest.raises(ImportError, match=r"polydatum\[msgpack\]"):
            MsgpackSerializer()

    async def test_async_unstorable_result_names_the_method(self, namespace: str) -> None:
        """An async cached method whose result cannot be serialized names itself, then recovers."""
        acache = AsyncCache(namespace=namespace)

        @cached(ttl=30, key="k", using=acache)
        async def bad() -> object:
            return object()

        with pytest.raises(SerializationError, match=r"bad\(\).*object"):
            await bad()
        assert not await acache._is_claimed("k")  # the claim was released

    async def test_async_middleware(self, namespace: str) -> None:
        """cached(...).middleware() also caches async DAL methods."""
        acache = AsyncCache(namespace=namespace)
        dm = DataManager()
        acache.install(dm)
        users = Users()
        dm.register_services(users=users)
        mw = cached(ttl=30, key="a:{user_id}").middleware("users.aget")
        dm.register_method_middleware(mw)
        async with dm.dal() as dal:
            assert await dal.users.aget(1) == {"id": 1, "name": "ada"}
        async with dm.dal() as dal:
            assert await dal.users.aget(1) == {"id": 1, "name": "ada"}
        assert users.calls == 1

    async def test_async_cache_raise_mode_and_every_op_down(self, private_redis: PrivateRedis) -> None:
        """AsyncCache: warn mode degrades every operation; raise mode raises."""
        aredis = AsyncRedis(private_redis.url)
        warn = aredis.cache(namespace="w", retry_interval=0.05)
        loud = aredis.cache(namespace="r", on_unavailable="raise", retry_interval=30)
        private_redis.stop()
        assert await warn.incr("n") is None
        assert await warn.ttl("k") is None
        assert not await warn.add("k", 1)
        assert not await warn.set_many({"k": 1})
        assert await warn.delete("k") is False
        assert await warn.clear() == 0
        with pytest.raises(CacheUnavailable, match="Redis is unavailable"):
            await loud.get("k")
        with pytest.raises(CacheUnavailable, match="retry_interval"):
            await loud.incr("n")
        await aredis.aclose()

    async def test_async_context_without_redis_makes_no_connection(self, redis_url: str) -> None:
        """An async context that never touches ctx.redis takes no connection."""
        aredis = AsyncRedis(redis_url)
        dm = DataManager()
        aredis.install(dm)
        async with dm.context():
            pass
        assert not aredis.pool._available_connections
        assert not aredis.pool._in_use_connections
        await aredis.aclose()


class TestProcesses:
    def test_forked_child_gets_its_own_pool_connections(self, redis: Redis, namespace: str) -> None:
        """One pool per process: a forked child does not reuse the parent's sockets."""
        import os

        dm = DataManager()
        redis.install(dm)
        with dm.context() as ctx:
            ctx.redis.set(f"{namespace}:parent", os.getpid())
        pid = os.fork()
        if pid == 0:  # the child: use Redis, report through the exit code
            code = 1
            try:
                with dm.context() as ctx:
                    ctx.redis.set(f"{namespace}:child", os.getpid())
                    code = 0 if redis.pool.pid == os.getpid() else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        client = redis.client()
        assert int(client.get(f"{namespace}:child")) == pid
        assert redis.pool.pid == os.getpid()
        client.delete(f"{namespace}:parent", f"{namespace}:child")

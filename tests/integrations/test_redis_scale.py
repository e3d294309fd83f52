"""Redis Cluster and Sentinel: key slots, clear() on every primary, bad URLs, and failover.

Every test runs on private rigs (tests/support/redis_rigs.py): a cluster of 3
primaries and 3 replicas, and a primary with a replica watched by 3
sentinels. The failover tests kill a primary under cached() load and check
that the cache keeps answering (misses while the switch lasts), recovers by
itself, and never serves a value that an invalidation removed.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from polydatum import DataManager, Service
from polydatum.cache import Cache, cached
from polydatum.cache._keys import hash_tag
from polydatum.redis import AsyncRedis, PoolTimeout, Redis
from tests.integrations.conftest import redis_target
from tests.support.redis_rigs import RedisClusterRig, RedisSentinelRig
from tests.support.servers import free_port

KINDS = ["cluster", "sentinel"]


def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait for ``check`` to hold (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.02)


class Profiles(Service):
    """A cached read over a dict standing in for the database."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.db = dict(names)
        self.calls = 0

    @cached(ttl=60, key="profile:{pid}")
    def get(self, pid: int) -> str:
        self.calls += 1
        return self.db[pid]

    def rename(self, pid: int, name: str) -> None:
        self.db[pid] = name
        self.get.invalidate(pid)


@pytest.fixture(name="redis", params=KINDS)
def _redis(request: pytest.FixtureRequest) -> Iterator[Redis]:
    """A Redis on the cluster rig, then on the Sentinel rig."""
    url, options = redis_target(request, request.param)
    redis = Redis(url, **options)
    yield redis
    redis.close()


@pytest.fixture(name="cache")
def _cache(redis: Redis) -> Iterator[Cache]:
    cache = redis.cache(namespace=f"test-{uuid.uuid4().hex[:12]}")
    yield cache
    cache.clear()


class TestKeySlots:
    def test_cached_entry_and_claim_share_a_slot(self, redis_cluster: RedisClusterRig, cache: Cache) -> None:
        """A cached() store is one Lua script over the entry and its claim: both sit in one slot."""
        node = redis_cluster.nodes[0]
        for key in ("profile:1", "{user:7}:posts", "a{b", "#abc{t}"):
            entry, claim = cache.key(key), cache._claim_key(key)
            assert node.cli("cluster", "keyslot", entry) == node.cli("cluster", "keyslot", claim), key

    def test_cached_works_for_keys_in_every_slot_kind(self, cache: Cache) -> None:
        """Keys with a hash tag, without one, and with a stray brace are all cached and invalidated."""
        dm = DataManager()
        cache.install(dm)
        names = {pid: f"name-{pid}" for pid in range(20)}
        profiles = Profiles(names)
        dm.register_services(profiles=profiles)
        with dm.dal() as dal:
            assert [dal.profiles.get(p) for p in names] == list(names.values())
            assert [dal.profiles.get(p) for p in names] == list(names.values())
        assert profiles.calls == len(names)
        with dm.dal() as dal:
            dal.profiles.rename(3, "renamed")
        with dm.dal() as dal:
            assert dal.profiles.get(3) == "renamed"

    def test_long_key_hashing_keeps_the_hash_tag(self, cache: Cache) -> None:
        """A key too long to keep is hashed, but keeps its {tag}: it stays in its slot."""

        class Reports:
            @cached(ttl=60, key="{{user:{uid}}}:" + "x" * 300, using=cache)
            def report(self, uid: int) -> str:
                return f"report-{uid}"

        reports = Reports()
        key = reports.report.key(5)
        assert key.startswith("#")
        assert len(key) < 200
        assert hash_tag(key) == "user:5"
        assert reports.report(5) == "report-5"
        assert cache.get(key) is not None

    def test_an_argument_cannot_choose_the_slot(self, cache: Cache) -> None:
        """Braces in a str argument are escaped: only the template sets a hash tag."""

        class Users:
            @cached(ttl=60, key="user:{name}", using=cache)
            def find(self, name: str) -> str:
                return name

        users = Users()
        assert hash_tag(users.find.key("{hot}")) is None
        assert users.find("{hot}") == "{hot}"


class TestClear:
    def test_clear_reaches_every_primary(self, redis_cluster: RedisClusterRig) -> None:
        """clear() deletes the namespace's keys on all three primaries, not just one."""
        redis = Redis(redis_cluster.url)
        cache = redis.cache(namespace=f"test-{uuid.uuid4().hex[:12]}")
        keys = [f"k{i}" for i in range(60)]
        cache.set_many(dict.fromkeys(keys, 1))
        cluster = redis.client()
        assert isinstance(cluster, RedisCluster)
        holders = {cluster.get_node_from_key(cache.key(k)).port for k in keys}
        assert len(holders) == 3
        assert cache.clear() == len(keys)
        assert cache.get_many(keys) == {}
        redis.close()

    def test_version_bump_and_child_namespaces(self, cache: Cache) -> None:
        """A new version hides older entries; clearing the parent clears children on every node."""
        child = cache.namespaced("child")
        child.set("a", 1)
        cache.set("a", 1)
        newer = Cache(cache.backend, namespace=cache.namespace, version=2)
        assert newer.get("a") is None
        assert cache.clear() == 2
        assert child.get("a") is None


class TestBadInput:
    def test_cluster_url_at_a_plain_redis_says_so(self, redis_url: str) -> None:
        """redis+cluster:// naming a server without cluster mode is refused, saying what to do."""
        address = redis_url.removeprefix("redis://").split("/")[0]
        with pytest.raises(ValueError, match="is not a Redis Cluster node") as info:
            Redis(f"redis+cluster://{address}")
        assert "redis://" in str(info.value)

    @pytest.mark.parametrize(
        ("url", "kwargs", "says"),
        [
            ("redis+cluster://:s3cret@", {}, "names no node"),
            ("redis+cluster://:s3cret@host:notaport", {}, "not a number"),
            ("redis+cluster://:s3cret@host:99999", {}, "not a number"),
            ("redis+cluster://:s3cret@host:7000/2", {}, "only database 0"),
            ("redis+cluster://:s3cret@host:7000?ssl=true", {}, "keyword arguments"),
            ("redis+cluster://:s3cret@:7000", {}, "has no host"),
            ("redis+sentinel://:s3cret@host:26379", {}, "needs service_name"),
            ("redis+sentinel://:s3cret@host:26379/x", {"service_name": "m"}, "database number"),
            ("redis://:s3cret@host:6379", {"service_name": "m"}, "service_name= is for Sentinel"),
            ("redis+cluster://:s3cret@host:7000", {"service_name": "m"}, "is for Sentinel"),
        ],
    )
    def test_malformed_url_is_refused_without_its_password(
        self, url: str, kwargs: dict[str, Any], says: str
    ) -> None:
        """Each malformed URL gets a message naming the fault, and never the password."""
        with pytest.raises(ValueError, match=says) as info:
            Redis(url, **kwargs)
        assert "s3cret" not in str(info.value)

    @pytest.mark.parametrize(
        ("kwargs", "says"),
        [
            ({"cluster_nodes": []}, "non-empty list"),
            ({"cluster_nodes": "host:7000"}, "non-empty list"),
            ({"cluster_nodes": [("host", "7000")]}, "neither"),
            ({"cluster_nodes": ["host:7000"], "url": "redis://host"}, "not both"),
        ],
    )
    def test_bad_cluster_nodes_are_refused(self, kwargs: dict[str, Any], says: str) -> None:
        """cluster_nodes= must be host:port strings or (host, port) pairs, and not come with a URL."""
        url = kwargs.pop("url", None)
        with pytest.raises(ValueError, match=says):
            Redis(url, **kwargs)

    def test_cluster_without_any_reachable_node_raises_at_once(self) -> None:
        """Redis("redis+cluster://...") asks a node for the slot map when made: none answering raises."""
        with pytest.raises(RedisClusterException, match="at least one reachable node"):
            Redis(f"redis+cluster://127.0.0.1:{free_port()}", socket_connect_timeout=0.2)

    def test_unknown_sentinel_service_degrades_naming_it(
        self, redis_sentinel: RedisSentinelRig, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A service name the sentinels do not know: ping() is False, the cache misses saying why."""
        redis = Redis(redis_sentinel.url, service_name="no-such-service")
        assert not redis.ping()
        cache = redis.cache(namespace=f"test-{uuid.uuid4().hex[:12]}")
        with caplog.at_level(logging.WARNING, logger="polydatum.cache"):
            assert cache.get("k", "default") == "default"
        assert "no-such-service" in caplog.text
        redis.close()

    def test_braces_in_a_namespace_are_refused(self) -> None:
        """A namespace with a brace would move every key into one slot, or split claims: refused."""
        with pytest.raises(ValueError, match="hash tag"):
            Cache(namespace="app{1}")

    def test_cluster_nodes_equal_the_url(self, redis_cluster: RedisClusterRig) -> None:
        """Redis(cluster_nodes=[...]) reaches the same cluster as the URL."""
        redis = Redis(cluster_nodes=[n.address for n in redis_cluster.nodes[:1]])
        assert redis.kind == "cluster"
        assert redis.ping()
        assert "redis+cluster://" in repr(redis)
        redis.close()


class TestPools:
    def test_full_node_pool_is_pool_timeout_not_an_outage(self, redis_cluster: RedisClusterRig) -> None:
        """A cluster node's pool with every connection taken raises PoolTimeout; the cache stays up."""
        redis = Redis(redis_cluster.url, max_connections=1)
        cache = redis.cache(namespace=f"test-{uuid.uuid4().hex[:12]}")
        cluster = redis.client()
        assert isinstance(cluster, RedisCluster)
        pool = cluster.get_node_from_key(cache.key("k")).redis_connection.connection_pool
        held = pool.get_connection()
        try:
            with pytest.raises(PoolTimeout, match="max_connections"):
                cache.get("k")
            assert not cache.is_down()
        finally:
            pool.release(held)
        assert cache.get("k") is None
        redis.close()


class TestResources:
    def test_context_gets_the_cluster_client(self, redis_cluster: RedisClusterRig) -> None:
        """ctx.redis on a cluster is the shared cluster client; commands reach any slot."""
        redis = Redis(redis_cluster.url)
        dm = DataManager()
        redis.install(dm)
        name = f"test-{uuid.uuid4().hex[:12]}"
        with dm.context() as ctx:
            for i in range(10):
                ctx.redis.set(f"{name}:{i}", i, ex=60)
            assert ctx.redis.get(f"{name}:9") == b"9"
            ctx.redis.delete(*(f"{name}:{i}" for i in range(10)))
        redis.close()

    def test_lock_on_both(self, redis: Redis) -> None:
        """A lock taken through the cluster or Sentinel client excludes a second taker."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        with redis.lock(name, timeout=5):
            assert not redis.lock(name, timeout=5, blocking_timeout=0.05).acquire(blocking=False)
        assert redis.lock(name, timeout=5).acquire(blocking=False)

    async def test_async_cached_and_invalidation(self, request: pytest.FixtureRequest) -> None:
        """AsyncRedis on both rigs: cached(), invalidation on commit and clear() work."""
        for kind in KINDS:
            url, options = redis_target(request, kind)
            redis = AsyncRedis(url, **options)
            cache = redis.cache(namespace=f"test-{uuid.uuid4().hex[:12]}")
            calls = 0

            @cached(ttl=60, key="n:{n}", using=cache)
            async def double(n: int) -> int:
                nonlocal calls
                calls += 1
                return n * 2

            assert [await double(i) for i in range(5)] == [0, 2, 4, 6, 8]
            assert [await double(i) for i in range(5)] == [0, 2, 4, 6, 8]
            assert calls == 5
            assert await cache.clear() == 5
            await redis.aclose()


class Load:
    """Threads calling a cached() method through the DAL until stopped, recording what they got."""

    def __init__(self, dm: DataManager, pids: list[int], threads: int = 4) -> None:
        self.dm = dm
        self.pids = pids
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.answers = 0
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in self.pids:
                try:
                    with self.dm.dal() as dal:
                        dal.profiles.get(pid)
                    self.answers += 1
                except BaseException as exc:  # handed back to the test
                    self.errors.append(exc)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)


def _app(redis: Redis, pids: list[int]) -> tuple[DataManager, Profiles, Cache]:
    dm = DataManager()
    cache = redis.cache(namespace=f"test-{uuid.uuid4().hex[:12]}", retry_interval=0.2)
    cache.install(dm)
    profiles = Profiles({pid: f"old-{pid}" for pid in pids})
    dm.register_services(profiles=profiles)
    with dm.dal() as dal:  # warm every entry
        for pid in pids:
            dal.profiles.get(pid)
    return dm, profiles, cache


def _read(dm: DataManager, pid: int) -> str:
    with dm.dal() as dal:
        return str(dal.profiles.get(pid))


def _served_from_cache(dm: DataManager, profiles: Profiles, pid: int) -> bool:
    """Read ``pid`` (its right value) and tell whether the service was not called for it."""
    calls = profiles.calls
    assert _read(dm, pid) == f"old-{pid}"
    return profiles.calls == calls


class TestFailover:
    def test_killed_cluster_primary_under_load(self, private_redis_cluster: RedisClusterRig) -> None:
        """A primary dies under cached() load: no errors, misses during the switch, nothing stale after."""
        redis = Redis(private_redis_cluster.url)
        pids = list(range(12))
        dm, profiles, cache = _app(redis, pids)
        victim = pids[0]
        with Load(dm, pids) as load:
            until(lambda: load.answers > 50, "the load to get going")
            killed = private_redis_cluster.kill_primary_of(cache.key(f"profile:{victim}"))
            # Invalidated while its slot has no primary: the delete waits, and is
            # replayed before anything is read once a replica took over.
            with dm.dal() as dal:
                dal.profiles.rename(victim, "new")
            assert _read(dm, victim) == "new"  # a miss, computed from the database
            private_redis_cluster.wait_failover(killed)
            until(lambda: cache.ping(), "the cache to answer again")
            answered = load.answers
            until(lambda: load.answers > answered + 50, "the load to go on")
        assert load.errors == []
        assert not killed.alive()
        served = [_read(dm, victim) for _ in range(20)]
        assert served == ["new"] * 20
        assert _read(dm, pids[-1]) == f"old-{pids[-1]}"
        # Served from the cache again: a write made while the cache still counted
        # the backend as down was dropped, so the entry may take one more read.
        until(lambda: _served_from_cache(dm, profiles, pids[-1]), "a read served from the cache")
        redis.close()

    def test_sentinel_failover_under_load(self, private_redis_sentinel: RedisSentinelRig) -> None:
        """The Sentinel primary dies under load: no errors, the promoted replica serves, nothing stale."""
        redis = Redis(private_redis_sentinel.url, service_name=private_redis_sentinel.service)
        pids = list(range(8))
        dm, profiles, cache = _app(redis, pids)
        old_port = private_redis_sentinel.current_primary_port()
        with Load(dm, pids) as load:
            until(lambda: load.answers > 50, "the load to get going")
            private_redis_sentinel.kill_primary()
            with dm.dal() as dal:
                dal.profiles.rename(pids[0], "new")
            assert _read(dm, pids[0]) == "new"
            private_redis_sentinel.wait_failover(old_port)
            until(lambda: cache.ping(), "the cache to answer again")
            answered = load.answers
            until(lambda: load.answers > answered + 50, "the load to go on")
        assert load.errors == []
        assert [_read(dm, pids[0]) for _ in range(20)] == ["new"] * 20
        assert _read(dm, pids[1]) == f"old-{pids[1]}"
        until(lambda: _served_from_cache(dm, profiles, pids[1]), "a read served from the cache")
        redis.close()

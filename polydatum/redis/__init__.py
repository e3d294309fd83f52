"""Redis: a shared pool, a client per context, caches and locks
==============================================================

:class:`Redis` owns one :class:`redis.ConnectionPool` for the process. Install
it and every context gets a :class:`redis.Redis` client on that pool as
``ctx.redis``, created on first use (a context that never touches Redis takes
no connection). :meth:`Redis.cache` gives a :class:`~polydatum.cache.Cache`
stored in Redis, and :meth:`Redis.lock` a lock built on redis-py's ``Lock``::

    from polydatum import DataManager, Service
    from polydatum.cache import cached
    from polydatum.redis import Redis

    class Users(Service):
        @cached(ttl=60, key="user:{user_id}")
        def get(self, user_id):
            return {"id": user_id}

        def rebuild_report(self):
            with self._ctx.cache.lock("report", timeout=30):
                self._ctx.redis.set("report", "...")

    redis = Redis("redis://127.0.0.1:6379/0")
    redis.install(dm := DataManager(), name="redis")       # ctx.redis: redis.Redis
    redis.cache(namespace="myapp").install(dm, name="cache")  # ctx.cache: Cache
    dm.register_services(users=Users())
    with dm.dal() as dal:
        dal.users.get(1)

:class:`AsyncRedis` is the same on ``redis.asyncio`` with an
:class:`~polydatum.cache.AsyncCache`; create it inside the event loop that
uses it. When Redis is down a cache degrades to misses (see
:mod:`polydatum.cache`); the raw client and locks raise redis-py's or
:class:`~polydatum.cache.CacheUnavailable` errors as usual. The pool is a
blocking one: when all ``max_connections`` are busy a command waits up to
``pool_timeout`` seconds for one, then raises :class:`PoolTimeout`, which no
cache mistakes for an outage.

The same classes talk to a Redis Cluster (``Redis("redis+cluster://h:7000,h2:7000")``
or ``Redis(cluster_nodes=[...])``) or to the primary a Sentinel group names
(``Redis("redis+sentinel://h:26379,h2:26379/0", service_name="cache")``); a
failover is an outage the cache rides out with misses. Cache keys are laid out
so that each multi-key script stays in one cluster slot (see
``docs/integrations/redis.md``).

.. versionadded:: 2.0
"""

from __future__ import annotations

try:
    import redis  # noqa: F401  (only to say what is missing)
except ImportError:  # pragma: no cover - exercised only without the extra
    msg = 'polydatum.redis needs redis-py; install it with: pip install "polydatum[redis]"'
    raise ImportError(msg) from None

from polydatum.redis._backend import AsyncRedisBackend, RedisBackend
from polydatum.redis._client import AsyncRedis, Redis
from polydatum.redis._connections import AsyncClient as AsyncClient
from polydatum.redis._connections import PoolTimeout
from polydatum.redis._connections import SyncClient as SyncClient
from polydatum.redis._locks import AsyncRedisLock, RedisLock

__all__ = [
    "AsyncRedis",
    "AsyncRedisBackend",
    "AsyncRedisLock",
    "PoolTimeout",
    "Redis",
    "RedisBackend",
    "RedisLock",
]

"""The clients: :class:`Redis` and :class:`AsyncRedis`, one shared pool each."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import redis as _redis
import redis.asyncio as _aredis
from redis.asyncio.cluster import ClusterNode as _AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as _AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel as _AsyncSentinel
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.sentinel import SentinelConnectionPool

from polydatum.cache import AsyncCache, Cache, Serializer
from polydatum.cache._base import lock_times
from polydatum.cache._deprecated import aping_alias
from polydatum.redis._backend import AsyncRedisBackend, RedisBackend
from polydatum.redis._base import RedisBase
from polydatum.redis._connections import (
    AsyncBlockingPool,
    AsyncBlockingSentinelPool,
    AsyncClient,
    BlockingPool,
    SyncClient,
    cluster_client,
    cluster_options,
    sentinel_client,
    sentinel_kwargs,
)
from polydatum.redis._locks import AsyncRedisLock, RedisLock

if TYPE_CHECKING:
    from typing_extensions import Self

    from polydatum.context import DataAccessContext
    from polydatum.types import ResourceRegistry


class Redis(RedisBase):
    """One connection pool for the process, handing out clients, caches and locks.

    It talks to one Redis server, to a Redis Cluster or to the primary a
    Sentinel group names, by the URL's scheme::

        Redis("redis://:password@127.0.0.1:6379/0")                 # one server
        Redis("redis+cluster://10.0.0.1:7000,10.0.0.2:7000")        # a Redis Cluster
        Redis(cluster_nodes=["10.0.0.1:7000", "10.0.0.2:7000"])     # the same
        Redis("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/0", service_name="cache")

    On a cluster, any reachable node is enough to start: the client learns
    the others and follows failovers. Through Sentinel, each new connection
    asks the sentinels where the primary is, so a promoted replica is used
    without a restart.

    Args:
        url: a redis-py URL, e.g. ``redis://:password@host:6379/0``, or
            ``redis+cluster://[user:password@]host:port,...`` or
            ``redis+sentinel://[user:password@]host:port,.../db`` (the
            credentials are the Redis nodes', not the sentinels').
        cluster_nodes: instead of a URL, the cluster nodes to start from, as
            ``"host:port"`` strings or ``(host, port)`` pairs.
        service_name: with a ``redis+sentinel://`` URL, the name the sentinels
            monitor the primary under.
        sentinel_options: connection options for the sentinels themselves
            (e.g. ``{"password": ...}``); timeouts default to 1 second.
        pool_options: passed to :meth:`redis.BlockingConnectionPool.from_url`,
            except ``pool_timeout``: seconds a command waits for a free
            connection once all ``max_connections`` are in use (None: forever),
            then :class:`PoolTimeout`. Defaults that differ from redis-py's:
            ``max_connections=50``, ``pool_timeout=5.0``,
            ``socket_connect_timeout=1.0``, ``retry=Retry(NoBackoff(), 1)`` and
            ``health_check_interval=30``. On a cluster each node has its own
            pool of ``max_connections``, and a full one raises
            :class:`PoolTimeout` at once.

    Raises:
        ValueError: a malformed ``redis+cluster://`` or ``redis+sentinel://``
            URL, or a ``redis+cluster://`` URL whose node is not a cluster node.

    .. versionadded:: 2.0
    .. versionchanged:: 2.0
       ``redis+cluster://``, ``cluster_nodes=`` and ``redis+sentinel://``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        cluster_nodes: Sequence[str | tuple[str, int]] | None = None,
        service_name: str | None = None,
        sentinel_options: Mapping[str, Any] | None = None,
        **pool_options: Any,
    ) -> None:
        super().__init__(url, cluster_nodes, service_name, sentinel_options, pool_options)
        topology, options = self._topology, self._options
        self._client: SyncClient
        # redis-py's pools notice a fork and start afresh in the child.
        if topology.kind == "cluster":
            self._client = cluster_client(topology, options)
            self.pool: _redis.ConnectionPool | None = None
        elif topology.kind == "sentinel":
            self._client = sentinel_client(topology, options, sentinel_options)
            self.pool = self._client.connection_pool
        else:
            self.pool = BlockingPool.from_url(self.url, **options)
            self._client = _redis.Redis(connection_pool=self.pool)

    def client(self) -> SyncClient:
        """A client on the shared pool (it connects only when used).

        A new :class:`redis.Redis`, or on a cluster the one shared
        :class:`redis.cluster.RedisCluster` (it is thread-safe and keeps a pool
        per node).
        """
        if isinstance(self._client, RedisCluster):
            return self._client
        return _redis.Redis(connection_pool=self._client.connection_pool)

    def install(self, dm: ResourceRegistry, *, name: str = "redis") -> Self:
        """Register the resource ``name``: ``ctx.<name>`` is a client on the shared pool.

        Returns:
            this object.
        """
        template = self._client
        if isinstance(template, RedisCluster):
            shared = template

            def cluster_resource(ctx: DataAccessContext) -> Iterator[RedisCluster]:
                # Commands take a node's pooled connection each: nothing to copy or close.
                yield shared

            dm.register_resources(**{name: cluster_resource})
            return self

        def redis_resource(ctx: DataAccessContext) -> Iterator[_redis.Redis]:
            # A shallow copy of a client on the pool: its own object for this
            # context, without redis.Redis.__init__, which costs more than a GET.
            client = copy.copy(template)
            try:
                yield client
            finally:
                client.close()  # returns a pinned connection, never closes the shared pool

        dm.register_resources(**{name: redis_resource})
        return self

    def cache(
        self,
        *,
        namespace: str = "default",
        version: int | str = 1,
        serializer: str | Serializer = "json",
        on_unavailable: Literal["warn", "raise"] = "warn",
        retry_interval: float = 1.0,
        max_undelivered: int = 10_000,
        outbox: Any = None,
    ) -> Cache:
        """A :class:`~polydatum.cache.Cache` stored in this Redis (arguments as for ``Cache``)."""
        return Cache(
            RedisBackend(self),
            namespace=namespace,
            version=version,
            serializer=serializer,
            on_unavailable=on_unavailable,
            retry_interval=retry_interval,
            max_undelivered=max_undelivered,
            outbox=outbox,
        )

    def lock(self, name: str, timeout: float, *, blocking_timeout: float | None = 10.0) -> RedisLock:
        """A lock on the Redis key ``name``, expiring ``timeout`` seconds after it is taken.

        Use as ``with redis.lock("report", timeout=30):``; see :class:`RedisLock`.
        """
        timeout, blocking_timeout = lock_times(timeout, blocking_timeout)
        return RedisLock(self._client, name, timeout, blocking_timeout)

    def ping(self) -> bool:
        """True when Redis (on a cluster, every primary) answers a PING; never raises."""
        try:
            return bool(self._client.ping())
        except (_redis.RedisError, RedisClusterException):
            return False

    def close(self) -> None:
        """Close every connection of the pool (a later use reconnects)."""
        if isinstance(self._client, RedisCluster):
            self._client.disconnect_connection_pools()  # type: ignore[no-untyped-call]
            return
        pool = self._client.connection_pool
        pool.disconnect()
        if isinstance(pool, SentinelConnectionPool):
            for client in pool.sentinel_manager.sentinels:
                client.close()


class AsyncRedis(RedisBase):
    """:class:`Redis` on ``redis.asyncio``: create it in the event loop that uses it.

    Same arguments as :class:`Redis` (clusters and Sentinel included); a full
    pool waits without blocking the loop. A cluster client learns the nodes
    at its first command, so a ``redis+cluster://`` URL naming a node that is
    not a cluster node is reported then, by redis-py's
    ``RedisClusterException`` (:class:`Redis` checks at once).

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        cluster_nodes: Sequence[str | tuple[str, int]] | None = None,
        service_name: str | None = None,
        sentinel_options: Mapping[str, Any] | None = None,
        **pool_options: Any,
    ) -> None:
        super().__init__(url, cluster_nodes, service_name, sentinel_options, pool_options)
        topology, options = self._topology, self._options
        self._sync: Redis | None = None
        self._sync_lock = threading.Lock()
        self._client: AsyncClient
        self._startup_nodes: list[_AsyncClusterNode] = []
        self._sentinel: _AsyncSentinel | None = None
        if topology.kind == "cluster":
            nodes = self._startup_nodes = [_AsyncClusterNode(host, port) for host, port in topology.nodes]
            self._client = _AsyncRedisCluster(startup_nodes=nodes, **cluster_options(topology, options))
            self.pool: _aredis.ConnectionPool | None = None
        elif topology.kind == "sentinel":
            sentinel = self._sentinel = _AsyncSentinel(  # type: ignore[no-untyped-call]
                list(topology.nodes), sentinel_kwargs=sentinel_kwargs(sentinel_options)
            )
            assert topology.service_name is not None  # parse() refuses a Sentinel URL without one
            client: _aredis.Redis = sentinel.master_for(
                topology.service_name,
                connection_pool_class=AsyncBlockingSentinelPool,
                db=topology.db,
                username=topology.username,
                password=topology.password,
                **options,
            )
            self._client = client
            self.pool = client.connection_pool
        else:
            self.pool = AsyncBlockingPool.from_url(self.url, **options)
            self._client = _aredis.Redis(connection_pool=self.pool)

    def client(self) -> AsyncClient:
        """A new :class:`redis.asyncio.Redis` on the shared pool (on a cluster, the shared client)."""
        if isinstance(self._client, _AsyncRedisCluster):
            return self._client
        return _aredis.Redis(connection_pool=self._client.connection_pool)

    def install(self, dm: ResourceRegistry, *, name: str = "redis") -> Self:
        """Register the resource ``name``: ``ctx.<name>`` is an async client on the shared pool.

        It is a plain (sync) resource, so ``ctx.redis`` works without
        ``await ctx.aget(...)``: making the client does no I/O, and as it takes a
        pooled connection per command there is nothing to close afterwards.
        """

        template = self._client

        def redis_resource(ctx: DataAccessContext) -> Iterator[AsyncClient]:
            # See Redis.install: cheaper than a new client; a cluster client is shared.
            yield template if isinstance(template, _AsyncRedisCluster) else copy.copy(template)

        dm.register_resources(**{name: redis_resource})
        return self

    def cache(
        self,
        *,
        namespace: str = "default",
        version: int | str = 1,
        serializer: str | Serializer = "json",
        on_unavailable: Literal["warn", "raise"] = "warn",
        retry_interval: float = 1.0,
        max_undelivered: int = 10_000,
        outbox: Any = None,
    ) -> AsyncCache:
        """An :class:`~polydatum.cache.AsyncCache` stored in this Redis.

        With ``outbox=``, invalidations are outbox rows (see
        :class:`~polydatum.cache.AsyncCache`), deleted through :attr:`sync`.
        """
        return AsyncCache(
            AsyncRedisBackend(self),
            namespace=namespace,
            version=version,
            serializer=serializer,
            on_unavailable=on_unavailable,
            retry_interval=retry_interval,
            max_undelivered=max_undelivered,
            outbox=outbox,
            sync_backend=None if outbox is None else RedisBackend(self.sync),
        )

    @property
    def sync(self) -> Redis:
        """A :class:`Redis` on the same server or nodes and pool options, made on first use.

        For code outside the event loop: the outbox delivers an
        :class:`~polydatum.cache.AsyncCache`'s invalidations through it (in a
        worker thread, or in a relay). Close it with :meth:`aclose`.
        """
        side = self._sync
        if side is None:
            with self._sync_lock:
                if self._sync is None:
                    self._sync = Redis(**self._arguments)
                side = self._sync
        return side

    def lock(self, name: str, timeout: float, *, blocking_timeout: float | None = 10.0) -> AsyncRedisLock:
        """See :meth:`Redis.lock`; use it with ``async with``."""
        timeout, blocking_timeout = lock_times(timeout, blocking_timeout)
        return AsyncRedisLock(self._client, name, timeout, blocking_timeout)

    async def ping(self) -> bool:
        """True when Redis (on a cluster, every primary) answers a PING; never raises.

        .. versionchanged:: 2.0
            Renamed from ``aping()``, which is deprecated.
        """
        try:
            return bool(await self._client.ping())
        except (_redis.RedisError, RedisClusterException):
            return False

    aping = aping_alias("AsyncRedis", "redis")

    async def aclose(self) -> None:
        """Close every connection of the pool (to the sentinels, and :attr:`sync`'s once made)."""
        if self._sync is not None:
            self._sync.close()
        if self._sentinel is not None:
            await asyncio.gather(*(client.aclose() for client in self._sentinel.sentinels))
        if self.pool is not None:
            await self.pool.aclose()
            return
        await self._client.aclose()
        # The cluster client closes the nodes it discovered, not the ones it
        # started from, whose connections found the others.
        await asyncio.gather(*(node.disconnect() for node in self._startup_nodes))

"""Connections: pools that wait when full, cluster and Sentinel clients, and the errors.

Every client polydatum.redis makes comes from here. A full pool is told apart
from an outage (:class:`PoolTimeout`, never a degraded cache), and every
failure that means "Redis cannot serve us now" becomes a
:class:`~polydatum.cache.CacheUnavailable` through :func:`unavailable`.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Mapping, Sequence
from typing import Any

import redis as _redis
import redis.asyncio as _aredis
from redis.asyncio.cluster import RedisCluster as _AsyncRedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool as _AsyncSentinelConnectionPool
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import MaxConnectionsError, RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from polydatum.cache import CacheBusy, CacheUnavailable
from polydatum.redis._topology import Topology, nodes_from, parse

SyncClient = _redis.Redis | RedisCluster
AsyncClient = _aredis.Redis | _AsyncRedisCluster

# Failures that mean "Redis cannot serve us now" (down, overloaded, full, a
# replica during failover, a cluster whose slots are being taken over), as
# opposed to a bug in the command. A full pool (MaxConnectionsError, a
# ConnectionError) is told apart in unavailable().
UNAVAILABLE = (
    _redis.ConnectionError,
    _redis.TimeoutError,
    _redis.exceptions.OutOfMemoryError,
    _redis.exceptions.ReadOnlyError,
    _redis.exceptions.ClusterDownError,
    _redis.exceptions.ClusterError,
    _redis.exceptions.TryAgainError,
    # Raised when no node answers ("Redis Cluster cannot be connected") or the
    # slots are not all covered yet; the client-side slot checks it also
    # covers cannot fail here, as no command of ours spans two slots.
    RedisClusterException,
)


def pool_options(options: Mapping[str, Any]) -> dict[str, Any]:
    # redis-py waits 5 s to connect and never retries; a cache should give up
    # sooner, and retry once so a connection gone stale (a Redis restart) is
    # replaced at once instead of failing the first command.
    merged: dict[str, Any] = {
        "max_connections": 50,
        "pool_timeout": 5.0,
        "socket_connect_timeout": 1.0,
        "socket_timeout": 5.0,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
        # Keys are text and may come from a client: one holding a lone surrogate
        # ("\udcff" from JSON) is stored as the other backends store it (UTF-8
        # with the surrogate kept), not refused with a UnicodeEncodeError.
        "encoding_errors": "surrogatepass",
    }
    if "timeout" in options:
        msg = (
            "Redis() takes pool_timeout= (seconds to wait for a free connection when all "
            "max_connections are in use) and socket_timeout= (seconds to wait for Redis to "
            "answer), not timeout="
        )
        raise TypeError(msg)
    merged.update(options)
    wait = merged.pop("pool_timeout")
    if wait is not None and not (isinstance(wait, int | float) and wait > 0):
        msg = f"pool_timeout must be positive seconds (or None to wait forever), got {wait!r}"
        raise ValueError(msg)
    merged["timeout"] = wait  # BlockingConnectionPool's name for it
    return merged


class PoolTimeout(CacheBusy, _redis.RedisError):
    """Every connection of the pool stayed in use for ``pool_timeout`` seconds.

    Redis itself is fine: this process ran more Redis commands at once than
    ``max_connections``. Raised by the clients and by caches, which do not
    count it as an outage. A :class:`~polydatum.cache.CacheBusy` and a
    :class:`redis.RedisError`.

    .. versionadded:: 2.0
    """


def pool_timeout_error(pool: _redis.BlockingConnectionPool | _aredis.BlockingConnectionPool) -> PoolTimeout:
    msg = (
        f"no Redis connection came free within pool_timeout={pool.timeout}s: all "
        f"max_connections={pool.max_connections} are in use in this process (Redis itself "
        "is reachable); pass a larger max_connections or pool_timeout to Redis(), or run "
        "fewer Redis commands at once"
    )
    return PoolTimeout(msg)


class BlockingPool(_redis.BlockingConnectionPool):
    """redis-py's blocking pool, whose wait running out is a PoolTimeout, not an outage."""

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except _redis.ConnectionError as exc:
            # redis-py raises the same ConnectionError class when the wait runs
            # out as when Redis is down; only the queue.Empty behind it tells.
            if not isinstance(exc.__context__, queue.Empty):
                raise
        raise pool_timeout_error(self)


class AsyncBlockingPool(_aredis.BlockingConnectionPool):
    """:class:`BlockingPool` for redis.asyncio."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except _redis.ConnectionError as exc:
            if not isinstance(exc.__cause__, asyncio.TimeoutError | TimeoutError):
                raise
        raise pool_timeout_error(self)


def unavailable(exc: BaseException) -> CacheUnavailable | PoolTimeout:
    if isinstance(exc, MaxConnectionsError):  # a cluster node's or Sentinel's full pool
        return PoolTimeout(
            f"every connection of a Redis pool is in use in this process ({exc}); pass a larger "
            "max_connections to Redis(), or run fewer Redis commands at once"
        )
    return CacheUnavailable(f"Redis is unavailable: {type(exc).__name__}: {exc}")


def topology_of(
    url: str | None, cluster_nodes: Sequence[str | tuple[str, int]] | None, service_name: str | None
) -> Topology:
    if cluster_nodes is None:
        return parse(url if url is not None else "redis://127.0.0.1:6379/0", service_name)
    if url is not None or service_name is not None:
        msg = "pass cluster_nodes= alone, or a URL: not both (and service_name= is for Sentinel)"
        raise ValueError(msg)
    return Topology("cluster", nodes_from(cluster_nodes, "cluster_nodes="))


def cluster_url(topology: Topology) -> str:
    return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in topology.nodes)


def cluster_options(topology: Topology, options: dict[str, Any]) -> dict[str, Any]:
    options = dict(options)
    # A cluster makes one plain pool per node: it neither waits for a free
    # connection nor checks idle ones, and retries itself at cluster level
    # (redirections, a failed node) with the retry given here.
    options.pop("timeout")
    options.pop("health_check_interval")
    options.pop("db", None)
    if topology.username is not None:
        options["username"] = topology.username
    if topology.password is not None:
        options["password"] = topology.password
    return options


def not_a_cluster(topology: Topology) -> ValueError:
    nodes = ", ".join(f"{host}:{port}" for host, port in topology.nodes)
    msg = (
        f"the Redis at {nodes} is not a Redis Cluster node (cluster mode is not enabled there); "
        "use a redis:// URL for a single server, or point redis+cluster:// at nodes started "
        "with cluster-enabled yes"
    )
    return ValueError(msg)


def cluster_client(topology: Topology, options: dict[str, Any]) -> RedisCluster:
    nodes = [ClusterNode(host, port) for host, port in topology.nodes]  # type: ignore[no-untyped-call]
    try:
        return RedisCluster(startup_nodes=nodes, **cluster_options(topology, options))
    except RedisClusterException as exc:
        if "cluster mode is not enabled" in str(exc).lower():
            raise not_a_cluster(topology) from None
        raise


class BlockingSentinelPool(SentinelConnectionPool, BlockingPool):
    """Sentinel's pool (it asks the sentinels where the primary is) that waits when full."""


class AsyncBlockingSentinelPool(_AsyncSentinelConnectionPool, AsyncBlockingPool):
    """:class:`BlockingSentinelPool` for redis.asyncio."""


def sentinel_kwargs(sentinel_options: Mapping[str, Any] | None) -> dict[str, Any]:
    # Without timeouts a sentinel that hangs would hang every new connection.
    merged: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
    merged.update(sentinel_options or {})
    return merged


def sentinel_client(
    topology: Topology, options: dict[str, Any], sentinel_options: Mapping[str, Any] | None
) -> _redis.Redis:
    sentinel = Sentinel(list(topology.nodes), sentinel_kwargs=sentinel_kwargs(sentinel_options))  # type: ignore[no-untyped-call]
    assert topology.service_name is not None  # parse() refuses a Sentinel URL without one
    return sentinel.master_for(  # type: ignore[no-any-return,no-untyped-call]
        topology.service_name,
        connection_pool_class=BlockingSentinelPool,
        db=topology.db,
        username=topology.username,
        password=topology.password,
        **options,
    )

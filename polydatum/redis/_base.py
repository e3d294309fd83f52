"""What :class:`~polydatum.redis.Redis` and :class:`~polydatum.redis.AsyncRedis` share: no I/O.

The arguments (a URL or cluster nodes, Sentinel, pool options), the topology
they name, the repr and the lock arguments are read the same way for both;
each subclass makes its own kind of client from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from polydatum.redis._connections import cluster_url, pool_options, topology_of
from polydatum.redis._topology import Topology, redacted


class RedisBase:
    """The parsed arguments of a :class:`~polydatum.redis.Redis` or :class:`~polydatum.redis.AsyncRedis`.

    Raises:
        ValueError: a malformed URL, or ``cluster_nodes=`` with a URL.
        TypeError: ``timeout=`` among the pool options.
    """

    #: The pool of a single server or of Sentinel's primary; None on a cluster.
    pool: Any

    def __init__(
        self,
        url: str | None,
        cluster_nodes: Sequence[str | tuple[str, int]] | None,
        service_name: str | None,
        sentinel_options: Mapping[str, Any] | None,
        options: dict[str, Any],
    ) -> None:
        self._topology: Topology = topology_of(url, cluster_nodes, service_name)
        # The arguments as given, for a twin on the same nodes (AsyncRedis.sync).
        self._arguments: dict[str, Any] = {
            "url": url,
            "cluster_nodes": cluster_nodes,
            "service_name": service_name,
            "sentinel_options": sentinel_options,
            **options,
        }
        self.url = url if url is not None else cluster_url(self._topology)
        #: ``"single"``, ``"cluster"`` or ``"sentinel"``.
        self.kind = self._topology.kind
        # What redis-py's pools take: polydatum's defaults, pool_timeout renamed.
        self._options = pool_options(options)

    def __repr__(self) -> str:
        if self.kind == "single":
            return f"<{type(self).__name__} {self.pool!r}>"
        return f"<{type(self).__name__} {self.kind} {redacted(self.url)!r}>"

    def client(self) -> Any:  # pragma: no cover - both subclasses define it
        """A client on the shared pool."""
        raise NotImplementedError

"""Where the Redis is: one server, a Redis Cluster, or a primary found through Sentinel.

``redis+cluster://`` and ``redis+sentinel://`` URLs (and ``cluster_nodes=``)
are parsed here into a :class:`Topology`; plain ``redis://``, ``rediss://``
and ``unix://`` URLs stay redis-py's to parse. Error messages never repeat a
password: they show the URL with its user part replaced by ``***``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

CLUSTER = "redis+cluster"
SENTINEL = "redis+sentinel"
_DEFAULT_PORT = {CLUSTER: 6379, SENTINEL: 26379}

Kind = Literal["single", "cluster", "sentinel"]


@dataclass(frozen=True)
class Topology:
    """The nodes to start from and the credentials for a cluster or a Sentinel group."""

    kind: Kind
    nodes: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    db: int = 0
    service_name: str | None = None


def redacted(url: str) -> str:
    """``url`` with any user and password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if "@" in url else url
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}://{netloc}{slash}{path}"


def _node(text: str, default_port: int, where: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[::1]:port"``, or a bare host) as a pair."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        msg = f"{where}: node {text!r} has no host; write nodes as host:port, separated by commas"
        raise ValueError(msg)
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        msg = f"{where}: node {text!r} has port {port!r}, which is not a number from 1 to 65535"
        raise ValueError(msg)
    return host, int(port)


def nodes_from(items: Sequence[str | tuple[str, int]], where: str) -> tuple[tuple[str, int], ...]:
    """``cluster_nodes=`` entries (``"host:port"`` or ``(host, port)``) as pairs."""
    if isinstance(items, str) or not items:
        msg = f'{where} must be a non-empty list of "host:port" strings or (host, port) pairs, got {items!r}'
        raise ValueError(msg)
    pairs = []
    for item in items:
        if isinstance(item, str):
            pairs.append(_node(item, _DEFAULT_PORT[CLUSTER], where))
        elif (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], int)
        ):
            pairs.append(_node(f"{item[0]}:{item[1]}", _DEFAULT_PORT[CLUSTER], where))
        else:
            msg = f'{where}: {item!r} is neither "host:port" nor a (host, port) pair'
            raise ValueError(msg)
    return tuple(pairs)


def parse(url: str, service_name: str | None) -> Topology:
    """The topology a URL names; ``kind="single"`` for anything redis-py parses itself."""
    scheme, _, rest = url.partition("://")
    if scheme not in (CLUSTER, SENTINEL):
        if service_name is not None:
            msg = (
                f"service_name= is for Sentinel; it needs a redis+sentinel://host:port,... URL, "
                f"got {redacted(url)!r}"
            )
            raise ValueError(msg)
        return Topology("single")
    where = f"{scheme} URL {redacted(url)!r}"
    netloc, _, path = rest.partition("/")
    if "?" in netloc or "?" in path:
        msg = f"{where}: query options are not read here; pass them to Redis() as keyword arguments"
        raise ValueError(msg)
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    if not hosts:
        msg = f"{where} names no node; write {scheme}://host:port,host:port"
        raise ValueError(msg)
    nodes = tuple(_node(h.strip(), _DEFAULT_PORT[scheme], where) for h in hosts.split(","))
    path = path.strip("/")
    if path and not path.isdigit():
        msg = f"{where}: the path must be a database number, got {path!r}"
        raise ValueError(msg)
    db = int(path or 0)
    if scheme == CLUSTER:
        if db != 0:
            msg = f"{where}: a Redis Cluster has only database 0, not {db}"
            raise ValueError(msg)
        if service_name is not None:
            msg = f"{where}: service_name= is for Sentinel, not a Redis Cluster"
            raise ValueError(msg)
        return Topology("cluster", nodes, username, password)
    if not service_name or not isinstance(service_name, str):
        msg = (
            f"{where} needs service_name=, the name the sentinels monitor the primary under "
            "(their `sentinel monitor <name> ...` line)"
        )
        raise ValueError(msg)
    return Topology("sentinel", nodes, username, password, db, service_name)

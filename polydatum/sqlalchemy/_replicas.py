"""Read replicas: which node a session reads from, and whether each replica is fit to.

States of a session's :class:`Route` (``get_bind`` runs on every statement,
so the common case is one attribute test):

==========================  ==========================================
state                       where a statement goes
==========================  ==========================================
``primary`` set             the primary (the context wrote, or asked)
flush, DML, ``text()``      the primary, and ``primary`` is set
a SELECT, replica chosen    that replica (the same one all context long)
a SELECT, none chosen yet   the next fit replica (round robin), else the primary
no clause (dialect lookup)  the primary, state unchanged
==========================  ==========================================

A replica is *fit* when its last health check (at most ``check_interval``
old) found it up, in recovery, streaming, of the same cluster as the
primary, and no more than ``max_lag`` seconds behind; a context with a
``min_position`` also needs it to have replayed past that position, asked
on the spot. A replica that fails a connection is down until
``retry_after`` has passed.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.exc import DBAPIError

from polydatum._positions import META_KEY, from_meta, lsn
from polydatum.errors import ReplicaMismatch

logger = logging.getLogger("polydatum.sqlalchemy")

# Lag 0 when all WAL received is replayed: "<=", as a restarted replica receives
# from a segment boundary behind what it had replayed already.
_HEALTH = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, "
    "CASE WHEN pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END, "
    # status is NULL for a role without pg_read_all_stats: then "streaming" cannot be told apart.
    "EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status IS NULL OR status = 'streaming'), "
    "(SELECT system_identifier FROM pg_control_system())"
)
_SYSTEM_ID = "SELECT system_identifier FROM pg_control_system()"
_REPLAYED = "SELECT pg_last_wal_replay_lsn()::text"
_CURRENT = "SELECT pg_current_wal_lsn()::text"


@dataclass
class NodeStatus:
    """What :meth:`Database.health` reports for one node.

    Attributes:
        name: ``"primary"`` or ``"replica N"``.
        url: the node's URL, password hidden.
        role: ``"primary"`` or ``"replica"``.
        ok: the node serves its role now.
        detail: ``"ok"`` or why not (down, lagging, not streaming...).
        lag: seconds behind the primary (replicas), when known.
        position: the WAL position the replica replayed, when known.

    .. versionadded:: 2.0
    """

    name: str
    url: str
    role: str
    ok: bool
    detail: str
    lag: float | None = None
    position: str | None = None


class Node:
    """One replica and its cached health."""

    __slots__ = (
        "checked_at",
        "detail",
        "engine",
        "fit",
        "lag",
        "lock",
        "name",
        "next_check",
        "position",
        "refused",
        "url",
    )

    def __init__(self, name: str, url: str, engine: Engine) -> None:
        self.name = name
        self.url = url
        self.engine = engine
        self.lock = threading.Lock()
        self.fit = False
        self.detail = "not checked yet"
        self.lag: float | None = None
        self.position: str | None = None
        self.checked_at = 0.0
        self.next_check = 0.0  # monotonic time of the next health check
        self.refused: str | None = None  # a different cluster: never used

    def status(self) -> NodeStatus:
        return NodeStatus(self.name, self.url, "replica", self.fit, self.detail, self.lag, self.position)


class Router:
    """The replicas of one Database, their health, and the round robin between them."""

    def __init__(
        self,
        primary: Engine,
        nodes: list[Node],
        *,
        max_lag: float,
        check_interval: float,
        retry_after: float,
    ) -> None:
        self.primary = primary
        self.nodes = nodes
        self.max_lag = max_lag
        self.check_interval = check_interval
        self.retry_after = retry_after
        self.system_id: int | None = None
        self._turn = itertools.count()
        for node in nodes:
            _watch_disconnects(node, self)

    # -- start ---------------------------------------------------------------

    def verify(self) -> None:
        """Refuse replicas of another cluster, now; nodes that are down are checked when they come up.

        Raises:
            ReplicaMismatch: a replica's system identifier differs from the primary's.
        """
        self.system_id = self._primary_id()
        if self.system_id is None:
            return
        for node in self.nodes:
            try:
                with node.engine.connect() as conn:
                    found = int(conn.exec_driver_sql(_SYSTEM_ID).scalar_one())
            except DBAPIError:
                continue  # down now: its health check compares the identifier later
            if found != self.system_id:
                raise ReplicaMismatch(self._mismatch(node, found))

    def _primary_id(self) -> int | None:
        try:
            with self.primary.connect() as conn:
                return int(conn.exec_driver_sql(_SYSTEM_ID).scalar_one())
        except DBAPIError:
            return None

    def _mismatch(self, node: Node, found: int) -> str:
        return (
            f"{node.name} ({node.url}) is not a replica of the primary: its system identifier is "
            f"{found}, the primary's is {self.system_id}, so it holds another database cluster; "
            "give replicas= the URLs of standbys made from this primary (pg_basebackup -R)"
        )

    # -- choosing ------------------------------------------------------------

    def candidates(self) -> Iterator[Node]:
        """The fit replicas, starting at the next one in turn."""
        nodes = self.nodes
        count = len(nodes)
        start = next(self._turn)
        now = time.monotonic()
        for i in range(count):
            node = nodes[(start + i) % count]
            if now >= node.next_check:
                self.check(node)
            if node.fit:
                yield node

    def check(self, node: Node, *, wait: bool = False) -> None:
        """Refresh ``node``'s health; without ``wait``, skip it if another thread is checking."""
        if not node.lock.acquire(blocking=wait):
            return
        try:
            now = time.monotonic()
            if not wait and now < node.next_check:
                return  # another thread checked it meanwhile
            self._check(node)
        finally:
            node.lock.release()

    def _check(self, node: Node) -> None:
        if node.refused is not None:
            node.fit, node.detail, node.next_check = False, node.refused, float("inf")
            return
        try:
            with node.engine.connect() as conn:
                row = conn.exec_driver_sql(_HEALTH).one()
        except DBAPIError as exc:
            self.mark_down(node, exc)
            return
        recovering, position, lag, streaming, system_id = row
        node.checked_at = time.monotonic()
        node.next_check = node.checked_at + self.check_interval
        node.position = position
        node.lag = float(lag) if recovering else None
        if self.system_id is None:
            self.system_id = self._primary_id()
        if self.system_id is not None and int(system_id) != self.system_id:
            node.refused = self._mismatch(node, int(system_id))
            logger.error("%s", node.refused)
            node.fit, node.detail, node.next_check = False, node.refused, float("inf")
        elif not recovering:
            node.fit, node.detail = False, "not in recovery (promoted?): not used as a replica"
        elif not streaming:
            node.fit, node.detail = False, "not streaming from a primary"
        elif node.lag is not None and node.lag > self.max_lag:
            node.fit, node.detail = False, f"lagging {node.lag:.3f}s > max_lag {self.max_lag}s"
        else:
            node.fit, node.detail = True, "ok"

    def mark_down(self, node: Node, exc: BaseException | None) -> None:
        """Skip ``node`` until ``retry_after`` has passed."""
        if node.fit:
            logger.warning("%s is down, reads skip it for %ss: %s", node.name, self.retry_after, exc)
        node.fit = False
        node.detail = f"down: {type(exc).__name__}" if exc is not None else "down"
        node.next_check = time.monotonic() + self.retry_after

    def caught_up(self, node: Node, minimum: int) -> bool:
        """True when ``node`` has replayed past ``minimum`` (asked now, on a pooled connection)."""
        with node.engine.connect() as conn:
            position = conn.exec_driver_sql(_REPLAYED).scalar()
        return position is not None and lsn(position) >= minimum

    def report(self) -> list[NodeStatus]:
        """Check every replica now and report it."""
        for node in self.nodes:
            self.check(node, wait=True)
        return [node.status() for node in self.nodes]


def current_position(conn: Connection) -> str:
    """The primary's WAL position now: at or after every commit it acknowledged."""
    return str(conn.exec_driver_sql(_CURRENT).scalar_one())


def _watch_disconnects(node: Node, router: Router) -> None:
    # A replica that drops a connection (killed, restarted) is skipped at once,
    # not only after its next health check.
    @event.listens_for(node.engine, "handle_error")
    def _handle_error(context: ExceptionContext) -> None:
        if context.is_disconnect:
            router.mark_down(node, context.original_exception)


@dataclass
class Route:
    """Where one session's statements go; see the module docstring for its states."""

    router: Router
    primary_bind: Any
    read_only_bind: Any
    read_only: bool = False
    primary: bool = False
    wrote: bool = False
    replica: Any = None
    minimum: int = 0

    def read_bind(self, session: Any) -> Any:
        """The bind of this session's reads: a fit replica, else the primary (chosen once)."""
        bind = self.replica
        if bind is not None:
            return bind
        router = self.router
        for node in router.candidates():
            try:
                if self.minimum and not router.caught_up(node, self.minimum):
                    continue
                # Connect now, so a replica that went down is skipped here
                # rather than failing the statement.
                session.connection(bind_arguments={"bind": node.engine})
            except DBAPIError as exc:
                router.mark_down(node, exc)
                continue
            self.replica = node.engine
            return node.engine
        self.replica = self.read_only_bind if self.read_only else self.primary_bind
        return self.replica


def route_options(max_lag: object, check_interval: object, retry_after: object) -> tuple[float, float, float]:
    """The health settings, checked.

    Raises:
        TypeError: a setting is not a number.
        ValueError: a setting is zero or negative.
    """
    values = []
    for name, value in (
        ("max_lag", max_lag),
        ("check_interval", check_interval),
        ("retry_after", retry_after),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            msg = f"{name} must be a number of seconds, got {value!r}"
            raise TypeError(msg)
        if not value > 0:
            msg = f"{name} must be more than 0 seconds, got {value!r}; " + (
                "a replica is always some time behind, so a lag of 0 or less would skip every replica"
                if name == "max_lag"
                else "pick how often to check, e.g. 0.5"
            )
            raise ValueError(msg)
        values.append(float(value))
    return values[0], values[1], values[2]


def positions_needed(meta: Mapping[str, Any], name: str) -> int:
    """The minimum LSN meta ``min_position`` asks of database ``name`` (0: none)."""
    if META_KEY not in meta:
        return 0  # the common case: no position asked
    position = from_meta(meta).get(name)
    return 0 if position is None else lsn(position)


def _is_read(clause: Any) -> bool:
    # A SELECT without FOR UPDATE reads; anything else (DML, text(), DDL) may write.
    return clause is not None and clause.is_select and getattr(clause, "_for_update_arg", None) is None


class Routed:
    """Session mixin sending reads to a replica until the session writes (see :class:`Route`)."""

    route: Route | None = None

    def get_bind(self, mapper: Any = None, *, clause: Any = None, bind: Any = None, **kw: Any) -> Any:
        route = self.route
        if route is None or bind is not None:
            return super().get_bind(mapper, clause=clause, bind=bind, **kw)  # type: ignore[misc]
        if route.primary:
            return route.primary_bind
        if self._flushing or (clause is not None and not _is_read(clause)):  # type: ignore[attr-defined]
            if route.read_only:
                return route.read_bind(self)  # the replica (or read-only primary) refuses it
            route.primary = route.wrote = True
            return route.primary_bind
        if clause is None:
            return route.primary_bind  # a dialect lookup: no statement runs
        return route.read_bind(self)


_routed_classes: dict[type, type] = {}


def routed_class(cls: type) -> type:
    """``cls`` (a Session class) with :class:`Routed` mixed in; made once per class."""
    if issubclass(cls, Routed):
        return cls
    made = _routed_classes.get(cls)
    if made is None:
        made = _routed_classes[cls] = type(f"Routed{cls.__name__}", (Routed, cls), {})
    return made

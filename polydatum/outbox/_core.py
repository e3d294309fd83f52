"""The Outbox: effects written in the context's transaction, delivered after its commit."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    Engine,
    MetaData,
    Table,
    case,
    delete,
    event,
    false,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.pool import StaticPool

from polydatum._factories import Dual
from polydatum._renamed import renamed_keyword
from polydatum.errors import EffectDeferred
from polydatum.outbox._table import MAX_NAME, encode, make_inbox_table, make_table
from polydatum.sqlalchemy._database import AsyncDatabase, Database

if TYPE_CHECKING:
    from typing_extensions import Self

    from polydatum import DataManager
    from polydatum.context import DataAccessContext
    from polydatum.outbox._relay import Relay

logger = logging.getLogger("polydatum.outbox")

H = TypeVar("H", bound=Callable[..., Any])

#: The longest error text kept on a row.
MAX_ERROR = 2000


@dataclass(frozen=True)
class Effect:
    """One effect, as a handler receives it.

    Attributes:
        id: the row's id, unique in the table for good: an idempotency key
            for a target outside the database (``f"outbox-{effect.id}"``).
        topic: what :meth:`OutboxSender.add` was given.
        key: its ordering key, or None.
        payload: the payload as JSON gave it back (tuples are lists).
        attempts: how many deliveries failed before this one.
        created_at: when it was added, in epoch seconds.

    .. versionadded:: 2.0
    """

    id: int
    topic: str
    key: str | None
    payload: Any
    attempts: int
    created_at: float


@dataclass(frozen=True)
class DeadEffect:
    """A dead-lettered row, as :meth:`Outbox.dead` lists it.

    .. versionadded:: 2.0
    """

    id: int
    topic: str
    key: str | None
    payload: str
    attempts: int
    last_error: str | None
    created_at: float


@dataclass(frozen=True)
class Status:
    """What the outbox table holds now.

    Attributes:
        pending: rows not delivered yet (including leased and backing-off ones).
        oldest_pending_age: seconds since the oldest pending row was added
            (0.0 when none is pending).
        dead: dead-lettered rows.

    .. versionadded:: 2.0
    """

    pending: int
    oldest_pending_age: float
    dead: int


@dataclass
class Row:
    id: int
    topic: str
    key: str | None
    payload: str
    attempts: int
    created_at: float


class Outbox:
    """Effects (task sends, cache invalidations, webhooks...) that commit with the context's data.

    ``ctx.outbox.add(topic, payload)`` INSERTs a row through the context's
    own session of ``database``, so the row exists if and only if the context
    committed. Right after the commit the same process delivers the context's
    rows to their handlers and DELETEs them; what it could not deliver (the
    target was down, the process died) waits for a :meth:`relay`.

    Args:
        database: the :class:`~polydatum.sqlalchemy.Database` or
            :class:`~polydatum.sqlalchemy.AsyncDatabase` the rows go to;
            it must be installed on the DataManager under ``session``.
        table: the table's name.
        session: the name of ``database``'s session resource.
        max_attempts: failed deliveries after which a row is dead-lettered.
        backoff: seconds before the first retry; doubled each time, with
            jitter (a random 50-100 %), at most ``max_backoff``.
        max_backoff: the longest wait between two attempts.
        lease: seconds a process or relay owns rows it is delivering; a row
            whose owner died is delivered by another relay once it lapsed.
        deliver_on_commit: deliver right after the commit, in the
            committing process (default). With False, only relays deliver
            (on PostgreSQL the INSERT is followed by a NOTIFY that wakes them).
        inbox_table: the name of the inbox table (see :mod:`polydatum.celery`).
        metadata: the :class:`~sqlalchemy.MetaData` to define the tables in
            (your Alembic ``target_metadata``); default a new one,
            :attr:`metadata`.

    Raises:
        TypeError: ``database`` is not a Database or AsyncDatabase.
        ValueError: an option is out of range.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        database: Database | AsyncDatabase,
        table: str = "polydatum_outbox",
        *,
        session: str = "db",
        max_attempts: int = 10,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
        lease: float = 30.0,
        deliver_on_commit: bool = True,
        inbox_table: str = "polydatum_inbox",
        metadata: MetaData | None = None,
    ) -> None:
        if not isinstance(database, (Database, AsyncDatabase)):
            msg = f"Outbox() needs a polydatum Database or AsyncDatabase, got {type(database).__name__}"
            raise TypeError(msg)
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            msg = f"max_attempts must be an int of at least 1, got {max_attempts!r}"
            raise ValueError(msg)
        for option, value in (("backoff", backoff), ("max_backoff", max_backoff), ("lease", lease)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                msg = f"{option} must be a number of seconds > 0, got {value!r}"
                raise ValueError(msg)
        self.database = database
        self.session_name = session
        self.max_attempts = max_attempts
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.lease = float(lease)
        self.deliver_on_commit = deliver_on_commit
        #: The tables' MetaData; give it to Alembic, or call :meth:`create_table`.
        self.metadata = metadata if metadata is not None else MetaData()
        self.table: Table = make_table(self.metadata, table)
        self.inbox: Table = make_inbox_table(self.metadata, inbox_table)
        #: The PostgreSQL channel relays LISTEN on.
        self.channel = table[:63]
        self._handlers: dict[str, Callable[[Effect], object]] = {}
        self._installed_as: str | None = None
        self._deleter = _Deleter(self)
        self._owner_pid = -1
        self._owner = ""
        self._owner_lock = threading.Lock()
        self._build_statements()

    def __repr__(self) -> str:
        return f"Outbox({self.database!r}, table={self.table.name!r})"

    # -- set-up ---------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The sync engine deliveries and relays use (an AsyncDatabase's :attr:`~AsyncDatabase.sync` side)."""
        db = self.database
        return db.sync.engine if isinstance(db, AsyncDatabase) else db.engine

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A connection in a transaction of its own, committed at the end of the block.

        While ``polydatum.testing.transactional_database`` pins the database,
        it is a savepoint of the test's transaction instead, so that what the
        outbox writes is rolled back with the rest of the test.
        """
        with transaction(self.database) as conn:
            yield conn

    @property
    def is_postgresql(self) -> bool:
        """Whether the database is PostgreSQL (SKIP LOCKED, LISTEN/NOTIFY); else it is polled."""
        return self.database.sync_engine.dialect.name == "postgresql"

    def create_table(self) -> None:
        """Create the outbox and inbox tables (and their indexes) if they do not exist."""
        self.metadata.create_all(self.engine, tables=[self.table, self.inbox])

    def handler(self, topic: str) -> Callable[[H], H]:
        """Decorator: ``fn(effect)`` delivers the effects of ``topic``.

        A handler that returns delivered the effect; one that raises failed
        it, and the row is retried later (see ``backoff``). Handlers run after
        the commit in the committing process and in relays, so register them
        in both (at import time of the module that defines the outbox).

        Raises:
            AlreadyExistsException: ``topic`` already has a handler.
        """
        check_name(topic, "topic")

        def register(fn: H) -> H:
            self.add_handler(topic, fn)
            return fn

        return register

    def add_handler(self, topic: str, fn: Callable[[Effect], object]) -> None:
        """Register ``fn`` for ``topic`` (what :meth:`handler` does).

        Raises:
            AlreadyExistsException: ``topic`` already has a handler.
            TypeError: ``fn`` is not callable.
        """
        from polydatum.errors import AlreadyExistsException

        check_name(topic, "topic")
        if not callable(fn):
            msg = f"the handler of topic {topic!r} must be callable, got {fn!r}"
            raise TypeError(msg)
        if topic in self._handlers:
            msg = f"topic {topic!r} already has a handler ({self._handlers[topic]!r}); register one per topic"
            raise AlreadyExistsException(msg)
        self._handlers[topic] = fn

    @renamed_keyword("data_manager", "dm")
    def install(self, dm: DataManager, *, name: str = "outbox") -> Self:
        """Register the resource ``name``: ``ctx.<name>.add(topic, payload)`` in ``with`` contexts.

        In ``async with`` contexts, ``await (await ctx.aget(name)).add(...)``.

        Returns:
            this Outbox.
        """
        self._check_session(dm)
        dm.register_resources(**{name: self._resource})
        # Registered after the database's transaction middleware, so torn down
        # before it: what sync code added in an ``async with`` context is
        # written through the AsyncSession before the COMMIT.
        # A sync Database's rows are written by add() itself: no middleware, one
        # async generator less to drive on every ``async with`` context.
        if isinstance(self.database, AsyncDatabase):
            dm.register_context_middleware(Dual(_sync_noop, self._async_middleware))
        self._installed_as = name
        return self

    def _check_session(self, data_manager: DataManager) -> None:
        """Refuse a DataManager whose ``session`` resource is another database's: rows would go there."""
        resources = data_manager.resource_manager
        if self.session_name not in resources:
            msg = (
                f"the outbox writes through the session resource {self.session_name!r}, which this "
                f"DataManager does not have; install the database first "
                f"(database.install(dm, name={self.session_name!r})), or pass session= to Outbox()"
            )
            raise ValueError(msg)
        other = getattr(resources[self.session_name], "database", None)
        if other is not None and other is not self.database:
            msg = (
                f"the session resource {self.session_name!r} belongs to {other!r}, not to "
                f"{self.database!r}: the outbox rows must be written in the same transaction as the "
                f"context's data; build the Outbox on that database, or pass session= naming this one's"
            )
            raise ValueError(msg)

    def sender(self, ctx: DataAccessContext) -> OutboxSender | AsyncOutboxSender:
        """The outbox of ``ctx``, as ``ctx.<name>`` gives it; for integrations.

        An :class:`OutboxSender` in a ``with`` context, an
        :class:`AsyncOutboxSender` in an ``async with`` one on an
        :class:`~polydatum.sqlalchemy.AsyncDatabase` (on a sync
        :class:`~polydatum.sqlalchemy.Database`, an :class:`OutboxSender`
        there too: its session is sync).

        Raises:
            RuntimeError: the outbox was not installed with :meth:`install`.
        """
        name = self._installed_as
        if name is None:
            msg = f"{self!r} is not installed; call outbox.install(dm) before using it in contexts"
            raise RuntimeError(msg)
        return getattr(ctx, name)  # type: ignore[no-any-return]

    def add(self, ctx: DataAccessContext, topic: str, payload: Any, key: str | None = None) -> None:
        """Add an effect to ``ctx``'s transaction from sync code, in any context (for integrations).

        In a ``with`` context the row is INSERTed now (:meth:`OutboxSender.add`).
        In an ``async with`` context it is checked and serialized now and
        INSERTed through the context's AsyncSession just before its COMMIT
        (:meth:`AsyncOutboxSender.add_nowait`).
        """
        sender = self.sender(ctx)
        if isinstance(sender, AsyncOutboxSender):
            sender.add_nowait(topic, payload, key)
        else:
            sender.add(topic, payload, key)

    def cancel(self, ctx: DataAccessContext, row_id: int) -> None:
        """Delete the row ``row_id`` in ``ctx``'s transaction, from sync code, in any context.

        See :meth:`add_detached`; in an ``async with`` context the DELETE runs
        just before the COMMIT.
        """
        sender = self.sender(ctx)
        if isinstance(sender, AsyncOutboxSender):
            sender.cancel_nowait(row_id)
        else:
            sender.cancel(row_id)

    def can_write_detached(self, ctx: DataAccessContext) -> bool:
        """Whether :meth:`add_detached` can commit now without waiting for ``ctx``.

        Not on SQLite once the context's session began its transaction: it
        holds the database's only write lock until the context ends.
        """
        if self.is_postgresql:
            return True
        if self.session_name not in ctx:
            return True
        return not getattr(ctx, self.session_name).in_transaction()

    def add_handler_once(self, topic: str, fn: Callable[[Effect], object]) -> None:
        """Register ``fn`` for ``topic`` unless the topic has a handler already (for integrations)."""
        if topic not in self._handlers:
            self.add_handler(topic, fn)

    def _resource(self, ctx: DataAccessContext) -> Iterator[OutboxSender | AsyncOutboxSender]:
        # A plain resource in both kinds of context (making a sender does no
        # I/O), so that sync code reaches the sender of an ``async with`` one.
        # A sync Database gives a sync Session in either kind (sync services an
        # ASGI app runs in its thread pool): its rows go in with the sync sender.
        if ctx._async and isinstance(self.database, AsyncDatabase):
            yield AsyncOutboxSender(self, ctx)
        else:
            yield OutboxSender(self, ctx)

    async def _async_middleware(self, ctx: DataAccessContext) -> AsyncIterator[None]:
        yield
        name = self._installed_as
        if name is not None and name in ctx:
            sender = getattr(ctx, name)
            if isinstance(sender, AsyncOutboxSender):
                await sender._write_pending()

    def relay(self, *, batch: int = 100, poll: float = 1.0, name: str | None = None) -> Relay:
        """A :class:`~polydatum.outbox.Relay` delivering what waits in this outbox."""
        from polydatum.outbox._relay import Relay

        return Relay(self, batch=batch, poll=poll, name=name)

    # -- the table -------------------------------------------------------------

    def _build_statements(self) -> None:
        t = self.table
        self._insert = t.insert()
        self._insert_many = t.insert().returning(t.c.id, sort_by_parameter_order=True)
        self._delete = delete(t).where(t.c.id.in_(_bind_ids()), t.c.lease_owner == _bind_owner())
        self._release = (
            update(t)
            .where(t.c.id.in_(_bind_ids()), t.c.lease_owner == _bind_owner())
            .values(lease_owner=None, lease_until=None)
        )
        if self.is_postgresql:
            # The ids as one array parameter: an IN list is a statement of its own per
            # length, rendered by SQLAlchemy and parsed by psycopg again each time (15 %
            # of a relay's time on a backlog; benchmarks/outbox.py --only=backlog).
            from sqlalchemy import ARRAY, BigInteger, any_, bindparam

            ids: Any = any_(bindparam("ids", type_=ARRAY(BigInteger)))
            self._delete = delete(t).where(t.c.id == ids, t.c.lease_owner == _bind_owner())

    def owner(self) -> str:
        """This process's lease owner name (host, pid and a random part)."""
        pid = os.getpid()
        if self._owner_pid != pid:  # a forked child is another owner
            with self._owner_lock:
                if self._owner_pid != pid:
                    self._owner = f"{socket.gethostname()[:40]}:{pid}:{uuid.uuid4().hex[:8]}"
                    self._owner_pid = pid
        return self._owner

    def status(self) -> Status:
        """Pending and dead counts, and the age of the oldest pending row.

        Raises:
            sqlalchemy.exc.DBAPIError: the table or the database cannot be read.
        """
        self.flush()
        t = self.table
        query = select(
            func.count().filter(t.c.dead == false()),
            func.min(t.c.created_at).filter(t.c.dead == false()),
            func.count().filter(t.c.dead != false()),
        )
        if not self.is_postgresql:  # SQLite has FILTER too, but older versions do not
            query = select(
                func.sum(case((t.c.dead == false(), 1), else_=0)),
                func.min(case((t.c.dead == false(), t.c.created_at), else_=None)),
                func.sum(case((t.c.dead == false(), 0), else_=1)),
            )
        with self.begin() as conn:
            pending, oldest, dead = conn.execute(query).one()
        age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        return Status(int(pending or 0), age, int(dead or 0))

    def dead(self, limit: int = 100) -> list[DeadEffect]:
        """The dead-lettered rows, oldest first, at most ``limit``."""
        self.flush()
        t = self.table
        query = (
            select(t.c.id, t.c.topic, t.c.key, t.c.payload, t.c.attempts, t.c.last_error, t.c.created_at)
            .where(t.c.dead != false())
            .order_by(t.c.id)
            .limit(limit)
        )
        with self.begin() as conn:
            return [DeadEffect(*row) for row in conn.execute(query)]

    def add_detached(self, topic: str, payload: Any, *, delay: float, key: str | None = None) -> int:
        """Write an effect in a transaction of its own, committed now, due in ``delay`` seconds.

        For compensations that must survive the context failing or the
        process dying (the blob store's cleanup of a failed context's puts):
        the context then cancels the row in its own transaction
        (:meth:`OutboxSender.cancel`), so it stays only if the context did not
        commit.

        Returns:
            the row's id.
        """
        check_name(topic, "topic")
        if key is not None:
            check_name(key, "key")
        body = encode(payload)
        now = time.time()
        values = {
            "topic": topic,
            "key": key,
            "payload": body,
            "created_at": now,
            "available_at": now + delay,
            "attempts": 0,
            "dead": False,
        }
        with self.begin() as conn:
            key_row = conn.execute(self._insert, values).inserted_primary_key
            assert key_row is not None
            return int(key_row[0])

    def remove(self, ids: Iterable[int]) -> int:
        """Delete the rows ``ids`` in a transaction of their own; how many went."""
        wanted = [int(i) for i in ids]
        if not wanted:
            return 0
        t = self.table
        with self.begin() as conn:
            return int(conn.execute(delete(t).where(t.c.id.in_(wanted))).rowcount)

    def requeue_dead(self, ids: Iterable[int] | None = None) -> int:
        """Put dead-lettered rows (all, or those of ``ids``) back in the queue, with 0 attempts.

        Their last error is kept until they are delivered or fail again.

        Returns:
            how many rows were put back.
        """
        t = self.table
        stmt = (
            update(t)
            .where(t.c.dead != false())
            .values(dead=False, attempts=0, available_at=time.time(), lease_owner=None, lease_until=None)
        )
        if ids is not None:
            wanted = [int(i) for i in ids]
            if not wanted:
                return 0
            stmt = stmt.where(t.c.id.in_(wanted))
        with self.begin() as conn:
            return int(conn.execute(stmt).rowcount)

    # -- delivery ---------------------------------------------------------------

    def _retry_delay(self, attempts: int) -> float:
        wait = min(self.max_backoff, self.backoff * 2.0 ** min(attempts - 1, 60))
        return wait * random.uniform(0.5, 1.0)

    def _deliver(self, rows: Sequence[Row], blocked: set[str]) -> _Outcome:
        """Call the handlers of ``rows`` in order; a row whose key failed or is ``blocked`` waits."""
        out = _Outcome()
        for row in rows:
            if row.key is not None and row.key in blocked:
                out.skipped.append(row.id)
                continue
            fn = self._handlers.get(row.topic)
            if fn is None:
                known = ", ".join(sorted(self._handlers)) or "none"
                error = (
                    f"no handler for topic {row.topic!r} (registered: {known}); register one with "
                    f"@outbox.handler({row.topic!r}), then requeue the row"
                )
                out.failed.append((row, error, True))
            else:
                try:
                    fn(
                        Effect(
                            row.id, row.topic, row.key, json.loads(row.payload), row.attempts, row.created_at
                        )
                    )
                except EffectDeferred as exc:
                    out.deferred.append((row, str(exc)[:MAX_ERROR], exc.retry_after))
                except Exception as exc:
                    logger.warning(
                        "outbox effect %s (topic %r) failed: %r",
                        row.id,
                        row.topic,
                        exc,
                        extra={"polydatum_outbox_topic": row.topic},
                    )
                    out.failed.append((row, f"{type(exc).__name__}: {exc}"[:MAX_ERROR], False))
                else:
                    out.delivered.append(row.id)
                    continue
            if row.key is not None:  # later rows of this key wait for this one
                blocked.add(row.key)
        return out

    def _finish(self, conn: Connection, out: _Outcome, owner: str) -> int:
        """Record ``out`` in one transaction: delete what was delivered, back off or bury the rest.

        Returns:
            how many rows were dead-lettered.
        """
        t = self.table
        if out.delivered:
            conn.execute(self._delete, {"ids": out.delivered, "owner": owner})
        if out.skipped:
            conn.execute(self._release, {"ids": out.skipped, "owner": owner})
        dead = 0
        now = time.time()
        for row, error, retry_after in out.deferred:  # not tried: no attempt counted
            conn.execute(
                update(t)
                .where(t.c.id == row.id, t.c.lease_owner == owner)
                .values(last_error=error, available_at=now + retry_after, lease_owner=None, lease_until=None)
            )
        for row, error, fatal in out.failed:
            attempts = row.attempts + 1
            bury = fatal or attempts >= self.max_attempts
            dead += bury
            conn.execute(
                update(t)
                .where(t.c.id == row.id, t.c.lease_owner == owner)
                .values(
                    attempts=attempts,
                    last_error=error,
                    dead=bury,
                    available_at=now + (0.0 if bury else self._retry_delay(attempts)),
                    lease_owner=None,
                    lease_until=None,
                )
            )
        return dead

    def _blocked_keys(self, conn: Connection, rows: Sequence[Row]) -> set[str]:
        """Keys of ``rows`` with an earlier row still pending: those rows must wait for it."""
        first: dict[str, int] = {}
        for row in rows:
            if row.key is not None and row.key not in first:
                first[row.key] = row.id
        if not first:
            return set()
        t = self.table
        query = (
            select(t.c.key, func.min(t.c.id))
            .where(t.c.key.in_(list(first)), t.c.dead == false())
            .group_by(t.c.key)
        )
        return {key for key, earliest in conn.execute(query) if earliest < first[key]}

    def _deliver_committed(self, rows: list[Row]) -> None:
        """After a commit: deliver the rows this process wrote (and still leases), then delete them."""
        owner = self.owner()
        try:
            blocked: set[str] = set()
            if any(row.key is not None for row in rows):
                # Rows delivered but not deleted yet would hold their keys back.
                self.flush()
                with self.begin() as conn:
                    blocked = self._blocked_keys(conn, rows)
            out = self._deliver(rows, blocked)
            unfinished = out.skipped or out.failed or out.deferred
            if unfinished or _pinned(self.database) or self._shared_connection():
                with transaction(self.database, lazy_commit=True) as conn:
                    self._finish(conn, out, owner)
            elif out.delivered:
                # The happy path: the DELETE leaves the request, batched with
                # other contexts' by a thread (the rows stay leased meanwhile).
                self._deleter.push(out.delivered, owner)
        except Exception:
            # The rows stay leased; a relay delivers them once the lease lapsed.
            logger.warning("outbox delivery after commit failed; a relay will deliver", exc_info=True)

    def _shared_connection(self) -> bool:
        # An in-memory SQLite database is one connection for every thread:
        # a background DELETE would run on it in the middle of a request's transaction.
        return isinstance(self.engine.pool, StaticPool)

    def flush(self) -> None:
        """Delete the rows delivered after commits that the background thread has not deleted yet.

        :meth:`status`, :meth:`dead`, :meth:`requeue_dead` and relays call it
        first; call it yourself before reading the table directly.
        """
        self._deleter.flush()


class _Deleter:
    """Deletes delivered rows in batches, off the request path.

    Its thread starts on use and ends after a second with nothing to delete,
    so an idle process (or one whose Outbox is gone) keeps no thread for it.

    On PostgreSQL the thread keeps one connection in autocommit while it runs:
    a batch is then one round trip (the DELETE), instead of four for a pool
    checkout with its ping, ``SET LOCAL``, the DELETE and the COMMIT. That
    matters on a busy machine, where every round trip waits for the server's
    turn on a core the requests need too. Elsewhere (SQLite, a pinned test
    database) a batch is a transaction of its own.
    """

    IDLE = 1.0  # seconds without work before the thread ends

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = weakref.ref(outbox)
        self._ids: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._wake = threading.Event()
        self._running_in = -1  # the pid whose thread runs; -1: none
        self._exit_hook = -1
        self._conn: Connection | None = None  # the thread's autocommit connection (PostgreSQL)
        self._conn_pid = -1

    def push(self, ids: list[int], owner: str) -> None:
        with self._lock:
            self._ids.extend((i, owner) for i in ids)
            pid = os.getpid()
            if self._running_in != pid:  # none running, or this is a forked child
                self._running_in = pid
                threading.Thread(target=self._run, name="polydatum-outbox-deleter", daemon=True).start()
            if self._exit_hook != pid:
                self._exit_hook = pid
                atexit.register(self.flush)
        self._wake.set()

    def _run(self) -> None:
        while True:
            if not self._wake.wait(self.IDLE):
                with self._lock:
                    done = not self._ids or self._outbox() is None
                    if done:
                        self._running_in = -1
                if done:
                    with self._flushing:  # taken after _lock is let go, in flush()'s order
                        self._release()
                    return
                continue
            time.sleep(0.005)  # let the contexts committing now join this batch
            self._wake.clear()
            self.flush(keep=True)

    def flush(self, *, keep: bool = False) -> None:
        """Delete what was pushed; ``keep``: the thread keeps its connection for the next batch."""
        outbox = self._outbox()
        with self._flushing:
            with self._lock:
                taken, self._ids = self._ids, []
            if not taken or outbox is None:
                if not keep:
                    self._release()
                return
            by_owner: dict[str, list[int]] = {}
            for row_id, owner in taken:
                by_owner.setdefault(owner, []).append(row_id)
            try:
                if outbox.is_postgresql and not _pinned(outbox.database):
                    conn = self._connection(outbox)
                    for owner, ids in by_owner.items():
                        conn.execute(outbox._delete, {"ids": ids, "owner": owner})
                else:
                    with transaction(outbox.database, lazy_commit=True) as tx:
                        for owner, ids in by_owner.items():
                            tx.execute(outbox._delete, {"ids": ids, "owner": owner})
            except Exception:
                self._release()
                # Kept for the next flush; if this process dies first, the
                # leases lapse and a relay delivers those rows once more.
                with self._lock:
                    self._ids[:0] = taken
                logger.warning(
                    "outbox could not delete %d delivered rows; retrying", len(taken), exc_info=True
                )
            else:
                if not keep:
                    self._release()

    def _connection(self, outbox: Outbox) -> Connection:
        conn = self._conn
        if conn is not None and self._conn_pid == os.getpid():
            return conn
        # Autocommit: each DELETE is its own transaction; no WAL flush is
        # waited for (a server crash may undo it: one more delivery, never a lost one).
        conn = outbox.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("SET synchronous_commit = off")
        self._conn, self._conn_pid = conn, os.getpid()
        return conn

    def _release(self) -> None:
        """Close the thread's connection (not back to the pool: see below)."""
        conn, self._conn = self._conn, None
        if conn is None or self._conn_pid != os.getpid():
            return  # none, or a forked child's copy of the parent's: never touch it
        try:
            # Closed outright: the pool it came from may have been disposed of
            # (Database.dispose()) while the thread held it, and a connection
            # checked in there would be left open until garbage collection.
            # It also takes its synchronous_commit setting along.
            conn.invalidate()
            conn.close()
        except Exception:
            logger.debug("outbox: closing the deleter's connection failed", exc_info=True)


def _pinned(database: Database | AsyncDatabase) -> bool:
    side = database._sync if isinstance(database, AsyncDatabase) else database
    return side is not None and "_unpinned" in side.__dict__


@contextmanager
def transaction(database: Database | AsyncDatabase, *, lazy_commit: bool = False) -> Iterator[Connection]:
    """A connection of ``database``'s sync side in a transaction (a savepoint of a pinned test's).

    ``lazy_commit``: on PostgreSQL, do not wait for the WAL flush at COMMIT
    (``synchronous_commit = off``). For the outbox's own bookkeeping only
    (leases, deleting delivered rows): a server crash may undo it, which
    means one more delivery of those rows, never a lost one.
    """
    side = database.sync if isinstance(database, AsyncDatabase) else database
    if "_unpinned" in side.__dict__:  # pinned by polydatum.testing.transactional_database
        with side.session() as session, session.begin():
            yield session.connection()
        return
    with side.engine.begin() as conn:
        if lazy_commit and conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        yield conn


@dataclass
class _Outcome:
    delivered: list[int]
    skipped: list[int]
    failed: list[tuple[Row, str, bool]]
    # Rows whose handler raised EffectDeferred: (row, why, seconds to wait).
    deferred: list[tuple[Row, str, float]]

    def __init__(self) -> None:
        self.delivered = []
        self.skipped = []
        self.failed = []
        self.deferred = []


def _bind_ids() -> Any:
    from sqlalchemy import bindparam

    return bindparam("ids", expanding=True)


def _bind_owner() -> Any:
    from sqlalchemy import bindparam

    return bindparam("owner")


def check_name(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value:
        msg = f"an outbox {what} must be a non-empty str, got {value!r}"
        raise TypeError(msg)
    if len(value) > MAX_NAME:
        msg = f"an outbox {what} has at most {MAX_NAME} characters, got {len(value)}"
        raise ValueError(msg)


class _SenderBase:
    __slots__ = ("_cancels", "_ctx", "_outbox", "_rows")

    def __init__(self, outbox: Outbox, ctx: DataAccessContext) -> None:
        self._outbox = outbox
        self._ctx = ctx
        self._rows: list[Row] | None = None
        self._cancels: list[int] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._outbox!r}>"

    def _values(self, topic: str, payload: Any, key: str | None) -> tuple[dict[str, Any], str]:
        check_name(topic, "topic")
        if key is not None:
            check_name(key, "key")
        body = encode(payload)
        now = time.time()
        ob = self._outbox
        values: dict[str, Any] = {
            "topic": topic,
            "key": key,
            "payload": body,
            "created_at": now,
            "available_at": now,
            "attempts": 0,
            "dead": False,
        }
        if ob.deliver_on_commit:
            # Leased to this process from the start: no relay takes the row
            # while the commit hook delivers it, and one does if this process dies.
            values["lease_owner"] = ob.owner()
            values["lease_until"] = now + ob.lease
        return values, body

    def _first(self) -> bool:
        """Whether this is the context's first add (register the hook, NOTIFY the relays)."""
        if self._rows is None:
            self._rows = []
            return True
        return False

    def _notify(self) -> Any:
        ob = self._outbox
        if ob.deliver_on_commit or not ob.is_postgresql:
            return None
        return text("SELECT pg_notify(:channel, '')").bindparams(channel=ob.channel)


class OutboxSender(_SenderBase):
    """``ctx.outbox`` in a ``with`` context: adds effects to the context's transaction.

    .. versionadded:: 2.0
    """

    __slots__ = ()

    def add(self, topic: str, payload: Any, key: str | None = None) -> int:
        """Write an effect in the context's transaction; it is delivered once the context committed.

        Args:
            topic: the handler's topic, e.g. ``"webhook"``.
            payload: JSON data: dicts with str keys, lists, str, int,
                finite floats, bool, None. Serialized now.
            key: effects of the same key are delivered in commit order:
                one waits while an earlier one of its key is pending.

        Returns:
            the row's id.

        Raises:
            TypeError: ``payload`` holds a value JSON cannot carry (the
                message names where), or topic/key is not a non-empty str.
            ValueError: a float that is not finite, or a topic/key longer
                than 200 characters.
        """
        ob = self._outbox
        values, body = self._values(topic, payload, key)
        ctx = self._ctx
        session = getattr(ctx, ob.session_name)
        first = self._first()
        if first:
            notify = self._notify()
            if notify is not None:
                session.execute(notify)  # delivered to listeners at COMMIT, not before
        result = session.execute(ob._insert, values)
        row_id = int(result.inserted_primary_key[0])
        rows = self._rows
        assert rows is not None
        rows.append(Row(row_id, topic, key, body, 0, values["created_at"]))
        if first and ob.deliver_on_commit:
            # In an ``async with`` context the (blocking) handlers run in a worker
            # thread, not on the event loop: the one closing it, if it closes in one.
            on_loop = ctx._async and ctx._close_threads is None
            deliver = _deliver_in_thread if on_loop else _deliver_if_committed
            ctx.on_commit(deliver, ob, session, rows)
        return row_id

    def cancel(self, row_id: int) -> None:
        """Delete the row ``row_id`` in the context's transaction (see :meth:`Outbox.add_detached`).

        On SQLite the DELETE runs when the session commits (its
        ``before_commit``): run now, it would begin the transaction and take
        the write lock, and no further :meth:`Outbox.add_detached` could
        commit until the context ends. A context that never begins a
        transaction has its rows deleted by its commit hook instead.
        """
        ob = self._outbox
        session = getattr(self._ctx, ob.session_name)
        if ob.is_postgresql:
            session.execute(delete(ob.table).where(ob.table.c.id == row_id))
            return
        if self._cancels is None:
            self._cancels = []
            event.listen(session, "before_commit", self._cancel_now)
            self._ctx.on_commit(self._cancel_leftovers)
        self._cancels.append(row_id)

    def _cancel_now(self, session: Any) -> None:
        cancels = self._cancels
        if cancels:
            t = self._outbox.table
            session.execute(delete(t).where(t.c.id.in_(list(cancels))))
            cancels.clear()

    def _cancel_leftovers(self) -> None:
        # The session never began a transaction, so before_commit never ran.
        if self._cancels:
            self._outbox.remove(self._cancels)
            self._cancels.clear()


class AsyncOutboxSender(_SenderBase):
    """The outbox of an ``async with`` context: ``ctx.outbox`` or ``await ctx.aget("outbox")``.

    ``await sender.add(...)`` INSERTs through the context's AsyncSession now.
    Sync code in the context (a Celery ``delay()``, a cache invalidation, a
    blob delete) calls :meth:`add_nowait` instead: the effect is checked and
    serialized at once, and its row INSERTed through the AsyncSession just
    before the COMMIT, in the same transaction, with the others in one
    statement. Delivery after the commit runs the (sync) handlers in a worker
    thread, through the database's sync side.

    .. versionadded:: 2.0
    """

    __slots__ = ("_hooked", "_pending", "_pending_cancels", "_sealed")

    def __init__(self, outbox: Outbox, ctx: DataAccessContext) -> None:
        super().__init__(outbox, ctx)
        self._pending: list[tuple[dict[str, Any], str]] = []
        self._pending_cancels: list[int] = []
        self._hooked = False
        self._sealed = False  # the pending rows were written: the COMMIT is under way

    async def add(self, topic: str, payload: Any, key: str | None = None) -> int:
        """As :meth:`OutboxSender.add`, through the context's AsyncSession.

        Raises:
            RuntimeError: the context is past its COMMIT (see :meth:`add_nowait`).
        """
        self._check_open("add()")
        values, body = self._values(topic, payload, key)
        await self._write_pending()  # earlier add_nowait() rows first: ids follow the order of adds
        self._sealed = False
        ids = await self._insert([(values, body)])
        return ids[0]

    def add_nowait(self, topic: str, payload: Any, key: str | None = None) -> None:
        """Add an effect from sync code; its row is INSERTed just before the context commits.

        Same checks as :meth:`add`, made now, so a bad payload fails here
        and the context rolls back. Needs the database's transaction
        middleware (``AsyncDatabase.install(dm)`` registers it), which
        commits after the outbox wrote the rows.

        Raises:
            RuntimeError: the context is past its COMMIT (called from a
                commit hook, say): the row could no longer join the transaction.
        """
        self._check_open("add_nowait()")
        self._pending.append(self._values(topic, payload, key))

    def cancel_nowait(self, row_id: int) -> None:
        """Delete the row ``row_id`` (see :meth:`Outbox.add_detached`) just before the context commits."""
        self._check_open("cancel_nowait()")
        self._pending_cancels.append(int(row_id))

    def _check_open(self, what: str) -> None:
        if self._sealed:
            msg = (
                f"{what} was called after the context's outbox rows were written, just before its "
                f"COMMIT (from another middleware's teardown or a commit hook?); add effects in "
                f"the context's body, or with 'await sender.add(...)'"
            )
            raise RuntimeError(msg)

    async def _write_pending(self) -> None:
        """INSERT the rows :meth:`add_nowait` kept (and run the DELETEs of :meth:`cancel_nowait`)."""
        self._sealed = True
        pending, cancels = self._pending, self._pending_cancels
        if cancels:
            self._pending_cancels = []
            session = await self._ctx.aget(self._outbox.session_name)
            t = self._outbox.table
            await session.execute(delete(t).where(t.c.id.in_(cancels)))
        if pending:
            self._pending = []
            await self._insert(pending)

    async def _insert(self, batch: list[tuple[dict[str, Any], str]]) -> list[int]:
        ob = self._outbox
        ctx = self._ctx
        session = await ctx.aget(ob.session_name)
        if self._first():
            notify = self._notify()
            if notify is not None:
                await session.execute(notify)
        if len(batch) == 1:
            result = await session.execute(ob._insert, batch[0][0])
            ids = [int(result.inserted_primary_key[0])]
        else:
            # One statement for them all; RETURNING gives the ids in the order of the rows.
            result = await session.execute(ob._insert_many, [values for values, _ in batch])
            ids = [int(row_id) for row_id in result.scalars()]
        rows = self._rows
        assert rows is not None
        for row_id, (values, body) in zip(ids, batch, strict=True):
            rows.append(Row(row_id, values["topic"], values["key"], body, 0, values["created_at"]))
        if not self._hooked and ob.deliver_on_commit:
            self._hooked = True
            ctx.on_commit(_deliver_in_thread, ob, session.sync_session, rows)
        return ids


def _sync_noop(ctx: DataAccessContext) -> Iterator[None]:
    # In a ``with`` context rows are INSERTed by add() itself: nothing waits for the COMMIT.
    yield


def _deliver_if_committed(outbox: Outbox, session: Any, rows: list[Row]) -> None:
    if session.in_transaction():
        # The context ended cleanly but nothing committed the rows (a Database
        # installed with transaction=False): they may still roll back, so they
        # are left to a relay, which sees them only if they were committed.
        logger.warning(
            "outbox rows %s were added in a transaction that was still open when the context "
            "ended; install the Database with its transaction middleware. A relay delivers them "
            "if they get committed",
            [r.id for r in rows],
        )
        return
    outbox._deliver_committed(rows)


async def _deliver_in_thread(outbox: Outbox, session: Any, rows: list[Row]) -> None:
    await asyncio.to_thread(_deliver_if_committed, outbox, session, rows)

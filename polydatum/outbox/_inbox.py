"""The inbox: message ids already run, recorded in the run's own transaction."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, delete
from sqlalchemy.dialects import postgresql, sqlite

from polydatum.outbox._core import Outbox, check_name, transaction
from polydatum.outbox._table import make_inbox_table
from polydatum.sqlalchemy._database import AsyncDatabase, Database

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from polydatum.context import DataAccessContext


class Inbox:
    """Runs a message's database effects once, however often the message arrives.

    :meth:`seen` INSERTs the message id through the context's own session: if
    the context commits, the id stays recorded and a redelivery of the same
    message finds it; if it rolls back, the id goes too and a redelivery runs.
    :func:`polydatum.celery.install` calls it before each task body
    (``inbox=True``).

    Args:
        source: an :class:`~polydatum.outbox.Outbox` (its database, session
            name and ``inbox_table``), or a Database/AsyncDatabase.
        table: the table's name (with a Database; an Outbox names it).
        session: the session resource's name (with a Database).
        retention: seconds an id is kept; older ones are pruned (a message
            redelivered after that runs again).
        prune_every: seconds between two prunes in one process; a prune runs
            after the commit of a context that recorded an id.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        source: Outbox | Database | AsyncDatabase,
        *,
        table: str = "polydatum_inbox",
        session: str = "db",
        retention: float = 7 * 24 * 3600.0,
        prune_every: float = 600.0,
    ) -> None:
        if isinstance(source, Outbox):
            self.database: Database | AsyncDatabase = source.database
            self.table: Table = source.inbox
            self.session_name = source.session_name
        elif isinstance(source, (Database, AsyncDatabase)):
            from sqlalchemy import MetaData

            self.database = source
            self.table = make_inbox_table(MetaData(), table)
            self.session_name = session
        else:
            msg = f"Inbox() needs an Outbox, a Database or an AsyncDatabase, got {type(source).__name__}"
            raise TypeError(msg)
        for option, value in (("retention", retention), ("prune_every", prune_every)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                msg = f"{option} must be a number of seconds > 0, got {value!r}"
                raise ValueError(msg)
        self.retention = float(retention)
        self.prune_every = float(prune_every)
        self._last_prune = 0.0
        self._lock = threading.Lock()
        dialect = self.database.sync_engine.dialect.name
        if dialect == "postgresql":
            self._insert: Any = postgresql.insert(self.table).on_conflict_do_nothing()
        elif dialect == "sqlite":
            self._insert = sqlite.insert(self.table).on_conflict_do_nothing()
        # RETURNING says whether the row went in (rowcount is not reliable through a Session).
        else:
            msg = f"the inbox supports PostgreSQL and SQLite, not {dialect}"
            raise ValueError(msg)
        self._insert = self._insert.returning(self.table.c.message_id)

    def __repr__(self) -> str:
        return f"Inbox({self.database!r}, table={self.table.name!r})"

    @property
    def engine(self) -> Engine:
        db = self.database
        return db.sync.engine if isinstance(db, AsyncDatabase) else db.engine

    def create_table(self) -> None:
        """Create the inbox table if it does not exist."""
        self.table.create(self.engine, checkfirst=True)

    def seen(self, ctx: DataAccessContext, message_id: str) -> bool:
        """Record ``message_id`` in ``ctx``'s transaction; True if a committed run had recorded it.

        On PostgreSQL a concurrent run of the same message waits here until
        the first one's transaction ends, then sees its outcome.
        """
        check_name(message_id, "message id")
        session = getattr(ctx, self.session_name)
        result = session.execute(self._insert, {"message_id": message_id, "received_at": time.time()})
        if self._prune_due():
            ctx.on_commit(self.prune)
        return result.first() is None

    def _prune_due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last_prune < self.prune_every and self._last_prune:
                return False
            self._last_prune = now
            return True

    def prune(self) -> int:
        """Delete the ids older than ``retention``; how many went."""
        t = self.table
        with transaction(self.database) as conn:
            result = conn.execute(delete(t).where(t.c.received_at < time.time() - self.retention))
            return int(result.rowcount)

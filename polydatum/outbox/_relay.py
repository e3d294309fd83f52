"""The relay: delivers what the committing processes could not."""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import ARRAY, BigInteger, any_, bindparam, exists, false, or_, select, update

from polydatum.outbox._core import Outbox, Row, transaction

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

logger = logging.getLogger("polydatum.outbox")


@dataclass(frozen=True)
class Metrics:
    """A relay's counters and the table's state.

    Attributes:
        pending: rows waiting (the table, all relays).
        oldest_pending_age: seconds since the oldest waiting row was added.
        dead: dead-lettered rows (the table).
        delivered: rows this relay delivered since it was made.
        failed: failed attempts this relay recorded (dead-letterings included).

    .. versionadded:: 2.0
    """

    pending: int
    oldest_pending_age: float
    dead: int
    delivered: int
    failed: int


class Relay:
    """Delivers the outbox's due rows in batches; several may run at once.

    Each batch is claimed in a short transaction (on PostgreSQL with
    ``FOR UPDATE SKIP LOCKED``, so relays never claim the same row): the
    claimed rows get a lease (owner, expiry) and the transaction commits.
    The handlers run outside any transaction; a second one deletes what was
    delivered and backs off or dead-letters the rest. A relay that dies
    mid-batch leaves leases that lapse after ``Outbox(lease=...)`` seconds;
    another relay then delivers those rows (again, if the dead one had
    already delivered some: handlers must be idempotent, see the inbox).

    A row is claimed only while no earlier row of its key is pending, so rows
    of one key are delivered in commit order, across relays too.

    Args:
        outbox: the outbox to deliver.
        batch: the most rows one claim takes.
        poll: seconds between two looks at the table when idle; on
            PostgreSQL a NOTIFY wakes the relay earlier.
        name: the lease owner name; default the outbox's owner name for
            this process plus ``:relay``.

    .. versionadded:: 2.0
    """

    def __init__(
        self, outbox: Outbox, *, batch: int = 100, poll: float = 1.0, name: str | None = None
    ) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            msg = f"batch must be an int of at least 1, got {batch!r}"
            raise ValueError(msg)
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not poll > 0:
            msg = f"poll must be a number of seconds > 0, got {poll!r}"
            raise ValueError(msg)
        self.outbox = outbox
        self.batch = batch
        self.poll = float(poll)
        self._name = name
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._delivered = 0
        self._failed = 0
        self._listener: Any = None
        self._claim = self._claim_query()
        self._lease = self._lease_statement()

    def __repr__(self) -> str:
        return f"<Relay of {self.outbox!r}>"

    @property
    def name(self) -> str:
        """The lease owner name of this relay."""
        return self._name or f"{self.outbox.owner()}:relay"

    def _claim_query(self) -> Any:
        t = self.outbox.table
        o = t.alias("o")
        p = t.alias("p")
        earlier = exists().where(p.c.key == o.c.key, p.c.id < o.c.id, p.c.dead == false())
        now: Any = bindparam("now")
        query = (
            select(o.c.id, o.c.topic, o.c.key, o.c.payload, o.c.attempts, o.c.created_at)
            .where(
                o.c.dead == false(),
                o.c.available_at <= now,
                or_(o.c.lease_until.is_(None), o.c.lease_until < now),
                or_(o.c.key.is_(None), ~earlier),
            )
            .order_by(o.c.id)
            .limit(bindparam("limit"))
        )
        if self.outbox.is_postgresql:
            query = query.with_for_update(skip_locked=True, of=o)
        return query

    def _lease_statement(self) -> Any:
        t = self.outbox.table
        if self.outbox.is_postgresql:
            # One array parameter: an IN list of a batch's ids is a statement
            # of its own per size, which neither SQLAlchemy nor psycopg caches
            # (they rendered and parsed it again for every batch: about a third of a relay's time).
            ids: Any = any_(bindparam("ids", type_=ARRAY(BigInteger)))
            match = t.c.id == ids
        else:
            match = t.c.id.in_(bindparam("ids", expanding=True))
        return update(t).where(match).values(lease_owner=bindparam("owner"), lease_until=bindparam("until"))

    def _claim_batch(self, conn: Connection) -> list[Row]:
        now = time.time()
        rows = [Row(*r) for r in conn.execute(self._claim, {"now": now, "limit": self.batch})]
        if rows:
            conn.execute(
                self._lease,
                {"ids": [r.id for r in rows], "owner": self.name, "until": now + self.outbox.lease},
            )
        return rows

    def run_once(self) -> int:
        """Claim one batch of due rows, deliver it, record the outcome.

        Returns:
            how many rows were claimed (delivered, failed or left waiting).

        Raises:
            sqlalchemy.exc.DBAPIError: the database could not be reached.
        """
        outbox = self.outbox
        outbox.flush()  # rows delivered after a commit in this process must not hold keys back
        with transaction(outbox.database, lazy_commit=True) as conn:
            rows = self._claim_batch(conn)
        if not rows:
            return 0
        out = outbox._deliver(rows, set())
        with transaction(outbox.database, lazy_commit=True) as conn:
            outbox._finish(conn, out, self.name)
        with self._lock:
            self._delivered += len(out.delivered)
            self._failed += len(out.failed)
        return len(rows)

    def run_forever(self) -> None:
        """Deliver until :meth:`stop`; the batch in hand is finished first.

        A failing database is logged and retried after ``poll`` seconds.
        """
        self._stop.clear()
        try:
            while not self._stop.is_set():
                try:
                    claimed = self.run_once()
                except Exception:
                    logger.warning("outbox relay could not run a batch; retrying", exc_info=True)
                    claimed = 0
                if claimed < self.batch:
                    self._wait()
        finally:
            self._close_listener()

    def start(self, name: str = "polydatum-relay") -> threading.Thread:
        """Run :meth:`run_forever` in a daemon thread (in a web process, say) and return it."""
        thread = threading.Thread(target=self.run_forever, name=name, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Ask :meth:`run_forever` to return after the batch in hand (from any thread or a signal handler)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def metrics(self) -> Metrics:
        """The table's pending/dead state and this relay's counters."""
        status = self.outbox.status()
        with self._lock:
            delivered, failed = self._delivered, self._failed
        return Metrics(status.pending, status.oldest_pending_age, status.dead, delivered, failed)

    def requeue_dead(self, ids: Iterable[int] | None = None) -> int:
        """Put dead-lettered rows back in the queue; see :meth:`Outbox.requeue_dead`."""
        return self.outbox.requeue_dead(ids)

    # -- waiting ---------------------------------------------------------------

    def _wait(self) -> None:
        listener = self._listen()
        if listener is None:
            self._stop.wait(self.poll)
            return
        try:
            # Woken by the first NOTIFY, or after poll seconds (rows backing off come due).
            for _ in listener.notifies(timeout=self.poll, stop_after=1):
                pass
        except Exception:
            logger.warning("outbox relay lost its LISTEN connection; polling", exc_info=True)
            self._close_listener()
            self._stop.wait(self.poll)

    def _listen(self) -> Any:
        if not self.outbox.is_postgresql:
            return None
        if self._listener is not None:
            return self._listener
        try:
            raw = self.outbox.engine.raw_connection()
            driver: Any = raw.driver_connection
            notifies = getattr(driver, "notifies", None)
            # psycopg 3.2 and later wait with a timeout; other drivers and versions poll.
            if notifies is None or "timeout" not in inspect.signature(notifies).parameters:
                raw.close()
                return None
            raw.detach()  # its own connection for good: never back to the pool
            driver.rollback()
            driver.autocommit = True
            channel = self.outbox.channel.replace('"', '""')
            driver.execute(f'LISTEN "{channel}"')
        except Exception:
            logger.warning("outbox relay could not LISTEN; polling", exc_info=True)
            return None
        self._listener = driver
        return driver

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.close()
            except Exception:
                pass

"""A transactional outbox written by hand: effects are rows of the request's transaction.

What the example gets from ``polydatum.outbox``, done directly: each effect
(a cache invalidation, a blob delete, a Celery message) is INSERTed in the
request's own transaction, leased to this process; right after the COMMIT
the request delivers its rows in order, and a background thread DELETEs
the delivered ones in batches (``synchronous_commit = off``: losing that
DELETE to a crash means one more delivery, never a lost one). A row whose
delivery failed stays leased; once the lease lapsed, polydatum's relay (the
table is the same) delivers it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, bindparam, delete
from sqlalchemy.orm import Session

from twin.models import outbox

logger = logging.getLogger("twin.outbox")

LEASE = 30.0  # seconds this process owns its rows before a relay may take them

_DELETE = delete(outbox).where(
    outbox.c.id.in_(bindparam("ids", expanding=True)), outbox.c.lease_owner == bindparam("owner")
)


def encode(payload: Any) -> str:
    """The payload as the outbox stores it (compact JSON)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class Outbox:
    """The rows of one process: written in a session, delivered after its commit."""

    def __init__(self, engine: Engine, handlers: dict[str, Callable[[Any], object]]) -> None:
        self.engine = engine
        self.handlers = handlers
        self._pid = -1
        self._owner = ""
        self._done: list[int] = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._wake = threading.Event()
        self._thread_pid = -1

    def owner(self) -> str:
        """This process's lease owner (a forked gunicorn worker is another owner)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._owner = f"{socket.gethostname()[:40]}:{self._pid}:{uuid.uuid4().hex[:8]}"
        return self._owner

    def add(self, session: Session, pending: list[tuple[int, str, Any]], topic: str, payload: Any) -> None:
        """INSERT an effect in ``session``'s transaction; remember it in ``pending`` for after the commit."""
        now = time.time()
        result: Any = session.execute(
            outbox.insert(),
            {
                "topic": topic,
                "key": None,
                "payload": encode(payload),
                "created_at": now,
                "available_at": now,
                "attempts": 0,
                "dead": False,
                "lease_owner": self.owner(),
                "lease_until": now + LEASE,
            },
        )
        row = result.inserted_primary_key
        assert row is not None
        pending.append((int(row[0]), topic, payload))

    def add_detached(self, topic: str, payload: Any, delay: float) -> int:
        """INSERT and COMMIT an effect due in ``delay`` s (a cleanup the request cancels if it commits)."""
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(
                outbox.insert(),
                {
                    "topic": topic,
                    "key": None,
                    "payload": encode(payload),
                    "created_at": now,
                    "available_at": now + delay,
                    "attempts": 0,
                    "dead": False,
                },
            ).inserted_primary_key
        assert row is not None
        return int(row[0])

    def remove(self, ids: list[int]) -> None:
        """DELETE rows in a transaction of their own (a cleanup that was done by hand)."""
        with self.engine.begin() as conn:
            conn.execute(delete(outbox).where(outbox.c.id.in_(ids)))

    def deliver(self, pending: list[tuple[int, str, Any]]) -> None:
        """After the commit: run each row's handler; delivered rows go to the deleting thread."""
        delivered = []
        for row_id, topic, payload in pending:
            try:
                self.handlers[topic](payload)
            except Exception:  # left leased: a relay delivers it once the lease lapsed
                logger.warning("delivering outbox row %s (%s) failed", row_id, topic, exc_info=True)
                continue
            delivered.append(row_id)
        if delivered:
            with self._lock:
                self._done.extend(delivered)
                if self._thread_pid != os.getpid():
                    self._thread_pid = os.getpid()
                    threading.Thread(target=self._run, name="twin-outbox-deleter", daemon=True).start()
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(0.005)  # let requests committing now join this batch
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """DELETE the delivered rows now (the thread does it every few ms; tests call it)."""
        with self._flushing:
            with self._lock:
                ids, self._done = self._done, []
            if not ids:
                return
            try:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                    conn.execute(_DELETE, {"ids": ids, "owner": self.owner()})
            except Exception:
                logger.warning("deleting %d delivered outbox rows failed; retrying", len(ids), exc_info=True)
                with self._lock:
                    self._done[:0] = ids

"""Helpers shared by the WSGI and ASGI middleware tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Engine, select

from polydatum import Service
from polydatum.werkzeug import current_context
from tests.support.sql import Item


class Probe(Service):
    """Tells which request's context it runs in: its request id and user."""

    def who(self) -> tuple[Any, Any]:
        meta = self._ctx.meta
        return meta.request_id, meta.user


def record_outcome(events: list[tuple[str, str]], name: str) -> None:
    """Append ``("commit", name)`` or ``("rollback", name)`` when the request's context ends."""
    ctx = current_context()
    ctx.on_commit(events.append, ("commit", name))
    ctx.on_rollback(events.append, ("rollback", name))


class Handle:
    """What the tracking resource yields: readable only while its context is open."""

    def __init__(self, tracker: Tracker, meta: Any) -> None:
        self.tracker = tracker
        self.meta = meta
        self.closed = False
        self.reads = 0

    def read(self, value: Any) -> Any:
        if self.closed:
            msg = "read from a closed resource: the context ended too early"
            raise RuntimeError(msg)
        self.reads += 1
        return value


class Tracker:
    """A resource factory counting opens and closes (thread-safe), for leak checks."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.opened = 0
        self.closed = 0
        self.open_now = 0
        self.max_open = 0
        self.handles: list[Handle] = []

    def __call__(self, ctx: Any) -> Iterator[Handle]:
        handle = Handle(self, ctx.meta)
        with self.cond:
            self.opened += 1
            self.open_now += 1
            self.max_open = max(self.max_open, self.open_now)
            self.handles.append(handle)
        try:
            yield handle
        finally:
            handle.closed = True
            with self.cond:
                self.closed += 1
                self.open_now -= 1
                self.cond.notify_all()

    def wait_closed(self, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` handles were closed; fail after ``timeout`` seconds."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.closed >= count, timeout):
                msg = f"{self.closed} of {count} resources closed after {timeout}s: a context leaked"
                raise AssertionError(msg)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout}s: {what}")
        time.sleep(0.01)


def item_names(engine: Engine) -> set[str]:
    """The names of the rows in ``items``, read on a connection of its own."""
    with engine.connect() as conn:
        return set(conn.execute(select(Item.name)).scalars())

"""Test hygiene for the outbox: no connection may outlive a test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from polydatum.outbox import Outbox
from polydatum.sqlalchemy import AsyncDatabase


@pytest.fixture(autouse=True)
def flush_outboxes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After each test, delete the rows every Outbox made in it still has to delete, then close its pool.

    The deletes of delivered rows run on a background thread: one that runs
    after the test disposed its Database would check a connection out of a
    new pool, left open until garbage collection (a ResourceWarning later).
    """
    made: list[Outbox] = []
    init = Outbox.__init__

    def remember(self: Outbox, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Outbox, "__init__", remember)
    yield
    for outbox in made:
        db = outbox.database
        if isinstance(db, AsyncDatabase) and db._sync is None:
            continue  # no sync side was made: nothing was delivered through it
        outbox.flush()
        outbox.engine.dispose()

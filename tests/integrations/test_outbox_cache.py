"""Cache invalidations through the outbox: they wait while Redis is down and survive a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from polydatum import DataManager
from polydatum.cache import Cache, MemoryBackend
from polydatum.outbox import Outbox
from polydatum.redis import Redis
from polydatum.sqlalchemy import Database
from tests.support.outbox import flush_outboxes  # noqa: F401  # autouse
from tests.support.servers import PrivateRedis

DEADLINE = 60.0


def app(tmp_path: Path, redis_url: str) -> Any:
    """One 'process' of the application: a DataManager, an outbox and a Redis cache through it."""
    dm = DataManager()
    db = Database(f"sqlite:///{tmp_path / 'app.db'}").install(dm)
    outbox = Outbox(db, backoff=0.05, max_backoff=0.1).install(dm)
    outbox.create_table()
    redis = Redis(redis_url, socket_connect_timeout=1, socket_timeout=1)
    cache = redis.cache(namespace="shop", outbox=outbox, retry_interval=0.01).install(dm)
    return dm, db, outbox, cache, redis


def test_invalidation_waits_while_redis_is_down_and_lands_after_a_restart(
    tmp_path: Path, private_redis: PrivateRedis
) -> None:
    """Redis down at commit: the delete waits in the outbox, survives a restart, lands; no stale read."""
    dm, db, outbox, cache, redis = app(tmp_path, private_redis.url)
    cache.set("product:7", "old price")
    private_redis.stop()
    with dm.context() as ctx:
        ctx.cache.invalidate("product:7")
    assert outbox.status().pending == 1  # the delete failed and waits
    db.dispose()
    redis.close()
    private_redis.start()
    # A fresh application (the old one was restarted); Redis kept the stale entry.
    dm, db, outbox, cache, redis = app(tmp_path, private_redis.url)
    cache.set("product:7", "old price")
    assert cache.get("product:7") == "old price"
    relay = outbox.relay()
    end = time.monotonic() + DEADLINE
    while outbox.status().pending and time.monotonic() < end:
        if relay.run_once() == 0:
            time.sleep(0.05)
    assert outbox.status().pending == 0
    assert cache.get("product:7") is None  # no stale read after delivery
    db.dispose()
    redis.close()


def test_invalidation_through_the_outbox_commits_and_rolls_back(tmp_path: Path) -> None:
    """A committed invalidation deletes right after the commit; a rolled back one deletes nothing."""
    dm = DataManager()
    db = Database(f"sqlite:///{tmp_path / 'app.db'}").install(dm)
    outbox = Outbox(db).install(dm)
    outbox.create_table()
    cache = Cache(MemoryBackend(), namespace="shop", outbox=outbox).install(dm)
    cache.set("a", 1)
    cache.set("b", 2)

    def rolled_back() -> None:
        with dm.context() as ctx:
            ctx.cache.invalidate("a")
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        rolled_back()
    assert cache.get("a") == 1
    with dm.context() as ctx:
        ctx.cache.invalidate("b")
        assert cache.get("b") == 2  # not before the commit
    assert cache.get("b") is None
    assert outbox.status().pending == 0
    child = cache.namespaced("child")  # a namespaced cache goes through the same outbox
    assert child.outbox is outbox
    db.dispose()


def test_cache_refuses_an_outbox_that_is_not_one() -> None:
    """outbox= must be a polydatum Outbox."""
    with pytest.raises(TypeError, match="outbox must be"):
        Cache(outbox="nope")


def test_outbox_sender_needs_install(tmp_path: Path) -> None:
    """An outbox used by an integration before install() raises, saying what to do."""
    dm = DataManager()
    Database(f"sqlite:///{tmp_path / 'app.db'}").install(dm)
    outbox = Outbox(Database(f"sqlite:///{tmp_path / 'app.db'}"))
    with dm.context() as ctx, pytest.raises(RuntimeError, match=r"call outbox\.install\(dm\)"):
        outbox.sender(ctx)

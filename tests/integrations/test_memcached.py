"""MemcachedBackend on a real memcached: keys, item size, clear by generation, and outages."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pymemcache.client.base import PooledClient

from polydatum import DataManager
from polydatum.cache import Cache, CacheBusy, CacheError, CacheUnavailable, CounterError, cached
from polydatum.memcached import (
    MAX_KEY_BYTES,
    AsyncMemcachedBackend,
    ItemTooLarge,
    MemcachedBackend,
    wire_key,
)
from polydatum.outbox import Outbox
from polydatum.sqlalchemy import Database
from tests.support.outbox import flush_outboxes  # noqa: F401  # autouse
from tests.support.servers import PrivateMemcached


@pytest.fixture(name="backend")
def _backend(memcached_address: str) -> Iterator[MemcachedBackend]:
    backend = MemcachedBackend(memcached_address)
    yield backend
    backend.close()


@pytest.fixture(name="cache")
def _cache(backend: MemcachedBackend) -> Cache:
    return Cache(backend, namespace=f"mc-{uuid.uuid4().hex[:12]}")


def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for ``check`` to hold (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.02)


class TestKeys:
    def test_plain_keys_are_sent_as_they_are(self) -> None:
        """Printable ASCII without spaces, up to 250 bytes: unchanged."""
        key = "ns:1:user:{42}#x"
        assert wire_key(key) == key
        assert wire_key("k" * MAX_KEY_BYTES) == "k" * MAX_KEY_BYTES

    @pytest.mark.parametrize("key", ["k" * (MAX_KEY_BYTES + 1), "a b", "a\nb", "a\x00b", "é", "~abc"])
    def test_other_keys_are_hashed(self, key: str) -> None:
        """Longer keys, spaces, control characters, non-ASCII (and the ``~`` of hashes) are hashed."""
        wired = wire_key(key)
        assert wired.startswith("~")
        assert len(wired) == 65
        assert wire_key(key + "x") != wired


class TestItemSize:
    def test_too_large_is_refused_before_any_io_naming_the_limit(self, memcached_address: str) -> None:
        """A value over max_item_size raises ItemTooLarge naming the limit; nothing is sent."""
        backend = MemcachedBackend(memcached_address, max_item_size=4096)
        cache = Cache(backend, namespace=f"mc-{uuid.uuid4().hex[:12]}")
        with pytest.raises(ItemTooLarge, match="max_item_size=4096") as info:
            cache.set("big", "x" * 5000)
        assert isinstance(info.value, ValueError)
        with pytest.raises(ItemTooLarge, match="4096"):
            cache.set_many({"small": 1, "big": "x" * 5000})
        assert cache.get_many(["small", "big"]) == {}
        backend.close()

    def test_server_refusal_is_the_same_clear_error(self, memcached_address: str) -> None:
        """A server with a lower -I than max_item_size says so through ItemTooLarge."""
        backend = MemcachedBackend(memcached_address, max_item_size=8 * 1024 * 1024)
        cache = Cache(backend, namespace=f"mc-{uuid.uuid4().hex[:12]}")
        with pytest.raises(ItemTooLarge, match="-I"):
            cache.set("big", b"x" * (2 * 1024 * 1024))
        assert cache.get("big") is None
        backend.close()

    def test_a_cached_result_too_large_is_served_not_cached(
        self, memcached_address: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """cached() over max_item_size: the call returns its result (computed each time) and logs why.

        (ItemTooLarge used to leave the DAL call, failing the request and rolling back its context.)
        """
        backend = MemcachedBackend(memcached_address, max_item_size=4096)
        cache = Cache(backend, namespace=f"mc-{uuid.uuid4().hex[:12]}")
        calls: list[int] = []

        @cached(ttl=60, key="listing", using=cache)
        def listing() -> str:
            calls.append(1)
            return "x" * 5000

        assert listing() == "x" * 5000
        assert listing() == "x" * 5000
        assert len(calls) == 2
        assert "is not cached" in caplog.text
        assert "max_item_size=4096" in caplog.text
        assert not cache._is_claimed("listing")  # released: the next caller computes at once
        backend.close()

    def test_a_full_server_is_a_clear_cache_error(self) -> None:
        """memcached out of memory (-M): a CacheError saying so, not pymemcache's own."""
        server = PrivateMemcached(extra=("-m", "2", "-M")).start()
        try:
            backend = MemcachedBackend(server.address)
            cache = Cache(backend, namespace="full")

            def fill() -> None:
                for i in range(100):
                    cache.set_many({f"k{i}": "x" * 700_000})

            with pytest.raises(
                CacheError, match=r"memcached refused to store cache key 'full:1:k\d+': Out of memory"
            ):
                fill()
            backend.close()
        finally:
            server.close()


class TestExpiry:
    def test_a_ttl_past_2038_keeps_the_item_until_then(self, cache: Cache) -> None:
        """memcached keeps an absolute expiry in 32 bits: a 12-year ttl still stores the item."""
        twelve_years = 12 * 365 * 24 * 3600
        assert cache.set("long", "v", ttl=twelve_years)
        assert cache.get("long") == "v"


class TestGenerations:
    def test_another_client_sees_a_clear_at_once(self, cache: Cache, memcached_address: str) -> None:
        """A clear through one backend hides the entries from another (another process) on its next read."""
        other = MemcachedBackend(memcached_address)
        theirs = Cache(other, namespace=cache.namespace)
        cache.set("a", 1)
        assert theirs.get("a") == 1
        cache.clear()
        assert theirs.get("a") is None
        assert theirs.get_many(["a"]) == {}
        theirs.set("a", 2)
        assert cache.get("a") == 2
        other.close()

    def test_a_lost_generation_never_brings_old_entries_back(
        self, cache: Cache, backend: MemcachedBackend
    ) -> None:
        """If memcached evicts a generation counter, the namespace reads as cleared, not as older."""
        cache.set("a", 1)
        backend.clear(f"{cache.namespace}:")
        backend.client.delete(wire_key(f":gen:{cache.namespace}:"), noreply=False)  # as an eviction would
        fresh = MemcachedBackend(backend.client)
        assert Cache(fresh, namespace=cache.namespace).get("a") is None

    def test_remembered_generations_are_bounded(
        self, backend: MemcachedBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Past the bound the remembered generations are forgotten, and read again when needed."""
        from polydatum.memcached import _backend

        monkeypatch.setattr(_backend, "_MAX_KNOWN_GENS", 3)
        caches = [Cache(backend, namespace=f"mc-{uuid.uuid4().hex[:8]}") for _ in range(4)]
        for i, cache in enumerate(caches):
            cache.set("k", i)
        assert len(backend._gens) <= 3 + 2  # the bound, plus the two prefixes of one key
        assert [c.get("k") for c in caches] == [0, 1, 2, 3]

    @pytest.mark.parametrize("prefix", ["ns", ":lock:", "a:b:c:"])
    def test_clear_takes_namespace_prefixes_only(self, backend: MemcachedBackend, prefix: str) -> None:
        """A prefix that is not a namespace (or too deep for clear_depth) is refused, saying what to pass."""
        with pytest.raises(ValueError, match="clear_depth=2"):
            backend.clear(prefix)

    def test_deeper_namespaces_need_a_larger_clear_depth(self, memcached_address: str) -> None:
        """clear_depth sets how deep a namespace clear may reach."""
        backend = MemcachedBackend(memcached_address, clear_depth=5)
        cache = Cache(backend, namespace=f"mc-{uuid.uuid4().hex[:8]}:a:b")
        cache.set("k", 1)
        cache.namespaced("c").set("k", 2)
        cache.clear("c")
        assert cache.get("k") == 1
        assert cache.namespaced("c").get("k") is None
        backend.close()
        with pytest.raises(ValueError, match="at least 1"):
            MemcachedBackend(memcached_address, clear_depth=0)


class TestOutage:
    def test_down_reads_miss_writes_drop_and_deletes_replay(
        self, private_memcached: PrivateMemcached, caplog: pytest.LogCaptureFixture
    ) -> None:
        """memcached down: reads miss, writes are dropped with one warning, invalidations are held."""
        backend = MemcachedBackend(private_memcached.address, connect_timeout=0.5, timeout=0.5)
        cache = Cache(backend, namespace="app", retry_interval=0.05)
        dm = DataManager()
        cache.install(dm, name="cache")
        cache.set("k", 1)
        assert not cache.is_down()
        private_memcached.stop()
        with caplog.at_level(logging.WARNING, logger="polydatum.cache"):
            assert cache.get("k") is None  # a miss, not an error
        assert cache.is_down()
        assert "backend is unavailable" in caplog.text
        assert "writes are dropped" in caplog.text
        assert cache.set("k", 2) is False
        with dm.context() as ctx:
            ctx.cache.invalidate("k")  # at the commit: held, as memcached is down
        assert cache.key("k") in cache._undelivered()[0]  # the entry (and its claim) wait
        assert backend.ping() is False
        assert cache.ping() is False
        private_memcached.start()
        until(lambda: cache._undelivered() == ([], []), "the held deletes to be replayed")
        assert cache.set("k", 3) is True
        assert cache.get("k") == 3
        backend.close()

    def test_raise_mode_raises_and_locks_never_degrade(self, private_memcached: PrivateMemcached) -> None:
        """on_unavailable="raise" raises CacheUnavailable; a lock raises it whatever the mode."""
        backend = MemcachedBackend(private_memcached.address, connect_timeout=0.5, timeout=0.5)
        private_memcached.stop()
        with pytest.raises(CacheUnavailable, match="memcached is unavailable"):
            Cache(backend, namespace="app", on_unavailable="raise").get("k")
        with pytest.raises(CacheUnavailable), Cache(backend, namespace="app").lock("job", timeout=5):
            pass
        backend.close()

    def test_cached_computes_while_down(self, private_memcached: PrivateMemcached) -> None:
        """cached() keeps answering (computing each time) while memcached is down."""
        backend = MemcachedBackend(private_memcached.address, connect_timeout=0.5, timeout=0.5)
        cache = Cache(backend, namespace="app", retry_interval=60)
        calls: list[int] = []

        @cached(ttl=60, key="k", using=cache)
        def compute() -> int:
            calls.append(1)
            return 7

        private_memcached.stop()
        assert (compute(), compute()) == (7, 7)
        assert len(calls) == 2
        backend.close()


class TestAsync:
    async def test_async_twin_shares_the_sync_backend(self, backend: MemcachedBackend) -> None:
        """AsyncMemcachedBackend runs the same backend's calls in threads; sync= is it."""
        from polydatum.cache import AsyncCache

        abackend = AsyncMemcachedBackend(backend=backend)
        assert abackend.sync is backend
        acache = AsyncCache(abackend, namespace=f"mc-{uuid.uuid4().hex[:12]}", sync_backend=backend)
        await acache.set("k", {"a": 1})
        assert Cache(backend, namespace=acache.namespace).get("k") == {"a": 1}
        assert await acache.delete("k")

    def test_made_from_an_address(self, memcached_address: str) -> None:
        """AsyncMemcachedBackend(address) makes its own MemcachedBackend."""
        abackend = AsyncMemcachedBackend(memcached_address, timeout=1.0)
        assert isinstance(abackend.sync, MemcachedBackend)
        assert "MemcachedBackend" in repr(abackend.sync)
        abackend.sync.close()


class TestCounters:
    def test_a_delta_past_64_bits_is_refused(self, cache: Cache) -> None:
        """A delta outside the signed 64-bit range is a CounterError before any I/O."""
        with pytest.raises(CounterError):
            cache.incr("n", 2**64)
        assert cache.get("n") is None


class TestOutbox:
    def test_invalidation_waits_in_the_outbox_while_memcached_is_down(
        self, tmp_path: Path, private_memcached: PrivateMemcached
    ) -> None:
        """memcached down at commit: the delete waits in the outbox and lands once it answers."""
        dm = DataManager()
        db = Database(f"sqlite:///{tmp_path / 'app.db'}").install(dm)
        outbox = Outbox(db, backoff=0.05, max_backoff=0.1).install(dm)
        outbox.create_table()
        backend = MemcachedBackend(private_memcached.address, connect_timeout=0.5, timeout=0.5)
        cache = Cache(backend, namespace="shop", outbox=outbox, retry_interval=0.01).install(dm)
        private_memcached.stop()
        with dm.context() as ctx:
            ctx.cache.invalidate("product:7")
        assert outbox.status().pending == 1  # the delete failed and waits
        private_memcached.start()
        cache.set("product:7", "old price")  # as if a partition had hidden a stale entry
        assert cache.get("product:7") == "old price"
        relay = outbox.relay()
        until(lambda: relay.run_once() >= 0 and outbox.status().pending == 0, "the outbox to deliver")
        assert cache.get("product:7") is None
        db.dispose()
        backend.close()


class TestErrors:
    def test_a_full_pool_is_busy_not_down(self, memcached_address: str) -> None:
        """Every pooled connection in use: CacheBusy, and the cache does not degrade."""
        backend = MemcachedBackend(memcached_address, max_pool_size=1)
        cache = Cache(backend, namespace=f"mc-{uuid.uuid4().hex[:12]}")
        with backend.client.client_pool.get_and_release(), pytest.raises(CacheBusy, match="max_pool_size"):
            cache.get("k")
        assert not cache.is_down()
        backend.close()

    def test_a_memcached_without_meta_commands_is_named(self, memcached_address: str) -> None:
        """memcached before 1.6 answers ERROR to mg/md: a CacheError saying which version is needed."""

        class OldServer(PooledClient):  # type: ignore[misc]
            def raw_command(self, command: bytes, end_tokens: bytes = b"\r\n") -> bytes:
                return b"ERROR"

        client = OldServer(memcached_address, default_noreply=False)
        cache = Cache(MemcachedBackend(client), namespace=f"mc-{uuid.uuid4().hex[:12]}")
        cache.set("k", 1)
        with pytest.raises(CacheError, match=r"memcached 1\.6"):
            cache.ttl("k")
        lock = cache.lock("job", timeout=5)
        assert lock.acquire()
        with pytest.raises(CacheError, match=r"memcached 1\.6"):
            lock.release()
        client.close()

"""FileSystemBackend: atomic files, TTL headers, hashed names, the size cap, and several processes."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest

from polydatum.cache import (
    AsyncCache,
    AsyncFileSystemBackend,
    Cache,
    CacheUnavailable,
    FileSystemBackend,
    LockError,
    ThreadedAsyncBackend,
)


def files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "entries").rglob("*") if p.is_file())


class TestFiles:
    def test_keys_never_become_paths(self, tmp_path: Path) -> None:
        """Every entry is a file named by the SHA-256 of its key, inside root, whatever the key."""
        root = tmp_path / "c"
        cache = Cache(FileSystemBackend(root), namespace="app")
        for key in ["../../escape", "/etc/passwd", "a/b/../c", "nul\x00", "C:\\win", "x" * 5000]:
            cache.set(key, key)
            assert cache.get(key) == key
        written = files(root)
        assert len(written) == 6
        assert all(len(p.name) == 64 and p.parent.parent == root / "entries" for p in written)
        assert not (tmp_path / "escape").exists()

    def test_writes_leave_no_temporary_files(self, tmp_path: Path) -> None:
        """A write is a temporary file renamed over the entry: none is left behind."""
        backend = FileSystemBackend(tmp_path)
        backend.set("k", b"one", None, "always")
        backend.set("k", b"two", None, "always")
        assert backend.get("k") == b"two"
        assert list((tmp_path / "tmp").iterdir()) == []

    def test_ttl_lives_in_the_header(self, tmp_path: Path) -> None:
        """An entry expires by the clock its header was written with, in any process reading it."""
        now = [1000.0]
        backend = FileSystemBackend(tmp_path, clock=lambda: now[0])
        backend.set("k", b"v", 2000, "always")
        reader = FileSystemBackend(tmp_path, clock=lambda: now[0])  # another process
        assert reader.pttl("k") == 2000
        now[0] += 1.5
        assert reader.get("k") == b"v"
        now[0] += 1.0
        assert reader.get("k") is None
        assert reader.pttl("k") is None
        assert not reader.set("k", b"w", None, "present")  # expired counts as absent

    def test_corrupt_or_foreign_files_are_misses(self, tmp_path: Path) -> None:
        """A truncated or foreign file under an entry's name reads as absent, never raises."""
        backend = FileSystemBackend(tmp_path)
        backend.set("k", b"v", None, "always")
        (path,) = files(tmp_path)
        whole = path.read_bytes()
        path.write_bytes(whole[:-1])  # cut short, as a power loss may leave it
        assert backend.get("k") is None
        path.write_bytes(b"PD")
        assert backend.get("k") is None
        path.write_bytes(b"XXXX" + b"\x00" * 40)
        assert backend.get("k") is None
        assert backend.clear("") == 0

    def test_bad_arguments(self, tmp_path: Path) -> None:
        """max_bytes must be positive."""
        with pytest.raises(ValueError, match="max_bytes must be at least 1"):
            FileSystemBackend(tmp_path, max_bytes=0)
        assert "FileSystemBackend" in repr(FileSystemBackend(tmp_path))
        assert FileSystemBackend(tmp_path).ping()


class TestFailures:
    def test_a_failed_write_degrades_and_leaves_no_temporary_file(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An OSError (here: a file where a folder must be) is CacheUnavailable, without the path."""
        backend = FileSystemBackend(tmp_path)
        digest = hashlib.sha256(b"app:1:k").hexdigest()
        (tmp_path / "entries" / digest[:2]).write_bytes(b"in the way")
        with pytest.raises(CacheUnavailable, match="file-system cache is unavailable: EEXIST") as info:
            backend.set("app:1:k", b"v", None, "always")
        assert str(tmp_path) not in str(info.value)
        assert list((tmp_path / "tmp").iterdir()) == []
        cache = Cache(backend, namespace="app")
        assert cache.set("k", "v") is False  # the cache rides it out: dropped, with a warning
        assert "backend is unavailable" in caplog.text
        assert cache.get("k") is None

    def test_a_vanished_root_is_unavailable(self, tmp_path: Path) -> None:
        """The folder removed under a running backend: ping() is False, operations are unavailable."""
        backend = FileSystemBackend(tmp_path / "gone")
        shutil.rmtree(tmp_path / "gone")
        assert not backend.ping()
        with pytest.raises(CacheUnavailable):
            backend.clear("app:")
        with pytest.raises(CacheUnavailable):
            backend.incr("n", 1)


class TestThreadedAsync:
    async def test_async_lock_reports_and_refuses_like_the_sync_one(self, tmp_path: Path) -> None:
        """The threaded async lock: locked(), and LockError when released unheld."""
        acache = AsyncCache(AsyncFileSystemBackend(tmp_path), namespace="app")
        lock = acache.lock("job", timeout=30)
        assert not await lock.locked()
        async with lock:
            assert await lock.locked()
        with pytest.raises(LockError, match="not held"):
            await lock.release()

    def test_a_blocking_lock_without_take_is_refused(self, redis_url: str) -> None:
        """A backend whose lock has no take()/release_token() cannot be made async this way."""
        from polydatum.redis import Redis, RedisBackend

        redis = Redis(redis_url)
        with pytest.raises(TypeError, match=r"needs take\(\) and release_token\(\)"):
            ThreadedAsyncBackend(RedisBackend(redis)).lock("job", 5, None)
        redis.close()


class TestSizeCap:
    def test_least_recently_used_are_evicted_first(self, tmp_path: Path) -> None:
        """Past max_bytes the entries read or written longest ago go; a recent read keeps one."""
        backend = FileSystemBackend(tmp_path, max_bytes=10_000)
        for i in range(8):
            backend.set(f"k{i}", b"x" * 1000, None, "always")
        assert backend.get("k0") is not None  # k0 is now the most recently used
        for i in range(8, 12):
            backend.set(f"k{i}", b"x" * 1000, None, "always")
        backend.sweep()
        present = {k for k in (f"k{i}" for i in range(12)) if backend.get(k) is not None}
        assert "k0" in present
        assert "k1" not in present
        assert {"k9", "k10", "k11"} <= present
        assert sum(p.stat().st_size for p in files(tmp_path)) <= 10_000

    def test_temporary_files_of_dead_writers_are_swept(self, tmp_path: Path) -> None:
        """A temporary file older than an hour (its writer died) goes with the next sweep."""
        backend = FileSystemBackend(tmp_path)
        old = tmp_path / "tmp" / "123-1-dead"
        old.write_bytes(b"half")
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        young = tmp_path / "tmp" / "123-2-busy"
        young.write_bytes(b"being written")
        backend.sweep()
        assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == ["123-2-busy"]

    def test_expired_entries_are_swept_first(self, tmp_path: Path) -> None:
        """A sweep drops expired entries before any live one."""
        now = [0.0]
        backend = FileSystemBackend(tmp_path, max_bytes=1_000_000, clock=lambda: now[0])
        backend.set("old", b"x", 10, "always")
        backend.set("live", b"y", None, "always")
        now[0] += 1
        assert backend.sweep() == 1
        assert len(files(tmp_path)) == 1


def _count(root: str, n: int) -> None:
    cache = Cache(FileSystemBackend(root), namespace="shared")
    for _ in range(n):
        cache.incr("hits")
        with cache.lock("box", timeout=30):
            box = cache.get("box", 0)
            cache.set("box", box + 1)


class TestProcesses:
    def test_processes_share_counters_and_locks(self, tmp_path: Path) -> None:
        """Four processes incrementing at once lose no update, by incr or under the lock."""
        root = str(tmp_path)
        cache = Cache(FileSystemBackend(root), namespace="shared")
        cache.set("hits", 0)  # the parent uses the same root meanwhile
        context = multiprocessing.get_context("spawn")  # no fork of a threaded test process
        workers = [context.Process(target=_count, args=(root, 25)) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert [w.exitcode for w in workers] == [0, 0, 0, 0]
        assert cache.get("hits") == 100
        assert cache.get("box") == 100

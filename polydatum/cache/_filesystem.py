"""The file-system backend: one file per entry, shared safely by several processes.

Layout under ``root``::

    entries/ab/ab12...ef   one entry: a header (magic, expiry, key) then the value
    tmp/                   files being written, renamed into entries/ when complete
    lock                   flock()ed by every write and by the sweep

Keys never become paths: an entry's file is named by the SHA-256 of its key
(the key itself is kept in the header), so no key can escape ``root``, clash
with the file system's rules, or be too long for it.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from polydatum.cache._backends import When
from polydatum.cache._errors import CacheUnavailable, CounterError
from polydatum.cache._locks import BackendLock
from polydatum.cache._threaded import ThreadedAsyncBackend

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_MAGIC = b"PDC1"
# magic, expiry (Unix seconds, 0.0 for none), key length, value length (a
# file cut short, as after a power loss, is then told apart and ignored)
_HEADER = struct.Struct(">4sdII")
_INT64 = (-(2**63), 2**63 - 1)
_INTEGER = re.compile(rb"-?[0-9]+")
# Temporary files older than this were left by a process that died mid-write.
_STALE_TMP = 3600.0


@contextmanager
def _io() -> Iterator[None]:
    """An OSError (a full disk, a read-only or vanished folder) is an outage the cache rides out."""
    try:
        yield
    except OSError as exc:
        # The error's name, never the path: errors do not show server paths.
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        msg = f"the file-system cache is unavailable: {name}"
        raise CacheUnavailable(msg) from exc


class _Entry:
    __slots__ = ("expires", "key", "value")

    def __init__(self, key: str, value: bytes, expires: float) -> None:
        self.key = key
        self.value = value
        self.expires = expires  # 0.0: never


class FileSystemBackend:
    """A :class:`~polydatum.cache.CacheBackend` keeping each entry in a file under ``root``.

    Writes are atomic (a temporary file renamed over the entry), so a reader
    sees the old entry or the new one, never half of one. Each entry's header
    holds its expiry. Several processes (and threads) may share one ``root``:
    every write holds an exclusive ``flock`` on ``root/lock`` (so ``add``,
    ``replace``, ``incr``, deletes, locks and claims are atomic); reads take
    no lock, thanks to the renames.

    Once a process has written ``max_bytes // 10`` bytes since its last
    sweep, it sweeps: expired entries are deleted, then the least recently
    used (by the time of their last read or write) until the entries fit in
    ``max_bytes``. The folder may thus exceed the cap by that much per
    process between sweeps.

    Args:
        root: the folder (created if missing). Give each cache store its own.
        max_bytes: the size cap of all entries together.
        clock: seconds since the epoch (tests may pass a fake); expiries are
            wall-clock times so that every process reads them alike.

    Raises:
        OSError: ``root`` cannot be created.

    POSIX only (it needs ``fcntl.flock``).

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_bytes: int = 256 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            msg = "FileSystemBackend needs fcntl.flock (POSIX); use MemoryBackend or Redis here"
            raise RuntimeError(msg)
        if max_bytes < 1:
            msg = f"max_bytes must be at least 1, got {max_bytes!r}"
            raise ValueError(msg)
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries = self.root / "entries"
        self._tmp = self.root / "tmp"
        self._entries.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(exist_ok=True)
        self._lock_path = self.root / "lock"
        self._thread_lock = threading.RLock()
        self._lock_fd: int | None = None
        self._lock_pid = 0
        self._depth = 0
        self._written = 0

    def __repr__(self) -> str:
        return f"<FileSystemBackend max_bytes={self.max_bytes}>"

    # -- files -------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return self._entries / digest[:2] / digest

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive across threads (an RLock) and processes (flock on ``root/lock``)."""
        with self._thread_lock:
            if self._lock_pid != os.getpid():
                # A forked child shares its parent's descriptor, and with it the
                # flock: open its own.
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                self._lock_pid = os.getpid()
            fd = self._lock_fd
            assert fd is not None
            if self._depth == 0:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _read(self, path: Path, key: str | None) -> _Entry | None:
        """The live entry in ``path`` (for ``key``, if given), or None."""
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if len(data) < _HEADER.size:
            return None
        magic, expires, size, length = _HEADER.unpack_from(data)
        end = _HEADER.size + size
        if magic != _MAGIC or len(data) != end + length:
            return None
        stored = data[_HEADER.size : end].decode("utf-8", "surrogatepass")
        if key is not None and stored != key:
            return None  # a SHA-256 collision: treat as absent rather than return another's value
        if expires and expires <= self._clock():
            return None
        return _Entry(stored, data[end:], expires)

    def _touch(self, path: Path) -> None:
        # LRU order is each file's mtime, set from the fine clock (the file
        # system's own may tick only every few milliseconds).
        now = time.time_ns()
        try:
            os.utime(path, ns=(now, now))
        except FileNotFoundError:
            pass

    def _write(self, key: str, value: bytes, expires: float) -> None:
        path = self._path(key)
        raw = key.encode("utf-8", "surrogatepass")
        blob = _HEADER.pack(_MAGIC, expires, len(raw), len(value)) + raw + value
        tmp = self._tmp / f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            path.parent.mkdir(exist_ok=True)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        self._touch(path)
        self._written += len(blob)
        if self._written >= max(1, self.max_bytes // 10):
            self._written = 0
            self.sweep()

    def _expiry(self, ttl_ms: int | None) -> float:
        return 0.0 if ttl_ms is None else self._clock() + ttl_ms / 1000

    def _files(self) -> Iterator[os.DirEntry[str]]:
        for bucket in os.scandir(self._entries):
            if bucket.is_dir():
                yield from os.scandir(bucket.path)

    def sweep(self) -> int:
        """Delete expired entries, then the least recently used beyond ``max_bytes``; how many.

        Runs by itself as entries are written; call it to enforce the cap now.
        """
        with _io():
            deleted = 0
            now = self._clock()
            with self._locked():
                for stale in os.scandir(self._tmp):
                    try:
                        if stale.stat().st_mtime < time.time() - _STALE_TMP:
                            os.unlink(stale.path)
                    except FileNotFoundError:
                        pass
                kept: list[tuple[int, int, str]] = []
                total = 0
                for item in self._files():
                    try:
                        info = item.stat()
                        with open(item.path, "rb") as f:
                            head = f.read(_HEADER.size)
                    except FileNotFoundError:
                        continue
                    expires = _HEADER.unpack(head)[1] if len(head) == _HEADER.size else 1.0
                    if expires and expires <= now:
                        deleted += self._unlink(item.path)
                        continue
                    kept.append((info.st_mtime_ns, info.st_size, item.path))
                    total += info.st_size
                kept.sort()
                for _, size, path in kept:
                    if total <= self.max_bytes:
                        break
                    deleted += self._unlink(path)
                    total -= size
            return deleted

    @staticmethod
    def _unlink(path: str | Path) -> int:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return 1

    # -- the protocol --------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The entry's value (and it becomes the most recently used), or None."""
        with _io():
            path = self._path(key)
            entry = self._read(path, key)
            if entry is None:
                return None
            self._touch(path)
            return entry.value

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """:meth:`get` for each key, in order."""
        with _io():
            return [self.get(k) for k in keys]

    def set(self, key: str, value: bytes, ttl_ms: int | None, when: When) -> bool:
        """Write the entry under the lock (``absent``/``present``: after checking it)."""
        with _io(), self._locked():
            # Under the lock too: else an incr could write back a count read before it.
            if when == "always":
                self._write(key, value, self._expiry(ttl_ms))
                return True
            exists = self._read(self._path(key), key) is not None
            if exists != (when == "present"):
                return False
            self._write(key, value, self._expiry(ttl_ms))
            return True

    def set_many(self, items: Mapping[str, bytes], ttl_ms: int | None) -> None:
        """Write every entry with the same TTL (each atomically; not all at once)."""
        with _io():
            expires = self._expiry(ttl_ms)
            with self._locked():
                for key, value in items.items():
                    self._write(key, value, expires)

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete the entries; how many were live."""
        with _io():
            deleted = 0
            with self._locked():
                for key in keys:
                    path = self._path(key)
                    live = self._read(path, key) is not None
                    if self._unlink(path) and live:
                        deleted += 1
            return deleted

    def incr(self, key: str, delta: int) -> int:
        """Add ``delta`` to a signed 64-bit counter (a missing one counts from 0), keeping its TTL."""
        with _io(), self._locked():
            entry = self._read(self._path(key), key)
            value, expires = (entry.value, entry.expires) if entry is not None else (b"0", 0.0)
            number = int(value) + delta if _INTEGER.fullmatch(value) else None
            if number is None or not _INT64[0] <= number <= _INT64[1]:
                msg = "value is not an integer or out of range"
                raise CounterError(msg)
            self._write(key, str(number).encode(), expires)
            return number

    def pttl(self, key: str) -> int | None:
        """Milliseconds left, -1 for no expiry, None when missing."""
        with _io():
            entry = self._read(self._path(key), key)
            if entry is None:
                return None
            if not entry.expires:
                return -1
            return max(1, math.ceil((entry.expires - self._clock()) * 1000))

    def clear(self, prefix: str) -> int:
        """Delete every entry whose key starts with ``prefix`` (reads every header); how many."""
        with _io():
            deleted = 0
            with self._locked():
                for item in self._files():
                    entry = self._read(Path(item.path), None)
                    if entry is not None and entry.key.startswith(prefix):
                        deleted += self._unlink(item.path)
            return deleted

    def set_guarded(self, key: str, value: bytes, ttl_ms: int | None, guard: str, token: bytes) -> bool:
        """Under the lock: if ``guard`` holds ``token``, write ``value`` and delete ``guard``."""
        with _io(), self._locked():
            held = self._read(self._path(guard), guard)
            if held is None or held.value != token:
                return False
            self._unlink(self._path(guard))
            self._write(key, value, self._expiry(ttl_ms))
            return True

    def delete_if(self, key: str, token: bytes) -> bool:
        """Under the lock: delete ``key`` if it holds ``token``."""
        with _io(), self._locked():
            path = self._path(key)
            held = self._read(path, key)
            if held is None or held.value != token:
                return False
            return bool(self._unlink(path))

    def compare_and_set(self, key: str, expected: bytes, value: bytes) -> bool:
        """Under the lock: if ``key`` holds ``expected``, write ``value`` with the same expiry."""
        with _io(), self._locked():
            held = self._read(self._path(key), key)
            if held is None or held.value != expected:
                return False
            self._write(key, value, held.expires)
            return True

    def touch(self, key: str, ttl_ms: int | None) -> bool:
        """Under the lock: rewrite ``key``'s entry with a new expiry (None: never); False when missing."""
        with _io(), self._locked():
            held = self._read(self._path(key), key)
            if held is None:
                return False
            self._write(key, held.value, self._expiry(ttl_ms))
            return True

    def lock(self, key: str, timeout: float, blocking_timeout: float | None) -> FileSystemLock:
        """A :class:`FileSystemLock` on ``key``, shared by every process using ``root``."""
        return FileSystemLock(self, key, timeout, blocking_timeout)

    def ping(self) -> bool:
        """True when ``root`` is a folder entries can be written to."""
        return self._entries.is_dir() and os.access(self._entries, os.W_OK)


class FileSystemLock(BackendLock):
    """A lock kept as an entry of a :class:`FileSystemBackend`, expiring after ``timeout``.

    .. versionadded:: 2.0
    """


class AsyncFileSystemBackend(ThreadedAsyncBackend):
    """:class:`FileSystemBackend` for :class:`~polydatum.cache.AsyncCache`: each call in a worker thread.

    Takes the same arguments as :class:`FileSystemBackend`, or ``backend=`` one.

    .. versionadded:: 2.0
    """

    sync: FileSystemBackend

    def __init__(self, *args: Any, backend: FileSystemBackend | None = None, **kwargs: Any) -> None:
        super().__init__(backend if backend is not None else FileSystemBackend(*args, **kwargs))


__all__ = ["AsyncFileSystemBackend", "FileSystemBackend", "FileSystemLock"]

"""The blob stores; re-exported by :mod:`polydatum.blob`."""

from __future__ import annotations

import abc
import bisect
import builtins
import contextlib
import dataclasses
import datetime
import functools
import io
import itertools
import json
import logging
import mimetypes
import os
import re
import shutil
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any, BinaryIO, Protocol, TypeAlias, cast

from polydatum.errors import ContextStateError, NotFound, ServiceError

try:  # POSIX: lets several processes share one FileSystemBlobStore root.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BlobData",
    "BlobError",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "BlobStoreUnavailable",
    "FileSystemBlobStore",
    "InvalidKey",
    "InvalidMetadata",
    "MemoryBlobStore",
    "TransactionalBlobStore",
    "UrlNotSupported",
    "check_key",
    "from_url",
]

logger = logging.getLogger("polydatum.blob")

# What put() accepts; documented where polydatum.blob re-exports it.
BlobData: TypeAlias = bytes | bytearray | memoryview | IO[bytes] | Iterable[bytes]

MAX_KEY_BYTES = 1024
MAX_METADATA_BYTES = 2048
RESERVED_PREFIX = ".polydatum/"
UNDO_PREFIX = RESERVED_PREFIX + "undo/"
DEFAULT_CONTENT_TYPE = "application/octet-stream"
CHUNK_SIZE = 1024 * 1024

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"[A-Za-z]:")
_METADATA_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]*\Z")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*\Z")
_CONTENT_TYPE = re.compile(r"[\x21-\x7e]+/[\x21-\x7e]+(;[\x20-\x7e]*)?\Z")
# Built-in defaults only (no /etc/mime.types): the guess is the same on every machine.
_MIME = mimetypes.MimeTypes()


# -- errors ------------------------------------------------------------------


class BlobError(ServiceError):
    """A blob store could not do what was asked.

    Attributes:
        key: the key the operation was about, when there is one.

    .. versionadded:: 2.0
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class BlobNotFound(BlobError, NotFound):
    """No blob is stored under the key (HTTP 404); also a :class:`~polydatum.errors.NotFound`.

    .. versionadded:: 2.0
    """


class InvalidKey(BlobError, ValueError):
    """A key was refused: it could escape the store's root or is not portable (HTTP 400).

    .. versionadded:: 2.0
    """

    code = 400


class InvalidMetadata(BlobError, ValueError):
    """Metadata or a content type that not every store can keep (HTTP 400).

    .. versionadded:: 2.0
    """

    code = 400


class BlobStoreUnavailable(BlobError):
    """The storage did not answer: network down, timeout, disk gone (HTTP 503).

    .. versionadded:: 2.0
    """

    code = 503


class UrlNotSupported(BlobError, NotImplementedError):
    """The store cannot hand out URLs for its blobs (HTTP 501).

    .. versionadded:: 2.0
    """

    code = 501


# -- values ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    """What :meth:`BlobStore.stat` knows about a blob.

    Attributes:
        key: the blob's key.
        size: its length in bytes.
        content_type: its media type, e.g. ``"image/png"``.
        etag: an opaque version tag that changes whenever the blob is rewritten
            (S3's ETag without quotes; on disk, inode, mtime and size).
        modified: when it was last written, timezone-aware (UTC).
        metadata: the string metadata given to :meth:`BlobStore.put`, keys lower-cased.

    .. versionadded:: 2.0
    """

    key: str
    size: int
    content_type: str
    etag: str
    modified: datetime.datetime
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)


# -- validation helpers ------------------------------------------------------


def _key_problem(key: str) -> str | None:
    if not key:
        return "it is empty"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid Unicode text (it has a lone surrogate)"
    if size > MAX_KEY_BYTES:
        return f"it is {size} bytes long in UTF-8; the limit is {MAX_KEY_BYTES}"
    if "\x00" in key:
        return "it contains a NUL character"
    control = _CONTROL.search(key)
    if control:
        return f"it contains the control character U+{ord(control.group()):04X}"
    if "\\" in key:
        return "it contains a backslash; separate segments with '/'"
    if key.startswith("/"):
        return "it is an absolute path; keys are relative to the store"
    if _DRIVE.match(key):
        return "it starts with a drive letter"
    for segment in key.split("/"):
        if segment == "":
            return "it has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"it has a {segment!r} segment, which could escape the store's root"
    if key.startswith(RESERVED_PREFIX):
        return f"keys under {RESERVED_PREFIX!r} are reserved for polydatum's own bookkeeping"
    return None


def check_key(key: object) -> str:
    """Return ``key`` if every store accepts it, else raise :class:`InvalidKey`.

    Args:
        key: the candidate key.

    Raises:
        InvalidKey: the key is not a ``str``, or is empty, absolute, contains
            ``.``/``..``/empty segments, a backslash, NUL or another control
            character, is longer than 1024 bytes of UTF-8, or lies under the
            reserved ``.polydatum/`` prefix. The message says which.

    .. versionadded:: 2.0
    """
    if not isinstance(key, str):
        msg = f"blob keys are str, got {key!r} ({type(key).__name__})"
        raise InvalidKey(msg)
    problem = _key_problem(key)
    if problem is not None:
        msg = (
            f"invalid blob key {key!r}: {problem}. Keys are '/'-separated relative "
            "paths such as 'notes/42/photo.jpg'"
        )
        raise InvalidKey(msg, key=key)
    return key


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        msg = f"a list prefix is a str, got {prefix!r} ({type(prefix).__name__})"
        raise InvalidKey(msg)
    # A prefix is valid when some valid key could start with it.
    problem = _key_problem(prefix + "x") if prefix else None
    if problem is not None:
        msg = f"invalid list prefix {prefix!r}: {problem}"
        raise InvalidKey(msg, key=prefix)
    return prefix


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if not metadata:
        return {}
    if not isinstance(metadata, Mapping):
        msg = f"metadata must be a mapping of str to str, got {type(metadata).__name__}"
        raise InvalidMetadata(msg)
    clean: dict[str, str] = {}
    total = 0
    for name, value in metadata.items():
        if not isinstance(name, str) or not isinstance(value, str):
            msg = (
                f"metadata must map str to str, got {name!r}: {value!r}; "
                "convert numbers and dates to text first"
            )
            raise InvalidMetadata(msg)
        lowered = name.lower()
        if not _METADATA_KEY.match(lowered):
            msg = (
                f"metadata name {name!r} is not portable: use ASCII letters, digits, "
                "'-', '_' and '.', starting with a letter or digit (S3 sends names as "
                "HTTP headers and lower-cases them)"
            )
            raise InvalidMetadata(msg)
        if lowered in clean:
            msg = f"metadata names {name!r} and another differ only in case; S3 would merge them"
            raise InvalidMetadata(msg)
        if not _PRINTABLE_ASCII.match(value):
            msg = (
                f"metadata value for {name!r} must be printable ASCII (it travels as an "
                "HTTP header); encode it first, e.g. urllib.parse.quote(value)"
            )
            raise InvalidMetadata(msg)
        total += len(lowered) + len(value)
        clean[lowered] = value
    if total > MAX_METADATA_BYTES:
        msg = f"metadata is {total} bytes; stores keep at most {MAX_METADATA_BYTES} (S3's limit)"
        raise InvalidMetadata(msg)
    return clean


def _guess_type(key: str) -> str:
    # The leading "/" keeps a key such as "data:x" from being read as a URL scheme.
    return _MIME.guess_type("/" + key, strict=False)[0] or DEFAULT_CONTENT_TYPE


def _content_type(key: str, content_type: str | None) -> str:
    if content_type is None:
        return _guess_type(key)
    if not isinstance(content_type, str) or not _CONTENT_TYPE.match(content_type):
        msg = (
            f"content type {content_type!r} is not a media type such as 'image/png' "
            "or 'text/plain; charset=utf-8' (printable ASCII, no line breaks)"
        )
        raise InvalidMetadata(msg)
    return content_type


def _expires_seconds(expires: float | datetime.timedelta) -> int:
    seconds = expires.total_seconds() if isinstance(expires, datetime.timedelta) else expires
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 1:
        msg = f"expires must be a positive number of seconds or a timedelta, got {expires!r}"
        raise ValueError(msg)
    return int(seconds)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# -- streams -----------------------------------------------------------------


class _Reader(io.RawIOBase):
    """Reads an iterable of bytes, or a stream that may return short reads, as a stream.

    ``read(n)`` returns exactly ``n`` bytes until the end: boto3's multipart
    upload takes a short read for a short part, which S3 refuses.
    """

    def __init__(self, source: Iterable[bytes] | IO[bytes]) -> None:
        super().__init__()
        read = getattr(source, "read", None)
        if read is not None:
            self._chunks: Iterator[Any] = iter(lambda: read(CHUNK_SIZE), b"")
        else:
            self._chunks = iter(source)
        self._pending = b""
        self.count = 0

    def readable(self) -> bool:
        return True

    def _next(self) -> bytes:
        while True:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            if isinstance(chunk, str):
                msg = (
                    "blob data yielded str; blobs are bytes: encode text first "
                    "(text.encode()) or open files in binary mode ('rb')"
                )
                raise TypeError(msg)
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                msg = f"blob data must yield bytes, got {type(chunk).__name__}"
                raise TypeError(msg)
            if chunk:
                return bytes(chunk)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._pending, *iter(self._next, b"")]
            self._pending = b""
            data = b"".join(parts)
        else:
            parts, have = [], 0
            if self._pending:
                parts.append(self._pending)
                have = len(self._pending)
            while have < size:
                chunk = self._next()
                if not chunk:
                    break
                parts.append(chunk)
                have += len(chunk)
            joined = parts[0] if len(parts) == 1 else b"".join(parts)
            data, self._pending = joined[:size], joined[size:]
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)


def _as_body(data: object) -> bytes | IO[bytes]:
    """Turn what ``put`` accepts into bytes or a readable binary stream."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, (str, io.TextIOBase)):
        msg = (
            f"blob data must be bytes, a binary stream or an iterable of bytes, got "
            f"{type(data).__name__}; encode text first (text.encode()) or open files "
            "in binary mode ('rb')"
        )
        raise TypeError(msg)
    if hasattr(data, "read"):
        return data  # type: ignore[return-value]
    if isinstance(data, Iterable):
        return cast("IO[bytes]", _Reader(data))
    msg = (
        f"blob data must be bytes, a binary stream or an iterable of bytes, "
        f"got {type(data).__name__}"
    )
    raise TypeError(msg)


def _chunks(body: bytes | IO[bytes]) -> Iterator[bytes]:
    if isinstance(body, bytes):
        yield body
        return
    while True:
        chunk = body.read(CHUNK_SIZE)
        if not chunk:
            return
        if isinstance(chunk, str):
            msg = "the stream returned str; open it in binary mode ('rb')"
            raise TypeError(msg)
        yield chunk


def _copy_stream(source: IO[bytes], target: IO[bytes] | Any) -> int:
    total = 0
    while True:
        chunk = source.read(CHUNK_SIZE)
        if not chunk:
            return total
        if isinstance(chunk, str):
            msg = "the stream returned str; open it in binary mode ('rb')"
            raise TypeError(msg)
        target.write(chunk)
        total += len(chunk)


# -- the interface -----------------------------------------------------------


class _Registry(Protocol):
    def register_resources(self, **resources: Any) -> Any: ...


class BlobStore(abc.ABC):
    """**Interface:** a place that keeps blobs under string keys.

    The public methods check their arguments (same rules for every store) and
    call a small set of primitives that each store implements: ``_put``,
    ``_open``, ``_stat``, ``_delete``, ``_list``, ``_copy`` and, optionally,
    ``_get``, ``_exists``, ``_download``, ``_url``, ``_ping``.

    .. versionadded:: 2.0
    """

    # -- public API -----------------------------------------------------------

    def put(
        self,
        key: str,
        data: BlobData,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> int:
        """Store ``data`` under ``key``, replacing any blob there.

        Streams and iterables are copied in chunks: a large upload never sits
        in memory whole (except in :class:`MemoryBlobStore`, which is memory).
        A reader sees either the old blob or the new one, never a mix.

        Args:
            key: where to store it, e.g. ``"notes/42/photo.jpg"``.
            data: ``bytes``, a binary file-like object, or an iterable of bytes.
            content_type: its media type; guessed from the key's extension
                when omitted (``application/octet-stream`` when unknown).
            metadata: up to 2 KiB of ``str`` to ``str``; names are lower-cased.

        Returns:
            The number of bytes stored.

        Raises:
            InvalidKey: the key is refused (see :func:`check_key`).
            InvalidMetadata: bad metadata or content type.
            TypeError: ``data`` is text or not bytes at all.
            BlobError: the store failed; the message names the key.
        """
        key = check_key(key)
        resolved = _content_type(key, content_type)
        clean = _check_metadata(metadata)
        return self._put(key, _as_body(data), resolved, clean)

    def get(self, key: str) -> bytes:
        """Return the whole blob as bytes; use :meth:`open` for large blobs.

        Raises:
            BlobNotFound: nothing is stored under ``key``.
        """
        return self._get(check_key(key))

    def open(self, key: str) -> BinaryIO:
        """Open the blob for reading as a binary stream; close it when done.

        Only a buffer's worth is held in memory at a time, whatever the size.

        Raises:
            BlobNotFound: nothing is stored under ``key``.
        """
        return self._open(check_key(key))

    def download(self, key: str, target: IO[bytes]) -> int:
        """Write the blob into the writable binary ``target``; return the byte count.

        S3 downloads large blobs in parallel ranged requests.

        Raises:
            BlobNotFound: nothing is stored under ``key``.
        """
        return self._download(check_key(key), target)

    def stat(self, key: str) -> BlobInfo:
        """Return size, content type, etag, modified time and metadata.

        Raises:
            BlobNotFound: nothing is stored under ``key``.
        """
        return self._stat(check_key(key))

    def exists(self, key: str) -> bool:
        """True when a blob is stored under ``key``."""
        return self._exists(check_key(key))

    def delete(self, key: str) -> bool:
        """Delete the blob; True if there was one, False if there was nothing to delete."""
        return self._delete(check_key(key))

    def list(
        self, prefix: str = "", after: str | None = None, limit: int | None = None
    ) -> Iterator[str]:
        """Yield keys starting with ``prefix`` in ascending (code point) order, lazily.

        Pages are fetched as the iterator is consumed, so listing a huge
        store costs nothing until you read it. Resume a listing by passing
        the last key you saw as ``after``.

        Args:
            prefix: only keys starting with this string (not necessarily at a ``/``).
            after: only keys strictly greater than this one.
            limit: stop after this many keys.
        """
        prefix = _check_prefix(prefix)
        if after is not None and not isinstance(after, str):
            msg = f"after must be a key (str) or None, got {after!r}"
            raise TypeError(msg)
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 0
        ):
            msg = f"limit must be a non-negative int or None, got {limit!r}"
            raise ValueError(msg)
        page_size = 1000 if limit is None else max(1, min(1000, limit))
        keys = (
            k for k in self._list(prefix, after or None, page_size)
            if not k.startswith(RESERVED_PREFIX)
        )
        return keys if limit is None else itertools.islice(keys, limit)

    def copy(self, source: str, target: str) -> None:
        """Copy a blob with its content type and metadata to another key.

        Raises:
            BlobNotFound: nothing is stored under ``source``.
        """
        self._copy(check_key(source), check_key(target))

    def url(self, key: str, *, expires: float | datetime.timedelta = 3600) -> str:
        """A URL a browser can fetch the blob from, valid for ``expires`` (seconds or timedelta).

        S3 gives a presigned URL; the other stores give one only when built
        with ``base_url=``.

        Raises:
            UrlNotSupported: the store cannot serve URLs.
            ValueError: ``expires`` is not positive.
        """
        return self._url(check_key(key), _expires_seconds(expires))

    def ping(self) -> None:
        """Check that the storage is reachable and usable; return None or raise.

        Raises:
            BlobStoreUnavailable: the storage does not answer or refuses writes.
            BlobError: it answers but is misconfigured (e.g. the bucket is missing).
        """
        self._ping()

    def sweep_orphans(
        self,
        referenced: Callable[[Sequence[str]], Iterable[str]],
        *,
        prefix: str = "",
        older_than: datetime.timedelta = datetime.timedelta(hours=1),
        batch_size: int = 500,
        dry_run: bool = False,
    ) -> builtins.list[str]:
        """Delete blobs under ``prefix`` that nothing references any more.

        The reconcile job for the one gap the unit of work cannot close: a
        process that dies after the SQL commit but before its blob cleanup
        (or mid-context, before rollback compensation) leaves blobs no row
        points at. Run this periodically (a cron job, a Celery beat task).

        Args:
            referenced: called with batches of keys; returns those still in use
                (e.g. ``SELECT key FROM attachments WHERE key IN (...)``).
            prefix: only consider keys under this prefix.
            older_than: grace period: a blob modified more recently is never
                deleted, so the upload of a context that has not committed yet
                is safe. Make it longer than your longest unit of work.
            batch_size: how many keys each ``referenced`` call gets.
            dry_run: report what would be deleted without deleting.

        Returns:
            The deleted keys (or those that would be, with ``dry_run``),
            including leftover undo copies under ``.polydatum/undo/``.
        """
        if batch_size < 1:
            msg = f"batch_size must be at least 1, got {batch_size!r}"
            raise ValueError(msg)
        cutoff = _now() - older_than
        removed: builtins.list[str] = []
        batch: builtins.list[str] = []
        keys = self.list(prefix)
        while True:
            batch = builtins.list(itertools.islice(keys, batch_size))
            if not batch:
                break
            in_use = set(referenced(batch))
            for key in batch:
                if key in in_use:
                    continue
                try:
                    modified = self._stat(key).modified
                except BlobNotFound:
                    continue
                if modified < cutoff:
                    if not dry_run:
                        self._delete(key)
                    removed.append(key)
        removed.extend(self._sweep_internal(cutoff, dry_run))
        return removed

    def install(self, dm: _Registry, name: str = "blobs", *, transactional: bool = True) -> None:
        """Register this store as the resource ``name`` of a DataManager.

        Inside a context, ``ctx.<name>`` is a :class:`TransactionalBlobStore`:
        blobs written in a context that fails are removed (or restored, for an
        overwrite), and deletes happen only once the context committed. With
        ``transactional=False`` it is this store itself, with no such help.

        Args:
            dm: the :class:`~polydatum.dal.DataManager`.
            name: the resource name services use: ``self._ctx.blobs``.
            transactional: wrap the store in a unit of work per context.
        """
        store = self

        if transactional:

            def blob_resource(ctx: Any) -> Iterator[BlobStore]:
                view = TransactionalBlobStore(store, ctx, name=name)
                try:
                    yield view
                finally:
                    view.close()

        else:

            def blob_resource(ctx: Any) -> Iterator[BlobStore]:
                yield store

        blob_resource.__qualname__ = f"{type(self).__name__}.install.<{name}>"
        dm.register_resources(**{name: blob_resource})

    # -- primitives ------------------------------------------------------------

    @abc.abstractmethod
    def _put(self, key: str, body: bytes | IO[bytes], content_type: str,
             metadata: dict[str, str]) -> int:
        """Store ``body`` (bytes or a binary stream) atomically; return the byte count."""

    @abc.abstractmethod
    def _open(self, key: str) -> BinaryIO:
        """Open for reading; raise :class:`BlobNotFound` when missing."""

    @abc.abstractmethod
    def _stat(self, key: str) -> BlobInfo:
        """Describe the blob; raise :class:`BlobNotFound` when missing."""

    @abc.abstractmethod
    def _delete(self, key: str) -> bool:
        """Delete; False when there was nothing."""

    @abc.abstractmethod
    def _list(self, prefix: str, after: str | None, page_size: int) -> Iterator[str]:
        """Yield all keys (reserved ones included) under ``prefix`` and after ``after``, sorted."""

    @abc.abstractmethod
    def _copy(self, source: str, target: str) -> None:
        """Copy with content type and metadata; :class:`BlobNotFound` when missing."""

    def _get(self, key: str) -> bytes:
        with self._open(key) as stream:
            return stream.read()

    def _exists(self, key: str) -> bool:
        try:
            self._stat(key)
        except BlobNotFound:
            return False
        return True

    def _download(self, key: str, target: IO[bytes]) -> int:
        with self._open(key) as stream:
            return _copy_stream(stream, target)

    def _snapshot(self, source: str, target: str) -> None:
        """Copy for the unit of work's undo area; stores may do it more cheaply."""
        self._copy(source, target)

    def _discard(self, key: str) -> None:
        """Delete without telling whether there was anything (S3: no HEAD first)."""
        self._delete(key)

    def _url(self, key: str, expires: int) -> str:
        msg = (
            f"{type(self).__name__} cannot serve URLs for {key!r}; build it with "
            "base_url=... when a web server serves its files, or stream the blob "
            "through your application with open()"
        )
        raise UrlNotSupported(msg, key=key)

    def _ping(self) -> None:
        return None

    def _sweep_internal(self, cutoff: datetime.datetime, dry_run: bool) -> builtins.list[str]:
        """Remove undo copies left behind by units of work older than ``cutoff``."""
        removed = []
        for key in builtins.list(self._list(UNDO_PREFIX, None, 1000)):
            stamp = key[len(UNDO_PREFIX):].split("-", 1)[0]
            try:
                created = datetime.datetime.fromtimestamp(int(stamp) / 1e9, datetime.timezone.utc)
            except ValueError:
                continue
            if created < cutoff:
                if not dry_run:
                    self._delete(key)
                removed.append(key)
        return removed

    def _missing(self, key: str, where: str) -> BlobNotFound:
        msg = f"no blob {key!r} in {where}"
        return BlobNotFound(msg, key=key)


# -- the unit of work --------------------------------------------------------


class TransactionalBlobStore(BlobStore):
    """The store as a context sees it: writes undone on rollback, deletes done on commit.

    Built by :meth:`BlobStore.install`, one per context, on first use of
    ``ctx.<name>``. The guarantee, with ``ctx`` the context:

    - ``put``/``copy`` write at once (so the blob is there before your SQL
      commit). If ``ctx`` ends with an exception, keys that did not exist
      before are deleted and overwritten keys get their previous content
      back (a copy is taken under ``.polydatum/undo/`` before the first
      overwrite in the context, and dropped on commit).
    - ``delete`` only marks the key: inside ``ctx`` it already reads as gone,
      and it is deleted after ``ctx`` committed. On rollback it stays.
      Deleting a blob this context created removes it at once.
    - Cleanup runs in ``ctx.on_commit``/``ctx.on_rollback`` hooks, i.e. after
      the transaction middleware committed or rolled back SQL. Failures are
      logged (logger ``polydatum.blob``) and reported to the context's hook
      errors; they never undo a commit.

    What it cannot guarantee: if the process dies after the SQL commit and
    before the hooks ran (or in the middle of a context), blobs stay behind
    that no row references (orphans, plus undo copies). They are harmless
    and :meth:`BlobStore.sweep_orphans` removes them. Two contexts writing
    the same key at once race like any last-writer-wins store; give new
    content new keys (e.g. with a UUID) when that matters.

    Attributes:
        store: the underlying store, for writes that must bypass the unit of work.

    .. versionadded:: 2.0
    """

    def __init__(self, store: BlobStore, ctx: Any, *, name: str = "blobs") -> None:
        self.store = store
        self.name = name
        self._ctx = ctx
        self._undo: dict[str, str | None] = {}  # key -> undo copy, None: did not exist
        self._doomed: dict[str, None] = {}  # pending deletes, in order
        self._hooked = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<TransactionalBlobStore {self.name!r} over {self.store!r}>"

    def close(self) -> None:
        """Refuse further use: the context this view belongs to has ended."""
        self._closed = True

    def install(self, dm: _Registry, name: str = "blobs", *, transactional: bool = True) -> None:
        """Not available here: install the underlying store instead."""
        msg = "install the store itself (store.install(dm)), not the view a context gives you"
        raise TypeError(msg)

    def _live(self) -> BlobStore:
        if self._closed:
            msg = (
                f"the blob store {self.name!r} belongs to a context that has ended; "
                f"use ctx.{self.name} inside an active context"
            )
            raise ContextStateError(msg)
        return self.store

    def _hook(self) -> None:
        if not self._hooked:
            self._ctx.on_commit(self._on_commit)
            self._ctx.on_rollback(self._on_rollback)
            self._hooked = True

    def _before_write(self, store: BlobStore, key: str) -> None:
        if key in self._undo:
            return
        self._hook()
        if store._exists(key):
            undo = f"{UNDO_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex}"
            store._snapshot(key, undo)
            self._undo[key] = undo
        else:
            self._undo[key] = None

    def _put(self, key: str, body: bytes | IO[bytes], content_type: str,
             metadata: dict[str, str]) -> int:
        store = self._live()
        self._before_write(store, key)
        self._doomed.pop(key, None)
        return store._put(key, body, content_type, metadata)

    def _copy(self, source: str, target: str) -> None:
        store = self._live()
        if source in self._doomed:
            raise self._missing(source, f"{self.name} (deleted in this context)")
        self._before_write(store, target)
        store._copy(source, target)
        self._doomed.pop(target, None)

    def _delete(self, key: str) -> bool:
        store = self._live()
        if key in self._doomed or not store._exists(key):
            return False
        if key in self._undo and self._undo[key] is None:
            # Created in this context: nobody else can have seen it commit.
            store._discard(key)
            return True
        self._hook()
        self._doomed[key] = None
        return True

    def _visible(self, key: str) -> BlobStore:
        store = self._live()
        if key in self._doomed:
            raise self._missing(key, f"{self.name} (deleted in this context)")
        return store

    def _get(self, key: str) -> bytes:
        return self._visible(key)._get(key)

    def _open(self, key: str) -> BinaryIO:
        return self._visible(key)._open(key)

    def _download(self, key: str, target: IO[bytes]) -> int:
        return self._visible(key)._download(key, target)

    def _stat(self, key: str) -> BlobInfo:
        return self._visible(key)._stat(key)

    def _exists(self, key: str) -> bool:
        return key not in self._doomed and self._live()._exists(key)

    def _url(self, key: str, expires: int) -> str:
        return self._visible(key)._url(key, expires)

    def _list(self, prefix: str, after: str | None, page_size: int) -> Iterator[str]:
        return (k for k in self._live()._list(prefix, after, page_size) if k not in self._doomed)

    def _ping(self) -> None:
        self._live()._ping()

    def sweep_orphans(self, *args: Any, **kwargs: Any) -> builtins.list[str]:
        """Sweep the underlying store (see :meth:`BlobStore.sweep_orphans`)."""
        return self._live().sweep_orphans(*args, **kwargs)

    def _run(self, what: str, steps: Iterable[tuple[str, Callable[[], object]]]) -> None:
        failures: builtins.list[tuple[str, BaseException]] = []
        for key, step in steps:
            try:
                step()
            except Exception as exc:  # every step gets its chance
                failures.append((key, exc))
                logger.warning(
                    "blob %s of %r failed: %s", what, key, exc,
                    extra={"polydatum_resource": self.name},
                )
        if failures:
            keys = ", ".join(repr(k) for k, _ in failures)
            msg = (
                f"blob {what} failed for {len(failures)} key(s): {keys} "
                f"(first error: {failures[0][1]}); what is left behind is removed "
                "by BlobStore.sweep_orphans()"
            )
            raise BlobError(msg, key=failures[0][0]) from failures[0][1]

    def _on_commit(self) -> None:
        store = self.store
        steps = [(key, functools.partial(store._discard, key)) for key in self._doomed]
        steps += [
            (undo, functools.partial(store._discard, undo))
            for undo in self._undo.values() if undo is not None
        ]
        self._doomed.clear()
        self._undo.clear()
        self._run("cleanup after commit", steps)

    def _on_rollback(self) -> None:
        store = self.store

        def restore(key: str, undo: str | None) -> None:
            if undo is None:
                store._discard(key)
            else:
                store._snapshot(undo, key)
                store._discard(undo)

        steps = [
            (key, functools.partial(restore, key, undo))
            for key, undo in reversed(self._undo.items())
        ]
        self._doomed.clear()
        self._undo.clear()
        self._run("compensation after rollback", steps)


# -- memory ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _MemoryBlob:
    data: bytes
    content_type: str
    metadata: dict[str, str]
    etag: str
    modified: datetime.datetime


class MemoryBlobStore(BlobStore):
    """Blobs in a dict: for tests and examples. Thread-safe; gone with the process.

    Args:
        base_url: when given, :meth:`url` returns ``base_url + "/" + quoted key``.

    .. versionadded:: 2.0
    """

    def __init__(self, *, base_url: str | None = None) -> None:
        self.base_url = base_url
        self._blobs: dict[str, _MemoryBlob] = {}
        self._keys: builtins.list[str] = []  # sorted, for lazy ordered listing
        self._lock = threading.Lock()
        self._versions = itertools.count(1)

    def __repr__(self) -> str:
        return f"<MemoryBlobStore {len(self._blobs)} blobs>"

    def _put(self, key: str, body: bytes | IO[bytes], content_type: str,
             metadata: dict[str, str]) -> int:
        if isinstance(body, bytes):
            data = body
        else:
            # BytesIO hands its buffer over without a copy in getvalue().
            buffer = io.BytesIO()
            _copy_stream(body, buffer)
            data = buffer.getvalue()
            del buffer
        with self._lock:
            etag = f"{next(self._versions):016x}"
            blob = _MemoryBlob(data, content_type, dict(metadata), etag, _now())
            if key not in self._blobs:
                bisect.insort(self._keys, key)
            self._blobs[key] = blob
        return len(data)

    def _blob(self, key: str) -> _MemoryBlob:
        blob = self._blobs.get(key)
        if blob is None:
            raise self._missing(key, "the memory store")
        return blob

    def _get(self, key: str) -> bytes:
        return self._blob(key).data

    def _open(self, key: str) -> BinaryIO:
        return io.BytesIO(self._blob(key).data)  # shares the bytes until written to

    def _stat(self, key: str) -> BlobInfo:
        blob = self._blob(key)
        return BlobInfo(key, len(blob.data), blob.content_type, blob.etag, blob.modified,
                        dict(blob.metadata))

    def _exists(self, key: str) -> bool:
        return key in self._blobs

    def _delete(self, key: str) -> bool:
        with self._lock:
            if self._blobs.pop(key, None) is None:
                return False
            del self._keys[bisect.bisect_left(self._keys, key)]
            return True

    def _list(self, prefix: str, after: str | None, page_size: int) -> Iterator[str]:
        while True:
            # Re-find the position on every page: the store may change meanwhile.
            with self._lock:
                if after is not None and after >= prefix:
                    index = bisect.bisect_right(self._keys, after)
                else:
                    index = bisect.bisect_left(self._keys, prefix)
                page = self._keys[index:index + page_size]
            for key in page:
                if not key.startswith(prefix):
                    return
                yield key
            if len(page) < page_size:
                return
            after = page[-1]

    def _copy(self, source: str, target: str) -> None:
        blob = self._blob(source)
        self._put(target, blob.data, blob.content_type, dict(blob.metadata))

    def _url(self, key: str, expires: int) -> str:
        if self.base_url is None:
            return super()._url(key, expires)
        return _join_url(self.base_url, key)


def _join_url(base_url: str, key: str) -> str:
    return base_url.rstrip("/") + "/" + urllib.parse.quote(key)


# -- the filesystem ----------------------------------------------------------

_INTERNAL = ".polydatum"
_MAX_SEGMENT_BYTES = 250  # NAME_MAX is 255; the metadata file adds ".json"


class FileSystemBlobStore(BlobStore):
    """Blobs as files under ``root``: the embedded default.

    ``put("notes/1/a.png", ...)`` writes ``<root>/notes/1/a.png``. Writes go to
    a temporary file under ``<root>/.polydatum/tmp``, are flushed to disk
    (``fsync``) and moved into place with ``os.replace``, so readers see the
    old blob or the new one and concurrent writers of one key never tear it:
    the last complete write wins. Content type and metadata live in
    ``<root>/.polydatum/meta/<key>.json`` when they differ from the defaults;
    a per-root lock (``fcntl.flock`` where available) swaps blob and metadata
    together, across threads and processes.

    A key is refused (:class:`InvalidKey`) unless it stays inside ``root``
    (see :func:`check_key`; each segment is also limited to 250 bytes).
    Symbolic links placed inside ``root`` by someone else are followed.

    Unlike S3, a key cannot be both a blob and a "folder" of other blobs:
    with ``a/b`` stored, ``put("a", ...)`` raises :class:`BlobError`, and
    vice versa.

    Args:
        root: the directory; created (with parents) on first write or ping.
        fsync: flush file data and directory entries to disk on every write.
            Turn off only for throwaway data: a power cut may then lose
            recent writes (still never tear them).
        base_url: when a web server serves ``root``, :meth:`url` returns
            ``base_url + "/" + quoted key`` (no expiry).

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        base_url: str | None = None,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync
        self.base_url = base_url
        self._internal = os.path.join(self.root, _INTERNAL)
        self._tmp = os.path.join(self._internal, "tmp")
        self._meta = os.path.join(self._internal, "meta")
        self._lockfile = os.path.join(self._internal, "lock")
        self._thread_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<FileSystemBlobStore {self.root!r}>"

    # -- paths and locking -----------------------------------------------------

    def _path(self, key: str, base: str | None = None) -> str:
        segments = key.split("/")
        for segment in segments:
            if len(segment.encode("utf-8")) > _MAX_SEGMENT_BYTES:
                msg = (
                    f"invalid blob key {key!r}: the segment {segment[:20]!r}... is longer than "
                    f"{_MAX_SEGMENT_BYTES} bytes, which filesystems do not allow"
                )
                raise InvalidKey(msg, key=key)
        base = self.root if base is None else base
        path = os.path.join(base, *segments)
        # check_key already refused every escape; this guards against a future
        # change to it, at the cost of one string comparison.
        if not os.path.normpath(path).startswith(base + os.sep):
            msg = f"invalid blob key {key!r}: it resolves outside the store's root"
            raise InvalidKey(msg, key=key)
        return path

    def _meta_path(self, key: str) -> str:
        return self._path(key, self._meta) + ".json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover - Windows: one process per root
            with self._thread_lock:
                yield
            return
        # A descriptor per call: flock excludes other descriptors, so this
        # serialises threads of this process and other processes alike.
        try:
            fd = os.open(self._lockfile, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:
            os.makedirs(self._internal, exist_ok=True)
            fd = os.open(self._lockfile, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _fsync_dir(self, path: str) -> None:
        if not self.fsync or not hasattr(os, "O_DIRECTORY"):
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _tempfile(self) -> tuple[str, IO[bytes]]:
        path = os.path.join(self._tmp, f"{uuid.uuid4().hex}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(path, flags, 0o666)
        except FileNotFoundError:
            os.makedirs(self._tmp, exist_ok=True)
            fd = os.open(path, flags, 0o666)
        return path, os.fdopen(fd, "wb")

    def _write_temp(self, key: str, body: bytes | IO[bytes]) -> tuple[str, int]:
        """Write ``body`` to a new temporary file; errors of ``body`` itself propagate as is."""
        try:
            path, handle = self._tempfile()
        except OSError as exc:
            raise self._unavailable("write", key, exc) from exc
        try:
            with handle:
                size = 0
                for chunk in _chunks(body):
                    try:
                        handle.write(chunk)
                    except OSError as exc:
                        raise self._unavailable("write", key, exc) from exc
                    size += len(chunk)
                try:
                    handle.flush()
                    if self.fsync:
                        os.fsync(handle.fileno())
                except OSError as exc:
                    raise self._unavailable("write", key, exc) from exc
        except BaseException:
            _unlink(path)
            raise
        return path, size

    def _unavailable(self, what: str, key: str, exc: OSError) -> BlobError:
        msg = f"could not {what} blob {key!r} under {self.root!r}: {exc.strerror or exc}"
        return BlobStoreUnavailable(msg, key=key)

    # -- primitives --------------------------------------------------------------

    def _put(self, key: str, body: bytes | IO[bytes], content_type: str,
             metadata: dict[str, str]) -> int:
        path = self._path(key)
        meta_path = self._meta_path(key)
        tmp, size = self._write_temp(key, body)
        meta_tmp = None
        try:
            if metadata or content_type != _guess_type(key):
                document = {"content_type": content_type, "metadata": metadata}
                meta_tmp, _ = self._write_temp(key, json.dumps(document).encode())
            self._install(key, path, tmp, meta_path, meta_tmp)
        except BaseException:
            _unlink(tmp)
            if meta_tmp is not None:
                _unlink(meta_tmp)
            raise
        return size

    def _install(self, key: str, path: str, tmp: str, meta_path: str,
                 meta_tmp: str | None) -> None:
        """Move a written temp file (and its metadata) into place, atomically each."""
        directory = os.path.dirname(path)
        with self._locked():
            try:
                try:
                    os.replace(tmp, path)
                except FileNotFoundError:
                    # The folder does not exist yet (trying first saves a mkdir per put).
                    os.makedirs(directory, exist_ok=True)
                    os.replace(tmp, path)
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                msg = (
                    f"cannot store blob {key!r} under {self.root!r}: part of the key is "
                    "already a blob, or the key is a folder of other blobs; the filesystem "
                    "cannot hold both 'a' and 'a/b' (S3 can), so choose another key"
                )
                raise BlobError(msg, key=key) from exc
            except OSError as exc:
                raise self._unavailable("write", key, exc) from exc
            try:
                if meta_tmp is not None:
                    os.makedirs(os.path.dirname(meta_path), exist_ok=True)
                    os.replace(meta_tmp, meta_path)
                else:
                    _unlink(meta_path)
            except OSError as exc:
                msg = (
                    f"could not write metadata of blob {key!r} under {self.root!r}: "
                    f"{exc.strerror or exc}; its content was replaced but its content type "
                    "and metadata were not: put it again once the disk is writable"
                )
                raise BlobStoreUnavailable(msg, key=key) from exc
        self._fsync_dir(directory)

    def _get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as handle:
                return handle.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(key, repr(self.root)) from None
        except OSError as exc:
            raise self._unavailable("read", key, exc) from exc

    def _open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")  # the caller closes it
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(key, repr(self.root)) from None
        except OSError as exc:
            raise self._unavailable("open", key, exc) from exc

    def _stat(self, key: str) -> BlobInfo:
        path = self._path(key)
        with self._locked():
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                raise self._missing(key, repr(self.root)) from None
            except OSError as exc:
                raise self._unavailable("stat", key, exc) from exc
            if not os.path.isfile(path):
                raise self._missing(key, repr(self.root))
            try:
                with open(self._meta_path(key), "rb") as handle:
                    document = json.load(handle)
            except (FileNotFoundError, NotADirectoryError):
                document = {}
        modified = datetime.datetime.fromtimestamp(st.st_mtime_ns / 1e9, datetime.timezone.utc)
        return BlobInfo(
            key=key,
            size=st.st_size,
            content_type=document.get("content_type") or _guess_type(key),
            etag=f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}",
            modified=modified,
            metadata=dict(document.get("metadata") or {}),
        )

    def _exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def _delete(self, key: str) -> bool:
        path = self._path(key)
        meta_path = self._meta_path(key)
        with self._locked():
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return False
            except OSError as exc:
                raise self._unavailable("delete", key, exc) from exc
            _unlink(meta_path)
            # Empty folders would otherwise pile up, and block a later put of
            # a blob with the folder's name.
            _prune(os.path.dirname(path), self.root)
            _prune(os.path.dirname(meta_path), self._meta)
        parent = os.path.dirname(path)
        self._fsync_dir(parent if os.path.isdir(parent) else self.root)
        return True

    def _list(self, prefix: str, after: str | None, page_size: int) -> Iterator[str]:
        if prefix.startswith(RESERVED_PREFIX):
            return self._walk(self._internal, RESERVED_PREFIX, prefix, after, internal=True)
        return self._walk(self.root, "", prefix, after, internal=False)

    def _walk(self, directory: str, base: str, prefix: str, after: str | None,
              *, internal: bool) -> Iterator[str]:
        try:
            with os.scandir(directory) as scan:
                entries = builtins.list(scan)
        except (FileNotFoundError, NotADirectoryError):
            return
        # Sorting folders as "name/" makes a depth-first walk yield keys in
        # exactly the order S3 lists them.
        items: builtins.list[tuple[str, bool]] = []
        for entry in entries:
            if not base and entry.name == _INTERNAL:
                continue
            key = base + entry.name
            if entry.is_dir():
                folder = key + "/"
                if not (folder.startswith(prefix) or prefix.startswith(folder)):
                    continue
                if after is not None and after >= folder and not after.startswith(folder):
                    continue
                items.append((folder, True))
            elif key.startswith(prefix) and (after is None or key > after):
                items.append((key, False))
        items.sort()
        for key, is_folder in items:
            if is_folder:
                yield from self._walk(os.path.join(directory, key[len(base):-1]), key,
                                      prefix, after, internal=internal)
            elif not internal or key.startswith(UNDO_PREFIX):
                yield key

    def _copy(self, source: str, target: str) -> None:
        self._clone(source, target, link=False)

    def _snapshot(self, source: str, target: str) -> None:
        # Undo copies and restores are never modified in place, and every write
        # replaces the file, so a hard link is a safe O(1) copy.
        self._clone(source, target, link=True)

    def _clone(self, source: str, target: str, *, link: bool) -> None:
        # Undo keys (".polydatum/undo/...") map into <root>/.polydatum like any key.
        src = self._path(source)
        dst = self._path(target)
        src_meta = self._meta_path(source)
        dst_meta = self._meta_path(target)
        tmp = os.path.join(self._tmp, f"{uuid.uuid4().hex}.tmp")
        os.makedirs(self._tmp, exist_ok=True)
        try:
            if link:
                try:
                    os.link(src, tmp)
                except (FileNotFoundError, NotADirectoryError):
                    raise
                except OSError:
                    link = False
            if not link:
                shutil.copyfile(src, tmp)
                if self.fsync:
                    with open(tmp, "rb+") as handle:
                        os.fsync(handle.fileno())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            _unlink(tmp)
            raise self._missing(source, repr(self.root)) from None
        except OSError as exc:
            _unlink(tmp)
            raise self._unavailable("copy", source, exc) from exc
        meta_tmp = None
        try:
            with open(src_meta, "rb") as handle:
                meta_tmp, _ = self._write_temp(target, handle.read())
        except (FileNotFoundError, NotADirectoryError):
            pass
        try:
            self._install(target, dst, tmp, dst_meta, meta_tmp)
        except BaseException:
            _unlink(tmp)
            if meta_tmp is not None:
                _unlink(meta_tmp)
            raise

    def _url(self, key: str, expires: int) -> str:
        if self.base_url is None:
            return super()._url(key, expires)
        return _join_url(self.base_url, key)

    def _ping(self) -> None:
        try:
            os.makedirs(self._tmp, exist_ok=True)
        except OSError as exc:
            msg = f"blob root {self.root!r} cannot be created: {exc.strerror or exc}"
            raise BlobStoreUnavailable(msg) from exc
        if not os.access(self.root, os.W_OK) or not os.access(self._tmp, os.W_OK):
            msg = f"blob root {self.root!r} is not writable by this process"
            raise BlobStoreUnavailable(msg)

    def _sweep_internal(self, cutoff: datetime.datetime, dry_run: bool) -> builtins.list[str]:
        removed = super()._sweep_internal(cutoff, dry_run)
        # Temporary files of writers that died before os.replace.
        try:
            with os.scandir(self._tmp) as scan:
                stale = [e for e in scan if e.stat().st_mtime < cutoff.timestamp()]
        except FileNotFoundError:
            return removed
        for entry in stale:
            if not dry_run:
                _unlink(entry.path)
            removed.append(f"{RESERVED_PREFIX}tmp/{entry.name}")
        return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):
        pass


def _prune(directory: str, stop: str) -> None:
    """Remove empty folders from ``directory`` up to (not including) ``stop``."""
    while directory.startswith(stop + os.sep):
        try:
            os.rmdir(directory)
        except OSError:
            return
        directory = os.path.dirname(directory)


# -- configuration -----------------------------------------------------------


def from_url(url: str, **options: Any) -> BlobStore:
    """Build a store from a URL, so one setting (e.g. ``BLOB_URL``) picks the backend.

    ============================== ==========================================
    URL                            store
    ============================== ==========================================
    ``file:///var/lib/app/blobs``  ``FileSystemBlobStore("/var/lib/app/blobs")``
    ``/var/lib/app/blobs``         the same (a plain path; relative paths too)
    ``s3://bucket/uploads``        ``S3BlobStore("bucket", prefix="uploads")``
    ``memory://``                  ``MemoryBlobStore()``
    ============================== ==========================================

    Percent-escapes in paths are decoded. ``S3BlobStore`` needs boto3
    (``pip install "polydatum[s3]"``); it is imported only for ``s3://``.

    Args:
        url: where the blobs live.
        **options: passed to the store's constructor, e.g. ``fsync=False``,
            or ``endpoint_url=...``, ``region_name=...`` for S3.

    Raises:
        ValueError: an unsupported scheme, an ``s3://`` URL without a bucket,
            a ``file://`` URL naming another host, or a query string (pass
            options as keyword arguments instead).
        TypeError: ``url`` is not a str, or an option the store does not take.

    .. versionadded:: 2.0
    """
    if not isinstance(url, str):
        msg = f"a blob store URL is a str such as 's3://bucket/prefix', got {url!r}"
        raise TypeError(msg)
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        msg = (
            f"blob store URL {url!r} has a query or fragment; pass options as keyword "
            "arguments instead: from_url(url, endpoint_url=..., fsync=False)"
        )
        raise ValueError(msg)
    if scheme == "s3":
        if not parts.netloc:
            msg = f"blob store URL {url!r} names no bucket; use s3://bucket or s3://bucket/prefix"
            raise ValueError(msg)
        from polydatum.s3 import S3BlobStore

        return S3BlobStore(parts.netloc, prefix=urllib.parse.unquote(parts.path).strip("/"),
                           **options)
    if scheme == "memory":
        if parts.netloc or parts.path.strip("/"):
            msg = f"blob store URL {url!r}: a memory store has no location; use 'memory://'"
            raise ValueError(msg)
        return MemoryBlobStore(**options)
    if scheme == "file" or (not scheme and parts.path):
        if parts.netloc not in ("", "localhost"):
            msg = (
                f"blob store URL {url!r} names the host {parts.netloc!r}; file URLs are local: "
                "file:///absolute/path (three slashes)"
            )
            raise ValueError(msg)
        path = urllib.parse.unquote(parts.path) if scheme else url
        if not path:
            msg = f"blob store URL {url!r} has no path; use file:///absolute/path"
            raise ValueError(msg)
        return FileSystemBlobStore(path, **options)
    msg = (
        f"unsupported blob store URL {url!r}; use file:///absolute/path, a plain path, "
        "s3://bucket/prefix or memory://"
    )
    raise ValueError(msg)

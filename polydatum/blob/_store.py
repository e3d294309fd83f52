"""The :class:`BlobStore` interface and :class:`BlobInfo`."""

from __future__ import annotations

import abc
import builtins
import dataclasses
import datetime
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from polydatum import _telemetry
from polydatum.blob._errors import BlobError, BlobNotFound, UrlNotSupported
from polydatum.blob._keys import (
    UNDO_PREFIX,
    WRITE_MARK,
    check_key,
    check_metadata,
    check_prefix,
    expires_seconds,
    is_reserved,
    resolve_content_type,
)
from polydatum.blob._streams import BlobData, as_body, copy_stream

if TYPE_CHECKING:
    from typing_extensions import Self

    from polydatum.types import ResourceRegistry


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


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


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
        resolved = resolve_content_type(key, content_type)
        clean = check_metadata(metadata)
        size = self._put(key, as_body(data), resolved, clean)
        if _telemetry.sink is not None:
            _telemetry.sink.blob_bytes("in", size)
        return size

    def get(self, key: str) -> bytes:
        """Return the whole blob as bytes; use :meth:`open` for large blobs.

        Raises:
            BlobNotFound: nothing is stored under ``key``.
        """
        data = self._get(check_key(key))
        if _telemetry.sink is not None:
            _telemetry.sink.blob_bytes("out", len(data))
        return data

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
        size = self._download(check_key(key), target)
        if _telemetry.sink is not None:
            _telemetry.sink.blob_bytes("out", size)
        return size

    def stat(self, key: str) -> BlobInfo:
        """Return size, content type, etag, modified time and metadata.

        Raises:
            BlobNotFound: nothing is stored under ``key``.
        """
        info = self._stat(check_key(key))
        if WRITE_MARK in info.metadata:  # the unit of work's own mark (see TransactionalBlobStore)
            kept = {name: value for name, value in info.metadata.items() if name != WRITE_MARK}
            info = dataclasses.replace(info, metadata=kept)
        return info

    def exists(self, key: str) -> bool:
        """True when a blob is stored under ``key``."""
        return self._exists(check_key(key))

    def delete(self, key: str) -> bool:
        """Delete the blob; True if there was one, False if there was nothing to delete."""
        return self._delete(check_key(key))

    def list(self, prefix: str = "", after: str | None = None, limit: int | None = None) -> Iterator[str]:
        """Yield keys starting with ``prefix`` in ascending (code point) order, lazily.

        Pages are fetched as the iterator is consumed, so listing a huge
        store costs nothing until you read it. Resume a listing by passing
        the last key you saw as ``after``.

        Args:
            prefix: only keys starting with this string (not necessarily at a ``/``).
            after: only keys strictly greater than this one.
            limit: stop after this many keys.
        """
        prefix = check_prefix(prefix)
        if after is not None:
            if not isinstance(after, str):
                msg = f"after must be a key (str) or None, got {after!r}"
                raise TypeError(msg)
            # A client's cursor: the same rules as a prefix, so every store reads it alike.
            check_prefix(after)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            msg = f"limit must be a non-negative int or None, got {limit!r}"
            raise ValueError(msg)
        page_size = 1000 if limit is None else max(1, min(1000, limit))
        # Objects another store (or tool) keeps under a '.polydatum' segment
        # are not blobs of this one, and must never reach sweep_orphans.
        keys = (k for k in self._list(prefix, after or None, page_size) if not is_reserved(k))
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
            ValueError: ``expires`` is not a finite number of seconds of at least 1
                (NaN, infinity, zero, negative, a bool or not a number at all),
                or, on S3, more than 7 days.
        """
        return self._url(check_key(key), expires_seconds(expires))

    def ping(self) -> bool:
        """Whether the storage is reachable and usable now, for health checks; never raises for an outage.

        Returns:
            True when it is; False when it does not answer, refuses writes or
            is misconfigured (a missing bucket). :meth:`check` says which.

        .. versionchanged:: 2.0
           Returns a bool; the raising form is :meth:`check`.
        """
        try:
            self._ping()
        except BlobError:
            return False
        return True

    def check(self) -> None:
        """Check that the storage is reachable and usable; return None or raise saying why.

        Raises:
            BlobStoreUnavailable: the storage does not answer or refuses writes.
            BlobError: it answers but is misconfigured (e.g. the bucket is missing).

        .. versionadded:: 2.0
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
        cutoff = utc_now() - older_than
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

    def install(
        self,
        dm: ResourceRegistry,
        *,
        name: str = "blobs",
        transactional: bool = True,
        outbox: Any = None,
        orphan_after: float = 900.0,
    ) -> Self:
        """Register this store as the resource ``name`` of a DataManager; return the store.

        Inside a context, ``ctx.<name>`` is a :class:`TransactionalBlobStore`:
        blobs written in a context that fails are removed (or restored, for an
        overwrite), and deletes happen only once the context committed. With
        ``transactional=False`` it is this store itself, with no such help.

        Every store installs the same way, a context's view included: its
        view then nests a unit of work inside the outer context's.

        Args:
            dm: the :class:`~polydatum.dal.DataManager` (any
                :class:`~polydatum.types.ResourceRegistry`).
            name: the resource name services use: ``self._ctx.blobs``.
            transactional: wrap the store in a unit of work per context.
            outbox: a :class:`polydatum.outbox.Outbox` installed on ``dm``:
                deletes that wait for the commit (and the removal of undo
                copies) become outbox rows of the context's transaction, so a
                store that is down or a process that dies does not lose them;
                and each first write of a key in a context is preceded by a
                cleanup row committed on its own and cancelled by the
                context's commit, so the writes of a context that rolled back
                or died are undone (by a relay, after ``orphan_after``
                seconds) even when the rollback hook could not. On SQLite the
                cleanup row is written only before the context's first SQL
                statement (SQLite has one write lock, which the context then holds).
            orphan_after: seconds before a relay undoes the writes of a context
                that did not commit; longer than any context runs.

        Returns:
            this store, so ``blobs = FileSystemBlobStore(root).install(dm)`` works.

        Raises:
            TypeError: ``outbox`` is not a :class:`polydatum.outbox.Outbox`.
            ValueError: ``outbox`` without ``transactional``, or ``orphan_after``
                not a number of seconds > 0.
        """
        # Imported here: that module builds on this one (a view is a BlobStore).
        from polydatum.blob._transactional import blob_resource

        dm.register_resources(
            **{
                name: blob_resource(
                    self, name, transactional=transactional, outbox=outbox, orphan_after=orphan_after
                )
            }
        )
        return self

    # -- primitives ------------------------------------------------------------

    @abc.abstractmethod
    def _put(self, key: str, body: bytes | IO[bytes], content_type: str, metadata: dict[str, str]) -> int:
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
            return copy_stream(stream, target)

    def _snapshot(self, source: str, target: str) -> None:
        """Copy for the unit of work's undo area; stores may do it more cheaply."""
        self._copy(source, target)

    def _discard(self, key: str) -> None:
        """Delete without telling whether there was anything (S3: no HEAD first)."""
        self._delete(key)

    def _discard_if(self, key: str, etag: str) -> None:
        """Delete ``key`` only while it holds the blob whose etag is ``etag``; nothing if gone or changed.

        Stores do it in one step where they can (S3: a conditional DeleteObject).
        """
        try:
            current = self._stat(key)
        except BlobNotFound:
            return
        if current.etag == etag:
            self._discard(key)

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
            stamp = key[len(UNDO_PREFIX) :].split("-", 1)[0]
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

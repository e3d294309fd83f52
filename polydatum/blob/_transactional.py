"""The unit of work: the view of a store a context gets from ``ctx.<name>``."""

from __future__ import annotations

import builtins
import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, BinaryIO

from polydatum.blob._errors import BlobError, BlobNotFound, InvalidMetadata
from polydatum.blob._keys import MAX_METADATA_BYTES, UNDO_PREFIX, WRITE_MARK
from polydatum.blob._store import BlobInfo, BlobStore
from polydatum.errors import ContextStateError

logger = logging.getLogger("polydatum.blob")


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

    def __init__(
        self,
        store: BlobStore,
        ctx: Any,
        *,
        name: str = "blobs",
        outbox: Any = None,
        orphan_after: float = 900.0,
    ) -> None:
        self.store = store
        self.name = name
        self._ctx = ctx
        self._undo: dict[str, str | None] = {}  # key -> undo copy, None: did not exist
        self._doomed: dict[str, None] = {}  # pending deletes, in order
        self._hooked = False
        self._closed = False
        self._outbox = outbox
        self._orphan_after = orphan_after
        self._cleanups: list[int] = []  # outbox rows that undo this context's writes if it fails
        self._marks: dict[str, str] = {}  # key -> the mark its writes carry (with an outbox)

    def __repr__(self) -> str:
        return f"<TransactionalBlobStore {self.name!r} over {self.store!r}>"

    def close(self) -> None:
        """Refuse further use: the context this view belongs to has ended."""
        self._closed = True

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

    def _before_write(self, store: BlobStore, key: str, *, marked: bool = True) -> None:
        if key in self._undo:
            return
        self._hook()
        undo = None
        if store._exists(key):
            undo = f"{UNDO_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex}"
        outbox = self._outbox
        if outbox is not None and outbox.can_write_detached(self._ctx):
            # Committed before the write: if this context never commits
            # (rollback, crash), a relay undoes the write after orphan_after,
            # but only while the key still holds this write (its mark): a later
            # context's committed write of the same key is left alone.
            payload: dict[str, Any] = {"restore": key, "undo": undo}
            if marked:
                payload["write"] = self._marks[key] = uuid.uuid4().hex
            # A copy keeps its source's metadata, so it cannot carry a mark: its
            # row undoes it unconditionally, as rows did before marks.
            row = outbox.add_detached(blob_topic(self.name), payload, delay=self._orphan_after)
            self._cleanups.append(row)
            outbox.cancel(self._ctx, row)  # gone with this context's commit
        if undo is not None:
            store._snapshot(key, undo)
            if outbox is not None:
                outbox.add(self._ctx, blob_topic(self.name), {"discard": [undo]})
        self._undo[key] = undo

    def _put(self, key: str, body: bytes | IO[bytes], content_type: str, metadata: dict[str, str]) -> int:
        store = self._live()
        self._before_write(store, key)
        self._doomed.pop(key, None)
        mark = self._marks.get(key)
        if mark is not None:
            metadata = {**metadata, WRITE_MARK: mark}
            if sum(len(k) + len(v) for k, v in metadata.items()) > MAX_METADATA_BYTES:
                msg = (
                    f"metadata is over {MAX_METADATA_BYTES - len(WRITE_MARK) - len(mark)} bytes; with "
                    f"outbox= the unit of work keeps {len(WRITE_MARK) + len(mark)} of S3's "
                    f"{MAX_METADATA_BYTES} for its own mark"
                )
                raise InvalidMetadata(msg)
        return store._put(key, body, content_type, metadata)

    def _copy(self, source: str, target: str) -> None:
        store = self._live()
        if source in self._doomed:
            raise self._missing(source, f"{self.name} (deleted in this context)")
        self._before_write(store, target, marked=False)
        store._copy(source, target)
        self._doomed.pop(target, None)

    def _delete(self, key: str) -> bool:
        store = self._live()
        if key in self._doomed:
            return False
        outbox = self._outbox
        info = None
        if outbox is None:
            if not store._exists(key):
                return False
        else:
            # The same one request as exists(), keeping what identifies this very blob.
            try:
                info = store._stat(key)
            except BlobNotFound:
                return False
        if key in self._undo and self._undo[key] is None:
            # Created in this context: nobody else can have seen it commit.
            store._discard(key)
            return True
        self._hook()
        self._doomed[key] = None
        if outbox is not None and info is not None:
            # Delivered later (maybe much later, if the store is down): only while
            # the key still holds the blob deleted here, not a newer committed one.
            outbox.add(self._ctx, blob_topic(self.name), {"delete": key, "etag": info.etag})
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
                    "blob %s of %r failed: %s",
                    what,
                    key,
                    exc,
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
        if self._outbox is not None:  # its rows delete what waited for the commit
            self._doomed.clear()
            self._undo.clear()
            self._cleanups.clear()
            return
        store = self.store
        steps = [(key, functools.partial(store._discard, key)) for key in self._doomed]
        steps += [
            (undo, functools.partial(store._discard, undo))
            for undo in self._undo.values()
            if undo is not None
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

        steps = [(key, functools.partial(restore, key, undo)) for key, undo in reversed(self._undo.items())]
        self._doomed.clear()
        self._undo.clear()
        cleanups, self._cleanups = self._cleanups, []
        self._run("compensation after rollback", steps)
        if cleanups and self._outbox is not None:
            # Compensated: the relay has nothing left to undo. (Had a step
            # failed, _run raised and the rows stay for the relay to retry.)
            self._outbox.remove(cleanups)


def blob_resource(
    store: BlobStore, name: str, *, transactional: bool, outbox: Any, orphan_after: float
) -> Callable[[Any], Iterator[BlobStore]]:
    """The resource factory :meth:`BlobStore.install` registers: the one place that decides the wrapping.

    With ``transactional``, each context gets its own :class:`TransactionalBlobStore`
    over ``store`` (closed when the context ends); without, ``store`` itself.

    Raises:
        TypeError: ``outbox`` is not a :class:`polydatum.outbox.Outbox`.
        ValueError: ``outbox`` without ``transactional``, or ``orphan_after`` not
            a number of seconds > 0.
    """
    if outbox is not None:
        from polydatum.outbox import Outbox  # the outbox needs SQLAlchemy: only when asked

        if not isinstance(outbox, Outbox):
            msg = f"outbox must be a polydatum.outbox.Outbox, got {type(outbox).__name__}"
            raise TypeError(msg)
        if not transactional:
            msg = "outbox= needs transactional=True: without a unit of work nothing waits for a commit"
            raise ValueError(msg)
        number = isinstance(orphan_after, (int, float)) and not isinstance(orphan_after, bool)
        if not number or orphan_after <= 0:
            msg = f"orphan_after must be a number of seconds > 0, got {orphan_after!r}"
            raise ValueError(msg)
        outbox.add_handler(blob_topic(name), outbox_handler(store))

    if transactional:

        def blob_resource(ctx: Any) -> Iterator[BlobStore]:
            view = TransactionalBlobStore(store, ctx, name=name, outbox=outbox, orphan_after=orphan_after)
            try:
                yield view
            finally:
                view.close()

    else:

        def blob_resource(ctx: Any) -> Iterator[BlobStore]:
            yield store

    blob_resource.__qualname__ = f"{type(store).__name__}.install.<{name}>"
    return blob_resource


def blob_topic(name: str) -> str:
    """The outbox topic of the blob store installed as ``name``."""
    return f"polydatum.blob:{name}"


def outbox_handler(store: BlobStore) -> Callable[[Any], None]:
    """Deliver the blob store's outbox rows: deletes after a commit, undoing a failed context's writes."""

    def deliver_blob_effect(effect: Any) -> None:
        payload = effect.payload
        for key in payload.get("discard", ()):
            store._discard(key)
        if "delete" in payload:
            # Only while the key still holds the blob deleted then: a newer one stays.
            store._discard_if(payload["delete"], payload["etag"])
        if "restore" in payload:
            key, undo = payload["restore"], payload["undo"]
            mark = payload.get("write")  # rows written before marks existed have none
            if mark is not None:
                current = _stat_or_none(store, key)
                if current is None or current.metadata.get(WRITE_MARK) != mark:
                    # The key holds the blob from before the write (the context died
                    # before writing) or a later context's: nothing of ours to undo.
                    if undo is not None:
                        store._discard(undo)
                    return
            if undo is None:
                store._discard(key)  # written by a context that never committed
            elif store._exists(undo):
                store._snapshot(undo, key)
                store._discard(undo)

    return deliver_blob_effect


def _stat_or_none(store: BlobStore, key: str) -> BlobInfo | None:
    try:
        return store._stat(key)
    except BlobNotFound:
        return None

"""Reconcile the attachments table with the blob store (``polydatum-notes sync-attachments``).

The unit of work keeps the two in step as requests come and go, except for
one gap: a process that dies between the SQL commit and its blob cleanup
(or mid-context, before the rollback removes its upload) leaves a blob no
row points at. Damage done by hand (a restored backup, a bucket emptied by
mistake) leaves rows whose blob is gone. This compares the two sides with
:mod:`polydatum.sync`, streaming both in key order:

- a blob under ``notes/`` with no row ("new" to the table): an orphan; with
  ``apply`` it is deleted, once older than ``older_than`` (an upload whose
  context has not committed yet must not be taken for one);
- a row with no blob ("deleted" from the store): the attachment is gone;
  with ``apply`` the row is removed;
- a row whose size differs from its blob's ("changed"): the row takes the blob's size.

Blob and row compare by size: the app writes each blob once under a fresh
key, so the size is enough to catch a truncated or replaced file.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, TextIO

from polydatum.middleware import PathSegment, dal_resolver
from polydatum.sync import BlobSide, Change, Differ, FileCheckpoint, Kind, Report, Syncer
from polydatum.sync.sql import StoreSide

from notes.models import Attachment

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext

    from notes.app import NotesApp

PREFIX = "notes/"
_READ = (PathSegment("notes"), PathSegment("read"))


def differ(app: NotesApp) -> Differ[str, dict[str, Any]]:
    """Blobs under ``notes/`` (by full key) against the attachment rows, both by size."""
    blobs = BlobSide(app.blobs, PREFIX, fingerprint="size", strip_prefix=False)
    return Differ(blobs, StoreSide(app.dm, Attachment, key="key", fingerprint="size"))


def sync_attachments(
    app: NotesApp,
    *,
    apply: bool = False,
    older_than: dt.timedelta = dt.timedelta(hours=1),
    checkpoint: str | None = None,
    out: TextIO | None = None,
) -> Report:
    """Report (or, with ``apply``, fix) the differences between attachment rows and blobs."""
    cutoff = dt.datetime.now(dt.timezone.utc) - older_than
    young: list[str] = []

    def fix(ctx: DataAccessContext, change: Change[str, dict[str, Any]]) -> None:
        if change.kind is Kind.NEW:
            key = str(change.source)
            if app.blobs.stat(key).modified >= cutoff:
                young.append(key)  # maybe an upload whose context is still running
                return
            ctx.blobs.delete(key)  # once this batch commits
            return
        assert change.target is not None
        session = ctx.db
        row = session.get(Attachment, change.target["id"])
        if row is None:  # removed meanwhile by a request
            return
        if change.kind is Kind.DELETED:
            session.delete(row)
        else:
            row.size = app.blobs.stat(row.key).size
        # The cached read of the note lists its attachments: drop it once this batch commits.
        dal_resolver(ctx, _READ).invalidate(row.note_id)

    syncer = Syncer(
        differ(app),
        apply=fix,
        data_manager=app.dm,
        batch_size=200,
        checkpoint=FileCheckpoint(checkpoint) if checkpoint else None,
        label="sync-attachments",
    )
    report = syncer.run(dry_run=not apply, out=out)
    if young and out is not None:
        out.write(f"kept {len(young)} blobs without a row that are younger than {older_than}\n")
    return report

"""Keep two storage media in step: a Differ finds what differs, a Syncer applies it
==================================================================================

A :class:`Differ` reads two sides, a *source* (what should be) and a *target*
(what is), each in ascending key order, and merge-joins them into
:class:`Change` objects: ``new`` (only in the source), ``changed`` (on both,
different fingerprints) and ``deleted`` (only in the target). It holds one item
a side at a time, so a million keys take no more memory than ten.

A :class:`Syncer` applies those changes in batches, each in its own context
(it commits or rolls back whole), keeps a checkpoint so that a run that
stopped resumes where it was, can print the plan instead (a dry run), shows a
progress line on a terminal, and reports the counts per kind.

Sides: any iterable sorted by key (with ``key=`` and ``fingerprint=``),
:class:`BlobSide` (the blobs under a prefix of a BlobStore, compared by the
content hash :func:`polydatum.blob.put_hashed` records), :class:`FolderSide`
(files on disk), and, with the ``sqlalchemy`` extra,
:class:`polydatum.sync.sql.StoreSide` (rows of a model) and
:class:`polydatum.sync.sql.CollectionSide` (documents)::

    from polydatum import DataManager
    from polydatum.sync import Differ, Syncer

    wanted = {"a": 1, "b": 2, "c": 3}
    held = {"a": 1, "b": 20, "d": 4}
    differ = Differ(
        sorted(wanted.items()), sorted(held.items()), key=lambda p: p[0], fingerprint=lambda p: p[1]
    )

    def apply(ctx, change):
        if change.kind == "deleted":
            del held[change.key]
        else:
            held[change.key] = change.source[1]

    report = Syncer(differ, apply=apply, data_manager=DataManager()).run()
    assert held == wanted and (report.new, report.changed, report.deleted) == (1, 1, 1)

This module imports nothing outside the standard library (and polydatum).

.. versionadded:: 2.0
"""

from polydatum.sync._checkpoint import Checkpoint, FileCheckpoint, MemoryCheckpoint
from polydatum.sync._differ import Change, Differ, Items, Kind, Side
from polydatum.sync._errors import ApplyError, DuplicateKey, FingerprintError, SyncError, UnsortedInput
from polydatum.sync._sides import BlobSide, FolderSide
from polydatum.sync._syncer import Report, Syncer

__all__ = [
    "ApplyError",
    "BlobSide",
    "Change",
    "Checkpoint",
    "Differ",
    "DuplicateKey",
    "FileCheckpoint",
    "FingerprintError",
    "FolderSide",
    "Items",
    "Kind",
    "MemoryCheckpoint",
    "Report",
    "Side",
    "SyncError",
    "Syncer",
    "UnsortedInput",
]

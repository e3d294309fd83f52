"""Type-checked, never run: the Differ's item types flow into Changes and the Syncer's apply."""

from __future__ import annotations

from pathlib import Path

from typing_extensions import assert_type

from polydatum import DataManager
from polydatum.blob import MemoryBlobStore
from polydatum.context import DataAccessContext
from polydatum.sync import BlobSide, Change, Differ, FileCheckpoint, FolderSide, Kind, Report, Syncer


def usage(dm: DataManager) -> None:
    pairs = [("a", 1), ("b", 2)]
    differ = Differ(pairs, pairs, key=lambda p: p[0], fingerprint=lambda p: p[1])
    assert_type(differ, Differ[tuple[str, int], tuple[str, int]])
    for change in differ:
        assert_type(change, Change[tuple[str, int], tuple[str, int]])
        assert_type(change.kind, Kind)
        assert_type(change.source, tuple[str, int] | None)

    files = Differ(FolderSide("."), BlobSide(MemoryBlobStore(), "up/"))
    assert_type(files, Differ[Path, str])

    def apply(ctx: DataAccessContext, change: Change[Path, str]) -> None:
        if change.kind is Kind.DELETED:
            assert_type(change.target, str | None)

    report = Syncer(files, apply=apply, data_manager=dm, checkpoint=FileCheckpoint("sync.json")).run()
    assert_type(report, Report)
    assert_type(report.new, int)

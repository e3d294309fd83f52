"""A sync of blobs into a table of their metadata, shared by the sync tests and run as a child process.

``python -m tests.support.sync_job URL CHECKPOINT N SEED KILL_AT_BATCH BATCH_SIZE`` builds
the same N blobs from SEED in memory (so every run sees the same source),
syncs them into the ``sync_files`` table at URL with a FileCheckpoint, and
prints the report as JSON, with how much the process grew while it synced.
With KILL_AT_BATCH (0: never), the process sends itself
SIGKILL in the middle of that batch: its statements ran, its COMMIT did not.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Integer, String, bindparam, delete, insert, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polydatum import DataManager
from polydatum.blob import MemoryBlobStore, put_hashed
from polydatum.sqlalchemy import Database
from polydatum.sync import BlobSide, Change, Checkpoint, Differ, FileCheckpoint, Kind, Report, Syncer
from polydatum.sync.sql import StoreSide


class Base(DeclarativeBase):
    pass


class File(Base):
    """A row per blob: its key (without the prefix), content hash and size."""

    __tablename__ = "sync_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # A collation other than "C" on PostgreSQL: the side must still read in code point order.
    key: Mapped[str] = mapped_column(
        String(300).with_variant(String(300, collation="und-x-icu"), "postgresql"), unique=True
    )
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int]


PREFIX = "files/"


def blob_contents(n: int, seed: int) -> dict[str, bytes]:
    """N keys with contents, the same for the same seed; keys mix case and punctuation."""
    names = ["a", "B", "a-b", "ab", "_x", "Zed", "\u00e9"]
    contents = {}
    for i in range(n):
        digest = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=16).digest()
        contents[f"{names[digest[0] % 7]}{i:06d}/{names[digest[1] % 7]}"] = digest[: 1 + digest[2] % 16]
    return contents


def prepare(url: str, contents: dict[str, bytes], seed: int) -> dict[str, int]:
    """Create ``sync_files`` with a random mix: 10% of the keys missing, 10% changed, 5% extra rows."""
    rng = random.Random(seed)
    rows = []
    mix = {"new": 0, "changed": 0, "deleted": 0}
    for key, data in contents.items():
        draw = rng.random()
        if draw < 0.1:
            mix["new"] += 1
        elif draw < 0.2:
            rows.append({"key": key, "sha256": "0" * 64, "size": 0})
            mix["changed"] += 1
        else:
            rows.append(row(key, data))
    for i in range(len(contents) // 20):
        rows.append({"key": f"{rng.choice('aBz_')}{i:06d}-gone", "sha256": "1" * 64, "size": 1})
        mix["deleted"] += 1
    db = Database(url)
    try:
        Base.metadata.drop_all(db.engine)
        Base.metadata.create_all(db.engine)
        with db.engine.begin() as connection:
            connection.execute(insert(File), rows)
    finally:
        db.dispose()
    return mix


def table(url: str) -> dict[str, tuple[str, int]]:
    """The rows of ``sync_files``: key to (sha256, size)."""
    db = Database(url)
    try:
        with db.engine.connect() as connection:
            return {
                r.key: (r.sha256, r.size)
                for r in connection.execute(select(File.key, File.sha256, File.size))
            }
    finally:
        db.dispose()


def expected(contents: dict[str, bytes]) -> dict[str, tuple[str, int]]:
    """What ``sync_files`` holds once in step with ``contents``."""
    return {key: (hashlib.sha256(data).hexdigest(), len(data)) for key, data in contents.items()}


def fill(contents: dict[str, bytes]) -> MemoryBlobStore:
    store = MemoryBlobStore()
    for key, data in contents.items():
        put_hashed(store, PREFIX + key, data)
    return store


def row(key: str, data: bytes) -> dict[str, Any]:
    return {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def apply_batch(store: MemoryBlobStore, kill_at: int | None = None) -> Any:
    """Bulk statements for a batch of changes: one INSERT, one UPDATE and one DELETE at most."""
    batches = [0]

    def apply(ctx: Any, changes: Sequence[Change[str, dict[str, Any]]]) -> None:
        session = ctx.db
        new = [row(c.key, store.get(c.source)) for c in changes if c.kind is Kind.NEW and c.source]
        changed = [row(c.key, store.get(c.source)) for c in changes if c.kind is Kind.CHANGED and c.source]
        gone = [c.key for c in changes if c.kind is Kind.DELETED]
        if new:
            session.execute(insert(File), new)
        if changed:
            table = File.__table__
            stmt = (
                update(table)
                .where(table.c.key == bindparam("b_key"))
                .values(sha256=bindparam("sha256"), size=bindparam("size"))
            )
            session.execute(
                stmt, [{"b_key": c["key"], "sha256": c["sha256"], "size": c["size"]} for c in changed]
            )
        if gone:
            session.execute(delete(File).where(File.key.in_(gone)))
        batches[0] += 1
        if kill_at is not None and batches[0] == kill_at:
            session.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return apply


def sync(
    url: str,
    store: MemoryBlobStore,
    checkpoint: Checkpoint | None,
    kill_at: int | None = None,
    batch_size: int = 500,
) -> Report:
    db = Database(url)
    try:
        dm = DataManager()
        db.install(dm)
        differ = Differ(BlobSide(store, PREFIX), StoreSide(dm, File, key="key", fingerprint="sha256"))
        syncer = Syncer(
            differ,
            apply_batch=apply_batch(store, kill_at),
            data_manager=dm,
            batch_size=batch_size,
            checkpoint=checkpoint,
        )
        return syncer.run()
    finally:
        db.dispose()


def _rss() -> int:
    """The resident set size now, in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Start the peak resident size (VmHWM) over from the size now (Linux 4.0 and later)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _peak() -> int:
    """The peak resident set size since :func:`_reset_peak`, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    # No VmHWM: fall back to the whole process's peak (counts the filling too).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: Sequence[str]) -> int:
    url, checkpoint, n, seed, kill_at = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    store = fill(blob_contents(n, seed))
    gc.collect()
    _reset_peak()  # the peak from here on is the sync's, not the filling's
    before = _rss()
    started = time.perf_counter()
    report = sync(url, store, FileCheckpoint(checkpoint), kill_at or None, batch_size=int(argv[5]))
    grown = _peak() - before
    print(
        json.dumps(
            {
                **report.counts,
                "batches": report.batches,
                "resumed_from": report.resumed_from,
                "grown": grown,
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

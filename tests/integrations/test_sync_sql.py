"""polydatum.sync on SQLite and PostgreSQL: rows and documents as sides, 100,000 blobs, a SIGKILL mid-sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import String, event, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polydatum import DataManager
from polydatum.blob import MemoryBlobStore, put_hashed
from polydatum.documents import Documents
from polydatum.sqlalchemy import Database, Store
from polydatum.sync import BlobSide, Change, Differ, FingerprintError, Kind, MemoryCheckpoint, Syncer
from polydatum.sync.sql import CollectionSide, StoreSide
from tests.support import sync_job

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "sync_rows"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(
        String(100).with_variant(String(100, collation="und-x-icu"), "postgresql"), unique=True
    )
    digest: Mapped[str] = mapped_column(String(64))


class Rows(Store[Row]):
    pass


class Ordered(Base):
    """A key column in code point order on PostgreSQL too: no COLLATE needed when reading it."""

    __tablename__ = "sync_ordered"

    key: Mapped[str] = mapped_column(
        String(100).with_variant(String(100, collation="C"), "postgresql"), primary_key=True
    )


@pytest.fixture(name="dm")
def fixture_dm(url: str) -> Iterator[DataManager]:
    """A DataManager with ``ctx.db`` on each backend and an empty ``sync_rows`` table."""
    db = Database(url)
    Base.metadata.drop_all(db.engine)
    Base.metadata.create_all(db.engine)
    dm = DataManager()
    db.install(dm)
    dm.register_services(rows=Rows())
    yield dm
    Base.metadata.drop_all(db.engine)
    db.dispose()


def add_rows(dm: DataManager, rows: dict[str, str]) -> None:
    with dm.context() as ctx:
        if rows:
            ctx.db.execute(insert(Row), [{"name": k, "digest": v} for k, v in rows.items()])


def read_rows(dm: DataManager) -> dict[str, str]:
    with dm.context() as ctx:
        return {r.name: r.digest for r in ctx.db.execute(select(Row.name, Row.digest))}


# Code point order; a collation such as und-x-icu sorts these otherwise ("a" < "B", "ab" near "a-b").
NAMES = ["B", "Zed", "_x", "a", "a-b", "a/b", "ab", "\u00e9"]


class TestStoreSide:
    """Rows of a mapped class as a side."""

    def test_rows_come_in_code_point_order_whatever_the_collation(self, dm: DataManager) -> None:
        """A text key is read in Python's str order, page by page, even when its column collates otherwise."""
        add_rows(dm, {name: name.upper() for name in reversed(NAMES)})
        side = StoreSide(dm, Row, key="name", fingerprint="digest", page_size=3)
        scanned = list(side.scan())
        assert [key for key, _ in scanned] == NAMES == sorted(NAMES)
        assert scanned[0][1] == {"id": scanned[0][1]["id"], "name": "B", "digest": "B"}
        assert side.fingerprint(scanned[0][1]) == "B"
        assert [key for key, _ in side.scan(after="a")] == ["a-b", "a/b", "ab", "\u00e9"]

    def test_collate_only_where_the_column_needs_it(self, dm: DataManager, backend: str) -> None:
        """COLLATE "C" is added on PostgreSQL for a column of another collation, never elsewhere."""
        statements: list[str] = []

        def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "sync_" in statement and statement.lstrip().upper().startswith("SELECT"):
                statements.append(statement)

        with dm.context() as ctx:
            engine = ctx.db.get_bind()
        event.listen(engine, "before_cursor_execute", record)
        try:
            assert list(StoreSide(dm, Row, key="name").scan(after="a")) == []
            assert list(StoreSide(dm, Ordered, key="key").scan(after="a")) == []
        finally:
            event.remove(engine, "before_cursor_execute", record)
        rows, ordered = statements
        assert ('COLLATE "C"' in rows) == (backend == "postgresql")
        assert "COLLATE" not in ordered

    def test_a_store_names_its_model_and_database(self, dm: DataManager) -> None:
        """A Store may stand for its model; without fingerprint= whole rows are compared."""
        add_rows(dm, {"a": "1"})
        side = StoreSide(dm, Rows(), key="name")
        [(key, item)] = list(side.scan())
        assert key == "a"
        assert side.fingerprint(item) == side.fingerprint(dict(item))

    def test_blobs_into_rows_and_back_in_step(self, dm: DataManager) -> None:
        """Blobs synced into rows leave nothing to do; the rows match the blobs exactly."""
        blobs = MemoryBlobStore()
        for i, name in enumerate(NAMES):
            put_hashed(blobs, f"p/{name}", str(i).encode())
        add_rows(dm, {"a": "stale", "gone": "x", "B": _sha(b"0")})

        def apply(ctx: Any, change: Change[str, dict[str, Any]]) -> None:
            session = ctx.db
            if change.kind is Kind.DELETED:
                session.delete(session.get(Row, change.target["id"]))  # type: ignore[index]
                return
            digest = blobs.stat(str(change.source)).metadata["sha256"]
            if change.kind is Kind.NEW:
                session.add(Row(name=change.key, digest=digest))
            else:
                session.get(Row, change.target["id"]).digest = digest  # type: ignore[index, union-attr]

        differ = Differ(
            BlobSide(blobs, "p/"), StoreSide(dm, Row, key="name", fingerprint="digest", page_size=3)
        )
        report = Syncer(differ, apply=apply, data_manager=dm, batch_size=2).run()
        assert (report.new, report.changed, report.deleted, report.unchanged) == (6, 1, 1, 1)
        assert read_rows(dm) == {name: _sha(str(i).encode()) for i, name in enumerate(NAMES)}
        again = Syncer(differ, apply=apply, data_manager=dm).run()
        assert again.counts == {"new": 0, "changed": 0, "deleted": 0, "unchanged": len(NAMES)}

    def test_a_failed_batch_leaves_the_table_as_it_was(self, dm: DataManager) -> None:
        """An error mid-batch rolls the batch's SQL back; the resumed run applies it whole."""
        source = [(name, "v") for name in NAMES]
        fail = {"a-b"}

        def apply(ctx: Any, change: Change[Any, Any]) -> None:
            if change.key in fail:
                raise RuntimeError
            ctx.db.add(Row(name=change.key, digest="v"))

        checkpoint = MemoryCheckpoint()
        differ = Differ(
            source,
            StoreSide(dm, Row, key="name", fingerprint="digest"),
            key=lambda p: p[0],
            fingerprint=lambda p: p[1],
        )
        syncer = Syncer(differ, apply=apply, data_manager=dm, batch_size=3, checkpoint=checkpoint)
        with pytest.raises(Exception, match="new change of 'a-b' failed with RuntimeError"):
            syncer.run()
        assert sorted(read_rows(dm)) == ["B", "Zed", "_x"]  # the batch a, a-b, a/b rolled back whole
        fail.clear()
        report = syncer.run()
        assert report.resumed_from == "_x"
        assert sorted(read_rows(dm)) == sorted(NAMES)

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            (
                {"key": "nope"},
                ValueError,
                "key='nope' is not a column attribute of Row; known: digest, id, name",
            ),
            ({"fingerprint": "nope"}, ValueError, "fingerprint='nope' is not a column attribute"),
            ({"key": 3}, TypeError, "key must be the name of the key column"),
            ({"model": object}, TypeError, "needs a mapped class or a Store"),
            ({"page_size": 0}, ValueError, "page_size must be an int of at least 1"),
        ],
    )
    def test_bad_arguments(
        self, dm: DataManager, kwargs: dict[str, Any], error: type[Exception], match: str
    ) -> None:
        """Unknown columns, a non-model and a bad page size are refused when the side is made."""
        kwargs = {"model": Row, "key": "name", **kwargs}
        with pytest.raises(error, match=match):
            StoreSide(dm, **kwargs)


class TestCollectionSide:
    """Documents as a side."""

    @pytest.fixture(name="docs")
    def fixture_docs(self, url: str) -> Iterator[tuple[DataManager, Documents]]:
        db = Database(url)
        dm = DataManager()
        db.install(dm)
        docs = Documents(db, prefix=f"s{uuid.uuid4().hex[:8]}_")
        docs.define("carts")
        docs.define("copies")
        docs.install(dm)
        docs.create_tables()
        yield dm, docs
        db.dispose()

    def test_one_collection_synced_into_another(self, docs: tuple[DataManager, Documents]) -> None:
        """Documents compare by content hash, not version: after a sync the copy holds the same values."""
        dm, _ = docs
        with dm.context() as ctx:
            carts = ctx.docs.collection("carts")
            copies = ctx.docs.collection("copies")
            for name in NAMES:
                carts.put(name, {"name": name, "items": [1, 2], "n": len(name)})
            copies.put("a", {"n": 1, "items": [1, 2], "name": "a"})  # same value, keys in another order
            copies.put("ab", {"name": "old"})
            copies.put("zzz", {"name": "gone"})
            copies.put("B", {"name": "B", "items": [1, 2], "n": 1}, force=True)  # version 1, same value
            copies.put("B", {"name": "B", "items": [1, 2], "n": 1}, force=True)  # version 2

        def apply(ctx: Any, change: Change[Any, Any]) -> None:
            collection = ctx.docs.collection("copies")
            if change.kind is Kind.DELETED:
                collection.delete(change.key)
            else:
                collection.put(change.key, change.source.value, force=True)

        differ = Differ(CollectionSide(dm, "carts", page_size=3), CollectionSide(dm, "copies", page_size=3))
        assert [(c.kind.value, c.key) for c in differ][:3] == [("new", "Zed"), ("new", "_x"), ("new", "a-b")]
        report = Syncer(differ, apply=apply, data_manager=dm).run()
        assert (report.new, report.changed, report.deleted, report.unchanged) == (5, 1, 1, 2)
        with dm.context() as ctx:
            copies = {d.key: d.value for d in ctx.docs.collection("copies").find()}
            carts = {d.key: d.value for d in ctx.docs.collection("carts").find()}
        assert copies == carts

    def test_versions_as_fingerprint_and_a_failing_one(self, docs: tuple[DataManager, Documents]) -> None:
        """fingerprint= gets the Doc; one that raises is a FingerprintError naming the key."""
        dm, docs_ = docs
        with dm.context() as ctx:
            ctx.docs.collection("carts").put("a", {"n": 1})
        plain = [{"key": "a", "version": 1}]
        by_version = Differ(
            CollectionSide(dm, docs_.definition("carts"), fingerprint=lambda d: d.version),
            plain,
            key="key",
            fingerprint="version",
        )
        assert list(by_version) == []
        failing = Differ(
            CollectionSide(dm, "carts", fingerprint=lambda d: d.value["missing"]), plain, key="key"
        )
        with pytest.raises(FingerprintError, match="fingerprint of source item 'a' failed with KeyError"):
            list(failing)

    def test_bad_arguments(self, docs: tuple[DataManager, Documents]) -> None:
        """A collection that is not a name or a definition, or a fingerprint not callable, is refused."""
        dm, _ = docs
        with pytest.raises(TypeError, match="collection must be a collection name or its Definition"):
            CollectionSide(dm, 42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fingerprint must be None or a callable"):
            CollectionSide(dm, "carts", fingerprint="version")  # type: ignore[arg-type]


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def run_job(
    url: str, checkpoint: Path, n: int, seed: int, kill_at: int, batch_size: int
) -> subprocess.CompletedProcess[str]:
    """Run tests/support/sync_job.py in a child process of its own."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.sync_job",
            url,
            str(checkpoint),
            str(n),
            str(seed),
            str(kill_at),
            str(batch_size),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_sigkill_mid_sync_then_resume(url: str, tmp_path: Path) -> None:
    """A sync killed (SIGKILL) in the middle of a batch resumes at its checkpoint and ends exactly in step."""
    contents = sync_job.blob_contents(3000, seed=7)
    mix = sync_job.prepare(url, contents, seed=8)
    checkpoint = tmp_path / "sync.json"
    killed = run_job(url, checkpoint, 3000, 7, kill_at=9, batch_size=100)
    assert killed.returncode == -9, killed.stderr
    saved = json.loads(checkpoint.read_text())
    assert saved["key"]  # eight batches committed, and the position after them saved
    partial = sync_job.table(url)
    assert partial != sync_job.expected(contents)
    resumed = run_job(url, checkpoint, 3000, 7, kill_at=0, batch_size=100)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["resumed_from"] == saved["key"]
    assert sync_job.table(url) == sync_job.expected(contents)
    # The killed batch was never committed, so the totals are those of one uninterrupted sync.
    assert {k: report[k] for k in mix} == mix
    assert not checkpoint.exists()


@pytest.mark.slow
def test_hundred_thousand_blobs_against_postgresql(pg_url: str, tmp_path: Path) -> None:
    """100,000 blobs against a PostgreSQL table, a random mix of differences: in step after, in < 100 MiB."""
    contents = sync_job.blob_contents(100_000, seed=1)
    mix = sync_job.prepare(pg_url, contents, seed=2)
    done = run_job(pg_url, tmp_path / "sync.json", 100_000, 1, kill_at=0, batch_size=1000)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {k: report[k] for k in mix} == mix
    assert report["unchanged"] == len(contents) - mix["new"] - mix["changed"]
    assert sync_job.table(pg_url) == sync_job.expected(contents)
    assert report["grown"] < 100 * MiB

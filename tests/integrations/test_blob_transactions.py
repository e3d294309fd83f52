"""The blob resource as a unit of work: writes undone on rollback, deletes done on commit."""

from __future__ import annotations

import io
import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from polydatum import DataManager, Service
from polydatum.blob import (
    BlobError,
    BlobNotFound,
    BlobStore,
    FileSystemBlobStore,
    MemoryBlobStore,
    TransactionalBlobStore,
    UrlNotSupported,
)
from polydatum.errors import ContextStateError
from tests.support.s3 import moto_server_fixture as moto_server_fixture
from tests.support.s3 import store_fixture as store_fixture


class Boom(Exception):
    """Raised inside a context to make it roll back."""


def in_failing_context(dm: DataManager, body: Callable[[Any], object]) -> Any:
    """Run ``body(ctx)`` in a new context that then raises Boom; return the ended context."""
    contexts = []

    def unit_of_work() -> None:
        with dm.context() as ctx:
            contexts.append(ctx)
            body(ctx)
            raise Boom

    with pytest.raises(Boom):
        unit_of_work()
    return contexts[0]


@pytest.fixture(name="dm")
def dm_fixture(store: BlobStore) -> DataManager:
    """A DataManager with the store installed as the resource 'blobs'."""
    dm = DataManager()
    store.install(dm, name="blobs")
    return dm


def reserved_keys(store: BlobStore) -> list[str]:
    """What a store keeps under the reserved '.polydatum/' prefix (undo copies)."""
    return list(store._list(".polydatum/", None, 1000))


class TestUnitOfWork:
    def test_the_resource_is_a_transactional_view(self, dm: DataManager, store: BlobStore) -> None:
        """ctx.blobs is a TransactionalBlobStore over the installed store."""
        with dm.context() as ctx:
            assert isinstance(ctx.blobs, TransactionalBlobStore)
            assert ctx.blobs.store is store

    def test_put_then_raise_removes_the_blob(self, dm: DataManager, store: BlobStore) -> None:
        """A blob put in a context that raises is gone afterwards, and the error propagates."""

        def body(ctx: Any) -> None:
            ctx.blobs.put("tx/new", b"data")
            assert store.exists("tx/new")  # written at once, before any SQL commit

        ctx = in_failing_context(dm, body)
        assert not store.exists("tx/new")
        assert ctx.get_hook_errors() == []

    def test_put_then_commit_keeps_the_blob(self, dm: DataManager, store: BlobStore) -> None:
        """A blob put in a context that ends normally stays."""
        with dm.context() as ctx:
            ctx.blobs.put("tx/kept", b"data")
        assert store.get("tx/kept") == b"data"

    def test_delete_then_raise_keeps_the_blob(self, dm: DataManager, store: BlobStore) -> None:
        """A delete in a context that raises never happens."""
        store.put("tx/old", b"old")
        in_failing_context(dm, lambda ctx: ctx.blobs.delete("tx/old"))
        assert store.get("tx/old") == b"old"

    def test_delete_then_commit_removes_the_blob(self, dm: DataManager, store: BlobStore) -> None:
        """A delete in a context that commits happens once the context has ended."""
        store.put("tx/old", b"old")
        with dm.context() as ctx:
            ctx.blobs.delete("tx/old")
            assert store.exists("tx/old")  # not yet: waits for the commit
        assert not store.exists("tx/old")

    def test_a_pending_delete_reads_as_gone_inside_the_context(
        self, dm: DataManager, store: BlobStore
    ) -> None:
        """Inside the context a deleted key is missing for every read, list included."""
        store.put("tx/a", b"a")
        store.put("tx/b", b"b")
        with dm.context() as ctx:
            assert ctx.blobs.delete("tx/a") is True
            assert ctx.blobs.delete("tx/a") is False
            assert ctx.blobs.exists("tx/a") is False
            for read in (ctx.blobs.get, ctx.blobs.open, ctx.blobs.stat):
                with pytest.raises(BlobNotFound, match="deleted in this context"):
                    read("tx/a")
            with pytest.raises(BlobNotFound):
                ctx.blobs.copy("tx/a", "tx/c")
            assert list(ctx.blobs.list("tx/")) == ["tx/b"]

    def test_overwrite_then_raise_restores_the_previous_blob(self, dm: DataManager, store: BlobStore) -> None:
        """An overwritten blob gets its content, type and metadata back on rollback."""
        store.put("tx/doc", b"v1", content_type="text/csv", metadata={"v": "1"})

        def body(ctx: Any) -> None:
            ctx.blobs.put("tx/doc", b"v2", metadata={"v": "2"})
            ctx.blobs.put("tx/doc", b"v3", metadata={"v": "3"})
            assert store.get("tx/doc") == b"v3"

        in_failing_context(dm, body)
        info = store.stat("tx/doc")
        assert store.get("tx/doc") == b"v1"
        assert (info.content_type, dict(info.metadata)) == ("text/csv", {"v": "1"})
        assert reserved_keys(store) == []
        assert list(store.list()) == ["tx/doc"]

    def test_overwrite_then_commit_drops_the_undo_copy(self, dm: DataManager, store: BlobStore) -> None:
        """An overwrite that commits keeps the new content and leaves no undo copy."""
        store.put("tx/doc", b"v1")
        with dm.context() as ctx:
            ctx.blobs.put("tx/doc", b"v2")
            assert len(reserved_keys(store)) == 1
            assert list(ctx.blobs.list()) == ["tx/doc"]  # undo copies never show
        assert store.get("tx/doc") == b"v2"
        assert reserved_keys(store) == []

    def test_copy_then_raise_removes_the_copy(self, dm: DataManager, store: BlobStore) -> None:
        """A copy made in a context that raises is removed; the source stays."""
        store.put("tx/src", b"s")
        in_failing_context(dm, lambda ctx: ctx.blobs.copy("tx/src", "tx/dst"))
        assert not store.exists("tx/dst")
        assert store.get("tx/src") == b"s"

    def test_deleting_a_blob_created_in_the_context_is_immediate(
        self, dm: DataManager, store: BlobStore
    ) -> None:
        """A blob created and deleted in the same context is removed at once."""

        def body(ctx: Any) -> None:
            ctx.blobs.put("tx/tmp", b"t")
            assert ctx.blobs.delete("tx/tmp") is True
            assert not store.exists("tx/tmp")

        in_failing_context(dm, body)
        assert not store.exists("tx/tmp")

    def test_put_after_delete_in_one_context(self, dm: DataManager, store: BlobStore) -> None:
        """Deleting then putting a key in one context keeps the new blob on commit."""
        store.put("tx/k", b"old")
        with dm.context() as ctx:
            ctx.blobs.delete("tx/k")
            ctx.blobs.put("tx/k", b"new")
            assert ctx.blobs.get("tx/k") == b"new"
        assert store.get("tx/k") == b"new"
        assert reserved_keys(store) == []

    def test_put_after_delete_then_raise_restores(self, dm: DataManager, store: BlobStore) -> None:
        """Deleting then putting a key in a context that raises restores the original."""
        store.put("tx/k", b"old")

        def body(ctx: Any) -> None:
            ctx.blobs.delete("tx/k")
            ctx.blobs.put("tx/k", b"new")

        in_failing_context(dm, body)
        assert store.get("tx/k") == b"old"
        assert reserved_keys(store) == []

    def test_nested_contexts_are_separate_units_of_work(self, dm: DataManager, store: BlobStore) -> None:
        """An inner context that fails undoes only its own writes."""
        with dm.context() as outer:
            outer.blobs.put("tx/outer", b"o")
            in_failing_context(dm, lambda inner: inner.blobs.put("tx/inner", b"i"))
            assert not store.exists("tx/inner")
        assert store.exists("tx/outer")

    def test_reads_and_health_pass_through_the_view(self, dm: DataManager, store: BlobStore) -> None:
        """download, url, ping and sweep_orphans work through ctx.blobs like on the store."""
        store.put("tx/r.txt", b"read me")
        with dm.context() as ctx:
            target = io.BytesIO()
            assert ctx.blobs.download("tx/r.txt", target) == 7
            assert target.getvalue() == b"read me"
            assert ctx.blobs.ping() is True
            assert ctx.blobs.sweep_orphans(lambda keys: keys) == []
            if isinstance(store, (MemoryBlobStore, FileSystemBlobStore)):
                with pytest.raises(UrlNotSupported):
                    ctx.blobs.url("tx/r.txt")
            else:
                assert "X-Amz-Signature=" in ctx.blobs.url("tx/r.txt")
            ctx.blobs.delete("tx/r.txt")
            for read in (
                lambda: ctx.blobs.url("tx/r.txt"),
                lambda: ctx.blobs.download("tx/r.txt", io.BytesIO()),
            ):
                with pytest.raises(BlobNotFound, match="deleted in this context"):
                    read()
        assert not store.exists("tx/r.txt")

    def test_an_inner_commit_survives_an_outer_failure(self, dm: DataManager, store: BlobStore) -> None:
        """A nested context that committed keeps its blob even when the outer one fails."""

        def body(outer: Any) -> None:
            outer.blobs.put("tx/outer", b"o")
            with dm.context() as inner:
                inner.blobs.put("tx/inner", b"i")

        in_failing_context(dm, body)
        assert store.get("tx/inner") == b"i"
        assert not store.exists("tx/outer")

    def test_the_view_refuses_use_after_its_context(self, dm: DataManager) -> None:
        """Keeping ctx.blobs past the context and writing to it raises ContextStateError."""
        with dm.context() as ctx:
            view = ctx.blobs
        with pytest.raises(ContextStateError, match="context that has ended"):
            view.put("tx/late", b"x")
        with pytest.raises(ContextStateError):
            view.exists("tx/late")

    def test_install_returns_the_store(self, store: BlobStore) -> None:
        """install() returns the store itself, so ``blobs = Store(...).install(dm)`` works."""
        assert store.install(DataManager(), name="files") is store


def behaves_as_an_installable_store(store: BlobStore) -> None:
    """What any BlobStore promises when installed: failed contexts undo writes, committed ones keep them."""
    inner = DataManager()
    assert store.install(inner, name="blobs") is store
    in_failing_context(inner, lambda ctx: ctx.blobs.put("sub/undone", b"x"))
    assert not store.exists("sub/undone")
    with inner.context() as ctx:
        ctx.blobs.put("sub/kept", b"k")
    assert store.get("sub/kept") == b"k"
    with inner.context() as ctx:
        ctx.blobs.delete("sub/kept")
        assert store.exists("sub/kept")  # deletes wait for the commit
    assert not store.exists("sub/kept")


class TestSubstitutability:
    """A context's view is a BlobStore: everything a store can do, the view can do, install included."""

    def test_a_store_behaves_as_a_store(self, store: BlobStore) -> None:
        """The installed store meets the install contract (the baseline for the view)."""
        behaves_as_an_installable_store(store)

    def test_the_view_behaves_as_a_store(self, dm: DataManager, store: BlobStore) -> None:
        """A context's view installs like any store: its contexts nest a unit of work in the outer one."""
        with dm.context() as ctx:
            behaves_as_an_installable_store(ctx.blobs)
        assert not store.exists("sub/kept")

    def test_an_outer_rollback_undoes_a_nested_commit(self, dm: DataManager, store: BlobStore) -> None:
        """Writes committed through an installed view are still undone when the outer context fails."""

        def body(ctx: Any) -> None:
            inner = DataManager()
            ctx.blobs.install(inner)
            with inner.context() as inner_ctx:
                inner_ctx.blobs.put("nested/a", b"a")
            assert store.exists("nested/a")

        in_failing_context(dm, body)
        assert not store.exists("nested/a")

    def test_a_view_installed_past_its_context_refuses_use(self, dm: DataManager) -> None:
        """A view installed elsewhere is refused once its own context has ended, saying why."""
        inner = DataManager()
        with dm.context() as ctx:
            ctx.blobs.install(inner)
        with inner.context() as inner_ctx, pytest.raises(ContextStateError, match="context that has ended"):
            inner_ctx.blobs.put("late", b"x")

    def test_non_transactional_install(self, store: BlobStore) -> None:
        """With transactional=False the context gets the store itself and nothing is undone."""
        dm = DataManager()
        store.install(dm, name="files", transactional=False)

        def body(ctx: Any) -> None:
            assert ctx.files is store
            ctx.files.put("tx/raw", b"r")

        in_failing_context(dm, body)
        assert store.exists("tx/raw")

    def test_unused_resource_registers_no_hooks(self, dm: DataManager, store: BlobStore) -> None:
        """Reading in a failing context undoes nothing and reports no hook error."""
        store.put("tx/r", b"r")
        ctx = in_failing_context(dm, lambda ctx: ctx.blobs.get("tx/r"))
        assert store.exists("tx/r")
        assert ctx.get_hook_errors() == []


class FlakyStore(MemoryBlobStore):
    """A memory store whose deletes fail for keys starting with 'fail/'."""

    def _delete(self, key: str) -> bool:
        if key.startswith("fail/"):
            msg = f"disk on fire while deleting {key}"
            raise OSError(msg)
        return super()._delete(key)


class TestCleanupFailures:
    def test_failed_compensation_is_logged_and_collected(self, caplog: pytest.LogCaptureFixture) -> None:
        """A rollback cleanup that fails is logged, collected as a hook error, and others run."""
        store = FlakyStore()
        dm = DataManager()
        store.install(dm, name="blobs")

        def body(ctx: Any) -> None:
            ctx.blobs.put("fail/a", b"1")
            ctx.blobs.put("ok/b", b"2")

        with caplog.at_level(logging.WARNING, "polydatum"):
            ctx = in_failing_context(dm, body)
        assert not store.exists("ok/b")  # the other compensation still ran
        assert store.exists("fail/a")  # an orphan, for sweep_orphans
        errors = ctx.get_hook_errors()
        assert len(errors) == 1
        assert isinstance(errors[0][1], BlobError)
        assert "'fail/a'" in str(errors[0][1])
        assert "sweep_orphans" in str(errors[0][1])
        records = [r for r in caplog.records if r.name == "polydatum.blob"]
        assert records
        assert records[0].polydatum_resource == "blobs"  # type: ignore[attr-defined]

    def test_failed_delete_after_commit_never_undoes_the_commit(self) -> None:
        """A delete that fails after commit is reported, and the context still committed."""
        store = FlakyStore()
        store.put("fail/x", b"1")
        dm = DataManager()
        store.install(dm, name="blobs")
        with dm.context() as ctx:
            ctx.blobs.delete("fail/x")
            ctx.blobs.put("ok/y", b"2")
        assert store.exists("ok/y")
        assert store.exists("fail/x")
        assert len(ctx.get_hook_errors()) == 1


# -- end to end: SQL and blobs in one unit of work ------------------------------


class Attachments(Service):
    """Stores an attachment row in SQLite and its bytes in the blob store."""

    def attach(self, name: str, data: bytes) -> None:
        self._ctx.db.execute("INSERT INTO attachments (key) VALUES (?)", (name,))
        self._ctx.blobs.put(f"attachments/{name}", data)

    def remove(self, name: str) -> None:
        self._ctx.db.execute("DELETE FROM attachments WHERE key = ?", (name,))
        self._ctx.blobs.delete(f"attachments/{name}")

    def keys(self) -> list[str]:
        return [k for (k,) in self._ctx.db.execute("SELECT key FROM attachments ORDER BY key")]


@pytest.fixture(name="app")
def app_fixture(store: BlobStore, tmp_path: Path) -> tuple[DataManager, list[str]]:
    """A DataManager with a SQLite resource, a transaction middleware and the blob store."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE attachments (key TEXT PRIMARY KEY)")
    setup.close()
    events: list[str] = []

    def db(ctx: Any) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(path)
        try:
            yield connection
        finally:
            connection.close()

    def transaction(ctx: Any) -> Iterator[None]:
        try:
            yield
        except BaseException:
            if "db" in ctx:
                ctx.db.rollback()
            events.append("rollback")
            raise
        else:
            if "db" in ctx:
                ctx.db.commit()
            # The blob delete of this unit of work has not happened yet.
            events.append(f"commit (blob present: {store.exists('attachments/a')})")

    dm = DataManager()
    dm.register_resources(db=db)
    store.install(dm, name="blobs")
    dm.register_context_middleware(transaction)
    dm.register_services(attachments=Attachments())
    return dm, events


class TestWithSql:
    def test_failed_unit_of_work_leaves_neither_row_nor_blob(
        self, app: tuple[DataManager, list[str]], store: BlobStore
    ) -> None:
        """When the context fails after the insert and the upload, both are undone."""
        dm, _ = app
        in_failing_context(dm, lambda ctx: ctx.dal.attachments.attach("a", b"bytes"))
        with dm.dal() as dal:
            assert dal.attachments.keys() == []
        assert list(store.list()) == []

    def test_delete_waits_for_the_sql_commit(
        self, app: tuple[DataManager, list[str]], store: BlobStore
    ) -> None:
        """The blob of a removed row is deleted only after the SQL commit, and only then."""
        dm, events = app
        with dm.dal() as dal:
            dal.attachments.attach("a", b"bytes")
        in_failing_context(dm, lambda ctx: ctx.dal.attachments.remove("a"))
        with dm.dal() as dal:
            assert dal.attachments.keys() == ["a"]
        assert store.exists("attachments/a")
        with dm.dal() as dal:
            dal.attachments.remove("a")
        assert events[-1] == "commit (blob present: True)"
        assert not store.exists("attachments/a")
        with dm.dal() as dal:
            assert dal.attachments.keys() == []

    def test_sweep_orphans_reconciles_after_a_crash(
        self, app: tuple[DataManager, list[str]], store: BlobStore
    ) -> None:
        """Blobs no row references (a crash between commit and cleanup) are swept."""
        import datetime

        dm, _ = app
        with dm.dal() as dal:
            dal.attachments.attach("kept", b"k")
        # What a crash leaves: a blob whose row never committed, and an undo copy.
        store.put("attachments/orphan", b"o")
        store._put(".polydatum/undo/00000000000000000001-dead", b"u", "text/plain", {})

        def referenced(keys: list[str]) -> list[str]:
            with dm.dal() as dal:
                rows = set(dal.attachments.keys())
            return [k for k in keys if k.removeprefix("attachments/") in rows]

        # Within the grace period only the (ancient) undo copy goes.
        first = store.sweep_orphans(referenced, prefix="attachments/")
        assert first == [".polydatum/undo/00000000000000000001-dead"]
        swept = store.sweep_orphans(
            referenced, prefix="attachments/", older_than=datetime.timedelta(seconds=-60), dry_run=True
        )
        assert swept == ["attachments/orphan"]
        assert store.exists("attachments/orphan")
        swept = store.sweep_orphans(referenced, older_than=datetime.timedelta(seconds=-60))
        assert swept == ["attachments/orphan"]
        assert list(store.list()) == ["attachments/kept"]
        assert reserved_keys(store) == []

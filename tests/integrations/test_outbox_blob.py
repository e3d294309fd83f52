"""Blob deletes and the undoing of a failed context's writes, through the outbox."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from polydatum import DataManager
from polydatum.blob import FileSystemBlobStore, InvalidMetadata
from polydatum.outbox import Outbox
from polydatum.sqlalchemy import Database
from tests.support.outbox import flush_outboxes  # noqa: F401  # autouse
from tests.support.sql import fresh_postgres_database

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 60.0


@pytest.fixture(name="pg_url", scope="module")
def fixture_pg_url(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL database of this module's own, dropped afterwards."""
    with fresh_postgres_database(postgres_url) as url:
        yield url


@pytest.fixture(name="url", params=["sqlite", "postgresql"])
def fixture_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The database URL of each backend (the outbox tables dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'app.db'}"
        return
    url = str(request.getfixturevalue("pg_url"))
    yield url
    db = Database(url)
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS polydatum_outbox"))
        conn.execute(text("DROP TABLE IF EXISTS polydatum_inbox"))
    db.dispose()


def make(url: str, root: Path, orphan_after: float = 900.0) -> Any:
    """A DataManager with a Database, an outbox and a file-system blob store through it."""
    dm = DataManager()
    db = Database(url).install(dm)
    outbox = Outbox(db, backoff=0.05, max_backoff=0.1).install(dm)
    outbox.create_table()
    store = FileSystemBlobStore(root)
    store.install(dm, outbox=outbox, orphan_after=orphan_after)
    return dm, db, outbox, store


def drain(outbox: Outbox) -> None:
    """Run a relay until nothing is pending; fail after the deadline."""
    relay = outbox.relay()
    end = time.monotonic() + DEADLINE
    while outbox.status().pending:
        if time.monotonic() > end:
            pytest.fail("the relay did not deliver before the deadline")
        if relay.run_once() == 0:
            time.sleep(0.05)


def undo_copies(store: FileSystemBlobStore) -> list[str]:
    """The undo copies left in the store."""
    return list(store._list(".polydatum/undo/", None, 1000))


def test_committed_context_keeps_its_puts_and_deletes_after_commit(url: str, tmp_path: Path) -> None:
    """A committed context keeps its new and overwritten blobs, its delete lands, nothing is left over."""
    dm, db, outbox, store = make(url, tmp_path / "blobs")
    store.put("old", b"old")
    store.put("kept", b"v1")
    with dm.context() as ctx:
        ctx.blobs.put("new", b"new")
        ctx.blobs.put("kept", b"v2")
        ctx.blobs.delete("old")
        assert store.exists("old")  # not before the commit
    assert not store.exists("old")
    assert store.get("new") == b"new"
    assert store.get("kept") == b"v2"
    assert undo_copies(store) == []
    assert outbox.status().pending == 0
    db.dispose()


def test_rolled_back_context_is_undone_and_leaves_no_row(url: str, tmp_path: Path) -> None:
    """A context that rolls back: its puts are undone by the hook and its cleanup rows removed."""
    dm, db, outbox, store = make(url, tmp_path / "blobs")
    store.put("kept", b"v1")

    def fail() -> None:
        with dm.context() as ctx:
            ctx.blobs.put("new", b"new")
            ctx.blobs.put("kept", b"v2")
            ctx.blobs.delete("kept")
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        fail()
    assert not store.exists("new")
    assert store.get("kept") == b"v1"
    assert outbox.status().pending == 0
    db.dispose()


def test_delete_waits_while_the_store_is_down_then_lands(url: str, tmp_path: Path) -> None:
    """The store refuses the delete at commit: the row waits, and a relay deletes once it works."""
    dm, db, outbox, store = make(url, tmp_path / "blobs")
    store.put("docs/a", b"a")
    folder = Path(store._path("docs/a")).parent
    subprocess.run(["chattr", "+i", str(folder)], check=True)  # unlink fails: EPERM, even for root
    try:
        with dm.context() as ctx:
            ctx.blobs.delete("docs/a")
        assert store.exists("docs/a")
        assert outbox.status().pending == 1
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    drain(outbox)
    assert not store.exists("docs/a")
    db.dispose()


CRASH_IN_CONTEXT = """
import os, signal, sys
from polydatum import DataManager
from polydatum.blob import FileSystemBlobStore
from polydatum.outbox import Outbox
from polydatum.sqlalchemy import Database

dm = DataManager()
db = Database(sys.argv[1]).install(dm)
outbox = Outbox(db).install(dm)
FileSystemBlobStore(sys.argv[2]).install(dm, outbox=outbox, orphan_after=0.5)
with dm.context() as ctx:
    ctx.blobs.put("orphan", b"written by a context that never commits")
    ctx.blobs.put("kept", b"overwritten by it")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def crash_in_a_context(url: str, root: Path, tmp_path: Path, script: str = CRASH_IN_CONTEXT) -> None:
    """Run ``script`` (by default a process that writes 'orphan' and 'kept' in a context, then dies)."""
    path = tmp_path / "crash.py"
    path.write_text(textwrap.dedent(script))
    proc = subprocess.run(
        [sys.executable, str(path), url, str(root)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=DEADLINE,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_writes_of_a_context_that_died_are_undone_by_a_relay(url: str, tmp_path: Path) -> None:
    """A process killed inside its context: a relay removes its new blob and restores the overwritten one."""
    root = tmp_path / "blobs"
    _, db, outbox, store = make(url, root)
    store.put("kept", b"v1")
    crash_in_a_context(url, root, tmp_path)
    assert store.exists("orphan")
    assert store.get("kept") == b"overwritten by it"
    drain(outbox)  # once orphan_after passed
    assert not store.exists("orphan")
    assert store.get("kept") == b"v1"
    assert undo_copies(store) == []
    db.dispose()


def test_a_later_committed_write_of_a_dead_contexts_keys_is_left_alone(url: str, tmp_path: Path) -> None:
    """A context died after writing two keys; a later context wrote both and committed: the relay keeps them.

    (It used to undo the dead context's writes blindly, deleting the one and
    rolling the other back to the content from before both.)
    """
    root = tmp_path / "blobs"
    dm, db, outbox, store = make(url, root)
    store.put("kept", b"v1")
    crash_in_a_context(url, root, tmp_path)
    with dm.context() as ctx:  # the user retries, and this one commits
        ctx.blobs.put("orphan", b"retried, committed")
        ctx.blobs.put("kept", b"v3, committed")
    drain(outbox)
    assert store.get("orphan") == b"retried, committed"
    assert store.get("kept") == b"v3, committed"
    assert store.stat("kept").metadata == {}  # the unit of work's mark is not the user's metadata
    assert undo_copies(store) == []
    db.dispose()


def test_copies_of_a_context_that_died_are_undone_by_a_relay(url: str, tmp_path: Path) -> None:
    """A copy carries its source's metadata, not the unit of work's mark: its undo row still undoes it.

    (With the marks, the relay took such a copy for a later write, kept it and
    threw the undo copy away: the overwritten blob was lost.)
    """
    root = tmp_path / "blobs"
    _, db, outbox, store = make(url, root)
    store.put("kept", b"v1")
    store.put("src", b"source")
    copier = CRASH_IN_CONTEXT.replace(
        'ctx.blobs.put("orphan", b"written by a context that never commits")',
        'ctx.blobs.copy("src", "orphan")',
    ).replace('ctx.blobs.put("kept", b"overwritten by it")', 'ctx.blobs.copy("src", "kept")')
    crash_in_a_context(url, root, tmp_path, copier)
    assert store.get("kept") == b"source"
    drain(outbox)
    assert not store.exists("orphan")
    assert store.get("kept") == b"v1"
    assert undo_copies(store) == []
    db.dispose()


def test_a_context_that_died_before_writing_changes_nothing(url: str, tmp_path: Path) -> None:
    """Its cleanup row was committed but the write never happened: the relay leaves the key as it is."""
    root = tmp_path / "blobs"
    _, db, outbox, store = make(url, root)
    store.put("kept", b"v1")
    # Dies inside put(), after the cleanup row, before the blob is written.
    early = CRASH_IN_CONTEXT.replace(
        'ctx.blobs.put("orphan", b"written by a context that never commits")',
        'ctx.blobs.put("orphan", (os.kill(os.getpid(), signal.SIGKILL) for _ in [0]))',
    )
    crash_in_a_context(url, root, tmp_path, early)
    assert outbox.status().pending == 1
    store.put("orphan", b"written later by hand")
    drain(outbox)
    assert store.get("orphan") == b"written later by hand"
    assert store.get("kept") == b"v1"
    db.dispose()


def test_a_delete_waiting_in_the_outbox_spares_a_later_write_of_the_key(url: str, tmp_path: Path) -> None:
    """A delete that waited (store down) must not remove the blob a later context put there and committed.

    The later blob has the very same bytes: what is compared is the blob's
    version, not its content.
    """
    dm, db, outbox, store = make(url, tmp_path / "blobs")
    store.put("docs/a", b"a")
    folder = Path(store._path("docs/a")).parent
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        with dm.context() as ctx:
            ctx.blobs.delete("docs/a")
        assert outbox.status().pending == 1
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    with dm.context() as ctx:
        ctx.blobs.put("docs/a", b"a")
    drain(outbox)
    assert store.get("docs/a") == b"a"
    db.dispose()


def test_the_unit_of_works_mark_is_reserved(url: str, tmp_path: Path) -> None:
    """Users cannot set the metadata name that marks the unit of work's writes."""
    dm, db, _, store = make(url, tmp_path / "blobs")
    for attempt in (
        lambda: store.put("a", b"x", metadata={"Polydatum-Write": "forged"}),
        lambda: _put_in_context(dm, "a", {"polydatum-write": "forged"}),
    ):
        with pytest.raises(InvalidMetadata, match="reserved"):
            attempt()
    with pytest.raises(InvalidMetadata, match="own mark"):
        _put_in_context(dm, "a", {"big": "x" * 2030})
    assert not store.exists("a")
    db.dispose()


def _put_in_context(dm: DataManager, key: str, metadata: dict[str, str]) -> None:
    with dm.context() as ctx:
        ctx.blobs.put(key, b"x", metadata=metadata)


def test_install_refuses_bad_outbox_options(tmp_path: Path) -> None:
    """outbox= must be an Outbox, needs transactional=True, and orphan_after must be positive."""
    dm = DataManager()
    db = Database(f"sqlite:///{tmp_path / 'a.db'}").install(dm)
    outbox = Outbox(db).install(dm)
    store = FileSystemBlobStore(tmp_path / "blobs")
    with pytest.raises(TypeError, match="outbox must be"):
        store.install(dm, outbox="nope")
    with pytest.raises(ValueError, match="transactional=True"):
        store.install(dm, outbox=outbox, transactional=False)
    with pytest.raises(ValueError, match="orphan_after"):
        store.install(dm, outbox=outbox, orphan_after=0)


def test_puts_before_and_after_sql_in_a_committed_context_leave_no_cleanup(url: str, tmp_path: Path) -> None:
    """Puts around the context's own SQL: after the commit the blobs stay and no cleanup row is left."""
    dm, db, outbox, store = make(url, tmp_path / "blobs", orphan_after=0.01)
    with dm.context() as ctx:
        ctx.blobs.put("first", b"1")
        ctx.blobs.put("second", b"2")
        ctx.db.execute(text("SELECT 1"))
        ctx.blobs.put("third", b"3")  # on SQLite the write lock is held now: no cleanup row
    assert outbox.status().pending == 0
    time.sleep(0.02)  # past orphan_after: a forgotten cleanup row would now be due
    outbox.relay().run_once()
    assert [store.get(k) for k in ("first", "second", "third")] == [b"1", b"2", b"3"]
    db.dispose()

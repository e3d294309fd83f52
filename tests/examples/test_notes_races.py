"""Requests and index jobs racing for one note, on PostgreSQL, made deterministic.

Each test runs one party in a context held open (its writes done, not yet
committed), starts the other in a thread, waits until PostgreSQL reports that
session waiting for a lock, then commits the first. Without the note's row
lock (``Notes._lock``) the second party did not wait for the first as a
whole but only for some rows, then wrote against what the first had just
committed: a unique or foreign key violation (a 500 over HTTP). With it,
they take turns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from notes import NotesApp, Settings, build
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from polydatum.errors import NotFound
from tests.support.sql import fresh_postgres_database

WAIT = 20.0  # seconds: a ceiling for the second party to reach its lock, never a pass/fail timing
JOB = {"task_id": "test-index-job"}  # the meta of a background job's context


class Racy:
    """The app on a fresh PostgreSQL database, one user and an indexed note."""

    def __init__(self, app: NotesApp, database_url: str) -> None:
        self.app = app
        self.database_url = database_url
        with app.dm.dal() as dal:
            self.user = {"user": dal.users.sign_up("racer")["id"]}
        with app.dm.dal(meta=self.user) as dal:
            notebook = dal.notebooks.add("inbox")
            # Celery is eager here: the note's index job runs right after this commit.
            self.note_id: int = dal.notes.add(notebook["id"], "racy", "alpha beta beta")["id"]

    def race(
        self,
        first: tuple[dict[str, Any], Callable[[Any], Any]],
        second: tuple[dict[str, Any], Callable[[Any], Any]],
    ) -> tuple[Any, Any]:
        """Run ``first`` up to its commit, ``second`` until it waits for a lock, then commit ``first``.

        Returns ``first``'s result and ``second``'s result or exception.
        """
        outcome: dict[str, Any] = {}

        def run_second() -> None:
            meta, call = second
            try:
                with self.app.dm.dal(meta=meta) as dal:
                    outcome["result"] = call(dal)
            except Exception as exc:  # handed to the test
                outcome["result"] = exc

        meta, call = first
        with self.app.dm.dal(meta=meta) as dal:
            first_result = call(dal)
            thread = threading.Thread(target=run_second, name="notes-race-second", daemon=True)
            thread.start()
            self.wait_until_a_session_waits_for_a_lock(thread)
        thread.join(WAIT)
        assert not thread.is_alive(), "the second party did not finish after the first committed"
        return first_result, outcome["result"]

    def wait_until_a_session_waits_for_a_lock(self, thread: threading.Thread) -> None:
        engine = create_engine(self.database_url, poolclass=NullPool)
        deadline = time.monotonic() + WAIT
        try:
            with engine.connect() as conn:
                while time.monotonic() < deadline:
                    waiting = conn.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE datname = :d AND wait_event_type = 'Lock'"
                        ),
                        {"d": make_url(self.database_url).database},
                    ).scalar_one()
                    conn.rollback()
                    if waiting:
                        return
                    assert thread.is_alive(), "the second party finished without waiting for the first"
                    time.sleep(0.01)
        finally:
            engine.dispose()
        raise AssertionError(f"the second party was not waiting for a lock after {WAIT} s")

    def words(self) -> dict[str, int]:
        from notes.models import NoteWord

        with self.app.db.session() as session:
            rows = session.scalars(select(NoteWord).where(NoteWord.note_id == self.note_id))
            return {row.word: row.count for row in rows}

    def count(self, table: str) -> int:
        with self.app.db.session() as session:
            return int(session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


@pytest.fixture
def racy(postgres_url: str, tmp_path: Path) -> Iterator[Racy]:
    with fresh_postgres_database(postgres_url) as database_url:
        app = build(Settings.from_env({"NOTES_DATA": str(tmp_path), "DATABASE_URL": database_url}))
        try:
            app.create_tables()
            yield Racy(app, database_url)
        finally:
            app.close()


def test_two_index_jobs_for_one_note_take_turns(racy: Racy) -> None:
    # A create's job and an edit's job, say: both used to delete the words, then both insert them.
    index = (JOB, lambda dal: dal.notes.build_index(racy.note_id))
    first, second = racy.race(index, index)
    assert first == second == 2
    assert racy.words() == {"alpha": 1, "beta": 2}


def test_a_delete_waits_for_the_index_job(racy: Racy) -> None:
    # The job's new words used to be committed between the delete's DELETE of them and of the note.
    index = (JOB, lambda dal: dal.notes.build_index(racy.note_id))
    remove = (racy.user, lambda dal: dal.notes.remove(racy.note_id))
    assert racy.race(index, remove) == (2, None)
    assert racy.count("notes") == racy.count("note_words") == racy.count("note_index") == 0


def test_an_index_job_for_a_note_being_deleted_finds_it_gone(racy: Racy) -> None:
    remove = (racy.user, lambda dal: dal.notes.remove(racy.note_id))
    index = (JOB, lambda dal: dal.notes.build_index(racy.note_id))
    assert racy.race(remove, index) == (None, None)  # the job returns quietly, as for any deleted note
    assert racy.count("notes") == racy.count("note_words") == racy.count("note_index") == 0


def test_an_attach_to_a_note_being_deleted_is_not_found(racy: Racy) -> None:
    remove = (racy.user, lambda dal: dal.notes.remove(racy.note_id))
    attach = (racy.user, lambda dal: dal.notes.attach(racy.note_id, "late.txt", b"too late"))
    _, error = racy.race(remove, attach)
    assert isinstance(error, NotFound), error
    assert str(error) == f"note {racy.note_id} not found"
    assert racy.count("attachments") == 0
    assert list(racy.app.blobs.list("notes/")) == []  # the attach's blob went with its rollback


def test_a_delete_after_an_attach_deletes_the_attachment_too(racy: Racy) -> None:
    # The delete used to list the note's attachments before the attach committed, and then
    # fail on the foreign key of the attachment it had not seen.
    attach = (racy.user, lambda dal: dal.notes.attach(racy.note_id, "early.txt", b"just in time"))
    remove = (racy.user, lambda dal: dal.notes.remove(racy.note_id))
    attachment, result = racy.race(attach, remove)
    assert result is None
    assert racy.count("notes") == racy.count("attachments") == 0
    assert attachment["note_id"] == racy.note_id
    assert list(racy.app.blobs.list("notes/")) == []  # its blob went after the delete's commit


def test_a_detach_of_an_attachment_of_a_note_being_deleted_is_not_found(racy: Racy) -> None:
    # The detach used to delete a row the note's delete had deleted first: StaleDataError, a 500.
    with racy.app.dm.dal(meta=racy.user) as dal:
        attachment = dal.notes.attach(racy.note_id, "doomed.txt", b"bytes")
    remove = (racy.user, lambda dal: dal.notes.remove(racy.note_id))
    detach = (racy.user, lambda dal: dal.notes.detach(attachment["id"]))
    _, error = racy.race(remove, detach)
    assert isinstance(error, NotFound), error
    assert racy.count("notes") == racy.count("attachments") == 0
    assert list(racy.app.blobs.list("notes/")) == []

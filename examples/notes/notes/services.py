"""The business logic: one service per kind of thing, all called through the DAL.

Services never commit, never delete blobs and never send jobs themselves;
they *ask* for it, and the context does it once the unit of work is durable:

- SQL goes through ``self.session`` (the context's session, committed by the
  transaction middleware when the context ends cleanly);
- blobs go through ``self._ctx.blobs`` (a put is undone if the context fails,
  a delete waits for its commit);
- cached reads are invalidated with ``self.read.invalidate(...)`` (deleted
  from the cache on commit);
- jobs are sent with ``.delay()`` inside the context (sent on commit by
  :mod:`polydatum.celery`).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import IO, Any

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from polydatum import Service
from polydatum.blob import BlobStore
from polydatum.cache import cached
from polydatum.dal import DataAccessLayer
from polydatum.errors import ConcurrencyConflict, NotFound
from polydatum.sqlalchemy import Page, Store

from notes.auth import BadRequest, Conflict, job_only, make_token, owns, public, self_only, signed_in
from notes.models import Attachment, Note, Notebook, NoteIndex, NoteWord, User

logger = logging.getLogger("notes.services")

WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
MAX_TITLE = 200
MAX_TEXT = 100_000


def words_of(text: str) -> Counter[str]:
    """The words of ``text`` (lower-cased, at least 2 characters) and how often each occurs."""
    return Counter(w for w in (m.lower() for m in WORD.findall(text)) if 2 <= len(w) <= 100)


def _blobs(service: Service) -> BlobStore:
    # Resources are attributes the DataManager adds at run time; this names their type.
    name = "blobs"
    store: BlobStore = getattr(service._ctx, name)
    return store


def _jobs(service: Service) -> Any:
    name = "jobs"
    return getattr(service._ctx, name)


def _dal(service: Service) -> DataAccessLayer:
    dal = service._dal
    assert dal is not None  # set when the service was registered
    return dal


def _text(value: Any, what: str, limit: int, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        msg = f"{what} must be a{'' if empty else ' non-empty'} string"
        raise BadRequest(msg)
    if len(value) > limit:
        msg = f"{what} is longer than {limit} characters"
        raise BadRequest(msg)
    # Checked here, not left to the database: PostgreSQL refuses NUL in text and the driver
    # cannot encode a lone surrogate (valid JSON: "\ud800"); both would be a 500, not a 400.
    if "\x00" in value:
        msg = f"{what} contains a NUL character (\\u0000); remove it"
        raise BadRequest(msg)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        msg = f"{what} is not valid Unicode (a lone surrogate such as \\ud800); send UTF-8 text"
        raise BadRequest(msg) from None
    return value


class Users(Store[User]):
    """Sign-up and the caller's own profile."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self._secret = secret

    @public
    def sign_up(self, name: Any) -> dict[str, Any]:
        """Create a user; returns the API token the user authenticates with.

        Raises:
            BadRequest: the name is empty or too long.
            Conflict: the name is taken.
        """
        name = _text(name, "name", 80).strip()
        taken = f"the user name {name!r} is taken; choose another"
        if self.exists({"name": name}):
            raise Conflict(taken)
        try:
            user = self.create(name=name)
        except IntegrityError:  # taken by a concurrent sign-up since the check above
            raise Conflict(taken) from None
        return {"id": user.id, "name": user.name, "token": make_token(self._secret, user.id)}

    @self_only
    def profile(self, user_id: int) -> dict[str, Any]:
        """A user's profile with their note count; only your own (the auth middleware checks).

        Raises:
            Forbidden: ``user_id`` is someone else.
        """
        user = self.require(user_id)
        return {"id": user.id, "name": user.name, "note_count": _dal(self).notes.count_for(user_id)}


class Notebooks(Store[Notebook]):
    """The caller's notebooks."""

    @signed_in
    def add(self, name: Any) -> dict[str, Any]:
        """Create a notebook owned by the caller."""
        notebook = self.create(owner_id=self._ctx.meta.user, name=_text(name, "name", MAX_TITLE))
        return _notebook(notebook)

    @signed_in
    def mine(self) -> list[dict[str, Any]]:
        """The caller's notebooks, oldest first."""
        return [_notebook(n) for n in self.search({"owner_id": self._ctx.meta.user}, order_by="id")]

    @owns("notebook")
    def notes(self, notebook_id: int, *, limit: int = 50, after: str | None = None) -> dict[str, Any]:
        """One page of a notebook's notes, newest first; ``next`` is the cursor of the next page."""
        try:
            page = _dal(self).notes.in_notebook(notebook_id, limit=limit, after=after)
        except ValueError as exc:  # a bad limit or cursor from the query string
            raise BadRequest(str(exc)) from None
        return {"notes": [_summary(n) for n in page], "next": page.next_cursor}


class Notes(Store[Note]):
    """Notes: versioned edits, attachments in the blob store, cached reads, a word index."""

    @owns("notebook")
    def add(self, notebook_id: int, title: Any, text: Any = "") -> dict[str, Any]:
        """Create a note in one of the caller's notebooks; its word index is built after commit."""
        user = self._ctx.meta.user
        note = self.create(
            notebook_id=notebook_id,
            owner_id=user,
            title=_text(title, "title", MAX_TITLE),
            text=_text(text, "text", MAX_TEXT, empty=True),
        )
        self.count_for.invalidate(user)
        _jobs(self).index_note.delay(note.id)  # sent when this context commits
        logger.info("note %d added to notebook %d", note.id, notebook_id)
        return self._describe(note)

    @owns("notebook")
    def in_notebook(self, notebook_id: int, *, limit: int, after: str | None) -> Page[Note]:
        """A page of a notebook's notes, newest first (keyset pagination)."""
        return self.search({"notebook_id": notebook_id}, order_by="-id", limit=limit, after=after)

    @owns("notebook")
    def add_many(self, notebook_id: int, items: Iterable[Mapping[str, str]]) -> int:
        """Bulk-create notes (for seeding) with their word index built inline, not by jobs."""
        user = self._ctx.meta.user
        rows = [
            {
                "notebook_id": notebook_id,
                "owner_id": user,
                "title": _text(i["title"], "title", MAX_TITLE),
                "text": _text(i["text"], "text", MAX_TEXT, empty=True),
                "version": 1,
            }
            for i in items
        ]
        if not rows:
            return 0
        # Bulk statements, not one ORM object per row: seeding 100,000 notes stays quick.
        session = self.session
        ids = session.scalars(insert(Note).returning(Note.id, sort_by_parameter_order=True), rows).all()
        words = [
            {"note_id": i, "word": w, "count": c}
            for i, row in zip(ids, rows, strict=True)
            for w, c in words_of(row["text"]).items()
        ]
        if words:
            session.execute(insert(NoteWord), words)
        session.execute(insert(NoteIndex), [{"note_id": i, "version": 1} for i in ids])
        self.count_for.invalidate(user)
        return len(ids)

    @cached(ttl=300, key="note:{note_id}")
    @owns("note")
    def read(self, note_id: int) -> dict[str, Any]:
        """A note with its attachments and index state: a hot read, served from the cache."""
        return self._describe(self.require(note_id))

    def _describe(self, note: Note) -> dict[str, Any]:
        attachments = self.session.scalars(
            select(Attachment).where(Attachment.note_id == note.id).order_by(Attachment.id)
        )
        index = self.session.get(NoteIndex, note.id)
        return {
            **_summary(note),
            "text": note.text,
            "attachments": [_attachment(a) for a in attachments],
            "indexed_version": None if index is None else index.version,
        }

    @owns("note")
    def edit(self, note_id: int, *, version: Any, title: Any = None, text: Any = None) -> dict[str, Any]:
        """Change a note the caller saw at ``version``.

        Raises:
            ConcurrencyConflict: someone changed it since (HTTP 409).
        """
        if isinstance(version, bool) or not isinstance(version, int):
            msg = "version must be the integer version of the note you edited"
            raise BadRequest(msg)
        values = {}
        if title is not None:
            values["title"] = _text(title, "title", MAX_TITLE)
        if text is not None:
            values["text"] = _text(text, "text", MAX_TEXT, empty=True)
        note = self.update(note_id, expected_version=version, **values)
        self.read.invalidate(note_id)
        _jobs(self).index_note.delay(note.id)
        return self._describe(note)

    @owns("note")
    def remove(self, note_id: int, *, version: int | None = None) -> None:
        """Delete a note, its word index and its attachments.

        The attachments' blobs are deleted once this context commits: if
        anything below fails, they are all still there.

        Raises:
            NotFound: a concurrent request deleted the note first.
            ConcurrencyConflict: ``version`` is given and the note is at another one.
        """
        # Locked first: an attach or an index job of this note waits for this delete (and then
        # finds the note gone), or this delete waits for them and sees the rows they wrote.
        note = self._lock(note_id)
        if version is not None and version != note.version:
            msg = f"note {note_id} is at version {note.version}, not {version}; reload it"
            raise ConcurrencyConflict(msg)
        session = self.session
        for attachment in session.scalars(select(Attachment).where(Attachment.note_id == note_id)):
            _blobs(self).delete(attachment.key)  # waits for the commit
            session.delete(attachment)
        session.flush()  # the attachment rows go before the note they point to
        session.execute(delete(NoteWord).where(NoteWord.note_id == note_id))
        session.execute(delete(NoteIndex).where(NoteIndex.note_id == note_id))
        session.delete(note)
        session.flush()
        self.read.invalidate(note_id)
        self.count_for.invalidate(note.owner_id)

    @owns("note")
    def attach(
        self, note_id: int, name: Any, data: IO[bytes] | bytes, content_type: str | None = None
    ) -> dict[str, Any]:
        """Store ``data`` as an attachment of the note (streamed into the blob store).

        Raises:
            NotFound: the note was deleted while the data was being stored.
        """
        name = _text(name, "name", MAX_TITLE)
        content_type = _text(content_type or "application/octet-stream", "content type", 200)
        # A key of our own making: user-supplied names never reach the store's paths.
        key = f"notes/{note_id}/{uuid.uuid4().hex}"
        size = _blobs(self).put(key, data, content_type=content_type)  # removed again on rollback
        # Locked only now that the upload is done (holding the lock through it would make a
        # delete of the note wait that long). A shared lock: attaches and edits go on meanwhile.
        self._lock(note_id, shared=True)
        attachment = Attachment(
            note_id=note_id,
            owner_id=self._ctx.meta.user,
            name=name,
            content_type=content_type,
            size=size,
            key=key,
        )
        self.session.add(attachment)
        self.session.flush()
        self.read.invalidate(note_id)
        return _attachment(attachment)

    @owns("attachment")
    def open_attachment(self, attachment_id: int) -> tuple[dict[str, Any], IO[bytes]]:
        """An attachment's description and a stream of its bytes (close it when done)."""
        attachment = self.session.get(Attachment, attachment_id)
        assert attachment is not None  # checked by the auth middleware
        return _attachment(attachment), _blobs(self).open(attachment.key)

    @owns("attachment")
    def detach(self, attachment_id: int) -> None:
        """Delete an attachment; its blob goes once this context commits.

        Raises:
            NotFound: a concurrent request deleted it (or its note) first.
        """
        attachment = self.session.get(Attachment, attachment_id)
        assert attachment is not None  # checked by the auth middleware
        # Like remove(): lock the note, then re-read what a concurrent delete may have removed.
        self._lock(attachment.note_id)
        attachment = self.session.get(Attachment, attachment_id, populate_existing=True)
        if attachment is None:
            msg = f"attachment {attachment_id} not found"
            raise NotFound(msg)
        _blobs(self).delete(attachment.key)
        self.session.delete(attachment)
        self.session.flush()
        self.read.invalidate(attachment.note_id)

    @cached(ttl=300, key="count:{user_id}")
    @self_only  # checked by the middleware on every call, cached or not
    def count_for(self, user_id: int) -> int:
        """How many notes ``user_id`` has, only your own: cached, invalidated when one is added or removed.

        Raises:
            Forbidden: ``user_id`` is someone else.
        """
        return self.count({"owner_id": user_id})

    @owns("note")
    def words(self, note_id: int) -> dict[str, Any]:
        """The note's word index, as the background job built it."""
        index = self.session.get(NoteIndex, note_id)
        rows = self.session.scalars(
            select(NoteWord).where(NoteWord.note_id == note_id).order_by(NoteWord.count.desc(), NoteWord.word)
        )
        return {
            "note_id": note_id,
            "indexed_version": None if index is None else index.version,
            "words": {row.word: row.count for row in rows},
        }

    @signed_in
    def find(self, word: Any, *, limit: int = 50) -> list[dict[str, Any]]:
        """The caller's notes containing ``word`` (by the word index), most occurrences first."""
        word = _text(word, "word", 100).strip().lower()
        stmt = (
            select(Note)
            .join(NoteWord, NoteWord.note_id == Note.id)
            .where(NoteWord.word == word, Note.owner_id == self._ctx.meta.user)
            .order_by(NoteWord.count.desc(), Note.id)
            .limit(max(1, min(limit, 200)))
        )
        return [_summary(n) for n in self.session.scalars(stmt)]

    @job_only
    def build_index(self, note_id: int) -> int | None:
        """Rebuild the word index of a note (the background job); None when the note is gone."""
        # Locked: two jobs for one note (a create, then an edit) take turns instead of both
        # deleting and then both inserting its words, and a delete of the note waits for this.
        try:
            note = self._lock(note_id)
        except NotFound:
            return None  # deleted before (or while waiting for) the job: nothing to index
        self._index(note)
        self.read.invalidate(note_id)
        return len(words_of(note.text))

    def _lock(self, note_id: int, *, shared: bool = False) -> Note:
        """The note, read again and locked until this context ends.

        On PostgreSQL a row lock: ``FOR UPDATE`` for those who change what hangs off the note
        (deletes, the index job), so they take turns; ``shared`` takes ``FOR KEY SHARE``, which
        only keeps the note from being deleted (for adding an attachment). SQLite has no row
        locks and needs none: its writers take turns anyway (``BEGIN IMMEDIATE``).

        Raises:
            NotFound: the note is gone (deleted by a request that committed meanwhile).
        """
        lock: dict[str, bool] | bool = {"read": True, "key_share": True} if shared else True
        # populate_existing: read the row now, not the copy the auth check loaded earlier.
        note = self.session.get(Note, note_id, with_for_update=lock, populate_existing=True)
        if note is None:
            msg = f"note {note_id} not found"
            raise NotFound(msg)
        return note

    def _index(self, note: Note) -> None:
        session = self.session
        session.execute(delete(NoteWord).where(NoteWord.note_id == note.id))
        session.add_all(NoteWord(note_id=note.id, word=w, count=c) for w, c in words_of(note.text).items())
        index = session.get(NoteIndex, note.id)
        if index is None:
            session.add(NoteIndex(note_id=note.id, version=note.version))
        else:
            index.version = note.version
        session.flush()


def _notebook(notebook: Notebook) -> dict[str, Any]:
    return {"id": notebook.id, "name": notebook.name}


def _summary(note: Note) -> dict[str, Any]:
    return {"id": note.id, "notebook_id": note.notebook_id, "title": note.title, "version": note.version}


def _attachment(attachment: Attachment) -> dict[str, Any]:
    return {
        "id": attachment.id,
        "note_id": attachment.note_id,
        "name": attachment.name,
        "content_type": attachment.content_type,
        "size": attachment.size,
        "url": f"/attachments/{attachment.id}",
    }

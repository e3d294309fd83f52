"""The example's endpoints that the load uses, by hand: a Session per request, explicit after-commit steps.

Each view opens a session, does its checks and statements, commits (or
rolls back and undoes what it did outside the database), then delivers the
outbox rows it wrote: the cache deletes, blob deletes and the Celery
message. Statuses, bodies and error texts are the example's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import IO, Any, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response
from werkzeug.wsgi import wrap_file

from twin.models import Attachment, Note, Notebook, NoteIndex, NoteWord, User
from twin.resources import Resources

logger = logging.getLogger("twin.web")

MAX_ID = 2**31 - 1
MAX_JSON = 1024 * 1024
MAX_UPLOAD = 64 * 1024 * 1024
MAX_TITLE = 200
MAX_TEXT = 100_000
ID = f"int(min=1, max={MAX_ID})"

URLS = Map(
    [
        Rule("/users", endpoint="sign_up", methods=["POST"]),
        Rule("/notebooks", endpoint="add_notebook", methods=["POST"]),
        Rule(f"/notebooks/<{ID}:notebook_id>/notes", endpoint="add_note", methods=["POST"]),
        Rule(f"/notes/<{ID}:note_id>", endpoint="note", methods=["GET", "PUT", "DELETE"]),
        Rule(f"/notes/<{ID}:note_id>/attachments", endpoint="attach", methods=["POST"]),
        Rule(f"/attachments/<{ID}:attachment_id>", endpoint="attachment", methods=["GET"]),
    ]
)
T = TypeVar("T")
_OWNED: dict[str, Any] = {"note": Note, "notebook": Notebook, "attachment": Attachment}


class Error(Exception):
    """An answer with an HTTP error status and the example's JSON error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


def _error(status: int, message: str) -> Response:
    phrase = HTTPStatus(status).phrase
    return _json({"status": status, "error": phrase, "message": message}, status)


def _text(value: Any, what: str, limit: int, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise Error(400, f"{what} must be a{'' if empty else ' non-empty'} string")
    if len(value) > limit:
        raise Error(400, f"{what} is longer than {limit} characters")
    if "\x00" in value:
        raise Error(400, f"{what} contains a NUL character (\\u0000); remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        msg = f"{what} is not valid Unicode (a lone surrogate such as \\ud800); send UTF-8 text"
        raise Error(400, msg) from None
    return value


def _body(request: Request) -> dict[str, Any]:
    if (request.content_length or 0) > MAX_JSON:
        raise Error(413, f"the JSON body is larger than {MAX_JSON} bytes")
    return parse_json(request.get_data(cache=False))


def parse_json(body: bytes) -> dict[str, Any]:
    """The JSON object a request body holds (an empty body is ``{}``)."""
    try:
        data = json.loads(body or b"{}")
    except ValueError as exc:
        raise Error(400, f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise Error(400, "the body is JSON nested too deeply; send a flat JSON object") from None
    if not isinstance(data, dict):
        raise Error(400, "the body must be a JSON object")
    return data


def int_arg(value: str | None, name: str) -> int | None:
    """The query parameter ``name`` (``value``, None when absent) as an integer."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise Error(400, f"query parameter {name} must be an integer, got {value!r}") from None


def _summary(note: Note) -> dict[str, Any]:
    return {"id": note.id, "notebook_id": note.notebook_id, "title": note.title, "version": note.version}


def _attachment(a: Attachment) -> dict[str, Any]:
    return {
        "id": a.id,
        "note_id": a.note_id,
        "name": a.name,
        "content_type": a.content_type,
        "size": a.size,
        "url": f"/attachments/{a.id}",
    }


class Twin:
    """The WSGI application."""

    def __init__(self, resources: Resources, max_upload: int = MAX_UPLOAD) -> None:
        self.r = resources
        self.max_upload = max_upload

    # -- who is calling --------------------------------------------------------------------

    def token(self, user_id: int) -> str:
        """The example's API token: the user id and its HMAC-SHA256."""
        signature = hmac.new(self.r.secret.encode(), str(user_id).encode(), hashlib.sha256).hexdigest()
        return f"{user_id}.{signature}"

    def caller(self, header: str) -> int | None:
        """The user id of the bearer token in the ``Authorization`` header; None without one."""
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Error(401, "send the token as Authorization: Bearer <token>")
        token = token.strip()
        text = token.partition(".")[0]
        if text.isascii() and text.isdigit() and len(text) <= len(str(MAX_ID)):
            user = int(text)
            if 1 <= user <= MAX_ID and hmac.compare_digest(self.token(user), token):
                return user
        raise Error(401, "invalid API token; use the token POST /users returned")

    @staticmethod
    def signed_in(user: int | None, what: str) -> int:
        if user is None:
            raise Error(401, f"{what} needs a signed-in user; send Authorization: Bearer <token>")
        return user

    def owned(self, session: Session, user: int | None, kind: str, ident: int, what: str) -> Any:
        """The ``kind`` object ``ident`` if ``user`` owns it; someone else's is "not found" too."""
        user = self.signed_in(user, what)
        obj = session.get(_OWNED[kind], ident)
        if obj is None or obj.owner_id != user:
            raise Error(404, f"{kind} {ident!r} not found")
        return obj

    # -- one unit of work ------------------------------------------------------------------

    def unit(self, work: Callable[[Session, list[Any]], T], undo: list[Callable[[], object]]) -> T:
        """Run ``work`` in a new session: commit on success (then deliver), roll back on an error.

        ``undo`` holds what to take back outside the database after a rollback (an upload).
        """
        pending: list[Any] = []
        with self.r.sessions() as session:
            try:
                response = work(session, pending)
                session.commit()
            except BaseException:
                session.rollback()
                for step in reversed(undo):
                    step()
                raise
        self.r.outbox.deliver(pending)
        return response

    # -- the work of each endpoint: plain values in, plain data out (twin.asgi shares it) ---

    def sign_up(self, user: int | None, name_value: Any) -> dict[str, Any]:
        def work(session: Session, pending: list[Any]) -> dict[str, Any]:
            name = _text(name_value, "name", 80).strip()
            taken = f"the user name {name!r} is taken; choose another"
            if session.scalar(select(select(User.id).where(User.name == name).exists())):
                raise Error(409, taken)
            new = User(name=name)
            session.add(new)
            try:
                session.flush()
            except IntegrityError:
                raise Error(409, taken) from None
            return {"id": new.id, "name": new.name, "token": self.token(new.id)}

        return self.unit(work, [])

    def add_notebook(self, user: int | None, name_value: Any) -> dict[str, Any]:
        def work(session: Session, pending: list[Any]) -> dict[str, Any]:
            owner = self.signed_in(user, "notebooks.add")
            notebook = Notebook(owner_id=owner, name=_text(name_value, "name", MAX_TITLE))
            session.add(notebook)
            session.flush()
            return {"id": notebook.id, "name": notebook.name}

        return self.unit(work, [])

    def add_note(self, user: int | None, notebook_id: int, body: dict[str, Any]) -> dict[str, Any]:
        def work(session: Session, pending: list[Any]) -> dict[str, Any]:
            self.owned(session, user, "notebook", notebook_id, "notes.add")
            note = Note(
                notebook_id=notebook_id,
                owner_id=user,
                title=_text(body.get("title"), "title", MAX_TITLE),
                text=_text(body.get("text", ""), "text", MAX_TEXT, empty=True),
            )
            session.add(note)
            session.flush()
            self.r.invalidate(session, pending, f"count:{user}")
            self.r.index_later(session, pending, note.id)
            return self.describe(session, note)

        return self.unit(work, [])

    def describe(self, session: Session, note: Note) -> dict[str, Any]:
        attachments = session.scalars(
            select(Attachment).where(Attachment.note_id == note.id).order_by(Attachment.id)
        )
        index = session.get(NoteIndex, note.id)
        return {
            **_summary(note),
            "text": note.text,
            "attachments": [_attachment(a) for a in attachments],
            "indexed_version": None if index is None else index.version,
        }

    def read(self, user: int | None, note_id: int) -> Any:
        def work(session: Session, pending: list[Any]) -> Any:
            note = self.owned(session, user, "note", note_id, "notes.read")
            return self.r.cached(f"note:{note_id}", lambda: self.describe(session, note))

        return self.unit(work, [])

    def edit(self, user: int | None, note_id: int, body: dict[str, Any]) -> dict[str, Any]:
        def work(session: Session, pending: list[Any]) -> dict[str, Any]:
            note = self.owned(session, user, "note", note_id, "notes.edit")
            version = body.get("version")
            if isinstance(version, bool) or not isinstance(version, int):
                raise Error(400, "version must be the integer version of the note you edited")
            values = {}
            if body.get("title") is not None:
                values["title"] = _text(body["title"], "title", MAX_TITLE)
            if body.get("text") is not None:
                values["text"] = _text(body["text"], "text", MAX_TEXT, empty=True)
            if note.version != version:
                msg = (
                    f"Note {note_id!r} is at version {note.version}, not {version}: someone else "
                    "changed it; reload it and apply the change again"
                )
                raise Error(409, msg)
            for name, value in values.items():
                setattr(note, name, value)
            try:
                session.flush()
            except StaleDataError:
                msg = "the record was changed by someone else since it was read; reload it and try again"
                raise Error(409, msg) from None
            self.r.invalidate(session, pending, f"note:{note_id}")
            self.r.index_later(session, pending, note_id)
            return self.describe(session, note)

        return self.unit(work, [])

    def remove(self, user: int | None, note_id: int, version: int | None) -> None:
        def work(session: Session, pending: list[Any]) -> None:
            self.owned(session, user, "note", note_id, "notes.remove")
            # Locked first: an attach or an index job of this note waits for this delete.
            note = session.get(Note, note_id, with_for_update=True, populate_existing=True)
            if note is None:
                raise Error(404, f"note {note_id} not found")
            if version is not None and version != note.version:
                raise Error(409, f"note {note_id} is at version {note.version}, not {version}; reload it")
            for attachment in session.scalars(select(Attachment).where(Attachment.note_id == note_id)):
                self.r.delete_blob_later(session, pending, attachment.key)
                session.delete(attachment)
            session.flush()
            session.execute(delete(NoteWord).where(NoteWord.note_id == note_id))
            session.execute(delete(NoteIndex).where(NoteIndex.note_id == note_id))
            session.delete(note)
            session.flush()
            self.r.invalidate(session, pending, f"note:{note_id}")
            self.r.invalidate(session, pending, f"count:{note.owner_id}")

        self.unit(work, [])

    def attach(
        self, user: int | None, note_id: int, name_value: str, stream: IO[bytes], mimetype: str | None
    ) -> dict[str, Any]:
        undo: list[Callable[[], object]] = []

        def work(session: Session, pending: list[Any]) -> dict[str, Any]:
            self.owned(session, user, "note", note_id, "notes.attach")
            name = _text(name_value, "name", MAX_TITLE)
            content_type = _text(mimetype or "application/octet-stream", "content type", 200)
            key = f"notes/{note_id}/{uuid.uuid4().hex}"
            size, cleanup = self.r.put_blob(session, key, stream, content_type)
            undo.append(lambda: self.r.undo_put(key, cleanup))
            # A shared lock, taken after the upload: only keeps the note from being deleted.
            lock = {"read": True, "key_share": True}
            if session.get(Note, note_id, with_for_update=lock, populate_existing=True) is None:
                raise Error(404, f"note {note_id} not found")
            attachment = Attachment(
                note_id=note_id, owner_id=user, name=name, content_type=content_type, size=size, key=key
            )
            session.add(attachment)
            session.flush()
            self.r.invalidate(session, pending, f"note:{note_id}")
            return _attachment(attachment)

        return self.unit(work, undo)

    def open_attachment(self, user: int | None, attachment_id: int) -> tuple[Attachment, Any]:
        """The attachment's row and a stream of its blob; committed once the blob is open."""

        def work(session: Session, pending: list[Any]) -> tuple[Attachment, Any]:
            row: Attachment = self.owned(session, user, "attachment", attachment_id, "notes.open_attachment")
            stream = self.r.open_blob(row.key)
            if stream is None:
                raise Error(404, "blob not found")  # the example's BlobNotFound
            return row, stream

        return self.unit(work, [])

    # -- the WSGI endpoints ----------------------------------------------------------------

    def wsgi_sign_up(self, request: Request, user: int | None) -> Response:
        return _json(self.sign_up(user, _body(request).get("name")), 201)

    def wsgi_add_notebook(self, request: Request, user: int | None) -> Response:
        return _json(self.add_notebook(user, _body(request).get("name")), 201)

    def wsgi_add_note(self, request: Request, user: int | None, notebook_id: int) -> Response:
        return _json(self.add_note(user, notebook_id, _body(request)), 201)

    def wsgi_note(self, request: Request, user: int | None, note_id: int) -> Response:
        if request.method == "PUT":
            return _json(self.edit(user, note_id, _body(request)))
        if request.method == "DELETE":
            self.remove(user, note_id, int_arg(request.args.get("version"), "version"))
            return Response(status=204)
        return _json(self.read(user, note_id))

    def wsgi_attach(self, request: Request, user: int | None, note_id: int) -> Response:
        if (request.content_length or 0) > self.max_upload:
            raise Error(413, f"attachments are limited to {self.max_upload} bytes")
        name_value = request.args.get("name")
        if not name_value:
            raise Error(400, "name the attachment: POST /notes/<id>/attachments?name=photo.jpg")
        return _json(self.attach(user, note_id, name_value, request.stream, request.mimetype), 201)

    def wsgi_attachment(self, request: Request, user: int | None, attachment_id: int) -> Response:
        row, stream = self.open_attachment(user, attachment_id)
        response = Response(
            wrap_file(request.environ, stream),
            mimetype=row.content_type,
            direct_passthrough=True,
        )
        response.content_length = row.size
        response.headers["Content-Disposition"] = disposition(row.name)
        return response

    # -- WSGI ------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        request.max_content_length = self.max_upload if request.path.endswith("/attachments") else MAX_JSON
        try:
            user = self.caller(request.headers.get("Authorization", ""))
            endpoint, args = URLS.bind_to_environ(environ).match()
            response = getattr(self, f"wsgi_{endpoint}")(request, user, **args)
        except Error as exc:
            response = _error(exc.status, str(exc))
        except HTTPException as exc:
            code = exc.code or 500
            response = _json({"status": code, "error": exc.name, "message": exc.description}, code)
        except OperationalError:
            logger.warning("database unavailable during %s %s", request.method, request.path, exc_info=True)
            response = _error(503, "the database is unavailable; try again shortly")
        body: Iterable[bytes] = response(environ, start_response)
        return body


def disposition(name: str) -> str:
    """The Content-Disposition of a fetched attachment."""
    from urllib.parse import quote

    return f"attachment; filename*=UTF-8''{quote(name)}"

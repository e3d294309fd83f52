"""The apps benchmarks/load.py serves with gunicorn, and with uvicorn (one module, imported by each worker).

``polydatum_app()``: the notes example (``notes.build(Settings.from_env()).wsgi()``),
plus the test-only slow route of tests/load/faults.py when ``LOAD_SLOW_ROUTE=1``.

``twin_app()``: benchmarks/twin, the feature-equal hand-written twin of the
example (same statements, locks, checks, cache, blob and Celery work); what
``load.py --twin`` compares the example with.

``polydatum_asgi_app()`` and ``twin_asgi_app()``: the same pair as ASGI
apps (FastAPI: notes.asgi and benchmarks/twin/asgi.py), for ``load.py
--twin --asgi`` under uvicorn.

``hand_app()`` (superseded by the twin, kept for ``load.py``'s older
"framework share" part): the endpoints the load uses, written by hand on the same
tables, servers and statements, with no polydatum: a SQLAlchemy ORM Session
per request on the example's own models (so the same SQL as the example's
Store), committed by hand,
redis-py for the same cached read and invalidations, boto3 for the blobs
(deleted by hand when the transaction fails, or after it commits), and
Celery's ``send_task`` after the commit for the index job. Tokens are the
example's (the same HMAC). What it leaves out is what polydatum gives: the
context, the DAL and its middleware (auth as method middleware), the
resources and the hooks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import uuid
from typing import Any

from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response


def twin_app() -> Any:
    """The feature-equal hand-written twin of the example (benchmarks/twin), on its own cache namespace."""
    import twin

    return twin.wsgi()


def _threads(app: Any) -> Any:
    """``app`` with FastAPI's thread pool limited to ``LOAD_ASGI_THREADS`` threads (when set).

    anyio's default is 40 threads per process, more than the 15 connections
    of a SQLAlchemy pool: ``load.py --twin --asgi --threads 8`` serves with
    gunicorn's 8 threads per worker instead.
    """
    threads = int(os.environ.get("LOAD_ASGI_THREADS") or 0)
    if not threads:
        return app
    from contextlib import asynccontextmanager

    import anyio.to_thread

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(api: Any) -> Any:
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        async with inner(api) as state:
            yield state

    app.router.lifespan_context = lifespan
    return app


def twin_asgi_app() -> Any:
    """The FastAPI twin (benchmarks/twin/asgi.py), for ``uvicorn --factory``."""
    from twin.asgi import create_app

    return _threads(create_app())


def polydatum_asgi_app() -> Any:
    """The example's ASGI API (notes.asgi), for ``uvicorn --factory``."""
    from notes.asgi import create_app

    return _threads(create_app())


def polydatum_app() -> Any:
    from notes import Settings, build

    app = build(Settings.from_env())
    wsgi = app.wsgi()
    if os.environ.get("LOAD_SLOW_ROUTE") == "1":
        from tests.load.faults import with_slow_route

        wsgi = with_slow_route(app, wsgi)
    return wsgi


URLS = Map(
    [
        Rule("/users", endpoint="sign_up", methods=["POST"]),
        Rule("/notebooks", endpoint="notebooks", methods=["POST"]),
        Rule("/notebooks/<int:notebook_id>/notes", endpoint="add_note", methods=["POST"]),
        Rule("/notes/<int:note_id>", endpoint="note", methods=["GET", "PUT", "DELETE"]),
        Rule("/notes/<int:note_id>/attachments", endpoint="attach", methods=["POST"]),
        Rule("/attachments/<int:attachment_id>", endpoint="attachment", methods=["GET"]),
    ]
)


class Error(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def hand_app() -> Any:
    import boto3
    import redis
    from botocore.config import Config
    from celery import Celery
    from notes.models import Attachment, Note, Notebook, NoteIndex, NoteWord, User
    from sqlalchemy import create_engine, delete, select
    from sqlalchemy.orm import Session, sessionmaker
    from sqlalchemy.orm.exc import StaleDataError

    secret = os.environ.get("SECRET_KEY", "polydatum-notes-development-key")
    url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url, pool_pre_ping=True)
    sessions = sessionmaker(engine, expire_on_commit=False)
    cache = redis.Redis.from_url(os.environ["REDIS_URL"])
    namespace = "hand"
    bucket, _, prefix = os.environ["BLOB_URL"].removeprefix("s3://").partition("/")
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        config=Config(connect_timeout=3, retries={"max_attempts": 2}),
    )
    broker = os.environ.get("CELERY_BROKER_URL")
    queue = os.environ.get("CELERY_QUEUE", "notes")
    celery = Celery("hand", broker=broker or "memory://", set_as_current=False)
    celery.conf.update(task_serializer="json", broker_connection_timeout=3)

    def token(user_id: int) -> str:
        return f"{user_id}.{hmac.new(secret.encode(), str(user_id).encode(), hashlib.sha256).hexdigest()}"

    def user_of(request: Request) -> int:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        user, _, _ = value.partition(".")
        if scheme.lower() == "bearer" and user.isdigit() and hmac.compare_digest(token(int(user)), value):
            return int(user)
        raise Error(401, "invalid API token")

    def body(request: Request) -> dict[str, Any]:
        try:
            data = json.loads(request.get_data() or b"{}")
        except ValueError:
            raise Error(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise Error(400, "the body must be a JSON object")
        return data

    def owned(session: Session, model: Any, ident: int, user: int) -> Any:
        obj = session.get(model, ident)
        if obj is None or obj.owner_id != user:
            raise Error(404, f"{model.__name__.lower()} {ident} not found")
        return obj

    def attachment_dict(a: Attachment) -> dict[str, Any]:
        return {
            "id": a.id,
            "note_id": a.note_id,
            "name": a.name,
            "content_type": a.content_type,
            "size": a.size,
            "url": f"/attachments/{a.id}",
        }

    def describe(session: Session, note: Note) -> dict[str, Any]:
        rows = session.scalars(
            select(Attachment).where(Attachment.note_id == note.id).order_by(Attachment.id)
        )
        index = session.get(NoteIndex, note.id)
        return {
            "id": note.id,
            "notebook_id": note.notebook_id,
            "title": note.title,
            "version": note.version,
            "text": note.text,
            "attachments": [attachment_dict(a) for a in rows],
            "indexed_version": None if index is None else index.version,
        }

    def text_field(value: Any, what: str, limit: int, empty: bool = False) -> str:
        if not isinstance(value, str) or (not empty and not value.strip()) or len(value) > limit:
            raise Error(400, f"{what} must be a string of at most {limit} characters")
        return value

    def index_later(note_id: int) -> None:
        if broker:
            celery.send_task("notes.index_note", args=[note_id], queue=queue)

    def json_response(data: Any, status: int = 200) -> Response:
        return Response(json.dumps(data), status=status, mimetype="application/json")

    def sign_up(request: Request) -> Response:
        name = text_field(body(request).get("name"), "name", 80)
        with sessions.begin() as session:
            user = User(name=name)
            session.add(user)
            session.flush()
        return json_response({"id": user.id, "name": name, "token": token(user.id)}, 201)

    def notebooks(request: Request) -> Response:
        user = user_of(request)
        name = text_field(body(request).get("name"), "name", 200)
        with sessions.begin() as session:
            notebook = Notebook(owner_id=user, name=name)
            session.add(notebook)
            session.flush()
        return json_response({"id": notebook.id, "name": name}, 201)

    def add_note(request: Request, notebook_id: int) -> Response:
        user = user_of(request)
        data = body(request)
        with sessions.begin() as session:
            owned(session, Notebook, notebook_id, user)
            note = Note(
                notebook_id=notebook_id,
                owner_id=user,
                title=text_field(data.get("title"), "title", 200),
                text=text_field(data.get("text", ""), "text", 100_000, True),
            )
            session.add(note)
            session.flush()
            result = describe(session, note)
        cache.delete(f"{namespace}:count:{user}")
        index_later(note.id)
        return json_response(result, 201)

    def note(request: Request, note_id: int) -> Response:
        user = user_of(request)
        if request.method == "GET":
            with sessions.begin() as session:
                row = owned(session, Note, note_id, user)
                cached = cache.get(f"{namespace}:note:{note_id}")
                if cached is not None:
                    return Response(cached, mimetype="application/json")
                result = describe(session, row)
            cache.set(f"{namespace}:note:{note_id}", json.dumps(result), ex=300)
            return json_response(result)
        if request.method == "PUT":
            data = body(request)
            version = data.get("version")
            if isinstance(version, bool) or not isinstance(version, int):
                raise Error(400, "version must be an integer")
            try:
                with sessions.begin() as session:
                    row = owned(session, Note, note_id, user)
                    if row.version != version:
                        raise Error(409, f"note {note_id} is at version {row.version}, not {version}")
                    row.text = text_field(data.get("text"), "text", 100_000, True)
                    session.flush()
                    result = describe(session, row)
            except StaleDataError:
                raise Error(409, f"note {note_id} changed meanwhile") from None
            cache.delete(f"{namespace}:note:{note_id}")
            index_later(note_id)
            return json_response(result)
        version = request.args.get("version", type=int)
        with sessions.begin() as session:
            row = owned(session, Note, note_id, user)
            keys = []
            for a in session.scalars(select(Attachment).where(Attachment.note_id == note_id)):
                keys.append(a.key)
                session.delete(a)
            session.flush()
            if version is not None and version != row.version:
                raise Error(409, f"note {note_id} is at version {row.version}")
            session.execute(delete(NoteWord).where(NoteWord.note_id == note_id))
            session.execute(delete(NoteIndex).where(NoteIndex.note_id == note_id))
            session.delete(row)
        for key in keys:  # after the commit: a failed delete keeps its blobs
            s3.delete_object(Bucket=bucket, Key=f"{prefix}/{key}")
        cache.delete(f"{namespace}:note:{note_id}", f"{namespace}:count:{user}")
        return Response(status=204)

    def attach(request: Request, note_id: int) -> Response:
        user = user_of(request)
        name = text_field(request.args.get("name"), "name", 200)
        key = f"notes/{note_id}/{uuid.uuid4().hex}"
        content_type = request.mimetype or "application/octet-stream"
        with sessions() as session:
            owned(session, Note, note_id, user)
            data = request.get_data()
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data, ContentType=content_type)
            try:
                attachment = Attachment(
                    note_id=note_id,
                    owner_id=user,
                    name=name,
                    content_type=content_type,
                    size=len(data),
                    key=key,
                )
                session.add(attachment)
                session.commit()
            except BaseException:
                s3.delete_object(Bucket=bucket, Key=f"{prefix}/{key}")
                raise
        cache.delete(f"{namespace}:note:{note_id}")
        return json_response(attachment_dict(attachment), 201)

    def attachment(request: Request, attachment_id: int) -> Response:
        user = user_of(request)
        with sessions.begin() as session:
            row = owned(session, Attachment, attachment_id, user)
        obj = s3.get_object(Bucket=bucket, Key=f"{prefix}/{row.key}")
        return Response(obj["Body"].read(), mimetype=row.content_type)

    views = {
        "sign_up": sign_up,
        "notebooks": notebooks,
        "add_note": add_note,
        "note": note,
        "attach": attach,
        "attachment": attachment,
    }

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        try:
            endpoint, args = URLS.bind_to_environ(environ).match()
            response = views[str(endpoint)](request, **args)
        except Error as exc:
            response = json_response({"status": exc.status, "message": str(exc)}, exc.status)
        except NotFound:
            response = json_response({"status": 404, "message": "no such route"}, 404)
        except HTTPException as exc:
            response = exc.get_response()
        return response(environ, start_response)

    return wsgi

"""The JSON API as an ASGI application: FastAPI over the same services and DAL as :mod:`notes.web`.

Serve it with ``uvicorn --factory notes.asgi:create_app`` (the environment
configures it as for ``notes serve``), or build it from a built app with
:func:`make_asgi_app` / :meth:`notes.NotesApp.asgi`.

:class:`~polydatum.asgi.PolydatumASGIMiddleware` opens each request's
context (``async with``), with the same meta as the WSGI API (the user of
the ``Authorization`` token, the route), commits it when the response
ended, rolls it back on a status >= 400 and turns ``ServiceError`` s into
the same JSON errors.

The services are synchronous (a SQLAlchemy ``Session``), so the endpoints
are plain ``def`` s: FastAPI runs them in its thread pool, which copies the
request's context variables, so ``Depends(dal_dependency(dm))`` gives the
request's DAL there. Each endpoint but the download is decorated with
:func:`~polydatum.asgi.commit_in_endpoint`: its unit of work is a context of
its own, committed (with its hooks) in the endpoint's thread before the
response is built, which saves the trip from the event loop to a COMMIT
thread. The download's context stays open until its last block is sent;
:func:`~polydatum.asgi.read_chunks` reads the blocks outside FastAPI's pool.
Bodies are parsed by hand rather than with pydantic models, so every answer
(and every error text) is the WSGI API's.

It serves the endpoints the load uses: sign-up, adding notebooks and
notes, reading, editing and deleting a note, attaching a file and fetching
it. The web pages and the other JSON endpoints are the WSGI app's.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations at run time.
import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException
from starlette.routing import Match
from werkzeug.exceptions import MethodNotAllowed, NotFound

from polydatum import DataAccessLayer
from polydatum.asgi import PolydatumASGIMiddleware, Scope, commit_in_endpoint, dal_dependency, read_chunks

from notes.auth import MAX_ID, BadRequest, PayloadTooLarge, Unauthorized, user_from_token
from notes.web import MAX_JSON, MAX_UPLOAD

if TYPE_CHECKING:
    from notes.app import NotesApp

__all__ = ["BodyReader", "create_app", "json_body", "make_asgi_app"]

logger = logging.getLogger("notes.asgi")

CHUNK = 64 * 1024  # bytes per body message of a fetched attachment

# The WSGI API answers these with Werkzeug's texts; so does this one.
_DESCRIPTIONS = {404: NotFound.description, 405: MethodNotAllowed.description}
_PLACEHOLDER = re.compile(r"{(\w+)(?::\w+)?}")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"status": status, "error": HTTPStatus(status).phrase, "message": message}
    return Response(json.dumps(body), status, headers, media_type="application/json")


def _content_length(request: Request) -> int:
    value = request.headers.get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() else 0


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object (at most ``MAX_JSON`` bytes), as the WSGI API reads it.

    Raises:
        PayloadTooLarge: the body is larger than ``MAX_JSON`` bytes.
        BadRequest: the body is not a JSON object.
    """
    too_large = f"the JSON body is larger than {MAX_JSON} bytes"
    if _content_length(request) > MAX_JSON:
        raise PayloadTooLarge(too_large)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_JSON:  # a chunked body declares no length
            raise PayloadTooLarge(too_large)
    try:
        parsed = json.loads(bytes(data) or b"{}")
    except ValueError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    except RecursionError:  # "[[[[…" nested deeper than the JSON decoder recurses
        msg = "the body is JSON nested too deeply; send a flat JSON object"
        raise BadRequest(msg) from None
    if not isinstance(parsed, dict):
        msg = "the body must be a JSON object"
        raise BadRequest(msg)
    return parsed


class BodyReader:
    """The request body as a blocking stream, for a ``def`` endpoint in the thread pool.

    Each ``read`` waits for the next body message on the event loop, so an
    upload is streamed into the blob store as it arrives (after the auth
    checks of the DAL call), never held whole in memory or on disk.

    Raises (from ``read``):
        PayloadTooLarge: more than ``limit`` bytes arrived.
    """

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, limit: int, too_large: str) -> None:
        self._chunks = request.stream()
        self._loop = loop
        self._limit = limit
        self._too_large = too_large
        self._buffer = bytearray()
        self._done = False
        self.received = 0

    async def _next(self) -> bytes | None:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left when ``size`` < 0); ``b""`` at the end."""
        while not self._done and (size < 0 or len(self._buffer) < size):
            # Called from a worker thread (FastAPI's pool, or boto3's transfer threads).
            chunk = asyncio.run_coroutine_threadsafe(self._next(), self._loop).result()
            if chunk is None:
                self._done = True
                break
            self.received += len(chunk)
            if self.received > self._limit:
                raise PayloadTooLarge(self._too_large)
            self._buffer += chunk
        if size < 0 or size >= len(self._buffer):
            data, self._buffer = bytes(self._buffer), bytearray()
        else:
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
        return data


def _int_arg(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be an integer, got {value!r}") from None


async def _ids_in_range(request: Request) -> None:
    # Ids are SQL INTEGER keys: a larger one matches no route (404), as in the WSGI API.
    for value in request.path_params.values():
        if isinstance(value, int) and not 1 <= value <= MAX_ID:
            raise HTTPException(404)


def make_asgi_app(app: "NotesApp", *, max_upload: int = MAX_UPLOAD) -> FastAPI:
    """The API as a FastAPI application, each request in a polydatum context of ``app.dm``.

    Args:
        app: the built application (closing it stays the caller's job).
        max_upload: the largest attachment accepted, in bytes (413 beyond).
    """
    api = FastAPI(
        title="polydatum notes",
        dependencies=[Depends(_ids_in_range)],
        openapi_url=None,  # the WSGI API publishes no schema either
        docs_url=None,
        redoc_url=None,
    )
    Dal = Annotated[DataAccessLayer, Depends(dal_dependency(app.dm))]
    Body = Annotated[dict[str, Any], Depends(json_body)]
    secret = app.settings.secret_key

    async def upload(request: Request) -> BodyReader:
        if _content_length(request) > max_upload:
            msg = f"attachments are limited to {max_upload} bytes"
            raise PayloadTooLarge(msg)
        if not request.query_params.get("name"):
            msg = "name the attachment: POST /notes/<id>/attachments?name=photo.jpg"
            raise BadRequest(msg)
        too_large = f"attachments are limited to {max_upload} bytes"
        return BodyReader(request, asyncio.get_running_loop(), max_upload, too_large)

    Upload = Annotated[BodyReader, Depends(upload)]

    @api.post("/users", status_code=201)
    @commit_in_endpoint
    def sign_up(body: Body, dal: Dal) -> Any:
        return dal.users.sign_up(body.get("name"))

    @api.post("/notebooks", status_code=201)
    @commit_in_endpoint
    def add_notebook(body: Body, dal: Dal) -> Any:
        return dal.notebooks.add(body.get("name"))

    @api.post("/notebooks/{notebook_id:int}/notes", status_code=201)
    @commit_in_endpoint
    def add_note(notebook_id: int, body: Body, dal: Dal) -> Any:
        return dal.notes.add(notebook_id, body.get("title"), body.get("text", ""))

    @api.get("/notes/{note_id:int}")
    @commit_in_endpoint
    def read_note(note_id: int, dal: Dal) -> Any:
        return dal.notes.read(note_id)

    @api.put("/notes/{note_id:int}")
    @commit_in_endpoint
    def edit_note(note_id: int, body: Body, dal: Dal) -> Any:
        return dal.notes.edit(
            note_id, version=body.get("version"), title=body.get("title"), text=body.get("text")
        )

    @api.delete("/notes/{note_id:int}", status_code=204)
    @commit_in_endpoint
    def remove_note(note_id: int, request: Request, dal: Dal) -> Response:
        dal.notes.remove(note_id, version=_int_arg(request, "version"))
        return Response(status_code=204)

    @api.post("/notes/{note_id:int}/attachments", status_code=201)
    @commit_in_endpoint
    def attach(note_id: int, request: Request, body: Upload, dal: Dal) -> Any:
        mimetype = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        return dal.notes.attach(note_id, request.query_params["name"], body, mimetype or None)

    @api.get("/attachments/{attachment_id:int}")
    def attachment(attachment_id: int, dal: Dal) -> StreamingResponse:
        info, stream = dal.notes.open_attachment(attachment_id)
        # Streamed: the context (and its connection) stays open until the body is sent, so the
        # blocks are read in polydatum's threads, not in the pool where endpoints wait for connections.
        headers = {"Content-Length": str(info["size"]), "Content-Disposition": _disposition(info["name"])}
        body = read_chunks(stream, CHUNK)
        return StreamingResponse(body, media_type=info["content_type"], headers=headers)

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        # No route (404), the wrong method (405): the WSGI API's JSON error.
        message = _DESCRIPTIONS.get(exc.status_code, exc.detail)
        return _error(exc.status_code, message, exc.headers)

    @api.exception_handler(OperationalError)
    async def unavailable(request: Request, exc: OperationalError) -> Response:
        # Down, restarting, out of connections, a deadlock: the client may retry.
        logger.warning("database unavailable during %s %s", request.method, request.url.path, exc_info=exc)
        return _error(503, "the database is unavailable; try again shortly")

    routes = [(route, _PLACEHOLDER.sub(r"{\1}", getattr(route, "path", ""))) for route in api.router.routes]

    def route_of(scope: Scope) -> str | None:
        """The matched route as a template (``/notes/{note_id}``), never the path: it names contexts."""
        for route, template in routes:
            if route.matches(scope)[0] is Match.FULL:
                return template
        return None

    def meta(scope: Scope) -> dict[str, Any]:
        # Verified without the database: the token is signed. A bad token is a 401
        # before any context opens.
        header = ""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        route = route_of(scope)
        if not header:
            return {"user": None, "route": route}
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            msg = "send the token as Authorization: Bearer <token>"
            raise Unauthorized(msg)
        return {"user": user_from_token(secret, token.strip()), "route": route}

    # Inside FastAPI's error handling: a ServiceError reaches it, and a rollback's answer is JSON.
    api.add_middleware(PolydatumASGIMiddleware, data_manager=app.dm, meta=meta)
    return api


def _disposition(name: str) -> str:
    from urllib.parse import quote

    return f"attachment; filename*=UTF-8''{quote(name)}"


def create_app() -> FastAPI:
    """The API of the application the environment configures (``uvicorn --factory notes.asgi:create_app``).

    Each worker process builds its own; the pools are closed when it stops.
    The schema is not migrated here (several workers would race): run
    ``polydatum-notes migrate`` first.
    """
    from notes.app import build
    from notes.config import Settings

    app = build(Settings.from_env())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(app.close)

    api = make_asgi_app(app)
    api.router.lifespan_context = lifespan
    return api

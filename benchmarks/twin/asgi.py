"""The twin's endpoints as a FastAPI app: the hand-written counterpart of ``notes.asgi``.

The same work as the WSGI twin (the methods of :class:`twin.web.Twin`: a
Session per request, try/commit/except/rollback, the outbox delivered
after the commit), served the way a FastAPI user writes it: plain ``def``
endpoints that FastAPI runs in its thread pool, dependencies for the
caller and the body, exception handlers for the JSON errors. Statuses,
bodies and error texts are the example's.

Serve it with ``uvicorn --factory twin.asgi:create_app`` (``benchmarks/`` on
the path) in the example's environment.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations at run time.
import asyncio
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import IO, Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed, NotFound

from twin.resources import Resources
from twin.web import MAX_ID, MAX_JSON, MAX_UPLOAD, Error, Twin, disposition, int_arg, parse_json

logger = logging.getLogger("twin.asgi")

CHUNK = 64 * 1024  # bytes per body message of a fetched attachment
_DESCRIPTIONS = {404: NotFound.description, 405: MethodNotAllowed.description}


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    from http import HTTPStatus

    body = {"status": status, "error": HTTPStatus(status).phrase, "message": message}
    return JSONResponse(body, status, headers)


def _content_length(request: Request) -> int:
    value = request.headers.get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() else 0


class Upload:
    """The request body as a blocking stream for the thread pool: each read waits on the event loop."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.name: str = request.query_params["name"]
        self.mimetype = request.headers.get("content-type", "").partition(";")[0].strip().lower() or None
        self._chunks = request.stream()
        self._loop = loop
        self._limit = limit
        self._buffer = bytearray()
        self._done = False
        self._received = 0

    async def _next(self) -> bytes | None:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._buffer) < size):
            chunk = asyncio.run_coroutine_threadsafe(self._next(), self._loop).result()
            if chunk is None:
                self._done = True
                break
            self._received += len(chunk)
            if self._received > self._limit:
                raise Error(413, f"attachments are limited to {self._limit} bytes")
            self._buffer += chunk
        if size < 0 or size >= len(self._buffer):
            data, self._buffer = bytes(self._buffer), bytearray()
        else:
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
        return data


def _blocks(stream: IO[bytes]) -> Iterator[bytes]:
    try:
        while block := stream.read(CHUNK):
            yield block
    finally:
        stream.close()


def make_app(twin: Twin) -> FastAPI:
    """The FastAPI app over ``twin``'s resources."""

    async def caller(request: Request) -> int | None:
        return twin.caller(request.headers.get("authorization", ""))

    async def ids_in_range(request: Request) -> None:
        for value in request.path_params.values():
            if isinstance(value, int) and not 1 <= value <= MAX_ID:
                raise HTTPException(404)

    async def body(request: Request) -> dict[str, Any]:
        too_large = f"the JSON body is larger than {MAX_JSON} bytes"
        if _content_length(request) > MAX_JSON:
            raise Error(413, too_large)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_JSON:
                raise Error(413, too_large)
        return parse_json(bytes(data))

    async def upload(request: Request) -> Upload:
        if _content_length(request) > twin.max_upload:
            raise Error(413, f"attachments are limited to {twin.max_upload} bytes")
        if not request.query_params.get("name"):
            raise Error(400, "name the attachment: POST /notes/<id>/attachments?name=photo.jpg")
        return Upload(request, asyncio.get_running_loop(), twin.max_upload)

    # The caller first, then the ids: a bad token is a 401 before a 404, as in the example.
    api = FastAPI(
        dependencies=[Depends(caller), Depends(ids_in_range)],
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    User = Annotated[int | None, Depends(caller)]
    Body = Annotated[dict[str, Any], Depends(body)]

    @api.post("/users", status_code=201)
    def sign_up(user: User, data: Body) -> Any:
        return twin.sign_up(user, data.get("name"))

    @api.post("/notebooks", status_code=201)
    def add_notebook(user: User, data: Body) -> Any:
        return twin.add_notebook(user, data.get("name"))

    @api.post("/notebooks/{notebook_id:int}/notes", status_code=201)
    def add_note(notebook_id: int, user: User, data: Body) -> Any:
        return twin.add_note(user, notebook_id, data)

    @api.get("/notes/{note_id:int}")
    def read_note(note_id: int, user: User) -> Any:
        return twin.read(user, note_id)

    @api.put("/notes/{note_id:int}")
    def edit_note(note_id: int, user: User, data: Body) -> Any:
        return twin.edit(user, note_id, data)

    @api.delete("/notes/{note_id:int}", status_code=204)
    def remove_note(note_id: int, request: Request, user: User) -> Response:
        twin.remove(user, note_id, int_arg(request.query_params.get("version"), "version"))
        return Response(status_code=204)

    @api.post("/notes/{note_id:int}/attachments", status_code=201)
    def attach(note_id: int, user: User, stream: Annotated[Upload, Depends(upload)]) -> Any:
        return twin.attach(user, note_id, stream.name, stream, stream.mimetype)  # type: ignore[arg-type]

    @api.get("/attachments/{attachment_id:int}")
    def attachment(attachment_id: int, user: User) -> StreamingResponse:
        row, stream = twin.open_attachment(user, attachment_id)
        headers = {"Content-Length": str(row.size), "Content-Disposition": disposition(row.name)}
        return StreamingResponse(_blocks(stream), media_type=row.content_type, headers=headers)

    @api.exception_handler(Error)
    async def error(request: Request, exc: Error) -> Response:
        return _error(exc.status, str(exc))

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        # Routing fails before the dependencies run; the token is still checked first.
        try:
            twin.caller(request.headers.get("authorization", ""))
        except Error as bad:
            return _error(bad.status, str(bad))
        return _error(exc.status_code, _DESCRIPTIONS.get(exc.status_code, exc.detail), exc.headers)

    @api.exception_handler(OperationalError)
    async def unavailable(request: Request, exc: OperationalError) -> Response:
        logger.warning("database unavailable during %s %s", request.method, request.url.path, exc_info=exc)
        return _error(503, "the database is unavailable; try again shortly")

    return api


def create_app(environ: Mapping[str, str] | None = None) -> FastAPI:
    """The twin as a FastAPI app, configured from ``environ`` (default: ``os.environ``)."""
    twin = Twin(Resources(environ), MAX_UPLOAD)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(twin.r.close)

    api = make_app(twin)
    api.router.lifespan_context = lifespan
    return api

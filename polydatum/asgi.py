"""ASGI: one async context per request or WebSocket
=================================================

:class:`PolydatumASGIMiddleware` is a pure ASGI middleware: it works with
Starlette, FastAPI or a bare ASGI callable, and imports none of them. Each
``http`` and ``websocket`` scope runs inside ``async with dm.context(meta)``;
``lifespan`` and any other scope type pass through untouched::

    from fastapi import Depends, FastAPI

    from polydatum import DataAccessLayer, DataManager, Service
    from polydatum.asgi import PolydatumASGIMiddleware, dal_dependency

    class Users(Service):
        async def get(self, user_id):
            return {"id": user_id, "asked_by": self._ctx.meta.request_id}

    dm = DataManager()
    dm.register_services(users=Users())

    app = FastAPI()
    app.add_middleware(PolydatumASGIMiddleware, data_manager=dm)

    @app.get("/users/{user_id}")
    async def get_user(user_id: int, dal: DataAccessLayer = Depends(dal_dependency(dm))):
        return await dal.users.get(user_id)

What it guarantees:

- **Meta** comes from the scope: ``request_id`` (the ``x-request-id``
  header when it is 1-200 printable ASCII characters, else 32 new random
  hex digits), ``remote_addr``, ``method`` and
  ``path``, with whatever your ``meta(scope)`` function (sync or async)
  returns merged over them.
- **Streaming-safe.** An HTTP context stays open while the app streams its
  body and ends when the app sends the last body message
  (``more_body`` false), *before* that message is passed to the server.
  The ``http.response.start`` message is held back until the first body
  message, so when a failed commit ends a response whose body is one
  message, the client gets the mapped error response; later, it gets a
  broken response. Never a false success. A WebSocket's context ends when
  the app returns.
- **Errors.** A :class:`~polydatum.errors.ServiceError` (``NotFound`` →
  404, ``ConcurrencyConflict`` → 409, any other ``code``) raised before the
  response went out becomes a JSON response ``{"status", "error",
  "message"}`` after the rollback; ``message`` is the error's
  ``public_message``, and a withheld message (or any 5xx) is logged on the
  ``polydatum`` logger. Anything else rolls back and propagates
  to the server. Add the middleware *inside* Starlette's error handling
  (``app.add_middleware``) so unhandled exceptions reach it before
  Starlette turns them into 500s.
- **Status rollback.** A response with status >= 400 rolls back although
  nothing raised (:class:`~polydatum.werkzeug.RollbackResponse` is thrown
  in; ``veto(status, headers) -> bool`` decides otherwise); a response the
  app never finished (the client went away) rolls back with
  ``ResponseIncomplete``. Neither signal reaches the server.

The guide is ``docs/integrations/asgi.md``.

.. versionadded:: 2.0
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from concurrent.futures import Executor
from inspect import isawaitable, iscoroutinefunction
from typing import Any, Protocol, TypeVar, cast

from polydatum import _factories
from polydatum._blocking import ElasticThreads, run_blocking
from polydatum._renamed import module_getattr
from polydatum._web import (
    JSON_HEADERS,
    ResponseIncomplete,
    RollbackResponse,
    Veto,
    check_arguments,
    client_message,
    current_exchange,
    default_veto,
    error_body,
    error_status,
    merge_meta,
    positions_from,
    request_context,
    request_id,
)
from polydatum.context import DataAccessContext
from polydatum.dal import DataAccessLayer, DataManager
from polydatum.errors import NoActiveContextError, ServiceError

__all__ = [
    "CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "SCOPE_KEY",
    "ASGIApp",
    "Message",
    "MetaFactory",
    "PolydatumASGIMiddleware",
    "Readable",
    "Receive",
    "ResponseIncomplete",
    "RollbackResponse",
    "Scope",
    "Send",
    "Veto",
    "commit_in_endpoint",
    "dal_dependency",
    "default_meta",
    "default_veto",
    "read_chunks",
    "request_context",
    "request_id",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: ``meta(scope) -> mapping`` (or an awaitable of one), merged over :func:`default_meta`.
MetaFactory = Callable[[Scope], "Mapping[str, Any] | Awaitable[Mapping[str, Any]]"]

#: The scope key under which the request's context is stored.
SCOPE_KEY = "polydatum.context"

F = TypeVar("F", bound=Callable[..., Any])
_UNSET: Any = object()

# The messages that end an HTTP response (trailers and pathsend are ASGI extensions).
_BODY = "http.response.body"
_TRAILERS = "http.response.trailers"
_PATHSEND = "http.response.pathsend"


def default_meta(scope: Scope) -> dict[str, Any]:
    """The meta every request's or WebSocket's context gets.

    Args:
        scope: the ASGI ``http`` or ``websocket`` scope.

    Returns:
        ``request_id`` (``x-request-id`` when it is 1-200 printable ASCII
        characters, else a new random 32-hex-digit id), ``remote_addr``,
        ``method`` (``GET`` for a WebSocket handshake) and ``path``.

    .. versionadded:: 2.0
    """
    given = None
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            break
    client = scope.get("client")
    return {
        "request_id": request_id(given),
        "remote_addr": client[0] if client else None,
        "method": scope.get("method", "GET"),
        "path": scope.get("path"),
    }


class PolydatumASGIMiddleware:
    """ASGI middleware: one async polydatum context per HTTP request or WebSocket.

    Args:
        app: the ASGI application to wrap.
        data_manager: the DataManager whose contexts the requests get.
        meta: ``meta(scope) -> mapping`` (sync or async) for each request's
            meta, merged over :func:`default_meta`; it may raise a
            :class:`~polydatum.errors.ServiceError` (say, 401) to refuse the
            request before any context opens (a WebSocket handshake is then
            refused: the server answers 403).
        veto: ``veto(status, headers) -> bool`` with headers as ``str``
            pairs; True rolls the context back. Defaults to
            :func:`default_veto` (status >= 400).
        positions: ``"cookie"`` or ``"header"``: read-your-writes across
            requests, as for :class:`polydatum.werkzeug.PolydatumWSGIMiddleware`.

    Raises:
        TypeError: ``app``, ``meta`` or ``veto`` is not callable, or
            ``data_manager`` is not a DataManager.
        ValueError: ``positions`` is not ``"cookie"``, ``"header"`` or None.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        app: ASGIApp,
        data_manager: DataManager,
        meta: MetaFactory | None = None,
        veto: Veto | None = None,
        positions: str | None = None,
    ) -> None:
        check_arguments(app, data_manager, meta, veto, kind="ASGI", meta_takes="the ASGI scope")
        self.positions = positions_from(positions)
        self.app = app
        self.data_manager = data_manager
        self.meta = meta
        self.veto: Veto = veto if veto is not None else default_veto

    def __repr__(self) -> str:
        return f"<PolydatumASGIMiddleware {self.app!r}>"

    async def build_meta(self, scope: Scope) -> dict[str, Any]:
        """The meta of the request in ``scope`` (defaults, then the user's function).

        Raises:
            TypeError: the meta function returned something that is not a mapping.
        """
        meta = default_meta(scope)
        if self.positions is not None:
            cookie = header = None
            for name, value in scope.get("headers", ()):
                if name == b"cookie":
                    cookie = value.decode("latin-1")
                elif name == b"x-polydatum-position":
                    header = value.decode("latin-1")
            sent = self.positions.incoming(cookie, header)
            if sent is not None:
                meta["min_position"] = sent
        if self.meta is not None:
            extra = self.meta(scope)
            if isawaitable(extra):
                extra = await extra
            merge_meta(meta, extra, self.meta)
        return meta

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)  # lifespan and unknown scopes pass through
            return
        try:
            ctx = self.data_manager.context(await self.build_meta(scope))
            await ctx.__aenter__()
        except ServiceError as exc:
            # Refused by the meta function or a context middleware's setup: no
            # context is open (the core closed it), only the answer is left.
            if kind == "http":
                await _send_error(send, exc)
            else:
                # Closing before accepting refuses the handshake (HTTP 403).
                # A close reason holds at most 123 bytes of UTF-8.
                text = client_message(error_status(exc) or 500, exc)
                reason = text.encode()[:123].decode("utf-8", "ignore")
                await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        exchange = _Exchange(self, ctx, send)
        token = current_exchange.set(exchange)
        scope = exchange.scope = {**scope, SCOPE_KEY: ctx}
        try:
            if kind == "http":
                await self.app(scope, receive, exchange.send)
            else:
                await self.app(scope, receive, send)
        except BaseException as exc:
            if exchange.exited:
                raise  # the context ended already (this may be its commit failing)
            final = await exchange.exit(exc)
            target = final if final is not None else exc
            if kind == "http" and not exchange.headers_sent and error_status(target) is not None:
                await _send_error(send, target)
                return
            raise target
        else:
            if not exchange.exited:
                # An HTTP app that returned before its last body message did not
                # finish the response; a WebSocket that returned has closed.
                incomplete = (
                    None
                    if kind == "websocket"
                    else ResponseIncomplete("the response was not sent to its end; rolling back")
                )
                # A start message still held is dropped: the server answers 500.
                final = await exchange.exit(incomplete)
                if final is not None:
                    raise final
        finally:
            current_exchange.reset(token)


class _Exchange:
    """One request's state: its context, the response status, whether it ended.

    The ``http.response.start`` message is held back until the first body
    message: when that is also the last one, the context ends before the
    server sees anything, so a failed commit still becomes an error response.
    """

    __slots__ = (
        "_send",
        "ctx",
        "exited",
        "headers",
        "headers_sent",
        "held",
        "middleware",
        "position_ctx",
        "replaced",
        "scope",
        "status",
        "trailers",
    )

    def __init__(self, middleware: PolydatumASGIMiddleware, ctx: DataAccessContext, send: Send) -> None:
        self.middleware = middleware
        self.ctx = ctx
        self.position_ctx = ctx  # whose commits the position header reports (see commit_in_endpoint)
        self._send = send
        self.exited = False
        self.headers_sent = False
        self.replaced = False  # an error response replaced the app's
        self.held: Message | None = None
        self.trailers = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        # The scope handed to the app: Starlette's router records the matched route
        # and endpoint in it (in place), which commit_in_endpoint reads.
        self.scope: Scope = {}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.headers = message.get("headers", [])
            self.trailers = message.get("trailers", False)
            self.held = message
            return
        if self.replaced:
            return  # the client already has the error response
        if not self.exited and (
            (kind == _BODY and not message.get("more_body", False) and not self.trailers)
            or (kind == _TRAILERS and not message.get("more_trailers", False))
            or kind == _PATHSEND
        ):
            # The app is done with the body: end the unit of work before the
            # server completes the response, so a failed commit is never
            # reported to the client as a success.
            final = await self.exit(None)
            if final is not None:
                if self.held is not None and error_status(final) is not None:
                    self.held = None
                    self.replaced = True
                    self.headers_sent = True
                    await _send_error(self._send, final)
                    return
                raise final
        await self.flush()
        await self._send(message)

    async def flush(self) -> None:
        """Send the held ``http.response.start`` message, if any."""
        held = self.held
        if held is not None:
            self.held = None
            self.headers_sent = True
            await self._send(held)

    def _add_position(self) -> None:
        """Give the client the commit position, while the start message is still held."""
        positions = self.middleware.positions
        held = self.held
        if positions is None or held is None:
            return
        header = positions.outgoing(self.position_ctx)
        if header is not None:
            name, value = header
            added = (name.lower().encode("latin-1"), value.encode("latin-1"))
            self.held = {**held, "headers": [*held.get("headers", []), added]}

    async def exit(self, exc: BaseException | None) -> BaseException | None:
        """Exit the context with ``exc`` (or the veto's signal); return what escapes it."""
        self.exited = True
        if exc is None and self.status:
            try:
                exc = _vetoed(self.middleware.veto, self.status, self.headers)
            except Exception as err:  # a broken veto rolls back and is reported
                exc = err
        try:
            if exc is None:
                await self.ctx.__aexit__(None, None, None)
                self._add_position()
                return None
            suppressed = await self.ctx.__aexit__(type(exc), exc, exc.__traceback__)
            final: BaseException | None = None if suppressed else exc
        except BaseException as err:
            final = err
        if isinstance(final, (RollbackResponse, ResponseIncomplete)):
            return None
        return final


def commit_in_endpoint(endpoint: F) -> F:
    """Run a sync endpoint in a context of its own that commits before the endpoint returns.

    For a plain ``def`` endpoint (FastAPI runs it in its thread pool) on a
    sync :class:`~polydatum.sqlalchemy.Database`::

        @app.put("/notes/{note_id}")
        @commit_in_endpoint
        def edit_note(note_id: int, body: Body, dal: Dal) -> Any:
            return dal.notes.edit(note_id, **body)

    Each call opens a context with the request's meta in the endpoint's
    thread, runs the endpoint in it, and closes it there: the COMMIT and the
    commit hooks run before the endpoint returns, so a failed COMMIT is the
    endpoint's exception (mapped to its error response by the middleware)
    and never a success the client saw. Without it, the request's context
    ends when the response's last body message is sent, which for a sync
    ``Database`` is one more trip from the event loop to a COMMIT thread:
    the same guarantee, for a few percent more CPU per request
    (docs/benchmarks.md).

    - Put it *below* the route decorator, next to the ``def``: above it,
      the route has already registered the undecorated function.
    - The endpoint rolls back when it raises, and when the status of its
      response is one the middleware's ``veto`` refuses (by default, 400
      or more): the status of a response it returns, else the one it set on
      FastAPI's ``response: Response`` parameter, else the route's own.
    - What it returns is serialized after its context closed: return data
      built inside (dicts, models you fill in), not ORM objects with
      attributes still to load (they are detached by then).
    - Inside, ``dm.get_active_context()``, the DAL and
      :func:`request_context` are the endpoint's context. A decorated
      function called from a decorated endpoint joins its unit of work.
    - One transaction per request: only the endpoint the router matched
      opens a context, and only while the request's context holds no work.
      When a dependency already used it (created a resource, registered a
      hook), or the decorated function is a helper called from an
      undecorated endpoint or a dependency, it joins the request's context,
      which commits when the response ends.
    - Its context is sync: an ``async def`` commit hook is refused where it
      is registered (``TypeError``).
    - The middleware's own context, if nothing used it, closes with no trip
      to a thread. Read-your-writes positions report the endpoint's commits.
    - Not for a streamed response whose body reads through the DAL: the
      endpoint's context has closed before the body is sent. Leave such an
      endpoint undecorated (the middleware's context stays open until its
      last chunk; see :func:`read_chunks`).

    Raises:
        TypeError: ``endpoint`` is async (an ``async def``, a partial of one,
            an object with an async ``__call__``): it runs on the event
            loop, where a sync COMMIT would stall every request; use the
            middleware's context (with an ``AsyncDatabase``) there. Or it
            is a generator function, whose body would run after its
            context closed.
        NoActiveContextError: (when called) the request is not served
            through :class:`PolydatumASGIMiddleware`.

    .. versionadded:: 2.0
    """
    _check_endpoint(endpoint)

    @functools.wraps(endpoint)
    def in_own_context(*args: Any, **kwargs: Any) -> Any:
        exchange = current_exchange.get()
        if isinstance(exchange, _EndpointExchange):
            return endpoint(*args, **kwargs)  # called from a decorated endpoint: one unit of work
        if not isinstance(exchange, _Exchange) or exchange.exited:
            msg = (
                f"{_factories.describe(endpoint)} is decorated with commit_in_endpoint, which opens its "
                "context with the meta of the request being served, and no request is: serve the app "
                "through app.add_middleware(PolydatumASGIMiddleware, data_manager=dm); to call it "
                "in a test or a task, call the undecorated function (its __wrapped__)"
            )
            raise NoActiveContextError(msg)
        outer = exchange.ctx
        if not _is_the_endpoint(exchange.scope, in_own_context) or _has_started(outer):
            # A helper called from an undecorated endpoint or a dependency, or an
            # endpoint whose dependencies already used the request's context: one
            # unit of work per request, so it joins the request's context (which
            # commits when the response ends) rather than open a second transaction.
            return endpoint(*args, **kwargs)
        ctx = outer.data_manager.context(outer.meta)
        # This thread's copy of the context variables: request_context() is the endpoint's here.
        token = current_exchange.set(_EndpointExchange(ctx))
        result: Any = _UNSET
        try:
            with ctx:
                result = endpoint(*args, **kwargs)
                _veto_returned(exchange.middleware.veto, result, kwargs, exchange.scope)
        except RollbackResponse:
            if result is _UNSET:
                raise  # the endpoint's own
            return result  # rolled back as the veto asked; the response is the endpoint's
        finally:
            current_exchange.reset(token)
        exchange.position_ctx = ctx
        return result

    return cast("F", in_own_context)


def _check_endpoint(endpoint: object) -> None:
    """Refuse what commit_in_endpoint cannot run in a thread and commit: a coroutine or generator."""
    if not callable(endpoint):
        msg = f"commit_in_endpoint decorates a def endpoint, got {_factories.describe(endpoint)}"
        raise TypeError(msg)
    target: Any = endpoint
    while isinstance(target, functools.partial):
        target = target.func
    call = target if inspect.isfunction(target) or inspect.ismethod(target) else type(target).__call__
    if iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
        msg = (
            f"commit_in_endpoint is for plain def endpoints (run in the thread pool); "
            f"{_factories.describe(endpoint)} is async: use the middleware's context there "
            "(an AsyncDatabase commits without blocking the loop)"
        )
        raise TypeError(msg)
    if inspect.isgeneratorfunction(call):
        msg = (
            f"commit_in_endpoint decorates an endpoint that returns its response; "
            f"{_factories.describe(endpoint)} is a generator function, whose body would run after "
            "its context closed: return a StreamingResponse over read_chunks() from an undecorated endpoint"
        )
        raise TypeError(msg)


def _is_the_endpoint(scope: Scope, wrapper: Callable[..., Any]) -> bool:
    """Whether ``wrapper`` is (or wraps) the endpoint the router matched; True when it cannot tell.

    Starlette's router records the matched endpoint in the request's scope; a
    scope without one (another router, or a middleware that copied the scope)
    leaves the decorator its own context, as for an endpoint.
    """
    matched = scope.get("endpoint")
    if matched is None:
        return True
    for _ in range(32):  # a chain of functools.wraps, without trusting it to end
        if matched is wrapper:
            return True
        matched = getattr(matched, "__wrapped__", None)
        if matched is None:
            return False
    return False


def _has_started(ctx: DataAccessContext) -> bool:
    """Whether the request's context holds work already: a resource created or a hook registered."""
    return bool(ctx._created) or bool(ctx._hooks)


class _EndpointExchange:
    """What :func:`request_context` finds inside a :func:`commit_in_endpoint` endpoint."""

    __slots__ = ("ctx", "exited")

    def __init__(self, ctx: DataAccessContext) -> None:
        self.ctx = ctx
        self.exited = False


def _vetoed(veto: Veto, status: int, raw: list[tuple[bytes, bytes]]) -> RollbackResponse | None:
    """The signal to roll back when ``veto`` refuses ``status`` (headers as sent), else None.

    The default veto reads no headers, so they are decoded only for another
    veto or for the signal.
    """
    headers = _decoded(raw) if veto is not default_veto else []
    if veto(status, headers):
        return RollbackResponse(status, headers or _decoded(raw))
    return None


def _decoded(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]


def _veto_returned(veto: Veto, result: Any, kwargs: Mapping[str, Any], scope: Scope) -> None:
    """Raise RollbackResponse when ``veto`` refuses the status an endpoint gave its response.

    That is the status of the response it returned, or else the one it set
    on the ``response: Response`` parameter FastAPI injects, or else the
    route's own (``@app.post(..., status_code=...)``), as FastAPI picks it.
    """
    response = result
    status = getattr(result, "status_code", None)
    if type(status) is not int:
        for value in kwargs.values():
            status = getattr(value, "status_code", None)
            if type(status) is int and hasattr(value, "raw_headers"):
                response = value
                break
        else:
            status = getattr(scope.get("route"), "status_code", None)
            if type(status) is not int:
                return  # the framework's default status, a success
            response = None
    signal = _vetoed(veto, status, getattr(response, "raw_headers", None) or [])
    if signal is not None:
        raise signal


async def _send_error(send: Send, exc: BaseException) -> None:
    status = error_status(exc) or 500
    body = error_body(status, exc)
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in JSON_HEADERS]
    headers.append((b"content-length", str(len(body)).encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def dal_dependency(data_manager: DataManager) -> Callable[[], Awaitable[DataAccessLayer]]:
    """A FastAPI dependency giving the DAL of the request's context.

    Use it as ``dal: DataAccessLayer = Depends(dal_dependency(dm))``; the
    request must be served through :class:`PolydatumASGIMiddleware` for
    ``data_manager``. It imports nothing from FastAPI.

    Args:
        data_manager: the DataManager the middleware was given.

    Returns:
        An ``async`` dependency callable.

    Raises:
        TypeError: ``data_manager`` is not a DataManager (say, the DAL was
            passed instead).

    .. versionadded:: 2.0
    """
    if not isinstance(data_manager, DataManager):
        msg = f"dal_dependency() needs the DataManager, got {data_manager!r}; use Depends(dal_dependency(dm))"
        raise TypeError(msg)

    async def polydatum_dal() -> DataAccessLayer:
        if data_manager.get_active_context() is None:
            msg = (
                "no polydatum context is open for this request; add the middleware: "
                "app.add_middleware(PolydatumASGIMiddleware, data_manager=dm)"
            )
            raise NoActiveContextError(msg)
        return data_manager.get_dal()

    return polydatum_dal


class Readable(Protocol):
    """A blocking binary stream: a file, an S3 body, a blob store's ``open()``."""

    def read(self, size: int = ..., /) -> bytes: ...


#: Bytes per chunk :func:`read_chunks` reads when not told.
CHUNK_SIZE = 64 * 1024
#: The largest ``chunk_size`` :func:`read_chunks` takes (each chunk is held in memory whole).
MAX_CHUNK_SIZE = 64 * 1024 * 1024

# read_chunks' threads: 2 take the reads while they are quick; when all are held
# 20 ms by slow reads, each read that waited as long gets a thread (up to 64), so
# downloads from a slow store do not queue behind each other; extras leave once idle.
_READER_THREADS = 2
_MAX_READER_THREADS = 64
_READER_PATIENCE = 0.02
_readers: Executor | None = None
_readers_lock = threading.Lock()


def _as_bytes(chunk: object) -> bytes:
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    if chunk is None:
        msg = (
            "the stream's read() returned None (a non-blocking stream with no data yet); "
            "give read_chunks a blocking one"
        )
        raise TypeError(msg)
    if isinstance(chunk, str):
        msg = "the stream's read() returned str: open the file in binary mode ('rb')"
        raise TypeError(msg)
    msg = f"the stream's read() must return bytes, got {type(chunk).__name__}"
    raise TypeError(msg)


def _reader_threads() -> Executor:
    global _readers  # one pool per process, made on first use
    readers = _readers
    if readers is None:
        with _readers_lock:
            readers = _readers
            if readers is None:
                readers = _readers = ElasticThreads(
                    _READER_THREADS, _MAX_READER_THREADS, name="polydatum-body", grow_after=_READER_PATIENCE
                )
    return readers


def _forget_readers() -> None:
    global _readers
    _readers = None  # the parent's threads do not exist in a forked worker


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_readers)


def read_chunks(
    stream: Readable,
    chunk_size: int = CHUNK_SIZE,
    *,
    close: bool = True,
    executor: Executor | None = None,
) -> AsyncIterator[bytes]:
    """A blocking stream as an async iterator of chunks, read in threads of polydatum's own.

    Give it to a streamed response (``StreamingResponse(read_chunks(f))``)
    instead of the blocking stream itself. The request's context, and any
    pooled connection it holds, stays open until the last chunk is sent;
    a blocking stream given to Starlette directly is read in the app's
    thread pool, where endpoints wait for those connections: when every
    thread of the pool waits for a connection that a streaming response
    holds, nothing moves until the database pool's timeout. These threads
    are not the pool's, so the stream keeps moving.

    A read in progress when the client goes away is finished before the
    stream is closed (never a close under a read).

    The default threads: two take the reads while they are quick. When
    every thread has been on one read for 20 ms (a slow store) and reads
    have waited as long, each waiting read gets a thread of its own (up to
    64 in the process), so downloads from a slow store do not queue behind
    each other; the extra threads leave after 2 idle seconds. A busy
    machine, whose threads keep finishing quick reads, gets no more. Pass
    ``executor`` to bound them otherwise.

    Args:
        stream: anything with a blocking ``read(size)`` returning bytes
            (``bytearray`` and ``memoryview`` are copied), ``b""`` at the end.
        chunk_size: the size asked of each read, 1 byte to
            :data:`MAX_CHUNK_SIZE` (64 MiB); each chunk is held whole.
        close: close ``stream`` (when it has ``close``) once done, failed or abandoned.
        executor: where the reads run (default: the threads above).

    Raises:
        TypeError: ``stream`` has no ``read``, or ``chunk_size`` is not an int
            (raised here, before any response starts); while iterating, a
            ``read`` that returned ``str`` (a file opened in text mode),
            ``None`` (a non-blocking stream) or anything else but bytes.
        ValueError: ``chunk_size`` is out of range.

    .. versionadded:: 2.0
    """
    read = getattr(stream, "read", None)
    if not callable(read):
        msg = f"read_chunks() needs a stream with a read(size) method, got {type(stream).__name__}"
        raise TypeError(msg)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        msg = f"chunk_size must be an int (bytes per chunk), got {type(chunk_size).__name__}"
        raise TypeError(msg)
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        msg = f"chunk_size must be 1 byte to {MAX_CHUNK_SIZE} bytes (64 MiB), got {chunk_size}"
        raise ValueError(msg)
    closer = getattr(stream, "close", None) if close else None
    return _chunks(read, chunk_size, closer, executor)


async def _chunks(
    read: Callable[[int], object],
    size: int,
    closer: Callable[[], object] | None,
    executor: Executor | None,
) -> AsyncIterator[bytes]:
    threads = executor if executor is not None else _reader_threads()
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    try:
        while True:
            # run_blocking: an abandoned response still waits for the read in progress,
            # then asks for the cancellation again; it is taken here, before another read.
            chunk = await run_blocking(read, size, executor=threads)
            if cancelling is None or cancelling():
                await asyncio.sleep(0)
            if type(chunk) is not bytes:
                chunk = _as_bytes(chunk)
            if not chunk:
                return
            yield chunk
    finally:
        if closer is not None:
            closer()


# Names of the 2.0 development releases, kept working with a DeprecationWarning.
__getattr__ = module_getattr(
    __name__,
    {"PolydatumMiddleware": "PolydatumASGIMiddleware", "current_context": "request_context"},
    globals(),
)

"""WSGI: one context per request
=============================

:class:`PolydatumWSGIMiddleware` wraps any WSGI application (Flask, a bare
Werkzeug app, anything a WSGI server can run) and opens one polydatum
context per request. Views reach the DAL through :func:`request_context`
or ``dm.get_dal()``::

    from werkzeug.wrappers import Request, Response

    from polydatum import DataManager, Service
    from polydatum.errors import NotFound
    from polydatum.werkzeug import PolydatumWSGIMiddleware, request_context

    class Users(Service):
        def get(self, user_id):
            if user_id != 1:
                raise NotFound(f"no user {user_id}")
            return {"id": 1, "asked_by": self._ctx.meta.request_id}

    dm = DataManager()
    dm.register_services(users=Users())

    @Request.application
    def app(request):
        user = request_context().dal.users.get(int(request.args["id"]))
        return Response(repr(user))

    app = PolydatumWSGIMiddleware(app, dm)   # GET /?id=2 -> 404 JSON, rolled back

What it guarantees:

- **Meta** comes from the request: ``request_id`` (the ``X-Request-ID``
  header when it is 1-200 printable ASCII characters, else 32 new random
  hex digits), ``remote_addr``, ``method`` and
  ``path``, with whatever your ``meta(request)`` function returns merged
  over them.
- **Streaming-safe.** The context stays open while the server iterates the
  response body, and ends exactly once: when the body is exhausted (after
  closing the app's iterable, before the server learns the body ended), or
  when the server calls ``close()`` before that (the client went away).
- **No false success.** A body that is complete before it is sent (a
  ``list``, or a response with a ``Content-Length``, read one chunk ahead)
  ends its context before its last chunk goes out: a failed commit becomes
  the mapped error response, or a broken one, never a ``200``. What the
  commit raised reaches the server as itself.
- **Errors.** :class:`~polydatum.errors.ServiceError` (and so ``NotFound``
  → 404, ``ConcurrencyConflict`` → 409, any other ``code``) raised before
  the first byte of the body was sent becomes a JSON response ``{"status",
  "error", "message"}`` after the context rolled back; ``message`` is the
  error's ``public_message``, and a withheld message (or any 5xx) is
  logged on the ``polydatum`` logger. Every other
  exception rolls back and propagates to the server.
- **Status rollback.** A response with status >= 400 rolls the context back
  although nothing raised: :class:`RollbackResponse` is thrown into it, so
  transaction middleware rolls back and ``on_rollback`` hooks run. Pass
  ``veto(status, headers) -> bool`` to decide otherwise. A body that was
  not sent to its end rolls back with :class:`ResponseIncomplete`. Neither
  signal ever reaches the server.

Flask apps use :func:`init_app`, which also maps ``ServiceError`` raised in
views (Flask would otherwise turn them into 500s). The guide is
``docs/integrations/werkzeug.md``.

.. versionadded:: 2.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import Token
from typing import TYPE_CHECKING, Any, cast

try:
    from werkzeug.wrappers import Request
except ImportError:  # pragma: no cover - exercised only without the extra
    msg = 'polydatum.werkzeug needs Werkzeug; install it with: pip install "polydatum[werkzeug]"'
    raise ImportError(msg) from None

from polydatum._renamed import module_getattr
from polydatum._web import (
    JSON_HEADERS,
    Exchange,
    ResponseIncomplete,
    RollbackResponse,
    Veto,
    check_arguments,
    current_exchange,
    default_veto,
    error_body,
    error_status,
    merge_meta,
    positions_from,
    reason,
    request_context,
    request_id,
)
from polydatum.context import DataAccessContext
from polydatum.errors import ServiceError

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from flask import Flask

    from polydatum.dal import DataManager

__all__ = [
    "ENVIRON_KEY",
    "MetaFactory",
    "PolydatumWSGIMiddleware",
    "ResponseIncomplete",
    "RollbackResponse",
    "Veto",
    "default_meta",
    "default_veto",
    "init_app",
    "request_context",
    "request_id",
]

#: The WSGI environ key under which the request's context is stored.
ENVIRON_KEY = "polydatum.context"

#: ``meta(request) -> mapping``, merged over :func:`default_meta`.
MetaFactory = Callable[[Request], Mapping[str, Any]]


def default_meta(request: Request) -> dict[str, Any]:
    """The meta every request's context gets.

    Args:
        request: the Werkzeug request.

    Returns:
        ``request_id`` (``X-Request-ID`` when it is 1-200 printable ASCII
        characters, else a new random 32-hex-digit id), ``remote_addr``,
        ``method`` and ``path``.

    .. versionadded:: 2.0
    """
    return {
        "request_id": request_id(request.headers.get("X-Request-ID")),
        "remote_addr": request.remote_addr,
        "method": request.method,
        "path": request.path,
    }


def _environ_meta(environ: WSGIEnvironment) -> dict[str, Any]:
    # default_meta() read straight from the environ: building a Request costs
    # more than the rest of the middleware, so it is made only for a user's
    # meta function. Same values as werkzeug's Request gives.
    path = environ.get("PATH_INFO") or ""
    if not path.isascii():
        path = path.encode("latin-1").decode("utf-8", "replace")
    return {
        "request_id": request_id(environ.get("HTTP_X_REQUEST_ID")),
        "remote_addr": environ.get("REMOTE_ADDR"),
        "method": environ.get("REQUEST_METHOD", "GET").upper(),
        "path": "/" + path.lstrip("/"),
    }


class PolydatumWSGIMiddleware:
    """WSGI middleware: one polydatum context per request, ended with the response.

    Args:
        app: the WSGI application to wrap.
        data_manager: the DataManager whose contexts the requests get.
        meta: ``meta(request) -> mapping`` for each request's meta, merged
            over :func:`default_meta`; it may raise a
            :class:`~polydatum.errors.ServiceError` (say, 401) to refuse the
            request before any context opens.
        veto: ``veto(status, headers) -> bool``; True rolls the context back.
            Defaults to :func:`default_veto` (status >= 400).
        positions: ``"cookie"`` or ``"header"`` to give the client the
            commit position of a request that wrote and put it back into
            the next request's meta as ``min_position`` (read-your-writes
            with replicas, ``docs/scaling.md``); None (the default) does
            neither. A body streamed before the commit carries no position.

    Raises:
        TypeError: ``app``, ``meta`` or ``veto`` is not callable, or
            ``data_manager`` is not a DataManager.
        ValueError: ``positions`` is not ``"cookie"``, ``"header"`` or None.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        app: WSGIApplication,
        data_manager: DataManager,
        meta: MetaFactory | None = None,
        veto: Veto | None = None,
        positions: str | None = None,
    ) -> None:
        check_arguments(app, data_manager, meta, veto, kind="WSGI", meta_takes="the werkzeug Request")
        self.positions = positions_from(positions)
        self.app = app
        self.data_manager = data_manager
        self.meta = meta
        self.veto: Veto = veto if veto is not None else default_veto

    def __repr__(self) -> str:
        return f"<PolydatumWSGIMiddleware {self.app!r}>"

    def build_meta(self, environ: WSGIEnvironment) -> dict[str, Any]:
        """The meta of the request in ``environ`` (defaults, then the user's function).

        Raises:
            TypeError: the meta function returned something that is not a mapping.
        """
        meta = _environ_meta(environ)
        if self.positions is not None:
            sent = self.positions.incoming(
                environ.get("HTTP_COOKIE"), environ.get("HTTP_X_POLYDATUM_POSITION")
            )
            if sent is not None:
                meta["min_position"] = sent
        if self.meta is not None:
            merge_meta(meta, self.meta(Request(environ, populate_request=False)), self.meta)
        return meta

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            ctx = self.data_manager.context(self.build_meta(environ))
            ctx.__enter__()
        except ServiceError as exc:
            # Refused by the meta function or a context middleware's setup:
            # no context is open (the core closed it), only the mapping is left.
            return _error_response(start_response, exc, None)
        response = _Response(self, ctx, start_response)
        environ[ENVIRON_KEY] = ctx
        try:
            app_iter = self.app(environ, response.start_response)
        except BaseException as exc:
            return response.fail(exc)
        if type(app_iter) is list or type(app_iter) is tuple:
            # Complete already: end the context now, while the status can change.
            return response.finish(app_iter)
        response.iterable = app_iter
        try:
            response.iterator = iter(app_iter)
        except BaseException as exc:
            return response.fail(exc)
        return response


class _Response:
    """The response iterable handed to the server; it owns the request's context.

    The context ends exactly once: when the app's iterable is exhausted
    (after closing it, before the server learns the body ended), when the
    app fails, or when the server calls :meth:`close` early (the client went
    away). A body with a ``Content-Length`` is read one chunk ahead, so the
    context of a buffered response ends before its only chunk is sent and a
    failed commit can still become an error response. The app's status and
    headers are held until the first chunk goes out, so that error response
    is the server's first ``start_response`` call, with no ``exc_info``.
    """

    __slots__ = (
        "_server_start",
        "_token",
        "_write",
        "ctx",
        "error",
        "exited",
        "headers",
        "held",
        "iterable",
        "iterator",
        "lookahead",
        "middleware",
        "sent",
        "started",
        "status",
    )

    def __init__(
        self, middleware: PolydatumWSGIMiddleware, ctx: DataAccessContext, start_response: StartResponse
    ) -> None:
        self.middleware = middleware
        self.ctx = ctx
        self._server_start = start_response
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.iterable: Iterable[bytes] = ()
        self.iterator: Iterator[bytes] = iter(())
        self.exited = False
        self.started = False  # the server's start_response was called
        self.sent = False  # a non-empty chunk went to the server: headers are out
        self._write: Callable[[bytes], object] | None = None
        self.lookahead: bool | None = None  # decided at the first chunk
        self.held: bytes | None = None  # the chunk read ahead
        # The exception a framework turned into this response (Flask's handlers):
        # the cause of the rollback the status brings, so traces can name it.
        self.error: BaseException | None = None
        self._token: Token[Exchange | None] | None = current_exchange.set(self)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Callable[[bytes], object]:
        # Held until the first chunk (or the end of the body) goes to the
        # server, so an error response can still take its place without
        # exc_info, which some servers and test clients re-raise. While it is
        # held the app may call it again to replace the status (with exc_info,
        # which nothing needs then); the last call is the one the veto judges.
        self.status = status
        self.headers = headers
        if self.started:
            self._write = self._server_start(status, headers, exc_info)
        return self.write

    def _start(self) -> None:
        """Hand the held status and headers to the server (once, before any body byte)."""
        if not self.started and self.status is not None:
            self.started = True
            self._write = self._server_start(self.status, self.headers)

    def write(self, data: bytes) -> object:
        """The legacy ``write()`` callable: body bytes the app sends itself."""
        self._start()
        if data:
            self.sent = True
        return self._write(data)  # type: ignore[misc]  # set by _start: the app called start_response

    # -- iteration, driven by the server -------------------------------------

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self.exited:
            raise StopIteration
        last: bytes | None = None
        try:
            if self.lookahead is None:
                self.lookahead = _has_length(self.headers)
                if self.lookahead:
                    self.held = next(self.iterator)
            if self.lookahead:
                last = self.held
                self.held = next(self.iterator)
                chunk = last
            else:
                chunk = next(self.iterator)
        except StopIteration:
            # Outside the try that guards the app's iterator: what the exit
            # raises (a failed commit) goes to the server as itself.
            return self._end(None, last)
        except BaseException as exc:
            return self._end(exc, None)
        self._start()
        if chunk:
            self.sent = True
        return chunk  # type: ignore[return-value]

    def _end(self, exc: BaseException | None, last: bytes | None) -> bytes:
        """The body ended (or failed): exit, then hand over the last chunk or the error."""
        final = self._exit(exc)
        if final is None:
            self._start()
            if last is None:
                raise StopIteration
            return last
        if self.sent or error_status(final) is None:
            raise final
        # Nothing was sent yet: the mapped error replaces the response.
        return self._answer(final)[0]

    def close(self) -> None:
        """Called by the server: ends the context if the body was not sent to its end."""
        if self.exited:
            return
        final = self._exit(ResponseIncomplete("the response body was not sent to its end; rolling back"))
        if final is not None:
            raise final

    # -- the paths that end the context before the server sees a body --------

    def finish(self, body: list[bytes] | tuple[bytes, ...]) -> Iterable[bytes]:
        """End the context of a complete body now, while the status can still change."""
        final = self._exit(None)
        if final is None:
            self._start()
            return body
        return self._map(final)

    def fail(self, exc: BaseException) -> Iterable[bytes]:
        """The app raised: roll back, then answer the mapped error or re-raise."""
        final = self._exit(exc)
        return self._map(final if final is not None else exc)

    def _map(self, exc: BaseException) -> Iterable[bytes]:
        if error_status(exc) is None:
            raise exc
        return self._answer(exc)

    def _answer(self, exc: BaseException) -> list[bytes]:
        """Send the mapped error response in place of the app's."""
        # exc_info only when the server already has a status line to replace:
        # some servers (and werkzeug's test client) re-raise any exc_info.
        replaces = exc if self.started else None
        self.started = True
        return _error_response(self._server_start, exc, replaces)

    # -- the one exit --------------------------------------------------------

    def _add_position(self) -> None:
        """Give the client the commit position, while the headers are still held."""
        positions = self.middleware.positions
        if positions is None or self.started:
            return
        header = positions.outgoing(self.ctx)
        if header is not None:
            self.headers = [*self.headers, header]

    def _exit(self, exc: BaseException | None) -> BaseException | None:
        """Close the app's iterable, exit the context; return what escapes it."""
        self.exited = True
        # Taken, not kept: the error's frames lead back to the frame holding this exchange.
        error, self.error = self.error, None
        try:
            close = getattr(self.iterable, "close", None)
            if close is not None:
                # The app's own close callbacks still run inside the context.
                try:
                    close()
                except BaseException as err:
                    if exc is None or isinstance(exc, ResponseIncomplete):
                        exc = err
            if exc is None and self.status is not None:
                try:
                    status = _status_code(self.status)
                    if self.middleware.veto(status, self.headers):
                        exc = RollbackResponse(status, self.headers)
                        exc.__cause__ = error
                except Exception as err:  # a bad status or a broken veto rolls back, reported
                    exc = err
            try:
                if exc is None:
                    self.ctx.__exit__(None, None, None)
                    self._add_position()
                    return None
                suppressed = self.ctx.__exit__(type(exc), exc, exc.__traceback__)
                final: BaseException | None = None if suppressed else exc
            except BaseException as err:
                final = err
            if isinstance(final, (RollbackResponse, ResponseIncomplete)):
                return None
            return final
        finally:
            token, self._token = self._token, None
            if token is not None:
                try:
                    current_exchange.reset(token)
                except ValueError:
                    # Closed from another thread than the one that called the
                    # app: that thread's variable is not ours to reset, and
                    # request_context() already refuses an exited response.
                    pass


def _has_length(headers: list[tuple[str, str]]) -> bool:
    return any(len(name) == 14 and name.lower() == "content-length" for name, _ in headers)


def _status_code(status: str) -> int:
    try:
        return int(status[:3])
    except ValueError:
        msg = f"the WSGI app gave an invalid status line {status!r}; it must start with 3 digits"
        raise ValueError(msg) from None


def _error_response(
    start_response: StartResponse, exc: BaseException, replaces: BaseException | None
) -> list[bytes]:
    status = error_status(exc) or 500
    body = error_body(status, exc)
    headers = [*JSON_HEADERS, ("content-length", str(len(body)))]
    # exc_info lets us replace a status line the app had already set.
    exc_info: OptExcInfo | None = None
    if replaces is not None:
        # Raised exceptions carry a traceback; servers only re-raise it if headers were sent.
        exc_info = cast("OptExcInfo", (type(replaces), replaces, replaces.__traceback__))
    start_response(f"{status} {reason(status)}", headers, exc_info)
    return [body]


def init_app(
    app: Flask,
    data_manager: DataManager,
    *,
    meta: MetaFactory | None = None,
    veto: Veto | None = None,
    positions: str | None = None,
) -> PolydatumWSGIMiddleware:
    """Serve a Flask app's requests in polydatum contexts.

    Wraps ``app.wsgi_app`` in :class:`PolydatumWSGIMiddleware` (so Flask's own
    middleware and test client go through it), registers an error handler
    turning :class:`~polydatum.errors.ServiceError` raised in views into the
    same JSON responses, and stores the DataManager in
    ``app.extensions["polydatum"]``. Views use :func:`request_context`.

    Args:
        app: the Flask application.
        data_manager: the DataManager whose contexts the requests get.
        meta: as for :class:`PolydatumWSGIMiddleware`.
        veto: as for :class:`PolydatumWSGIMiddleware`.
        positions: as for :class:`PolydatumWSGIMiddleware` (read-your-writes
            across requests, ``"cookie"`` or ``"header"``).

    Returns:
        The installed middleware.

    Raises:
        TypeError: ``app`` is not a Flask app (or an argument is wrong, as
            for :class:`PolydatumWSGIMiddleware`).
        RuntimeError: ``init_app`` was already called on this app.

    .. versionadded:: 2.0
    """
    if not callable(getattr(app, "wsgi_app", None)) or not isinstance(getattr(app, "extensions", None), dict):
        msg = (
            f"init_app() needs a Flask app, got {app!r}; "
            "wrap any other WSGI app with PolydatumWSGIMiddleware(app, dm)"
        )
        raise TypeError(msg)
    if "polydatum" in app.extensions:
        msg = f"polydatum is already set up on {app!r}; call init_app() once per Flask app"
        raise RuntimeError(msg)
    middleware = PolydatumWSGIMiddleware(
        app.wsgi_app, data_manager, meta=meta, veto=veto, positions=positions
    )
    app.wsgi_app = middleware  # type: ignore[method-assign]
    app.extensions["polydatum"] = data_manager
    app.register_error_handler(ServiceError, _flask_service_error)
    # Flask turns any other exception into a 500 itself; the signal tells us which.
    from flask import got_request_exception

    got_request_exception.connect(_flask_exception, app, weak=False)
    return middleware


def _flask_service_error(exc: ServiceError) -> tuple[bytes, int, Sequence[tuple[str, str]]]:
    _handled(exc)
    status = error_status(exc) or 500
    return error_body(status, exc), status, JSON_HEADERS


def _flask_exception(sender: Any, exception: BaseException | None = None, **extra: Any) -> None:
    if exception is not None:
        _handled(exception)


def _handled(exc: BaseException) -> None:
    """Remember the exception a Flask handler turned into the response (the rollback's cause)."""
    exchange = current_exchange.get()
    if isinstance(exchange, _Response):
        exchange.error = exc


# Names of the 2.0 development releases, kept working with a DeprecationWarning.
__getattr__ = module_getattr(
    __name__,
    {"PolydatumMiddleware": "PolydatumWSGIMiddleware", "current_context": "request_context"},
    globals(),
)

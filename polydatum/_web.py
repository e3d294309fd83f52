"""What the WSGI and ASGI middleware share: signals, the veto and error responses.

Neither this module nor its users import a web framework, so both
:mod:`polydatum.werkzeug` and :mod:`polydatum.asgi` build on it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from http import HTTPStatus
from random import getrandbits
from typing import TYPE_CHECKING, Any, Protocol

from polydatum._stack import CLOSING, OPEN
from polydatum.errors import NoActiveContextError, ServiceError

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext

__all__ = [
    "JSON_HEADERS",
    "MAX_REQUEST_ID",
    "POSITION_COOKIE",
    "POSITION_COOKIE_AGE",
    "POSITION_HEADER",
    "Exchange",
    "Positions",
    "ResponseIncomplete",
    "RollbackResponse",
    "Veto",
    "check_arguments",
    "client_message",
    "current_exchange",
    "default_veto",
    "error_body",
    "error_status",
    "merge_meta",
    "new_request_id",
    "positions_from",
    "reason",
    "request_context",
    "request_id",
]

#: ``veto(status, headers) -> bool``: True rolls the context back.
Veto = Callable[[int, Sequence[tuple[str, str]]], bool]

JSON_HEADERS = (("content-type", "application/json"),)

logger = logging.getLogger("polydatum")


class Exchange(Protocol):
    """What the middleware keeps per request: the context and whether it ended."""

    ctx: DataAccessContext
    exited: bool


# The request (or WebSocket) being served in this thread or task. Module level
# on purpose: a ContextVar made at run time is kept alive by every
# contextvars.Context that ever set it.
current_exchange: ContextVar[Exchange | None] = ContextVar("polydatum.web.exchange", default=None)


def new_request_id() -> str:
    """A new request id: 32 random hex digits, the shape of ``uuid4().hex``.

    ``random`` rather than ``uuid4()``: ids must be unique, not secret, and
    ``os.urandom`` is a system call on every request. ``random`` is reseeded
    in forked worker processes.
    """
    return f"{getrandbits(128):032x}"


#: The longest ``X-Request-ID`` taken from a client; a longer one is replaced.
MAX_REQUEST_ID = 200


def request_id(given: str | None) -> str:
    """The request id for a client's ``X-Request-ID`` value (None when absent).

    The client's value is kept when it is 1 to :data:`MAX_REQUEST_ID`
    printable ASCII characters; anything else (empty, longer, control
    characters such as NUL or ANSI escapes, non-ASCII) is replaced with
    :func:`new_request_id`, because apps log it and Celery forwards it.
    """
    if given and len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable():
        return given
    return new_request_id()


def request_context() -> DataAccessContext:
    """The context the polydatum web middleware opened for the request being served.

    It stays the request's context even while a view opens nested contexts
    (``dm.get_active_context()`` returns the innermost one); inside an
    endpoint decorated with :func:`polydatum.asgi.commit_in_endpoint`, it
    is that endpoint's context. Its ``dal`` is
    how a view calls services: ``request_context().dal.users.get(1)``.

    It is the request's context until that context has exited: also in the
    response's ``call_on_close`` callbacks and in the context's commit and
    rollback hooks.

    Raises:
        NoActiveContextError: outside a request served through the middleware
            (in a thread the view started, or after the response ended).

    .. versionadded:: 2.0
    """
    exchange = current_exchange.get()
    # An exchange marked exited is still the request's while its context closes:
    # call_on_close callbacks and commit hooks run then and may ask for it.
    if exchange is None or (exchange.exited and exchange.ctx._state not in (OPEN, CLOSING)):
        msg = (
            "no polydatum request context here: this is not a request served through the middleware, "
            "or a thread the view started (threads do not inherit it: pass them what they need), or "
            "the response has ended. Wrap the app with "
            "polydatum.werkzeug.PolydatumWSGIMiddleware(app, dm) (Flask: init_app(app, dm)) or "
            "polydatum.asgi.PolydatumASGIMiddleware(app, dm), "
            'or open a context yourself with "with dm.context():"'
        )
        raise NoActiveContextError(msg)
    return exchange.ctx


class RollbackResponse(Exception):
    """Thrown into a request's context so it rolls back although nothing raised.

    The middleware uses it when the response status was vetoed (by default:
    status >= 400). Context middleware sees it like any exception (a
    transaction middleware rolls back) and ``on_rollback`` hooks run. The
    middleware swallows it afterwards: it never reaches the server.

    Attributes:
        status: the HTTP status of the response.
        headers: the response headers, as ``(name, value)`` strings.

    .. versionadded:: 2.0
    """

    def __init__(self, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(f"response status {status} rolls the request's context back")
        self.status = status
        self.headers = list(headers)


class ResponseIncomplete(Exception):
    """Thrown into a request's context when its response was never sent to the end.

    The client went away mid-stream, or the server or the application
    stopped before the last body chunk. The unit of work rolls back, the
    middleware swallows the signal.

    .. versionadded:: 2.0
    """


def default_veto(status: int, headers: Sequence[tuple[str, str]]) -> bool:
    """Roll back every response with a status of 400 or more.

    Args:
        status: the response's HTTP status.
        headers: the response headers (unused here; a custom veto may read them).

    Returns:
        True if the request's context should roll back.

    .. versionadded:: 2.0
    """
    return status >= 400


def error_status(exc: BaseException) -> int | None:
    """The HTTP status an exception maps to, or None when it is not mapped.

    :class:`~polydatum.errors.ServiceError` and its subclasses map to their
    ``code`` (``NotFound`` 404, ``ConcurrencyConflict`` 409, a plain
    ``ServiceError`` 500); a code outside 400-599 maps to 500.
    """
    if not isinstance(exc, ServiceError):
        return None
    code = getattr(exc, "code", 500)
    return code if isinstance(code, int) and 400 <= code <= 599 else 500


def reason(status: int) -> str:
    """The reason phrase of ``status`` ("Error" for codes HTTP does not name)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def client_message(status: int, exc: BaseException) -> str:
    """The text a client gets for a mapped error; the details go to the log.

    The text is the error's :attr:`~polydatum.errors.ServiceError.public_message`
    (the reason phrase when that is empty). An error whose full message was
    withheld from the client, and every 5xx, is logged on the ``polydatum``
    logger with its traceback: ERROR for 5xx, INFO for the rest. Nothing is
    logged for an error the client sees in full, such as
    ``NotFound("no note 5")``.
    """
    public = exc.public_message if isinstance(exc, ServiceError) else ""
    detail = str(exc)
    if status >= 500 or public != detail:
        logger.log(
            logging.ERROR if status >= 500 else logging.INFO,
            "answered %d to a %s: %s",
            status,
            type(exc).__name__,
            detail,
            exc_info=exc,
            extra={"polydatum_status": status},
        )
    return public or reason(status)


def error_body(status: int, exc: BaseException) -> bytes:
    """The JSON body of a mapped error: ``{"status", "error", "message"}``.

    ``message`` is :func:`client_message`: the error's public message, never
    a detail it keeps for the log.
    """
    payload = {"status": status, "error": reason(status), "message": client_message(status, exc)}
    return json.dumps(payload).encode("utf-8")


def check_arguments(
    app: object, data_manager: object, meta: object, veto: object, *, kind: str, meta_takes: str
) -> None:
    """Refuse wrong constructor arguments of the web middleware with a clear TypeError."""
    from polydatum.dal import DataManager

    if not callable(app):
        msg = f"app must be a {kind} application (a callable), got {app!r}"
        raise TypeError(msg)
    if not isinstance(data_manager, DataManager):
        msg = (
            f"data_manager must be a polydatum DataManager, got {data_manager!r}; "
            f"pass the one your services are registered on"
        )
        raise TypeError(msg)
    if meta is not None and not callable(meta):
        msg = f"meta must be a callable taking {meta_takes} and returning a mapping, got {meta!r}"
        raise TypeError(msg)
    if veto is not None and not callable(veto):
        msg = f"veto must be a callable (status, headers) -> bool, got {veto!r}"
        raise TypeError(msg)


def merge_meta(meta: dict[str, Any], extra: object, fn: object) -> None:
    """Merge what the user's meta function returned over the defaults."""
    if not isinstance(extra, Mapping):
        msg = f"the meta function {fn!r} returned {extra!r}; it must return a mapping (a dict)"
        raise TypeError(msg)
    meta.update(extra)


#: The cookie and the header carrying commit positions (see :class:`Positions`).
POSITION_COOKIE = "polydatum_position"
POSITION_HEADER = "X-Polydatum-Position"
#: How long a position cookie lives: replicas catch up long before.
POSITION_COOKIE_AGE = 300


class Positions:
    """Read-your-writes across requests: the commit positions a client carries.

    With ``"cookie"``, a response whose context committed a write sets the
    ``polydatum_position`` cookie (``HttpOnly``, ``SameSite=Lax``, 5 minutes);
    with ``"header"``, it returns the ``X-Polydatum-Position`` header, which
    the client sends back on its next request. Either way the next request's
    meta gets ``min_position``, so it reads only from replicas that replayed
    that write. The client's value is hostile input: it is parsed strictly
    (:func:`polydatum._positions.decode`) and a malformed one is ignored, as
    if absent.
    """

    __slots__ = ("mode",)

    def __init__(self, mode: str) -> None:
        if mode not in ("cookie", "header"):
            msg = f"positions must be 'cookie', 'header' or None, got {mode!r}"
            raise ValueError(msg)
        self.mode = mode

    def incoming(self, cookie: str | None, header: str | None) -> dict[str, str] | None:
        """The positions the client sent (``Cookie`` header or our header), or None."""
        from polydatum._positions import decode

        value = header if self.mode == "header" else _cookie_value(cookie, POSITION_COOKIE)
        if not value:
            return None
        try:
            return decode(value)
        except ValueError:
            logger.debug("ignored a malformed %s from the client", self.mode)
            return None

    def outgoing(self, ctx: DataAccessContext) -> tuple[str, str] | None:
        """The response header to add once ``ctx`` committed, or None when it wrote nothing."""
        from polydatum._positions import committed, encode, required

        if not committed(ctx):
            return None
        value = encode(required(ctx))
        if self.mode == "header":
            return (POSITION_HEADER, value)
        return (
            "Set-Cookie",
            f"{POSITION_COOKIE}={value}; Path=/; Max-Age={POSITION_COOKIE_AGE}; HttpOnly; SameSite=Lax",
        )


def _cookie_value(cookie: str | None, name: str) -> str | None:
    if not cookie:
        return None
    for part in cookie.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


def positions_from(positions: str | None) -> Positions | None:
    """The :class:`Positions` of a middleware's ``positions=`` argument."""
    return None if positions is None else Positions(positions)

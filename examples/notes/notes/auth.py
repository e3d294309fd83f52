"""Who is calling, and may they: API tokens, and auth as DAL method middleware.

The web layer turns the ``Authorization: Bearer <token>`` header into
``meta["user"]`` (a user id) when it opens the request's context; it never
touches the database for that, since a token is ``<user id>.<signature>``.
Everything else happens in :class:`AuthMiddleware`, around *every* DAL
call, so no service method can forget a check:

- a method marked :func:`public` runs for anyone;
- a method marked :func:`job_only` runs only in a background job's context;
- a method marked :func:`signed_in` needs ``meta.user`` (401 otherwise);
- a method marked :func:`self_only` needs it too, and its first argument
  must be that same user id: your own profile, your own counts (403 for
  someone else's);
- a method marked :func:`owns` needs it too, and gets its first argument
  checked: the note, notebook or attachment it names must belong to
  ``meta.user``. Someone else's object is reported exactly like a missing
  one (404), so ids reveal nothing;
- an unmarked method is refused (403): it fails closed, so the generic
  ``Store`` methods (``get``, ``search``…) are not open to every caller.

Caching (``@cached`` on a service method) sits *inside* this middleware, so
a cached answer is never served to a caller who may not see it. That holds
only for checks made here: a check written in the body of a cached method
runs only when the answer is computed, not when it is served from the cache.
So every "may they" belongs in a mark.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from polydatum.errors import NotFound, ServiceError
from polydatum.middleware import DalCommandRequest, dal_resolver

from notes.models import Attachment, Note, Notebook

F = TypeVar("F", bound=Callable[..., Any])

_GUARD = "__notes_guard__"
_OWNED = {"note": Note, "notebook": Notebook, "attachment": Attachment}
MAX_ID = 2**31 - 1  # the largest key of an SQL INTEGER column (PostgreSQL's is 32 bits)
_MAX_ID_DIGITS = len(str(MAX_ID))


class BadRequest(ServiceError):
    """The request is malformed (HTTP 400)."""

    code = 400


class Unauthorized(ServiceError):
    """No valid token was given (HTTP 401)."""

    code = 401


class Forbidden(ServiceError):
    """The caller is known but may not do this (HTTP 403)."""

    code = 403


class PayloadTooLarge(ServiceError):
    """The request body is larger than allowed (HTTP 413)."""

    code = 413


class Unavailable(ServiceError):
    """A server the request needs cannot serve it now; retrying later may work (HTTP 503)."""

    code = 503


class Conflict(ServiceError):
    """The request conflicts with existing data, e.g. a taken user name (HTTP 409)."""

    code = 409


def make_token(secret: str, user_id: int) -> str:
    """The API token of ``user_id``: the id and its HMAC-SHA256 signature."""
    signature = hmac.new(secret.encode(), str(user_id).encode(), hashlib.sha256).hexdigest()
    return f"{user_id}.{signature}"


def user_from_token(secret: str, token: str) -> int:
    """The user id a token was made for.

    Raises:
        Unauthorized: the token is malformed or its signature does not match.
    """
    user = _user_id(token.partition(".")[0])
    if user is not None and hmac.compare_digest(make_token(secret, user), token):
        return user
    msg = "invalid API token; use the token POST /users returned"
    raise Unauthorized(msg)


def _user_id(text: str) -> int | None:
    """``text`` as a user id, or None when it cannot be one.

    Checked before ``int()``: Python refuses to convert more than 4300
    digits (ValueError), and ``str.isdigit`` is also true for digits such as
    "²" that ``int()`` cannot read. Only ASCII digits, no more than a key has.
    """
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_ID_DIGITS:
        return None
    ident = int(text)
    return ident if 1 <= ident <= MAX_ID else None


def _mark(func: F, rule: str, kind: str | None) -> F:
    if not inspect.isfunction(func):
        # Another decorator's object would hide the mark from the middleware.
        msg = f"auth marks go on plain functions, directly above `def` (below @cached), not on {func!r}"
        raise TypeError(msg)
    # The id is the first parameter after self, passed by position or by name.
    params = list(inspect.signature(func).parameters)
    setattr(func, _GUARD, (rule, kind, params[1] if len(params) > 1 else None))
    return func


def public(func: F) -> F:
    """Mark a service method as callable without a user (sign-up)."""
    return _mark(func, "public", None)


def signed_in(func: F) -> F:
    """Mark a service method as callable by any signed-in user."""
    return _mark(func, "user", None)


def self_only(func: F) -> F:
    """Mark a method whose first argument must be the caller's own user id (someone else's: 403)."""
    return _mark(func, "self", None)


def job_only(func: F) -> F:
    """Mark a service method as callable only from a background job's context."""
    return _mark(func, "job", None)


def owns(kind: str) -> Callable[[F], F]:
    """Mark a method whose first argument is the id of a ``kind`` the caller must own.

    ``kind`` is ``"note"``, ``"notebook"`` or ``"attachment"``.
    """
    if kind not in _OWNED:
        msg = f"owns() takes one of {', '.join(_OWNED)}, got {kind!r}"
        raise ValueError(msg)

    def mark(func: F) -> F:
        return _mark(func, "owns", kind)

    return mark


Guard = tuple[str, str | None, str | None]  # rule, kind of object owned, name of its id parameter


def _guard(method: Any) -> Guard | None:
    # inspect.unwrap sees through @cached (which sets __wrapped__) to the function we marked.
    guard: Guard | None = getattr(inspect.unwrap(method), _GUARD, None)
    return guard


def _first_argument(request: DalCommandRequest, param: str | None, kind: str) -> Any:
    # Passed by position or by name: a keyword must not skip the check.
    ident = request.args[0] if request.args else request.kwargs.get(str(param))
    if ident is None:
        msg = f"{request.path_name} needs the id of a {kind}"
        raise BadRequest(msg)
    return ident


class AuthMiddleware:
    """DAL method middleware enforcing the marks above on every call; see the module docs."""

    def __init__(self, database: str = "db") -> None:
        self.database = database

    def __call__(self, request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
        """Check the caller against the method's mark, then call it."""
        ctx = request.ctx
        guard = _guard(dal_resolver(ctx, request.path))
        if guard is None:
            msg = f"{request.path_name} is not open to callers (it carries no auth mark)"
            raise Forbidden(msg)
        rule, kind, param = guard
        if rule == "public":
            return handler(request)
        if rule == "job":
            if ctx.meta.get("task_id") is None:
                msg = f"{request.path_name} runs only in background jobs"
                raise Forbidden(msg)
            return handler(request)
        user = ctx.meta.get("user")
        if user is None:
            msg = f"{request.path_name} needs a signed-in user; send Authorization: Bearer <token>"
            raise Unauthorized(msg)
        if rule == "self":
            ident = _first_argument(request, param, "user")
            if isinstance(ident, bool) or ident != user:
                msg = f"{request.path_name} is only for your own account"
                raise Forbidden(msg)
        elif kind is not None:
            ident = _first_argument(request, param, kind)
            model = _OWNED[kind]
            # An id no key can have is not looked up: PostgreSQL would fail on it
            # ("integer out of range"), where the answer is simply "not found".
            valid = isinstance(ident, int) and not isinstance(ident, bool) and 1 <= ident <= MAX_ID
            obj = getattr(ctx, self.database).get(model, ident) if valid else None
            if obj is None or obj.owner_id != user:
                # Someone else's object looks exactly like a missing one.
                msg = f"{kind} {ident!r} not found"
                raise NotFound(msg)
        return handler(request)

"""The JSON HTTP API (and, under ``/app/``, the web pages of :mod:`notes.pages`).

Werkzeug routing, one polydatum context per request.

:class:`~polydatum.werkzeug.PolydatumWSGIMiddleware` opens the request's context
(meta: the user from the ``Authorization`` header, a request id…), commits
it when the response ended, rolls it back on a status >= 400, and turns
``ServiceError`` s into JSON errors (``NotFound`` 404, ``ConcurrencyConflict``
409…). The views below only translate HTTP to DAL calls and back.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response
from werkzeug.wsgi import wrap_file

from polydatum.werkzeug import PolydatumWSGIMiddleware, request_context

from notes.auth import MAX_ID, BadRequest, PayloadTooLarge, Unauthorized, Unavailable, user_from_token

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from notes.app import NotesApp

logger = logging.getLogger("notes.web")

MAX_JSON = 1024 * 1024
MAX_UPLOAD = 64 * 1024 * 1024

# Ids are SQL INTEGER keys (32 bits on PostgreSQL). A larger id in a URL matches no route (404),
# rather than reaching the database and failing there ("integer out of range", a 500).
ID = f"int(min=1, max={MAX_ID})"

URLS = Map(
    [
        Rule("/", endpoint="index", methods=["GET"]),
        Rule("/health", endpoint="health", methods=["GET"]),
        Rule("/users", endpoint="sign_up", methods=["POST"]),
        Rule(f"/users/<{ID}:user_id>", endpoint="profile", methods=["GET"]),
        Rule("/me", endpoint="me", methods=["GET"]),
        Rule("/notebooks", endpoint="notebooks", methods=["GET", "POST"]),
        Rule(f"/notebooks/<{ID}:notebook_id>/notes", endpoint="notebook_notes", methods=["GET", "POST"]),
        Rule(f"/notes/<{ID}:note_id>", endpoint="note", methods=["GET", "PUT", "DELETE"]),
        Rule(f"/notes/<{ID}:note_id>/words", endpoint="words", methods=["GET"]),
        Rule(f"/notes/<{ID}:note_id>/attachments", endpoint="attach", methods=["POST"]),
        Rule(f"/attachments/<{ID}:attachment_id>", endpoint="attachment", methods=["GET", "DELETE"]),
        Rule("/search", endpoint="search", methods=["GET"]),
    ]
)


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


def _body(request: Request) -> dict[str, Any]:
    if (request.content_length or 0) > MAX_JSON:
        msg = f"the JSON body is larger than {MAX_JSON} bytes"
        raise PayloadTooLarge(msg)
    try:
        data = json.loads(request.get_data(cache=False) or b"{}")
    except ValueError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    except RecursionError:  # "[[[[…" nested deeper than the JSON decoder recurses
        msg = "the body is JSON nested too deeply; send a flat JSON object"
        raise BadRequest(msg) from None
    if not isinstance(data, dict):
        msg = "the body must be a JSON object"
        raise BadRequest(msg)
    return data


def _int_arg(request: Request, name: str, default: int | None) -> int | None:
    value = request.args.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be an integer, got {value!r}") from None


class Views:
    """The endpoints; each returns a Werkzeug Response."""

    def __init__(self, app: NotesApp, max_upload: int) -> None:
        self.app = app
        self.max_upload = max_upload

    def index(self, request: Request) -> Response:
        return _json(
            {
                "name": "polydatum notes",
                "health": "/health",
                "endpoints": sorted(
                    {
                        f"{' '.join(sorted(set(r.methods or ()) - {'HEAD', 'OPTIONS'}))} {r.rule}"
                        for r in URLS.iter_rules()
                    }
                ),
                "start": 'curl -X POST -d \'{"name": "ada"}\' ' + request.host_url + "users",
            }
        )

    def health(self, request: Request) -> Response:
        report = self.app.health()
        ok = all(part["ok"] for part in report.values())
        return _json({"ok": ok, "parts": report}, 200 if ok else 503)

    def sign_up(self, request: Request) -> Response:
        return _json(_dal().users.sign_up(_body(request).get("name")), 201)

    def profile(self, request: Request, user_id: int) -> Response:
        return _json(_dal().users.profile(user_id))

    def me(self, request: Request) -> Response:
        return _json(_dal().users.profile(request_context().meta.user))

    def notebooks(self, request: Request) -> Response:
        if request.method == "POST":
            return _json(_dal().notebooks.add(_body(request).get("name")), 201)
        return _json({"notebooks": _dal().notebooks.mine()})

    def notebook_notes(self, request: Request, notebook_id: int) -> Response:
        if request.method == "POST":
            body = _body(request)
            return _json(_dal().notes.add(notebook_id, body.get("title"), body.get("text", "")), 201)
        limit = _int_arg(request, "limit", 50)
        return _json(_dal().notebooks.notes(notebook_id, limit=limit, after=request.args.get("after")))

    def note(self, request: Request, note_id: int) -> Response:
        if request.method == "PUT":
            body = _body(request)
            return _json(
                _dal().notes.edit(
                    note_id, version=body.get("version"), title=body.get("title"), text=body.get("text")
                )
            )
        if request.method == "DELETE":
            _dal().notes.remove(note_id, version=_int_arg(request, "version", None))
            return Response(status=204)
        return _json(_dal().notes.read(note_id))

    def words(self, request: Request, note_id: int) -> Response:
        return _json(_dal().notes.words(note_id))

    def attach(self, request: Request, note_id: int) -> Response:
        if (request.content_length or 0) > self.max_upload:
            msg = f"attachments are limited to {self.max_upload} bytes"
            raise PayloadTooLarge(msg)
        name = request.args.get("name")
        if not name:
            msg = "name the attachment: POST /notes/<id>/attachments?name=photo.jpg"
            raise BadRequest(msg)
        # The body is streamed into the blob store, never read into memory whole. A chunked
        # body that outgrows max_upload raises a 413 mid-way; the rollback removes the blob.
        attachment = _dal().notes.attach(note_id, name, request.stream, request.mimetype or None)
        return _json(attachment, 201)

    def attachment(self, request: Request, attachment_id: int) -> Response:
        if request.method == "DELETE":
            _dal().notes.detach(attachment_id)
            return Response(status=204)
        info, stream = _dal().notes.open_attachment(attachment_id)
        # Streamed: the context (and the blob stream) stays open until the body is sent.
        response = Response(
            wrap_file(request.environ, stream), mimetype=info["content_type"], direct_passthrough=True
        )
        response.content_length = info["size"]
        response.headers["Content-Disposition"] = _disposition(info["name"])
        return response

    def search(self, request: Request) -> Response:
        limit = _int_arg(request, "limit", 50)
        assert limit is not None
        return _json({"notes": _dal().notes.find(request.args.get("word"), limit=limit)})


_MATCH = "notes.match"


def _match(environ: WSGIEnvironment) -> tuple[Rule, dict[str, Any]]:
    """The request's rule and arguments, matched once: the meta (the route) and the view both need them.

    Raises:
        HTTPException: no such route (404), wrong method (405), a redirect.
    """
    found = environ.get(_MATCH)
    if found is None:
        try:
            found = URLS.bind_to_environ(environ).match(return_rule=True)
        except HTTPException as exc:
            found = exc
        environ[_MATCH] = found
    if isinstance(found, HTTPException):
        raise found
    return found  # type: ignore[no-any-return]


def _route(environ: WSGIEnvironment) -> str | None:
    """The matched route as a template (``/notes/{note_id}``), never the path: it names contexts."""
    try:
        rule, _ = _match(environ)
    except HTTPException:
        return None
    return _PLACEHOLDER.sub(r"{\1}", rule.rule)


_PLACEHOLDER = re.compile(r"<(?:[^:<>]+:)?(\w+)>")


def _dal() -> Any:
    return request_context().dal


def _disposition(name: str) -> str:
    from urllib.parse import quote

    return f"attachment; filename*=UTF-8''{quote(name)}"


def make_wsgi_app(app: NotesApp, *, max_upload: int = MAX_UPLOAD) -> PolydatumWSGIMiddleware:
    """The API as a WSGI application, wrapped in polydatum's middleware.

    Args:
        app: the built application.
        max_upload: the largest attachment accepted, in bytes (413 beyond).
    """
    from notes.pages import Pages, is_page, session_user

    views = Views(app, max_upload)
    pages = Pages(app, max_upload)
    secret = app.settings.secret_key

    def dispatch(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        if is_page(request.path):  # the web pages: HTML, their own errors
            return pages(request)(environ, start_response)
        request.max_content_length = max_upload if request.path.endswith("/attachments") else MAX_JSON
        try:
            rule, args = _match(environ)
            view: Callable[..., Response] = getattr(views, str(rule.endpoint))
            response = view(request, **args)
        except HTTPException as exc:
            code = exc.code or 500
            response = _json({"status": code, "error": exc.name, "message": exc.description}, code)
        except OperationalError as exc:
            # Down, restarting, out of connections, a deadlock: the client may retry.
            logger.warning("database unavailable during %s %s", request.method, request.path, exc_info=True)
            msg = "the database is unavailable; try again shortly"
            raise Unavailable(msg) from exc
        return response(environ, start_response)

    def meta(request: Request) -> dict[str, Any]:
        # Verified without the database: the token is signed. A bad token is a 401
        # before any context opens.
        if is_page(request.path):  # the pages' user comes from their session cookie
            return {"user": session_user(secret, request), "route": pages.route(request)}
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        route = _route(request.environ)
        if not header:
            return {"user": None, "route": route}
        if scheme.lower() != "bearer" or not token:
            msg = "send the token as Authorization: Bearer <token>"
            raise Unauthorized(msg)
        return {"user": user_from_token(secret, token.strip()), "route": route}

    return PolydatumWSGIMiddleware(dispatch, app.dm, meta=meta)

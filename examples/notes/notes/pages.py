"""The web pages: server-rendered HTML under ``/app/``, on the same DAL as the JSON API.

Jinja2 renders the templates in ``notes/templates`` with autoescaping on,
so a note's title or text is HTML-escaped wherever it is shown. There is no
JavaScript at all; the Content-Security-Policy forbids any.

- **Who is calling.** Signing up (or in, with the API token) sets the
  token in the ``notes_session`` cookie: ``Secure``, ``HttpOnly``,
  ``SameSite=Lax``. The web layer turns it into ``meta["user"]`` exactly as
  it does the ``Authorization`` header; a cookie that does not verify is
  treated as no cookie (the sign-in page), never as an error.
- **CSRF.** Every form carries a token, the HMAC of a random per-browser
  ``notes_csrf`` cookie under the secret key. A ``POST`` whose token is
  missing or wrong is a 403 page before any DAL call, so it changes nothing.
- **Errors** are pages with the error's status: a 409 from an edit is the
  "someone else changed this note" page offering a reload, an upload over
  the limit a 413 page. A status >= 400 rolls the request's context back,
  so a failed request leaves no row and no blob behind.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.routing import Map, Rule
from werkzeug.utils import redirect
from werkzeug.wrappers import Request, Response
from werkzeug.wsgi import wrap_file

from polydatum.errors import ConcurrencyConflict, ServiceError
from polydatum.werkzeug import request_context

from notes.auth import MAX_ID, BadRequest, Forbidden, PayloadTooLarge, Unauthorized, user_from_token

if TYPE_CHECKING:
    from notes.app import NotesApp

logger = logging.getLogger("notes.pages")

PREFIX = "/app"
SESSION_COOKIE = "notes_session"
CSRF_COOKIE = "notes_csrf"
CSRF_FIELD = "csrf"
HOME = PREFIX + "/"
PAGE_SIZE = 20
# The multipart envelope around the file (boundaries, the CSRF field, headers) is small;
# a body larger than the limit plus this is refused before it is read.
FORM_OVERHEAD = 16 * 1024
# Any other form: a note's 100,000 characters, percent-encoded UTF-8, fit with room to spare.
MAX_FORM = 2 * 1024 * 1024
_BROWSER = "notes.csrf_browser"  # the environ key of the request's notes_csrf value
_ID = f"int(min=1, max={MAX_ID})"

URLS = Map(
    [
        Rule(f"{PREFIX}/", endpoint="home", methods=["GET"]),
        Rule(f"{PREFIX}/style.css", endpoint="style", methods=["GET"]),
        Rule(f"{PREFIX}/sign-up", endpoint="sign_up", methods=["POST"]),
        Rule(f"{PREFIX}/sign-in", endpoint="sign_in", methods=["POST"]),
        Rule(f"{PREFIX}/sign-out", endpoint="sign_out", methods=["POST"]),
        Rule(f"{PREFIX}/notebooks", endpoint="add_notebook", methods=["POST"]),
        Rule(f"{PREFIX}/notebooks/<{_ID}:notebook_id>", endpoint="notebook", methods=["GET"]),
        Rule(f"{PREFIX}/notebooks/<{_ID}:notebook_id>/notes", endpoint="add_note", methods=["POST"]),
        Rule(f"{PREFIX}/notes/<{_ID}:note_id>", endpoint="note", methods=["GET"]),
        Rule(f"{PREFIX}/notes/<{_ID}:note_id>/edit", endpoint="edit", methods=["GET", "POST"]),
        Rule(f"{PREFIX}/notes/<{_ID}:note_id>/attachments", endpoint="attach", methods=["POST"]),
        Rule(f"{PREFIX}/attachments/<{_ID}:attachment_id>", endpoint="download", methods=["GET"]),
        Rule(f"{PREFIX}/search", endpoint="search", methods=["GET"]),
    ]
)

# No script may run, no page may frame ours; styles come from our own stylesheet.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def is_page(path: str) -> bool:
    """Whether ``path`` belongs to the web pages (not the JSON API)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def session_user(secret: str, request: Request) -> int | None:
    """The user the session cookie names, or None (no cookie, or one that does not verify)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    try:
        return user_from_token(secret, token)
    except Unauthorized:
        return None


def csrf_token(secret: str, browser: str) -> str:
    """The form token of the browser whose ``notes_csrf`` cookie is ``browser``."""
    return hmac.new(secret.encode(), f"csrf:{browser}".encode(), hashlib.sha256).hexdigest()


def _dal() -> Any:
    return request_context().dal


def _user() -> int | None:
    user: int | None = request_context().meta.get("user")
    return user


class Pages:
    """The page endpoints; each returns a Werkzeug Response.

    Args:
        app: the built application.
        max_upload: the largest attachment accepted, in bytes (a 413 page beyond).
    """

    def __init__(self, app: NotesApp, max_upload: int) -> None:
        self.app = app
        self.secret = app.settings.secret_key
        self.max_upload = max_upload
        self.templates = Environment(
            loader=PackageLoader("notes", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.stylesheet = (resources.files("notes") / "static" / "style.css").read_bytes()

    # -- dispatch ------------------------------------------------------------

    def route(self, request: Request) -> str | None:
        """The matched page route as a template (``/app/notes/{note_id}``), for context names."""
        try:
            rule, _ = URLS.bind_to_environ(request.environ).match(return_rule=True)
        except HTTPException:
            return None
        return rule.rule.replace(f"<{_ID}:", "{").replace(">", "}")

    def __call__(self, request: Request) -> Response:
        """Answer one page request (the request's context is open)."""
        browser = request.cookies.get(CSRF_COOKIE) or ""
        new_browser = None
        if len(browser) != 32 or not browser.isalnum():
            browser = new_browser = secrets.token_hex(16)
        request.environ[_BROWSER] = browser  # per request: the server is threaded
        try:
            response = self._dispatch(request, browser)
        except OperationalError:
            logger.warning("database unavailable during %s %s", request.method, request.path, exc_info=True)
            response = self._error(request, 503, "The database is unavailable", "Try again in a moment.")
        finally:
            request.close()  # the files a form upload spooled
        if new_browser is not None:
            response.set_cookie(
                CSRF_COOKIE, new_browser, path=PREFIX, secure=True, httponly=True, samesite="Lax"
            )
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def _dispatch(self, request: Request, browser: str) -> Response:
        args: Mapping[str, Any] = {}
        endpoint = None
        try:
            endpoint, args = URLS.bind_to_environ(request.environ).match()
            # Werkzeug refuses a larger body (or form field) with 413 while parsing the form.
            limit = self.max_upload + FORM_OVERHEAD if endpoint == "attach" else MAX_FORM
            request.max_content_length = request.max_form_memory_size = limit
            if request.method == "POST":
                self._check_csrf(request, limit, browser)
            view: Callable[..., Response] = getattr(self, f"page_{endpoint}")
            return view(request, **args)
        except RequestEntityTooLarge:
            if endpoint != "attach":
                return self._error(
                    request, 413, "That is too much text", "Notes hold up to 100,000 characters."
                )
            return self._too_large(request)
        except HTTPException as exc:
            code = exc.code or 500
            if 300 <= code < 400:  # the router's own redirect (a missing slash)
                return exc.get_response(request.environ)
            return self._error(request, code, exc.name, exc.description or "")
        except Unauthorized:
            return redirect(HOME, 303)
        except ConcurrencyConflict:
            return self._conflict(request, args.get("note_id"))
        except PayloadTooLarge:
            return self._too_large(request)
        except ServiceError as exc:
            code = exc.code if isinstance(exc.code, int) else 500
            message = exc.public_message if code < 500 else "Something went wrong on our side."
            return self._error(request, code, _title(code), message or "")

    def _check_csrf(self, request: Request, limit: int, browser: str) -> None:
        # Read from the form only after the size check (the parse would read the whole body).
        if (request.content_length or 0) > limit:
            raise RequestEntityTooLarge()
        sent = request.form.get(CSRF_FIELD, "")
        if not sent or not hmac.compare_digest(sent, csrf_token(self.secret, browser)):
            msg = "This form is out of date or did not come from this site. Reload the page and try again."
            raise Forbidden(msg)

    # -- rendering -----------------------------------------------------------

    def render(self, request: Request, template: str, status: int = 200, **values: Any) -> Response:
        """The template rendered as an HTML page; every value is escaped unless marked safe."""
        values.setdefault("signed_in", _user() is not None)
        body = self.templates.get_template(template).render(
            prefix=PREFIX, csrf=csrf_token(self.secret, request.environ[_BROWSER]), **values
        )
        return Response(body, status=status, mimetype="text/html")

    def _error(self, request: Request, status: int, title: str, message: str) -> Response:
        return self.render(request, "error.html", status, title=title, message=message)

    def _too_large(self, request: Request) -> Response:
        return self._error(
            request,
            413,
            "That file is too large",
            f"Attachments are limited to {_size(self.max_upload)}. Choose a smaller file.",
        )

    def _conflict(self, request: Request, note_id: int | None) -> Response:
        return self.render(
            request,
            "conflict.html",
            409,
            note_id=note_id,
            title=request.form.get("title", ""),
            text=request.form.get("text", ""),
        )

    # -- pages ---------------------------------------------------------------

    def page_home(self, request: Request) -> Response:
        if _user() is None:
            return self.render(request, "welcome.html")
        profile = _dal().users.profile(_user())
        return self.render(request, "home.html", user=profile, notebooks=_dal().notebooks.mine())

    def page_style(self, request: Request) -> Response:
        response = Response(self.stylesheet, mimetype="text/css")
        response.headers["Cache-Control"] = "max-age=3600"
        return response

    def page_sign_up(self, request: Request) -> Response:
        user = _dal().users.sign_up(request.form.get("name", ""))
        response = self.render(request, "signed_up.html", user=user, signed_in=True)
        self._sign_in(response, user["token"])
        return response

    def page_sign_in(self, request: Request) -> Response:
        token = request.form.get("token", "").strip()
        try:
            user_from_token(self.secret, token)
        except Unauthorized:
            return self._error(
                request,
                401,
                "That token is not valid",
                "Paste the API token you were given when you signed up.",
            )
        response = redirect(f"{PREFIX}/", 303)
        self._sign_in(response, token)
        return response

    def page_sign_out(self, request: Request) -> Response:
        response = redirect(f"{PREFIX}/", 303)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX, secure=True, httponly=True, samesite="Lax")
        return response

    def page_add_notebook(self, request: Request) -> Response:
        notebook = _dal().notebooks.add(request.form.get("name", ""))
        return redirect(f"{PREFIX}/notebooks/{notebook['id']}", 303)

    def page_notebook(self, request: Request, notebook_id: int) -> Response:
        limit = _int_arg(request, "limit", PAGE_SIZE)
        page = _dal().notebooks.notes(notebook_id, limit=limit, after=request.args.get("after"))
        notebook = next((n for n in _dal().notebooks.mine() if n["id"] == notebook_id), None)
        return self.render(
            request,
            "notebook.html",
            notebook=notebook,
            notes=page["notes"],
            next=page["next"],
            limit=limit,
            first=request.args.get("after") is None,
        )

    def page_add_note(self, request: Request, notebook_id: int) -> Response:
        note = _dal().notes.add(notebook_id, request.form.get("title", ""), request.form.get("text", ""))
        return redirect(f"{PREFIX}/notes/{note['id']}", 303)

    def page_note(self, request: Request, note_id: int) -> Response:
        note = _dal().notes.read(note_id)
        return self.render(request, "note.html", note=note, max_upload=_size(self.max_upload))

    def page_edit(self, request: Request, note_id: int) -> Response:
        if request.method == "GET":
            return self.render(request, "edit.html", note=_dal().notes.read(note_id))
        version = request.form.get("version", "")
        if not (version.isascii() and version.isdigit() and len(version) < 10):
            msg = "The form lost the note's version; open the note again and redo the edit."
            raise BadRequest(msg)
        _dal().notes.edit(
            note_id,
            version=int(version),
            title=request.form.get("title", ""),
            text=request.form.get("text", ""),
        )
        return redirect(f"{PREFIX}/notes/{note_id}", 303)

    def page_attach(self, request: Request, note_id: int) -> Response:
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            msg = "Choose a file to attach."
            raise BadRequest(msg)
        # The form parser spooled the file; its size is known before the blob store sees it.
        upload.stream.seek(0, 2)
        size = upload.stream.tell()
        upload.stream.seek(0)
        if size > self.max_upload:
            return self._too_large(request)
        _dal().notes.attach(note_id, upload.filename, upload.stream, upload.mimetype or None)
        return redirect(f"{PREFIX}/notes/{note_id}", 303)

    def page_download(self, request: Request, attachment_id: int) -> Response:
        from notes.web import _disposition

        info, stream = _dal().notes.open_attachment(attachment_id)
        response = Response(
            wrap_file(request.environ, stream), mimetype=info["content_type"], direct_passthrough=True
        )
        response.content_length = info["size"]
        # Always a download: a file of HTML must not render as a page of ours.
        response.headers["Content-Disposition"] = _disposition(info["name"])
        response.headers["Content-Security-Policy"] = "sandbox"
        return response

    def page_search(self, request: Request) -> Response:
        word = request.args.get("word", "").strip()
        found = _dal().notes.find(word) if word else []
        return self.render(request, "search.html", word=word, notes=found)

    def _sign_in(self, response: Response, token: str) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=30 * 24 * 3600,
            path=PREFIX,  # the pages only: the JSON API never receives it
            secure=True,
            httponly=True,
            samesite="Lax",
        )


def _int_arg(request: Request, name: str, default: int) -> int:
    value = request.args.get(name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit() and 1 <= len(value) <= 3):
        msg = f"{name} must be a whole number from 1 to 200"
        raise BadRequest(msg)
    return int(value)


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.3g} MiB"
    return f"{n / 1024:.3g} KiB" if n >= 1024 else f"{n} bytes"


def _title(status: int) -> str:
    return {
        400: "That did not work",
        403: "Not allowed",
        404: "Not found",
        409: "That conflicts with something",
        413: "Too large",
    }.get(status, "Something went wrong")

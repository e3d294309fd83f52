"""The example's web pages (``/app/``) through Werkzeug's test client, on the embedded stack.

What the browser test (test_notes_tour.py) shows, checked here without a
browser: the session cookie's attributes, CSRF on every form, the 413
page that leaves no blob, escaping, the conflict page, keyset pages.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from notes import Settings, build
from notes.app import NotesApp
from notes.models import Attachment, Note, Notebook, User
from notes.pages import CSRF_COOKIE, SESSION_COOKIE
from notes.web import make_wsgi_app
from sqlalchemy import func, select
from werkzeug.test import Client, TestResponse

MAX_UPLOAD = 2048
XSS = '<script>document.title="pwned"</script>'


@pytest.fixture(name="app")
def fixture_app(tmp_path: Path) -> Iterator[NotesApp]:
    app = build(Settings.from_env({"NOTES_DATA": str(tmp_path)}))
    try:
        app.check()
        app.create_tables()
        yield app
    finally:
        app.close()


@pytest.fixture(name="client")
def fixture_client(app: NotesApp) -> Client:
    return Client(make_wsgi_app(app, max_upload=MAX_UPLOAD))


def csrf_of(response: TestResponse) -> str:
    """The CSRF token in the first form of a page."""
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', response.get_data(as_text=True))
    assert match, response.get_data(as_text=True)
    return match.group(1)


def sign_up(client: Client, name: str = "ada") -> str:
    """Sign up through the form; returns the CSRF token of this client's browser."""
    token = csrf_of(client.get("/app/"))
    response = client.post("/app/sign-up", data={"csrf": token, "name": name})
    assert response.status_code == 200, response.get_data(as_text=True)
    return token


def add_notebook(client: Client, csrf: str, name: str = "ideas") -> int:
    response = client.post("/app/notebooks", data={"csrf": csrf, "name": name})
    assert response.status_code == 303, response.get_data(as_text=True)
    return int(response.headers["Location"].rsplit("/", 1)[1])


def add_note(client: Client, csrf: str, notebook: int, title: str, text: str = "") -> int:
    response = client.post(
        f"/app/notebooks/{notebook}/notes", data={"csrf": csrf, "title": title, "text": text}
    )
    assert response.status_code == 303, response.get_data(as_text=True)
    return int(response.headers["Location"].rsplit("/", 1)[1])


def counts(app: NotesApp) -> dict[str, Any]:
    """What the database holds: rows per table and every note's version."""
    with app.db.engine.connect() as conn:
        return {
            "users": conn.scalar(select(func.count()).select_from(User)),
            "notebooks": conn.scalar(select(func.count()).select_from(Notebook)),
            "attachments": conn.scalar(select(func.count()).select_from(Attachment)),
            "notes": sorted(conn.execute(select(Note.id, Note.title, Note.version)).all()),
        }


def blob_files(app: NotesApp) -> list[Path]:
    root = app.settings.data_dir / "blobs"
    # Only the stored objects: the store keeps a lock file of its own beside them.
    return [p for p in root.rglob("*") if p.is_file() and ".polydatum" not in p.parts]


def test_the_welcome_page_offers_sign_up_and_sign_in(client: Client) -> None:
    """A new browser gets the HTML welcome page, a CSRF cookie and strict security headers."""
    response = client.get("/app/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    body = response.get_data(as_text=True)
    assert 'action="/app/sign-up"' in body
    assert 'action="/app/sign-in"' in body
    assert "script-src" not in response.headers["Content-Security-Policy"]  # default-src 'none'
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    cookie = client.get_cookie(CSRF_COOKIE, path="/app")
    assert cookie is not None
    assert cookie.secure
    assert cookie.http_only
    assert cookie.same_site == "Lax"
    assert client.get("/app/style.css").mimetype == "text/css"


def test_sign_up_sets_a_secure_http_only_same_site_session_cookie(client: Client, app: NotesApp) -> None:
    """The token lives in a Secure, HttpOnly, SameSite cookie; the pages then know the user."""
    sign_up(client, "ada")
    cookie = client.get_cookie(SESSION_COOKIE, path="/app")
    assert cookie is not None
    assert cookie.secure
    assert cookie.http_only
    assert cookie.same_site == "Lax"
    assert cookie.value.startswith("1.")
    home = client.get("/app/").get_data(as_text=True)
    assert "ada's notebooks" in home


def test_sign_in_takes_the_api_token_and_sign_out_drops_it(client: Client, app: NotesApp) -> None:
    """Signing in with the API token signs in; a wrong token is a 401 page; signing out ends it."""
    csrf = sign_up(client, "ada")
    token = client.get_cookie(SESSION_COOKIE, path="/app").value  # type: ignore[union-attr]
    assert client.post("/app/sign-out", data={"csrf": csrf}).status_code == 303
    assert client.get_cookie(SESSION_COOKIE, path="/app") is None
    assert 'action="/app/sign-up"' in client.get("/app/").get_data(as_text=True)

    wrong = client.post("/app/sign-in", data={"csrf": csrf, "token": token[:-1] + "0"})
    assert wrong.status_code == 401
    assert "That token is not valid" in wrong.get_data(as_text=True)
    assert client.get_cookie(SESSION_COOKIE, path="/app") is None

    assert client.post("/app/sign-in", data={"csrf": csrf, "token": token}).status_code == 303
    assert "ada's notebooks" in client.get("/app/").get_data(as_text=True)


def test_a_forged_cookie_is_no_user(client: Client) -> None:
    """A session cookie that does not verify is treated as none: the welcome page, not an error."""
    client.set_cookie(SESSION_COOKIE, "1.forged", path="/app")
    response = client.get("/app/")
    assert response.status_code == 200
    assert 'action="/app/sign-up"' in response.get_data(as_text=True)
    redirected = client.get("/app/notebooks/1")
    assert redirected.status_code == 303
    assert redirected.headers["Location"] == "/app/"


def test_the_cookie_does_not_authenticate_the_json_api(client: Client) -> None:
    """The JSON API has no CSRF check, so only the Authorization header signs in there."""
    sign_up(client)
    assert client.get_cookie(SESSION_COOKIE, path="/app") is not None
    # Even sent along by hand (its path keeps browsers from doing so), it is not a credential there.
    client.set_cookie(SESSION_COOKIE, client.get_cookie(SESSION_COOKIE, path="/app").value)  # type: ignore[union-attr]
    response = client.get("/me")
    assert response.status_code == 401
    assert response.json is not None
    assert "Bearer" in response.json["message"]
    assert client.get("/").json["name"] == "polydatum notes"  # type: ignore[index]


@pytest.mark.parametrize("sent", ["missing", "wrong", "another browser's"])
def test_every_form_refuses_a_bad_csrf_token_and_changes_nothing(
    client: Client, app: NotesApp, sent: str
) -> None:
    """Every form POST without the right CSRF token is a 403 page, and nothing changes."""
    csrf = sign_up(client, "ada")
    notebook = add_notebook(client, csrf)
    note = add_note(client, csrf, notebook, "first", "words")
    token = client.get_cookie(SESSION_COOKIE, path="/app").value  # type: ignore[union-attr]
    before = counts(app)
    blobs = blob_files(app)
    bad = {
        "missing": {},
        "wrong": {"csrf": "0" * 64},
        # A token valid for another browser's notes_csrf cookie, as a cross-site page could get.
        "another browser's": {"csrf": csrf_of(Client(client.application).get("/app/"))},
    }[sent]
    forms: list[tuple[str, dict[str, Any]]] = [
        ("/app/sign-up", {"name": "mallory"}),
        ("/app/sign-in", {"token": token}),
        ("/app/sign-out", {}),
        ("/app/notebooks", {"name": "planted"}),
        (f"/app/notebooks/{notebook}/notes", {"title": "planted", "text": ""}),
        (f"/app/notes/{note}/edit", {"version": "1", "title": "defaced", "text": ""}),
        (f"/app/notes/{note}/attachments", {"file": (_bytes(b"planted"), "planted.txt")}),
    ]
    for path, data in forms:
        response = client.post(path, data={**bad, **data})
        assert response.status_code == 403, path
        assert "did not come from this site" in response.get_data(as_text=True), path
        assert "Set-Cookie" not in response.headers or SESSION_COOKIE not in response.headers["Set-Cookie"]
    assert counts(app) == before
    assert blob_files(app) == blobs
    assert client.get_cookie(SESSION_COOKIE, path="/app").value == token  # type: ignore[union-attr]


@pytest.mark.parametrize("size", [MAX_UPLOAD + 1, MAX_UPLOAD * 20], ids=["just-over", "far-over"])
def test_an_upload_over_the_limit_is_a_413_page_and_leaves_no_blob(
    client: Client, app: NotesApp, size: int
) -> None:
    """A file over the limit gets a readable 413 page; no attachment row, no blob."""
    csrf = sign_up(client)
    note = add_note(client, csrf, add_notebook(client, csrf), "with a file")
    response = client.post(
        f"/app/notes/{note}/attachments", data={"csrf": csrf, "file": (_bytes(b"x" * size), "big.bin")}
    )
    assert response.status_code == 413
    body = response.get_data(as_text=True)
    assert "That file is too large" in body
    assert "limited to 2 KiB" in body
    assert counts(app)["attachments"] == 0
    assert blob_files(app) == []


def test_an_attachment_up_to_the_limit_is_stored_and_downloaded(client: Client, app: NotesApp) -> None:
    """A file of exactly the limit is attached, listed on the note and downloaded as a file."""
    csrf = sign_up(client)
    note = add_note(client, csrf, add_notebook(client, csrf), "with a file")
    data = bytes(range(256)) * (MAX_UPLOAD // 256)
    response = client.post(
        f"/app/notes/{note}/attachments",
        data={"csrf": csrf, "file": (_bytes(data), "<b>data</b>.bin", "application/octet-stream")},
    )
    assert response.status_code == 303
    page = client.get(f"/app/notes/{note}").get_data(as_text=True)
    assert "&lt;b&gt;data&lt;/b&gt;.bin" in page
    link = re.search(r'href="(/app/attachments/\d+)"', page)
    assert link
    download = client.get(link.group(1))
    assert download.status_code == 200
    assert download.get_data() == data
    assert download.headers["Content-Disposition"].startswith("attachment;")
    assert download.headers["Content-Security-Policy"] == "sandbox"
    assert len(blob_files(app)) == 1

    # Someone else cannot download it: it looks like a missing one.
    other = Client(client.application)
    sign_up(other, "bob")
    assert other.get(link.group(1)).status_code == 404


def test_an_upload_without_a_file_is_a_400_page(client: Client) -> None:
    """Submitting the upload form with no file chosen says what to do."""
    csrf = sign_up(client)
    note = add_note(client, csrf, add_notebook(client, csrf), "no file")
    response = client.post(f"/app/notes/{note}/attachments", data={"csrf": csrf})
    assert response.status_code == 400
    assert "Choose a file to attach." in response.get_data(as_text=True)


def test_titles_and_texts_are_escaped_on_every_page(client: Client, app: NotesApp) -> None:
    """HTML in a notebook name, a note's title and its text is shown as text everywhere."""
    csrf = sign_up(client, "<i>ada</i>")
    notebook = add_notebook(client, csrf, "<u>book</u>")
    note = add_note(client, csrf, notebook, XSS, f"alpha {XSS} <img src=x>")
    pages = {
        "home": client.get("/app/"),
        "notebook": client.get(f"/app/notebooks/{notebook}"),
        "note": client.get(f"/app/notes/{note}"),
        "edit": client.get(f"/app/notes/{note}/edit"),
        "search": client.get("/app/search?word=alpha"),
    }
    for name, response in pages.items():
        body = response.get_data(as_text=True)
        assert response.status_code == 200, name
        assert "<script" not in body, name
        assert "<img" not in body, name
        assert "<i>" not in body, name
        assert "<u>" not in body, name
    assert "&lt;u&gt;book&lt;/u&gt;" in pages["home"].get_data(as_text=True)
    assert "&lt;i&gt;ada&lt;/i&gt;" in pages["home"].get_data(as_text=True)
    for name in ("notebook", "note", "edit", "search"):
        assert "&lt;script&gt;document.title=&#34;pwned&#34;&lt;/script&gt;" in pages[name].get_data(
            as_text=True
        ), name

    # The conflict page shows the text the user sent back, escaped too.
    conflict = client.post(
        f"/app/notes/{note}/edit", data={"csrf": csrf, "version": "7", "title": XSS, "text": "<img src=x>"}
    )
    assert conflict.status_code == 409
    body = conflict.get_data(as_text=True)
    assert "<script" not in body
    assert "<img" not in body
    assert "&lt;img src=x&gt;" in body


def test_an_edit_of_a_stale_version_is_the_conflict_page(client: Client, app: NotesApp) -> None:
    """Two edit forms of one version: the first save wins, the second is a 409 page offering a reload."""
    csrf = sign_up(client)
    note = add_note(client, csrf, add_notebook(client, csrf), "plan", "v1")
    tab_a = client.get(f"/app/notes/{note}/edit").get_data(as_text=True)
    tab_b = client.get(f"/app/notes/{note}/edit").get_data(as_text=True)
    assert 'name="version" value="1"' in tab_a
    assert 'name="version" value="1"' in tab_b

    first = client.post(
        f"/app/notes/{note}/edit", data={"csrf": csrf, "version": "1", "title": "plan", "text": "A"}
    )
    assert first.status_code == 303
    second = client.post(
        f"/app/notes/{note}/edit", data={"csrf": csrf, "version": "1", "title": "plan B", "text": "B's text"}
    )
    assert second.status_code == 409
    body = second.get_data(as_text=True)
    assert "Someone else changed this note" in body
    assert f'href="/app/notes/{note}/edit"' in body  # the reload
    assert "B&#39;s text" in body  # what they wrote, to copy from
    assert [row.version for row in counts(app)["notes"]] == [2]
    assert 'name="version" value="2"' in client.get(f"/app/notes/{note}/edit").get_data(as_text=True)
    assert ">A</pre>" in client.get(f"/app/notes/{note}").get_data(as_text=True)


@pytest.mark.parametrize("version", ["", "x", "-1", "1" * 20])
def test_an_edit_with_a_broken_version_is_a_400_page(client: Client, app: NotesApp, version: str) -> None:
    """A version field that is not a small whole number is refused, and the note is unchanged."""
    csrf = sign_up(client)
    note = add_note(client, csrf, add_notebook(client, csrf), "plan")
    response = client.post(
        f"/app/notes/{note}/edit", data={"csrf": csrf, "version": version, "title": "t", "text": ""}
    )
    assert response.status_code == 400
    assert "lost the note&#39;s version" in response.get_data(as_text=True)
    assert [row.version for row in counts(app)["notes"]] == [1]


def test_a_notebook_is_shown_in_keyset_pages(client: Client) -> None:
    """Following "Older notes" walks every note once, newest first."""
    csrf = sign_up(client)
    notebook = add_notebook(client, csrf)
    for i in range(5):
        add_note(client, csrf, notebook, f"note {i}")
    seen: list[str] = []
    url: str | None = f"/app/notebooks/{notebook}?limit=2"
    pages = 0
    while url is not None:
        body = client.get(url).get_data(as_text=True)
        seen += re.findall(r'<a href="/app/notes/\d+">([^<]+)</a>', body)
        found = re.search(r'rel="next" href="([^"]+)"', body)
        url = found.group(1).replace("&amp;", "&") if found else None
        pages += 1
    assert seen == [f"note {i}" for i in reversed(range(5))]
    assert pages == 3


@pytest.mark.parametrize("query", ["limit=0", "limit=x", "limit=9999", "after=not-a-cursor"])
def test_a_bad_page_argument_is_a_400_page(client: Client, query: str) -> None:
    """A broken limit or cursor in a notebook's URL is a readable 400 page."""
    csrf = sign_up(client)
    notebook = add_notebook(client, csrf)
    response = client.get(f"/app/notebooks/{notebook}?{query}")
    assert response.status_code == 400
    assert response.mimetype == "text/html"


def test_search_finds_the_callers_notes_by_word(client: Client) -> None:
    """Search lists the notes with the word (indexed by the background job after the commit)."""
    csrf = sign_up(client)
    notebook = add_notebook(client, csrf)
    add_note(client, csrf, notebook, "groceries", "milk bread milk")
    add_note(client, csrf, notebook, "work", "meeting")
    body = client.get("/app/search?word=Milk").get_data(as_text=True)
    assert re.findall(r'<a href="/app/notes/\d+">([^<]+)</a>', body) == ["groceries"]
    empty = client.get("/app/search?word=zebra").get_data(as_text=True)
    assert "No note has that word" in empty


def test_someone_elses_notebook_and_unknown_pages_are_404_pages(client: Client) -> None:
    """Another user's notebook looks missing; an unknown path and a wrong method are pages too."""
    csrf = sign_up(client, "ada")
    notebook = add_notebook(client, csrf)
    other = Client(client.application)
    sign_up(other, "bob")
    assert other.get(f"/app/notebooks/{notebook}").status_code == 404
    missing = client.get("/app/nowhere")
    assert missing.status_code == 404
    assert missing.mimetype == "text/html"
    assert client.get("/app/sign-up").status_code == 405


def test_a_taken_name_is_a_409_page(client: Client, app: NotesApp) -> None:
    """Signing up with a taken name says so, and sets no session cookie."""
    sign_up(client, "ada")
    other = Client(client.application)
    csrf = csrf_of(other.get("/app/"))
    response = other.post("/app/sign-up", data={"csrf": csrf, "name": "ada"})
    assert response.status_code == 409
    assert "is taken" in response.get_data(as_text=True)
    assert other.get_cookie(SESSION_COOKIE, path="/app") is None
    assert counts(app)["users"] == 1


def test_a_note_of_the_longest_text_fits_and_a_larger_form_is_a_413_page(
    client: Client, app: NotesApp
) -> None:
    """100,000 non-ASCII characters are accepted; a form body beyond the limit is refused, unread."""
    csrf = sign_up(client)
    notebook = add_notebook(client, csrf)
    add_note(client, csrf, notebook, "long", "é" * 100_000)
    before = counts(app)
    response = client.post(
        f"/app/notebooks/{notebook}/notes", data={"csrf": csrf, "title": "huge", "text": "x" * 3_000_000}
    )
    assert response.status_code == 413
    assert "That is too much text" in response.get_data(as_text=True)
    assert counts(app) == before


def _bytes(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def test_a_database_that_is_down_is_a_503_page(tmp_path: Path) -> None:
    """A signed-in page while nothing listens at the database's address: a readable 503, no traceback."""
    from notes.auth import make_token

    app = build(
        Settings.from_env(
            {"NOTES_DATA": str(tmp_path), "DATABASE_URL": "postgresql://u:pw@127.0.0.1:1/notes"}
        )
    )
    try:
        client = Client(make_wsgi_app(app))
        client.set_cookie(SESSION_COOKIE, make_token(app.settings.secret_key, 1), path="/app")
        response = client.get("/app/")
        assert response.status_code == 503
        body = response.get_data(as_text=True)
        assert "The database is unavailable" in body
        assert "127.0.0.1" not in body
        assert "pw" not in body
    finally:
        app.close()

"""The notes example's ASGI entry point (notes.asgi) answers as its WSGI API does, error paths included.

Both apps serve one embedded stack (SQLite, filesystem blobs, in-process
cache, eager Celery): the WSGI API through Werkzeug's test client, the ASGI
one through httpx's ASGITransport. The scripted session of 200 requests on
the server stack is tests/load/test_twin_asgi.py; these are the answers it
does not reach.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from notes import Settings, build
from notes.app import NotesApp
from notes.asgi import CHUNK, create_app, make_asgi_app
from notes.web import MAX_JSON, make_wsgi_app
from sqlalchemy import text
from werkzeug.test import Client

from tests.support.sql import fresh_postgres_database

LIMIT = 10  # bytes: the largest attachment both apps take here


@pytest.fixture(name="app")
def fixture_app(tmp_path: Path) -> Iterator[NotesApp]:
    """The example on the embedded stack, its schema made."""
    with ExitStack() as stack:
        app = build(Settings.from_env({"NOTES_DATA": str(tmp_path)}))
        stack.callback(app.close)
        app.create_tables()
        yield app


class Both:
    """One request sent to the WSGI API and to the ASGI API; their answers."""

    def __init__(self, app: NotesApp) -> None:
        self.wsgi = Client(make_wsgi_app(app, max_upload=LIMIT))
        self.asgi = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=make_asgi_app(app, max_upload=LIMIT)), base_url="http://notes"
        )

    async def send(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[tuple[int, Any], tuple[int, Any]]:
        headers = headers or {}
        w = self.wsgi.open(path, method=method, data=body, headers=headers)
        a = await self.asgi.request(method, path, content=body, headers=headers)
        return (w.status_code, _parsed(w.get_data())), (a.status_code, _parsed(a.content))


def _parsed(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


@pytest.fixture(name="both")
async def fixture_both(app: NotesApp) -> AsyncIterator[Both]:
    """The two APIs over ``app``."""
    both = Both(app)
    yield both
    await both.asgi.aclose()


async def _user(both: Both) -> tuple[dict[str, str], int]:
    """A signed-up user's auth header and a note of theirs (made through the ASGI API)."""
    user = (await both.asgi.post("/users", json={"name": "ada"})).json()
    auth = {"Authorization": f"Bearer {user['token']}"}
    notebook = (await both.asgi.post("/notebooks", json={"name": "inbox"}, headers=auth)).json()
    note = await both.asgi.post(f"/notebooks/{notebook['id']}/notes", json={"title": "t"}, headers=auth)
    assert note.status_code == 201
    return auth, int(note.json()["id"])


async def test_the_error_answers_are_the_wsgi_apis(both: Both) -> None:
    """Routing, ids, bodies, tokens, query values and sizes: the same status and body from both."""
    auth, note = await _user(both)
    cases: list[tuple[str, str, bytes | None, dict[str, str]]] = [
        ("GET", "/nowhere", None, {}),  # no route: 404
        ("PATCH", f"/notes/{note}", b"{}", auth),  # wrong method: 405
        ("GET", "/notes/0", None, auth),  # an id no INTEGER key has: 404
        ("GET", "/notes/2147483648", None, auth),
        ("GET", "/notes/999999", None, auth),  # missing: 404
        ("GET", f"/notes/{note}", None, {}),  # no token: 401
        ("GET", f"/notes/{note}", None, {"Authorization": "Basic YWRh"}),  # not a bearer token: 401
        ("GET", "/nowhere", None, {"Authorization": "Bearer 1.forged"}),  # a bad token before the route
        ("POST", "/notebooks", b"[1]", auth),  # not an object: 400
        ("POST", "/notebooks", b"[" * 100_000, auth),  # nested too deeply: 400
        ("POST", "/notebooks", b"{oops", auth),  # not JSON: 400
        ("POST", "/notebooks", b" " * (MAX_JSON + 1), auth),  # too large: 413
        ("PUT", f"/notes/{note}", b'{"version": "1"}', auth),  # 400
        ("DELETE", f"/notes/{note}?version=abc", None, auth),  # 400
        ("POST", f"/notes/{note}/attachments", b"x", auth),  # no name: 400
        ("POST", f"/notes/{note}/attachments?name=a", b"x" * (LIMIT + 1), auth),  # over the limit: 413
        ("POST", "/notebooks/999999/notes", b'{"title": "t"}', auth),  # someone else's or missing: 404
    ]
    for method, path, body, headers in cases:
        wsgi, asgi = await both.send(method, path, body, headers)
        assert asgi == wsgi, f"{method} {path}"
        assert asgi[0] >= 400, f"{method} {path}"


async def test_a_chunked_upload_over_the_limit_is_refused_and_leaves_nothing(
    both: Both, app: NotesApp
) -> None:
    """A body with no length that outgrows the limit half-way: 413, and neither a row nor a blob remains."""
    auth, note = await _user(both)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 4

    answer = await both.asgi.post(f"/notes/{note}/attachments?name=big.bin", content=chunks(), headers=auth)
    assert answer.status_code == 413
    assert answer.json()["message"] == f"attachments are limited to {LIMIT} bytes"
    with app.db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM attachments")).scalar_one() == 0
    assert list(app.blobs.list("notes/")) == []


async def test_an_upload_is_streamed_into_an_attachment(both: Both) -> None:
    """A chunked body within the limit is stored whole, and fetched back with its type and name."""
    auth, note = await _user(both)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"hello"
        yield b" you"

    headers = {**auth, "Content-Type": "text/plain"}
    made = await both.asgi.post(f"/notes/{note}/attachments?name=hi.txt", content=chunks(), headers=headers)
    assert made.status_code == 201
    assert made.json()["size"] == 9
    got = await both.asgi.get(made.json()["url"], headers=auth)
    assert got.status_code == 200
    assert got.content == b"hello you"
    assert got.headers["content-disposition"] == "attachment; filename*=UTF-8''hi.txt"


async def test_a_database_that_is_down_is_a_503(tmp_path: Path) -> None:
    """The database refuses connections: 503 with the WSGI API's text, from both."""
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings.from_env(
        {"NOTES_DATA": str(tmp_path), "DATABASE_URL": f"postgresql://nobody@127.0.0.1:{port}/none"}
    )
    app = build(settings)
    try:
        both = Both(app)
        wsgi, asgi = await both.send("POST", "/users", b'{"name": "ada"}')
        await both.asgi.aclose()
    finally:
        app.close()
    assert asgi == wsgi
    message = "the database is unavailable; try again shortly"
    assert asgi == (503, {"status": 503, "error": "Service Unavailable", "message": message})


async def test_create_app_builds_from_the_environment_and_closes_at_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``uvicorn --factory notes.asgi:create_app``: configured by the environment, serving once migrated."""
    monkeypatch.setenv("NOTES_DATA", str(tmp_path))
    for name in ("DATABASE_URL", "REDIS_URL", "BLOB_URL", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    migrated = build(Settings.from_env())
    migrated.create_tables()  # what `polydatum-notes migrate` does
    migrated.close()
    api = create_app()
    async with api.router.lifespan_context(api):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://notes") as client:
            answer = await client.post("/users", json={"name": "grace"})
    assert answer.status_code == 201
    assert answer.json()["name"] == "grace"


async def test_a_download_does_not_wait_for_the_endpoints_it_keeps_waiting(
    tmp_path: Path, postgres_url: str
) -> None:
    """A streamed attachment and an endpoint waiting for its connection: neither waits out the pool's timeout.

    One pooled connection left and one thread in FastAPI's pool. The
    download's endpoint takes the connection (its context keeps it until
    the last block is sent) and gives the thread back; the next request's
    endpoint gets that thread and waits for the connection. Were the
    download's blocks read in FastAPI's pool too, it would wait for that
    thread: neither would move until the pool's 30 s timeout.
    """
    with ExitStack() as stack:
        url = stack.enter_context(fresh_postgres_database(postgres_url))
        app = build(Settings.from_env({"NOTES_DATA": str(tmp_path), "DATABASE_URL": url}))
        stack.callback(app.close)
        app.create_tables()
        both = Both(app)
        auth, note = await _user(both)
        data = b"x" * (3 * CHUNK)  # three body messages
        big = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=make_asgi_app(app, max_upload=len(data))),
            base_url="http://notes",
        )
        made = await big.post(f"/notes/{note}/attachments?name=big.bin", content=data, headers=auth)
        assert made.status_code == 201

        engine = app.db.engine
        assert engine.pool.size() == 5  # SQLAlchemy's default QueuePool: 5 + 10 overflow
        held = [engine.connect() for _ in range(14)]  # all but one of the pool's 15
        limiter = anyio.to_thread.current_default_thread_limiter()
        tokens, limiter.total_tokens = limiter.total_tokens, 1
        try:
            download = asyncio.create_task(big.get(made.json()["url"], headers=auth))
            other = asyncio.create_task(big.get(f"/notes/{note}", headers=auth))
            async with asyncio.timeout(10):
                fetched, read = await asyncio.gather(download, other)
        finally:
            for conn in held:
                conn.close()
            limiter.total_tokens = tokens
            await asyncio.gather(download, other, return_exceptions=True)
            await big.aclose()
            await both.asgi.aclose()
        assert fetched.status_code == 200
        assert fetched.content == data
        assert read.status_code == 200

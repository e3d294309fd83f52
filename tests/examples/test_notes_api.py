"""The notes example end to end over real HTTP, on two stacks.

``embedded``: SQLite file, filesystem blobs, in-process cache, Celery eager.
``servers``: PostgreSQL, Redis, S3 (moto server over HTTP) and a real Celery
worker consuming RabbitMQ (in a thread of this process, solo pool).

The app's WSGI server runs in a thread on 127.0.0.1, port 0; the tests talk
to it with httpx, and look behind the API (SQL, cache, blob store) only to
check what the API cannot show.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from notes import Settings, build
from notes.app import NotesApp
from notes.auth import BadRequest
from notes.web import make_wsgi_app
from sqlalchemy import text

from tests.examples.conftest import serving
from tests.support.s3 import REGION, MotoServer
from tests.support.s3 import moto_server_fixture as moto_server_fixture
from tests.support.sql import fresh_postgres_database

WAIT = 20.0  # seconds: a ceiling for background jobs, never a pass/fail timing


def _start(stack: ExitStack, environ: dict[str, str]) -> NotesApp:
    app = build(Settings.from_env(environ))
    stack.callback(app.close)
    app.check()
    app.create_tables()
    return app


def _embedded(stack: ExitStack, tmp: Path) -> NotesApp:
    return _start(stack, {"NOTES_DATA": str(tmp)})


def _servers(stack: ExitStack, request: pytest.FixtureRequest) -> NotesApp:
    from tests.support.celery_worker import in_thread_worker

    postgres = stack.enter_context(fresh_postgres_database(request.getfixturevalue("postgres_url")))
    moto: MotoServer = request.getfixturevalue("moto_server")
    bucket = moto.create_bucket(f"notes-{uuid.uuid4().hex[:12]}")
    env = stack.enter_context(pytest.MonkeyPatch.context())
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", REGION),
    ):
        env.setenv(name, value)
    run = uuid.uuid4().hex[:10]
    app = _start(
        stack,
        {
            "DATABASE_URL": postgres,
            "REDIS_URL": request.getfixturevalue("redis_url"),
            "CACHE_NAMESPACE": f"notes-test-{run}",
            "BLOB_URL": f"s3://{bucket}/notes-app",
            "AWS_ENDPOINT_URL": moto.endpoint_url,
            "CELERY_BROKER_URL": request.getfixturevalue("rabbitmq_url"),
            "CELERY_QUEUE": f"notes-test-{run}",
        },
    )
    stack.callback(app.cache.clear)

    def delete_queue() -> None:
        with app.celery.connection_for_write() as conn:
            conn.default_channel.queue_delete(app.settings.celery_queue)

    stack.callback(delete_queue)
    # No AMQP heartbeats for the in-thread worker: stopping it would wait for one (~10 s).
    app.celery.conf.broker_heartbeat = 0
    stack.enter_context(in_thread_worker(app.celery))
    return app


@pytest.fixture(scope="module", params=["embedded", "servers"])
def notes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """The running app: ``app`` (NotesApp), ``url``, ``kind``."""
    with ExitStack() as stack:
        if request.param == "embedded":
            app = _embedded(stack, tmp_path_factory.mktemp("notes"))
        else:
            app = _servers(stack, request)
        url = stack.enter_context(serving(app.wsgi()))
        client = stack.enter_context(httpx.Client(base_url=url, timeout=30))
        yield SimpleNamespace(app=app, url=url, kind=request.param, http=client)


class User:
    """A signed-up user and an HTTP client carrying their token."""

    def __init__(self, notes: SimpleNamespace) -> None:
        response = notes.http.post("/users", json={"name": f"user-{uuid.uuid4().hex[:12]}"})
        assert response.status_code == 201, response.text
        self.id: int = response.json()["id"]
        self.token: str = response.json()["token"]
        self.notes = notes
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.notes.http.request(method, path, headers=headers, **kwargs)

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        assert response.status_code == status, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None

    def notebook(self, name: str = "inbox") -> int:
        return int(self.ok("POST", "/notebooks", 201, json={"name": name})["id"])

    def note(self, notebook: int, title: str = "a note", text: str = "") -> dict[str, Any]:
        return dict(self.ok("POST", f"/notebooks/{notebook}/notes", 201, json={"title": title, "text": text}))


def wait_for_index(user: User, note_id: int, version: int) -> dict[str, Any]:
    """Poll the word index until the job built it for ``version`` (fail after WAIT seconds)."""
    deadline = time.monotonic() + WAIT
    while True:
        words = user.ok("GET", f"/notes/{note_id}/words")
        if words["indexed_version"] == version:
            return dict(words)
        if time.monotonic() > deadline:
            raise AssertionError(f"the index of note {note_id} never reached version {version}: {words}")
        time.sleep(0.05)


def blob_key(notes: SimpleNamespace, attachment_id: int) -> str:
    with notes.app.db.engine.connect() as conn:
        return str(
            conn.execute(text("SELECT key FROM attachments WHERE id = :i"), {"i": attachment_id}).scalar_one()
        )


# -- users and auth ------------------------------------------------------------


def test_sign_up_and_tokens(notes: SimpleNamespace) -> None:
    ann = User(notes)
    taken = notes.http.post("/users", json={"name": "  "})
    assert taken.status_code == 400
    profile = ann.ok("GET", "/me")
    assert profile == {"id": ann.id, "name": profile["name"], "note_count": 0}
    name = profile["name"]
    again = notes.http.post("/users", json={"name": name})
    assert again.status_code == 409
    assert "taken" in again.json()["message"]

    anonymous = notes.http.get("/notebooks")
    assert anonymous.status_code == 401
    assert "Authorization: Bearer" in anonymous.json()["message"]
    forged = notes.http.get("/me", headers={"Authorization": f"Bearer {ann.id}.{'0' * 64}"})
    assert forged.status_code == 401
    wrong_scheme = notes.http.get("/me", headers={"Authorization": f"Basic {ann.token}"})
    assert wrong_scheme.status_code == 401


@pytest.mark.parametrize(
    "user_part",
    [b"1" * 4301, b"9" * 11, str(2**31).encode(), b"\xb2", b"0", b"-1", b"+1", b" 1", b"1_0"],
    # b"\xb2" reaches the app as "²" (WSGI decodes headers as Latin-1): isdigit() says yes, int() fails.
    ids=[
        "4301-digits",
        "11-digits",
        "beyond-int4",
        "superscript-two",
        "zero",
        "negative",
        "plus",
        "space",
        "underscore",
    ],
)
def test_a_token_whose_user_part_is_no_id_is_a_401(notes: SimpleNamespace, user_part: bytes) -> None:
    """A bearer token whose user id part cannot be a user id is a 401, however int() would take it."""
    header = b"Bearer " + user_part + b"." + b"0" * 64
    response = notes.http.get("/me", headers={"Authorization": header})
    assert response.status_code == 401, response.text
    assert response.json()["message"] == "invalid API token; use the token POST /users returned"


def test_simultaneous_sign_ups_of_one_name_one_wins(notes: SimpleNamespace) -> None:
    name = f"racer-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(4)
    responses: list[httpx.Response] = []

    def sign_up() -> None:
        barrier.wait(timeout=WAIT)
        responses.append(notes.http.post("/users", json={"name": name}))

    threads = [threading.Thread(target=sign_up) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT)
    assert sorted(r.status_code for r in responses) == [201, 409, 409, 409], [r.text for r in responses]


def test_notes_with_attachments(notes: SimpleNamespace) -> None:
    ann = User(notes)
    inbox = ann.notebook()
    note = ann.note(inbox, "shopping", "milk and bread")
    assert note["version"] == 1
    payload = b"\x89PNG fake image " * 1000
    attachment = ann.ok(
        "POST",
        f"/notes/{note['id']}/attachments",
        201,
        params={"name": "list photo.png"},
        content=payload,
        headers={"Content-Type": "image/png"},
    )
    assert attachment["size"] == len(payload)
    download = ann.request("GET", attachment["url"])
    assert download.status_code == 200
    assert download.content == payload
    assert download.headers["content-type"] == "image/png"
    assert "list%20photo.png" in download.headers["content-disposition"]
    assert notes.app.blobs.get(blob_key(notes, attachment["id"])) == payload

    read = ann.ok("GET", f"/notes/{note['id']}")
    assert [a["name"] for a in read["attachments"]] == ["list photo.png"]
    page = ann.ok("GET", f"/notebooks/{inbox}/notes")
    assert [n["id"] for n in page["notes"]] == [note["id"]]
    assert ann.ok("GET", "/notebooks")["notebooks"] == [{"id": inbox, "name": "inbox"}]

    no_name = ann.request("POST", f"/notes/{note['id']}/attachments", content=b"x")
    assert no_name.status_code == 400


def test_pages_of_notes(notes: SimpleNamespace) -> None:
    ann = User(notes)
    inbox = ann.notebook()
    made = [ann.note(inbox, f"n{i}")["id"] for i in range(5)]
    first = ann.ok("GET", f"/notebooks/{inbox}/notes", params={"limit": 2})
    second = ann.ok("GET", f"/notebooks/{inbox}/notes", params={"limit": 2, "after": first["next"]})
    third = ann.ok("GET", f"/notebooks/{inbox}/notes", params={"limit": 2, "after": second["next"]})
    seen = [n["id"] for n in first["notes"] + second["notes"] + third["notes"]]
    assert seen == sorted(made, reverse=True)
    assert third["next"] is None
    assert ann.request("GET", f"/notebooks/{inbox}/notes", params={"limit": 0}).status_code == 400
    assert ann.request("GET", f"/notebooks/{inbox}/notes", params={"after": "junk"}).status_code == 400


def forged_cursor(values: Any, raw: str | None = None) -> str:
    """A page cursor for the notes' order (newest first) holding ``values``, or the ``raw`` JSON."""
    payload = json.dumps([["-id"], values]) if raw is None else raw
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def test_forged_page_cursors_are_400_and_leave_the_transaction_usable(notes: SimpleNamespace) -> None:
    """Each forged cursor is a 400 before any SQL; a context that met them still reads and writes."""
    ann = User(notes)
    inbox = ann.notebook()
    kept = ann.note(inbox, "kept")["id"]
    forged = [
        forged_cursor([2**63]),
        forged_cursor(["abc"]),
        forged_cursor([[1, 2]]),
        forged_cursor([{"decimal": "1e999999"}]),
        forged_cursor([{"bytes": "AAAA"}]),
        forged_cursor(None, raw="[" * 3000 + "]" * 3000),
    ]
    if notes.kind == "servers":  # an INTEGER key is 32-bit on PostgreSQL, 64-bit on SQLite
        forged.append(forged_cursor([2**31]))
    for cursor in forged:
        response = ann.request("GET", f"/notebooks/{inbox}/notes", params={"after": cursor})
        assert response.status_code == 400, (cursor[:40], response.status_code, response.text[:200])
        assert "cursor" in response.text
    assert [n["id"] for n in ann.ok("GET", f"/notebooks/{inbox}/notes")["notes"]] == [kept]
    # In one context: each refusal leaves its transaction usable, so the write after them commits.
    with notes.app.dm.dal(meta={"user": ann.id}) as dal:
        for cursor in forged:
            with pytest.raises(BadRequest, match="cursor"):
                dal.notebooks.notes(inbox, after=cursor)
        assert [n["id"] for n in dal.notebooks.notes(inbox)["notes"]] == [kept]
        dal.notebooks.add("after the forged cursors")
    assert "after the forged cursors" in [n["name"] for n in ann.ok("GET", "/notebooks")["notebooks"]]


# -- concurrency -----------------------------------------------------------------


def test_an_edit_based_on_a_stale_version_is_a_conflict(notes: SimpleNamespace) -> None:
    ann = User(notes)
    note = ann.note(ann.notebook(), "draft", "one")
    first = ann.ok("PUT", f"/notes/{note['id']}", json={"version": 1, "text": "two"})
    assert first["version"] == 2
    stale = ann.request("PUT", f"/notes/{note['id']}", json={"version": 1, "text": "three"})
    assert stale.status_code == 409
    assert stale.json()["error"] == "Conflict"
    assert ann.ok("GET", f"/notes/{note['id']}")["text"] == "two"
    assert ann.request("PUT", f"/notes/{note['id']}", json={"text": "no version"}).status_code == 400


def test_two_simultaneous_edits_of_one_version_one_wins(notes: SimpleNamespace) -> None:
    ann = User(notes)
    note = ann.note(ann.notebook(), "raced", "start")
    barrier = threading.Barrier(2)
    statuses: list[int] = []

    def edit(text: str) -> None:
        barrier.wait(timeout=WAIT)
        response = ann.request("PUT", f"/notes/{note['id']}", json={"version": 1, "text": text})
        statuses.append(response.status_code)

    threads = [threading.Thread(target=edit, args=(t,)) for t in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT)
    assert sorted(statuses) == [200, 409]
    final = ann.ok("GET", f"/notes/{note['id']}")
    assert final["version"] == 2
    assert final["text"] in ("left", "right")


# -- other users -------------------------------------------------------------------


def test_other_users_notes_are_not_found_and_profiles_forbidden(notes: SimpleNamespace) -> None:
    ann, bob = User(notes), User(notes)
    inbox = ann.notebook()
    note = ann.note(inbox, "secret", "ann's plans")
    attachment = ann.ok(
        "POST", f"/notes/{note['id']}/attachments", 201, params={"name": "a.txt"}, content=b"private"
    )
    for method, path, body in [
        ("GET", f"/notes/{note['id']}", None),
        ("PUT", f"/notes/{note['id']}", {"version": 1, "text": "bob was here"}),
        ("DELETE", f"/notes/{note['id']}", None),
        ("GET", f"/notes/{note['id']}/words", None),
        ("GET", attachment["url"], None),
        ("DELETE", attachment["url"], None),
        ("GET", f"/notebooks/{inbox}/notes", None),
        ("POST", f"/notebooks/{inbox}/notes", {"title": "bob's"}),
    ]:
        response = bob.request(method, path, json=body)
        assert response.status_code == 404, (method, path, response.text)
    # Not found looks the same as a note that never existed.
    assert bob.request("GET", "/notes/999999999").json()["message"] == "note 999999999 not found"
    assert bob.request("GET", f"/users/{ann.id}").status_code == 403
    assert bob.ok("GET", f"/users/{bob.id}")["id"] == bob.id
    assert ann.ok("GET", f"/notes/{note['id']}")["text"] == "ann's plans"
    assert ann.request("GET", attachment["url"]).content == b"private"


# -- blobs and the unit of work ------------------------------------------------------


def test_deleting_a_note_removes_its_attachment_after_commit(notes: SimpleNamespace) -> None:
    ann = User(notes)
    note = ann.note(ann.notebook(), "with files", "see attached")
    attachment = ann.ok(
        "POST", f"/notes/{note['id']}/attachments", 201, params={"name": "a.bin"}, content=b"bytes" * 100
    )
    key = blob_key(notes, attachment["id"])
    assert notes.app.blobs.exists(key)

    # The delete is refused after it asked for the blob's deletion: rolled back, so the blob stays.
    stale = ann.request("DELETE", f"/notes/{note['id']}", params={"version": 7})
    assert stale.status_code == 409
    assert notes.app.blobs.exists(key)
    assert ann.request("GET", attachment["url"]).content == b"bytes" * 100

    assert ann.request("DELETE", f"/notes/{note['id']}", params={"version": 1}).status_code == 204
    assert not notes.app.blobs.exists(key)
    assert ann.request("GET", f"/notes/{note['id']}").status_code == 404
    assert ann.request("GET", attachment["url"]).status_code == 404


def test_oversized_bodies_are_refused_and_leave_nothing(notes: SimpleNamespace) -> None:
    ann = User(notes)
    note = ann.note(ann.notebook())
    path = f"/notes/{note['id']}/attachments"

    def chunked(size: int) -> Iterator[bytes]:
        for _ in range(size // 100):
            yield b"x" * 100

    small = make_wsgi_app(notes.app, max_upload=1000)
    with serving(small) as url, httpx.Client(base_url=url, headers=ann.headers, timeout=30) as client:
        declared = client.post(path, params={"name": "big"}, content=b"x" * 1001)
        assert declared.status_code == 413
        assert "limited to 1000 bytes" in declared.json()["message"]
        # No Content-Length: the limit is found while the body streams into the store.
        streamed = client.post(path, params={"name": "big"}, content=chunked(5000))
        assert streamed.status_code == 413
        fits = client.post(path, params={"name": "fits"}, content=chunked(900))
        assert fits.status_code == 201
    assert list(notes.app.blobs.list(f"notes/{note['id']}/")) == [blob_key(notes, fits.json()["id"])]
    assert [a["name"] for a in ann.ok("GET", f"/notes/{note['id']}")["attachments"]] == ["fits"]
    huge_json = notes.http.post("/users", content=b'{"name": "' + b"x" * (1024 * 1024) + b'"}')
    assert huge_json.status_code == 413


def test_detaching_removes_the_blob(notes: SimpleNamespace) -> None:
    ann = User(notes)
    note = ann.note(ann.notebook())
    attachment = ann.ok("POST", f"/notes/{note['id']}/attachments", 201, params={"name": "x"}, content=b"x")
    key = blob_key(notes, attachment["id"])
    assert ann.request("DELETE", attachment["url"]).status_code == 204
    assert not notes.app.blobs.exists(key)
    assert ann.ok("GET", f"/notes/{note['id']}")["attachments"] == []


# -- the cache ---------------------------------------------------------------------


def test_counts_and_reads_are_cached_and_invalidated_on_commit(notes: SimpleNamespace) -> None:
    ann = User(notes)
    inbox = ann.notebook()
    note = ann.note(inbox, "cached", "hot")
    wait_for_index(ann, note["id"], 1)  # the job's commit invalidates the note: let it pass first
    assert ann.ok("GET", "/me")["note_count"] == 1
    assert ann.ok("GET", f"/notes/{note['id']}")["title"] == "cached"
    assert notes.app.cache.get(f"count:{ann.id}") is not None

    # Behind the cache's back: the cached answers stay as they were.
    with notes.app.db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO notes (notebook_id, owner_id, title, text, version) "
                "VALUES (:b, :u, 'sneaky', '', 1)"
            ),
            {"b": inbox, "u": ann.id},
        )
        conn.execute(text("UPDATE notes SET title = 'changed behind' WHERE id = :i"), {"i": note["id"]})
    assert ann.ok("GET", "/me")["note_count"] == 1
    assert ann.ok("GET", f"/notes/{note['id']}")["title"] == "cached"

    # Through the API: each commit invalidates what it changed.
    ann.note(inbox, "third")
    assert notes.app.cache.get(f"count:{ann.id}") is None
    assert ann.ok("GET", "/me")["note_count"] == 3
    edited = ann.ok("PUT", f"/notes/{note['id']}", json={"version": 1, "text": "edited"})
    assert edited["title"] == "changed behind"
    assert ann.ok("GET", f"/notes/{note['id']}")["text"] == "edited"

    # A request that fails invalidates nothing.
    assert ann.request("PUT", f"/notes/{note['id']}", json={"version": 1, "text": "x"}).status_code == 409
    assert ann.ok("GET", "/me")["note_count"] == 3
    assert notes.app.cache.get(f"count:{ann.id}") is not None


# -- the background job ------------------------------------------------------------


def test_the_word_index_is_built_after_commit(notes: SimpleNamespace) -> None:
    ann = User(notes)
    note = ann.note(ann.notebook(), "words", "Tea, tea and coffee. Coffee? Tea!")
    words = wait_for_index(ann, note["id"], 1)
    assert words["words"] == {"tea": 3, "coffee": 2, "and": 1}
    assert [n["id"] for n in ann.ok("GET", "/search", params={"word": "COFFEE"})["notes"]] == [note["id"]]

    edited = ann.ok("PUT", f"/notes/{note['id']}", json={"version": 1, "text": "only milk"})
    assert wait_for_index(ann, note["id"], edited["version"])["words"] == {"only": 1, "milk": 1}
    assert ann.ok("GET", "/search", params={"word": "coffee"})["notes"] == []
    # The job's commit invalidated the cached read too.
    assert ann.ok("GET", f"/notes/{note['id']}")["indexed_version"] == edited["version"]
    # Another user's search never sees ann's notes.
    assert User(notes).ok("GET", "/search", params={"word": "milk"})["notes"] == []


class ChangedMyMind(Exception):
    """Raised to roll a context back."""


def test_a_context_that_rolls_back_sends_no_job_and_keeps_no_blob(notes: SimpleNamespace) -> None:
    from celery.signals import task_prerun

    ann = User(notes)
    inbox = ann.notebook()
    kept = ann.note(inbox, "kept", "committed words")
    wait_for_index(ann, kept["id"], 1)
    ran: list[Any] = []

    def record(task_id: str, task: Any, args: Any, **kwargs: Any) -> None:
        ran.append(list(args))

    task_prerun.connect(record, weak=False)
    try:
        try:
            with notes.app.dm.dal(meta={"user": ann.id}) as dal:
                note = dal.notes.add(inbox, "never", "committed")
                dal.notes.attach(note["id"], "file.txt", b"never kept")
                key = f"notes/{note['id']}/"
                assert list(notes.app.blobs.list(key))  # written at once...
                raise ChangedMyMind
        except ChangedMyMind:
            pass
        assert list(notes.app.blobs.list(key)) == []  # ...and removed on rollback
        # A barrier: jobs run in the order they are sent, so once this one ran, any earlier one did.
        edited = ann.ok("PUT", f"/notes/{kept['id']}", json={"version": 1, "text": "barrier"})
        wait_for_index(ann, kept["id"], edited["version"])
    finally:
        task_prerun.disconnect(record)
    assert [kept["id"]] in ran
    assert [note["id"]] not in ran


def test_jobs_are_guarded_from_callers(notes: SimpleNamespace) -> None:
    ann = User(notes)
    note = ann.note(ann.notebook())
    from notes.auth import Forbidden

    as_ann = {"user": ann.id}
    with pytest.raises(Forbidden, match="only in background jobs"), notes.app.dm.dal(meta=as_ann) as dal:
        dal.notes.build_index(note["id"])
    # Methods without an auth mark (the generic Store ones) fail closed.
    with pytest.raises(Forbidden, match="not open to callers"), notes.app.dm.dal(meta=as_ann) as dal:
        dal.notes.get(note["id"])


# -- operations --------------------------------------------------------------------


def test_health_pings_every_part(notes: SimpleNamespace) -> None:
    response = notes.http.get("/health")
    assert response.status_code == 200
    report = response.json()
    assert report["ok"] is True
    assert set(report["parts"]) == {"database", "cache", "blobs", "jobs"}
    using = {part: info["using"] for part, info in report["parts"].items()}
    if notes.kind == "embedded":
        assert using["database"].startswith("sqlite:///")
        assert using["cache"] == "in-process memory"
        assert using["blobs"].startswith("file:///")
        assert "eager" in using["jobs"]
    else:
        assert using["database"].startswith("postgresql+psycopg://")
        assert using["cache"].startswith("redis://")
        assert using["blobs"].startswith("s3://")
        assert using["jobs"].startswith("celery via amqp://")


def test_index_and_unknown_routes(notes: SimpleNamespace) -> None:
    index = notes.http.get("/")
    assert index.status_code == 200
    assert "POST /users" in index.json()["endpoints"]
    missing = notes.http.get("/nowhere")
    assert missing.status_code == 404
    assert missing.json()["status"] == 404
    assert notes.http.patch("/notebooks").status_code == 405
    bad_json = notes.http.post("/users", content=b"{not json")
    assert bad_json.status_code == 400
    assert "not JSON" in bad_json.json()["message"]

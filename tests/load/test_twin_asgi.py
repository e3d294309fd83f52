"""The notes example's ASGI API (notes.asgi) and the FastAPI twin (benchmarks/twin/asgi.py) do the same work.

The scripted session of tests/load/twin_session.py, as in
tests/load/test_twin.py, against each app served by uvicorn on 127.0.0.1
(a port of its own, in a thread): the same statuses and bodies, the same
SQL, Redis and S3 calls request by request, and the same rows, cache
entries, blobs and queued Celery messages afterwards (normalized as there).
And the ASGI API answers the session exactly as the WSGI API does.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn

from tests.load.test_twin import (
    _clear_cache,
    _delete_queue,
    _environ,
    _recording,
    _run_example,
    _state,
)
from tests.load.test_twin import credentials as credentials
from tests.load.twin_session import REQUESTS, run_session
from tests.support.s3 import MotoServer
from tests.support.s3 import moto_server_fixture as moto_server_fixture


@contextmanager
def served(app: Any) -> Iterator[httpx.Client]:
    """``app`` under uvicorn on 127.0.0.1 (a free port, in a thread); a client of it."""
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (not 0),
    # and without it every response waits out the client's delayed ACK (about 40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("uvicorn did not start")
            time.sleep(0.01)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with httpx.Client(base_url=base, timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _run_example_asgi(request: pytest.FixtureRequest, moto: MotoServer) -> SimpleNamespace:
    from notes import Settings, build

    with ExitStack() as stack:
        env = _environ(stack, request, moto)
        app = build(Settings.from_env(env))
        stack.callback(app.close)
        app.create_tables()
        stack.callback(_delete_queue, env)
        stack.callback(app.cache.clear)
        asgi, calls = _recording(stack, app.asgi(), app.db.engine, env["CACHE_NAMESPACE"], asgi=True)
        with served(asgi) as client:
            transcript = run_session(client)
        statements = [list(c) for c in calls]
        assert app.outbox is not None
        app.outbox.flush()
        return SimpleNamespace(transcript=transcript, statements=statements, state=_state(env))


def _run_twin_asgi(request: pytest.FixtureRequest, moto: MotoServer) -> SimpleNamespace:
    from twin.asgi import make_app
    from twin.models import Base
    from twin.resources import Resources
    from twin.web import Twin

    with ExitStack() as stack:
        env = _environ(stack, request, moto)
        twin = Twin(Resources(env))
        stack.callback(twin.r.close)
        Base.metadata.create_all(twin.r.engine)
        stack.callback(_delete_queue, env)
        stack.callback(_clear_cache, env)
        asgi, calls = _recording(stack, make_app(twin), twin.r.engine, env["CACHE_NAMESPACE"], asgi=True)
        with served(asgi) as client:
            transcript = run_session(client)
        statements = [list(c) for c in calls]
        twin.r.outbox.flush()
        return SimpleNamespace(transcript=transcript, statements=statements, state=_state(env))


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, credentials: None, moto_server: MotoServer) -> dict[str, Any]:
    """The session run once against each ASGI app, and once against the example's WSGI API."""
    return {
        "example": _run_example_asgi(request, moto_server),
        "twin": _run_twin_asgi(request, moto_server),
        "wsgi": _run_example(request, moto_server),
    }


def test_the_asgi_api_answers_the_session_as_the_wsgi_api_does(runs: dict[str, Any]) -> None:
    """notes.asgi gives the same statuses and bodies as notes.web, and leaves the same state."""
    asgi, wsgi = runs["example"], runs["wsgi"]
    assert len(wsgi.transcript) >= REQUESTS
    for mine, theirs in zip(asgi.transcript, wsgi.transcript, strict=True):
        assert mine == theirs
    assert asgi.state == wsgi.state


def test_the_asgi_twin_answers_the_session_like_the_example(runs: dict[str, Any]) -> None:
    """The same statuses and bodies, request by request, for the whole scripted session."""
    example, twin = runs["example"].transcript, runs["twin"].transcript
    for mine, theirs in zip(twin, example, strict=True):
        assert mine == theirs
    assert {200, 201, 204, 400, 401, 404, 409} <= {status for _, _, status, _ in example}


def test_the_asgi_twin_sends_what_the_example_sends(runs: dict[str, Any]) -> None:
    """Request by request, the same SQL (row locks and transactions included), Redis commands and S3 calls."""
    example, twin = runs["example"].statements, runs["twin"].statements
    sent = [" ".join(call) for request in example for call in request]
    assert any("FOR UPDATE" in call for call in sent)
    assert any(call.startswith("s3 PutObject") for call in sent)
    assert len(twin) == len(example)
    for (method, path, status, _), mine, theirs in zip(
        runs["example"].transcript, twin, example, strict=True
    ):
        assert mine == theirs, f"{method} {path} ({status})"


def test_the_asgi_twin_leaves_the_state_the_example_leaves(runs: dict[str, Any]) -> None:
    """The same rows (no outbox row left), cache entries, blobs and queued Celery messages."""
    example, twin = runs["example"].state, runs["twin"].state
    assert example["rows"]["attachments"]
    assert example["rows"]["polydatum_outbox"] == []
    assert example["cache"]
    assert example["blobs"]
    assert example["messages"]
    assert twin == example

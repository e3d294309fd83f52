"""polydatum.werkzeug: a real werkzeug.serving server in a thread, real HTTP, real PostgreSQL."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from polydatum import DataManager
from polydatum.errors import ConcurrencyConflict, NoActiveContextError, NotFound, ServiceError
from polydatum.sqlalchemy import Database
from polydatum.werkzeug import (
    ENVIRON_KEY,
    PolydatumWSGIMiddleware,
    ResponseIncomplete,
    RollbackResponse,
    default_meta,
    init_app,
    request_context,
)
from tests.support.sql import Base, Item, Items, fresh_postgres_database
from tests.support.web import (
    Probe,
    Tracker,
    every_polydatum_error,
    item_names,
    leaked,
    real_blob_errors,
    record_outcome,
    wait_until,
)

# -- the server ----------------------------------------------------------------


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextmanager
def serve(app: Any) -> Iterator[int]:
    """Serve ``app`` with werkzeug's threaded server on 127.0.0.1; yield the port."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
    """Send one HTTP request on a connection of its own and read the whole reply."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


def routes(table: dict[str, Callable[[Request], Any]]) -> Any:
    """A bare werkzeug app dispatching on the path."""

    @Request.application  # type: ignore[arg-type]
    def app(req: Request) -> Any:
        return table[req.path](req)

    return app


def json_response(data: Any, status: int = 200) -> Response:
    """A JSON Response of ``data`` with ``status``."""
    return Response(json.dumps(data), status=status, mimetype="application/json")


# -- the application's parts -----------------------------------------------------


@dataclass
class Env:
    dm: DataManager
    db: Database
    tracker: Tracker
    events: list[tuple[str, str]] = field(default_factory=list)

    def hooks(self, name: str) -> None:
        """Record the commit or rollback of the active context under ``name``."""
        record_outcome(self.events, name)

    def create(self, name: str) -> None:
        """Create the item ``name`` in the request's context and record its outcome."""
        self.hooks(name)
        request_context().dal.items.create(name=name, qty=1)

    def names(self) -> set[str]:
        """The item names committed to the database."""
        return item_names(self.db.engine)


@pytest.fixture(name="db", scope="module")
def fixture_db(postgres_url: str) -> Iterator[Database]:
    """A fresh PostgreSQL database with the tables, shared by this module, as a sync Database."""
    with fresh_postgres_database(postgres_url) as url:
        db = Database(url, pool_size=5, max_overflow=20)
        Base.metadata.create_all(db.engine)
        yield db
        db.dispose()


@pytest.fixture(name="env")
def fixture_env(db: Database) -> Iterator[Env]:
    """An Env on the module's database; afterwards, checks every context closed and connection returned."""
    dm = DataManager()
    db.install(dm, name="db")
    tracker = Tracker()
    dm.register_resources(tracker=tracker)
    dm.register_services(items=Items(), probe=Probe())
    yield Env(dm, db, tracker)
    # Every test ends with every context closed and every connection returned.
    assert tracker.opened == tracker.closed
    wait_until(lambda: db.engine.pool.checkedout() == 0, "every connection back in the pool")  # type: ignore[attr-defined]


def unique(prefix: str) -> str:
    """``prefix`` with a random suffix, so that rows of different tests never collide."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- meta and concurrency ----------------------------------------------------------


def test_concurrent_requests_never_mix_meta(env: Env) -> None:
    """200 concurrent requests, ten at a time inside their contexts, see only their own meta and context."""
    # Groups of 10 requests wait for each other inside their contexts, so at
    # least 10 contexts are open at once in 10 server threads.
    barrier = threading.Barrier(10)

    def who(req: Request) -> Response:
        ctx = request_context()
        handle = ctx.tracker
        before = ctx.dal.probe.who()
        barrier.wait(timeout=30)
        after = env.dm.get_dal().probe.who()
        return json_response(
            {
                "before": before,
                "after": after,
                "handle_meta": handle.meta.request_id,
                "same_ctx": env.dm.require_active_context() is ctx and req.environ[ENVIRON_KEY] is ctx,
            }
        )

    app = PolydatumWSGIMiddleware(
        routes({"/who": who}), env.dm, meta=lambda req: {"user": req.headers.get("X-User")}
    )
    with serve(app) as port, ThreadPoolExecutor(max_workers=40) as pool:
        replies = list(
            pool.map(
                lambda i: request(port, "/who", {"X-Request-ID": f"req-{i}", "X-User": f"user-{i}"}),
                range(200),
            )
        )
    for i, reply in enumerate(replies):
        assert reply.status == 200
        data = reply.json()
        assert data["before"] == data["after"] == [f"req-{i}", f"user-{i}"]
        assert data["handle_meta"] == f"req-{i}"
        assert data["same_ctx"] is True
    assert env.tracker.opened == env.tracker.closed == 200
    assert env.tracker.max_open >= 10


def test_default_meta_from_the_request(env: Env) -> None:
    """Default meta holds the given or a fresh request id, client address, method and decoded path."""

    def meta(req: Request) -> Response:
        return json_response(dict(request_context().meta))

    app = PolydatumWSGIMiddleware(routes({"/meta": meta, "/café": meta}), env.dm)
    with serve(app) as port:
        given = request(port, "/meta", {"X-Request-ID": "abc-123"}).json()
        fresh = [request(port, "/meta", method="POST").json() for _ in range(2)]
        unicode_path = request(port, "/caf%C3%A9").json()
    assert given == {"request_id": "abc-123", "remote_addr": "127.0.0.1", "method": "GET", "path": "/meta"}
    assert fresh[0]["method"] == "POST"
    assert all(re.fullmatch(r"[0-9a-f]{32}", m["request_id"]) for m in fresh)
    assert fresh[0]["request_id"] != fresh[1]["request_id"]
    assert unicode_path["path"] == "/café"


def test_default_meta_matches_the_werkzeug_request() -> None:
    """The meta of a request equals ``default_meta()`` of its werkzeug Request, with the path decoded."""
    environ = {
        "PATH_INFO": "//caf\xc3\xa9",
        "REQUEST_METHOD": "get",
        "REMOTE_ADDR": "10.0.0.1",
        "HTTP_X_REQUEST_ID": "r1",
        "wsgi.url_scheme": "http",
        "SERVER_NAME": "x",
        "SERVER_PORT": "80",
    }
    seen: list[dict[str, Any]] = []
    dm = DataManager()

    def app(environ: Any, start_response: Any) -> list[bytes]:
        seen.append(dict(request_context().meta))
        start_response("204 No Content", [])
        return []

    PolydatumWSGIMiddleware(app, dm)(environ, lambda *a: None)  # type: ignore[arg-type]
    assert seen == [default_meta(Request(environ))]
    assert seen[0]["path"] == "/café"


def test_user_meta_function_gets_the_request_and_wins(env: Env) -> None:
    """A meta function gets the werkzeug Request; its keys join the default meta and win on a clash."""

    def meta_fn(req: Request) -> dict[str, Any]:
        return {
            "user": req.headers.get("Authorization", "").removeprefix("Bearer "),
            "request_id": "from-meta",
            "query": req.args.get("q"),
        }

    app = PolydatumWSGIMiddleware(
        routes({"/m": lambda req: json_response(dict(request_context().meta))}), env.dm, meta=meta_fn
    )
    with serve(app) as port:
        data = request(port, "/m?q=z", {"Authorization": "Bearer ann", "X-Request-ID": "x"}).json()
    assert data == {
        "request_id": "from-meta",
        "remote_addr": "127.0.0.1",
        "method": "GET",
        "path": "/m",
        "user": "ann",
        "query": "z",
    }


# -- streaming ------------------------------------------------------------------------


def test_streamed_response_reads_the_resource_until_the_client_has_every_chunk(env: Env) -> None:
    """A streamed body keeps the context and its resource open until the client has the last chunk."""
    gate = threading.Semaphore(0)

    def stream(req: Request) -> Response:
        handle = request_context().tracker

        def body() -> Iterator[bytes]:
            for i in range(1000):
                gate.acquire(timeout=30)
                yield b"%06d\n" % handle.read(i)
            gate.acquire(timeout=30)  # the client says it has the last chunk

        return Response(body(), mimetype="text/plain")

    app = PolydatumWSGIMiddleware(routes({"/stream": stream}), env.dm)
    with serve(app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "/stream")
            gate.release()  # the headers go out with the first chunk
            resp = conn.getresponse()
            assert resp.status == 200
            for i in range(1000):
                assert resp.read(7) == b"%06d\n" % i
                # The server waits for us before its next step: the context is still open.
                assert (env.tracker.opened, env.tracker.closed) == (1, 0)
                gate.release()
            assert resp.read() == b""
        finally:
            conn.close()
        env.tracker.wait_closed(1)
    assert env.tracker.handles[0].reads == 1000


def test_client_disconnect_mid_stream_closes_the_context(env: Env) -> None:
    """A client leaving mid-stream stops the body, rolls back and returns the session's pooled connection."""
    name = unique("disconnect")
    go_on = threading.Event()
    produced: list[int] = []

    def stream(req: Request) -> Response:
        env.create(name)  # a PostgreSQL session holds a pooled connection from here on
        handle = request_context().tracker
        session = request_context().db

        def body() -> Iterator[bytes]:
            for i in range(1000):
                if i == 10:
                    go_on.wait(30)
                produced.append(i)
                # Every chunk reads from the resource and the database.
                yield b"%06d %d\n" % (handle.read(i), session.get(Item, 1) is not None)

        return Response(body(), mimetype="text/plain")

    app = PolydatumWSGIMiddleware(routes({"/stream": stream}), env.dm)
    with serve(app) as port:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"000009" not in data:
                data += sock.recv(4096)
            assert env.db.engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        finally:
            sock.close()
        go_on.set()
        env.tracker.wait_closed(1)
        wait_until(lambda: env.db.engine.pool.checkedout() == 0, "the session's connection returned")  # type: ignore[attr-defined]
    assert len(produced) < 1000  # the server noticed the client had gone
    assert env.events == [("rollback", name)]
    assert name not in env.names()


def test_flask_stream_reads_the_database_to_the_end(env: Env) -> None:
    """A Flask streamed body reads through the DAL for every chunk, and the context commits after the last."""
    flask = pytest.importorskip("flask")
    app = flask.Flask(__name__)
    init_app(app, env.dm)

    @app.get("/rows")
    def rows() -> Any:
        ctx = request_context()
        ids = [ctx.dal.items.create(name=unique("row")).id for _ in range(3)]
        env.hooks("flask-stream")

        def body() -> Iterator[str]:
            for i in range(1000):
                yield f"{ctx.dal.items.require(ids[i % 3]).name}\n"

        return app.response_class(body(), mimetype="text/plain")

    with serve(app) as port:
        reply = request(port, "/rows")
    lines = reply.body.decode().splitlines()
    assert reply.status == 200
    assert len(lines) == 1000
    assert set(lines) <= env.names()
    assert env.events == [("commit", "flask-stream")]


# -- commit, rollback, error mapping ----------------------------------------------------


def writer(env: Env) -> Callable[[Request], Response]:
    """``/w?name=&status=&raise=``: creates a row, then answers or raises."""
    errors: dict[str, Callable[[], BaseException]] = {
        "notfound": lambda: NotFound("no such thing"),
        "conflict": lambda: ConcurrencyConflict("stale"),
        "teapot": lambda: type("Teapot", (ServiceError,), {"code": 418})("short and stout"),
        "oddcode": lambda: type("Odd", (ServiceError,), {"code": 42})("odd"),
        "service": lambda: ServiceError(),
        "boom": lambda: RuntimeError("boom"),
    }

    def write(req: Request) -> Response:
        env.create(req.args["name"])
        if "raise" in req.args:
            raise errors[req.args["raise"]]()
        return Response(
            "ok", status=int(req.args.get("status", 200)), headers={"X-Commit": req.args.get("commit", "")}
        )

    return write


def test_commit_and_rollback_are_visible_in_the_database(env: Env) -> None:
    """A 200 commits the view's row; an unmapped error rolls it back and answers 500."""
    ok, failed = unique("ok"), unique("failed")
    app = PolydatumWSGIMiddleware(routes({"/w": writer(env)}), env.dm)
    with serve(app) as port:
        assert request(port, f"/w?name={ok}").status == 200
        assert request(port, f"/w?name={failed}&raise=boom").status == 500
    assert ok in env.names()
    assert failed not in env.names()
    assert env.events == [("commit", ok), ("rollback", failed)]


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        ("notfound", 404, "no such thing"),
        ("conflict", 409, "stale"),
        ("teapot", 418, "short and stout"),
        ("oddcode", 500, "odd"),
        ("service", 500, "Internal Server Error"),
    ],
)
def test_service_errors_map_to_their_status_after_rollback(
    env: Env, error: str, status: int, message: str
) -> None:
    """A ServiceError rolls back and answers JSON with its code (500 if not an HTTP status) and message."""
    name = unique(error)
    app = PolydatumWSGIMiddleware(routes({"/w": writer(env)}), env.dm)
    with serve(app) as port:
        reply = request(port, f"/w?name={name}&raise={error}")
    assert reply.status == status
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["status"] == status
    assert reply.json()["message"] == message
    assert name not in env.names()
    assert env.events == [("rollback", name)]


def test_other_exceptions_reach_the_server_after_rollback(env: Env) -> None:
    """A non-service error rolls back and reaches the server, which answers with its own 500 page."""
    name = unique("boom")
    app = PolydatumWSGIMiddleware(routes({"/w": writer(env)}), env.dm)
    with serve(app) as port:
        reply = request(port, f"/w?name={name}&raise=boom")
    assert reply.status == 500
    assert b"Internal Server Error" in reply.body  # werkzeug's own error page
    assert name not in env.names()
    assert env.events == [("rollback", name)]


def test_error_status_without_raising_rolls_back(env: Env) -> None:
    """A 4xx response rolls back, while 2xx and 3xx responses commit."""
    bad, fine, redirect = unique("bad"), unique("fine"), unique("redirect")
    app = PolydatumWSGIMiddleware(routes({"/w": writer(env)}), env.dm)
    with serve(app) as port:
        assert request(port, f"/w?name={bad}&status=422").status == 422
        assert request(port, f"/w?name={fine}&status=201").status == 201
        assert request(port, f"/w?name={redirect}&status=302").status == 302
    assert env.names() >= {fine, redirect}
    assert bad not in env.names()
    assert ("rollback", bad) in env.events


def test_a_veto_decides_which_responses_roll_back(env: Env) -> None:
    """A veto given the status and headers decides which responses roll back, whatever their status."""
    kept, dropped, failed = unique("kept"), unique("dropped"), unique("failed")
    calls: list[tuple[int, str]] = []

    def veto(status: int, headers: Any) -> bool:
        calls.append((status, dict(headers)["X-Commit"]))
        # Commit only what the app marked, and never a server error.
        return dict(headers)["X-Commit"] != "yes" or status >= 500

    app = PolydatumWSGIMiddleware(routes({"/w": writer(env)}), env.dm, veto=veto)
    with serve(app) as port:
        assert request(port, f"/w?name={kept}&status=409&commit=yes").status == 409
        assert request(port, f"/w?name={dropped}&status=200&commit=no").status == 200
        assert request(port, f"/w?name={failed}&status=503&commit=yes").status == 503
    assert kept in env.names()
    assert not {dropped, failed} & env.names()
    assert calls == [(409, "yes"), (200, "no"), (503, "yes")]


def test_a_commit_time_conflict_replaces_the_buffered_response(env: Env) -> None:
    """A version conflict at commit turns the buffered 200 into a 409; the other writer's change stays."""
    with env.dm.dal() as dal:
        item = dal.items.create(name=unique("stale"), qty=1)

    def edit(req: Request) -> Response:
        obj = request_context().dal.items.require(item.id)
        obj.qty = 2  # flushed by the commit, after another writer got there first
        with env.db.engine.begin() as conn:
            conn.execute(update(Item).where(Item.id == item.id).values(qty=3, version=Item.version + 1))
        return Response("saved")  # buffered, with a Content-Length

    app = PolydatumWSGIMiddleware(routes({"/edit": edit}), env.dm)
    with serve(app) as port:
        reply = request(port, "/edit")
    assert reply.status == 409
    assert reply.json()["error"] == "Conflict"
    with env.dm.dal() as dal:
        assert dal.items.require(item.id).qty == 3


def test_a_flask_error_response_frees_its_context_without_the_collector() -> None:
    """A ServiceError Flask's handler turns into a 404 leaves no cycle: the request's context is freed when
    the response is (the exception is kept for the trace only until the context has ended)."""
    import gc
    import weakref

    flask = pytest.importorskip("flask")
    dm = DataManager()
    app = flask.Flask(__name__)
    init_app(app, dm)
    seen: list[Any] = []

    @app.get("/missing")
    def missing() -> Any:
        seen.append(weakref.ref(request_context()))
        raise NotFound("no such thing")

    client = app.test_client()
    gc.collect()
    gc.disable()
    try:
        response = client.get("/missing")
        assert response.status_code == 404
        response.close()
        del response
        assert seen[0]() is None
    finally:
        gc.enable()


def test_flask_app_through_init_app(env: Env) -> None:
    """Under ``init_app()`` Flask views get meta and the DAL; successes commit, errors map and roll back."""
    flask = pytest.importorskip("flask")
    app = flask.Flask(__name__)
    middleware = init_app(app, env.dm, meta=lambda req: {"user": req.headers.get("X-User")})
    assert app.wsgi_app is middleware
    assert app.extensions["polydatum"] is env.dm
    created, crashed = unique("flask"), unique("crashed")

    @app.post("/items/<name>")
    def create(name: str) -> Any:
        env.create(name)
        return {"user": request_context().meta.user, "path": request_context().meta.path}, 201

    @app.get("/items/<name>")
    def read(name: str) -> Any:
        env.create(unique("read"))
        found = request_context().dal.items.search({"name": name})
        if not found:
            raise NotFound(f"no item {name}")
        return {"name": name}

    @app.get("/crash")
    def crash() -> Any:
        env.create(crashed)
        raise RuntimeError("crash")

    with serve(app) as port:
        made = request(port, f"/items/{created}", {"X-User": "ann"}, method="POST")
        got = request(port, f"/items/{created}")
        absent = request(port, "/items/nothing")
        crash_reply = request(port, "/crash")
    assert made.status == 201
    assert made.json() == {"user": "ann", "path": f"/items/{created}"}
    assert got.json() == {"name": created}
    assert absent.status == 404
    assert absent.json() == {"status": 404, "error": "Not Found", "message": "no item nothing"}
    assert crash_reply.status == 500  # Flask's own error handling
    assert created in env.names()
    assert crashed not in env.names()
    assert env.events[0] == ("commit", created)
    assert env.events[-1] == ("rollback", crashed)


# -- error paths ----------------------------------------------------------------------


def plain(environ: Any, start_response: Any) -> list[bytes]:
    """A bare WSGI app that answers 200 ``plain``."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"plain"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"app": "not an app"}, "app must be a WSGI application"),
        ({"data_manager": object()}, "data_manager must be a polydatum DataManager"),
        ({"meta": {"user": 1}}, "meta must be a callable taking the werkzeug Request"),
        ({"veto": 400}, "veto must be a callable"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], message: str) -> None:
    """PolydatumWSGIMiddleware raises TypeError for an app, data manager, meta or veto of the wrong kind."""
    args: dict[str, Any] = {"app": plain, "data_manager": DataManager(), **kwargs}
    with pytest.raises(TypeError, match=message):
        PolydatumWSGIMiddleware(**args)


def test_init_app_refuses_what_is_not_a_flask_app_and_a_second_call() -> None:
    """``init_app()`` raises TypeError for a non-Flask app and RuntimeError on a second call for one app."""
    flask = pytest.importorskip("flask")
    with pytest.raises(TypeError, match="needs a Flask app"):
        init_app(plain, DataManager())  # type: ignore[arg-type]
    app = flask.Flask(__name__)
    init_app(app, DataManager())
    with pytest.raises(RuntimeError, match="once per Flask app"):
        init_app(app, DataManager())


def test_current_context_outside_a_request() -> None:
    """``request_context()`` outside a request raises NoActiveContextError naming PolydatumWSGIMiddleware."""
    with pytest.raises(NoActiveContextError, match="PolydatumWSGIMiddleware"):
        request_context()


def test_current_context_in_a_thread_the_view_started(env: Env) -> None:
    """``request_context()`` in a thread the view started raises NoActiveContextError naming dm.context()."""
    seen: list[str] = []

    def view(req: Request) -> Response:
        def work() -> None:
            try:
                request_context()
            except NoActiveContextError as exc:
                seen.append(str(exc))

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        return Response("ok")

    with serve(PolydatumWSGIMiddleware(routes({"/": view}), env.dm)) as port:
        assert request(port, "/").status == 200
    assert len(seen) == 1
    assert "dm.context()" in seen[0]


def counting_middleware(log: list[str]) -> Callable[[Any], Iterator[None]]:
    """Context middleware that logs its setup and teardown in ``log``."""

    def middleware(ctx: Any) -> Iterator[None]:
        log.append("setup")
        yield
        log.append("teardown")

    return middleware


def test_meta_function_refusing_with_a_service_error(env: Env) -> None:
    """A ServiceError from the meta function becomes its JSON error response and opens no context."""
    log: list[str] = []
    env.dm.register_context_middleware(counting_middleware(log))

    def meta_fn(req: Request) -> dict[str, Any]:
        if "Authorization" not in req.headers:
            raise type("Unauthorized", (ServiceError,), {"code": 401})("log in first")
        return {"user": "ann"}

    app = PolydatumWSGIMiddleware(routes({"/": lambda req: Response("ok")}), env.dm, meta=meta_fn)
    with serve(app) as port:
        refused = request(port, "/")
        allowed = request(port, "/", {"Authorization": "x"})
    assert refused.status == 401
    assert refused.json() == {"status": 401, "error": "Unauthorized", "message": "log in first"}
    assert allowed.status == 200
    assert log == ["setup", "teardown"]  # only the allowed request had a context


@pytest.mark.parametrize(
    "meta_fn",
    [
        pytest.param(lambda req: 1 / 0, id="raises"),
        pytest.param(lambda req: None, id="returns-none"),
        pytest.param(lambda req: [("user", "ann")], id="returns-a-list"),
    ],
)
def test_a_broken_meta_function_is_a_server_error_and_opens_no_context(
    env: Env, meta_fn: Callable[[Request], Any]
) -> None:
    """A meta function that raises or gives no mapping answers 500 and opens no context."""
    log: list[str] = []
    env.dm.register_context_middleware(counting_middleware(log))
    app = PolydatumWSGIMiddleware(routes({"/": lambda req: Response("ok")}), env.dm, meta=meta_fn)
    with serve(app) as port:
        assert request(port, "/").status == 500
    assert log == []


def test_meta_function_returning_no_mapping_says_so() -> None:
    """A meta function returning None makes the middleware raise TypeError: it must return a mapping."""
    app = PolydatumWSGIMiddleware(plain, DataManager(), meta=lambda req: None)  # type: ignore[arg-type,return-value]
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "wsgi.url_scheme": "http",
        "SERVER_NAME": "x",
        "SERVER_PORT": "80",
    }
    with pytest.raises(TypeError, match="it must return a mapping"):
        app(environ, lambda *a: None)  # type: ignore[arg-type]


def test_context_middleware_refusing_at_setup(env: Env) -> None:
    """A ServiceError raised by context middleware at setup answers with its status and message."""

    def maintenance(ctx: Any) -> Iterator[None]:
        raise type("Unavailable", (ServiceError,), {"code": 503})("down for maintenance")
        yield

    env.dm.register_context_middleware(maintenance)
    with serve(PolydatumWSGIMiddleware(routes({"/": lambda req: Response("ok")}), env.dm)) as port:
        reply = request(port, "/")
    assert reply.status == 503
    assert reply.json()["message"] == "down for maintenance"


def commit_failure(error: BaseException) -> Callable[[Any], Iterator[None]]:
    """Context middleware whose commit fails with ``error`` when meta asks for it."""

    def middleware(ctx: Any) -> Iterator[None]:
        yield
        if ctx.meta.fail_commit:
            raise error

    return middleware


@pytest.mark.parametrize("body", ["list", "response", "generator"])
def test_a_failed_commit_before_the_body_went_out_becomes_the_error_response(env: Env, body: str) -> None:
    """A ServiceError at commit, before a list, Response or empty generator body went out, is the response."""
    env.dm.register_context_middleware(commit_failure(ConcurrencyConflict("lost the race")))

    def app(environ: Any, start_response: Any) -> Iterable[bytes]:
        if body == "list":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"saved"]
        if body == "response":
            return Response("saved")(environ, start_response)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([])  # a generator body that turns out empty: nothing sent yet

    wrapped = PolydatumWSGIMiddleware(app, env.dm, meta=lambda req: {"fail_commit": True})
    with serve(wrapped) as port:
        reply = request(port, "/")
    assert reply.status == 409
    assert reply.json()["message"] == "lost the race"


def test_an_unmapped_commit_failure_is_a_server_error(env: Env) -> None:
    """A non-service error at commit answers 500."""
    env.dm.register_context_middleware(commit_failure(OSError("disk full")))
    wrapped = PolydatumWSGIMiddleware(plain, env.dm, meta=lambda req: {"fail_commit": True})
    with serve(wrapped) as port:
        assert request(port, "/").status == 500


def test_a_commit_failing_after_the_stream_started_breaks_the_response(env: Env) -> None:
    """A commit failing after a chunked body started leaves the response unfinished: no false success."""
    env.dm.register_context_middleware(commit_failure(ConcurrencyConflict("lost the race")))

    def stream(req: Request) -> Response:
        return Response((b"%d\n" % i for i in range(100)), mimetype="text/plain")

    wrapped = PolydatumWSGIMiddleware(routes({"/": stream}), env.dm, meta=lambda req: {"fail_commit": True})
    with serve(wrapped) as port, pytest.raises(http.client.IncompleteRead):
        request(port, "/")  # the chunked body never gets its end: no false success


def test_a_generator_failing_before_its_first_chunk_is_mapped(env: Env) -> None:
    """A ServiceError from a body generator before its first chunk is mapped to a response and rolls back."""
    name = unique("gen")

    def stream(req: Request) -> Response:
        env.create(name)

        def body() -> Iterator[bytes]:
            raise NotFound("nothing to stream")
            yield b""

        return Response(body())

    with serve(PolydatumWSGIMiddleware(routes({"/": stream}), env.dm)) as port:
        reply = request(port, "/")
    assert reply.status == 404
    assert reply.json()["message"] == "nothing to stream"
    assert name not in env.names()


def test_a_generator_failing_mid_stream_rolls_back_and_breaks_the_response(env: Env) -> None:
    """A body generator failing after its first chunk rolls back and leaves the response unfinished."""
    name = unique("mid")

    def stream(req: Request) -> Response:
        env.create(name)

        def body() -> Iterator[bytes]:
            yield b"first\n"
            raise RuntimeError("the stream broke")

        return Response(body())

    with (
        serve(PolydatumWSGIMiddleware(routes({"/": stream}), env.dm)) as port,
        pytest.raises(http.client.IncompleteRead),
    ):
        request(port, "/")
    assert name not in env.names()
    assert env.events == [("rollback", name)]


def test_a_close_that_raises_rolls_back(env: Env) -> None:
    """A body whose ``close()`` raises rolls back and leaves the response unfinished."""
    name = unique("close")

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            return iter([b"a", b"b"])

        def close(self) -> None:
            raise RuntimeError("close failed")

    def app(environ: Any, start_response: Any) -> Body:
        env.create(name)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    with serve(PolydatumWSGIMiddleware(app, env.dm)) as port, pytest.raises(http.client.IncompleteRead):
        request(port, "/")
    assert name not in env.names()


def test_a_veto_that_raises_rolls_back_and_is_reported(env: Env) -> None:
    """A veto that raises rolls back and answers 500."""
    name = unique("veto")

    def veto(status: int, headers: Any) -> bool:
        raise ValueError("broken veto")

    with serve(PolydatumWSGIMiddleware(routes({"/w": writer(env)}), env.dm, veto=veto)) as port:
        assert request(port, f"/w?name={name}").status == 500
    assert name not in env.names()


def test_an_invalid_status_line_rolls_back(env: Env) -> None:
    """An invalid status line given to ``start_response`` rolls back and answers 500."""
    name = unique("status")

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        env.create(name)
        start_response("OK", [("Content-Length", "2")])
        return iter([b"ok"])

    with serve(PolydatumWSGIMiddleware(app, env.dm)) as port:
        assert request(port, "/").status == 500
    assert name not in env.names()


def test_an_exception_suppressed_by_context_middleware_still_has_no_response(env: Env) -> None:
    """An error that context middleware swallows still gets its error response: 500, or 404 for NotFound."""

    def swallow(ctx: Any) -> Iterator[None]:
        try:
            yield
        except RuntimeError:
            pass

    env.dm.register_context_middleware(swallow)
    with serve(PolydatumWSGIMiddleware(routes({"/w": writer(env)}), env.dm)) as port:
        assert request(port, f"/w?name={unique('x')}&raise=boom").status == 500
        reply = request(port, f"/w?name={unique('x')}&raise=notfound")
    assert reply.status == 404


def test_rollback_signals_never_reach_the_server(env: Env) -> None:
    """Context middleware sees ResponseIncomplete for an early close and RollbackResponse for
    a 400; the server sees the 400."""
    # The 4xx response and the early close both roll back through signals that
    # context middleware sees, but the server sees only the response.
    seen: list[type[BaseException]] = []

    def observe(ctx: Any) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            seen.append(type(exc))
            raise

    env.dm.register_context_middleware(observe)
    app = PolydatumWSGIMiddleware(routes({"/": lambda req: Response("no", status=400)}), env.dm)
    wsgi_iter = app(
        {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/",
            "wsgi.url_scheme": "http",
            "SERVER_NAME": "x",
            "SERVER_PORT": "80",
            "wsgi.input": None,
        },
        lambda *a: None,
    )  # type: ignore[arg-type]
    wsgi_iter.close()  # type: ignore[attr-defined]  # closed before its end: incomplete
    with serve(app) as port:
        assert request(port, "/").status == 400
    assert seen == [ResponseIncomplete, RollbackResponse]


def test_mapped_errors_under_a_client_that_reraises_any_exc_info(env: Env) -> None:
    """A NotFound answers 404 and rolls back under werkzeug's test client, which re-raises any exc_info."""
    # werkzeug's test client re-raises whatever exc_info start_response gets:
    # the middleware passes one only to replace a status the server already has.
    name = unique("client")
    reply = Client(PolydatumWSGIMiddleware(routes({"/w": writer(env)}), env.dm)).get(
        f"/w?name={name}&raise=notfound"
    )
    assert reply.status_code == 404
    assert name not in env.names()


def test_an_app_returning_no_iterable_rolls_back(env: Env) -> None:
    """An app returning None instead of a body rolls back and answers 500."""
    name = unique("noiter")

    def app(environ: Any, start_response: Any) -> Any:
        env.create(name)
        start_response("200 OK", [])
        return None  # not a WSGI body

    with serve(PolydatumWSGIMiddleware(app, env.dm)) as port:
        assert request(port, "/").status == 500
    assert name not in env.names()
    assert env.events == [("rollback", name)]


def test_a_body_closed_from_another_thread(env: Env) -> None:
    """A body iterated and closed in another thread commits, and ends the request in the calling thread."""
    # Some servers iterate or close the body in another thread than the one
    # that called the app: the context still ends once, and commits. (The
    # DAL itself is only there in the thread that called the app.)
    name = unique("other-thread")

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        env.create(name)
        start_response("200 OK", [])
        return iter([b"done"])

    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "wsgi.url_scheme": "http",
        "SERVER_NAME": "x",
        "SERVER_PORT": "80",
    }
    body = PolydatumWSGIMiddleware(app, env.dm)(environ, lambda *a: None)  # type: ignore[arg-type]
    chunks: list[bytes] = []
    thread = threading.Thread(target=lambda: (chunks.extend(body), body.close()))  # type: ignore[attr-defined]
    thread.start()
    thread.join()
    assert chunks == [b"done"]
    assert env.events == [("commit", name)]
    with pytest.raises(NoActiveContextError):
        request_context()  # this thread's view of the request ended too


def test_an_app_using_the_write_callable(env: Env) -> None:
    """Bytes given to the ``write`` callable go out before the returned body, and the row commits."""
    name = unique("write")

    def app(environ: Any, start_response: Any) -> list[bytes]:
        env.create(name)
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written, ")
        return [b"returned"]

    with serve(PolydatumWSGIMiddleware(app, env.dm)) as port:
        reply = request(port, "/")
    assert reply.body == b"written, returned"
    assert name in env.names()


# -- a commit failing at the end of a response with a Content-Length (issue 12, A1) ----


class Recorder:
    """A WSGI layer between the server and the app: records what escapes the body to the server."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.escaped: list[BaseException] = []

    def __call__(self, environ: Any, start_response: Any) -> Iterator[bytes]:
        body = self.app(environ, start_response)
        try:
            yield from body
        except BaseException as exc:
            self.escaped.append(exc)
            raise
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


def duplicate_at_commit(env: Env, name: str) -> None:
    """Add an item named like an existing one, unflushed: the commit fails with IntegrityError."""
    request_context().db.add(Item(name=name, qty=1))


def stale_at_commit(env: Env, item_id: int) -> None:
    """Change an item another writer changes first: the commit fails with ConcurrencyConflict."""
    request_context().dal.items.require(item_id).qty = 2
    with env.db.engine.begin() as conn:
        conn.execute(update(Item).where(Item.id == item_id).values(qty=3, version=Item.version + 1))


@pytest.fixture(name="existing")
def fixture_existing(env: Env) -> Item:
    """An item already committed, for a later commit to collide with."""
    with env.dm.dal() as dal:
        return dal.items.create(name=unique("existing"), qty=1)  # type: ignore[no-any-return]


def test_an_integrity_error_at_commit_reaches_the_test_client_as_itself(env: Env, existing: Item) -> None:
    """A unique violation at the commit of a one-chunk Content-Length response is raised as IntegrityError."""

    def view(req: Request) -> Response:
        duplicate_at_commit(env, existing.name)
        return Response("saved")  # one chunk, with a Content-Length

    with pytest.raises(IntegrityError):
        Client(PolydatumWSGIMiddleware(routes({"/": view}), env.dm)).get("/")


def test_a_conflict_at_commit_is_a_409_under_the_test_client(env: Env, existing: Item) -> None:
    """A conflict at the commit of a one-chunk Content-Length body is a 409 under werkzeug's test client."""

    def view(req: Request) -> Response:
        stale_at_commit(env, existing.id)
        return Response("saved")

    reply = Client(PolydatumWSGIMiddleware(routes({"/": view}), env.dm)).get("/")
    assert reply.status_code == 409
    assert reply.json["status"] == 409  # type: ignore[index]


@pytest.mark.parametrize("failure", ["integrity", "conflict"])
def test_a_commit_failing_after_the_first_chunk_reaches_the_server_as_itself(
    env: Env, existing: Item, failure: str
) -> None:
    """A commit failing after the first of two Content-Length chunks went out reaches the server unchanged."""

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        if failure == "integrity":
            duplicate_at_commit(env, existing.name)
        else:
            stale_at_commit(env, existing.id)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
        return iter([b"one", b"two"])

    recorder = Recorder(PolydatumWSGIMiddleware(app, env.dm))
    with serve(recorder) as port, pytest.raises(http.client.IncompleteRead):
        request(port, "/")  # the headers and "one" went out; the end never does
    assert len(recorder.escaped) == 1
    expected = IntegrityError if failure == "integrity" else ConcurrencyConflict
    assert type(recorder.escaped[0]) is expected


def test_flask_jsonify_with_a_failed_commit(env: Env, existing: Item) -> None:
    """A jsonify response answers 409 for a conflict at commit and raises a database error as itself."""

    flask = pytest.importorskip("flask")
    app = flask.Flask(__name__)
    init_app(app, env.dm)

    @app.post("/stale")
    def stale() -> Any:
        stale_at_commit(env, existing.id)
        return flask.jsonify(saved=True)

    @app.post("/duplicate")
    def duplicate() -> Any:
        duplicate_at_commit(env, existing.name)
        return flask.jsonify(saved=True)

    with app.test_client() as client:
        reply = client.post("/stale")
        assert reply.status_code == 409
        assert reply.json is not None
        assert (reply.json["status"], reply.json["error"]) == (409, "Conflict")
        with pytest.raises(IntegrityError):
            client.post("/duplicate")
    with serve(app) as port:
        assert request(port, "/stale", method="POST").status == 409


# -- X-Request-ID from the client (issue 12, B9) -------------------------------------------

BAD_REQUEST_IDS = {
    "201 characters": "r" * 201,
    "1 MB": "r" * 1_000_000,
    "ANSI escapes": "\x1b[31mred\x1b[0m",
    "NUL": "a\x00b",
    "line break": "a\nb",
    "DEL": "a\x7fb",
    "non-ASCII": "caf\xc3\xa9",  # UTF-8 bytes, as WSGI gives them (latin-1 decoded)
    "empty": "",
}


def meta_of(app: Any, headers: dict[str, str]) -> dict[str, Any]:
    """Call ``app`` through the middleware with ``headers``, as a WSGI server would; return the meta."""
    seen: list[dict[str, Any]] = []
    dm = DataManager()

    def view(environ: Any, start_response: Any) -> list[bytes]:
        seen.append(dict(request_context().meta))
        start_response("204 No Content", [])
        return []

    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "wsgi.url_scheme": "http",
        "SERVER_NAME": "x",
        "SERVER_PORT": "80",
        **{"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()},
    }
    app(view, dm)(environ, lambda *a: None)
    return seen[0]


@pytest.mark.parametrize("given", list(BAD_REQUEST_IDS.values()), ids=list(BAD_REQUEST_IDS))
@pytest.mark.parametrize("meta_fn", [None, lambda req: {}], ids=["environ", "request"])
def test_a_bad_request_id_is_replaced_with_a_fresh_one(given: str, meta_fn: Any) -> None:
    """An X-Request-ID that is too long, empty, or not printable ASCII becomes a new random id."""
    meta = meta_of(lambda app, dm: PolydatumWSGIMiddleware(app, dm, meta=meta_fn), {"X-Request-ID": given})
    assert re.fullmatch(r"[0-9a-f]{32}", meta["request_id"])
    assert default_meta(Request({"HTTP_X_REQUEST_ID": given}))["request_id"] != given


@pytest.mark.parametrize("given", list(BAD_REQUEST_IDS.values()), ids=list(BAD_REQUEST_IDS))
def test_a_meta_function_checks_its_own_request_id_with_the_same_function(given: str) -> None:
    """A request id a meta function takes from another header goes through request_id() like the default."""
    from polydatum.werkzeug import request_id

    meta = meta_of(
        lambda app, dm: PolydatumWSGIMiddleware(
            app, dm, meta=lambda req: {"request_id": request_id(req.headers.get("X-Trace"))}
        ),
        {"X-Trace": given},
    )
    assert re.fullmatch(r"[0-9a-f]{32}", meta["request_id"])
    assert request_id("trace-7") == "trace-7"


@pytest.mark.parametrize("given", ["r" * 200, "abc-123", "a b~!{}"])
def test_a_printable_ascii_request_id_of_up_to_200_characters_is_kept(given: str) -> None:
    """An X-Request-ID of 1 to 200 printable ASCII characters becomes meta.request_id unchanged."""
    assert meta_of(PolydatumWSGIMiddleware, {"X-Request-ID": given})["request_id"] == given
    assert default_meta(Request({"HTTP_X_REQUEST_ID": given}))["request_id"] == given


def test_bad_request_ids_through_a_real_server(env: Env) -> None:
    """Over HTTP, an over-long id and one with ANSI escapes or NUL are replaced; a good one is kept."""
    echo = routes({"/m": lambda req: json_response(request_context().meta.request_id)})
    app = PolydatumWSGIMiddleware(echo, env.dm)
    with serve(app) as port:
        ids = [
            request(port, "/m", {"X-Request-ID": given}).json()
            for given in ("r" * 201, "\x1b[2J\x1b[Hgotcha", "a\x00b", "ok-1")
        ]
    assert all(re.fullmatch(r"[0-9a-f]{32}", got) for got in ids[:3])
    assert ids[3] == "ok-1"


# -- what error bodies show the client (issue 12, B5) ------------------------------------------


def test_error_bodies_show_no_server_details(
    env: Env, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Every polydatum error raised in a view answers without its path, host or bucket; the log has them."""
    errors = every_polydatum_error() + real_blob_errors(tmp_path)
    raising: list[BaseException] = []

    def view(req: Request) -> Response:
        raise raising[0]

    app = PolydatumWSGIMiddleware(routes({"/": view}), env.dm)
    caplog.set_level("INFO", logger="polydatum")
    with serve(app) as port:
        for exc in errors:
            raising[:] = [exc]
            if not isinstance(exc, ServiceError):
                # Not mapped: it goes to the server, which answers with its own page.
                with pytest.raises(type(exc)):
                    Client(app).get("/")
                continue
            caplog.clear()
            reply = request(port, "/")
            assert leaked(reply.body.decode("utf-8", "replace")) == [], exc
            assert reply.status == exc.code
            assert reply.json()["message"] == exc.public_message
            logged = [r for r in caplog.records if r.name == "polydatum"]
            assert [r.exc_info[1] for r in logged if r.exc_info] == [exc]
            assert str(exc) in logged[0].getMessage()


def test_flask_error_bodies_show_no_server_details(env: Env, tmp_path: Any) -> None:
    """A polydatum error raised in a Flask view, mapped by init_app's handler, shows no server details."""
    flask = pytest.importorskip("flask")
    app = flask.Flask(__name__)
    init_app(app, env.dm)
    raising: list[BaseException] = []

    @app.get("/")
    def view() -> Any:
        raise raising[0]

    with app.test_client() as client:
        for exc in every_polydatum_error() + real_blob_errors(tmp_path):
            if not isinstance(exc, ServiceError):
                continue
            raising[:] = [exc]
            reply = client.get("/")
            assert reply.status_code == exc.code
            assert leaked(reply.get_data(as_text=True)) == [], exc


def test_a_users_own_error_message_reaches_the_client(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """NotFound("no note 5") shows its message, unlogged; public_message= replaces it and logs the details."""
    raising: list[BaseException] = []

    def view(req: Request) -> Response:
        raise raising[0]

    caplog.set_level("INFO", logger="polydatum")
    outcomes = []
    with serve(PolydatumWSGIMiddleware(routes({"/": view}), env.dm)) as port:
        for exc in (
            NotFound("no note 5"),
            NotFound("no row in /srv/data", public_message="no such note"),
            ServiceError("pool of db-7 exhausted", public_message="try again later"),
        ):
            raising[:] = [exc]
            caplog.clear()
            reply = request(port, "/")
            levels = [r.levelname for r in caplog.records if r.name == "polydatum"]
            outcomes.append((reply.status, reply.json()["message"], levels))
    assert outcomes == [
        (404, "no note 5", []),
        (404, "no such note", ["INFO"]),
        (500, "try again later", ["ERROR"]),
    ]


@pytest.mark.parametrize("failing", [False, True], ids=["commit", "rollback"])
def test_request_context_is_the_requests_in_close_callbacks_and_hooks(failing: bool) -> None:
    """While the request's context closes (the response's call_on_close callbacks, then its commit or
    rollback hooks) request_context() is still that context; once it has exited, it is refused."""
    dm = DataManager()
    seen: list[tuple[str, Any]] = []
    contexts: list[Any] = []

    @Request.application
    def app(request: Request) -> Response:
        ctx = request_context()
        contexts.append(ctx)
        response = Response("x", status=500 if failing else 200)
        response.call_on_close(lambda: seen.append(("close", request_context())))
        ctx.on_commit(lambda: seen.append(("commit", request_context())))
        ctx.on_rollback(lambda: seen.append(("rollback", request_context())))
        return response

    answer = Client(PolydatumWSGIMiddleware(app, dm)).get("/")
    assert answer.status_code == (500 if failing else 200)
    [ctx] = contexts
    assert seen == [("close", ctx), ("rollback" if failing else "commit", ctx)]
    assert ctx.get_hook_errors() == []
    with pytest.raises(NoActiveContextError, match="threads do not inherit it"):
        request_context()


def test_init_app_takes_positions_as_the_middleware_does() -> None:
    """positions= through init_app: the installed middleware has them; a bad value is refused."""
    from flask import Flask

    installed = init_app(Flask("positions"), DataManager(), positions="header")
    assert installed.positions is not None
    assert init_app(Flask("no_positions"), DataManager()).positions is None
    with pytest.raises(ValueError, match="positions"):
        init_app(Flask("bad_positions"), DataManager(), positions="carrier pigeon")

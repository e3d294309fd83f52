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
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from polydatum import DataManager
from polydatum.errors import ConcurrencyConflict, NoActiveContextError, NotFound, ServiceError
from polydatum.sqlalchemy import Database
from polydatum.werkzeug import (
    ENVIRON_KEY,
    PolydatumMiddleware,
    ResponseIncomplete,
    RollbackResponse,
    current_context,
    default_meta,
    init_app,
)
from tests.support.sql import Base, Item, Items, fresh_postgres_database
from tests.support.web import Probe, Tracker, item_names, record_outcome, wait_until

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
        self.hooks(name)
        current_context().dal.items.create(name=name, qty=1)

    def names(self) -> set[str]:
        return item_names(self.db.engine)


@pytest.fixture(name="db", scope="module")
def fixture_db(postgres_url: str) -> Iterator[Database]:
    with fresh_postgres_database(postgres_url) as url:
        db = Database(url, pool_size=5, max_overflow=20)
        Base.metadata.create_all(db.engine)
        yield db
        db.dispose()


@pytest.fixture(name="env")
def fixture_env(db: Database) -> Iterator[Env]:
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
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- meta and concurrency ----------------------------------------------------------


def test_concurrent_requests_never_mix_meta(env: Env) -> None:
    # Groups of 10 requests wait for each other inside their contexts, so at
    # least 10 contexts are open at once in 10 server threads.
    barrier = threading.Barrier(10)

    def who(req: Request) -> Response:
        ctx = current_context()
        handle = ctx.tracker
        before = ctx.dal.probe.who()
        barrier.wait(timeout=30)
        after = env.dm.get_dal().probe.who()
        return json_response({
            "before": before, "after": after, "handle_meta": handle.meta.request_id,
            "same_ctx": env.dm.require_active_context() is ctx and req.environ[ENVIRON_KEY] is ctx,
        })

    app = PolydatumMiddleware(routes({"/who": who}), env.dm,
                              meta=lambda req: {"user": req.headers.get("X-User")})
    with serve(app) as port, ThreadPoolExecutor(max_workers=40) as pool:
        replies = list(pool.map(
            lambda i: request(port, "/who", {"X-Request-ID": f"req-{i}", "X-User": f"user-{i}"}),
            range(200),
        ))
    for i, reply in enumerate(replies):
        assert reply.status == 200
        data = reply.json()
        assert data["before"] == data["after"] == [f"req-{i}", f"user-{i}"]
        assert data["handle_meta"] == f"req-{i}"
        assert data["same_ctx"] is True
    assert env.tracker.opened == env.tracker.closed == 200
    assert env.tracker.max_open >= 10


def test_default_meta_from_the_request(env: Env) -> None:
    def meta(req: Request) -> Response:
        return json_response(dict(current_context().meta))

    app = PolydatumMiddleware(routes({"/meta": meta, "/café": meta}), env.dm)
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
    environ = {"PATH_INFO": "//caf\xc3\xa9", "REQUEST_METHOD": "get", "REMOTE_ADDR": "10.0.0.1",
               "HTTP_X_REQUEST_ID": "r1", "wsgi.url_scheme": "http", "SERVER_NAME": "x", "SERVER_PORT": "80"}
    seen: list[dict[str, Any]] = []
    dm = DataManager()

    def app(environ: Any, start_response: Any) -> list[bytes]:
        seen.append(dict(current_context().meta))
        start_response("204 No Content", [])
        return []

    PolydatumMiddleware(app, dm)(environ, lambda *a: None)  # type: ignore[arg-type]
    assert seen == [default_meta(Request(environ))]
    assert seen[0]["path"] == "/café"


def test_user_meta_function_gets_the_request_and_wins(env: Env) -> None:
    def meta_fn(req: Request) -> dict[str, Any]:
        return {"user": req.headers.get("Authorization", "").removeprefix("Bearer "),
                "request_id": "from-meta", "query": req.args.get("q")}

    app = PolydatumMiddleware(
        routes({"/m": lambda req: json_response(dict(current_context().meta))}), env.dm, meta=meta_fn
    )
    with serve(app) as port:
        data = request(port, "/m?q=z", {"Authorization": "Bearer ann", "X-Request-ID": "x"}).json()
    assert data == {"request_id": "from-meta", "remote_addr": "127.0.0.1", "method": "GET",
                    "path": "/m", "user": "ann", "query": "z"}


# -- streaming ------------------------------------------------------------------------


def test_streamed_response_reads_the_resource_until_the_client_has_every_chunk(env: Env) -> None:
    gate = threading.Semaphore(0)

    def stream(req: Request) -> Response:
        handle = current_context().tracker

        def body() -> Iterator[bytes]:
            for i in range(1000):
                gate.acquire(timeout=30)
                yield b"%06d\n" % handle.read(i)
            gate.acquire(timeout=30)  # the client says it has the last chunk

        return Response(body(), mimetype="text/plain")

    app = PolydatumMiddleware(routes({"/stream": stream}), env.dm)
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
    name = unique("disconnect")
    go_on = threading.Event()
    produced: list[int] = []

    def stream(req: Request) -> Response:
        env.create(name)  # a PostgreSQL session holds a pooled connection from here on
        handle = current_context().tracker
        session = current_context().db

        def body() -> Iterator[bytes]:
            for i in range(1000):
                if i == 10:
                    go_on.wait(30)
                produced.append(i)
                # Every chunk reads from the resource and the database.
                yield b"%06d %d\n" % (handle.read(i), session.get(Item, 1) is not None)

        return Response(body(), mimetype="text/plain")

    app = PolydatumMiddleware(routes({"/stream": stream}), env.dm)
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
    flask = pytest.importorskip("flask")
    app = flask.Flask(__name__)
    init_app(app, env.dm)

    @app.get("/rows")
    def rows() -> Any:
        ctx = current_context()
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
        return Response("ok", status=int(req.args.get("status", 200)),
                        headers={"X-Commit": req.args.get("commit", "")})

    return write


def test_commit_and_rollback_are_visible_in_the_database(env: Env) -> None:
    ok, failed = unique("ok"), unique("failed")
    app = PolydatumMiddleware(routes({"/w": writer(env)}), env.dm)
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
    name = unique(error)
    app = PolydatumMiddleware(routes({"/w": writer(env)}), env.dm)
    with serve(app) as port:
        reply = request(port, f"/w?name={name}&raise={error}")
    assert reply.status == status
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["status"] == status
    assert reply.json()["message"] == message
    assert name not in env.names()
    assert env.events == [("rollback", name)]


def test_other_exceptions_reach_the_server_after_rollback(env: Env) -> None:
    name = unique("boom")
    app = PolydatumMiddleware(routes({"/w": writer(env)}), env.dm)
    with serve(app) as port:
        reply = request(port, f"/w?name={name}&raise=boom")
    assert reply.status == 500
    assert b"Internal Server Error" in reply.body  # werkzeug's own error page
    assert name not in env.names()
    assert env.events == [("rollback", name)]


def test_error_status_without_raising_rolls_back(env: Env) -> None:
    bad, fine, redirect = unique("bad"), unique("fine"), unique("redirect")
    app = PolydatumMiddleware(routes({"/w": writer(env)}), env.dm)
    with serve(app) as port:
        assert request(port, f"/w?name={bad}&status=422").status == 422
        assert request(port, f"/w?name={fine}&status=201").status == 201
        assert request(port, f"/w?name={redirect}&status=302").status == 302
    assert env.names() >= {fine, redirect}
    assert bad not in env.names()
    assert ("rollback", bad) in env.events


def test_a_veto_decides_which_responses_roll_back(env: Env) -> None:
    kept, dropped, failed = unique("kept"), unique("dropped"), unique("failed")
    calls: list[tuple[int, str]] = []

    def veto(status: int, headers: Any) -> bool:
        calls.append((status, dict(headers)["X-Commit"]))
        # Commit only what the app marked, and never a server error.
        return dict(headers)["X-Commit"] != "yes" or status >= 500

    app = PolydatumMiddleware(routes({"/w": writer(env)}), env.dm, veto=veto)
    with serve(app) as port:
        assert request(port, f"/w?name={kept}&status=409&commit=yes").status == 409
        assert request(port, f"/w?name={dropped}&status=200&commit=no").status == 200
        assert request(port, f"/w?name={failed}&status=503&commit=yes").status == 503
    assert kept in env.names()
    assert not {dropped, failed} & env.names()
    assert calls == [(409, "yes"), (200, "no"), (503, "yes")]


def test_a_commit_time_conflict_replaces_the_buffered_response(env: Env) -> None:
    with env.dm.dal() as dal:
        item = dal.items.create(name=unique("stale"), qty=1)

    def edit(req: Request) -> Response:
        obj = current_context().dal.items.require(item.id)
        obj.qty = 2  # flushed by the commit, after another writer got there first
        with env.db.engine.begin() as conn:
            conn.execute(update(Item).where(Item.id == item.id).values(qty=3, version=Item.version + 1))
        return Response("saved")  # buffered, with a Content-Length

    app = PolydatumMiddleware(routes({"/edit": edit}), env.dm)
    with serve(app) as port:
        reply = request(port, "/edit")
    assert reply.status == 409
    assert reply.json()["error"] == "Conflict"
    with env.dm.dal() as dal:
        assert dal.items.require(item.id).qty == 3


def test_flask_app_through_init_app(env: Env) -> None:
    flask = pytest.importorskip("flask")
    app = flask.Flask(__name__)
    middleware = init_app(app, env.dm, meta=lambda req: {"user": req.headers.get("X-User")})
    assert app.wsgi_app is middleware
    assert app.extensions["polydatum"] is env.dm
    created, crashed = unique("flask"), unique("crashed")

    @app.post("/items/<name>")
    def create(name: str) -> Any:
        env.create(name)
        return {"user": current_context().meta.user, "path": current_context().meta.path}, 201

    @app.get("/items/<name>")
    def read(name: str) -> Any:
        env.create(unique("read"))
        found = current_context().dal.items.search({"name": name})
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
    args: dict[str, Any] = {"app": plain, "data_manager": DataManager(), **kwargs}
    with pytest.raises(TypeError, match=message):
        PolydatumMiddleware(**args)


def test_init_app_refuses_what_is_not_a_flask_app_and_a_second_call() -> None:
    flask = pytest.importorskip("flask")
    with pytest.raises(TypeError, match="needs a Flask app"):
        init_app(plain, DataManager())  # type: ignore[arg-type]
    app = flask.Flask(__name__)
    init_app(app, DataManager())
    with pytest.raises(RuntimeError, match="once per Flask app"):
        init_app(app, DataManager())


def test_current_context_outside_a_request() -> None:
    with pytest.raises(NoActiveContextError, match="PolydatumMiddleware"):
        current_context()


def test_current_context_in_a_thread_the_view_started(env: Env) -> None:
    seen: list[str] = []

    def view(req: Request) -> Response:
        def work() -> None:
            try:
                current_context()
            except NoActiveContextError as exc:
                seen.append(str(exc))

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        return Response("ok")

    with serve(PolydatumMiddleware(routes({"/": view}), env.dm)) as port:
        assert request(port, "/").status == 200
    assert len(seen) == 1
    assert "dm.context()" in seen[0]


def counting_middleware(log: list[str]) -> Callable[[Any], Iterator[None]]:
    def middleware(ctx: Any) -> Iterator[None]:
        log.append("setup")
        yield
        log.append("teardown")

    return middleware


def test_meta_function_refusing_with_a_service_error(env: Env) -> None:
    log: list[str] = []
    env.dm.register_context_middleware(counting_middleware(log))

    def meta_fn(req: Request) -> dict[str, Any]:
        if "Authorization" not in req.headers:
            raise type("Unauthorized", (ServiceError,), {"code": 401})("log in first")
        return {"user": "ann"}

    app = PolydatumMiddleware(routes({"/": lambda req: Response("ok")}), env.dm, meta=meta_fn)
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
    log: list[str] = []
    env.dm.register_context_middleware(counting_middleware(log))
    app = PolydatumMiddleware(routes({"/": lambda req: Response("ok")}), env.dm, meta=meta_fn)
    with serve(app) as port:
        assert request(port, "/").status == 500
    assert log == []


def test_meta_function_returning_no_mapping_says_so() -> None:
    app = PolydatumMiddleware(plain, DataManager(), meta=lambda req: None)  # type: ignore[arg-type,return-value]
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http",
               "SERVER_NAME": "x", "SERVER_PORT": "80"}
    with pytest.raises(TypeError, match="it must return a mapping"):
        app(environ, lambda *a: None)  # type: ignore[arg-type]


def test_context_middleware_refusing_at_setup(env: Env) -> None:
    def maintenance(ctx: Any) -> Iterator[None]:
        raise type("Unavailable", (ServiceError,), {"code": 503})("down for maintenance")
        yield

    env.dm.register_context_middleware(maintenance)
    with serve(PolydatumMiddleware(routes({"/": lambda req: Response("ok")}), env.dm)) as port:
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
    env.dm.register_context_middleware(commit_failure(ConcurrencyConflict("lost the race")))

    def app(environ: Any, start_response: Any) -> Iterable[bytes]:
        if body == "list":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"saved"]
        if body == "response":
            return Response("saved")(environ, start_response)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([])  # a generator body that turns out empty: nothing sent yet

    wrapped = PolydatumMiddleware(app, env.dm, meta=lambda req: {"fail_commit": True})
    with serve(wrapped) as port:
        reply = request(port, "/")
    assert reply.status == 409
    assert reply.json()["message"] == "lost the race"


def test_an_unmapped_commit_failure_is_a_server_error(env: Env) -> None:
    env.dm.register_context_middleware(commit_failure(OSError("disk full")))
    wrapped = PolydatumMiddleware(plain, env.dm, meta=lambda req: {"fail_commit": True})
    with serve(wrapped) as port:
        assert request(port, "/").status == 500


def test_a_commit_failing_after_the_stream_started_breaks_the_response(env: Env) -> None:
    env.dm.register_context_middleware(commit_failure(ConcurrencyConflict("lost the race")))

    def stream(req: Request) -> Response:
        return Response((b"%d\n" % i for i in range(100)), mimetype="text/plain")

    wrapped = PolydatumMiddleware(routes({"/": stream}), env.dm, meta=lambda req: {"fail_commit": True})
    with serve(wrapped) as port, pytest.raises(http.client.IncompleteRead):
        request(port, "/")  # the chunked body never gets its end: no false success


def test_a_generator_failing_before_its_first_chunk_is_mapped(env: Env) -> None:
    name = unique("gen")

    def stream(req: Request) -> Response:
        env.create(name)

        def body() -> Iterator[bytes]:
            raise NotFound("nothing to stream")
            yield b""

        return Response(body())

    with serve(PolydatumMiddleware(routes({"/": stream}), env.dm)) as port:
        reply = request(port, "/")
    assert reply.status == 404
    assert reply.json()["message"] == "nothing to stream"
    assert name not in env.names()


def test_a_generator_failing_mid_stream_rolls_back_and_breaks_the_response(env: Env) -> None:
    name = unique("mid")

    def stream(req: Request) -> Response:
        env.create(name)

        def body() -> Iterator[bytes]:
            yield b"first\n"
            raise RuntimeError("the stream broke")

        return Response(body())

    with serve(PolydatumMiddleware(routes({"/": stream}), env.dm)) as port, \
            pytest.raises(http.client.IncompleteRead):
        request(port, "/")
    assert name not in env.names()
    assert env.events == [("rollback", name)]


def test_a_close_that_raises_rolls_back(env: Env) -> None:
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

    with serve(PolydatumMiddleware(app, env.dm)) as port, pytest.raises(http.client.IncompleteRead):
        request(port, "/")
    assert name not in env.names()


def test_a_veto_that_raises_rolls_back_and_is_reported(env: Env) -> None:
    name = unique("veto")

    def veto(status: int, headers: Any) -> bool:
        raise ValueError("broken veto")

    with serve(PolydatumMiddleware(routes({"/w": writer(env)}), env.dm, veto=veto)) as port:
        assert request(port, f"/w?name={name}").status == 500
    assert name not in env.names()


def test_an_invalid_status_line_rolls_back(env: Env) -> None:
    name = unique("status")

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        env.create(name)
        start_response("OK", [("Content-Length", "2")])
        return iter([b"ok"])

    with serve(PolydatumMiddleware(app, env.dm)) as port:
        assert request(port, "/").status == 500
    assert name not in env.names()


def test_an_exception_suppressed_by_context_middleware_still_has_no_response(env: Env) -> None:
    def swallow(ctx: Any) -> Iterator[None]:
        try:
            yield
        except RuntimeError:
            pass

    env.dm.register_context_middleware(swallow)
    with serve(PolydatumMiddleware(routes({"/w": writer(env)}), env.dm)) as port:
        assert request(port, f"/w?name={unique('x')}&raise=boom").status == 500
        reply = request(port, f"/w?name={unique('x')}&raise=notfound")
    assert reply.status == 404


def test_rollback_signals_never_reach_the_server(env: Env) -> None:
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
    app = PolydatumMiddleware(routes({"/": lambda req: Response("no", status=400)}), env.dm)
    wsgi_iter = app({"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http",
                     "SERVER_NAME": "x", "SERVER_PORT": "80", "wsgi.input": None},
                    lambda *a: None)  # type: ignore[arg-type]
    wsgi_iter.close()  # type: ignore[attr-defined]  # closed before its end: incomplete
    with serve(app) as port:
        assert request(port, "/").status == 400
    assert seen == [ResponseIncomplete, RollbackResponse]


def test_mapped_errors_under_a_client_that_reraises_any_exc_info(env: Env) -> None:
    # werkzeug's test client re-raises whatever exc_info start_response gets:
    # the middleware passes one only to replace a status the app had set.
    from werkzeug.test import Client

    name = unique("client")
    reply = Client(PolydatumMiddleware(routes({"/w": writer(env)}), env.dm)).get(
        f"/w?name={name}&raise=notfound"
    )
    assert reply.status_code == 404
    assert name not in env.names()


def test_an_app_returning_no_iterable_rolls_back(env: Env) -> None:
    name = unique("noiter")

    def app(environ: Any, start_response: Any) -> Any:
        env.create(name)
        start_response("200 OK", [])
        return None  # not a WSGI body

    with serve(PolydatumMiddleware(app, env.dm)) as port:
        assert request(port, "/").status == 500
    assert name not in env.names()
    assert env.events == [("rollback", name)]


def test_a_body_closed_from_another_thread(env: Env) -> None:
    # Some servers iterate or close the body in another thread than the one
    # that called the app: the context still ends once, and commits. (The
    # DAL itself is only there in the thread that called the app.)
    name = unique("other-thread")

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        env.create(name)
        start_response("200 OK", [])
        return iter([b"done"])

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http",
               "SERVER_NAME": "x", "SERVER_PORT": "80"}
    body = PolydatumMiddleware(app, env.dm)(environ, lambda *a: None)  # type: ignore[arg-type]
    chunks: list[bytes] = []
    thread = threading.Thread(target=lambda: (chunks.extend(body), body.close()))  # type: ignore[attr-defined]
    thread.start()
    thread.join()
    assert chunks == [b"done"]
    assert env.events == [("commit", name)]
    with pytest.raises(NoActiveContextError):
        current_context()  # this thread's view of the request ended too


def test_an_app_using_the_write_callable(env: Env) -> None:
    name = unique("write")

    def app(environ: Any, start_response: Any) -> list[bytes]:
        env.create(name)
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written, ")
        return [b"returned"]

    with serve(PolydatumMiddleware(app, env.dm)) as port:
        reply = request(port, "/")
    assert reply.body == b"written, returned"
    assert name in env.names()

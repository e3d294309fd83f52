"""polydatum.asgi: Starlette and FastAPI apps served by uvicorn, driven by httpx and websockets."""

# No "from __future__ import annotations": FastAPI reads the views' annotations at run time.
import asyncio
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI
from sqlalchemy import create_engine, update
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from polydatum import DataAccessLayer, DataManager
from polydatum.asgi import (
    SCOPE_KEY,
    PolydatumASGIMiddleware,
    ResponseIncomplete,
    RollbackResponse,
    current_context,
    dal_dependency,
)
from polydatum.errors import ConcurrencyConflict, NoActiveContextError, NotFound, ServiceError
from polydatum.sqlalchemy import AsyncDatabase
from tests.support.sql import AsyncItems, Base, Item, fresh_postgres_database
from tests.support.web import Probe, Tracker, item_names, record_outcome

# -- the server ----------------------------------------------------------------


@asynccontextmanager
async def serve(app: Any, lifespan: str = "auto") -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 as a task of this loop; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan=lifespan,  # type: ignore[arg-type]
                            ws="websockets-sansio", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise AssertionError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def client(base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, timeout=30,
                             limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))


# -- the application's parts -----------------------------------------------------


@dataclass
class Env:
    dm: DataManager
    db: AsyncDatabase
    url: str
    tracker: Tracker
    events: list[tuple[str, str]] = field(default_factory=list)

    def hooks(self, name: str) -> None:
        record_outcome(self.events, name)

    async def create(self, name: str) -> Item:
        self.hooks(name)
        item: Item = await current_context().dal.items.create(name=name, qty=1)
        return item

    def names(self) -> set[str]:
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            return item_names(engine)
        finally:
            engine.dispose()

    def checked_out(self) -> int:
        return int(self.db.engine.pool.checkedout())  # type: ignore[attr-defined]


@pytest.fixture(name="pg_url", scope="module")
def fixture_pg_url(postgres_url: str) -> Iterator[str]:
    with fresh_postgres_database(postgres_url) as url:
        engine = create_engine(url, poolclass=NullPool)
        Base.metadata.create_all(engine)
        engine.dispose()
        yield url


@pytest.fixture(name="env")
async def fixture_env(pg_url: str) -> AsyncIterator[Env]:
    db = AsyncDatabase(pg_url, pool_size=5, max_overflow=20)
    dm = DataManager()
    db.install(dm, name="db")
    tracker = Tracker()
    dm.register_resources(tracker=tracker)
    dm.register_services(items=AsyncItems(), probe=Probe())
    env = Env(dm, db, pg_url, tracker)
    try:
        yield env
        # Every test ends with every context closed and every connection returned.
        assert tracker.opened == tracker.closed
        assert env.checked_out() == 0
    finally:
        await db.dispose()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def starlette(routes: list[Any], dm: DataManager, **options: Any) -> Starlette:
    app = Starlette(routes=routes)
    app.add_middleware(PolydatumASGIMiddleware, data_manager=dm, **options)  # type: ignore[arg-type]
    return app


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"still not true after {timeout}s: {what}") from None


# -- meta and concurrency ----------------------------------------------------------


class Rendezvous:
    """Groups of ``parties`` tasks wait for each other (asyncio.Barrier needs Python 3.11)."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.count = 0
        self.event = asyncio.Event()

    async def wait(self) -> None:
        event = self.event
        self.count += 1
        if self.count == self.parties:
            self.count, self.event = 0, asyncio.Event()
            event.set()
        else:
            await asyncio.wait_for(event.wait(), 30)


async def test_concurrent_requests_never_mix_meta(env: Env) -> None:
    barrier = Rendezvous(10)

    async def who(request: Request) -> JSONResponse:
        ctx = current_context()
        handle = ctx.tracker
        before = ctx.dal.probe.who()
        await barrier.wait()  # ten requests at a time are inside their contexts here
        after = env.dm.get_dal().probe.who()
        return JSONResponse({"before": before, "after": after, "handle": handle.meta.request_id,
                             "same": env.dm.require_active_context() is ctx is request.scope[SCOPE_KEY]})

    def who_sync(request: Request) -> JSONResponse:  # run in Starlette's thread pool
        return JSONResponse({"before": current_context().dal.probe.who(),
                             "after": env.dm.get_dal().probe.who(), "handle": None, "same": True})

    app = starlette([Route("/who", who), Route("/who-sync", who_sync)], env.dm,
                    meta=lambda scope: {"user": dict(scope["headers"]).get(b"x-user", b"").decode()})
    async with serve(app) as base, client(base) as http:
        replies = await asyncio.gather(*(
            http.get("/who" if i % 4 else "/who-sync",
                     headers={"X-Request-ID": f"req-{i}", "X-User": f"user-{i}"})
            for i in range(200)
        ))
    for i, reply in enumerate(replies):
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["before"] == data["after"] == [f"req-{i}", f"user-{i}"]
        assert data["handle"] in (f"req-{i}", None)
        assert data["same"] is True
    assert env.tracker.opened == 150
    assert env.tracker.max_open >= 10


async def test_default_meta_and_an_async_meta_function(env: Env) -> None:
    async def meta_fn(scope: Any) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"user": "ann", "scheme": scope["scheme"]}

    async def meta(request: Request) -> JSONResponse:
        return JSONResponse(dict(current_context().meta))

    plain = starlette([Route("/meta", meta, methods=["GET", "POST"]), Route("/café", meta)], env.dm)
    custom = starlette([Route("/meta", meta)], env.dm, meta=meta_fn)
    async with serve(plain) as base, client(base) as http:
        given = (await http.get("/meta", headers={"X-Request-ID": "abc"})).json()
        fresh = [(await http.post("/meta")).json() for _ in range(2)]
        unicode_path = (await http.get("/caf%C3%A9")).json()
    async with serve(custom) as base, client(base) as http:
        merged = (await http.get("/meta", headers={"X-Request-ID": "abc"})).json()
    assert given == {"request_id": "abc", "remote_addr": "127.0.0.1", "method": "GET", "path": "/meta"}
    assert fresh[0]["method"] == "POST"
    assert all(re.fullmatch(r"[0-9a-f]{32}", m["request_id"]) for m in fresh)
    assert fresh[0]["request_id"] != fresh[1]["request_id"]
    assert unicode_path["path"] == "/café"
    assert merged == {**given, "user": "ann", "scheme": "http"}


# -- streaming ------------------------------------------------------------------------


async def test_streamed_response_reads_the_resource_until_the_last_chunk(env: Env) -> None:
    gate = asyncio.Semaphore(0)

    async def stream(request: Request) -> StreamingResponse:
        handle = current_context().tracker

        async def body() -> AsyncIterator[bytes]:
            for i in range(1000):
                await gate.acquire()
                yield b"%06d\n" % handle.read(i)
            await gate.acquire()  # the client says it has the last chunk

        return StreamingResponse(body(), media_type="text/plain")

    app = starlette([Route("/stream", stream)], env.dm)
    async with serve(app) as base, client(base) as http:
        gate.release()
        async with http.stream("GET", "/stream") as resp:
            assert resp.status_code == 200
            buffer, seen = b"", 0
            async for data in resp.aiter_raw():
                buffer += data
                while len(buffer) >= 7:
                    assert buffer[:7] == b"%06d\n" % seen
                    buffer, seen = buffer[7:], seen + 1
                    # The server waits for us before its next step: still open.
                    assert (env.tracker.opened, env.tracker.closed) == (1, 0)
                    gate.release()
        assert seen == 1000
    assert env.tracker.closed == 1
    assert env.tracker.handles[0].reads == 1000


async def test_client_disconnect_mid_stream_closes_the_context(env: Env) -> None:
    name = unique("disconnect")
    go_on = asyncio.Event()

    async def stream(request: Request) -> StreamingResponse:
        await env.create(name)  # the session holds a pooled connection from here on
        handle = current_context().tracker
        items = current_context().dal.items

        async def body() -> AsyncIterator[bytes]:
            for i in range(1000):
                if i == 10:
                    await go_on.wait()
                found = await items.get(1)
                yield b"%06d %d\n" % (handle.read(i), found is not None)

        return StreamingResponse(body(), media_type="text/plain")

    app = starlette([Route("/stream", stream)], env.dm)
    async with serve(app) as base:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(base.rsplit(":", 1)[1]))
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"000009" not in data:
            data += await reader.read(4096)
        assert env.checked_out() == 1
        writer.close()
        await writer.wait_closed()
        await wait_for(lambda: env.tracker.closed == 1, "the context closed after the client left")
        go_on.set()
    assert env.checked_out() == 0
    assert env.events == [("rollback", name)]
    assert name not in env.names()


# -- commit, rollback, error mapping ----------------------------------------------------

ERRORS: dict[str, Callable[[], BaseException]] = {
    "notfound": lambda: NotFound("no such thing"),
    "conflict": lambda: ConcurrencyConflict("stale"),
    "teapot": lambda: type("Teapot", (ServiceError,), {"code": 418})("short and stout"),
    "oddcode": lambda: type("Odd", (ServiceError,), {"code": 42})("odd"),
    "service": lambda: ServiceError(),
    "boom": lambda: RuntimeError("boom"),
}


def writer(env: Env) -> Route:
    """``/w?name=&status=&raise=&commit=``: creates a row, then answers or raises."""

    async def write(request: Request) -> Response:
        args = request.query_params
        await env.create(args["name"])
        if "raise" in args:
            raise ERRORS[args["raise"]]()
        return PlainTextResponse("ok", status_code=int(args.get("status", 200)),
                                 headers={"X-Commit": args.get("commit", "")})

    return Route("/w", write, methods=["GET", "POST"])


async def test_commit_and_rollback_are_visible_in_the_database(env: Env) -> None:
    ok, failed = unique("ok"), unique("failed")
    async with serve(starlette([writer(env)], env.dm)) as base, client(base) as http:
        assert (await http.post("/w", params={"name": ok})).status_code == 200
        crashed = await http.post("/w", params={"name": failed, "raise": "boom"})
    assert crashed.status_code == 500
    assert crashed.text == "Internal Server Error"  # Starlette's own error handling
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
async def test_service_errors_map_to_their_status_after_rollback(
    env: Env, error: str, status: int, message: str
) -> None:
    name = unique(error)
    async with serve(starlette([writer(env)], env.dm)) as base, client(base) as http:
        reply = await http.get("/w", params={"name": name, "raise": error})
    assert reply.status_code == status
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["status"] == status
    assert reply.json()["message"] == message
    assert name not in env.names()
    assert env.events == [("rollback", name)]


async def test_error_status_without_raising_rolls_back_unless_vetoed(env: Env) -> None:
    bad, fine, kept, dropped = unique("bad"), unique("fine"), unique("kept"), unique("dropped")
    calls: list[tuple[int, str]] = []

    def veto(status: int, headers: Any) -> bool:
        calls.append((status, dict(headers)["x-commit"]))
        return dict(headers)["x-commit"] != "yes" or status >= 500

    async with serve(starlette([writer(env)], env.dm)) as base, client(base) as http:
        assert (await http.get("/w", params={"name": bad, "status": 422})).status_code == 422
        assert (await http.get("/w", params={"name": fine, "status": 201})).status_code == 201
    async with serve(starlette([writer(env)], env.dm, veto=veto)) as base, client(base) as http:
        kept_reply = await http.get("/w", params={"name": kept, "status": 409, "commit": "yes"})
        assert kept_reply.status_code == 409
        assert (await http.get("/w", params={"name": dropped, "commit": "no"})).status_code == 200
    assert env.names() >= {fine, kept}
    assert not {bad, dropped} & env.names()
    assert ("rollback", bad) in env.events
    assert calls == [(409, "yes"), (200, "no")]


async def test_a_commit_time_conflict_replaces_the_buffered_response(env: Env) -> None:
    async with env.dm.dal() as dal:
        item = await dal.items.create(name=unique("stale"), qty=1)

    async def edit(request: Request) -> JSONResponse:
        obj = await current_context().dal.items.require(item.id)
        obj.qty = 2  # flushed by the commit, after another writer got there first
        engine = create_engine(env.url, poolclass=NullPool)
        with engine.begin() as conn:
            conn.execute(update(Item).where(Item.id == item.id).values(qty=3, version=Item.version + 1))
        engine.dispose()
        return JSONResponse({"saved": True})

    async with serve(starlette([Route("/edit", edit)], env.dm)) as base, client(base) as http:
        reply = await http.get("/edit")
    assert reply.status_code == 409
    assert reply.json()["error"] == "Conflict"
    async with env.dm.dal() as dal:
        assert (await dal.items.require(item.id)).qty == 3


# -- WebSocket, lifespan, FastAPI ----------------------------------------------------------


async def test_websocket_runs_in_one_context_committed_when_it_closes(env: Env) -> None:
    names = [unique("ws") for _ in range(3)]
    failed = unique("ws-failed")

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        ctx = current_context()
        for _ in range(3):
            name = await websocket.receive_text()
            await env.create(name)
            await websocket.send_text(json.dumps([ctx.meta.request_id, ctx.meta.user, name]))
        await websocket.close()

    async def broken(websocket: WebSocket) -> None:
        await websocket.accept()
        await env.create(await websocket.receive_text())
        raise RuntimeError("the socket handler failed")

    app = starlette([WebSocketRoute("/chat", chat), WebSocketRoute("/broken", broken)], env.dm,
                    meta=lambda scope: {"user": scope["query_string"].decode()})
    async with serve(app) as base:
        ws_base = base.replace("http", "ws")
        async with ws_connect(f"{ws_base}/chat?bob", additional_headers={"X-Request-ID": "ws-1"}) as ws:
            answers = []
            for name in names:
                await ws.send(name)
                answers.append(json.loads(await ws.recv()))
            await ws.wait_closed()
        async with ws_connect(f"{ws_base}/broken") as ws:
            await ws.send(failed)
            await ws.wait_closed()
        assert ws.close_code != 1000  # not a normal closure
    assert answers == [["ws-1", "bob", name] for name in names]
    assert set(names) <= env.names()
    assert failed not in env.names()
    assert env.events == [*(("commit", n) for n in names), ("rollback", failed)]


async def test_websocket_refused_by_the_meta_function(env: Env) -> None:
    def meta_fn(scope: Any) -> dict[str, Any]:
        raise type("Unauthorized", (ServiceError,), {"code": 401})("log in first")

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()

    app = starlette([WebSocketRoute("/chat", chat)], env.dm, meta=meta_fn)
    async with serve(app) as base:
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(base.replace("http", "ws") + "/chat"):
                pass
    assert info.value.response.status_code == 403
    assert env.tracker.opened == 0


async def test_lifespan_passes_through_without_a_context(env: Env) -> None:
    seen: list[Any] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        seen.append(("startup", env.dm.get_active_context()))
        yield
        seen.append(("shutdown", env.dm.get_active_context()))

    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))], lifespan=lifespan)
    app.add_middleware(PolydatumASGIMiddleware, data_manager=env.dm)  # type: ignore[arg-type]
    async with serve(app, lifespan="on") as base, client(base) as http:
        assert (await http.get("/")).status_code == 200
        assert seen == [("startup", None)]
    assert seen == [("startup", None), ("shutdown", None)]


async def test_fastapi_depends_gives_the_dal(env: Env) -> None:
    app = FastAPI()
    app.add_middleware(PolydatumASGIMiddleware, data_manager=env.dm)
    Dal = Annotated[DataAccessLayer, Depends(dal_dependency(env.dm))]
    name, failed = unique("fastapi"), unique("fastapi-failed")

    @app.post("/items/{item_name}", status_code=201)
    async def create(item_name: str, dal: Dal) -> Any:
        env.hooks(item_name)
        item = await dal.items.create(name=item_name)
        return {"id": item.id, "request_id": dal.probe.who()[0], "same": dal is env.dm.get_dal()}

    @app.get("/items/{item_id}")
    async def read(item_id: int, dal: Dal) -> Any:
        return {"name": (await dal.items.require(item_id)).name}

    @app.post("/fail/{item_name}")
    async def fail(item_name: str, dal: Dal) -> Any:
        env.hooks(item_name)
        await dal.items.create(name=item_name)
        raise ConcurrencyConflict("someone else won")

    async with serve(app) as base, client(base) as http:
        made = await http.post(f"/items/{name}", headers={"X-Request-ID": "f-1"})
        got = await http.get(f"/items/{made.json()['id']}")
        missing = await http.get("/items/999999")
        conflict = await http.post(f"/fail/{failed}")
    assert made.status_code == 201
    assert made.json()["request_id"] == "f-1"
    assert made.json()["same"] is True
    assert got.json() == {"name": name}
    assert missing.status_code == 404
    assert missing.json()["message"] == "Item 999999 not found"
    assert conflict.status_code == 409
    assert name in env.names()
    assert failed not in env.names()
    assert env.events == [("commit", name), ("rollback", failed)]


async def test_fastapi_dependency_without_the_middleware(env: Env) -> None:
    app = FastAPI()
    Dal = Annotated[DataAccessLayer, Depends(dal_dependency(env.dm))]

    @app.get("/")
    async def view(dal: Dal) -> Any:
        return {}

    async with serve(app) as base, client(base) as http:
        assert (await http.get("/")).status_code == 500
    with pytest.raises(NoActiveContextError, match="add_middleware"):
        await dal_dependency(env.dm)()


def test_dal_dependency_needs_the_data_manager() -> None:
    dm = DataManager()
    with pytest.raises(TypeError, match="needs the DataManager"):
        dal_dependency(dm.get_dal())  # type: ignore[arg-type]


# -- error paths (raw ASGI apps, so nothing else maps errors) ------------------------------

Raw = Callable[[Any, Any, Any], Awaitable[None]]


async def raw_get(env: Env, app: Raw, **options: Any) -> httpx.Response:
    async with serve(PolydatumASGIMiddleware(app, env.dm, **options)) as base, client(base) as http:
        return await http.get("/")


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"app": "not an app"}, "app must be a ASGI application"),
        ({"data_manager": object()}, "data_manager must be a polydatum DataManager"),
        ({"meta": {"user": 1}}, "meta must be a callable taking the ASGI scope"),
        ({"veto": 400}, "veto must be a callable"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"app": ok_app, "data_manager": DataManager(), **kwargs}
    with pytest.raises(TypeError, match=message):
        PolydatumASGIMiddleware(**args)


def test_current_context_outside_a_request() -> None:
    with pytest.raises(NoActiveContextError, match="PolydatumASGIMiddleware"):
        current_context()


def counting_middleware(log: list[str]) -> Callable[[Any], Iterator[None]]:
    def middleware(ctx: Any) -> Iterator[None]:
        log.append("setup")
        yield
        log.append("teardown")

    return middleware


async def test_meta_function_refusing_with_a_service_error(env: Env) -> None:
    log: list[str] = []
    env.dm.register_context_middleware(counting_middleware(log))

    def meta_fn(scope: Any) -> dict[str, Any]:
        raise type("Unauthorized", (ServiceError,), {"code": 401})("log in first")

    reply = await raw_get(env, ok_app, meta=meta_fn)
    assert reply.status_code == 401
    assert reply.json() == {"status": 401, "error": "Unauthorized", "message": "log in first"}
    assert log == []


@pytest.mark.parametrize(
    "meta_fn",
    [
        pytest.param(lambda scope: 1 / 0, id="raises"),
        pytest.param(lambda scope: None, id="returns-none"),
        pytest.param(lambda scope: asyncio.sleep(0, ["user"]), id="awaits-a-list"),
    ],
)
async def test_a_broken_meta_function_is_a_server_error_and_opens_no_context(
    env: Env, meta_fn: Callable[[Any], Any]
) -> None:
    log: list[str] = []
    env.dm.register_context_middleware(counting_middleware(log))
    assert (await raw_get(env, ok_app, meta=meta_fn)).status_code == 500
    assert log == []


async def test_meta_function_returning_no_mapping_says_so() -> None:
    middleware = PolydatumASGIMiddleware(ok_app, DataManager(), meta=lambda scope: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="it must return a mapping"):
        await middleware.build_meta({"type": "http", "path": "/", "headers": []})


async def test_context_middleware_refusing_at_setup(env: Env) -> None:
    def maintenance(ctx: Any) -> Iterator[None]:
        raise type("Unavailable", (ServiceError,), {"code": 503})("down for maintenance")
        yield

    env.dm.register_context_middleware(maintenance)
    reply = await raw_get(env, ok_app)
    assert reply.status_code == 503
    assert reply.json()["message"] == "down for maintenance"


def commit_failure(error: BaseException) -> Callable[[Any], Iterator[None]]:
    def middleware(ctx: Any) -> Iterator[None]:
        yield
        raise error

    return middleware


async def test_a_failed_commit_of_a_buffered_response_becomes_the_error_response(env: Env) -> None:
    env.dm.register_context_middleware(commit_failure(ConcurrencyConflict("lost the race")))
    reply = await raw_get(env, ok_app)
    assert reply.status_code == 409
    assert reply.json()["message"] == "lost the race"


async def test_an_unmapped_commit_failure_is_a_server_error(env: Env) -> None:
    env.dm.register_context_middleware(commit_failure(OSError("disk full")))
    assert (await raw_get(env, ok_app)).status_code == 500


async def test_a_commit_failing_after_the_stream_started_breaks_the_response(env: Env) -> None:
    env.dm.register_context_middleware(commit_failure(ConcurrencyConflict("lost the race")))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part one", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    with pytest.raises(httpx.RemoteProtocolError):
        await raw_get(env, app)  # the body never gets its end: no false success


async def test_an_error_after_the_start_message_is_still_mapped(env: Env) -> None:
    name = unique("after-start")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await env.create(name)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise NotFound("changed my mind")

    reply = await raw_get(env, app)
    assert reply.status_code == 404
    assert reply.json()["message"] == "changed my mind"
    assert name not in env.names()


async def test_an_error_mid_stream_rolls_back_and_breaks_the_response(env: Env) -> None:
    name = unique("mid")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await env.create(name)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        raise NotFound("too late to map")

    with pytest.raises(httpx.RemoteProtocolError):
        await raw_get(env, app)
    assert name not in env.names()
    assert env.events == [("rollback", name)]


async def test_an_app_returning_before_its_last_body_message_rolls_back(env: Env) -> None:
    name = unique("unfinished")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await env.create(name)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})

    with pytest.raises(httpx.RemoteProtocolError):
        await raw_get(env, app)
    assert name not in env.names()


async def test_a_veto_that_raises_rolls_back_and_is_reported(env: Env) -> None:
    name = unique("veto")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await env.create(name)
        await ok_app(scope, receive, send)

    def veto(status: int, headers: Any) -> bool:
        raise ValueError("broken veto")

    assert (await raw_get(env, app, veto=veto)).status_code == 500
    assert name not in env.names()


async def test_rollback_signals_never_reach_the_server(env: Env) -> None:
    seen: list[type[BaseException]] = []

    def observe(ctx: Any) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            seen.append(type(exc))
            raise

    env.dm.register_context_middleware(observe)

    async def bad_request(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"no"})

    async def unfinished(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    assert (await raw_get(env, bad_request)).status_code == 400
    assert (await raw_get(env, unfinished)).status_code == 500  # uvicorn: incomplete response
    assert seen == [RollbackResponse, ResponseIncomplete]


async def test_an_error_after_the_response_ended_still_reaches_the_server(env: Env) -> None:
    name = unique("after")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await env.create(name)
        await ok_app(scope, receive, send)  # the context commits here
        raise RuntimeError("a background job failed")

    reply = await raw_get(env, app)
    assert reply.status_code == 200
    assert reply.text == "ok"
    assert name in env.names()
    assert env.events == [("commit", name)]


def test_both_integrations_have_the_same_names() -> None:
    from polydatum import asgi, werkzeug

    assert asgi.PolydatumMiddleware is asgi.PolydatumASGIMiddleware
    assert werkzeug.PolydatumWSGIMiddleware is werkzeug.PolydatumMiddleware
    assert asgi.current_context is werkzeug.current_context

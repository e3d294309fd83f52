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
    dal_dependency,
    request_context,
)
from polydatum.errors import ConcurrencyConflict, NoActiveContextError, NotFound, ServiceError
from polydatum.sqlalchemy import AsyncDatabase
from tests.support.sql import AsyncItems, Base, Item
from tests.support.web import (
    Probe,
    Tracker,
    every_polydatum_error,
    item_names,
    leaked,
    real_blob_errors,
    record_outcome,
)

# -- the server ----------------------------------------------------------------


@asynccontextmanager
async def serve(app: Any, lifespan: str = "auto") -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 as a task of this loop; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan=lifespan,  # type: ignore[arg-type]
        ws="websockets-sansio",
        timeout_graceful_shutdown=5,
    )
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
    """An httpx client on ``base`` with room for the many connections of the concurrency test."""
    return httpx.AsyncClient(
        base_url=base, timeout=30, limits=httpx.Limits(max_connections=200, max_keepalive_connections=50)
    )


# -- the application's parts -----------------------------------------------------


@dataclass
class Env:
    dm: DataManager
    db: AsyncDatabase
    url: str
    tracker: Tracker
    events: list[tuple[str, str]] = field(default_factory=list)

    def hooks(self, name: str) -> None:
        """Record the commit or rollback of the active context under ``name``."""
        record_outcome(self.events, name)

    async def create(self, name: str) -> Item:
        """Create the item ``name`` in the request's context and record its outcome."""
        self.hooks(name)
        item: Item = await request_context().dal.items.create(name=name, qty=1)
        return item

    def names(self) -> set[str]:
        """The item names committed to the database, read on a connection of its own."""
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            return item_names(engine)
        finally:
            engine.dispose()

    def checked_out(self) -> int:
        """How many connections of the async engine's pool are checked out."""
        return int(self.db.engine.pool.checkedout())  # type: ignore[attr-defined]


@pytest.fixture(name="pg_url", scope="module")
def fixture_pg_url(pg_url: str) -> str:
    """This module's PostgreSQL database (tests/integrations/conftest.py), with the test tables."""
    engine = create_engine(pg_url, poolclass=NullPool)
    Base.metadata.create_all(engine)
    engine.dispose()
    return pg_url


@pytest.fixture(name="env")
async def fixture_env(pg_url: str) -> AsyncIterator[Env]:
    """An Env on an async database; afterwards, checks every context closed and every connection returned."""
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
    """``prefix`` with a random suffix, so that rows of different tests never collide."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def starlette(routes: list[Any], dm: DataManager, **options: Any) -> Starlette:
    """A Starlette app of ``routes`` behind PolydatumASGIMiddleware with ``options``."""
    app = Starlette(routes=routes)
    app.add_middleware(PolydatumASGIMiddleware, data_manager=dm, **options)  # type: ignore[arg-type]
    return app


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` on this loop until it holds; fail naming ``what`` after ``timeout`` seconds."""

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
        """Wait until ``parties`` tasks wait here, then release them together and start a new group."""
        event = self.event
        self.count += 1
        if self.count == self.parties:
            self.count, self.event = 0, asyncio.Event()
            event.set()
        else:
            await asyncio.wait_for(event.wait(), 30)


async def test_concurrent_requests_never_mix_meta(env: Env) -> None:
    """200 concurrent requests, to async and to sync views, each see only their own meta and context."""
    barrier = Rendezvous(10)

    async def who(request: Request) -> JSONResponse:
        ctx = request_context()
        handle = ctx.tracker
        before = ctx.dal.probe.who()
        await barrier.wait()  # ten requests at a time are inside their contexts here
        after = env.dm.get_dal().probe.who()
        return JSONResponse(
            {
                "before": before,
                "after": after,
                "handle": handle.meta.request_id,
                "same": env.dm.require_active_context() is ctx is request.scope[SCOPE_KEY],
            }
        )

    def who_sync(request: Request) -> JSONResponse:  # run in Starlette's thread pool
        return JSONResponse(
            {
                "before": request_context().dal.probe.who(),
                "after": env.dm.get_dal().probe.who(),
                "handle": None,
                "same": True,
            }
        )

    app = starlette(
        [Route("/who", who), Route("/who-sync", who_sync)],
        env.dm,
        meta=lambda scope: {"user": dict(scope["headers"]).get(b"x-user", b"").decode()},
    )
    async with serve(app) as base, client(base) as http:
        replies = await asyncio.gather(
            *(
                http.get(
                    "/who" if i % 4 else "/who-sync",
                    headers={"X-Request-ID": f"req-{i}", "X-User": f"user-{i}"},
                )
                for i in range(200)
            )
        )
    for i, reply in enumerate(replies):
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["before"] == data["after"] == [f"req-{i}", f"user-{i}"]
        assert data["handle"] in (f"req-{i}", None)
        assert data["same"] is True
    assert env.tracker.opened == 150
    assert env.tracker.max_open >= 10


async def test_default_meta_and_an_async_meta_function(env: Env) -> None:
    """Default meta holds the given or a fresh request id, client, method and decoded path; an
    async meta function adds to it."""

    async def meta_fn(scope: Any) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"user": "ann", "scheme": scope["scheme"]}

    async def meta(request: Request) -> JSONResponse:
        return JSONResponse(dict(request_context().meta))

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
    """A streamed body keeps the context and its resource open until the client has the last chunk."""
    gate = asyncio.Semaphore(0)

    async def stream(request: Request) -> StreamingResponse:
        handle = request_context().tracker

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
    """A client leaving mid-stream closes the context, rolls back and returns the pooled connection."""
    name = unique("disconnect")
    go_on = asyncio.Event()

    async def stream(request: Request) -> StreamingResponse:
        await env.create(name)  # the session holds a pooled connection from here on
        handle = request_context().tracker
        items = request_context().dal.items

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
        return PlainTextResponse(
            "ok", status_code=int(args.get("status", 200)), headers={"X-Commit": args.get("commit", "")}
        )

    return Route("/w", write, methods=["GET", "POST"])


async def test_commit_and_rollback_are_visible_in_the_database(env: Env) -> None:
    """A 200 commits the view's row; an unmapped error rolls it back and Starlette answers 500."""
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
    """A ServiceError rolls back and answers JSON with its code (500 if not an HTTP status) and message."""
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
    """A 4xx response rolls back and a 2xx commits, unless a veto given status and headers says otherwise."""
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
    """A version conflict at commit turns the buffered 200 into a 409; the other writer's change stays."""
    async with env.dm.dal() as dal:
        item = await dal.items.create(name=unique("stale"), qty=1)

    async def edit(request: Request) -> JSONResponse:
        obj = await request_context().dal.items.require(item.id)
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
    """A WebSocket runs in one context with its meta, committed at a clean close and
    rolled back if the handler fails."""
    names = [unique("ws") for _ in range(3)]
    failed = unique("ws-failed")

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        ctx = request_context()
        for _ in range(3):
            name = await websocket.receive_text()
            await env.create(name)
            await websocket.send_text(json.dumps([ctx.meta.request_id, ctx.meta.user, name]))
        await websocket.close()

    async def broken(websocket: WebSocket) -> None:
        await websocket.accept()
        await env.create(await websocket.receive_text())
        raise RuntimeError("the socket handler failed")

    app = starlette(
        [WebSocketRoute("/chat", chat), WebSocketRoute("/broken", broken)],
        env.dm,
        meta=lambda scope: {"user": scope["query_string"].decode()},
    )
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
    """A ServiceError from the meta function refuses a WebSocket handshake (403) and opens no context."""

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
    """Lifespan startup and shutdown pass through the middleware and run with no active context."""
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
    """``Depends(dal_dependency(dm))`` gives FastAPI views the request's DAL; errors map and roll back."""
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
    """With no middleware, a view on ``dal_dependency`` answers 500; the dependency names add_middleware."""
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
    """``dal_dependency()`` given a DAL instead of the DataManager raises TypeError."""
    dm = DataManager()
    with pytest.raises(TypeError, match="needs the DataManager"):
        dal_dependency(dm.get_dal())  # type: ignore[arg-type]


# -- error paths (raw ASGI apps, so nothing else maps errors) ------------------------------

Raw = Callable[[Any, Any, Any], Awaitable[None]]


async def raw_get(env: Env, app: Raw, **options: Any) -> httpx.Response:
    """GET ``/`` once from ``app`` served behind PolydatumASGIMiddleware with ``options``."""
    async with serve(PolydatumASGIMiddleware(app, env.dm, **options)) as base, client(base) as http:
        return await http.get("/")


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    """A raw ASGI app that answers 200 ``ok`` in one body message."""
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
    """PolydatumASGIMiddleware raises TypeError for an app, data manager, meta or veto of the wrong kind."""
    args: dict[str, Any] = {"app": ok_app, "data_manager": DataManager(), **kwargs}
    with pytest.raises(TypeError, match=message):
        PolydatumASGIMiddleware(**args)


def test_current_context_outside_a_request() -> None:
    """``request_context()`` outside a request raises NoActiveContextError naming PolydatumASGIMiddleware."""
    with pytest.raises(NoActiveContextError, match="PolydatumASGIMiddleware"):
        request_context()


def counting_middleware(log: list[str]) -> Callable[[Any], Iterator[None]]:
    """Context middleware that logs its setup and teardown in ``log``."""

    def middleware(ctx: Any) -> Iterator[None]:
        log.append("setup")
        yield
        log.append("teardown")

    return middleware


async def test_meta_function_refusing_with_a_service_error(env: Env) -> None:
    """A ServiceError from the meta function becomes its JSON error response, and no context opens."""
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
    """A meta function that raises or gives no mapping answers 500 and opens no context."""
    log: list[str] = []
    env.dm.register_context_middleware(counting_middleware(log))
    assert (await raw_get(env, ok_app, meta=meta_fn)).status_code == 500
    assert log == []


async def test_meta_function_returning_no_mapping_says_so() -> None:
    """A meta function returning None makes ``build_meta()`` raise TypeError: it must return a mapping."""
    middleware = PolydatumASGIMiddleware(ok_app, DataManager(), meta=lambda scope: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="it must return a mapping"):
        await middleware.build_meta({"type": "http", "path": "/", "headers": []})


async def test_context_middleware_refusing_at_setup(env: Env) -> None:
    """A ServiceError raised by context middleware at setup answers with its status and message."""

    def maintenance(ctx: Any) -> Iterator[None]:
        raise type("Unavailable", (ServiceError,), {"code": 503})("down for maintenance")
        yield

    env.dm.register_context_middleware(maintenance)
    reply = await raw_get(env, ok_app)
    assert reply.status_code == 503
    assert reply.json()["message"] == "down for maintenance"


def commit_failure(error: BaseException) -> Callable[[Any], Iterator[None]]:
    """Context middleware whose teardown after a clean body (the commit) raises ``error``."""

    def middleware(ctx: Any) -> Iterator[None]:
        yield
        raise error

    return middleware


async def test_a_failed_commit_of_a_buffered_response_becomes_the_error_response(env: Env) -> None:
    """A ServiceError at the commit of a buffered response replaces it with that error's response."""
    env.dm.register_context_middleware(commit_failure(ConcurrencyConflict("lost the race")))
    reply = await raw_get(env, ok_app)
    assert reply.status_code == 409
    assert reply.json()["message"] == "lost the race"


async def test_an_unmapped_commit_failure_is_a_server_error(env: Env) -> None:
    """A non-service error at the commit of a buffered response answers 500."""
    env.dm.register_context_middleware(commit_failure(OSError("disk full")))
    assert (await raw_get(env, ok_app)).status_code == 500


async def test_a_commit_failing_after_the_stream_started_breaks_the_response(env: Env) -> None:
    """A commit failing after part of the body went out leaves the response unfinished: no false success."""
    env.dm.register_context_middleware(commit_failure(ConcurrencyConflict("lost the race")))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part one", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    with pytest.raises(httpx.RemoteProtocolError):
        await raw_get(env, app)  # the body never gets its end: no false success


async def test_an_error_after_the_start_message_is_still_mapped(env: Env) -> None:
    """A ServiceError after the start message but before any body is mapped to its response and rolls back."""
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
    """An error after part of the body went out rolls back and leaves the response unfinished."""
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
    """An app returning before its last body message rolls back and leaves the response unfinished."""
    name = unique("unfinished")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await env.create(name)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})

    with pytest.raises(httpx.RemoteProtocolError):
        await raw_get(env, app)
    assert name not in env.names()


async def test_a_veto_that_raises_rolls_back_and_is_reported(env: Env) -> None:
    """A veto that raises rolls back and answers 500."""
    name = unique("veto")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await env.create(name)
        await ok_app(scope, receive, send)

    def veto(status: int, headers: Any) -> bool:
        raise ValueError("broken veto")

    assert (await raw_get(env, app, veto=veto)).status_code == 500
    assert name not in env.names()


async def test_rollback_signals_never_reach_the_server(env: Env) -> None:
    """Context middleware sees RollbackResponse for a 400 and ResponseIncomplete for an unfinished body;
    the server sees only responses."""
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
    """An error the app raises after its response ended leaves the 200 and the commit in place."""
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


def test_each_integration_exports_one_middleware_name() -> None:
    """Each web module exports one middleware class, named after its protocol; both share request_context."""
    from polydatum import asgi, werkzeug

    assert [n for n in asgi.__all__ if n.endswith("Middleware")] == ["PolydatumASGIMiddleware"]
    assert [n for n in werkzeug.__all__ if n.endswith("Middleware")] == ["PolydatumWSGIMiddleware"]
    assert asgi.request_context is werkzeug.request_context


# -- a commit failing at the end of the response (issue 12, A1, the ASGI twin) ------------


class Recorder:
    """An ASGI layer between the server and the app: records what escapes the app to the server."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.escaped: list[BaseException] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            if scope["type"] == "http":
                self.escaped.append(exc)
            raise


@pytest.mark.parametrize("parts", [1, 2])
async def test_a_database_error_at_commit_reaches_the_server_as_itself(env: Env, parts: int) -> None:
    """A unique violation at the commit of a one- or two-message body reaches the server as IntegrityError."""
    from sqlalchemy.exc import IntegrityError

    existing = unique("existing")
    await raw_get(env, app_creating(env, existing))

    async def duplicate(scope: Any, receive: Any, send: Any) -> None:
        (await request_context().aget("db")).add(Item(name=existing, qty=1))  # unflushed: fails at commit
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"6")]})
        if parts == 2:
            await send({"type": "http.response.body", "body": b"one", "more_body": True})
            await send({"type": "http.response.body", "body": b"two"})
        else:
            await send({"type": "http.response.body", "body": b"onetwo"})

    recorder = Recorder(PolydatumASGIMiddleware(duplicate, env.dm))
    async with serve(recorder) as base, client(base) as http:
        if parts == 1:
            assert (await http.get("/")).status_code == 500
        else:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get("/")
    assert [type(exc) for exc in recorder.escaped] == [IntegrityError]


def app_creating(env: Env, name: str) -> Any:
    """A raw ASGI app that creates the item ``name`` and answers 200."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await request_context().dal.items.create(name=name, qty=1)
        await ok_app(scope, receive, send)

    return app


# -- x-request-id from the client (issue 12, B9) ---------------------------------------------

BAD_REQUEST_IDS = {
    "201 characters": b"r" * 201,
    "1 MB": b"r" * 1_000_000,
    "ANSI escapes": b"\x1b[31mred\x1b[0m",
    "NUL": b"a\x00b",
    "line break": b"a\nb",
    "DEL": b"a\x7fb",
    "non-ASCII": "café".encode(),
    "empty": b"",
}


async def meta_of(headers: list[tuple[bytes, bytes]], middleware: Any = None) -> dict[str, Any]:
    """Serve one http scope holding ``headers`` through the middleware, as a server would; return its meta."""
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(dict(request_context().meta))
        await ok_app(scope, receive, send)

    if middleware is None:
        middleware = PolydatumASGIMiddleware(app, DataManager())

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers, "client": ("127.0.0.1", 1)}
    await middleware(scope, receive, send)
    return seen[0]


@pytest.mark.parametrize("given", list(BAD_REQUEST_IDS.values()), ids=list(BAD_REQUEST_IDS))
async def test_a_bad_request_id_is_replaced_with_a_fresh_one(given: bytes) -> None:
    """An x-request-id that is too long, empty, or not printable ASCII becomes a new random id."""
    meta = await meta_of([(b"x-request-id", given)])
    assert re.fullmatch(r"[0-9a-f]{32}", meta["request_id"])


@pytest.mark.parametrize("given", [b"r" * 200, b"abc-123", b"a b~!{}"])
async def test_a_printable_ascii_request_id_of_up_to_200_characters_is_kept(given: bytes) -> None:
    """An x-request-id of 1 to 200 printable ASCII characters becomes meta.request_id unchanged."""
    assert (await meta_of([(b"x-request-id", given)]))["request_id"] == given.decode()


async def test_bad_request_ids_through_a_real_server(env: Env) -> None:
    """Over HTTP, an over-long or non-ASCII id is replaced (uvicorn refuses control characters itself)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = json.dumps(request_context().meta.request_id).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async with serve(PolydatumASGIMiddleware(app, env.dm)) as base, client(base) as http:
        ids = [
            (await http.get("/", headers={"x-request-id": given})).json()
            for given in (b"r" * 201, "café".encode(), b"ok-1")
        ]
    assert all(re.fullmatch(r"[0-9a-f]{32}", got) for got in ids[:2])
    assert ids[2] == "ok-1"


# -- what error bodies show the client (issue 12, B5) ------------------------------------------


async def test_error_bodies_show_no_server_details(
    env: Env, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Every polydatum error raised in an app answers without its path, host or bucket; the log has them."""
    errors = every_polydatum_error() + real_blob_errors(tmp_path)
    raising: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise raising[0]

    middleware = PolydatumASGIMiddleware(app, env.dm)
    caplog.set_level("INFO", logger="polydatum")
    async with serve(middleware) as base, client(base) as http:
        for exc in errors:
            raising[:] = [exc]
            if not isinstance(exc, ServiceError):
                # Not mapped: it goes to the server, which answers with its own page.
                with pytest.raises(type(exc)):
                    await meta_of([], middleware)
                continue
            caplog.clear()
            reply = await http.get("/")
            assert leaked(reply.text) == [], exc
            assert reply.status_code == exc.code
            assert reply.json()["message"] == exc.public_message
            logged = [r for r in caplog.records if r.name == "polydatum"]
            assert [r.exc_info[1] for r in logged if r.exc_info] == [exc]
            assert str(exc) in logged[0].getMessage()


async def test_a_refused_websocket_is_closed_without_server_details(tmp_path: Any) -> None:
    """A WebSocket refused by a blob error in the meta function has the public message as close reason."""
    for exc in real_blob_errors(tmp_path):
        sent: list[Any] = []

        def meta_fn(scope: Any, exc: BaseException = exc) -> dict[str, Any]:
            raise exc

        async def send(message: Any, sent: list[Any] = sent) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        scope = {"type": "websocket", "path": "/chat", "headers": []}
        await PolydatumASGIMiddleware(ok_app, DataManager(), meta=meta_fn)(scope, receive, send)
        assert sent == [{"type": "websocket.close", "code": 1008, "reason": exc.public_message}]  # type: ignore[attr-defined]


async def test_a_websocket_close_reason_fits_in_123_bytes() -> None:
    """A long non-ASCII refusal is cut to the 123 bytes of UTF-8 a close frame holds, between characters."""
    sent: list[Any] = []

    def meta_fn(scope: Any) -> dict[str, Any]:
        raise ServiceError("é" * 100)

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    scope = {"type": "websocket", "path": "/chat", "headers": []}
    await PolydatumASGIMiddleware(ok_app, DataManager(), meta=meta_fn)(scope, receive, send)
    assert sent[0]["reason"] == "é" * 61


async def test_a_users_own_error_message_reaches_the_client(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """NotFound("no note 5") shows its message, unlogged; public_message= replaces it and logs the details."""
    raising: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise raising[0]

    caplog.set_level("INFO", logger="polydatum")
    outcomes = []
    async with serve(PolydatumASGIMiddleware(app, env.dm)) as base, client(base) as http:
        for exc in (
            NotFound("no note 5"),
            NotFound("no row in /srv/data", public_message="no such note"),
            ServiceError("pool of db-7 exhausted", public_message="try again later"),
        ):
            raising[:] = [exc]
            caplog.clear()
            reply = await http.get("/")
            levels = [r.levelname for r in caplog.records if r.name == "polydatum"]
            outcomes.append((reply.status_code, reply.json()["message"], levels))
    assert outcomes == [
        (404, "no note 5", []),
        (404, "no such note", ["INFO"]),
        (500, "try again later", ["ERROR"]),
    ]


@pytest.mark.parametrize("failing", [False, True], ids=["commit", "rollback"])
async def test_request_context_is_the_requests_in_its_hooks(failing: bool) -> None:
    """The request's commit and rollback hooks (sync and async) still find it through request_context()."""
    dm = DataManager()
    seen: list[tuple[str, Any]] = []
    contexts: list[Any] = []

    async def note(kind: str) -> None:
        seen.append((kind, request_context()))

    async def view(request: Request) -> Response:
        ctx = request_context()
        contexts.append(ctx)
        ctx.on_commit(lambda: seen.append(("commit", request_context())))
        ctx.on_commit(note, "async commit")
        ctx.on_rollback(lambda: seen.append(("rollback", request_context())))
        return PlainTextResponse("x", status_code=500 if failing else 200)

    api = PolydatumASGIMiddleware(Starlette(routes=[Route("/", view)]), data_manager=dm)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test") as http:
        answer = await http.get("/")
    assert answer.status_code == (500 if failing else 200)
    [ctx] = contexts
    assert seen == ([("rollback", ctx)] if failing else [("commit", ctx), ("async commit", ctx)])
    assert ctx.get_hook_errors() == []

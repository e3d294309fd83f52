"""polydatum.asgi's commit_in_endpoint and read_chunks, on FastAPI with a sync Database on PostgreSQL.

``commit_in_endpoint`` ends a ``def`` endpoint's unit of work in the
endpoint's own thread, before the response exists; ``read_chunks`` reads a
blocking stream for a streamed body in threads that are not FastAPI's pool.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations at run time.
import asyncio
import functools
import os
import threading
import time
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import polydatum.asgi
from polydatum import DataAccessLayer, DataManager
from polydatum.asgi import (
    MAX_CHUNK_SIZE,
    PolydatumASGIMiddleware,
    RollbackResponse,
    Veto,
    commit_in_endpoint,
    dal_dependency,
    read_chunks,
    request_context,
)
from polydatum.errors import NoActiveContextError, NotFound
from polydatum.sqlalchemy import Database
from tests.support.sql import Item, Items


def names(db: Database) -> list[str]:
    """The committed item names, read outside any context."""
    with Session(db.engine) as session:
        return sorted(session.scalars(select(Item.name)))


def wired(db: Database) -> DataManager:
    dm = DataManager()
    db.install(dm)
    dm.register_services(items=Items(Item))
    return dm


def app_of(dm: DataManager, veto: Veto | None = None) -> FastAPI:
    """Endpoints that create items in various ways, each under commit_in_endpoint."""
    api = FastAPI()
    Dal = Annotated[DataAccessLayer, Depends(dal_dependency(dm))]

    @api.post("/items/{name}", status_code=201)
    @commit_in_endpoint
    def create(name: str, dal: Dal) -> Any:
        item = dal.items.create(name=name)
        return {"id": item.id, "thread": threading.get_ident()}

    @api.post("/missing/{name}")
    @commit_in_endpoint
    def missing(name: str, dal: Dal) -> Any:
        dal.items.create(name=name)
        raise NotFound(f"no such thing as {name}")

    @api.post("/refused/{name}")
    @commit_in_endpoint
    def refused(name: str, dal: Dal) -> Response:
        dal.items.create(name=name)
        return JSONResponse({"refused": name}, status_code=409, headers={"x-keep": "yes"})

    @api.get("/contexts")
    @commit_in_endpoint
    def contexts() -> Any:
        active = dm.require_active_context()
        return {"same": active is request_context(), "meta": active.meta.get("request_id")}

    @api.post("/status/{name}")
    @commit_in_endpoint
    def status_set(name: str, response: Response, dal: Dal) -> Any:
        dal.items.create(name=name)
        response.status_code = 409  # FastAPI's way to set the status of a returned dict
        return {"refused": name}

    @commit_in_endpoint
    def helper(name: str) -> None:  # a decorated function called from a decorated endpoint
        dm.get_dal().items.create(name=name)

    @api.post("/nested/{name}")
    @commit_in_endpoint
    def nested(name: str, dal: Dal) -> Any:
        helper(f"{name}-inner")
        dal.items.create(name=name)
        if name.startswith("fail"):
            raise NotFound("failed after the helper")
        return {"ok": name}

    @api.post("/raises-rollback")
    @commit_in_endpoint
    def raises_rollback(dal: Dal) -> Any:
        dal.items.create(name="own-signal")
        raise RollbackResponse(418, [])

    api.add_middleware(PolydatumASGIMiddleware, data_manager=dm, veto=veto)
    return api


def client(api: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test")


async def test_the_commit_runs_in_the_endpoints_thread_before_it_returns(pg_db: Database) -> None:
    """The COMMIT runs in the endpoint's thread; the middleware's context makes no trip to a thread."""
    dm = wired(pg_db)
    commits: list[int] = []
    event.listen(pg_db.engine, "commit", lambda _conn: commits.append(threading.get_ident()))
    async with client(app_of(dm)) as http:
        made = await http.post("/items/a")
    assert made.status_code == 201
    assert commits == [made.json()["thread"]]
    assert commits[0] != threading.get_ident()  # not the loop's
    assert names(pg_db) == ["a"]
    # The request's own context created nothing: it closed on the loop, so the
    # COMMIT threads (made on first use) were never asked for.
    assert "_committer" not in pg_db.__dict__
    assert pg_db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_failed_commit_is_the_endpoints_error(pg_db: Database) -> None:
    """A COMMIT the server refuses (a duplicate) raises in the endpoint: never a 201 the client saw."""
    dm = wired(pg_db)
    async with client(app_of(dm)) as http:
        assert (await http.post("/items/dup")).status_code == 201
        with pytest.raises(IntegrityError):  # httpx's transport raises what a server would answer 500 to
            await http.post("/items/dup")
    assert names(pg_db) == ["dup"]
    assert pg_db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_an_error_raised_in_the_endpoint_rolls_back_and_maps(pg_db: Database) -> None:
    dm = wired(pg_db)
    async with client(app_of(dm)) as http:
        answer = await http.post("/missing/ghost")
    assert answer.status_code == 404
    assert answer.json()["message"] == "no such thing as ghost"
    assert names(pg_db) == []


async def test_a_returned_error_response_rolls_back_unless_vetoed(pg_db: Database) -> None:
    """The middleware's veto decides for a response the endpoint returns, and sees its headers."""
    dm = wired(pg_db)
    async with client(app_of(dm)) as http:
        answer = await http.post("/refused/no")
    assert answer.status_code == 409
    assert answer.json() == {"refused": "no"}
    assert names(pg_db) == []

    seen: list[tuple[int, list[tuple[str, str]]]] = []

    def keep(status: int, headers: Any) -> bool:
        seen.append((status, list(headers)))
        return ("x-keep", "yes") not in headers

    async with client(app_of(wired(pg_db), veto=keep)) as http:
        answer = await http.post("/refused/kept")
    assert answer.status_code == 409
    assert names(pg_db) == ["kept"]
    assert seen[0][0] == 409
    assert ("x-keep", "yes") in seen[0][1]


async def test_the_endpoint_has_its_own_context_with_the_requests_meta(pg_db: Database) -> None:
    """request_context() inside the endpoint is the endpoint's context, with the request's meta."""
    dm = wired(pg_db)
    async with client(app_of(dm)) as http:
        answer = await http.get("/contexts", headers={"x-request-id": "req-42"})
    assert answer.json() == {"same": True, "meta": "req-42"}


async def test_a_status_set_on_fastapis_response_parameter_is_vetoed(pg_db: Database) -> None:
    dm = wired(pg_db)
    async with client(app_of(dm)) as http:
        answer = await http.post("/status/set")
    assert answer.status_code == 409
    assert names(pg_db) == []


async def test_a_decorated_call_inside_a_decorated_endpoint_joins_its_unit_of_work(pg_db: Database) -> None:
    dm = wired(pg_db)
    commits: list[int] = []
    event.listen(pg_db.engine, "commit", lambda _conn: commits.append(1))
    async with client(app_of(dm)) as http:
        assert (await http.post("/nested/ok")).status_code == 200
        assert len(commits) == 1  # one COMMIT for the endpoint and its helper
        assert (await http.post("/nested/fail")).status_code == 404
    assert names(pg_db) == ["ok", "ok-inner"]  # the failed endpoint took its helper's write with it


async def test_an_endpoint_raising_the_rollback_signal_itself_rolls_back(pg_db: Database) -> None:
    dm = wired(pg_db)
    async with client(app_of(dm)) as http:
        with pytest.raises(RollbackResponse):  # httpx's transport raises what reaches the server
            await http.post("/raises-rollback")
    assert names(pg_db) == []


def test_outside_the_middleware_it_says_what_to_add() -> None:
    @commit_in_endpoint
    def endpoint() -> int:
        return 1

    with pytest.raises(NoActiveContextError, match=r"add_middleware\(PolydatumASGIMiddleware.*__wrapped__"):
        endpoint()
    dm = DataManager()
    with dm.context():  # a test's own context is not a request: the message says how to call it there
        with pytest.raises(NoActiveContextError, match="no request is"):
            endpoint()
        assert endpoint.__wrapped__() == 1  # type: ignore[attr-defined]


class AsyncCallable:
    async def __call__(self) -> int:
        return 1  # pragma: no cover - never called


async def async_endpoint() -> int:
    return 1  # pragma: no cover - never called


async def async_generator_endpoint() -> Any:
    yield 1  # pragma: no cover - never called


def generator_endpoint() -> Any:
    yield 1  # pragma: no cover - never called


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        (async_endpoint, r"plain def endpoints.*is async"),
        (functools.partial(async_endpoint), r"plain def endpoints.*is async"),
        (AsyncCallable(), r"plain def endpoints.*is async"),
        (async_generator_endpoint, r"plain def endpoints.*is async"),
        (generator_endpoint, r"generator function.*read_chunks"),
        (42, "decorates a def endpoint, got"),
    ],
    ids=[
        "async def",
        "partial of async def",
        "async __call__",
        "async generator",
        "generator",
        "not callable",
    ],
)
def test_what_cannot_commit_in_its_thread_is_refused_when_decorated(endpoint: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        commit_in_endpoint(endpoint)


def joining_app(dm: DataManager, commits: list[int]) -> FastAPI:
    """Endpoints whose dependencies or undecorated callers use the request's context first."""
    api = FastAPI()
    Dal = Annotated[DataAccessLayer, Depends(dal_dependency(dm))]

    def made_by_dependency(dal: Dal, name: str) -> int:
        return int(dal.items.create(name=f"{name}-dep").id)

    @api.post("/dependency/{name}")
    @commit_in_endpoint
    def after_dependency(name: str, dal: Dal, dep_id: Annotated[int, Depends(made_by_dependency)]) -> Any:
        seen = dal.items.get(dep_id) is not None  # the dependency's row, not yet committed
        dal.items.update(dep_id, name=f"{name}-dep-edited")  # its row lock: a second transaction would wait
        dal.items.create(name=name)
        if name.startswith("fail"):
            raise NotFound("failed after the dependency's write")
        return {"seen": seen}

    @commit_in_endpoint
    def helper(name: str) -> None:
        dm.get_dal().items.create(name=f"{name}-helper")

    @api.post("/undecorated/{name}")
    def undecorated(name: str, dal: Dal) -> Any:
        helper(name)
        dal.items.create(name=name)
        if name.startswith("fail"):
            raise NotFound("failed after the helper")
        return {"ok": name}

    @api.post("/route-status/{name}", status_code=400)
    @commit_in_endpoint
    def route_status(name: str, dal: Dal) -> Any:
        dal.items.create(name=name)
        return {"refused": name}

    api.add_middleware(PolydatumASGIMiddleware, data_manager=dm)
    return api


async def test_an_endpoint_whose_dependency_used_the_request_context_joins_it(pg_db: Database) -> None:
    """A dependency that wrote first: the endpoint sees and locks its row in the same transaction (no
    second one waiting on the first), one COMMIT for both, and a failure rolls both back."""
    dm = wired(pg_db)
    commits: list[int] = []
    event.listen(pg_db.engine, "commit", lambda _conn: commits.append(1))
    async with client(joining_app(dm, commits)) as http:
        done = await asyncio.wait_for(http.post("/dependency/ok"), timeout=20)
        assert (done.status_code, done.json()) == (200, {"seen": True})
        assert len(commits) == 1
        failed = await asyncio.wait_for(http.post("/dependency/fail"), timeout=20)
        assert failed.status_code == 404
    assert names(pg_db) == ["ok", "ok-dep-edited"]


async def test_a_decorated_helper_of_an_undecorated_endpoint_joins_the_request(pg_db: Database) -> None:
    """Only the endpoint the router matched commits in its thread: a decorated helper it did not match
    joins the request's unit of work, so the endpoint's failure takes the helper's write with it."""
    dm = wired(pg_db)
    commits: list[int] = []
    event.listen(pg_db.engine, "commit", lambda _conn: commits.append(1))
    async with client(joining_app(dm, commits)) as http:
        assert (await http.post("/undecorated/ok")).status_code == 200
        assert len(commits) == 1
        assert (await http.post("/undecorated/fail")).status_code == 404
    assert names(pg_db) == ["ok", "ok-helper"]


async def test_a_route_status_the_veto_refuses_rolls_back(pg_db: Database) -> None:
    """@app.post(..., status_code=400) with a dict returned: the route's status is the response's."""
    dm = wired(pg_db)
    async with client(joining_app(dm, [])) as http:
        answer = await http.post("/route-status/refused")
    assert (answer.status_code, answer.json()) == (400, {"refused": "refused"})
    assert names(pg_db) == []


async def test_a_context_that_created_nothing_closes_on_the_loop(pg_db: Database) -> None:
    """An ``async with`` context over a sync Database that used no session makes no trip to a thread."""
    dm = wired(pg_db)
    async with dm.context():
        pass
    async with dm.context() as ctx:
        ctx.meta.get("x")
    assert "_committer" not in pg_db.__dict__
    async with dm.context() as ctx:  # one that did use its session still commits in a thread
        ctx.db.add(Item(name="used"))
    assert "_committer" in pg_db.__dict__
    assert names(pg_db) == ["used"]


# -- read_chunks ------------------------------------------------------------------


class Blocks:
    """A blocking stream of ``count`` blocks that records the threads reading it and its close."""

    def __init__(self, count: int, size: int = 4) -> None:
        self.left = count
        self.size = size
        self.threads: list[str] = []
        self.events: list[str] = []
        self.gate: threading.Event | None = None  # when set, each read waits for it
        self.reading = threading.Event()

    def read(self, size: int = -1) -> bytes:
        self.threads.append(threading.current_thread().name)
        self.reading.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.events.append("read")
        if self.left == 0:
            return b""
        self.left -= 1
        return b"x" * self.size

    def close(self) -> None:
        self.events.append("close")


async def test_read_chunks_reads_in_threads_of_its_own_and_closes() -> None:
    stream = Blocks(3)
    chunks = [chunk async for chunk in read_chunks(stream, 4)]
    assert chunks == [b"xxxx"] * 3
    assert stream.events == ["read"] * 4 + ["close"]
    assert all(name.startswith("polydatum-body") for name in stream.threads)

    kept = Blocks(1)
    assert [chunk async for chunk in read_chunks(kept, close=False)] == [b"xxxx"]
    assert "close" not in kept.events


async def test_read_chunks_keeps_a_stream_moving_while_the_pool_is_full(pg_db: Database) -> None:
    """FastAPI's only thread held by an endpoint that waits for the download: the download still ends.

    Its blocks wait until that endpoint holds the thread; read in FastAPI's
    pool (a sync iterator given to StreamingResponse) they would wait for the
    thread, and neither request would move.
    """
    import anyio.to_thread

    dm = wired(pg_db)
    api = FastAPI()
    stream = Blocks(3)
    stream.gate = threading.Event()  # the first read waits until /busy holds the thread
    release = threading.Event()

    @api.get("/download")
    def download() -> StreamingResponse:
        return StreamingResponse(read_chunks(stream))

    @api.get("/busy")
    def busy() -> str:
        assert stream.gate is not None
        stream.gate.set()
        release.wait(10)  # holds the pool's only thread until the download is done
        return "done"

    api.add_middleware(PolydatumASGIMiddleware, data_manager=dm)
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens, limiter.total_tokens = limiter.total_tokens, 1
    try:
        async with client(api) as http:
            got = asyncio.create_task(http.get("/download"))
            await asyncio.to_thread(stream.reading.wait, 10)  # its endpoint ran; its body is being read
            holder = asyncio.create_task(http.get("/busy"))
            async with asyncio.timeout(10):
                fetched = await got
            release.set()
            assert (await holder).status_code == 200
    finally:
        release.set()
        limiter.total_tokens = tokens
    assert fetched.status_code == 200
    assert fetched.content == b"xxxx" * 3
    assert stream.events[-1] == "close"


async def test_an_abandoned_read_finishes_before_the_stream_closes() -> None:
    """Cancelled while a read runs in its thread: the close waits for that read (never a close under it)."""
    stream = Blocks(5)
    stream.gate = threading.Event()

    async def consume() -> None:
        async for _ in read_chunks(stream):
            pass

    task = asyncio.create_task(consume())
    await asyncio.to_thread(stream.reading.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    assert stream.events == []  # the read still waits; nothing closed under it
    stream.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.events == ["read", "close"]


async def test_a_failing_read_raises_and_closes() -> None:
    class Broken(Blocks):
        def read(self, size: int = -1) -> bytes:
            raise OSError("the disk went away")

    stream = Broken(1)
    with pytest.raises(OSError, match="the disk went away"):
        [chunk async for chunk in read_chunks(stream)]
    assert stream.events == ["close"]


async def test_reads_from_a_slow_store_do_not_queue_behind_each_other() -> None:
    """16 downloads whose every read takes 50 ms: reads that waited get threads of their own."""

    class Slow(Blocks):
        def read(self, size: int = -1) -> bytes:
            time.sleep(0.05)
            return super().read(size)

    streams = [Slow(3) for _ in range(16)]

    async def drain(stream: Blocks) -> list[bytes]:
        return [chunk async for chunk in read_chunks(stream)]

    assert await asyncio.gather(*(drain(stream) for stream in streams)) == [[b"xxxx"] * 3] * 16
    threads = {name for stream in streams for name in stream.threads}
    assert len(threads) > 4  # more than the 2 that take quick reads


class Chunky:
    """A stream whose read returns ``value`` once, then ``b""``."""

    def __init__(self, value: Any) -> None:
        self.values = [value, b""]

    def read(self, size: int = -1) -> Any:
        return self.values.pop(0)


async def test_bytearray_and_memoryview_chunks_become_bytes() -> None:
    for value in (bytearray(b"abc"), memoryview(b"abc")):
        chunks = [chunk async for chunk in read_chunks(Chunky(value))]
        assert chunks == [b"abc"]
        assert type(chunks[0]) is bytes


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, r"returned None \(a non-blocking stream"),
        ("text", r"returned str: open the file in binary mode \('rb'\)"),
        (42, "must return bytes, got int"),
    ],
)
async def test_a_read_returning_no_bytes_is_refused(value: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        [chunk async for chunk in read_chunks(Chunky(value))]


@pytest.mark.parametrize(
    ("stream", "size", "error", "message"),
    [
        (b"bytes, not a stream", 4, TypeError, "needs a stream with a read"),
        (Blocks(1), 0, ValueError, "1 byte to 67108864 bytes"),
        (Blocks(1), -5, ValueError, "1 byte to 67108864 bytes"),
        (Blocks(1), MAX_CHUNK_SIZE + 1, ValueError, "1 byte to 67108864 bytes .64 MiB., got 67108865"),
        (Blocks(1), 4.5, TypeError, "must be an int"),
        (Blocks(1), True, TypeError, "must be an int"),
    ],
)
def test_read_chunks_refuses_bad_arguments_before_any_response(
    stream: Any, size: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        read_chunks(stream, size)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_reads_in_threads_of_its_own() -> None:
    """A worker forked after the parent read (gunicorn, uvicorn --workers) starts its own reader threads."""

    async def drain() -> list[bytes]:
        return [chunk async for chunk in read_chunks(Blocks(2))]

    assert asyncio.run(drain()) == [b"xxxx"] * 2
    parent = polydatum.asgi._readers
    assert parent is not None
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only when it made new threads and they read
        try:
            fresh = polydatum.asgi._readers is None and asyncio.run(drain()) == [b"xxxx"] * 2
            os._exit(0 if fresh and polydatum.asgi._readers is not parent else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

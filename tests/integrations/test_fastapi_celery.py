"""The common layout: a FastAPI app and Celery workers sharing one DataManager and one AsyncDatabase.

The web side runs ``async with`` contexts (polydatum.asgi, uvicorn, httpx);
the worker runs ``with`` contexts (polydatum.celery, a real solo worker on
RabbitMQ with Redis results, or eager mode). Both use the same services on
the same PostgreSQL rows.
"""

# No "from __future__ import annotations": FastAPI reads the views' annotations at run time.
import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Annotated, Any

import httpx
import pytest
import uvicorn
from celery import Celery
from celery.result import AsyncResult
from fastapi import Depends, FastAPI
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from polydatum import DataAccessLayer, DataManager
from polydatum.asgi import PolydatumASGIMiddleware, dal_dependency
from polydatum.celery import PendingResult, install
from polydatum.sqlalchemy import AsyncDatabase
from tests.support.celery_worker import close_suite_app, in_thread_worker, suite_app
from tests.support.sql import AsyncItems, Base, Item, Items

# Celery's Redis result backend still calls redis-py's deprecated setex().
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")

WAIT = 20  # seconds; a ceiling for result.get(), never a pass/fail timing


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Serve ``app`` with uvicorn on 127.0.0.1 as a task of this loop; yield a client for it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise AssertionError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            yield http
    finally:
        server.should_exit = True
        await task
        sock.close()


def build_data(url: str) -> SimpleNamespace:
    """What the web app and the workers import: one DataManager, its database and services."""
    dm = DataManager()
    db = AsyncDatabase(url, pool_size=5).install(dm)
    # The same table through a sync store (workers) and an async one (routes).
    dm.register_services(items=Items(), aitems=AsyncItems())
    return SimpleNamespace(dm=dm, db=db)


def add_tasks(app: Celery, data: SimpleNamespace) -> SimpleNamespace:
    """The worker's tasks, run by polydatum.celery in sync contexts of the shared DataManager."""
    install(app, data.dm)

    def dal() -> Any:
        return data.dm.require_active_context().dal

    @app.task(shared=False, name="pdlayout.restock")
    def restock(item_id: int, qty: int) -> dict[str, Any]:
        ctx = data.dm.require_active_context()
        assert isinstance(ctx.db, Session)  # the sync side's session
        item = dal().items.update(item_id, qty=qty)
        return {"qty": item.qty, "version": item.version}

    @app.task(shared=False, name="pdlayout.create")
    def create(name: str) -> int:
        return int(dal().items.create(name=name, qty=7).id)

    return SimpleNamespace(restock=restock, create=create)


def web_app(data: SimpleNamespace, tasks: SimpleNamespace) -> FastAPI:
    """The FastAPI app: each request in an async context of the shared DataManager."""
    app = FastAPI()
    app.add_middleware(PolydatumASGIMiddleware, data_manager=data.dm)
    Dal = Annotated[DataAccessLayer, Depends(dal_dependency(data.dm))]

    @app.post("/items/{name}", status_code=201)
    async def create(name: str, dal: Dal) -> Any:
        item = await dal.aitems.create(name=name, qty=0)
        sent = tasks.restock.delay(item.id, 5)  # sent when this request's context commits
        return {"id": item.id, "task": sent.id, "pending": isinstance(sent, PendingResult)}

    @app.get("/items/{item_id}")
    async def read(item_id: int, dal: Dal) -> Any:
        item = await dal.aitems.require(item_id)
        return {"name": item.name, "qty": item.qty, "version": item.version}

    return app


@pytest.fixture(name="pg_url", scope="module")
def fixture_pg_url(pg_url: str) -> str:
    """This module's PostgreSQL database (tests/integrations/conftest.py), with the test tables."""
    engine = create_engine(pg_url, poolclass=NullPool)
    Base.metadata.create_all(engine)
    engine.dispose()
    return pg_url


@pytest.fixture(name="layout", scope="module")
def fixture_layout(pg_url: str, rabbitmq_url: str, redis_url: str) -> Iterator[SimpleNamespace]:
    """The shared data layer, a Celery app with a real solo worker, and the FastAPI app."""
    run = uuid.uuid4().hex[:10]
    queue = f"polydatum-test-layout-{run}"
    data = build_data(pg_url)
    app = suite_app("polydatum_layout_tests", rabbitmq_url, redis_url, queue, f"{queue}:")
    tasks = add_tasks(app, data)
    try:
        with in_thread_worker(app):
            yield SimpleNamespace(data=data, app=app, tasks=tasks, web=web_app(data, tasks))
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        close_suite_app(app)
        asyncio.run(data.db.dispose())


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def result_of(app: Celery, task_id: str) -> Any:
    """The task's return value, waited for in a thread so that the event loop keeps serving."""
    return await asyncio.to_thread(AsyncResult(task_id, app=app).get, timeout=WAIT)


async def test_a_route_writes_and_the_worker_updates_the_same_row(layout: SimpleNamespace) -> None:
    """A FastAPI route creates a row and sends a task on commit; the worker updates it; the route reads it."""
    name = unique("web")
    async with serve(layout.web) as http:
        made = await http.post(f"/items/{name}")
        assert made.status_code == 201, made.text
        assert made.json()["pending"] is True  # sent on commit, not before
        done = await result_of(layout.app, made.json()["task"])
        got = await http.get(f"/items/{made.json()['id']}")
    assert done == {"qty": 5, "version": 2}
    assert got.json() == {"name": name, "qty": 5, "version": 2}


async def test_the_worker_writes_and_a_route_reads(layout: SimpleNamespace) -> None:
    """A row the worker's sync context committed is read by a FastAPI route's async context."""
    name = unique("worker")
    sent = await asyncio.to_thread(layout.tasks.create.delay, name)  # no context: sent at once
    item_id = await result_of(layout.app, sent.id)
    async with serve(layout.web) as http:
        got = await http.get(f"/items/{item_id}")
    assert got.json() == {"name": name, "qty": 7, "version": 1}


async def test_both_sides_return_their_connections(layout: SimpleNamespace) -> None:
    """After requests and tasks, neither the async nor the sync pool has a connection checked out."""
    async with serve(layout.web) as http:
        made = await http.post(f"/items/{unique('pools')}")
        await result_of(layout.app, made.json()["task"])
    db = layout.data.db
    assert db.engine.pool.checkedout() == 0
    assert db.sync.engine.pool.checkedout() == 0


# -- eager mode ----------------------------------------------------------------


@pytest.fixture(name="eager")
def fixture_eager(pg_url: str) -> Iterator[SimpleNamespace]:
    """The same layout with Celery in eager mode: tasks run in the sending process."""
    data = build_data(pg_url)
    app = Celery("polydatum_layout_eager", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, task_store_eager_result=False)
    tasks = add_tasks(app, data)
    yield SimpleNamespace(data=data, app=app, tasks=tasks, web=web_app(data, tasks))
    asyncio.run(data.db.dispose())


def test_eager_tasks_run_in_sync_contexts(eager: SimpleNamespace) -> None:
    """In eager mode a task sent outside any context runs at once, on the sync side."""
    name = unique("eager")
    item_id = eager.tasks.create.delay(name).get()
    assert eager.tasks.restock.delay(item_id, 9).get() == {"qty": 9, "version": 2}
    with eager.data.db.sync.session() as session:
        assert session.scalars(select(Item.qty).where(Item.name == name)).one() == 9


async def test_eager_task_sent_from_a_route_runs_after_its_commit(eager: SimpleNamespace) -> None:
    """A route's task runs eagerly once the request's async context committed, and sees its row."""
    name = unique("eager-web")
    async with serve(eager.web) as http:
        made = await http.post(f"/items/{name}")
        assert made.status_code == 201, made.text
        got = await http.get(f"/items/{made.json()['id']}")
    assert got.json() == {"name": name, "qty": 5, "version": 2}

"""Read replicas: routing, read-your-writes, health, on a private primary with two streaming replicas."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from polydatum import DataManager, _positions
from polydatum.asgi import PolydatumASGIMiddleware, commit_in_endpoint
from polydatum.sqlalchemy import (
    AsyncDatabase,
    Database,
    ReplicaMismatch,
    Store,
    read_only,
    use_primary,
)
from polydatum.werkzeug import PolydatumWSGIMiddleware, request_context
from tests.support.replication import ReplicatedPostgres

RUN = uuid.uuid4().hex[:8]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = f"replica_items_{RUN}"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Items(Store[Item]):
    pass


@pytest.fixture(name="rig", scope="module")
def fixture_rig() -> Iterator[ReplicatedPostgres]:
    """A primary and two streaming replicas for the whole module, with the table made and replayed."""
    rig = ReplicatedPostgres(replicas=2).start()
    try:
        db = Database(rig.primary.url)
        Base.metadata.create_all(db.engine)
        db.dispose()
        position = rig.primary.sql("SELECT pg_current_wal_lsn()::text")
        for node in rig.replicas:
            rig.wait_replayed(node, position)
        yield rig
    finally:
        rig.close()


@pytest.fixture(autouse=True)
def _replay_resumed(rig: ReplicatedPostgres) -> Iterator[None]:
    """Every test starts and ends with both replicas replaying."""
    yield
    for node in rig.replicas:
        node.sql("SELECT pg_wal_replay_resume()")


def ports(rig: ReplicatedPostgres) -> dict[int, str]:
    return {node.port: node.name for node in rig.nodes}


def node_of(session: Session, rig: ReplicatedPostgres) -> str:
    """The node that serves ``session``'s next SELECT (asked with a SELECT, so it routes as one)."""
    port = session.execute(select(func.inet_server_port())).scalar_one()
    return ports(rig)[port]


def pause_replay(rig: ReplicatedPostgres) -> None:
    for node in rig.replicas:
        node.sql("SELECT pg_wal_replay_pause()")


@pytest.fixture(name="setup")
def fixture_setup(rig: ReplicatedPostgres) -> Iterator[tuple[Database, DataManager]]:
    """A Database with both replicas, installed as ``db`` with the ``items`` store."""
    db = Database(rig.primary.url, replicas=[node.url for node in rig.replicas], max_lag=30)
    dm = DataManager()
    db.install(dm)
    dm.register_services(items=Items())
    try:
        yield db, dm
    finally:
        db.dispose()


class TestRouting:
    def test_reads_go_to_a_replica_until_the_first_write(
        self, rig: ReplicatedPostgres, setup: tuple[Database, DataManager]
    ) -> None:
        """A context reads from a replica; after its first write, reads and writes go to the primary."""
        _, dm = setup
        with dm.context() as ctx:
            first = node_of(ctx.db, rig)
            assert first.startswith("replica")
            assert node_of(ctx.db, rig) == first  # the same replica all context long
            item = ctx.dal.items.create(name="a")
            assert node_of(ctx.db, rig) == "primary"
            assert ctx.dal.items.get(item.id) is item

    def test_autoflush_is_a_write(self, rig: ReplicatedPostgres, setup: tuple[Database, DataManager]) -> None:
        """A pending object is flushed to the primary by the next query, which then reads it there."""
        _, dm = setup
        with dm.context() as ctx:
            ctx.db.add(Item(name="pending"))
            found = ctx.db.scalars(select(Item).where(Item.name == "pending")).all()
            assert [i.name for i in found] == ["pending"]
            assert node_of(ctx.db, rig) == "primary"

    def test_a_transaction_begun_on_a_replica_then_writes_to_the_primary(
        self, rig: ReplicatedPostgres, setup: tuple[Database, DataManager]
    ) -> None:
        """Reads that began a transaction on a replica leave the write to commit on the primary."""
        db, dm = setup
        with dm.context() as ctx:
            assert node_of(ctx.db, rig).startswith("replica")
            item = ctx.dal.items.create(name="after-read")
        with Session(db.engine) as plain:
            assert plain.get(Item, item.id) is not None

    def test_use_primary_sends_reads_to_the_primary(
        self, rig: ReplicatedPostgres, setup: tuple[Database, DataManager]
    ) -> None:
        """ctx.db.use_primary() before any write routes the context's reads to the primary."""
        _, dm = setup
        with dm.context() as ctx:
            ctx.db.use_primary()
            assert node_of(ctx.db, rig) == "primary"
        assert dm.get_active_context() is None

    def test_raw_sql_goes_to_the_primary(
        self, rig: ReplicatedPostgres, setup: tuple[Database, DataManager]
    ) -> None:
        """text() may write, so it runs on the primary, and so does everything after it."""
        _, dm = setup
        with dm.context() as ctx:
            assert ctx.db.execute(text("SELECT pg_is_in_recovery()")).scalar_one() is False
            assert node_of(ctx.db, rig) == "primary"

    def test_read_only_contexts_stay_on_replicas(
        self, rig: ReplicatedPostgres, setup: tuple[Database, DataManager]
    ) -> None:
        """A read_only(session) context reads from a replica and refuses to write."""
        _, dm = setup
        with dm.context() as ctx:
            read_only(ctx.db)
            use_primary(ctx.db)  # no effect on a read-only session
            assert node_of(ctx.db, rig).startswith("replica")

    def test_reads_are_spread_over_both_replicas(
        self, rig: ReplicatedPostgres, setup: tuple[Database, DataManager]
    ) -> None:
        """Contexts that only read take the replicas in turn."""
        _, dm = setup
        seen: Counter[str] = Counter()
        for _ in range(40):
            with dm.context() as ctx:
                seen[node_of(ctx.db, rig)] += 1
        # Round robin: an even split, give or take a context skipped by a health check.
        assert sum(seen.values()) == 40
        assert seen["replica1"] >= 18
        assert seen["replica2"] >= 18

    def test_without_replicas_everything_goes_to_the_primary(self, rig: ReplicatedPostgres) -> None:
        """A Database without replicas routes nothing; use_primary() is a harmless no-op."""
        db = Database(rig.primary.url)
        try:
            with db.session() as session:
                use_primary(session)
                assert node_of(session, rig) == "primary"
            assert db.committed_position(DataManager().context()) is None
            assert [status.name for status in db.health()] == ["primary"]
        finally:
            db.dispose()


class TestReadYourWrites:
    def test_committed_position_is_none_without_a_write(self, setup: tuple[Database, DataManager]) -> None:
        """A context that only read, or used the primary without writing, has no position."""
        db, dm = setup
        with dm.context() as ctx:
            ctx.dal.items.get(1)
            ctx.db.use_primary()
            ctx.dal.items.get(1)
        assert db.committed_position(ctx) is None

    def test_min_position_never_reads_stale(
        self, rig: ReplicatedPostgres, setup: tuple[Database, DataManager]
    ) -> None:
        """With replay paused, a context given the writer's position reads the row; one without may not."""
        db, dm = setup
        pause_replay(rig)
        with dm.context() as ctx:
            item = ctx.dal.items.create(name="ryw")
        position = db.committed_position(ctx)
        assert position is not None
        _positions.lsn(position)
        with dm.context() as ctx:
            assert node_of(ctx.db, rig).startswith("replica")
            assert ctx.dal.items.get(item.id) is None  # the replicas really are behind
        with dm.context({"min_position": {"db": position}}) as ctx:
            assert ctx.dal.items.require(item.id).name == "ryw"
            assert node_of(ctx.db, rig) == "primary"
        for node in rig.replicas:
            node.sql("SELECT pg_wal_replay_resume()")
            rig.wait_replayed(node, position)
        with dm.context({"min_position": {"db": position}}) as ctx:
            assert node_of(ctx.db, rig).startswith("replica")
            assert ctx.dal.items.require(item.id).name == "ryw"

    def test_a_bad_min_position_in_meta_is_refused(self, setup: tuple[Database, DataManager]) -> None:
        """Meta min_position that is not {name: 'X/X'} fails the first use of the session, saying so."""
        _, dm = setup
        with (
            pytest.raises(ValueError, match="WAL LSN"),
            dm.context({"min_position": {"db": "1; DROP"}}) as ctx,
        ):
            assert ctx.db is None  # creating the session reads the meta and raises
        with pytest.raises(TypeError, match="mapping"), dm.context({"min_position": "0/1"}) as ctx:
            assert ctx.db is None

    @pytest.mark.parametrize("mode", ["cookie", "header"])
    def test_wsgi_carries_the_position_to_the_next_request(
        self, rig: ReplicatedPostgres, setup: tuple[Database, DataManager], mode: str
    ) -> None:
        """A request that wrote returns its position; the next request sends it back and reads its write."""
        _, dm = setup

        @Request.application
        def app(request: Request) -> Response:
            dal = request_context().dal
            if request.method == "POST":
                return Response(str(dal.items.create(name=request.args["name"]).id))
            item = dal.items.get(int(request.args["id"]))
            return Response("missing" if item is None else item.name)

        client = Client(PolydatumWSGIMiddleware(app, dm, positions=mode))
        pause_replay(rig)
        created = client.post(f"/?name=w-{mode}")
        item_id = created.get_data(as_text=True)
        if mode == "cookie":
            assert "polydatum_position=db=" in created.headers["Set-Cookie"]
            assert "HttpOnly" in created.headers["Set-Cookie"]
            read = client.get(f"/?id={item_id}")
        else:
            value = created.headers["X-Polydatum-Position"]
            assert set(_positions.decode(value)) == {"db"}
            read = client.get(f"/?id={item_id}", headers={"X-Polydatum-Position": value})
            stale = client.get(f"/?id={item_id}")  # a client that drops the header may read stale
            assert stale.get_data(as_text=True) == "missing"
        assert read.get_data(as_text=True) == f"w-{mode}"
        assert "X-Polydatum-Position" not in read.headers  # a read gives no new position

    def test_asgi_carries_the_position_in_a_header(
        self, rig: ReplicatedPostgres, setup: tuple[Database, DataManager]
    ) -> None:
        """The ASGI middleware returns the position of a write and applies it to the next request."""
        _, dm = setup

        async def create(request: StarletteRequest) -> PlainTextResponse:
            ctx = dm.require_active_context()
            return PlainTextResponse(str(ctx.dal.items.create(name="asgi").id))

        async def show(request: StarletteRequest) -> PlainTextResponse:
            ctx = dm.require_active_context()
            assert ctx.meta.min_position is not None
            item = ctx.dal.items.get(int(request.path_params["id"]))
            return PlainTextResponse("missing" if item is None else item.name)

        app = Starlette(routes=[Route("/", create, methods=["POST"]), Route("/{id:int}", show)])
        wrapped = PolydatumASGIMiddleware(app, dm, positions="header")

        async def run() -> tuple[str, str]:
            transport = httpx.ASGITransport(app=wrapped)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                created = await client.post("/")
                value = created.headers["x-polydatum-position"]
                read = await client.get(f"/{created.text}", headers={"x-polydatum-position": value})
                return value, read.text

        pause_replay(rig)
        value, body = asyncio.run(run())
        assert set(_positions.decode(value)) == {"db"}
        assert body == "asgi"

    def test_a_commit_in_the_endpoint_gives_its_position(
        self, rig: ReplicatedPostgres, setup: tuple[Database, DataManager]
    ) -> None:
        """A ``def`` endpoint under commit_in_endpoint: the header carries the endpoint's own commit."""
        _, dm = setup

        @commit_in_endpoint
        def create(request: StarletteRequest) -> PlainTextResponse:
            return PlainTextResponse(str(dm.require_active_context().dal.items.create(name="in-endpoint").id))

        @commit_in_endpoint
        def show(request: StarletteRequest) -> PlainTextResponse:
            item = dm.require_active_context().dal.items.get(int(request.path_params["id"]))
            return PlainTextResponse("missing" if item is None else item.name)

        app = Starlette(routes=[Route("/", create, methods=["POST"]), Route("/{id:int}", show)])
        wrapped = PolydatumASGIMiddleware(app, dm, positions="header")

        async def run() -> tuple[str, str, str]:
            transport = httpx.ASGITransport(app=wrapped)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                created = await client.post("/")
                value = created.headers["x-polydatum-position"]
                read = await client.get(f"/{created.text}", headers={"x-polydatum-position": value})
                stale = await client.get(f"/{created.text}")
                return value, read.text, stale.text

        pause_replay(rig)
        value, body, stale = asyncio.run(run())
        assert set(_positions.decode(value)) == {"db"}
        assert body == "in-endpoint"  # read where the write is (the primary, or a replica caught up)
        assert stale == "missing"  # without the header, a paused replica

    @pytest.mark.parametrize(
        "hostile",
        [
            "db=0/16B3748'; DROP TABLE x --",
            "db=GG/1",
            "db=123456789/1",
            "db=0/1|db=0/2",
            "1db=0/1",
            "db0/1",
            "|".join(f"d{i}=0/1" for i in range(9)),
            "x" * 5000,
            "db=0/1\r\nSet-Cookie: a=b",
            "",
        ],
    )
    def test_a_hostile_client_value_is_ignored(
        self, setup: tuple[Database, DataManager], hostile: str
    ) -> None:
        """A malformed client position never reaches meta or SQL: the request runs as if it sent none."""
        _, dm = setup
        with pytest.raises(ValueError, match=r"position|LSN|database name"):
            _positions.decode(hostile)

        @Request.application
        def app(request: Request) -> Response:
            return Response(repr(request_context().meta.min_position))

        client = Client(PolydatumWSGIMiddleware(app, dm, positions="header"))
        headers = {"X-Polydatum-Position": hostile} if "\r" not in hostile else {}
        assert client.get("/", headers=headers).get_data(as_text=True) == "None"

    def test_positions_argument_is_checked(self, setup: tuple[Database, DataManager]) -> None:
        """positions= other than 'cookie', 'header' or None is refused when the middleware is made."""
        _, dm = setup
        with pytest.raises(ValueError, match="'cookie', 'header' or None"):
            PolydatumWSGIMiddleware(lambda e, s: [], dm, positions="query")

    def test_async_database_routes_and_records_positions(self, rig: ReplicatedPostgres) -> None:
        """AsyncDatabase reads from a replica until its first write and records the commit position."""

        async def run() -> tuple[str, str, str | None, list[bool]]:
            adb = AsyncDatabase(rig.primary.url, replicas=[node.url for node in rig.replicas])
            dm = DataManager()
            adb.install(dm)
            port_of = {node.port: node.name for node in rig.nodes}
            try:
                async with dm.context() as ctx:
                    session = await ctx.aget("db")
                    before = port_of[(await session.execute(select(func.inet_server_port()))).scalar_one()]
                    session.add(Item(name="async"))
                    await session.flush()
                    after = port_of[(await session.execute(select(func.inet_server_port()))).scalar_one()]
                report = await adb.health()
                return before, after, adb.committed_position(ctx), [status.ok for status in report]
            finally:
                await adb.dispose()

        before, after, position, report = asyncio.run(run())
        assert before.startswith("replica")
        assert after == "primary"
        assert position is not None
        assert report == [True, True, True]


class TestHealth:
    def test_a_lagging_replica_is_skipped(self, rig: ReplicatedPostgres) -> None:
        """A replica further behind than max_lag gets no reads, and health() says why."""
        db = Database(rig.primary.url, replicas=[rig.replicas[0].url], max_lag=0.2, check_interval=0.05)
        dm = DataManager()
        db.install(dm)
        dm.register_services(items=Items())
        try:
            rig.replicas[0].sql("SELECT pg_wal_replay_pause()")
            with dm.context() as ctx:
                ctx.dal.items.create(name="lag")
            time.sleep(0.4)  # the replay timestamp ages past max_lag
            with dm.context() as ctx:
                assert node_of(ctx.db, rig) == "primary"
            replica = db.health()[1]
            assert not replica.ok
            assert "lagging" in replica.detail
        finally:
            db.dispose()

    @pytest.mark.parametrize("bad", [0, -1, 0.0, float("nan")])
    def test_max_lag_of_zero_or_less_is_refused(self, rig: ReplicatedPostgres, bad: float) -> None:
        """max_lag <= 0 (or NaN) is refused with a message saying why."""
        with pytest.raises(ValueError, match="max_lag must be more than 0"):
            Database(rig.primary.url, replicas=[rig.replicas[0].url], max_lag=bad)

    def test_settings_must_be_numbers(self, rig: ReplicatedPostgres) -> None:
        """A health setting that is not a number is a TypeError naming it."""
        with pytest.raises(TypeError, match="check_interval must be a number"):
            Database(rig.primary.url, check_interval="fast")  # type: ignore[arg-type]

    def test_replicas_must_be_a_list_of_postgresql_urls(self, rig: ReplicatedPostgres, tmp_path: Any) -> None:
        """One URL string, or a SQLite replica, is refused at start."""
        with pytest.raises(TypeError, match="wrap it in"):
            Database(rig.primary.url, replicas=rig.replicas[0].url)
        with pytest.raises(ValueError, match="PostgreSQL streaming standbys"):
            Database(rig.primary.url, replicas=[f"sqlite:///{tmp_path}/x.db"])

    def test_a_replica_of_another_cluster_is_refused_at_start(
        self, rig: ReplicatedPostgres, postgres_url: str
    ) -> None:
        """A replica URL naming another server (another system identifier) is refused at start."""
        with pytest.raises(ReplicaMismatch, match="not a replica of the primary") as info:
            Database(rig.primary.url, replicas=[rig.replicas[0].url, postgres_url])
        assert "system identifier" in str(info.value)
        assert "replica 2" in str(info.value)
        with pytest.raises(ReplicaMismatch):
            AsyncDatabase(rig.primary.url, replicas=[postgres_url])

    def test_a_replica_killed_under_load(self, rig: ReplicatedPostgres) -> None:
        """Killing a replica fails at most the reads in flight; later reads go to the other replica."""
        victim = rig.replicas[0]
        db = Database(
            rig.primary.url, replicas=[node.url for node in rig.replicas], check_interval=0.05, retry_after=30
        )
        dm = DataManager()
        db.install(dm)
        stop = threading.Event()
        errors: list[BaseException] = []
        after: Counter[str] = Counter()
        killed = threading.Event()
        workers = 4

        def reader() -> None:
            while not stop.is_set():
                was_killed = killed.is_set()
                try:
                    with dm.context() as ctx:
                        where = node_of(ctx.db, rig)
                except Exception as exc:  # counted and asserted on below
                    errors.append(exc)
                    continue
                if was_killed:
                    after[where] += 1

        threads = [threading.Thread(target=reader) for _ in range(workers)]
        try:
            for thread in threads:
                thread.start()
            time.sleep(0.5)
            victim.kill()
            killed.set()
            time.sleep(1.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
            db.dispose()
            victim.start()
        assert len(errors) <= workers  # only requests in flight at the kill
        assert after["replica2"] > 0
        assert after["replica1"] == 0
        rig.wait_streaming()

    def test_a_restarted_replica_with_nothing_to_replay_is_not_lagging(self, rig: ReplicatedPostgres) -> None:
        """Restarted, caught up and idle: lag 0, not the time since the last replayed transaction.

        After a restart the replica's receive position starts at a segment
        boundary, behind what it replayed; that used to count as lagging.
        """
        victim = rig.replicas[0]
        victim.kill()
        victim.start()
        rig.wait_streaming()
        db = Database(rig.primary.url, replicas=[node.url for node in rig.replicas], max_lag=0.5)
        try:
            time.sleep(1.0)  # longer than max_lag, without a write
            report = db.health()
            assert [(s.name, s.ok) for s in report] == [
                ("primary", True),
                ("replica 1", True),
                ("replica 2", True),
            ], [s.detail for s in report]
            assert report[1].lag == 0
        finally:
            db.dispose()

    def test_check_reports_every_node(self, setup: tuple[Database, DataManager]) -> None:
        """health() checks each replica now and reports name, role, state, lag and position."""
        db, _ = setup
        report = db.health()
        assert [(s.name, s.role, s.ok) for s in report] == [
            ("primary", "primary", True),
            ("replica 1", "replica", True),
            ("replica 2", "replica", True),
        ]
        assert all(s.position is not None and s.lag is not None for s in report[1:])


@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
class TestCelery:
    def test_a_task_never_reads_older_data_than_its_sender_wrote(
        self, rig: ReplicatedPostgres, rabbitmq_url: str, redis_url: str
    ) -> None:
        """With replay paused, a task sent by a writing context reads that write (from the primary)."""
        from polydatum.celery import POSITION_HEADER, install
        from tests.support.celery_worker import close_suite_app, in_thread_worker, suite_app

        db = Database(rig.primary.url, replicas=[node.url for node in rig.replicas])
        dm = DataManager()
        db.install(dm)
        dm.register_services(items=Items())
        queue = f"polydatum-test-replicas-{RUN}"
        app = suite_app("polydatum_replica_tests", rabbitmq_url, redis_url, queue, f"{queue}:")
        install(app, dm)

        @app.task(shared=False, name="pdtest.replicas.read_item")
        def read_item(item_id: int) -> dict[str, Any]:
            ctx = dm.require_active_context()
            item = ctx.dal.items.get(item_id)
            return {
                "name": None if item is None else item.name,
                "min_position": dict(ctx.meta.min_position or {}),
                "node": node_of(ctx.db, rig),
            }

        try:
            with in_thread_worker(app):
                pause_replay(rig)
                with dm.context() as ctx:
                    item = ctx.dal.items.create(name="for-the-task")
                    result = read_item.delay(item.id)
                seen = result.get(timeout=30)
                # A task sent from a context that only read carries the meta it was given.
                with dm.context({"min_position": {"db": db.committed_position(ctx)}}):
                    again = read_item.delay(item.id)
                seen_again = again.get(timeout=30)
        finally:
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
            close_suite_app(app)
            db.dispose()
        assert seen == {
            "name": "for-the-task",
            "min_position": {"db": db.committed_position(ctx)},
            "node": "primary",
        }
        assert seen_again["name"] == "for-the-task"
        assert POSITION_HEADER == "polydatum_min_position"

    def test_a_task_sent_through_the_outbox_reads_its_senders_write(
        self, rig: ReplicatedPostgres, rabbitmq_url: str, redis_url: str
    ) -> None:
        """Through the outbox, a task is sent after its context's commit and reads that commit.

        The message is stored before the commit, so it cannot hold the commit's
        position; the delivery adds the primary's position at send time, which
        is past it. With replay paused the task must then read the primary.
        """
        from polydatum.celery import install
        from polydatum.outbox import Outbox
        from tests.support.celery_worker import close_suite_app, in_thread_worker, suite_app

        db = Database(rig.primary.url, replicas=[node.url for node in rig.replicas])
        dm = DataManager()
        db.install(dm)
        dm.register_services(items=Items())
        outbox = Outbox(db, table=f"polydatum_outbox_{RUN}")
        outbox.create_table()
        outbox.install(dm)
        queue = f"polydatum-test-replicas-outbox-{RUN}"
        app = suite_app("polydatum_replica_outbox_tests", rabbitmq_url, redis_url, queue, f"{queue}:")
        install(app, dm, outbox=outbox)

        @app.task(shared=False, name="pdtest.replicas.read_item_sent_late")
        def read_item(item_id: int) -> dict[str, Any]:
            ctx = dm.require_active_context()
            item = ctx.dal.items.get(item_id)
            return {"name": None if item is None else item.name, "node": node_of(ctx.db, rig)}

        try:
            with in_thread_worker(app):
                pause_replay(rig)
                with dm.context() as ctx:
                    item = ctx.dal.items.create(name="for-the-late-task")
                    result = read_item.delay(item.id)
                seen = result.get(timeout=30)
                committed = db.committed_position(ctx)
                now = db.current_positions()
        finally:
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
            close_suite_app(app)
            outbox.flush()
            db.dispose()
        assert seen == {"name": "for-the-late-task", "node": "primary"}
        assert committed is not None
        assert set(now) == {"db"}
        assert _positions.lsn(now["db"]) >= _positions.lsn(committed)
        plain = Database(rig.primary.url)
        plain.install(DataManager())
        try:
            assert plain.current_positions() == {}  # without replicas there is nothing to wait for
        finally:
            plain.dispose()

    def test_a_forged_position_header_is_refused(self, rig: ReplicatedPostgres) -> None:
        """A message whose position header is not name=X/X pairs fails before the task body runs."""
        from celery import Celery

        from polydatum.celery import POSITION_HEADER, install
        from polydatum.errors import InvalidInput

        dm = DataManager()
        app = Celery("polydatum_replica_forged", set_as_current=False)
        app.conf.update(task_always_eager=True, task_eager_propagates=True)
        install(app, dm)
        ran: list[int] = []

        @app.task(shared=False, name="pdtest.replicas.forged")
        def forged() -> None:
            ran.append(1)

        with pytest.raises(InvalidInput, match="forged"):
            forged.apply(headers={POSITION_HEADER: "db=0/1'; DROP"})
        assert ran == []
        forged.apply(headers={POSITION_HEADER: "db=0/1"}).get()
        assert ran == [1]
        app.close()


def test_the_example_health_reports_each_node(
    rig: ReplicatedPostgres, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notes example with DATABASE_REPLICAS lists every node in its health report (/health)."""
    # The example is a package of its own, used from the checkout (as tests/examples do).
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples" / "notes"))
    from notes.app import build
    from notes.config import Settings

    settings = Settings.from_env(
        {
            "NOTES_DATA": str(tmp_path),
            "DATABASE_URL": rig.primary.url,
            "DATABASE_REPLICAS": ",".join(node.url for node in rig.replicas),
        }
    )
    app = build(settings)
    try:
        database = app.health()["database"]
        assert database["ok"] is True
        assert [(n["name"], n["ok"]) for n in database["nodes"]] == [
            ("primary", True),
            ("replica 1", True),
            ("replica 2", True),
        ]
    finally:
        app.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_opens_replica_connections_of_its_own(
    rig: ReplicatedPostgres, setup: tuple[Database, DataManager]
) -> None:
    """After fork, the child's replica pools start empty: it never reuses the parent's sockets."""
    db, dm = setup
    for _ in range(2):
        with dm.context() as ctx:
            node_of(ctx.db, rig)
    assert db.router is not None
    assert sum(node.engine.pool.checkedin() for node in db.router.nodes) == 2
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            pooled = [node.engine.pool.checkedin() for node in db.router.nodes]
            with dm.context() as ctx:
                where = node_of(ctx.db, rig)
            report: dict[str, Any] = {"pooled": pooled, "where": where}
            code = 0
        except BaseException as exc:  # reported to the parent through the pipe
            report = {"error": repr(exc)}
        os.write(write_end, json.dumps(report).encode())
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        report = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert report["pooled"] == [0, 0]
    assert report["where"].startswith("replica")


def test_store_writes_read_their_row_from_the_primary(
    rig: ReplicatedPostgres, setup: tuple[Database, DataManager]
) -> None:
    """Store.update and Store.delete find a row the replicas have not replayed yet."""
    _, dm = setup
    pause_replay(rig)
    with dm.context() as ctx:
        item = ctx.dal.items.create(name="fresh")
    with dm.context() as ctx:
        assert ctx.dal.items.get(item.id) is None  # a plain read: the replica, behind
    with dm.context() as ctx:
        assert ctx.dal.items.update(item.id, name="renamed").name == "renamed"
    with dm.context() as ctx:
        assert ctx.dal.items.delete(item.id) is True

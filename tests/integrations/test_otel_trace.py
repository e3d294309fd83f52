"""One trace from a web request to the Celery task it sent, read back from the real SDK.

The request goes through opentelemetry-instrumentation-wsgi and polydatum's
WSGI middleware; the DAL call INSERTs through opentelemetry-instrumentation-
sqlalchemy, invalidates a Redis cache key (opentelemetry-instrumentation-redis)
and sends a task, published at commit; a real worker (RabbitMQ broker) runs it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from sqlalchemy import text
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from polydatum import DataManager, Service
from polydatum.celery import install
from polydatum.otel import instrument
from polydatum.outbox import Outbox
from polydatum.redis import Redis
from polydatum.sqlalchemy import Database
from polydatum.werkzeug import PolydatumWSGIMiddleware
from tests.support.celery_worker import close_suite_app, in_thread_worker, suite_app
from tests.support.otel import Telemetry, in_memory_telemetry
from tests.support.outbox import flush_outboxes  # noqa: F401  # autouse

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")

WAIT = 30  # seconds; a ceiling for waiting, never a pass/fail timing


def tree(spans: list[ReadableSpan], root: ReadableSpan) -> str:
    """The spans under ``root`` as an indented text tree, children in start order."""
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        children.setdefault(span.parent.span_id if span.parent else None, []).append(span)
    lines: list[str] = []

    def walk(span: ReadableSpan, depth: int) -> None:
        lines.append("    " * depth + span.name)
        for child in sorted(children.get(span.context.span_id, []), key=lambda s: s.start_time or 0):
            walk(child, depth + 1)

    walk(root, 0)
    return "\n".join(lines)


@pytest.fixture(name="env", params=["direct", "outbox"])
def fixture_env(
    request: pytest.FixtureRequest, tmp_path: Path, rabbitmq_url: str, redis_url: str
) -> Iterator[SimpleNamespace]:
    """An instrumented notes app (SQLite, a Redis cache, Celery) with a worker; sends direct or by outbox."""
    run = uuid.uuid4().hex[:10]
    dm = DataManager()
    db = Database(f"sqlite:///{tmp_path / 'notes.db'}").install(dm)
    with db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"))
    redis = Redis(redis_url)
    cache = redis.cache(namespace=f"otel-trace-{run}")
    cache.install(dm, name="cache")
    outbox = None
    if request.param == "outbox":
        outbox = Outbox(db).install(dm)
        outbox.create_table()
    app = suite_app(
        "polydatum_otel_tests", rabbitmq_url, redis_url, f"polydatum-test-otel-{run}", f"pd-otel-{run}:"
    )
    install(app, dm, outbox=outbox)

    @app.task(shared=False, name="notes.notify")
    def notify(note_id: int) -> int:
        return dm.require_active_context().dal.notes.body(note_id) and note_id

    class Notes(Service):
        def add(self, body: str) -> int:
            ctx = self._ctx
            note_id = ctx.db.execute(
                text("INSERT INTO notes (body) VALUES (:b) RETURNING id"), {"b": body}
            ).scalar()
            ctx.cache.invalidate("notes:count")
            notify.delay(note_id)
            return int(note_id)

        def body(self, note_id: int) -> str:
            return str(
                self._ctx.db.execute(text("SELECT body FROM notes WHERE id = :i"), {"i": note_id}).scalar()
            )

    dm.register_services(notes=Notes())

    def view(environ: Any, start_response: Any) -> Any:
        note_id = dm.require_active_context().dal.notes.add(Request(environ).args["body"])
        return Response(str(note_id))(environ, start_response)

    with in_memory_telemetry() as telemetry:
        sql, redis_instrumentor = SQLAlchemyInstrumentor(), RedisInstrumentor()
        # Its declared range stops below SQLAlchemy 2.1, which it instruments fine: skip that check.
        sql.instrument(engine=db.engine, tracer_provider=telemetry.tracer_provider, skip_dep_check=True)
        redis_instrumentor.instrument(tracer_provider=telemetry.tracer_provider)
        wsgi = OpenTelemetryMiddleware(
            PolydatumWSGIMiddleware(view, dm), tracer_provider=telemetry.tracer_provider
        )
        try:
            with instrument(dm, telemetry.tracer_provider, telemetry.meter_provider), in_thread_worker(app):
                yield SimpleNamespace(
                    client=Client(wsgi), telemetry=telemetry, notify=notify, mode=request.param
                )
        finally:
            redis_instrumentor.uninstrument()
            sql.uninstrument()
            cache.clear()
            redis.close()
            close_suite_app(app)
            db.dispose()


def test_one_request_and_the_task_it_sent_are_one_trace(env: SimpleNamespace) -> None:
    """The request's spans read WSGI > context > notes.add > INSERT, then the cache delete and the publish
    (at commit), and the worker's task context is in the same trace, a child of the publish span."""
    telemetry: Telemetry = env.telemetry
    response = env.client.get("/notes?body=hello")
    assert response.status_code == 200
    note_id = int(response.get_data(as_text=True))
    task_spans = _wait_for(telemetry, "notes.notify")
    spans = telemetry.spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    (task,) = task_spans
    publish = telemetry.span("notes.notify publish")
    (context,) = [s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id]
    assert task.context.trace_id == server.context.trace_id
    assert publish.kind is SpanKind.PRODUCER
    assert task.parent is not None
    assert task.parent.span_id == publish.context.span_id
    assert context.attributes is not None
    assert context.attributes["polydatum.outcome"] == "commit"
    assert task.attributes is not None
    assert task.attributes["polydatum.outcome"] == "commit"
    assert note_id > 0
    # SQL spans are named "<verb> <database>"; the database is a temporary path here.
    text_tree = "\n".join(re.sub(r" /\S+\.db$", "", line) for line in tree(spans, server).splitlines())
    print(text_tree)  # the guide's trees come from here (pytest -s)
    assert text_tree == (DIRECT if env.mode == "direct" else THROUGH_OUTBOX), text_tree


# Sent at commit: the publish span is a child of the context's span.
DIRECT = """\
GET /notes
    GET
        notes.add
            connect
            BEGIN
            INSERT
        UNLINK
        notes.notify publish
            notes.notify
                notes.body
                    connect
                    BEGIN
                    SELECT"""

# Through the outbox the message is a row INSERTed with the note, carrying the
# trace context of the DAL call that sent it: the relay's publish is its child.
THROUGH_OUTBOX = """\
GET /notes
    GET
        notes.add
            connect
            BEGIN
            INSERT
            INSERT
            notes.notify publish
                notes.notify
                    notes.body
                        connect
                        BEGIN
                        SELECT
        UNLINK"""


def _wait_for(telemetry: Telemetry, name: str) -> list[ReadableSpan]:
    import time

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = [s for s in telemetry.spans() if s.name == name]
        if found:
            return found
        time.sleep(0.05)
    msg = f"no span {name!r} within {WAIT}s: {[s.name for s in telemetry.spans()]}"
    raise AssertionError(msg)


def test_a_cache_made_before_instrumenting_has_its_reads_traced(redis_url: str) -> None:
    """RedisInstrumentor wraps redis-py's execute_command on the class: a cache made before it was
    turned on still sends its GETs through it (so nothing on the read path is bound up front)."""
    redis = Redis(redis_url)
    cache = redis.cache(namespace=f"otel-{uuid.uuid4().hex[:10]}")
    cache.set("k", 1)
    with in_memory_telemetry() as telemetry:
        instrumentor = RedisInstrumentor()
        instrumentor.instrument(tracer_provider=telemetry.tracer_provider)
        try:
            assert cache.get("k") == 1
        finally:
            instrumentor.uninstrument()
        assert [s.name for s in telemetry.spans()] == ["GET"]
    cache.clear()
    redis.close()

"""polydatum.otel: spans, metrics and log fields, read back from the real OpenTelemetry SDK.

Spans go to the SDK's in-memory exporter and metrics to its in-memory
reader; nothing is mocked. The global tracer provider is never set, so tests
cannot leak into each other through it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from polydatum import DataManager, Service
from polydatum.asgi import PolydatumASGIMiddleware
from polydatum.errors import NotFound
from polydatum.meta import Meta
from polydatum.otel import (
    ContextFilter,
    Instrumentation,
    default_span_name,
    instrument,
    structlog_processor,
    uninstrument,
)
from polydatum.sqlalchemy import Database
from polydatum.werkzeug import PolydatumWSGIMiddleware
from tests.support.otel import Telemetry, in_memory_telemetry
from tests.support.sql import Items

SECRET = "sk_live_51Hs3cr3tV4lu3DoNotExport"


class Users(Service):
    def get(self, user_id: int) -> dict[str, int]:
        if user_id < 0:
            raise NotFound(f"no user {user_id}")
        return {"id": user_id}

    def get_twice(self, user_id: int) -> list[dict[str, int]]:
        return [self._dal.users.get(user_id), self._dal.users.get(user_id)]

    async def aget(self, user_id: int) -> dict[str, int]:
        await asyncio.sleep(0)
        return {"id": user_id}

    async def aget_both(self, user_id: int) -> list[Any]:
        return list(await asyncio.gather(self._dal.users.aget(user_id), self._dal.users.aget(user_id + 1)))

    async def afail(self) -> None:
        await asyncio.sleep(0)
        raise NotFound("nothing here")


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


@pytest.fixture(name="telemetry")
def fixture_telemetry() -> Iterator[Telemetry]:
    """A TracerProvider exporting to memory and a MeterProvider read from memory, shut down afterwards."""
    with in_memory_telemetry() as telemetry:
        yield telemetry


@pytest.fixture(name="dm")
def fixture_dm() -> DataManager:
    """A DataManager with the Users service."""
    dm = DataManager()
    dm.register_services(users=Users())
    return dm


@pytest.fixture(name="traced")
def fixture_traced(dm: DataManager, telemetry: Telemetry) -> Iterator[Instrumentation]:
    """``dm`` instrumented with the in-memory telemetry; undone afterwards."""
    with instrument(dm, telemetry.tracer_provider, telemetry.meter_provider) as instrumentation:
        yield instrumentation


# -- the span tree ------------------------------------------------------------------


@pytest.mark.usefixtures("traced")
def test_sync_context_span_with_nested_dal_call_spans(dm: DataManager, telemetry: Telemetry) -> None:
    """A ``with`` context gives one root span; a DAL call is its child and a call made inside that call nests
    under it."""
    with dm.dal(meta={"request_id": "r-1"}) as dal:
        assert dal.users.get_twice(7) == [{"id": 7}, {"id": 7}]
    context = telemetry.span("context")
    outer = telemetry.span("users.get_twice")
    inner = [s for s in telemetry.spans() if s.name == "users.get"]
    assert context.parent is None
    assert parent_of(outer) == context.context.span_id
    assert [parent_of(s) for s in inner] == [outer.context.span_id] * 2
    assert {s.context.trace_id for s in telemetry.spans()} == {context.context.trace_id}
    assert context.attributes is not None
    assert context.attributes["polydatum.outcome"] == "commit"
    assert context.attributes["polydatum.hook_errors"] == 0
    assert context.attributes["polydatum.meta.request_id"] == "r-1"
    assert context.status.status_code is StatusCode.UNSET


@pytest.mark.usefixtures("traced")
async def test_async_context_spans_nest_across_awaits_and_gathered_calls(
    dm: DataManager, telemetry: Telemetry
) -> None:
    """In an ``async with`` context an async DAL call's span lasts until awaited, and calls gathered inside
    it are its children."""
    async with dm.dal() as dal:
        assert await dal.users.aget_both(1) == [{"id": 1}, {"id": 2}]
    context = telemetry.span("context")
    both = telemetry.span("users.aget_both")
    gathered = [s for s in telemetry.spans() if s.name == "users.aget"]
    assert parent_of(both) == context.context.span_id
    assert len(gathered) == 2
    assert all(parent_of(s) == both.context.span_id for s in gathered)
    assert all(s.end_time is not None and s.end_time <= both.end_time for s in gathered)  # type: ignore[operator]
    assert context.attributes is not None
    assert context.attributes["polydatum.outcome"] == "commit"


@pytest.mark.usefixtures("traced")
def test_rollback_records_outcome_error_type_and_the_dal_call_exception(
    dm: DataManager, telemetry: Telemetry
) -> None:
    """A context ended by an exception is a rollback with its type; the failing DAL call's span records the
    exception."""
    with pytest.raises(NotFound), dm.dal() as dal:
        dal.users.get(-1)
    context = telemetry.span("context")
    call = telemetry.span("users.get")
    assert context.attributes is not None
    assert context.attributes["polydatum.outcome"] == "rollback"
    assert context.attributes["error.type"] == "polydatum.errors.NotFound"
    assert context.status.status_code is StatusCode.ERROR
    assert call.status.status_code is StatusCode.ERROR
    assert [e.name for e in call.events] == ["exception"]
    assert call.events[0].attributes is not None
    assert call.events[0].attributes["exception.type"] == "polydatum.errors.NotFound"


@pytest.mark.usefixtures("traced")
async def test_async_dal_call_exception_is_recorded(dm: DataManager, telemetry: Telemetry) -> None:
    """An async DAL call that raises records the exception on its span once awaited."""
    with pytest.raises(NotFound):
        async with dm.dal() as dal:
            await dal.users.afail()
    call = telemetry.span("users.afail")
    assert call.status.status_code is StatusCode.ERROR
    assert [e.name for e in call.events] == ["exception"]
    assert telemetry.span("context").attributes["polydatum.outcome"] == "rollback"  # type: ignore[index]


@pytest.mark.usefixtures("traced")
def test_hook_errors_are_counted_and_hook_work_is_a_child(dm: DataManager, telemetry: Telemetry) -> None:
    """Commit hooks run while the context span is current (their DAL calls are children), and the errors of
    every hook are counted."""

    def broken() -> None:
        raise RuntimeError("hook failed")

    with dm.context() as ctx:
        ctx.on_commit(broken)
        ctx.on_commit(ctx.dal.users.get, 1)
        ctx.on_commit(broken)
    context = telemetry.span("context")
    assert context.attributes is not None
    assert context.attributes["polydatum.hook_errors"] == 2
    assert context.attributes["polydatum.outcome"] == "commit"
    assert parent_of(telemetry.span("users.get")) == context.context.span_id


def test_context_span_is_outermost_and_sees_a_failed_commit(dm: DataManager, telemetry: Telemetry) -> None:
    """Context middleware registered before instrument() runs inside the span, so a commit that fails in
    teardown is a rollback."""

    class CommitFailed(Exception):
        pass

    def failing_commit(ctx: Any) -> Iterator[None]:
        yield
        raise CommitFailed("the database went away")

    dm.register_context_middleware(failing_commit)
    traced = instrument(dm, telemetry.tracer_provider, telemetry.meter_provider)
    with traced, pytest.raises(CommitFailed), dm.context():
        pass
    context = telemetry.span("context")
    assert context.attributes is not None
    assert context.attributes["polydatum.outcome"] == "rollback"
    assert context.attributes["error.type"].endswith("CommitFailed")  # type: ignore[union-attr]


def test_method_middleware_before_and_after_instrument_runs_inside_the_call_span(
    dm: DataManager, telemetry: Telemetry
) -> None:
    """Method middleware registered before and after instrument() both see the DAL call's span as current."""
    seen: list[tuple[str, int]] = []

    def make(label: str) -> Any:
        def middleware(request: Any, handler: Any) -> Any:
            seen.append((label, trace.get_current_span().get_span_context().span_id))
            return handler(request)

        return middleware

    dm.register_method_middleware(make("before"))
    with instrument(dm, telemetry.tracer_provider, telemetry.meter_provider):
        dm.register_method_middleware(make("after"))
        with dm.dal() as dal:
            dal.users.get(1)
    call_id = telemetry.span("users.get").context.span_id
    assert seen == [("before", call_id), ("after", call_id)]


@pytest.mark.usefixtures("traced")
def test_manual_child_span_parents_on_the_context_span(dm: DataManager, telemetry: Telemetry) -> None:
    """A span started by any instrumentation inside the body (here by hand) is a child of the context span."""
    tracer = telemetry.tracer_provider.get_tracer("some.instrumentation")
    with dm.context(), tracer.start_as_current_span("manual"):
        pass
    assert parent_of(telemetry.span("manual")) == telemetry.span("context").context.span_id


@pytest.mark.usefixtures("traced")
def test_the_context_span_nests_under_an_enclosing_server_span(dm: DataManager, telemetry: Telemetry) -> None:
    """Opened inside a span (a WSGI instrumentation's server span, say), the context span is its child."""
    tracer = telemetry.tracer_provider.get_tracer("server")
    with tracer.start_as_current_span("GET /users"), dm.context():
        pass
    assert parent_of(telemetry.span("context")) == telemetry.span("GET /users").context.span_id


def test_sqlalchemy_instrumentation_statements_are_children_of_dal_calls(
    db: Database, telemetry: Telemetry
) -> None:
    """With opentelemetry-instrumentation-sqlalchemy on the engine, each statement's span is a child of the
    DAL call that ran it."""
    dm = DataManager()
    db.install(dm)
    dm.register_services(items=Items())
    instrumentor = SQLAlchemyInstrumentor()
    # Its declared range stops below SQLAlchemy 2.1, which it instruments fine: skip that check.
    instrumentor.instrument(engine=db.engine, tracer_provider=telemetry.tracer_provider, skip_dep_check=True)
    try:
        with instrument(dm, telemetry.tracer_provider, telemetry.meter_provider):
            with dm.dal() as dal:
                item = dal.items.create(name="otel", qty=1)
            with dm.dal() as dal:
                assert dal.items.get(item.id).name == "otel"
    finally:
        instrumentor.uninstrument()
    calls = {s.context.span_id: s.name for s in telemetry.spans() if s.name.startswith("items.")}
    sql = [
        s
        for s in telemetry.spans()
        if s.instrumentation_scope.name.startswith("opentelemetry.instrumentation")
    ]  # type: ignore[union-attr]
    statements = {s.name.split()[0] for s in sql if parent_of(s) in calls}
    assert {"INSERT", "SELECT"} <= statements
    # The COMMIT runs in the transaction middleware, inside the context span but outside any call.
    contexts = {s.context.span_id for s in telemetry.spans() if s.name == "context"}
    assert all(parent_of(s) in calls or parent_of(s) in contexts for s in sql)


def test_wsgi_request_gives_a_context_span_with_dal_children(dm: DataManager, telemetry: Telemetry) -> None:
    """A request through polydatum.werkzeug makes one span named by its method, with the request id, and DAL
    call children."""

    def app(environ: Any, start_response: Any) -> Any:
        request = Request(environ)
        ctx = dm.require_active_context()
        user = ctx.dal.users.get(int(request.args["id"]))
        return Response(json.dumps(user), mimetype="application/json")(environ, start_response)

    wsgi = PolydatumWSGIMiddleware(app, dm)
    with instrument(dm, telemetry.tracer_provider, telemetry.meter_provider):
        response = Client(wsgi).get("/users/secret-path?id=3", headers={"X-Request-ID": "req-42"})
        assert response.status_code == 200
        missing = Client(wsgi).get("/users?id=-1")
        assert missing.status_code == 404
    ok, failed = [s for s in telemetry.spans() if s.name == "GET"]
    assert ok.attributes is not None
    assert ok.attributes["polydatum.meta.request_id"] == "req-42"
    assert ok.attributes["polydatum.outcome"] == "commit"
    assert failed.attributes["polydatum.outcome"] == "rollback"  # type: ignore[index]
    calls = [s for s in telemetry.spans() if s.name == "users.get"]
    assert [parent_of(s) for s in calls] == [ok.context.span_id, failed.context.span_id]
    assert "secret-path" not in "".join(s.to_json() for s in telemetry.spans())


def test_a_response_status_rollback_names_the_exception_flask_handled_or_the_status(
    dm: DataManager, telemetry: Telemetry
) -> None:
    """error.type of a context a response's status rolled back: the exception a Flask handler turned into
    that response (a ServiceError through init_app's handler, any other through Flask's 500), else the
    status code; never polydatum's own RollbackResponse."""
    flask = pytest.importorskip("flask")
    from polydatum.werkzeug import init_app, request_context

    app = flask.Flask(__name__)
    init_app(app, dm)

    @app.get("/users/<int:user_id>")
    def user(user_id: int) -> Any:
        return request_context().dal.users.get(user_id if user_id != 7 else -user_id)

    @app.get("/broken")
    def broken() -> Any:
        request_context().dal.users.get(1)
        raise KeyError("a bug")

    @app.get("/teapot")
    def teapot() -> Any:
        request_context().dal.users.get(1)
        return "short and stout", 418

    with instrument(dm, telemetry.tracer_provider, telemetry.meter_provider):
        client = app.test_client()
        assert client.get("/users/7").status_code == 404
        assert client.get("/broken").status_code == 500
        assert client.get("/teapot").status_code == 418
        assert client.get("/users/3").status_code == 200
    spans = [s for s in telemetry.spans() if s.name.startswith("GET")]
    outcomes = [(s.attributes or {}).get("error.type") for s in spans]
    assert outcomes == ["polydatum.errors.NotFound", "KeyError", "418", None]
    assert [s.status.status_code for s in spans] == [StatusCode.ERROR] * 3 + [StatusCode.UNSET]


async def test_asgi_request_gives_an_async_context_span_with_dal_children(
    dm: DataManager, telemetry: Telemetry
) -> None:
    """A request through polydatum.asgi makes an async context span with its request id and DAL children."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        user = await dm.require_active_context().dal.users.aget(4)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(user).encode()})

    transport = httpx.ASGITransport(app=PolydatumASGIMiddleware(app, dm))
    with instrument(dm, telemetry.tracer_provider, telemetry.meter_provider):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/users/4", headers={"x-request-id": "a-1"})
    assert response.json() == {"id": 4}
    context = telemetry.span("GET")
    assert context.attributes is not None
    assert context.attributes["polydatum.meta.request_id"] == "a-1"
    assert context.attributes["polydatum.outcome"] == "commit"
    assert parent_of(telemetry.span("users.aget")) == context.context.span_id


# -- names and privacy --------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "name"),
    [
        ({"task_name": "notes.send_email", "method": "GET"}, "notes.send_email"),
        ({"method": "GET", "route": "/notes/{id}", "path": "/notes/12"}, "GET /notes/{id}"),
        ({"method": "POST", "path": "/users/ann@example.com"}, "POST"),
        ({"method": "BREW", "path": "/pot"}, "HTTP"),
        ({"path": "/x", "user": "ann"}, "context"),
        ({}, "context"),
    ],
)
def test_default_span_name(meta: dict[str, Any], name: str) -> None:
    """A context span is named by its task, its HTTP method and route, or "context", never by its path."""
    assert default_span_name(Meta(meta)) == name


def test_default_span_name_asks_a_meta_subclass_through_its_get() -> None:
    """A Meta subclass (1.0 code brings its own) is read through its get(), not Meta's dict."""

    class TaskMeta(Meta):
        def get(self, key: str, default: Any = None) -> Any:
            return "reports.nightly" if key == "task_name" else super().get(key, default)

    assert default_span_name(TaskMeta({"method": "GET"})) == "reports.nightly"
    assert default_span_name(Meta({"method": "GET"})) == "GET"


def test_meta_keys_not_listed_never_reach_the_exporter(dm: DataManager, telemetry: Telemetry) -> None:
    """Only meta keys in meta_attributes are exported: a secret in another key is in no span or metric."""
    with instrument(dm, telemetry.tracer_provider, telemetry.meter_provider, meta_attributes=("tenant",)):
        with dm.dal(meta={"tenant": 7, "api_key": SECRET, "user": SECRET, "request_id": SECRET}) as dal:
            dal.users.get(1)
        with pytest.raises(NotFound), dm.dal(meta={"api_key": SECRET}) as dal:
            dal.users.get(-1)
    exported = "".join(s.to_json() for s in telemetry.spans())
    exported += telemetry.reader.get_metrics_data().to_json()  # type: ignore[union-attr]
    assert SECRET not in exported
    assert telemetry.spans()[1].attributes == {
        "polydatum.meta.tenant": 7,
        "polydatum.outcome": "commit",
        "polydatum.hook_errors": 0,
    }


def test_meta_values_that_are_not_plain_are_exported_as_text(dm: DataManager, telemetry: Telemetry) -> None:
    """A listed meta value that OpenTelemetry cannot carry (an object) is exported as its str(); None is left
    out."""

    class User:
        def __str__(self) -> str:
            return "user:42"

    traced = instrument(dm, telemetry.tracer_provider, meta_attributes=("user", "request_id"))
    with traced, dm.context(meta={"user": User(), "request_id": None}):
        pass
    assert telemetry.span("context").attributes == {
        "polydatum.meta.user": "user:42",
        "polydatum.outcome": "commit",
        "polydatum.hook_errors": 0,
    }


def test_a_meta_value_whose_str_raises_loses_only_its_own_attribute(
    dm: DataManager, telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    """A listed meta value whose str() raises is left out and logged by key, without the value; the other
    listed keys are still exported."""

    class User:
        def __str__(self) -> str:
            raise ValueError(f"no printable form for {SECRET}")

    keys = ("request_id", "user", "tenant")
    with (
        caplog.at_level(logging.DEBUG, logger="polydatum.otel"),
        instrument(dm, telemetry.tracer_provider, meta_attributes=keys),
        dm.context(meta={"request_id": "r-3", "user": User(), "tenant": 7}),
    ):
        pass
    assert telemetry.span("context").attributes == {
        "polydatum.meta.request_id": "r-3",
        "polydatum.meta.tenant": 7,
        "polydatum.outcome": "commit",
        "polydatum.hook_errors": 0,
    }
    (record,) = caplog.records
    assert "'user'" in record.getMessage()
    assert not record.exc_info  # its frames hold the value
    assert SECRET not in caplog.text


def test_custom_span_name_and_a_failing_one(dm: DataManager, telemetry: Telemetry) -> None:
    """span_name names the context span; one that raises falls back to "context" and the context still
    commits."""

    def broken(meta: Meta) -> str:
        raise KeyError("route")

    named = instrument(dm, telemetry.tracer_provider, span_name=lambda meta: f"job {meta['job']}")
    with named, dm.context(meta={"job": "nightly"}):
        pass
    with instrument(dm, telemetry.tracer_provider, span_name=broken):
        committed = []
        with dm.context() as ctx:
            ctx.on_commit(committed.append, True)
    assert [s.name for s in telemetry.spans()] == ["job nightly", "context"]
    assert committed == [True]


@pytest.mark.parametrize("named", [None, "", 0])
def test_a_span_name_that_is_not_a_non_empty_str_falls_back_to_the_default(
    dm: DataManager, telemetry: Telemetry, caplog: pytest.LogCaptureFixture, named: Any
) -> None:
    """A span_name returning None, "" or a non-str gives the default name (a bad one fails an OTLP exporter's
    whole batch); the first is logged as a warning, the rest at debug."""
    with (
        caplog.at_level(logging.DEBUG, logger="polydatum.otel"),
        instrument(dm, telemetry.tracer_provider, span_name=lambda meta: named),
    ):
        for _ in range(2):
            with dm.dal(meta={"method": "GET"}) as dal:
                dal.users.get(1)
    assert sorted(s.name for s in telemetry.spans()) == ["GET", "GET", "users.get", "users.get"]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]
    assert "span_name returned" in caplog.records[0].getMessage()


@pytest.mark.usefixtures("traced")
def test_an_unknown_dal_path_gets_one_shared_name(dm: DataManager, telemetry: Telemetry) -> None:
    """A DAL path that does not resolve (anything a client could send) is named "<unresolved>" in spans and
    metrics."""
    from polydatum.errors import DalMethodError

    with pytest.raises(DalMethodError), dm.dal() as dal:
        dal["users.drop_everything_" + SECRET]()
    assert telemetry.span("<unresolved>").status.status_code is StatusCode.ERROR
    methods = {
        p.attributes["polydatum.dal.method"] for p in telemetry.metrics()["polydatum.dal.call.duration"]
    }
    assert methods == {"<unresolved>"}


@pytest.mark.usefixtures("traced")
def test_an_unresolved_path_exports_none_of_the_clients_text(dm: DataManager, telemetry: Telemetry) -> None:
    """The exception event of a path that does not resolve keeps its type but not the message or stacktrace,
    which repeat what the client sent (and name the app's services)."""
    from polydatum.errors import DalMethodError

    secret = "ann@example.com"
    with pytest.raises(DalMethodError, match="ann@example"), dm.dal() as dal:
        dal[secret](1)
    with pytest.raises(DalMethodError), dm.dal() as dal:
        dal["users.drop_" + SECRET]()
    exported = []
    for span in telemetry.spans():
        exported.append(span.name)
        exported.extend(str(value) for value in (span.attributes or {}).values())
        for event in span.events:
            exported.extend(str(value) for value in (event.attributes or {}).values())
    assert not [text for text in exported if "ann@example" in text or SECRET in text or "Known" in text]
    for span in (s for s in telemetry.spans() if s.name == "<unresolved>"):
        (event,) = span.events
        assert event.name == "exception"
        assert event.attributes == {
            "exception.type": "polydatum.errors.DalMethodError",
            "exception.message": "the DAL path did not resolve",
        }
    assert len([s for s in telemetry.spans() if s.name == "<unresolved>"]) == 2


# -- metrics ----------------------------------------------------------------------


@pytest.mark.usefixtures("traced")
async def test_metrics_count_contexts_by_outcome_and_time_contexts_and_calls(
    dm: DataManager, telemetry: Telemetry
) -> None:
    """Contexts are counted by outcome; context and DAL call durations are histograms in seconds, calls by
    method."""
    for _ in range(2):
        with dm.dal() as dal:
            dal.users.get(1)
    with pytest.raises(NotFound), dm.dal() as dal:
        dal.users.get(-1)
    async with dm.dal() as adal:
        await adal.users.aget(1)
    points = telemetry.metrics()
    counts = {p.attributes["polydatum.outcome"]: p.value for p in points["polydatum.context.count"]}
    assert counts == {"commit": 3, "rollback": 1}
    durations = {p.attributes["polydatum.outcome"]: p.count for p in points["polydatum.context.duration"]}
    assert durations == {"commit": 3, "rollback": 1}
    calls = {p.attributes["polydatum.dal.method"]: p.count for p in points["polydatum.dal.call.duration"]}
    assert calls == {"users.get": 3, "users.aget": 1}
    assert all(p.sum >= 0 for p in points["polydatum.dal.call.duration"])


# -- safety -----------------------------------------------------------------------


def test_without_a_provider_everything_is_a_no_op(dm: DataManager) -> None:
    """With the global providers, never configured, calls and contexts work and no span records."""
    recording = []

    def probe(request: Any, handler: Any) -> Any:
        recording.append(trace.get_current_span().is_recording())
        return handler(request)

    with instrument(dm):
        dm.register_method_middleware(probe)
        with dm.dal() as dal:
            assert dal.users.get(5) == {"id": 5}
        with pytest.raises(NotFound), dm.dal() as dal:
            dal.users.get(-1)
    assert recording == [False, False]


def test_without_opentelemetry_installed_instrument_does_nothing() -> None:
    """Where opentelemetry cannot be imported, polydatum.otel imports, instrument() changes nothing and the
    log filter still fills its fields."""
    code = """
import logging, sys
sys.modules["opentelemetry"] = None  # an import of it now fails, as when it is not installed
from polydatum import DataManager
from polydatum.otel import ContextFilter, instrument, HAVE_OTEL
dm = DataManager()
instrumentation = instrument(dm)
record = logging.LogRecord("x", logging.INFO, "x.py", 1, "m", (), None)
with dm.context(meta={"request_id": "r9"}):
    ContextFilter(dm).filter(record)
instrumentation.uninstrument()
print(HAVE_OTEL, dm.wiring.plain, dm.get_dal()._direct, record.request_id, record.trace_id)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True", "True", "r9", "None"]


def test_another_runtime_context_is_asked_through_the_api() -> None:
    """With a runtime context other than the API's own, spans are made current through the API: the
    instrumentation's spans and the app's still nest."""
    code = """
from opentelemetry import context, trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
class Runtime(ContextVarsRuntimeContext):
    calls = 0
    def get_current(self):
        Runtime.calls += 1
        return super().get_current()
context._RUNTIME_CONTEXT = Runtime()
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from polydatum import DataManager, Service
from polydatum.otel import instrument
class Users(Service):
    def get(self, user_id):
        with provider.get_tracer("app").start_as_current_span("inner"):
            return user_id
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
dm = DataManager()
dm.register_services(users=Users())
instrument(dm, tracer_provider=provider)
with dm.dal() as dal:
    dal.users.get(1)
spans = {span.name: span for span in exporter.get_finished_spans()}
print(Runtime.calls > 0, spans["inner"].parent.span_id == spans["users.get"].context.span_id,
      spans["users.get"].parent.span_id == spans["context"].context.span_id, context.get_current() == {})
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True", "True", "True"]


def test_a_token_of_another_contextvars_state_is_logged_as_the_api_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """polydatum resets the otel context directly; a token it cannot reset (set under another
    contextvars state) goes to otel_context.detach, which logs and carries on, as before."""
    import contextvars

    from opentelemetry import context as otel_context

    from polydatum.otel import _detach

    token = contextvars.Context().run(otel_context.attach, otel_context.Context({"k": 1}))
    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        _detach(token)
    assert "Failed to detach context" in caplog.text
    assert otel_context.get_current() == {}


class RaisingProcessor(SpanProcessor):
    """A span processor that fails on every span, at its start or at its end."""

    def __init__(self, when: str) -> None:
        self.when = when

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.when == "start":
            raise RuntimeError("processor failed on start")

    def on_end(self, span: ReadableSpan) -> None:
        if self.when == "end":
            raise RuntimeError("processor failed on end")


class RaisingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise ConnectionError("collector unreachable")


class BlockingExporter(SpanExporter):
    """An exporter that hangs (a collector that never answers) until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(30)
        return SpanExportResult.SUCCESS


@pytest.mark.parametrize(
    ("when", "message"), [("start", "could not start span"), ("end", "could not end a span")]
)
def test_a_span_processor_that_raises_never_fails_the_unit_of_work(
    dm: DataManager, caplog: pytest.LogCaptureFixture, when: str, message: str
) -> None:
    """A processor raising on span start (or end) is logged once as a warning; calls return and the context
    commits."""
    provider = TracerProvider()
    provider.add_span_processor(RaisingProcessor(when))
    committed: list[int] = []
    with caplog.at_level(logging.DEBUG, logger="polydatum.otel"), instrument(dm, provider):
        for i in range(2):
            with dm.context() as ctx:
                assert ctx.dal.users.get(i) == {"id": i}
                ctx.on_commit(committed.append, i)
        async_result = asyncio.run(_one_async_call(dm))
    provider.shutdown()
    assert committed == [0, 1]
    assert async_result == {"id": 1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "polydatum.otel"]
    assert len(warnings) == 1
    assert message in warnings[0].getMessage()


async def _one_async_call(dm: DataManager) -> Any:
    async with dm.dal() as dal:
        return await dal.users.aget(1)


def test_an_exporter_that_raises_behind_a_batch_processor_never_fails_the_unit_of_work(
    dm: DataManager,
) -> None:
    """Spans handed to a BatchSpanProcessor whose exporter raises: the contexts still commit."""
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(RaisingExporter(), schedule_delay_millis=1))
    committed: list[int] = []
    with instrument(dm, provider):
        for i in range(20):
            with dm.context() as ctx:
                ctx.dal.users.get(i)
                ctx.on_commit(committed.append, i)
    provider.force_flush()
    provider.shutdown()
    assert committed == list(range(20))


def test_an_exporter_that_blocks_behind_a_batch_processor_never_blocks_the_unit_of_work(
    dm: DataManager,
) -> None:
    """While the exporter hangs on the first batch, later contexts still run to their commit."""
    exporter = BlockingExporter()
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(exporter, schedule_delay_millis=1, max_queue_size=64, max_export_batch_size=8)
    )
    committed: list[int] = []
    try:
        with instrument(dm, provider):
            with dm.context():
                pass
            assert exporter.entered.wait(30), "the batch processor never exported"
            for i in range(200):  # more spans than the queue holds: the overflow is dropped, not waited for
                with dm.context() as ctx:
                    ctx.dal.users.get(i)
                    ctx.on_commit(committed.append, i)
            assert not exporter.release.is_set()  # all of it ran while the export hung
    finally:
        exporter.release.set()
        provider.shutdown()
    assert committed == list(range(200))


# -- set-up and undoing it ---------------------------------------------------------------


def test_uninstrument_restores_the_fast_paths(dm: DataManager, telemetry: Telemetry) -> None:
    """After uninstrument() no span is made and the manager is back on its no-middleware fast paths."""
    assert dm.wiring.plain
    instrumentation = instrument(dm, telemetry.tracer_provider)
    assert not dm.wiring.plain
    instrumentation.uninstrument()
    instrumentation.uninstrument()  # idempotent
    uninstrument(dm)  # nothing to undo: no error
    assert dm.wiring.plain
    assert dm.get_dal()._direct
    with dm.dal() as dal:
        dal.users.get(1)
    assert telemetry.spans() == []


def test_module_uninstrument_and_instrumenting_again(dm: DataManager, telemetry: Telemetry) -> None:
    """uninstrument(dm) undoes instrument(dm); a second instrument() is refused until then."""
    instrument(dm, telemetry.tracer_provider)
    with pytest.raises(ValueError, match="already instrumented"):
        instrument(dm, telemetry.tracer_provider)
    uninstrument(dm)
    with instrument(dm, telemetry.tracer_provider), dm.context():
        pass
    assert [s.name for s in telemetry.spans()] == ["context"]
    assert dm.wiring.plain


@pytest.mark.parametrize("keys", [("request_id", ""), ("request_id", 3)])
def test_bad_meta_attributes_are_refused(dm: DataManager, keys: Any) -> None:
    """meta_attributes must be non-empty strings; the manager is left uninstrumented."""
    with pytest.raises(ValueError, match="meta_attributes must be meta keys"):
        instrument(dm, meta_attributes=keys)
    assert dm.wiring.plain


def test_a_single_meta_key_string_is_one_key(dm: DataManager, telemetry: Telemetry) -> None:
    """meta_attributes="tenant" means the key "tenant", not its letters."""
    with instrument(dm, telemetry.tracer_provider, meta_attributes="tenant") as instrumentation:
        assert instrumentation.meta_attributes == ("tenant",)


def test_span_name_must_be_callable(dm: DataManager) -> None:
    """A span_name that is not callable is refused."""
    with pytest.raises(TypeError, match="span_name must be a callable"):
        instrument(dm, span_name="context")  # type: ignore[arg-type]


# -- logs ------------------------------------------------------------------------------


@pytest.mark.usefixtures("traced")
def test_log_filter_adds_request_id_trace_and_span_ids(dm: DataManager, telemetry: Telemetry) -> None:
    """Records logged in a DAL call carry the context's request_id and the call span's ids; user only when
    asked."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(ContextFilter(dm))
    log = logging.getLogger("tests.otel.filter")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:

        def logged(request: Any, handler: Any) -> Any:
            log.info("calling %s", request.path_name)
            return handler(request)

        dm.register_method_middleware(logged)
        with dm.dal(meta={"request_id": "r-7", "user": "ann"}) as dal:
            dal.users.get(1)
        log.info("outside")
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
    call = telemetry.span("users.get")
    inside, outside = records
    assert inside.request_id == "r-7"  # type: ignore[attr-defined]
    assert inside.trace_id == format(call.context.trace_id, "032x")  # type: ignore[attr-defined]
    assert inside.span_id == format(call.context.span_id, "016x")  # type: ignore[attr-defined]
    assert not hasattr(inside, "user")
    assert (outside.request_id, outside.trace_id, outside.span_id) == (None, None, None)  # type: ignore[attr-defined]
    opted_in = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    with dm.context(meta={"user": "ann"}):
        ContextFilter(dm, user=True).filter(opted_in)
    assert opted_in.user == "ann"  # type: ignore[attr-defined]


def test_log_filters_keep_the_callers_fields_and_user_only_where_opted_in(dm: DataManager) -> None:
    """Handlers share one record: a field the caller passed through extra= wins, and the user an opted-in
    handler's filter added is gone for a handler whose filter did not opt in (and back for the next that did).
    """
    seen: dict[str, list[tuple[Any, Any]]] = {"first": [], "plain": [], "last": []}
    log = logging.getLogger("tests.otel.handlers")
    handlers = []
    for name, user in (("first", True), ("plain", False), ("last", True)):
        handler = logging.Handler()
        # The record is shared: keep what this handler saw when it saw it.
        handler.emit = lambda record, name=name: seen[name].append(  # type: ignore[method-assign,misc]
            (record.request_id, getattr(record, "user", "-"))
        )
        handler.addFilter(ContextFilter(dm, user=user))
        handlers.append(handler)
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with dm.context(meta={"request_id": "r-9", "user": "ann"}):
            log.info("plain")
            log.info("explicit", extra={"request_id": "explicit"})
            log.info("given user", extra={"user": "given"})
    finally:
        for handler in handlers:
            log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
    assert seen == {
        "first": [("r-9", "ann"), ("explicit", "ann"), ("r-9", "given")],
        "plain": [("r-9", "-"), ("explicit", "-"), ("r-9", "given")],
        "last": [("r-9", "ann"), ("explicit", "ann"), ("r-9", "given")],
    }


@pytest.mark.usefixtures("traced")
def test_structlog_processor_adds_the_same_fields(dm: DataManager, telemetry: Telemetry) -> None:
    """Through a real structlog pipeline, events carry request_id, trace_id, span_id and (opted in) user;
    keys set by the caller win."""
    capture = structlog.testing.LogCapture()
    log = structlog.wrap_logger(
        structlog.PrintLogger(),
        processors=[structlog_processor(dm, user=True), capture],
        cache_logger_on_first_use=False,
    )
    with dm.context(meta={"request_id": "r-8", "user": "bob"}):
        log.info("inside")
        log.info("mine", request_id="given")
    log.info("outside")
    context = telemetry.span("context")
    inside, mine, outside = capture.entries
    assert inside["request_id"] == "r-8"
    assert inside["user"] == "bob"
    assert inside["trace_id"] == format(context.context.trace_id, "032x")
    assert inside["span_id"] == format(context.context.span_id, "016x")
    assert mine["request_id"] == "given"
    assert outside["trace_id"] is None
    assert outside["request_id"] is None


@pytest.mark.parametrize("sampler", ["recording", "always_off"])
async def test_a_context_without_middleware_ended_in_another_task_detaches_cleanly(
    sampler: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Entered in one task and exited in another (a streamed response's end): its span ends, the exiting
    task's otel context is as it was, and no "Failed to detach context" is logged for a foreign token."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF) if sampler == "always_off" else TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    dm = DataManager()
    with instrument(dm, tracer_provider=provider):
        ctx = dm.context()
        await asyncio.create_task(ctx.__aenter__())  # entered in a task whose contextvars end with it

        async def exit_here() -> Any:
            before = otel_context.get_current()
            await ctx.__aexit__(None, None, None)
            return before, otel_context.get_current()

        before, after = await asyncio.create_task(exit_here())
    assert after is before
    assert "Failed to detach" not in caplog.text
    assert [s.name for s in exporter.get_finished_spans()] == ([] if sampler == "always_off" else ["context"])

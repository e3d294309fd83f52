"""polydatum.otel with tracers that record nothing: no span work, the same trace context.

A context under a parent span that is not sampled, traced by the SDK's
default (parent-based) sampler, starts no span and makes nothing current:
the parent stays current, and a task sent meanwhile carries the parent's
traceparent, not-sampled flag included. Spans started are counted with the
SDK's own extension point, an IdGenerator (one span id per span started,
recording or not). The global providers are set only in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from polydatum import DataManager, Service
from polydatum.errors import DalMethodError
from polydatum.otel import instrument

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331
PARENT_HEADER = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-00"


class CountingIds(RandomIdGenerator):
    """Random ids, counting the span ids handed out (the SDK asks one per span it starts)."""

    def __init__(self) -> None:
        self.spans = 0

    def generate_span_id(self) -> int:
        self.spans += 1
        return super().generate_span_id()


class Seen(Service):
    """Notes, inside each call, the span and the otel context current there."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.contexts: list[Any] = []

    def look(self) -> None:
        self.spans.append(trace.get_current_span())
        self.contexts.append(otel_context.get_current())


class EverythingBased(ParentBased):
    """A ParentBased subclass with a decision of its own: it records every span."""

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return ALWAYS_ON.should_sample(*args, **kwargs)


@pytest.fixture(name="parent")
def fixture_parent(request: pytest.FixtureRequest) -> Iterator[NonRecordingSpan]:
    """A parent span that is not sampled, current for the test (remote unless the param says local)."""
    remote = getattr(request, "param", "remote") == "remote"
    span = NonRecordingSpan(SpanContext(TRACE_ID, PARENT_ID, is_remote=remote, trace_flags=TraceFlags(0)))
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    finally:
        otel_context.detach(token)


def traced(sampler: Sampler | None = None) -> tuple[DataManager, Seen, TracerProvider, CountingIds]:
    ids = CountingIds()
    provider = TracerProvider(sampler=sampler, id_generator=ids, shutdown_on_exit=False)
    dm = DataManager()
    seen = Seen()
    dm.register_services(seen=seen)
    return dm, seen, provider, ids


@pytest.mark.parametrize("parent", ["remote", "local"], indirect=True)
@pytest.mark.parametrize("sampler", [None, ALWAYS_OFF], ids=["default", "always_off"])
def test_under_an_unsampled_parent_no_span_is_started_and_the_parent_stays_current(
    parent: NonRecordingSpan, sampler: Sampler | None
) -> None:
    """No span is started for the context or its calls, the parent is the current span in them, and
    the headers of a task sent (directly or at commit) carry the parent's traceparent, flag 00."""
    dm, seen, provider, ids = traced(sampler)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with instrument(dm, tracer_provider=provider) as instrumentation:
        stored: dict[str, Any] = {}
        sent: dict[str, Any] = {}
        with dm.dal() as dal:
            dal.seen.look()
            dal.seen.look()
            instrumentation.inject(stored)
            instrumentation.publish("notes.notify", sent, lambda: None)
    assert ids.spans == 0
    assert seen.spans == [parent, parent]
    assert stored["traceparent"] == sent["traceparent"] == PARENT_HEADER
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize(
    "sampler",
    [ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON), EverythingBased(ALWAYS_ON)],
    ids=["delegate", "subclass"],
)
def test_a_sampler_that_records_children_of_unsampled_parents_still_gets_every_span(
    parent: NonRecordingSpan, sampler: Sampler
) -> None:
    """Only a sampler known to pass the not-sampled decision on is second-guessed: any other is asked."""
    dm, seen, provider, _ids = traced(sampler)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with instrument(dm, tracer_provider=provider), dm.dal() as dal:
        dal.seen.look()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert sorted(spans) == ["context", "seen.look"]
    assert spans["context"].parent is not None
    assert spans["context"].parent.span_id == PARENT_ID
    assert seen.spans[0].get_span_context().span_id == spans["seen.look"].context.span_id


def test_a_trace_root_asks_the_sampler_and_carries_its_new_trace_not_sampled() -> None:
    """With no parent, ALWAYS_OFF still decides: the context's span is started, current in its calls, and
    a task sent carries its new trace id with the not-sampled flag."""
    dm, seen, provider, ids = traced(ALWAYS_OFF)
    with instrument(dm, tracer_provider=provider) as instrumentation:
        headers: dict[str, Any] = {}
        with dm.dal() as dal:
            dal.seen.look()
            instrumentation.inject(headers)
    assert ids.spans == 1
    context = seen.spans[0].get_span_context()
    assert context.is_valid
    assert not context.trace_flags.sampled
    _version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (int(trace_id, 16), int(span_id, 16)) == (context.trace_id, context.span_id)
    assert not int(flags, 16) & TraceFlags.SAMPLED


def test_with_the_no_op_tracer_nothing_is_made_current_and_the_trace_goes_on(
    parent: NonRecordingSpan,
) -> None:
    """The global providers, never configured: calls see the very otel context that was current when the
    context was entered, and a task sent carries the parent's traceparent."""
    dm, seen, _provider, _ids = traced()
    entry = otel_context.get_current()
    with instrument(dm) as instrumentation:
        headers: dict[str, Any] = {}
        with dm.dal() as dal:
            dal.seen.look()
            instrumentation.inject(headers)
    assert len(seen.contexts) == 1
    assert seen.contexts[0] is entry  # the same object: nothing was attached (an equal copy would be)
    assert headers["traceparent"] == PARENT_HEADER


def test_providers_set_after_instrument_are_used_from_the_next_context() -> None:
    """instrument() with the global providers before the application set them: contexts before record
    nothing, contexts after record spans and metrics."""
    code = """
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from polydatum import DataManager, Service
from polydatum.otel import instrument

class Users(Service):
    def get(self, user_id):
        return user_id

dm = DataManager()
dm.register_services(users=Users())
instrument(dm)
with dm.dal() as dal:
    dal.users.get(1)
exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
with dm.dal() as dal:
    dal.users.get(2)
counts = {}
for resource in reader.get_metrics_data().resource_metrics:
    for scope in resource.scope_metrics:
        for metric in scope.metrics:
            points = metric.data.data_points
            counts[metric.name] = sum(getattr(p, "count", getattr(p, "value", 0)) for p in points)
print(sorted(s.name for s in exporter.get_finished_spans()))
print(counts["polydatum.context.count"], counts["polydatum.dal.call.duration"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["['context', 'users.get']", "1 1"]


def test_the_parent_is_current_again_for_the_commit_when_something_detached_it() -> None:
    """A streaming response ends its context after the server's instrumentation detached the parent: the
    commit hooks (the COMMIT, cache deletes, task sends) still run under the parent, and it is undone."""
    dm, _seen, provider, ids = traced()
    parent = NonRecordingSpan(SpanContext(TRACE_ID, PARENT_ID, is_remote=False, trace_flags=TraceFlags(0)))
    at_commit: list[Any] = []
    with instrument(dm, tracer_provider=provider):
        token = otel_context.attach(trace.set_span_in_context(parent))
        ctx = dm.context()
        ctx.__enter__()
        ctx.on_commit(lambda: at_commit.append(trace.get_current_span()))
        otel_context.detach(token)
        ctx.__exit__(None, None, None)
    assert at_commit == [parent]
    assert ids.spans == 0
    assert not trace.get_current_span().get_span_context().is_valid


@pytest.mark.parametrize("sampler", [None, ALWAYS_OFF], ids=["default", "always_off"])
def test_calls_of_a_context_that_records_nothing_still_run_their_method_middleware(
    parent: NonRecordingSpan, sampler: Sampler | None
) -> None:
    """A context with nothing to record or measure skips the observer on its calls (the DAL calls the
    method middleware and the method directly): middleware, nested calls and errors are unchanged."""
    dm, seen, provider, ids = traced(sampler)
    order: list[str] = []

    def log_path(request: Any, handler: Any) -> Any:
        order.append(request.path_name)
        return handler(request)

    dm.register_method_middleware(log_path)
    with instrument(dm, tracer_provider=provider), dm.dal() as dal:
        dal.seen.look()
        with pytest.raises(DalMethodError, match="'nope'"):
            dal.seen.nope()
    assert order == ["seen.look", "seen.nope"]
    assert seen.spans == [parent]
    assert ids.spans == 0


def test_calls_of_an_unsampled_context_are_still_measured_when_a_meter_is_set(
    parent: NonRecordingSpan,
) -> None:
    """Nothing recorded but something measured: each call's duration still reaches the meter."""
    dm, _seen, provider, ids = traced()
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    with instrument(dm, tracer_provider=provider, meter_provider=meter_provider), dm.dal() as dal:
        dal.seen.look()
        dal.seen.look()
    assert ids.spans == 0
    data = reader.get_metrics_data()
    assert data is not None
    counts = {
        point.attributes["polydatum.dal.method"]: point.count
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "polydatum.dal.call.duration"
        for point in metric.data.data_points
    }
    assert counts == {"seen.look": 2}

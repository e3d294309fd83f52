"""OpenTelemetry: a span per context and per DAL call, metrics, and logs that carry the context.

::

    from polydatum.otel import instrument

    instrument(dm)                      # the global tracer and meter providers
    with dm.dal(meta={"request_id": "r1"}) as dal:
        dal.users.get(42)               # span "context" > span "users.get"

Needs the ``otel`` extra (``opentelemetry-api`` only); an SDK, exporters
and the standard instrumentations are the application's choice. Without a
configured provider the API's no-op tracer and meter are used, and nothing
is recorded or sent; without OpenTelemetry installed at all, this module
still imports and :func:`instrument` changes nothing.

What :func:`instrument` adds to a DataManager, as its
:class:`~polydatum.observer.Observer` (a manager that is not instrumented
pays one attribute test on the core's paths):

- **A span per context**, named by what opened it (see
  :func:`default_span_name`), started before any context middleware is set
  up and current until the context's commit or rollback hooks have run: DAL
  calls, SQL statements, cache and Celery spans made meanwhile are its
  children, and it counts the errors of every hook.
- **A span per DAL call**, named by its path (``users.get``), around every
  method middleware, when the context's span records.
- **Metrics:** ``polydatum.context.count`` (by outcome),
  ``polydatum.context.duration`` and ``polydatum.dal.call.duration`` (by
  method), in seconds.

**Privacy.** Meta can hold personal data, so only the meta keys listed in
``meta_attributes`` become span attributes, and span names never use the
request path. A telemetry failure (a span processor or exporter that
raises, a ``span_name`` that returns no name) is logged, never raised into
the unit of work; behind a ``BatchSpanProcessor`` an exporter that hangs
does not hold it up either.
"""

from __future__ import annotations

import logging
import operator
import weakref
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from contextvars import ContextVar
from inspect import isawaitable
from time import monotonic, perf_counter
from types import CoroutineType, NoneType
from typing import TYPE_CHECKING, Any, TypeVar

from polydatum import _telemetry
from polydatum._commands import path_name
from polydatum._web import RollbackResponse
from polydatum.errors import DalMethodError
from polydatum.meta import Meta
from polydatum.observer import DalPath, Observer, Proceed

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.trace import (
        NonRecordingSpan,
        NoOpTracer,
        ProxyTracer,
        Span,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
    )
except ImportError:  # pragma: no cover - tested in a subprocess without OpenTelemetry
    # Without the otel extra, instrument() is a no-op: a library can call it
    # whether or not the application installed OpenTelemetry.
    HAVE_OTEL = False
else:
    HAVE_OTEL = True
    # The API's proxies (what the global providers hand out until the application sets one)
    # read these module globals themselves; polydatum reads them too, to tell a proxy with
    # nothing behind it (skip all work) from one that delegates (a provider was set since).
    # With an API that lacks them, a proxy is asked every time, as before.
    try:
        from opentelemetry.metrics import _internal as _metrics_api
        from opentelemetry.metrics._internal import _ProxyMeter
    except ImportError:  # pragma: no cover - an API that moved its internals
        _metrics_api = None  # type: ignore[assignment]
        _ProxyMeter = None  # type: ignore[assignment,misc]
    _TRACER_PROXY_KNOWN = hasattr(trace, "_TRACER_PROVIDER")
    _SAMPLED = TraceFlags.SAMPLED
    # The key of the current span in an otel context: read directly, it spares
    # get_current_span()'s checks on every context (the value is type-checked here).
    try:
        from opentelemetry.trace.propagation import _SPAN_KEY
    except ImportError:  # pragma: no cover - an API that moved it: no span is ever found
        _SPAN_KEY = "polydatum.no-span-key"
        _DIRECT_SPAN_KEY = False
    else:
        # A context span is put in a copy of the otel context directly (what the API's
        # set_span_in_context does, in two Python calls) when the key is the API's own.
        _DIRECT_SPAN_KEY = isinstance(_SPAN_KEY, str)
    _METER_PROXY_KNOWN = _ProxyMeter is not None and hasattr(_metrics_api, "_METER_PROVIDER")
    # The API's default runtime keeps the current otel context in one ContextVar:
    # read and set directly, it spares two Python calls each time (a context span
    # reads it twice and sets it once). Another runtime (OTEL_PYTHON_CONTEXT) is
    # always asked through the API. The runtime is the one the API loaded when this
    # module was imported; the API itself never replaces it.
    try:
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
    except ImportError:  # pragma: no cover - an API that moved it
        ContextVarsRuntimeContext = None  # type: ignore[assignment,misc]
    _runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    _runtime_var = getattr(_runtime, "_current_context", None)
    if type(_runtime) is ContextVarsRuntimeContext and isinstance(_runtime_var, ContextVar):
        _get_current: Callable[[], otel_context.Context] = _runtime_var.get
        _attach: Callable[[otel_context.Context], Any] = _runtime_var.set
        _reset: Callable[[Any], None] = _runtime_var.reset
    else:  # pragma: no cover - tested in a subprocess with another runtime
        _get_current = otel_context.get_current
        _attach = otel_context.attach
        _reset = otel_context.detach


def _flags_and_validity() -> Callable[[Any], tuple[int, bool]]:
    """``span_context -> (trace_flags, is_valid)``, read by index when SpanContext allows it.

    The API's SpanContext is a tuple (trace_id, span_id, is_remote, trace_flags,
    trace_state, is_valid) whose fields are Python properties; a context under a
    parent that is not sampled reads two of them, so one C call replaces two
    property calls when two probes show that layout.
    """
    valid = SpanContext(1, 2, False, TraceFlags(TraceFlags.SAMPLED))
    invalid = SpanContext(0, 0, False, TraceFlags(TraceFlags.DEFAULT))
    if tuple(valid[3:]) == (valid.trace_flags, valid.trace_state, True) and invalid[5] is False:
        return operator.itemgetter(3, 5)
    return lambda span_context: (span_context.trace_flags, span_context.is_valid)  # pragma: no cover


def _detach(token: Any) -> None:
    """``otel_context.detach(token)``, with the direct reset when it can."""
    try:
        _reset(token)
    except Exception:
        # A token of another contextvars state (a context that ended in another
        # task): the API logs the failure and carries on, as it always did.
        otel_context.detach(token)


if HAVE_OTEL:
    _FLAGS_AND_VALIDITY = _flags_and_validity()

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.dal import DataManager
    from polydatum.outbox import Outbox

_T = TypeVar("_T")

# What a context's span left for its end: [start (0.0 when not metering), span,
# token, span records, token of making it current again at exit or None, the otel
# context current at entry when no span was started (else None), metering].
_ContextState = list[Any]

__all__ = [
    "ContextFilter",
    "Instrumentation",
    "default_span_name",
    "instrument",
    "instrument_outbox",
    "structlog_processor",
    "uninstrument",
]

logger = logging.getLogger("polydatum.otel")

#: The instrumentation scope name of polydatum's tracer and meter.
SCOPE = "polydatum"

# Attribute and metric names, in one place (docs/integrations/observability.md lists them).
OUTCOME = "polydatum.outcome"
HOOK_ERRORS = "polydatum.hook_errors"
ERROR_TYPE = "error.type"
DAL_METHOD = "polydatum.dal.method"
META_PREFIX = "polydatum.meta."
CONTEXT_COUNT = "polydatum.context.count"
CONTEXT_DURATION = "polydatum.context.duration"
CALL_DURATION = "polydatum.dal.call.duration"
CACHE_HITS = "polydatum.cache.hits"
CACHE_MISSES = "polydatum.cache.misses"
CACHE_NAMESPACE = "polydatum.cache.namespace"
BLOB_BYTES = "polydatum.blob.bytes"
BLOB_DIRECTION = "polydatum.blob.direction"
OUTBOX_PENDING = "polydatum.outbox.pending"
OUTBOX_OLDEST_AGE = "polydatum.outbox.oldest_pending_age"
OUTBOX_TABLE = "polydatum.outbox.table"

_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_PLAIN = (str, bool, int, float)
# Results a DAL call returns that are surely not awaitable: checked before inspect's slower test.
_NEVER_AWAITABLE = frozenset({NoneType, str, bytes, bool, int, float, dict, list, tuple, set})
#: The W3C trace-context header that carries a trace into a task.
TRACEPARENT = "traceparent"
_PUBLISH = {"messaging.system": "celery", "messaging.operation.name": "publish"}
_BLOB_IN = {BLOB_DIRECTION: "in"}
_BLOB_OUT = {BLOB_DIRECTION: "out"}
_COMMIT = {OUTCOME: "commit"}
_ROLLBACK = {OUTCOME: "rollback"}
_UNRESOLVED = "<unresolved>"
# The message of an unresolved path's exception event, in place of the exception's own.
_UNRESOLVED_MESSAGE = "the DAL path did not resolve"
# Method names seen, kept for their metric attributes; bounded like the DAL's own path cache.
_MAX_NAMES = 1024
# Seconds an outbox status serves the gauges of one collection.
_STATUS_REUSE = 1.0

_instrumented: weakref.WeakKeyDictionary[DataManager, Instrumentation] = weakref.WeakKeyDictionary()
_sinks: list[Instrumentation] = []


def default_span_name(meta: Meta) -> str:
    """The name of a context's span, from what opened it.

    ``task_name`` (polydatum.celery's meta) if set; else the HTTP ``method``
    followed by ``route`` when the app's meta function supplies a route
    template (``GET /notes/{id}``), or the method alone (polydatum.werkzeug
    and polydatum.asgi); else ``"context"``. The request ``path`` is never
    used: it can hold personal data, and one name per URL would swamp any
    trace backend.

    .. versionadded:: 2.0
    """
    # Meta's own dict when meta is a plain Meta (a subclass may override get()):
    # this runs for every context span.
    values: Mapping[str, Any] = meta._values if type(meta) is Meta else meta
    task = values.get("task_name")
    if task:
        return str(task)
    method = values.get("method")
    if method:
        method = method if method in _HTTP_METHODS else "HTTP"
        route = values.get("route")
        return f"{method} {route}" if route else str(method)
    return "context"


def _outcome_type(exc: BaseException) -> str:
    """A context's ``error.type``: what ended it.

    A response whose status rolled the context back carries no exception of
    the app's own (a framework turned it into the response) unless the web
    layer learnt which one: then that one, else the status code, as
    OpenTelemetry's HTTP conventions name an error without an exception.
    """
    if isinstance(exc, RollbackResponse):
        cause = exc.__cause__
        return _type_name(cause) if cause is not None else str(exc.status)
    return _type_name(exc)


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


class Instrumentation(Observer, _telemetry.Listener):
    """What :func:`instrument` did to one DataManager; :meth:`uninstrument` undoes it.

    It is the manager's :class:`~polydatum.observer.Observer`. Also a context
    manager that undoes it on exit (tests)::

        with instrument(dm, tracer_provider=provider):
            ...

    Attributes:
        data_manager: the instrumented DataManager.
        meta_attributes: the meta keys exported as span attributes.
    """

    def __init__(
        self,
        data_manager: DataManager,
        tracer_provider: trace.TracerProvider | None,
        meter_provider: metrics.MeterProvider | None,
        meta_attributes: Iterable[str],
        span_name: Callable[[Meta], str],
    ) -> None:
        self.data_manager = data_manager
        self.meta_attributes = tuple(meta_attributes)
        self._meta_keys = tuple((key, META_PREFIX + key) for key in self.meta_attributes)
        # The default always returns a name; only a custom function is checked (see _checked_name).
        self._span_name = span_name if span_name is default_span_name else self._checked_name(span_name)
        self._method_attrs: dict[str, dict[str, str]] = {}
        self._path_names: dict[int, tuple[tuple[Any, ...], str]] = {}
        self._failures = 0
        self._active = False
        # The fast paths of providers that record nothing (see _use_tracer and _metering).
        self._tracer_provider = tracer_provider
        self._live_tracer: trace.Tracer | None = None
        self._tracer_waits = False
        self._sdk_tracer: Any = None
        self._sampler: object = None
        self._drops_unsampled = False
        self._meter_waits = False
        self._meter_off = True
        if not HAVE_OTEL:
            return
        self._use_tracer(trace.get_tracer(SCOPE, tracer_provider=tracer_provider))
        self.meter = metrics.get_meter(SCOPE, meter_provider=meter_provider)
        meter = self.meter
        self._meter_off = isinstance(meter, metrics.NoOpMeter)
        self._meter_waits = _METER_PROXY_KNOWN and type(meter) is _ProxyMeter
        self._contexts = meter.create_counter(
            CONTEXT_COUNT, unit="{context}", description="Contexts ended, by outcome (commit or rollback)."
        )
        self._context_duration = meter.create_histogram(
            CONTEXT_DURATION,
            unit="s",
            description="Time from entering a context to the end of its commit or rollback hooks.",
        )
        self._call_duration = meter.create_histogram(
            CALL_DURATION, unit="s", description="Duration of DAL calls, by method."
        )
        self._cache_hits = meter.create_counter(
            CACHE_HITS, unit="{key}", description="Cache keys read and found, by namespace."
        )
        self._cache_misses = meter.create_counter(
            CACHE_MISSES, unit="{key}", description="Cache keys read and not found, by namespace."
        )
        self._blob_bytes = meter.create_counter(
            BLOB_BYTES, unit="By", description="Bytes stored in (in) and read from (out) blob stores."
        )
        self._namespaces: dict[str, dict[str, str]] = {}

    # -- installing --------------------------------------------------------

    def _install(self) -> None:
        if not HAVE_OTEL:
            logger.info(
                "OpenTelemetry is not installed (the polydatum[otel] extra): instrument() does nothing"
            )
            return
        self.data_manager.set_observer(self)
        self._active = True
        # Caches and blob stores are process-wide: they report to the latest
        # instrumentation still active.
        if _sinks:
            _telemetry.unlisten(_sinks[-1])
        _sinks.append(self)
        _telemetry.listen(self)

    def uninstrument(self) -> None:
        """Stop observing the manager; contexts opened from now on are not traced (idempotent)."""
        dm = self.data_manager
        if _instrumented.get(dm) is self:
            del _instrumented[dm]
        if not self._active:
            return
        self._active = False
        if dm.observer is self:
            dm.set_observer(None)
        if self in _sinks:
            was_latest = _sinks[-1] is self
            _sinks.remove(self)
            if was_latest:
                _telemetry.unlisten(self)
                if _sinks:
                    _telemetry.listen(_sinks[-1])

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstrument()

    # -- telemetry must never fail the unit of work ---------------------------

    def _failed(self, what: str, *, exc_info: bool = True) -> None:
        # The first failure is a warning with its traceback; the rest would
        # flood the log at request rate, so they go to debug.
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        logger.log(
            level,
            "polydatum.otel could not %s; the unit of work goes on (further failures logged at DEBUG)",
            what,
            exc_info=exc_info,
        )

    def _checked_name(self, span_name: Callable[[Meta], str]) -> Callable[[Meta], str]:
        """``span_name``, falling back to :func:`default_span_name` when it raises or returns no name.

        A span named None, "" or 0 would reach the exporter, and an OTLP
        exporter fails on the whole batch that holds it.
        """

        def name(meta: Meta) -> str:
            try:
                named = span_name(meta)
            except Exception:
                self._failed("name a context span with span_name; it gets its default name")
                return default_span_name(meta)
            if isinstance(named, str) and named:
                return named
            got = "an empty str" if isinstance(named, str) else type(named).__name__
            self._failed(
                f"name a context span: span_name returned {got}, not a non-empty str; "
                "it gets its default name",
                exc_info=False,
            )
            return default_span_name(meta)

        return name

    # -- providers that record nothing: skip the work, not the outcome ----------

    def _use_tracer(self, tracer: trace.Tracer) -> None:
        """Tell what ``tracer`` is, for the fast paths.

        The API's no-op tracer (or its proxy while no global provider is set)
        starts no span a caller could see: the one it returns is the current
        span, or a non-recording copy of its context, so starting and
        attaching it changes nothing. The SDK's tracer is kept to read its
        sampler (see :func:`_drops_unsampled_children`).
        """
        self._tracer = tracer
        self._tracer_waits = _TRACER_PROXY_KNOWN and type(tracer) is ProxyTracer and _no_tracer_provider()
        off = self._tracer_waits or isinstance(tracer, NoOpTracer)
        self._live_tracer = None if off else tracer
        self._sdk_tracer = tracer if type(tracer).__module__ == "opentelemetry.sdk.trace" else None
        self._sampler = None
        self._drops_unsampled = False

    def _tracer_now(self) -> trace.Tracer | None:
        """The tracer to start spans with, or None when none would be seen (the API's no-op one).

        A proxy waiting for a global provider is looked at again when one was set.
        """
        tracer = self._live_tracer
        if tracer is None and self._tracer_waits and not _no_tracer_provider():
            try:
                self._use_tracer(trace.get_tracer(SCOPE, tracer_provider=self._tracer_provider))
            except Exception:
                self._failed("get the tracer of the provider set since instrument()")
                self._tracer_waits = False
            tracer = self._live_tracer
        return tracer

    def _inherits_no(self, context: otel_context.Context | None = None) -> bool:
        """True when a span started now (under ``context``) surely would not record.

        That is when its parent is valid and not sampled and the SDK's
        sampler gives such a child its parent's decision (ParentBased, the
        SDK's default, or ALWAYS_OFF). The parent then stays current: children
        and the trace headers of a task sent meanwhile inherit its not-sampled
        flag, as they would have from the span not started.
        """
        if self._sdk_tracer is None or not self._sampler_drops_unsampled():
            return False
        parent = trace.get_current_span(context).get_span_context()
        return parent.is_valid and not parent.trace_flags.sampled

    def _sampler_drops_unsampled(self) -> bool:
        # Read on each use: an application may give the SDK's tracer another sampler.
        sampler = self._sdk_tracer.sampler
        if sampler is not self._sampler:
            self._drops_unsampled = _drops_unsampled_children(sampler)
            self._sampler = sampler
        return self._drops_unsampled

    def _metering(self) -> bool:
        """False while the meter is the API's no-op one (or its proxy with no global provider behind)."""
        if self._meter_waits:
            if _metrics_api._METER_PROVIDER is None:
                return False
            self._meter_waits = False
            self._meter_off = False
        return not self._meter_off

    def _start(self, name: str, current_if_valid: bool) -> tuple[Span | None, object]:
        """Start a span and make it current; ``(None, None)`` when there is nothing to end.

        The fast path of a tracer that records nothing: a span that does not
        record is made current only if it carries a sampling decision that
        children must inherit (``current_if_valid``, for the context span).
        No span is started when none would be seen (:meth:`_tracer_now`,
        :meth:`_inherits_no`).
        """
        try:
            tracer = self._tracer_now()
            if tracer is None:
                return None, None
            context = _get_current()  # read once for the check and the span
            if self._inherits_no(context):
                return None, None
        except Exception:
            self._failed(f"start span {name!r}")
            return None, None
        span, token, _ = self._start_with(tracer, name, current_if_valid, context)
        return span, token

    def _start_with(
        self,
        tracer: trace.Tracer,
        name: str,
        current_if_valid: bool,
        context: otel_context.Context | None = None,
    ) -> tuple[Span | None, object, otel_context.Context | None]:
        """Start a span under ``context`` (default: the current one).

        Returns ``(span, token, the otel context made current)``, all None
        when no span needs ending.
        """
        try:
            # The current otel context, read once: given to start_span (whose sampler
            # would read it again) and to the span's own context.
            if context is None:
                context = _get_current()
            span = tracer.start_span(name, context)
            if span.is_recording() or (current_if_valid and span.get_span_context().is_valid):
                attached = trace.set_span_in_context(span, context)
                return span, _attach(attached), attached
        except Exception:
            self._failed(f"start span {name!r}")
        return None, None, None

    def _end(self, span: Span | None, token: object) -> None:
        if span is not None:
            try:
                span.end()
            except Exception:
                self._failed("end a span")
        if token is not None:
            _detach(token)

    # -- what the cache and blob integrations report ---------------------------

    def cache_lookup(self, namespace: str, hits: int, misses: int) -> None:
        """Count a cache read (called by :mod:`polydatum.cache` while instrumented)."""
        try:
            attributes = self._namespaces.get(namespace)
            if attributes is None:
                if len(self._namespaces) >= _MAX_NAMES:
                    self._namespaces.clear()
                attributes = self._namespaces[namespace] = {CACHE_NAMESPACE: namespace}
            if hits:
                self._cache_hits.add(hits, attributes)
            if misses:
                self._cache_misses.add(misses, attributes)
        except Exception:
            self._failed("count a cache read")

    def blob_bytes(self, direction: str, count: int) -> None:
        """Count bytes moved in or out of a blob store (called by :mod:`polydatum.blob`)."""
        try:
            self._blob_bytes.add(count, _BLOB_IN if direction == "in" else _BLOB_OUT)
        except Exception:
            self._failed("count blob bytes")

    # -- the trace, carried into Celery tasks (see polydatum.celery) ----------------

    def inject(self, headers: dict[str, Any]) -> None:
        """Write the current trace context (``traceparent``) into message ``headers``."""
        try:
            propagate.inject(headers)
        except Exception:
            self._failed("put the trace context in a message's headers")

    def publish(self, task: str, headers: dict[str, Any], send: Callable[[], _T]) -> _T:
        """Send a task message in a producer span whose context travels in ``headers``.

        ``headers`` that already carry a ``traceparent`` (a message stored in
        the outbox while its context ran) give the span its parent, so a
        relay's send stays in the request's trace.
        """
        span = None
        try:
            parent = propagate.extract(headers) if TRACEPARENT in headers else None
            tracer = self._tracer_now()
            if tracer is None or self._inherits_no(parent):
                # No span would be seen: the task continues the parent's trace
                # (its not-sampled flag included).
                propagate.inject(headers, context=parent)
            else:
                span = tracer.start_span(
                    f"{task} publish", context=parent, kind=SpanKind.PRODUCER, attributes=_PUBLISH
                )
                propagate.inject(headers, context=trace.set_span_in_context(span))
        except Exception:
            self._failed(f"start the publish span of task {task!r}")
        try:
            return send()
        except BaseException as exc:
            if span is not None:
                try:
                    if span.is_recording():
                        span.record_exception(exc)
                        span.set_status(Status(StatusCode.ERROR, _type_name(exc)))
                except Exception:
                    self._failed("record a failed send")
            raise
        finally:
            if span is not None:
                self._end(span, None)

    def task_started(self, carrier: Mapping[str, Any]) -> object:
        """Continue the trace a task message carries (unless a span is already current).

        opentelemetry-instrumentation-celery, when installed, has already
        made its own span of the run current; the context's span is then its child.
        """
        try:
            if not carrier.get(TRACEPARENT) or trace.get_current_span().get_span_context().is_valid:
                return None
            return _attach(propagate.extract(carrier))
        except Exception:
            self._failed("continue a task's trace")
            return None

    def task_ended(self, token: object) -> None:
        """Undo :meth:`task_started`."""
        if token is not None:
            _detach(token)

    # -- the context span -----------------------------------------------------

    def _meta_attributes(self, meta: Meta) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        for key, name in self._meta_keys:
            value = meta.get(key)
            if value is None:
                continue
            if isinstance(value, _PLAIN):
                attributes[name] = value
                continue
            try:
                attributes[name] = str(value)
            except Exception as exc:
                # Only this key is lost. No traceback: its frames hold the value,
                # which a log integration that captures locals would send on.
                self._failed(
                    f"export meta {key!r} (str() of its {type(value).__name__} raised {_type_name(exc)}); "
                    "the span goes without it",
                    exc_info=False,
                )
        return attributes

    def context_entered(self, ctx: DataAccessContext) -> _ContextState:
        """Start the context's span and make it current (see :mod:`polydatum.observer`).

        No span is started when none would be seen or recorded: the API's
        no-op tracer, or a parent that is not sampled and whose decision the
        SDK's sampler would pass on (:meth:`_inherits_no`). The otel context
        current at entry is then kept, to be made current again for the
        commit (:meth:`context_exiting`).
        """
        if self._meter_waits:
            metering = _metrics_api._METER_PROVIDER is not None and self._metering()
        else:
            metering = not self._meter_off
        start = perf_counter() if metering else 0.0
        tracer = self._live_tracer
        # _no_tracer_provider(), inline: this is the no-op path of every context.
        if tracer is None and self._tracer_waits and trace._TRACER_PROVIDER is not None:
            tracer = self._tracer_now()
        entry = None
        if tracer is None or self._sdk_tracer is not None:
            try:
                entry = _get_current()
                parent = entry.get(_SPAN_KEY)
                if tracer is None:
                    if not metering:
                        # dal_call would only pass this context's calls through: the DAL skips it.
                        ctx._unobserved_calls = True
                    # Kept only if it holds a span, as the no-op tracer's would be made current.
                    return [start, None, None, False, None, None if parent is None else entry, metering]
                # The SDK marks a span that does not record as a NonRecordingSpan;
                # any other parent is left to the sampler.
                if type(parent) is NonRecordingSpan:
                    flags, valid = _FLAGS_AND_VALIDITY(parent.get_span_context())
                    if (
                        not flags & _SAMPLED
                        and valid
                        and (
                            self._drops_unsampled
                            if self._sdk_tracer.sampler is self._sampler
                            else self._sampler_drops_unsampled()
                        )
                    ):
                        if not metering:
                            ctx._unobserved_calls = True
                        return [start, None, None, False, None, entry, metering]
            except Exception:
                self._failed("read a context's parent span")
                if tracer is None:
                    return [start, None, None, False, None, None, metering]
        meta = ctx.meta
        try:
            name = self._span_name(meta)
        except Exception:
            self._failed("name a context span")
            name = "context"
        # _start_with(tracer, name, True, entry), inline: a trace root under ALWAYS_OFF comes here
        # on every context. attached: the otel context made current with the span (the exit
        # sees at once that it still is).
        span = token = attached = None
        recording = False
        try:
            if entry is None:
                entry = _get_current()
            started = tracer.start_span(name, entry)
            recording = started.is_recording()
            if recording or started.get_span_context().is_valid:
                attached = (
                    otel_context.Context({**entry, _SPAN_KEY: started})
                    if _DIRECT_SPAN_KEY
                    else trace.set_span_in_context(started, entry)
                )
                token = _attach(attached)
                span = started
        except Exception:
            self._failed(f"start span {name!r}")
            recording = False
        if recording and self._meta_keys:
            try:
                span.set_attributes(self._meta_attributes(meta))  # type: ignore[union-attr]
            except Exception:
                self._failed("set a context span's meta attributes")
        elif not recording and not metering:
            ctx._unobserved_calls = True
        return [start, span, token, recording, None, attached, metering]

    def context_exiting(self, ctx: DataAccessContext, state: _ContextState) -> None:
        """Make the context's span current again for its commit, if something else is now.

        A streaming WSGI response ends its context while the server iterates
        the body, after opentelemetry-instrumentation-wsgi (say) detached the
        span current when the context was entered: the COMMIT, the cache
        deletes and the task sends must still be children of the context's
        span (or, when it started none, of what was current at entry).
        """
        span = state[1]
        try:
            if span is not None:
                now = _get_current()
                if now is not state[5] and trace.get_current_span(now) is not span:
                    state[4] = _attach(trace.set_span_in_context(span))
            elif state[5] is not None and _get_current() is not state[5]:
                state[4] = _attach(state[5])
        except Exception:
            self._failed("make a context's span current for its commit")

    def context_exited(self, ctx: DataAccessContext, state: _ContextState, exc: BaseException | None) -> None:
        """Record the context's outcome, end its span (after every hook ran, so hook errors count)."""
        start, span, token, recording, again, _entry, metering = state
        if again is not None:
            # Current again since context_exiting: undo that; the entry's token
            # belongs to a contextvars state that has moved on.
            token = again
        if metering:
            outcome = _COMMIT if exc is None else _ROLLBACK
            try:
                self._contexts.add(1, outcome)
                self._context_duration.record(perf_counter() - start, outcome)
            except Exception:
                self._failed("record a context's metrics")
        if not recording:
            # No span, or a trace root that records nothing (ALWAYS_OFF): its end,
            # without _end's call.
            if span is not None:
                try:
                    span.end()
                except Exception:
                    self._failed("end a span")
            if token is not None:
                _detach(token)
            return
        try:
            span.set_attributes(_COMMIT if exc is None else _ROLLBACK)
            span.set_attribute(HOOK_ERRORS, len(ctx.get_hook_errors()))
            if exc is not None:
                error = _outcome_type(exc)
                span.set_attribute(ERROR_TYPE, error)
                span.set_status(Status(StatusCode.ERROR, error))
        except Exception:
            self._failed("record a context's outcome")
        finally:
            self._end(span, token)

    # -- the DAL call spans ---------------------------------------------------

    def _name(self, path: tuple[Any, ...]) -> str:
        # The DAL's commands keep their path tuple, so its name is looked up
        # by identity; the tuple is kept alive with it so that its id cannot be reused.
        named = self._path_names.get(id(path))
        if named is not None and named[0] is path:
            return named[1]
        name = path_name(path)
        if len(self._path_names) >= _MAX_NAMES:
            self._path_names.clear()
        self._path_names[id(path)] = (path, name)
        return name

    def dal_call(
        self,
        ctx: DataAccessContext,
        state: _ContextState | None,
        path: DalPath,
        proceed: Proceed,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """A span per DAL call, around every method middleware (see :mod:`polydatum.observer`).

        A call gets a span only when its context's span records: a context
        sampled out (or traced by the no-op tracer) has calls without spans,
        as their parent would drop them anyway, and pays only for the
        duration metric (nothing at all when the meter is the API's no-op
        one). A context entered before :func:`instrument` (``state`` None)
        asks the tracer on every call.
        """
        if state is not None and not state[3]:
            if not state[6]:
                # Nothing recorded, nothing measured (no-op providers, a trace sampled out).
                return proceed(ctx, args, kwargs)
            span = token = None
            start = perf_counter()
            name = self._name(path)
        else:
            start = perf_counter()
            name = self._name(path)
            span, token = self._start(name, False)
        try:
            result = proceed(ctx, args, kwargs)
        except BaseException as exc:
            self._call_ended(span, token, name, start, exc)
            raise
        if type(result) is CoroutineType or (type(result) not in _NEVER_AWAITABLE and isawaitable(result)):
            # An async method (or chain): the span lasts until it is awaited.
            if token is not None:
                _detach(token)
            return self._awaited(result, span, name, start)
        attributes = self._method_attrs.get(name)
        if span is None and attributes is not None:
            # The common case with nothing recorded: only the duration.
            try:
                self._call_duration.record(perf_counter() - start, attributes)
            except Exception:
                self._failed(f"record DAL call {name!r}")
            return result
        self._call_ended(span, token, name, start, None)
        return result

    async def _awaited(self, awaitable: Any, span: Span | None, name: str, start: float) -> Any:
        token = None
        if span is not None:
            try:
                token = _attach(trace.set_span_in_context(span))
            except Exception:
                self._failed("make a DAL call's span current")
        try:
            result = await awaitable
        except BaseException as exc:
            self._call_ended(span, token, name, start, exc)
            raise
        self._call_ended(span, token, name, start, None)
        return result

    def _call_ended(
        self, span: Span | None, token: object, name: str, start: float, exc: BaseException | None
    ) -> None:
        try:
            attributes = self._method_attrs.get(name) if exc is None else None
            if attributes is None:
                # A path that did not resolve may be anything a client sent:
                # it gets one shared label, not a time series of its own.
                unresolved = isinstance(exc, DalMethodError)
                attributes = {DAL_METHOD: _UNRESOLVED if unresolved else name}
                if not unresolved:
                    if len(self._method_attrs) >= _MAX_NAMES:
                        self._method_attrs.clear()
                    self._method_attrs[name] = attributes
            if exc is not None and span is not None and span.is_recording():
                error = _type_name(exc)
                span.set_attribute(ERROR_TYPE, error)
                if isinstance(exc, DalMethodError):
                    # The exception's message and stacktrace repeat the path (and name the
                    # app's services): the event keeps only the type. add_event, as the
                    # SDK's record_exception formats them even when told to override them.
                    span.update_name(_UNRESOLVED)
                    span.add_event(
                        "exception", {"exception.type": error, "exception.message": _UNRESOLVED_MESSAGE}
                    )
                else:
                    span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, error))
            self._call_duration.record(perf_counter() - start, attributes)
        except Exception:
            self._failed(f"record DAL call {name!r}")
        finally:
            self._end(span, token)


def _no_tracer_provider() -> bool:
    """True while no global tracer provider is set (the API's proxy tracers give no-op spans)."""
    return trace._TRACER_PROVIDER is None


def _drops_unsampled_children(sampler: object) -> bool:
    """True when the SDK ``sampler`` surely drops a span whose parent is valid and not sampled.

    ALWAYS_OFF, and a ParentBased sampler (the SDK's default) whose delegates
    for a local and a remote parent that is not sampled are both ALWAYS_OFF.
    A subclass that decides otherwise (its own ``should_sample``), or any
    other sampler, is asked span by span.
    """
    try:
        from opentelemetry.sdk.trace.sampling import Decision, ParentBased, StaticSampler
    except ImportError:  # pragma: no cover - an SDK tracer comes with its sampling module
        return False

    def always_off(candidate: object) -> bool:
        return (
            isinstance(candidate, StaticSampler)
            and type(candidate).should_sample is StaticSampler.should_sample
            and getattr(candidate, "_decision", None) is Decision.DROP
        )

    if always_off(sampler):
        return True
    return (
        isinstance(sampler, ParentBased)
        and type(sampler).should_sample is ParentBased.should_sample
        and always_off(getattr(sampler, "_local_parent_not_sampled", None))
        and always_off(getattr(sampler, "_remote_parent_not_sampled", None))
    )


def instrument(
    data_manager: DataManager,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    meta_attributes: Iterable[str] = ("request_id", "user"),
    *,
    span_name: Callable[[Meta], str] = default_span_name,
) -> Instrumentation:
    """Trace and measure every context and DAL call of ``data_manager``.

    Args:
        data_manager: the DataManager to instrument.
        tracer_provider: where spans go; the global one (a no-op until the
            application sets one) when None.
        meter_provider: where metrics go; the global one when None.
        meta_attributes: the meta keys exported as span attributes
            (``polydatum.meta.<key>``); no other meta leaves the process.
            A value that is not a str, bool, int or float is exported as
            its ``str()``.
        span_name: ``span_name(meta) -> str`` names each context's span
            (default :func:`default_span_name`). When it raises or returns
            anything but a non-empty str, the span gets its default name
            and the failure is logged.

    Returns:
        the :class:`Instrumentation`; its ``uninstrument()`` undoes this.

    Raises:
        ValueError: ``data_manager`` is already instrumented, or a meta key
            is not a non-empty string.
        TypeError: ``span_name`` is not callable.

    .. versionadded:: 2.0
    """
    keys = (meta_attributes,) if isinstance(meta_attributes, str) else tuple(meta_attributes)
    for key in keys:
        if not isinstance(key, str) or not key:
            msg = f"meta_attributes must be meta keys (non-empty strings); got {key!r}"
            raise ValueError(msg)
    if not callable(span_name):
        msg = f"span_name must be a callable taking the context's meta and returning a str; got {span_name!r}"
        raise TypeError(msg)
    if data_manager in _instrumented:
        msg = (
            f"{data_manager!r} is already instrumented; call uninstrument() on it first to change the set-up"
        )
        raise ValueError(msg)
    instrumentation = Instrumentation(data_manager, tracer_provider, meter_provider, keys, span_name)
    instrumentation._install()
    _instrumented[data_manager] = instrumentation
    return instrumentation


def instrument_outbox(
    outbox: Outbox, meter_provider: metrics.MeterProvider | None = None
) -> Callable[[], None]:
    """Report ``outbox``'s pending rows and the age of the oldest as gauges.

    ``polydatum.outbox.pending`` (``{row}``) and
    ``polydatum.outbox.oldest_pending_age`` (``s``), with the table's name as
    ``polydatum.outbox.table``. They are observed: the outbox's
    :meth:`~polydatum.outbox.Outbox.status` runs when a metric reader collects
    (once per collection), never on the way of a unit of work. A status that
    fails (the database is down) reports nothing for that collection.

    Returns:
        a function that stops the reporting (OpenTelemetry cannot remove an
        observed instrument; it then reports nothing).

    .. versionadded:: 2.0
    """
    if not HAVE_OTEL:
        return lambda: None
    from opentelemetry.metrics import CallbackOptions, Observation

    attributes = {OUTBOX_TABLE: outbox.table.name}
    active = [True]
    # Both gauges are read in one collection: the first reads the table, the
    # second takes what it read (if recent), so one collection is one query.
    last: list[tuple[float, Any]] = []

    def status() -> Any:
        now = monotonic()
        if last:
            read_at, current = last.pop()
            if now - read_at < _STATUS_REUSE:
                return current
        try:
            current = outbox.status()
        except Exception:
            logger.warning("polydatum.otel could not read the outbox's status", exc_info=True)
            current = None
        last.append((now, current))
        return current

    def pending(_options: CallbackOptions) -> Iterable[Observation]:
        current = status() if active[0] else None
        return [] if current is None else [Observation(current.pending, attributes)]

    def oldest(_options: CallbackOptions) -> Iterable[Observation]:
        current = status() if active[0] else None
        return [] if current is None else [Observation(current.oldest_pending_age, attributes)]

    meter = metrics.get_meter(SCOPE, meter_provider=meter_provider)
    meter.create_observable_gauge(
        OUTBOX_PENDING, [pending], unit="{row}", description="Outbox rows not delivered yet."
    )
    meter.create_observable_gauge(
        OUTBOX_OLDEST_AGE, [oldest], unit="s", description="Age of the oldest outbox row not delivered yet."
    )

    def stop() -> None:
        active[0] = False

    return stop


def uninstrument(data_manager: DataManager) -> None:
    """Undo :func:`instrument` on ``data_manager`` (nothing happens if it is not instrumented).

    .. versionadded:: 2.0
    """
    instrumentation = _instrumented.get(data_manager)
    if instrumentation is not None:
        instrumentation.uninstrument()


# -- logs ------------------------------------------------------------------------


# The record attribute listing the fields polydatum's filters set on it (not the caller's extra=).
_FILTER_FIELDS = "_polydatum_fields"


def _log_fields(data_manager: DataManager, user: bool) -> dict[str, Any]:
    ctx = data_manager.get_active_context()
    meta = ctx.meta if ctx is not None else None
    fields: dict[str, Any] = {"request_id": meta.get("request_id") if meta is not None else None}
    if user:
        fields["user"] = meta.get("user") if meta is not None else None
    span_context = trace.get_current_span().get_span_context() if HAVE_OTEL else None
    if span_context is not None and span_context.is_valid:
        fields["trace_id"] = format(span_context.trace_id, "032x")
        fields["span_id"] = format(span_context.span_id, "016x")
    else:
        fields["trace_id"] = fields["span_id"] = None
    return fields


class ContextFilter(logging.Filter):
    """A logging filter adding the current context's ids to every record it sees.

    Sets ``request_id`` (from the active context's meta), ``trace_id`` and
    ``span_id`` (hex, from the current span) and, when ``user=True``,
    ``user``: None when there is none, so ``%(request_id)s`` always formats.
    Attach it to a handler (it then sees records of every logger)::

        handler.addFilter(ContextFilter(dm))

    A field the caller passed (``extra={"request_id": ...}``) is kept. The
    handlers of a logger share one record, so a filter without ``user=True``
    removes the ``user`` that another handler's filter set on it.

    Args:
        data_manager: whose active context to read.
        user: also add meta ``user`` (opt-in: it can be personal data).

    .. versionadded:: 2.0
    """

    def __init__(self, data_manager: DataManager, *, user: bool = False) -> None:
        super().__init__()
        self.data_manager = data_manager
        self.user = user

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the fields to ``record``; never drops it."""
        try:
            fields = _log_fields(self.data_manager, self.user)
        except Exception:  # a log line is never lost to its decoration
            return True
        values = record.__dict__
        # What polydatum's filters set (a tuple: a copy of the record, as QueueHandler
        # makes, shares it); any other key the record has is the caller's, and wins.
        ours: tuple[str, ...] = values.get(_FILTER_FIELDS, ())
        mine = tuple(key for key in fields if key in ours or key not in values)
        for key in mine:
            values[key] = fields[key]
        if not self.user and "user" in ours:
            # Set for an earlier handler that opted in: not for this one.
            del values["user"]
        values[_FILTER_FIELDS] = mine
        return True


def structlog_processor(
    data_manager: DataManager, *, user: bool = False
) -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
    """A structlog processor adding what :class:`ContextFilter` adds to every event.

    Keys the event already has are kept. structlog itself is not imported::

        structlog.configure(processors=[structlog_processor(dm), structlog.processors.JSONRenderer()])

    .. versionadded:: 2.0
    """

    def add_context(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        try:
            fields = _log_fields(data_manager, user)
        except Exception:
            return event
        for key, value in fields.items():
            event.setdefault(key, value)
        return event

    return add_context

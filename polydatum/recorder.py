"""A bounded in-process recorder of recent contexts (what the debug page shows).

::

    from polydatum.recorder import Recorder

    recorder = Recorder(limit=200).install(dm)   # after db.install(dm): SQL is counted too
    with dm.dal(meta={"task_name": "reindex"}) as dal:
        dal.notes.reindex()
    (last,) = recorder.contexts()
    last.name, last.outcome, [call.name for call in last.calls]
    # ("reindex", "commit", ["notes.reindex"])

For each context it keeps what opened it (:func:`context_name`), the
request id, when it started, how long it took (up to its commit or
rollback, and up to the end of its hooks), the outcome and the type of the
exception that ended it, the number of hook errors, its DAL calls (path,
start, duration, nesting depth, error type) and counters that integrations
feed through :meth:`Recorder.count`: ``sql`` (statements sent, counted by
any ``polydatum.sqlalchemy`` database installed before the recorder),
``cache.hit`` and ``cache.miss``, ``blob.*``.

**Bounded.** The last ``limit`` finished contexts are kept (older ones are
dropped), and at most ``max_calls`` DAL calls per context (the rest are only
counted), so memory stays flat whatever the request rate.

**Private by construction.** No meta value is kept other than the names in
:func:`context_name` and ``request_id``; exception messages are never kept,
only their types. It is still a debugging aid: the page that shows it
(:mod:`polydatum.debug`) reveals service paths and timings, so it is off
unless asked for.

The recorder is plain middleware on the manager's public seams, outermost,
so it costs nothing once :meth:`Recorder.uninstall` removed it. It imports
nothing outside the standard library.

.. versionadded:: 2.0
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from inspect import isawaitable
from typing import TYPE_CHECKING, Any

from polydatum import _telemetry
from polydatum._renamed import renamed_keyword
from polydatum.errors import DalMethodError

if TYPE_CHECKING:
    from typing_extensions import Self

    from polydatum.context import DataAccessContext
    from polydatum.dal import DataManager
    from polydatum.meta import Meta
    from polydatum.middleware import DalCommandRequest

__all__ = ["CallRecord", "ContextRecord", "Recorder", "context_name"]

_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
#: Longest name, request id or counter label kept (anything longer is cut).
MAX_TEXT = 200
#: Distinct counters kept per context (``sql``, ``cache.hit``…); more are dropped.
MAX_COUNTERS = 32
UNRESOLVED = "<unresolved>"
# Results a DAL call returns that are surely not awaitable: checked before inspect's slower test.
_NEVER_AWAITABLE = frozenset({type(None), str, bytes, bool, int, float, dict, list, tuple, set})
# Call names by path: the DAL's commands keep their path tuple, so it is looked up by
# identity (the tuple is kept with its name, so its id cannot be reused); bounded.
_MAX_NAMES = 1024

# The DAL call being run in this task or thread, as (record, depth): a call
# made while it runs is one level deeper. A ContextVar, not a counter on the
# record, so that calls gathered concurrently in one async context each nest
# under their own caller. Made once, at module scope (see polydatum._stack).
_current_call: ContextVar[tuple[ContextRecord, int] | None] = ContextVar(
    "polydatum.recorder.call", default=None
)


def _cut(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def context_name(meta: Meta) -> str:
    """What opened a context, from its meta: the only meta (with ``request_id``) a record keeps.

    ``task_name`` (polydatum.celery) if set; else the HTTP ``method`` and the
    ``route`` template when the app's meta supplies one (``GET
    /notes/<int:note_id>``), or the method alone; else ``"context"``. The
    request ``path`` is never used: it can hold personal data. The same rule
    names the context spans of :mod:`polydatum.otel`.

    .. versionadded:: 2.0
    """
    task = meta.get("task_name")
    if task:
        return _cut(task)
    method = meta.get("method")
    if method:
        method = method if method in _HTTP_METHODS else "HTTP"
        route = meta.get("route")
        return _cut(f"{method} {route}") if route else str(method)
    return "context"


class CallRecord:
    """One DAL call of a recorded context.

    Attributes:
        name: the service path and method (``notes.add``), or
            ``"<unresolved>"`` for a path that named nothing.
        start: seconds from the context's start to the call's.
        duration: seconds the call took; None if it had not returned when the
            context ended (an async call never awaited).
        depth: 0 for a call made by the context's body, 1 for a call made
            inside that call, and so on.
        error: the type of the exception the call raised (``module.Class``), or None.

    .. versionadded:: 2.0
    """

    __slots__ = ("depth", "duration", "error", "name", "start")

    def __init__(self, name: str, start: float, depth: int) -> None:
        self.name = name
        self.start = start
        self.depth = depth
        self.duration: float | None = None
        self.error: str | None = None

    def __repr__(self) -> str:
        return f"<CallRecord {self.name} depth={self.depth} duration={self.duration}>"


class ContextRecord:
    """What one context did; read it once it is in :meth:`Recorder.contexts`.

    Attributes:
        id: a number unique within its recorder, increasing.
        name: what opened it (:func:`context_name`).
        request_id: the meta ``request_id`` (cut to 200 characters), or None.
        started_at: when it started, as a Unix timestamp.
        ended: seconds from its start to its commit or rollback (its middleware done).
        duration: seconds from its start to the end of its commit or rollback hooks.
        outcome: ``"commit"`` or ``"rollback"``.
        error: the type of the exception that ended it (``module.Class``), or None.
        hook_errors: how many ``on_commit``/``on_rollback`` hooks raised.
        calls: its first ``max_calls`` DAL calls, in the order they started.
        calls_dropped: how many calls were made beyond those.
        counts: counters fed by integrations: ``{"sql": 3, "cache.hit": 1}``.

    .. versionadded:: 2.0
    """

    __slots__ = (
        "_start",
        "calls",
        "calls_dropped",
        "counts",
        "duration",
        "ended",
        "error",
        "hook_errors",
        "id",
        "name",
        "outcome",
        "request_id",
        "started_at",
    )

    def __init__(self, id: int, name: str, request_id: str | None) -> None:
        self.id = id
        self.name = name
        self.request_id = request_id
        self.started_at = time.time()
        self._start = time.perf_counter()
        self.ended = 0.0
        self.duration = 0.0
        self.outcome = "open"
        self.error: str | None = None
        self.hook_errors = 0
        self.calls: list[CallRecord] = []
        self.calls_dropped = 0
        self.counts: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<ContextRecord #{self.id} {self.name} {self.outcome} calls={len(self.calls)}>"

    def count(self, what: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``what`` (at most 32 distinct counters are kept)."""
        counts = self.counts
        if what in counts:
            counts[what] += n
        elif len(counts) < MAX_COUNTERS:
            counts[_cut(what)] = n


class Recorder:
    """Keeps the last ``limit`` contexts of one DataManager, with their DAL calls.

    Args:
        limit: how many finished contexts to keep (the oldest is dropped first).
        max_calls: how many DAL calls to keep per context (later ones are counted only).

    Raises:
        ValueError: ``limit`` or ``max_calls`` is not a positive integer.

    .. versionadded:: 2.0
    """

    def __init__(self, limit: int = 200, *, max_calls: int = 100) -> None:
        for name, value in (("limit", limit), ("max_calls", max_calls)):
            if type(value) is not int or value < 1:
                msg = f"{name} must be a positive integer; got {value!r}"
                raise ValueError(msg)
        self.limit = limit
        self.max_calls = max_calls
        self.data_manager: DataManager | None = None
        self._finished: deque[ContextRecord] = deque(maxlen=limit)
        # Contexts still running, weakly: one collected without exiting leaks nothing.
        self._open: weakref.WeakKeyDictionary[DataAccessContext, ContextRecord] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._undo: list[Callable[[], None]] = []
        self._names: dict[int, tuple[tuple[Any, ...], str]] = {}
        # Bound once: the very objects registered are the ones removed.
        self.context_middleware = self._context_middleware
        self.method_middleware = self._method_middleware

    def __repr__(self) -> str:
        return f"<Recorder {len(self._finished)}/{self.limit} contexts>"

    # -- installing --------------------------------------------------------

    @renamed_keyword("data_manager", "dm")
    def install(self, dm: DataManager) -> Self:
        """Record every context of ``dm`` from now on.

        Installs a context middleware and a method middleware, both outermost,
        counts the SQL statements of every polydatum.sqlalchemy database
        already installed on it (through its ``count_statements`` seam), and
        listens for the cache lookups and blob transfers the cache and blob
        integrations report (next to :mod:`polydatum.otel`, if instrumented).

        Returns:
            this recorder.

        Raises:
            RuntimeError: this recorder is installed already (one recorder per manager).
        """
        if self.data_manager is not None:
            msg = f"{self!r} is installed on {self.data_manager!r} already; make one Recorder per DataManager"
            raise RuntimeError(msg)
        dm.register_context_middleware(self.context_middleware, outermost=True)
        self._undo.append(lambda: dm.remove_context_middleware(self.context_middleware))
        dm.register_method_middleware(self.method_middleware, outermost=True)
        self._undo.append(lambda: dm.remove_method_middleware(self.method_middleware))
        counted: set[int] = set()
        for name in dm.resource_manager:
            database = getattr(dm.get_resource(name), "database", None)
            count_statements = getattr(database, "count_statements", None)
            if callable(count_statements) and id(database) not in counted:
                counted.add(id(database))  # two resources on one database count once
                self._undo.append(count_statements(self.count))
        # Cache lookups and blob transfers are reported process-wide (the
        # objects are shared); each is counted on this manager's active context.
        listener = _Counts(self)
        _telemetry.listen(listener)
        self._undo.append(lambda: _telemetry.unlisten(listener))
        self.data_manager = dm
        return self

    def uninstall(self) -> None:
        """Stop recording (idempotent); what was recorded stays readable."""
        while self._undo:
            self._undo.pop()()
        self.data_manager = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    # -- reading -----------------------------------------------------------

    def contexts(self) -> list[ContextRecord]:
        """The finished contexts kept, newest first."""
        with self._lock:
            records = list(self._finished)
        records.reverse()
        return records

    def get(self, record_id: int) -> ContextRecord | None:
        """The kept context with this id, or None (never recorded, or dropped since)."""
        with self._lock:
            for record in self._finished:
                if record.id == record_id:
                    return record
        return None

    def running(self) -> int:
        """How many recorded contexts are open now (they join :meth:`contexts` when they end)."""
        with self._lock:
            return len(self._open)

    def clear(self) -> None:
        """Forget every finished context."""
        with self._lock:
            self._finished.clear()

    # -- feeding -----------------------------------------------------------

    def count(self, what: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``what`` of the manager's active context, if it is recorded.

        The seam integrations use: ``count("sql")`` before each statement,
        ``count("cache.hit")``, ``count("blob.put")``. Outside a recorded
        context it does nothing.
        """
        dm = self.data_manager
        if dm is None:
            return
        ctx = dm.get_active_context()
        if ctx is None:
            return
        record = self._open.get(ctx)
        if record is not None:
            record.count(what, n)

    def cache_lookup(self, namespace: str, hits: int, misses: int) -> None:
        """A cache read found ``hits`` keys and missed ``misses``: the ``cache.hit``/``cache.miss`` counters.

        An installed recorder hears this (and :meth:`blob_bytes`) from the
        cache and blob integrations itself; call it for a store of your own.
        """
        if hits:
            self.count("cache.hit", int(hits))
        if misses:
            self.count("cache.miss", int(misses))

    def blob_bytes(self, direction: str, count: int) -> None:
        """``count`` bytes went ``"in"`` to or ``"out"`` of a blob store: one ``blob.<direction>``
        operation, and ``count`` more in ``blob.<direction>.bytes``."""
        self.count(f"blob.{direction}")
        self.count(f"blob.{direction}.bytes", int(count))

    # -- the middleware ------------------------------------------------------

    def _context_middleware(self, ctx: DataAccessContext) -> Iterator[None]:
        """Context middleware (outermost): opens the record, and closes it after the hooks."""
        meta = ctx.meta
        try:
            name = context_name(meta)
        except Exception:  # a meta value whose str() raises: recording never fails the work
            name = "context"
        try:
            request_id = meta.get("request_id")
            request_id = None if request_id is None else _cut(request_id)
        except Exception:
            request_id = None
        record = ContextRecord(next(self._ids), name, request_id)
        with self._lock:
            self._open[ctx] = record
        try:
            yield
        except BaseException as exc:
            self._ended(ctx, record, exc)
            raise
        self._ended(ctx, record, None)

    def _ended(self, ctx: DataAccessContext, record: ContextRecord, exc: BaseException | None) -> None:
        # Outermost, so ``exc`` is what every other middleware let out: the
        # context commits exactly when it is None. The record is published by
        # a hook registered now, after all others, so it counts their errors.
        record.ended = time.perf_counter() - record._start
        record.outcome = "commit" if exc is None else "rollback"
        record.error = None if exc is None else _type_name(exc)
        try:
            (ctx.on_commit if exc is None else ctx.on_rollback)(self._publish, ctx, record)
        except Exception:  # no longer open (collected without exiting): publish now
            self._publish(ctx, record)

    def _publish(self, ctx: DataAccessContext, record: ContextRecord) -> None:
        record.duration = time.perf_counter() - record._start
        record.hook_errors = len(ctx.get_hook_errors())
        with self._lock:
            self._open.pop(ctx, None)
            self._finished.append(record)

    def _method_middleware(
        self, request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]
    ) -> Any:
        """Method middleware (outermost): a :class:`CallRecord` per DAL call of a recorded context."""
        record = self._open.get(request.ctx)
        if record is None:
            return handler(request)
        outer = _current_call.get()
        depth = outer[1] + 1 if outer is not None and outer[0] is record else 0
        start = time.perf_counter()
        call: CallRecord | None = None
        if len(record.calls) < self.max_calls:
            call = CallRecord(self._name(request), start - record._start, depth)
            record.calls.append(call)
        else:
            record.calls_dropped += 1
        token = _current_call.set((record, depth))
        try:
            result = handler(request)
        except BaseException as exc:
            _current_call.reset(token)
            _call_ended(call, request, start, exc)
            raise
        _current_call.reset(token)
        if call is not None and type(result) not in _NEVER_AWAITABLE and isawaitable(result):
            # An async method: it runs, and makes its own calls, when awaited.
            return _awaited(result, call, request, start, (record, depth))
        _call_ended(call, request, start, None)
        return result

    def _name(self, request: DalCommandRequest) -> str:
        path = request.path
        named = self._names.get(id(path))
        if named is not None and named[0] is path:
            return named[1]
        name = _cut(request.path_name)
        if len(self._names) >= _MAX_NAMES:
            self._names.clear()
        self._names[id(path)] = (path, name)
        return name


def _call_ended(
    call: CallRecord | None, request: DalCommandRequest, start: float, exc: BaseException | None
) -> None:
    if call is None:
        return
    call.duration = time.perf_counter() - start
    if exc is not None:
        call.error = _type_name(exc)
        if isinstance(exc, DalMethodError) and request.dal_method is None:
            # The path may be anything a client sent: it is not kept.
            call.name = UNRESOLVED


async def _awaited(
    awaitable: Any,
    call: CallRecord,
    request: DalCommandRequest,
    start: float,
    current: tuple[ContextRecord, int],
) -> Any:
    token = _current_call.set(current)
    try:
        result = await awaitable
    except BaseException as exc:
        _call_ended(call, request, start, exc)
        raise
    finally:
        _current_call.reset(token)
    _call_ended(call, request, start, None)
    return result


class _Counts(_telemetry.Listener):
    """What the cache and blob integrations report, as a recorder's counters."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def cache_lookup(self, namespace: str, hits: int, misses: int) -> None:
        self.recorder.cache_lookup(namespace, hits, misses)

    def blob_bytes(self, direction: str, count: int) -> None:
        self.recorder.blob_bytes(direction, count)

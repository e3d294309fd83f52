"""Celery: every task runs in a context; tasks sent in a context go out on commit.

:func:`install` wires a Celery app to a DataManager::

    from celery import Celery

    from polydatum.celery import install

    app = Celery("shop", broker="amqp://…", backend="redis://…")
    install(app, dm, headers=("request_id",), retry_transient=3)

    @app.task
    def ship(order_id):
        dm.require_active_context().dal.orders.ship(order_id)

What it guarantees:

- **A context around every task body.** Each run of a task (each retry is a
  new run) executes inside a new ``dm.context(meta)``, opened just before the
  body and closed just after it, before Celery stores the result: a task
  whose commit fails is a failed task. A body that raises rolls back.
  Celery's ``Ignore`` (also raised by ``self.replace()``) is not a failure and
  commits. Celery's own tasks (names starting with ``celery.``) run as they are.
- **Meta** of a task's context: ``task_id``, ``task_name``, ``retries``,
  ``parent_id``, ``root_id``, ``eager``, the message headers named in
  ``headers``, and whatever ``meta(task)`` returns merged over them.
- **Send on commit.** ``delay()`` and ``apply_async()`` called inside an open
  context do not send: the message is sent by the context's ``on_commit``
  hook, after the transaction committed, so the worker sees what the
  sender wrote. A context that rolls back sends nothing. They return a
  :class:`PendingResult` whose id is fixed at once. Outside any context,
  inside ``with send_immediately():`` or with
  ``apply_async(..., polydatum_immediate=True)`` they send right away.
- **Headers follow the work.** A task sent from a context carries the meta
  values named in ``headers`` as message headers (unless given explicitly),
  so a web request's ``request_id`` reaches the task's meta.
- **Read-your-writes.** A task sent from a context carries the commit
  positions of its databases (its meta's ``min_position`` and what it
  committed, see :meth:`polydatum.sqlalchemy.Database.committed_position`)
  in the :data:`POSITION_HEADER` header; the task's context gets them as
  meta ``min_position``, so it never reads from a replica older than what
  its sender wrote. A task written to an outbox carries only the sender's
  incoming positions: its own commit is not known when the row is written.
- **Headers are checked on both sides** by one function,
  :func:`check_header`: str (at most 200 printable characters), int (within
  64 bits), finite float or bool. The sender raises; the worker refuses a
  message with a bad header, or with a ``retries`` count that is not an int
  of at least 0, with :class:`~polydatum.errors.InvalidInput` before the
  body runs (the task fails; nothing of it ran).
- **Transient retries.** With ``retry_transient=N`` (for the app, or per
  task: ``@app.task(retry_transient=N)``) a run that failed with a transient
  database error (:func:`polydatum.sqlalchemy.is_transient`: SQLSTATE 40001,
  40P01) is retried by Celery's own :meth:`~celery.app.task.Task.retry`, up
  to N times, each in a fresh context. The count is the message's
  ``retries``, which only Celery's retry raises and the worker refuses
  below 0, so no message can run more than N + 1 times in all.

.. versionadded:: 2.0
"""

from __future__ import annotations

import base64
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

try:
    from celery import Celery, Task, signature
    from celery import _state as celery_state
    from celery.exceptions import Ignore, Retry
    from celery.result import AsyncResult
    from kombu import serialization
    from kombu.exceptions import LimitExceeded, OperationalError
    from kombu.pools import ProducerPool
    from kombu.utils import json as kombu_json
    from kombu.utils.uuid import uuid
except ImportError:  # pragma: no cover - exercised only without the extra
    msg = 'polydatum.celery needs Celery; install it with: pip install "polydatum[celery]"'
    raise ImportError(msg) from None

from polydatum import _positions, _telemetry
from polydatum._renamed import renamed_keyword
from polydatum.dal import DataManager
from polydatum.errors import AlreadyExistsException, EffectDeferred, InvalidInput, TaskNotSent

__all__ = [
    "IMMEDIATE",
    "MAX_HEADER_LENGTH",
    "OUTBOX_TOPIC",
    "POSITION_HEADER",
    "MetaFactory",
    "PendingResult",
    "PolydatumTask",
    "TaskNotSent",
    "check_header",
    "default_meta",
    "install",
    "send_immediately",
]


class _EagerJoinGuard:
    """Keeps eager runs on several threads from leaving Celery's join flag set.

    Eager mode wraps each run in Celery's ``denied_join_result()``, which saves
    and restores one process-wide flag. When runs on two threads overlap
    (a threaded development server), the later one can restore the value the
    earlier one set, and every ``AsyncResult.get()`` in the process then fails
    with "Never call result.get() within a task!". Runs started here are
    counted; the last one to finish puts back the flag the first one found.
    """

    __slots__ = ("_lock", "_running", "_saved")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._saved = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._running == 0:
                self._saved = celery_state.task_join_will_block()
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    celery_state._set_task_join_will_block(self._saved)


_eager_join_guard = _EagerJoinGuard()


#: The ``apply_async`` option that sends at once, even inside a context.
IMMEDIATE = "polydatum_immediate"

#: ``meta(task) -> mapping``, merged over :func:`default_meta`.
MetaFactory = Callable[[Any], Mapping[str, Any]]

#: The message header carrying meta ``min_position`` (``name=X/X|...``) to the task.
POSITION_HEADER = "polydatum_min_position"

# Message headers Celery itself uses; a user header of that name would be lost.
_RESERVED_HEADERS = frozenset(
    {
        "lang",
        "task",
        "id",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
        "stamped_headers",
        "stamps",
        "replaced_task_nesting",
        "headers",
        "args",
        "kwargs",
        "chord",
        "callbacks",
        "errbacks",
        "chain",
        "reply_to",
        "correlation_id",
    }
)

_MISSING = object()

#: The longest str a header named in ``install(headers=...)`` may carry.
MAX_HEADER_LENGTH = 200

# The largest int an AMQP header carries (a signed 64-bit "long long").
_MAX_HEADER_INT = 2**63 - 1

# The longest wait before a transient retry, in seconds.
_MAX_TRANSIENT_BACKOFF = 60.0

# True while sends must not wait for a commit (retries, send_immediately()).
_send_now: ContextVar[bool] = ContextVar("polydatum.celery.send_now", default=False)


@contextmanager
def send_immediately() -> Iterator[None]:
    """Within this block, tasks are sent at once, even inside an open context.

    For code that calls ``delay()`` (which has no room for options) or sends
    a canvas. For one call, ``apply_async(..., polydatum_immediate=True)``
    does the same.

    .. versionadded:: 2.0
    """
    token = _send_now.set(True)
    try:
        yield
    finally:
        _send_now.reset(token)


@dataclass(frozen=True)
class _Wiring:
    data_manager: DataManager
    meta: MetaFactory | None
    headers: tuple[str, ...]
    retry_if: Callable[[BaseException], bool] | None
    outbox: Any = None  # a polydatum.outbox.Outbox: sends go through it
    inbox: Any = None  # a polydatum.outbox.Inbox: each message id runs once


#: Seconds a send through the outbox may take when ``broker_connection_timeout`` is unset.
DEFAULT_SEND_TIMEOUT = 4.0

#: The outbox topic of task sends (see ``install(outbox=...)``).
OUTBOX_TOPIC = "polydatum.celery"


class PendingResult(AsyncResult):  # type: ignore[misc]  # celery is untyped
    """What ``delay()``/``apply_async()`` return inside a context: an id known at once.

    It is an :class:`~celery.result.AsyncResult` for the task id the message
    will carry, so the id can be stored (and ``AsyncResult(id)`` used) before
    anything is sent. Once the context committed and the message was sent, it
    answers like the result Celery returned (an ``EagerResult`` in eager mode).
    Waiting on it before that raises :class:`TaskNotSent` instead of blocking
    forever.

    Attributes:
        outcome: ``"waiting for commit"``, ``"sent"``, ``"discarded"`` (the
            context rolled back), ``"send failed"`` or, with
            ``install(outbox=...)``, ``"in outbox"`` (committed: it is sent
            right after the commit or by a relay).
        sent_result: the result Celery returned when it sent, else None.
        send_error: the exception raised while sending at commit, else None.

    .. versionadded:: 2.0
    """

    def __init__(self, task_id: str, task_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(task_id, **kwargs)
        self.task_name = task_name
        self.outcome = "waiting for commit"
        self.sent_result: Any = None
        self.send_error: BaseException | None = None

    def _send(self, send: Callable[[], Any]) -> None:
        try:
            self.sent_result = send()
        except BaseException as exc:
            self.outcome = "send failed"
            self.send_error = exc
            raise  # logged and collected by the context as a hook error
        self.outcome = "sent"

    def _discard(self) -> None:
        self.outcome = "discarded"

    def _queued(self) -> None:
        # Committed in the outbox: the message goes out (now or by a relay)
        # with this id, so the result is the task's own AsyncResult.
        self.outcome = "in outbox"
        self.sent_result = AsyncResult(self.id, backend=self.backend, app=self.app)

    def _target(self) -> Any:
        if self.sent_result is not None:
            return self.sent_result
        if self.outcome == "discarded":
            msg = f"task {self.task_name}[{self.id}] was never sent: the context that sent it rolled back"
        elif self.outcome == "send failed":
            msg = (
                f"task {self.task_name}[{self.id}] could not be sent when its context committed: "
                f"{self.send_error!r}"
            )
            raise TaskNotSent(msg) from self.send_error
        else:
            msg = (
                f"task {self.task_name}[{self.id}] is sent when the context that sent it commits; "
                f"wait for its result after that context ended, or send it with "
                f"apply_async(..., {IMMEDIATE}=True)"
            )
        raise TaskNotSent(msg)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        """Wait for the task's return value, as :meth:`AsyncResult.get`.

        Raises:
            TaskNotSent: the task was not sent (yet), or sending it failed.
        """
        return self._target().get(*args, **kwargs)

    wait = get

    def ready(self) -> bool:
        """True once the task finished (False while it was not sent)."""
        if self.sent_result is None:
            return False
        return bool(self.sent_result.ready())

    @property
    def state(self) -> str:
        """The task's state; ``PENDING`` while it was not sent."""
        if self.sent_result is None:
            return "PENDING"
        return str(self.sent_result.state)

    status = state

    @property
    def result(self) -> Any:
        """The return value or exception; None while the task was not sent."""
        if self.sent_result is None:
            return None
        return self.sent_result.result

    info = result

    def __repr__(self) -> str:
        return f"<PendingResult: {self.id} ({self.outcome})>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Elsewhere (another process, later) it is just the result of that task id.
        return (AsyncResult, (self.id, None, None, self.app))


def check_header(what: str, value: Any) -> None:
    """Refuse a value that may not travel as a message header named in ``install(headers=...)``.

    The one rule for both sides: the sender raises it at ``delay()``, the
    worker refuses a message that breaks it. None means "not sent" and passes.

    Args:
        what: names the value in the message, e.g. ``"meta 'request_id'"``.
        value: the header's value.

    Raises:
        TypeError: not a str, int, float, bool or None.
        ValueError: a str longer than :data:`MAX_HEADER_LENGTH` or with a
            character that is not printable (a control character, NUL, an
            ANSI escape), an int beyond 64 bits, or a float that is not finite.

    .. versionadded:: 2.0
    """
    # The messages give the type and size of a bad value, never the value:
    # it may be 100 kB long or carry terminal escapes.
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if -_MAX_HEADER_INT - 1 <= value <= _MAX_HEADER_INT:  # a signed 64-bit AMQP field
            return
        msg = f"{what} is an int beyond 64 bits; send a smaller number, or a str"
        raise ValueError(msg)
    if isinstance(value, float):
        if math.isfinite(value):
            return
        msg = f"{what} is {value!r}; a float header must be finite"
        raise ValueError(msg)
    if isinstance(value, str):
        if len(value) > MAX_HEADER_LENGTH:
            msg = f"{what} is {len(value)} characters long; header values have at most {MAX_HEADER_LENGTH}"
            raise ValueError(msg)
        if not value.isprintable():
            msg = f"{what} holds an unprintable character (a control character, NUL, an escape); remove it"
            raise ValueError(msg)
        return
    msg = (
        f"{what} is a {type(value).__name__}; only str, int, float and bool values travel as message headers"
    )
    raise TypeError(msg)


def default_meta(task: Any) -> dict[str, Any]:
    """The meta every task's context gets, from its request.

    Returns:
        ``task_id``, ``task_name``, ``retries`` (0 on the first run),
        ``parent_id`` and ``root_id`` (None for a task nobody sent from a
        task), and ``eager`` (True when run by ``apply()`` or eager mode).

    Raises:
        InvalidInput: the message's ``retries`` is not an int of at least 0, or one of its task
            ids is not a str of 1 to 200 printable characters.

    .. versionadded:: 2.0
    """
    return _meta_from(task.name, task.request)


def _meta_from(name: str, request: Any) -> dict[str, Any]:
    return {
        "task_id": _task_id(name, "id", request.id),
        "task_name": name,
        "retries": _retries(name, request),
        "parent_id": _task_id(name, "parent_id", request.parent_id),
        "root_id": _task_id(name, "root_id", request.root_id),
        "eager": bool(request.is_eager),
    }


def _task_id(name: str, field: str, value: Any) -> str | None:
    """A task id of the message (its own, its parent's, its root's), refused unless one could be.

    They go into the meta that tasks read and log, like the headers of
    ``install(headers=...)``, and a sender other than Celery may put anything
    there: the same rule (a str of at most 200 printable characters) holds.
    A ``uuid.UUID`` or an int (``apply_async(task_id=uuid4())``) becomes its str.
    """
    if value is None:
        return None
    if isinstance(value, UUID) or (
        isinstance(value, int)
        and not isinstance(value, bool)
        and -_MAX_HEADER_INT - 1 <= value <= _MAX_HEADER_INT
    ):
        return str(value)  # apply_async(task_id=uuid4()) or an int: Celery takes them as they are
    if isinstance(value, str) and value:
        try:
            check_header("", value)
        except ValueError:
            pass
        else:
            return value
        problem = (
            f"is {len(value)} characters long"
            if len(value) > MAX_HEADER_LENGTH
            else "holds an unprintable character (a control character, NUL, an escape)"
        )
    else:
        problem = "is empty" if value == "" else f"is a {type(value).__name__}"
    msg = (
        f"task {name} refused before it ran: its message's {field} {problem}, so it is not a task id "
        f"(a str of 1 to {MAX_HEADER_LENGTH} printable characters, a UUID or an int): the message was "
        "forged or built by hand"
    )
    raise InvalidInput(msg)


def _retries(name: str, request: Any) -> int:
    """How many runs came before this one, as the message says; refused unless a count.

    Celery's retry sends the count plus one, so a count of at least 0 only
    grows along a chain of retries: a limit compared with it holds for every
    message. A negative count would buy a message extra runs (``retries=-20``
    and ``retry_transient=3``: 24 runs), so it is refused with the rest.
    """
    retries = request.retries
    if isinstance(retries, bool) or not isinstance(retries, int):
        problem = f"a {type(retries).__name__}"
    elif retries < 0:
        problem = "negative"
    elif retries > _MAX_HEADER_INT:
        problem = "beyond 64 bits"
    else:
        return retries
    msg = (
        f"task {name} refused before it ran: its message's retries is {problem}, not a count "
        f"of earlier runs (an int of at least 0); Celery never sends that, so the message was forged "
        f"or built by hand"
    )
    raise InvalidInput(msg)


class _BlankRequest:
    id = parent_id = root_id = None
    retries = 0
    is_eager = False


# The meta keys default_meta sets from the message itself, read off _meta_from
# so that a key added there is refused as a header name at once.
_OWN_META = frozenset(_meta_from("", _BlankRequest()))


def _trace_carrier(request: Any) -> dict[str, Any]:
    """The W3C trace-context headers of a task message (what polydatum.otel sent)."""
    carrier = {}
    for name in ("traceparent", "tracestate"):
        value = _header(request, name)
        if isinstance(value, str):
            carrier[name] = value
    return carrier


def _header(request: Any, name: str) -> Any:
    headers = request.headers
    if isinstance(headers, Mapping) and name in headers:
        return headers[name]
    return getattr(request, name, None)


def _check_retry_options(owner: str, attempts: Any, backoff: Any) -> None:
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        msg = f"{owner}: retry_transient must be an int of at least 0 (retries), got {attempts!r}"
        raise ValueError(msg)
    if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or backoff < 0:
        msg = f"{owner}: retry_transient_backoff must be a number of seconds >= 0, got {backoff!r}"
        raise ValueError(msg)


def _is_transient(exc: BaseException) -> bool:
    try:
        from polydatum.sqlalchemy import is_transient
    except ImportError:  # no SQLAlchemy, so no SQLAlchemy error to retry
        return False
    return is_transient(exc)


class PolydatumTask(Task):  # type: ignore[misc]  # celery is untyped
    """The task base class :func:`install` gives a Celery app.

    Task options it adds (``@app.task(retry_transient=3)``):

    Attributes:
        retry_transient: how many times a run that failed with a transient
            database error is retried (0: never).
        retry_transient_backoff: seconds before the first such retry,
            doubling each time (with jitter, at most 60 s).

    Use it through :func:`install`; a task built on it directly, with no
    DataManager installed, raises ``RuntimeError`` when it runs or is sent.

    .. versionadded:: 2.0
    """

    retry_transient: int = 0
    retry_transient_backoff: float = 0.1
    _polydatum: _Wiring | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Task options become class attributes: check them when the task is made.
        _check_retry_options(
            f"task {cls.__dict__.get('name') or cls.__name__}",
            cls.retry_transient,
            cls.retry_transient_backoff,
        )

    @classmethod
    def _wiring(cls) -> _Wiring:
        wiring = cls._polydatum
        if wiring is None:
            msg = (
                f"task {cls.__dict__.get('name') or cls.__name__} is a PolydatumTask with no "
                f"DataManager; wire the app with polydatum.celery.install(app, dm) before defining tasks"
            )
            raise RuntimeError(msg)
        return wiring

    # -- running -----------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task body inside a new context (see the module documentation)."""
        name = self.name
        if name is not None and name.startswith("celery."):
            return super().__call__(*args, **kwargs)
        wiring = self._wiring()
        dm = wiring.data_manager
        request = self.request
        if request.called_directly and dm.get_active_context() is not None:
            # A plain function call from code already in a context joins it.
            return super().__call__(*args, **kwargs)
        # Both raise InvalidInput for a forged message, before any context opens.
        retries = _retries(self.name, request)
        meta = self._context_meta(wiring, request)
        # Celery's worker (and apply()) pushed the request and the task already;
        # Task.__call__ would push copies of both again.
        body = super().__call__ if request.called_directly else self.run
        ignored: BaseException | None = None
        inbox = None if request.called_directly else wiring.inbox
        sink = None if request.called_directly else _telemetry.sink
        trace = sink.task_started(_trace_carrier(request)) if sink is not None else None
        try:
            with dm.context(meta) as ctx:
                try:
                    if inbox is not None and request.id and inbox.seen(ctx, str(request.id)):
                        # A committed run of this very message exists: acknowledge, run nothing.
                        return None
                    return body(*args, **kwargs)
                except Ignore as exc:
                    # Not a failure (self.replace() raises it): commit, then re-raise.
                    ignored = exc
        except Exception as exc:
            if request.called_directly or isinstance(exc, Retry) or not self._retryable(wiring, exc, retries):
                raise
            self._retry_transient(exc, retries)
        finally:
            if sink is not None:
                sink.task_ended(trace)
        if ignored is not None:
            raise ignored
        return None

    def _context_meta(self, wiring: _Wiring, request: Any) -> dict[str, Any]:
        meta = _meta_from(self.name, request)
        sent = _header(request, POSITION_HEADER)
        if sent is not None:
            try:
                meta[_positions.META_KEY] = _positions.decode(sent)
            except ValueError as exc:
                msg = (
                    f"task {self.name} refused before it ran: its {POSITION_HEADER} header is not "
                    f"what polydatum.celery sends ({exc}), so the message was forged or built by hand"
                )
                raise InvalidInput(msg) from None
        for header in wiring.headers:
            value = _header(request, header)
            try:
                check_header(f"message header {header!r}", value)
            except (TypeError, ValueError) as exc:
                # Refused rather than dropped: a header read as None may mean
                # more to the app than "absent" (no tenant: every tenant?).
                msg = (
                    f"task {self.name} refused before it ran: {exc}. polydatum.celery never sends "
                    f"such a header, so the message was forged or built by hand"
                )
                raise InvalidInput(msg) from None
            meta[header] = value
        if wiring.meta is not None:
            extra = wiring.meta(self)
            if not isinstance(extra, Mapping):
                msg = f"meta(task) must return a mapping, got {type(extra).__name__} for task {self.name}"
                raise TypeError(msg)
            meta.update(extra)
        return meta

    def _retryable(self, wiring: _Wiring, exc: Exception, retries: int) -> bool:
        if self.retry_transient <= retries:
            return False
        check = wiring.retry_if or _is_transient
        return bool(check(exc))

    def _retry_transient(self, exc: Exception, retries: int) -> None:
        wait = min(_MAX_TRANSIENT_BACKOFF, self.retry_transient_backoff * 2.0**retries)
        # retry(max_retries=...) leaves override_max_retries on the shared task
        # object, where autoretry_for would read it later: put it back.
        saved = self.__dict__.get("override_max_retries", _MISSING)
        try:
            countdown = wait * random.uniform(0.5, 1.0)
            raise self.retry(exc=exc, countdown=countdown, max_retries=self.retry_transient)
        finally:
            if saved is _MISSING:
                self.__dict__.pop("override_max_retries", None)
            else:
                self.__dict__["override_max_retries"] = saved

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's :meth:`~celery.app.task.Task.retry`; the retry is sent at once.

        The failing run rolls back, so its retry must not wait for its commit.
        """
        token = _send_now.set(True)
        try:
            return super().retry(*args, **kwargs)
        finally:
            _send_now.reset(token)

    # -- sending -----------------------------------------------------------

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Celery's :meth:`~celery.app.task.Task.apply_async`, sent when the context commits.

        Inside an open context the message is sent by the context's
        ``on_commit`` hook and a :class:`PendingResult` is returned at once.
        Outside a context, inside :func:`send_immediately`, or with
        ``polydatum_immediate=True``, it sends now and returns what Celery
        returns. The arguments are checked (signature, serializer) now, not
        at commit. A ``producer`` is not kept for a send that waits: it may be
        released by then, so the send at commit acquires its own.

        Raises:
            TypeError: ``polydatum_immediate`` is not a bool, the arguments
                do not fit the task's signature, or a header named in
                ``install(headers=...)`` (given, or taken from the meta) has a
                type headers cannot carry (see :func:`check_header`).
            ValueError: such a header's value is refused (see :func:`check_header`).
            kombu.exceptions.EncodeError: the arguments cannot be serialized.
        """
        immediate = options.pop(IMMEDIATE, False)
        if not isinstance(immediate, bool):
            msg = f"{IMMEDIATE} must be True or False, got {immediate!r}"
            raise TypeError(msg)
        wiring = self._wiring()
        ctx = wiring.data_manager.get_active_context()
        if wiring.headers and (ctx is not None or options.get("headers")):
            meta = ctx.meta if ctx is not None else {}
            options["headers"] = self._outgoing_headers(wiring, meta, options.get("headers"))
        if ctx is not None:
            _carry_positions(options, _positions.required(ctx))
        eager = bool(self._get_app().conf.task_always_eager)
        sink = _telemetry.sink
        if sink is not None:
            # A copy: the trace context is written into it when the message goes.
            options["headers"] = dict(options.get("headers") or {})
        if ctx is None or immediate or _send_now.get():
            send_now = super().apply_async
            if sink is not None:
                return sink.publish(
                    self.name,
                    options["headers"],
                    lambda: self._send_now(
                        eager, send_now, args, kwargs, task_id, producer, link, link_error, shadow, options
                    ),
                )
            if eager:
                with _eager_join_guard():
                    return send_now(args, kwargs, task_id, producer, link, link_error, shadow, **options)
            return send_now(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        to_outbox = wiring.outbox is not None and not eager
        # Through the outbox, _to_outbox serializes the arguments itself (once).
        self._check_call(args, kwargs, options, serialize=not to_outbox)
        task_id = task_id or uuid()
        result = PendingResult(task_id, backend=self.backend, task_name=self.name, app=self._get_app())
        if to_outbox:
            if sink is not None:
                # The row keeps the trace context of the call that sent it; the relay's send continues it.
                sink.inject(options["headers"])
            self._to_outbox(ctx, wiring, args, kwargs, task_id, link, link_error, shadow, options)
            ctx.on_commit(result._queued)
            ctx.on_rollback(result._discard)
            return result
        parent = super().apply_async

        def send() -> Any:
            # Sent after the commit: the task reads no older data than this context wrote.
            _carry_positions(options, _positions.required(ctx))
            if sink is not None:
                # At commit, in the context's span: the publish span is its child.
                return sink.publish(
                    self.name,
                    options["headers"],
                    lambda: self._send_now(
                        eager, parent, args, kwargs, task_id, None, link, link_error, shadow, options
                    ),
                )
            if eager:
                with _eager_join_guard():
                    return parent(args, kwargs, task_id, None, link, link_error, shadow, **options)
            return parent(args, kwargs, task_id, None, link, link_error, shadow, **options)

        ctx.on_commit(result._send, send)
        ctx.on_rollback(result._discard)
        return result

    @staticmethod
    def _send_now(eager: bool, send: Callable[..., Any], *args: Any) -> Any:
        *positional, options = args
        if eager:
            with _eager_join_guard():
                return send(*positional, **options)
        return send(*positional, **options)

    def _to_outbox(
        self,
        ctx: Any,
        wiring: _Wiring,
        args: Any,
        kwargs: Any,
        task_id: str,
        link: Any,
        link_error: Any,
        shadow: str | None,
        options: dict[str, Any],
    ) -> None:
        """Write the message as an outbox row of the context's transaction."""
        app = self._get_app()
        options = dict(options)
        now = datetime.now(timezone.utc)
        countdown = options.pop("countdown", None)
        if countdown is not None and options.get("eta") is None:
            # Counted from now, not from whenever the relay sends it.
            options["eta"] = now + timedelta(seconds=float(countdown))
        expires = options.get("expires")
        if isinstance(expires, (int, float)) and not isinstance(expires, bool):
            options["expires"] = now + timedelta(seconds=float(expires))
        if shadow is not None:
            options["shadow"] = shadow
        for name, value in (("link", link), ("link_error", link_error)):
            if value is not None:
                sigs = value if isinstance(value, (list, tuple)) else [value]
                options[name] = [dict(sig) for sig in sigs]
        parent = app.current_worker_task
        if parent is not None and parent.request.id:
            # The relay has no current task: keep the ids Celery would have taken from it.
            options.setdefault("parent_id", parent.request.id)
            options.setdefault("root_id", parent.request.root_id or parent.request.id)
        serializer = options.get("serializer") or self.serializer or app.conf.task_serializer
        content_type, encoding, body = serialization.dumps((args or (), kwargs or {}), serializer)  # type: ignore[no-untyped-call]
        if isinstance(body, bytes):
            body = base64.b64encode(body).decode("ascii")
            encoding = f"base64+{encoding}"
        try:
            encoded_options = kombu_json.dumps(options)  # type: ignore[no-untyped-call]
        except TypeError as exc:
            msg = f"the options of task {self.name} cannot be stored in the outbox: {exc}"
            raise TypeError(msg) from None
        payload = {
            "task": self.name,
            "id": task_id,
            "content_type": content_type,
            "encoding": encoding,
            "body": body,
            "options": encoded_options,
        }
        wiring.outbox.add(ctx, OUTBOX_TOPIC, payload)

    @staticmethod
    def _outgoing_headers(wiring: _Wiring, meta: Mapping[str, Any], given: Any) -> dict[str, Any]:
        """The given headers plus the meta's, each checked as the worker will check it."""
        headers = dict(given or {})
        for name in wiring.headers:
            if name in headers:
                # Refused here, where the caller sees it, not by the worker.
                check_header(f"header {name!r}", headers[name])
                continue
            value = meta.get(name)
            if value is None:
                continue
            try:
                check_header(f"meta {name!r}", value)
            except (TypeError, ValueError) as exc:
                # Found now rather than as a failed send after the commit.
                msg = f"{exc}: put an id in the meta, or drop {name!r} from install(headers=...)"
                raise type(exc)(msg) from None
            headers[name] = value
        return headers

    def _check_call(
        self, args: Any, kwargs: Any, options: Mapping[str, Any], *, serialize: bool = True
    ) -> None:
        # What Celery would find at send time, found now: a send at commit has no caller.
        if self.typing:
            check = getattr(self, "__header__", None)
            if check is not None:
                check(*(args or ()), **(kwargs or {}))
        if not serialize:
            return
        serializer = options.get("serializer") or self.serializer or self._get_app().conf.task_serializer
        if getattr(self, "pydantic", False) and serializer != "pickle":
            return  # Celery dumps pydantic models itself before serializing
        serialization.dumps((args or (), kwargs or {}), serializer)  # type: ignore[no-untyped-call]


def _carry_positions(options: dict[str, Any], positions: Mapping[str, str]) -> None:
    """Put the commit positions a task must read past into its message headers."""
    if positions:
        headers = dict(options.get("headers") or {})
        headers[POSITION_HEADER] = _positions.encode(positions)
        options["headers"] = headers


def _later_positions(options: Mapping[str, Any], now: Mapping[str, str]) -> dict[str, str]:
    """``now`` merged over the positions a stored message already carries (the later of each)."""
    headers = options.get("headers") or {}
    carried = _positions.decode(headers[POSITION_HEADER]) if POSITION_HEADER in headers else {}
    for name, position in now.items():
        carried[name] = _positions.later(carried.get(name), position)
    return carried


def _header_names(headers: Iterable[str]) -> tuple[str, ...]:
    if isinstance(headers, (str, bytes)) or not isinstance(headers, Iterable):
        msg = f'headers must be a sequence of header names, e.g. ("request_id",), got {headers!r}'
        raise TypeError(msg)
    names = tuple(headers)
    for name in names:
        if not isinstance(name, str) or not name:
            msg = f"headers must be non-empty strings, got {name!r}"
            raise TypeError(msg)
        if name in _RESERVED_HEADERS:
            msg = f"header {name!r} is one Celery uses itself; choose another name"
            raise ValueError(msg)
        if name in _OWN_META or name == POSITION_HEADER:
            # A header copied into the meta would replace what the worker knows
            # of the task itself (a sender could claim another task_id).
            msg = (
                f"header {name!r} names meta polydatum sets for every task "
                f"({', '.join(sorted(_OWN_META))}) or its own position header; choose another name"
            )
            raise ValueError(msg)
    return names


def _inbox_from(inbox: Any, outbox: Any) -> Any:
    if outbox is not None:
        from polydatum.outbox import Outbox

        if not isinstance(outbox, Outbox):
            msg = f"outbox must be a polydatum.outbox.Outbox, got {type(outbox).__name__}"
            raise TypeError(msg)
    if inbox is False or inbox is None:
        return None
    from polydatum.outbox import Inbox

    if isinstance(inbox, Inbox):
        return inbox
    if inbox is True:
        if outbox is None:
            msg = "inbox=True needs outbox=...; or pass inbox=Inbox(database)"
            raise TypeError(msg)
        return Inbox(outbox)
    msg = f"inbox must be True, False or a polydatum.outbox.Inbox, got {inbox!r}"
    raise TypeError(msg)


def _send_timeout(app: Celery) -> float:
    """The longest a send through the outbox may take: the app's ``broker_connection_timeout``."""
    timeout = app.conf.broker_connection_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        return DEFAULT_SEND_TIMEOUT
    return float(timeout)


def _outbox_sender(app: Celery, outbox: Any) -> Callable[[Any], None]:
    """The outbox handler of task sends: publish the stored message with ``app``."""
    return _OutboxPublisher(app, getattr(outbox.database, "current_positions", None))


class _OutboxPublisher:
    """Publishes the messages stored in the outbox, each in one attempt bounded by the send timeout.

    A failed send is retried by the outbox, with backoff, so nothing here
    retries. Celery's own publish would wait for a pooled producer without a
    limit and retry the connection past ``broker_connection_timeout``
    (measured with a stopped broker: 6-8 s a send, 14 s with 20 concurrent
    senders), all of it inside the committing request, or for every row of
    a relay's batch. Once the broker could not be reached, sends are deferred
    (:class:`~polydatum.errors.EffectDeferred`: the row waits without spending
    an attempt) for :attr:`PAUSE` seconds instead of each paying for a
    connection attempt.
    """

    #: Seconds after a failed connection during which sends are deferred without trying.
    PAUSE = 1.0

    def __init__(self, app: Celery, positions_now: Callable[[], dict[str, str]] | None = None) -> None:
        self.app = app
        self._positions_now = positions_now
        self._down_until = 0.0  # time.monotonic(); written from any thread, a float is atomic
        self._down_error = ""
        self._producers: Any = None
        self._producers_pid = 0
        self._lock = threading.Lock()

    def _producer_pool(self) -> Any:
        """Producers on connections of their own, with publisher confirms.

        The outbox deletes a row once its send returned, so the send must not
        return before the broker has the message. AMQP's publisher confirms
        make the publish wait for the broker's ack (a nack, say from a full
        queue that rejects publishes, raises); without them a message written
        to the socket counts as sent, and a broker that refused or never read
        it loses it with its row. The app's own pool keeps its settings: only
        the outbox pays for the wait. Transports without confirms ignore the option.
        """
        pool = self._producers
        if pool is None or self._producers_pid != os.getpid():
            with self._lock:
                pool = self._producers
                if pool is None or self._producers_pid != os.getpid():
                    # (A fresh pool after a fork: the parent's sockets are not the child's.)
                    app = self.app
                    connection = app.connection_for_write(transport_options={"confirm_publish": True})
                    limit = app.conf.broker_pool_limit
                    pool = ProducerPool(  # type: ignore[no-untyped-call]
                        connection.Pool(limit=limit), limit=limit, Producer=app.amqp.Producer
                    )
                    self._producers, self._producers_pid = pool, os.getpid()
                    # Closed with this sender (its outbox and app gone), not left to the collector.
                    weakref.finalize(self, _close_producers, pool, os.getpid())
        return pool

    def __repr__(self) -> str:
        return f"<outbox sender of {self.app!r}>"

    def __call__(self, effect: Any) -> None:
        app = self.app
        p = effect.payload
        body: Any = p["body"]
        encoding = p["encoding"]
        if encoding.startswith("base64+"):
            body = base64.b64decode(body)
            encoding = encoding[len("base64+") :]
        args, kwargs = serialization.loads(body, p["content_type"], encoding, accept={p["content_type"]})  # type: ignore[no-untyped-call]
        options = kombu_json.loads(p["options"])  # type: ignore[no-untyped-call]
        for name in ("link", "link_error"):
            if name in options:
                options[name] = [signature(sig, app=app) for sig in options[name]]
        if self._positions_now is not None:
            # The row's context committed before it could be delivered, so the
            # primary's position now is past that commit: the task never reads
            # a replica older than the request that sent it.
            _carry_positions(options, _later_positions(options, self._positions_now()))
        wait = self._down_until - time.monotonic()
        if wait > 0:
            # Not tried: the row waits out the pause without spending an attempt.
            msg = f"the broker could not be reached a moment ago ({self._down_error}); the outbox retries"
            raise EffectDeferred(msg, wait)
        timeout = _send_timeout(app)
        try:
            producer = self._producer_pool().acquire(block=True, timeout=timeout)
        except LimitExceeded:
            msg = (
                f"no broker connection of the pool came free within {timeout} s "
                f"(broker_pool_limit={app.conf.broker_pool_limit}); the outbox retries this send"
            )
            raise OperationalError(msg) from None
        try:
            connection = producer.connection
            try:
                connection.ensure_connection(max_retries=0, timeout=timeout)

                def send() -> Any:
                    return app.send_task(
                        p["task"],
                        args,
                        kwargs,
                        task_id=p["id"],
                        producer=producer,
                        retry=False,
                        confirm_timeout=timeout,
                        **options,
                    )

                sink = _telemetry.sink
                if sink is None:
                    send()
                else:
                    headers = options.get("headers")
                    if not isinstance(headers, dict):
                        headers = options["headers"] = {}
                    sink.publish(p["task"], headers, send)
            except (OperationalError, *connection.connection_errors) as exc:
                if _nacked(exc):
                    # The broker is up and refused this message: the row retries with its
                    # backoff, and the other rows (maybe for other queues) are not paused.
                    msg = (
                        f"the broker refused task {p['task']!r} (a negative publisher confirm: a "
                        "full queue that rejects publishes, or a broker out of resources); "
                        "the outbox retries this send"
                    )
                    raise OperationalError(msg) from exc
                self._down_error = f"{type(exc).__name__}: {exc}"[:200]
                self._down_until = time.monotonic() + self.PAUSE
                raise
        finally:
            producer.release()


def _close_producers(pool: Any, pid: int) -> None:
    # After a fork the child only drops the parent's connections (as Celery does
    # with its own pool): closing them would end the parent's AMQP sessions.
    if os.getpid() == pid:
        pool.force_close_all()
        pool.connections.force_close_all()


def _nacked(exc: BaseException) -> bool:
    """Whether ``exc`` is (or was raised from) the broker's negative publisher confirm."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if type(current).__name__ == "MessageNacked":
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


@renamed_keyword("data_manager", "dm")
def install(
    app: Celery,
    dm: DataManager,
    *,
    meta: MetaFactory | None = None,
    headers: Iterable[str] = (),
    retry_transient: int = 0,
    retry_transient_backoff: float = 0.1,
    retry_if: Callable[[BaseException], bool] | None = None,
    outbox: Any = None,
    inbox: Any = False,
) -> type[PolydatumTask]:
    """Run every task of ``app`` in a context of ``dm``; send tasks on commit.

    Call it before defining the app's tasks: it sets ``app.Task``, the base
    class of every task ``@app.task`` makes from then on (a task given its
    own ``base=`` must derive from ``app.Task``).

    Args:
        app: the Celery app.
        dm: the DataManager whose contexts the tasks run in.
        meta: ``meta(task) -> mapping`` merged over :func:`default_meta`;
            ``task.request`` is the Celery request (args, headers, hostname…).
        headers: message header names copied into the task's meta; sending
            from a context adds the context's meta values of these names as
            headers. Their values must pass :func:`check_header` when sent,
            and a message whose values do not is refused by the worker.
        retry_transient: default for the ``retry_transient`` task option:
            how many times to retry a run that failed with a transient
            database error.
        retry_transient_backoff: seconds before the first transient retry.
        retry_if: which errors are transient; default
            :func:`polydatum.sqlalchemy.is_transient`.
        outbox: a :class:`polydatum.outbox.Outbox` installed on
            ``dm``: ``delay()``/``apply_async()``
            inside a context write the message as an outbox row of the
            context's transaction (topic :data:`OUTBOX_TOPIC`) instead of
            sending it from a commit hook; the outbox sends it right after the
            commit, or a relay does later. Eager mode still sends at commit.
        inbox: True (with ``outbox``) or a :class:`polydatum.outbox.Inbox`:
            each task run records its message id in the inbox table in its
            own transaction, and a message whose id a committed run recorded
            is acknowledged without running its body.

    Returns:
        The new task base class (also ``app.Task``).

    Raises:
        TypeError: ``app`` is not a Celery app, ``dm`` not a
            DataManager, ``meta``/``retry_if`` not callable, ``headers`` not
            a sequence of strings.
        ValueError: a header name Celery uses itself, or a negative retry option.
        AlreadyExistsException: polydatum.celery is already installed on ``app``.
        RuntimeError: the app already made tasks without the polydatum base.

    .. versionadded:: 2.0
    """
    if not isinstance(app, Celery):
        msg = f"install() needs a celery.Celery app, got {type(app).__name__}"
        raise TypeError(msg)
    if not isinstance(dm, DataManager):
        msg = f"install() needs a polydatum DataManager, got {type(dm).__name__}"
        raise TypeError(msg)
    for option, value in (("meta", meta), ("retry_if", retry_if)):
        if value is not None and not callable(value):
            msg = f"{option} must be a callable or None, got {value!r}"
            raise TypeError(msg)
    names = _header_names(headers)
    _check_retry_options("install()", retry_transient, retry_transient_backoff)
    base = app.Task
    if isinstance(base, type) and issubclass(base, PolydatumTask):
        msg = f"polydatum.celery is already installed on {app!r}; install it once per app"
        raise AlreadyExistsException(msg)
    # Tasks made already keep their base class: they would run without a context.
    made = sorted(
        name
        for name, task in getattr(app, "_tasks", {}).items()
        if not name.startswith("celery.") and not isinstance(task, PolydatumTask)
    )
    if made:
        msg = (
            f"{app!r} already made tasks {', '.join(made)}; call polydatum.celery.install(app, dm) "
            f"before defining tasks, so that they run in polydatum contexts"
        )
        raise RuntimeError(msg)
    inbox_obj = _inbox_from(inbox, outbox)
    if outbox is not None:
        outbox.add_handler(OUTBOX_TOPIC, _outbox_sender(app, outbox))
    wiring = _Wiring(dm, meta, names, retry_if, outbox, inbox_obj)
    attrs = {
        "_polydatum": wiring,
        "retry_transient": retry_transient,
        "retry_transient_backoff": retry_transient_backoff,
        "__module__": __name__,
        "__doc__": PolydatumTask.__doc__,
    }
    cls: type[PolydatumTask] = type("PolydatumTask", (PolydatumTask, base), attrs)
    app.Task = cls
    return cls

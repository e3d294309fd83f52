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
- **Transient retries.** With ``retry_transient=N`` (for the app, or per
  task: ``@app.task(retry_transient=N)``) a run that failed with a transient
  database error (:func:`polydatum.sqlalchemy.is_transient`: SQLSTATE 40001,
  40P01) is retried by Celery's own :meth:`~celery.app.task.Task.retry`, up
  to N times, each in a fresh context.

.. versionadded:: 2.0
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

try:
    from celery import Celery, Task
    from celery.exceptions import Ignore, Retry
    from celery.result import AsyncResult
    from kombu import serialization
    from kombu.utils.uuid import uuid
except ImportError:  # pragma: no cover - exercised only without the extra
    msg = 'polydatum.celery needs Celery; install it with: pip install "polydatum[celery]"'
    raise ImportError(msg) from None

from polydatum.dal import DataManager
from polydatum.errors import AlreadyExistsException, PolydatumException

__all__ = [
    "IMMEDIATE",
    "MetaFactory",
    "PendingResult",
    "PolydatumTask",
    "TaskNotSent",
    "default_meta",
    "install",
    "send_immediately",
]

#: The ``apply_async`` option that sends at once, even inside a context.
IMMEDIATE = "polydatum_immediate"

#: ``meta(task) -> mapping``, merged over :func:`default_meta`.
MetaFactory = Callable[[Any], Mapping[str, Any]]

# Message headers Celery itself uses; a user header of that name would be lost.
_RESERVED_HEADERS = frozenset({
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
    "stamped_headers", "stamps", "replaced_task_nesting", "headers", "args", "kwargs",
    "chord", "callbacks", "errbacks", "chain", "reply_to", "correlation_id",
})

_MISSING = object()

# Meta values that may be copied into message headers.
_HEADER_TYPES = (str, int, float, bool)

# The longest wait before a transient retry, in seconds.
_MAX_TRANSIENT_BACKOFF = 60.0

# True while sends must not wait for a commit (retries, send_immediately()).
_send_now: ContextVar[bool] = ContextVar("polydatum.celery.send_now", default=False)


class TaskNotSent(PolydatumException, RuntimeError):
    """The result of a task that was not sent (yet, or ever) was asked for.

    A task sent inside a context is sent when that context commits; one sent
    in a context that rolled back is never sent.

    .. versionadded:: 2.0
    """


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
            context rolled back) or ``"send failed"``.
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

    def _target(self) -> Any:
        if self.sent_result is not None:
            return self.sent_result
        if self.outcome == "discarded":
            msg = (
                f"task {self.task_name}[{self.id}] was never sent: the context that sent it rolled back"
            )
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


def default_meta(task: Any) -> dict[str, Any]:
    """The meta every task's context gets, from its request.

    Returns:
        ``task_id``, ``task_name``, ``retries`` (0 on the first run),
        ``parent_id`` and ``root_id`` (None for a task nobody sent from a
        task), and ``eager`` (True when run by ``apply()`` or eager mode).

    .. versionadded:: 2.0
    """
    return _meta_from(task.name, task.request)


def _meta_from(name: str, request: Any) -> dict[str, Any]:
    return {
        "task_id": request.id,
        "task_name": name,
        "retries": request.retries or 0,
        "parent_id": request.parent_id,
        "root_id": request.root_id,
        "eager": bool(request.is_eager),
    }


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
        meta = self._context_meta(wiring, request)
        # Celery's worker (and apply()) pushed the request and the task already;
        # Task.__call__ would push copies of both again.
        body = super().__call__ if request.called_directly else self.run
        ignored: BaseException | None = None
        try:
            with dm.context(meta):
                try:
                    return body(*args, **kwargs)
                except Ignore as exc:
                    # Not a failure (self.replace() raises it): commit, then re-raise.
                    ignored = exc
        except Exception as exc:
            if request.called_directly or isinstance(exc, Retry) or not self._retryable(wiring, exc):
                raise
            self._retry_transient(exc, request.retries or 0)
        if ignored is not None:
            raise ignored
        return None

    def _context_meta(self, wiring: _Wiring, request: Any) -> dict[str, Any]:
        meta = _meta_from(self.name, request)
        for header in wiring.headers:
            meta[header] = _header(request, header)
        if wiring.meta is not None:
            extra = wiring.meta(self)
            if not isinstance(extra, Mapping):
                msg = f"meta(task) must return a mapping, got {type(extra).__name__} for task {self.name}"
                raise TypeError(msg)
            meta.update(extra)
        return meta

    def _retryable(self, wiring: _Wiring, exc: Exception) -> bool:
        if self.retry_transient <= (self.request.retries or 0):
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
            TypeError: ``polydatum_immediate`` is not a bool, or the arguments
                do not fit the task's signature.
            kombu.exceptions.EncodeError: the arguments cannot be serialized.
        """
        immediate = options.pop(IMMEDIATE, False)
        if not isinstance(immediate, bool):
            msg = f"{IMMEDIATE} must be True or False, got {immediate!r}"
            raise TypeError(msg)
        wiring = self._wiring()
        ctx = wiring.data_manager.get_active_context()
        if ctx is not None and wiring.headers:
            options["headers"] = self._propagated_headers(wiring, ctx.meta, options.get("headers"))
        if ctx is None or immediate or _send_now.get():
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        self._check_call(args, kwargs, options)
        task_id = task_id or uuid()
        result = PendingResult(task_id, backend=self.backend, task_name=self.name, app=self._get_app())
        parent = super().apply_async

        def send() -> Any:
            return parent(args, kwargs, task_id, None, link, link_error, shadow, **options)

        ctx.on_commit(result._send, send)
        ctx.on_rollback(result._discard)
        return result

    @staticmethod
    def _propagated_headers(wiring: _Wiring, meta: Mapping[str, Any], given: Any) -> dict[str, Any]:
        headers = dict(given or {})
        for name in wiring.headers:
            value = meta.get(name)
            if name in headers or value is None:
                continue
            if not isinstance(value, _HEADER_TYPES):
                # Found now rather than as a failed send after the commit.
                msg = (
                    f"meta {name!r} is a {type(value).__name__}; only str, int, float and bool values "
                    f"travel as message headers: put an id in the meta, "
                    f"or drop {name!r} from install(headers=...)"
                )
                raise TypeError(msg)
            headers[name] = value
        return headers

    def _check_call(self, args: Any, kwargs: Any, options: Mapping[str, Any]) -> None:
        # What Celery would find at send time, found now: a send at commit has no caller.
        if self.typing:
            check = getattr(self, "__header__", None)
            if check is not None:
                check(*(args or ()), **(kwargs or {}))
        serializer = options.get("serializer") or self.serializer or self._get_app().conf.task_serializer
        if getattr(self, "pydantic", False) and serializer != "pickle":
            return  # Celery dumps pydantic models itself before serializing
        serialization.dumps((args or (), kwargs or {}), serializer)  # type: ignore[no-untyped-call]


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
    return names


def install(
    app: Celery,
    data_manager: DataManager,
    *,
    meta: MetaFactory | None = None,
    headers: Iterable[str] = (),
    retry_transient: int = 0,
    retry_transient_backoff: float = 0.1,
    retry_if: Callable[[BaseException], bool] | None = None,
) -> type[PolydatumTask]:
    """Run every task of ``app`` in a context of ``data_manager``; send tasks on commit.

    Call it before defining the app's tasks: it sets ``app.Task``, the base
    class of every task ``@app.task`` makes from then on (a task given its
    own ``base=`` must derive from ``app.Task``).

    Args:
        app: the Celery app.
        data_manager: the DataManager whose contexts the tasks run in.
        meta: ``meta(task) -> mapping`` merged over :func:`default_meta`;
            ``task.request`` is the Celery request (args, headers, hostname…).
        headers: message header names copied into the task's meta; sending
            from a context adds the context's meta values of these names as
            headers (str, int, float and bool values only).
        retry_transient: default for the ``retry_transient`` task option:
            how many times to retry a run that failed with a transient
            database error.
        retry_transient_backoff: seconds before the first transient retry.
        retry_if: which errors are transient; default
            :func:`polydatum.sqlalchemy.is_transient`.

    Returns:
        The new task base class (also ``app.Task``).

    Raises:
        TypeError: ``app`` is not a Celery app, ``data_manager`` not a
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
    if not isinstance(data_manager, DataManager):
        msg = f"install() needs a polydatum DataManager, got {type(data_manager).__name__}"
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
        name for name, task in getattr(app, "_tasks", {}).items()
        if not name.startswith("celery.") and not isinstance(task, PolydatumTask)
    )
    if made:
        msg = (
            f"{app!r} already made tasks {', '.join(made)}; call polydatum.celery.install(app, dm) "
            f"before defining tasks, so that they run in polydatum contexts"
        )
        raise RuntimeError(msg)
    wiring = _Wiring(data_manager, meta, names, retry_if)
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

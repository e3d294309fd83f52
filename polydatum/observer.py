"""The observer seam: one object told about every context and DAL call of a manager.

Instrumentation (``polydatum.otel``, an in-process recorder) needs to see each
context from entry to end and to wrap each DAL call. Context and method
middleware can do both, but a manager with any middleware leaves its fast
paths, and a generator per context plus a request object per call cost more
than the telemetry itself. An observer costs one attribute test when absent
and a method call per event when present::

    class Timer(Observer):
        def context_entered(self, ctx):
            return time.perf_counter()

        def context_exited(self, ctx, state, exc):
            print("context took", time.perf_counter() - state)

        def dal_call(self, ctx, state, path, proceed, args, kwargs):
            return proceed(ctx, args, kwargs)

    dm.set_observer(Timer())

When each hook runs:

======================  =========================================================
hook                    when
======================  =========================================================
``context_entered``     after the context is pushed, before any context
                        middleware is set up (it is outside all of them); its
                        return value is the context's ``state``
``context_exiting``     the body has ended; before the middleware is torn
                        down (a streaming response may end its context from
                        another task or contextvars state than it was entered in)
``context_exited``      after the middleware was torn down and the
                        ``on_commit``/``on_rollback`` hooks ran, before the
                        resources close; ``exc`` is the exception that ends the
                        context (None: it committed)
``dal_call``            around every DAL call made in a context of the
                        manager, outside all method middleware; it must call
                        ``proceed(ctx, args, kwargs)`` (the middleware chain and
                        the method) once and return its result, which is an
                        awaitable for an async method
======================  =========================================================

A hook runs inline in the unit of work: it must be cheap and must not raise
(an exception from ``context_entered`` fails the context's entry; one from
``context_exiting`` or ``context_exited`` is collected like a hook error and the
context still closes whole: middleware, hooks, resources). A context entered before
:meth:`~polydatum.dal.DataManager.set_observer` (or under another observer)
is not told about, and its DAL calls get ``state`` None, as do calls made
after ``context_exited`` (a resource's teardown calling the DAL).

.. versionadded:: 2.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.middleware import PathSegment

__all__ = ["DalPath", "Observer", "Proceed"]

#: The path of a DAL call: ``dal.users.get`` is ``(PathSegment("users"), PathSegment("get"))``.
DalPath = tuple["PathSegment", ...]

#: ``proceed(ctx, args, kwargs)``: run the rest of a DAL call (middleware and method).
Proceed = Callable[["DataAccessContext", tuple[Any, ...], dict[str, Any]], Any]


class Observer:
    """Base class of observers: each hook does nothing; override the ones you need.

    .. versionadded:: 2.0
    """

    def context_entered(self, ctx: DataAccessContext) -> Any:
        """A context was entered; the return value is handed back as ``state``."""
        return None

    def context_exiting(self, ctx: DataAccessContext, state: Any) -> None:
        """A context's body has ended; its middleware and hooks are about to run."""

    def context_exited(self, ctx: DataAccessContext, state: Any, exc: BaseException | None) -> None:
        """A context ended: committed when ``exc`` is None, else rolled back."""

    def dal_call(
        self,
        ctx: DataAccessContext,
        state: Any,
        path: DalPath,
        proceed: Proceed,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run one DAL call: return ``proceed(ctx, args, kwargs)``."""
        return proceed(ctx, args, kwargs)

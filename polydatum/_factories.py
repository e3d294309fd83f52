"""Normalise resource factories and context middleware, once, at registration.

Everything polydatum accepts is reduced to a *generator factory*: a callable
taking the context that returns a generator (sync) or an async generator
(async) yielding exactly once. ``@contextmanager`` and ``@asynccontextmanager``
functions are unwrapped to the generator function they decorate, so there is
one teardown path for all of them.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager
from inspect import CO_COROUTINE, isasyncgenfunction, isgeneratorfunction
from typing import Any, NamedTuple

# inspect.markcoroutinefunction's mark (Python 3.12+), or None.
_COROUTINE_MARK = getattr(inspect, "_is_coroutine_mark", None)
_PLAIN_CALLABLES = (types.FunctionType, types.MethodType)


def is_async_callable(fn: Any) -> bool:
    """Whether ``fn`` is declared async: a coroutine function, a partial of one, or an async ``__call__``.

    A plain function or bound method is answered from its code's flag (and the
    mark of ``inspect.markcoroutinefunction``), as ``inspect`` reads them, in a
    tenth of the time: a commit hook is checked on every registration.
    """
    if type(fn) in _PLAIN_CALLABLES:
        code = getattr(fn, "__code__", None)
        if code is not None:
            if code.co_flags & CO_COROUTINE:
                return True
            return (
                _COROUTINE_MARK is not None and getattr(fn, "_is_coroutine_marker", None) is _COROUTINE_MARK
            )
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a coroutine __call__, not callability
    )


@contextmanager
def _cm_probe() -> Any:
    yield


@asynccontextmanager
async def _acm_probe() -> Any:
    yield


# Every @contextmanager function shares the code object of contextlib's inner
# helper, which makes the check exact (other decorators with __wrapped__ are
# not mistaken for it).
_CM_CODE = getattr(_cm_probe, "__code__", None)
_ACM_CODE = getattr(_acm_probe, "__code__", None)


class Factory(NamedTuple):
    """A registered resource or context middleware, normalised.

    ``alt`` is set only for a :class:`Dual`: this factory is its sync form and
    ``alt`` its async form, which contexts entered with ``async with`` use.
    """

    original: Any
    make: Callable[[Any], Any]
    is_async: bool
    alt: Factory | None = None


class Dual:
    """A resource or context middleware with a sync and an async form.

    A context entered with ``with`` uses ``sync``; one entered with ``async
    with`` uses ``async_``. One registration then serves both kinds of
    context, e.g. a database that gives Celery tasks a ``Session`` and
    FastAPI routes an ``AsyncSession``::

        dm.register_resources(db=Dual(session_resource, async_session_resource))
        with dm.context() as ctx:              # ctx.db is a Session
            ...
        async with dm.context() as ctx:        # await ctx.aget("db") is an AsyncSession
            ...

    Args:
        sync: a sync generator factory (or ``@contextmanager`` function).
        async_: an async generator factory (or ``@asynccontextmanager`` function).

    Raises:
        TypeError: if ``sync`` is not a sync factory or ``async_`` not an async one.

    .. versionadded:: 2.0
    """

    __slots__ = ("async_", "sync")

    def __init__(self, sync: Any, async_: Any) -> None:
        for value, want_async, what in ((sync, False, "sync"), (async_, True, "async_")):
            spec = as_factory(value)
            if spec is None or spec.is_async is not want_async or spec.alt is not None:
                kind = "an async" if want_async else "a sync"
                msg = f"Dual({what}=...) must be {kind} generator factory; got {describe(value)}"
                raise TypeError(msg)
        self.sync = sync
        self.async_ = async_

    def __repr__(self) -> str:
        return f"Dual({self.sync!r}, {self.async_!r})"


def _unwrap_decorated(obj: Any) -> Factory | None:
    func = obj.__func__ if isinstance(obj, types.MethodType) else obj
    code = getattr(func, "__code__", None)
    if code is None or code not in (_CM_CODE, _ACM_CODE):
        return None
    make: Any = getattr(func, "__wrapped__")  # noqa: B009 - set by contextlib
    if isinstance(obj, types.MethodType):
        make = types.MethodType(make, obj.__self__)
    return Factory(obj, make, code is _ACM_CODE)


def as_factory(obj: Any) -> Factory | None:
    """Return the normalised factory for ``obj``, or None if it is not one."""
    if isinstance(obj, Dual):
        sync, async_ = as_factory(obj.sync), as_factory(obj.async_)
        if sync is None or async_ is None:  # pragma: no cover - Dual() checked both
            return None
        return Factory(obj, sync.make, False, async_)
    if isgeneratorfunction(obj):
        return Factory(obj, obj, False)
    if isasyncgenfunction(obj):
        return Factory(obj, obj, True)
    decorated = _unwrap_decorated(obj)
    if decorated is not None:
        return decorated
    wrapped = _wrapped_generator_function(obj)
    if wrapped is not None:
        return wrapped
    if not isinstance(obj, type):
        call = getattr(type(obj), "__call__", None)  # noqa: B004 - the type's __call__, not callable()
        if call is not None:
            if isgeneratorfunction(call):
                return Factory(obj, obj, False)
            if isasyncgenfunction(call):
                return Factory(obj, obj, True)
            inner = _unwrap_decorated(call)
            if inner is not None:
                return Factory(obj, types.MethodType(inner.make, obj), inner.is_async)
    return None


def unwrapped(func: Any) -> Any:
    """``func`` under its ``functools.wraps`` decorators (itself when there are none, or a cycle)."""
    try:
        return inspect.unwrap(func)
    except ValueError:  # a cycle of __wrapped__
        return func


def _wrapped_generator_function(obj: Any) -> Factory | None:
    """A generator function under ``functools.wraps`` decorators (tracing, retries), called through them.

    What the decorators return is checked at each call: a generator is what
    the context drives, so anything else is refused there, saying so.
    """
    if getattr(obj, "__wrapped__", None) is None or not callable(obj):
        return None
    inner = unwrapped(obj)
    if isgeneratorfunction(inner):
        want: Any = types.GeneratorType
    elif isasyncgenfunction(inner):
        want = types.AsyncGeneratorType
    else:
        return None

    def make(ctx: Any) -> Any:
        made = obj(ctx)
        if not isinstance(made, want):
            msg = (
                f"{describe(obj)} wraps a generator function but returned {describe(made)}; "
                "its decorators must return what the generator function returns"
            )
            raise TypeError(msg)
        return made

    return Factory(obj, make, want is types.AsyncGeneratorType)


def describe(obj: Any) -> str:
    """``42 (int)``: a value and its type, for error messages."""
    text = repr(obj)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(obj).__name__})"


ACCEPTED = (
    "a generator function taking the context and yielding once (also under "
    "functools.wraps decorators), an object whose __call__ is one, a @contextmanager "
    "function, or (for async contexts) the async versions of these"
)


# -- driving the generators -------------------------------------------------


#: The attribute that marks an async middleware form as only moving its sync
#: form's blocking work to worker threads; its value gives their executor
#: (None: the loop's default one). See ``DataAccessContext._asetup_middleware``.
OFFLOAD = "_polydatum_offload"


#: What ``next(gen, DONE)`` returns when a generator finished without yielding.
DONE: Any = object()


def label(kind: str, obj: Any) -> str:
    """``resource 'db'`` or ``context middleware <function tx>``, for messages."""
    return f"{kind} {obj!r}"


def did_not_yield(what: str, exc_type: type[Exception]) -> Exception:
    """The error for a generator that finished without yielding on setup."""
    return exc_type(f"{what} did not yield on setup; it must yield exactly once")


def start(gen: Any, what: str, exc_type: type[Exception]) -> Any:
    """Run a generator to its single yield and return the yielded value."""
    value = next(gen, DONE)
    if value is DONE:
        raise did_not_yield(what, exc_type)
    return value


async def astart(agen: Any, what: str, exc_type: type[Exception]) -> Any:
    """Async twin of :func:`start`."""
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        raise did_not_yield(what, exc_type) from None


def _unwrap_pep479(exc: BaseException, raised: BaseException) -> BaseException:
    """The body's StopIteration, when a generator merely let it pass.

    PEP 479 turns a StopIteration (StopAsyncIteration in async generators)
    leaving a generator into a RuntimeError caused by it; that is the
    generator not handling the exception, not a new error.
    """
    if (
        isinstance(raised, RuntimeError)
        and raised.__cause__ is exc
        and isinstance(exc, (StopIteration, StopAsyncIteration))
    ):
        return exc
    return raised


def yielded_twice(kind: str, obj: Any) -> RuntimeError:
    """The error for a generator that yielded again when resumed after success."""
    return RuntimeError(f"{label(kind, obj)} yielded more than once; it must yield exactly once")


def finish(gen: Any, exc: BaseException | None, kind: str, obj: Any) -> BaseException | None:
    """Resume a generator after its yield; return the exception now in flight.

    ``None`` in means the body succeeded; ``None`` out means the generator
    completed (or suppressed ``exc``). The same ``exc`` out means it let the
    exception pass; any other exception replaces it.
    """
    if exc is None:
        try:
            if next(gen, DONE) is DONE:
                return None
        except BaseException as raised:
            return raised
        gen.close()
        return yielded_twice(kind, obj)
    tb = exc.__traceback__
    try:
        gen.throw(exc)
    except StopIteration as stop:
        # A StopIteration raised in the body and let through is not a suppression.
        return exc if stop is exc else None
    except BaseException as raised:
        if raised is exc:
            # Let through: its traceback gets back what it had, as contextlib does.
            # The frames the throw added (this one, which holds ``exc``) would
            # tie the error to itself, a cycle only the garbage collector frees.
            exc.__traceback__ = tb
            return exc
        return _unwrap_pep479(exc, raised)
    gen.close()
    return RuntimeError(f"{label(kind, obj)} yielded again after an exception was thrown into it")


async def afinish(agen: Any, exc: BaseException | None, kind: str, obj: Any) -> BaseException | None:
    """Async twin of :func:`finish` for async generators."""
    if exc is None:
        try:
            await agen.__anext__()
        except StopAsyncIteration:
            return None
        except BaseException as raised:
            return raised
        await agen.aclose()
        return yielded_twice(kind, obj)
    tb = exc.__traceback__
    try:
        await agen.athrow(exc)
    except StopAsyncIteration as stop:
        return exc if stop is exc else None
    except BaseException as raised:
        if raised is exc:
            exc.__traceback__ = tb  # see finish()
            return exc
        return _unwrap_pep479(exc, raised)
    await agen.aclose()
    return RuntimeError(f"{label(kind, obj)} yielded again after an exception was thrown into it")


__all__ = [
    "ACCEPTED",
    "DONE",
    "OFFLOAD",
    "Dual",
    "Factory",
    "afinish",
    "as_factory",
    "astart",
    "describe",
    "did_not_yield",
    "finish",
    "is_async_callable",
    "label",
    "start",
    "unwrapped",
    "yielded_twice",
]

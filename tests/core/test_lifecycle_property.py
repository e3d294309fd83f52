"""The context lifecycle (docs/concepts/contexts.md, docs/hooks.md) against a reference model.

Random mixes of context middleware and resources, each with a behaviour
drawn from :data:`BEHAVIOURS`, around a body that succeeds or raises, run
for real (sync and async) and compared, event by event, with what
:func:`model` says the lifecycle requires:

1. middleware is set up in registration order; a setup error stops there,
   the body never runs, the middleware already set up is torn down with the
   setup error thrown in, and the setup error is what escapes;
2. the body runs and creates resources, in order, on first access; a
   resource setup error propagates from the access (so it ends the body);
3. middleware is torn down in reverse, the exception in flight thrown into
   each; one may replace it, or raise while tearing down (which replaces it
   too), but one that swallows it leaves it in flight (a middleware cannot
   suppress, as in polydatum 1.0); one yielding twice turns into a RuntimeError;
4. ``on_commit`` hooks run when the context ends without an exception,
   ``on_rollback`` hooks when it ends with one, in registration order; hook
   errors are collected and logged, never raised;
5. resources are torn down in reverse order of creation; what they raise
   (other than re-raising the exception thrown in) is collected in
   ``get_resource_exit_errors()`` and logged, never raised, and a resource
   cannot suppress or replace the context's exception.

Where the docs are silent the model follows the code, and says so:
- the exception thrown into resources is the one left after middleware
  teardown (what escapes), not the body's original one;
- when middleware setup fails, what the earlier middleware do with the setup
  error while being torn down (suppress, replace, raise) does not change what
  escapes: the setup error (docs/concepts/contexts.md: "its setup exception propagates"), and a
  replacement raised there is dropped without being logged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from polydatum import DataManager
from polydatum.context import DataAccessContext
from polydatum.errors import ContextStateError

BEHAVIOURS = ("ok", "raise_setup", "raise_teardown", "suppress", "replace", "no_yield", "yield_twice")

# The core bug logged in /work/brief/core_bugs.md ("commit hooks run after a
# failed middleware setup"): cases in that region are checked by the xfail
# tests at the end. Once the core is fixed they XPASS (strict, so they fail):
# remove their xfail marks and set this to False.


class Boom(Exception):
    """An error tagged with the part that raised it: ``mw1.setup``, ``body``..."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.tag = tag


def tag(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    if isinstance(exc, Boom):
        return exc.tag
    return type(exc).__name__


@dataclass(frozen=True)
class Part:
    behaviour: str
    is_async: bool = False


@dataclass(frozen=True)
class Scenario:
    middleware: tuple[Part, ...]
    resources: tuple[Part, ...]
    body_raises: bool
    hook_raises: bool = False
    async_hooks: bool = False
    # Without hooks and middleware the core takes a leaner exit path: draw both.
    body_hooks: bool = True


@dataclass
class Outcome:
    log: list[tuple[Any, ...]] = field(default_factory=list)
    escaped: str | None = None
    exit_errors: list[str | None] = field(default_factory=list)
    hook_errors: list[str | None] = field(default_factory=list)
    logged: list[tuple[str, str | None]] = field(default_factory=list)


# -- the reference model -----------------------------------------------------------------


def _middleware_teardown(i: int, behaviour: str, exc: str | None) -> str | None:
    """The exception in flight after middleware ``i`` was torn down with ``exc`` thrown in."""
    if behaviour == "raise_teardown":
        return f"mw{i}.teardown"
    if behaviour == "replace":
        return f"mw{i}.replace" if exc is not None else None
    if behaviour == "yield_twice":
        return "RuntimeError"
    return exc  # "ok" lets it through; "suppress" swallows it, which leaves it in flight


def _resource_exit_error(j: int, behaviour: str, exc: str | None) -> str | None:
    """What resource ``j`` contributes to the exit errors when torn down with ``exc`` thrown in."""
    if behaviour == "raise_teardown":
        return f"res{j}.teardown"
    if behaviour == "replace":
        return f"res{j}.replace" if exc is not None else None
    if behaviour == "yield_twice":
        return "RuntimeError"
    return None  # "ok" re-raises the very exception thrown in; "suppress" cannot suppress


def model(s: Scenario) -> Outcome:
    """What the lifecycle rules above say must happen."""
    out = Outcome()
    hook_owners: list[str] = []
    started: list[int] = []
    setup_error: str | None = None
    for i, part in enumerate(s.middleware):
        out.log.append(("mw", i, "setup"))
        hook_owners.append(f"mw{i}")  # each middleware registers its hooks first thing
        if part.behaviour == "raise_setup":
            setup_error = f"mw{i}.setup"
            break
        if part.behaviour == "no_yield":
            setup_error = "MiddlewareSetupException"
            break
        started.append(i)

    created: list[int] = []
    exc: str | None
    if setup_error is not None:
        exc = setup_error
    else:
        out.log.append(("body",))
        if s.body_hooks:
            hook_owners.append("body")
        exc = None
        for j, part in enumerate(s.resources):
            out.log.append(("res", j, "setup"))
            if part.behaviour == "raise_setup":
                exc = f"res{j}.setup"
                break
            if part.behaviour == "no_yield":
                exc = "ResourceSetupException"
                break
            created.append(j)
        else:
            if s.body_raises:
                exc = "body"

    for i in reversed(started):
        out.log.append(("mw", i, "teardown", exc))
        exc = _middleware_teardown(i, s.middleware[i].behaviour, exc)

    out.escaped = setup_error if setup_error is not None else exc

    kind = "commit" if out.escaped is None else "rollback"
    for owner in hook_owners:
        out.log.append(("hook", owner, kind))
        if s.hook_raises:
            out.hook_errors.append(f"hook.{owner}.{kind}")

    for j in reversed(created):
        out.log.append(("res", j, "teardown", exc))
        err = _resource_exit_error(j, s.resources[j].behaviour, exc)
        if err is not None:
            out.exit_errors.append(err)

    out.logged = [("hook", t) for t in out.hook_errors] + [("resource", t) for t in out.exit_errors]
    return out


# -- the real thing ----------------------------------------------------------------------


class Recorder(logging.Handler):
    """Collects the event log of one run, and what polydatum logged."""

    def __init__(self, hook_raises: bool) -> None:
        super().__init__(logging.WARNING)
        self.log: list[tuple[Any, ...]] = []
        self.records: list[logging.LogRecord] = []
        self.hook_raises = hook_raises

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def hook(self, owner: str, kind: str) -> None:
        self.log.append(("hook", owner, kind))
        if self.hook_raises:
            raise Boom(f"hook.{owner}.{kind}")

    async def ahook(self, owner: str, kind: str) -> None:
        await asyncio.sleep(0)
        self.hook(owner, kind)


def _after_yield(prefix: str, behaviour: str, seen: BaseException | None) -> BaseException | None:
    """What a middleware/resource raises after its yield (None: it completes normally)."""
    if behaviour == "raise_teardown":
        return Boom(f"{prefix}.teardown")
    if behaviour == "replace":
        return Boom(f"{prefix}.replace") if seen is not None else None
    if behaviour == "suppress":
        return None
    return seen  # "ok": let it through


def make_part(
    kind: str, index: int, part: Part, rec: Recorder
) -> Callable[[DataAccessContext], Iterator[Any] | AsyncIterator[Any]]:
    """A middleware (``kind="mw"``) or resource (``"res"``) generator function acting out ``part``."""
    prefix = f"{kind}{index}"
    behaviour = part.behaviour

    def on_setup(ctx: DataAccessContext) -> None:
        rec.log.append((kind, index, "setup"))
        if kind == "mw":
            hook = rec.ahook if part.is_async else rec.hook
            ctx.on_commit(hook, prefix, "commit")
            ctx.on_rollback(hook, prefix, "rollback")
        if behaviour == "raise_setup":
            raise Boom(f"{prefix}.setup")

    if part.is_async:

        async def agen(ctx: DataAccessContext) -> AsyncIterator[Any]:
            await asyncio.sleep(0)
            on_setup(ctx)
            if behaviour == "no_yield":
                return
            try:
                yield prefix
            except BaseException as exc:
                seen: BaseException | None = exc
            else:
                seen = None
            await asyncio.sleep(0)
            rec.log.append((kind, index, "teardown", tag(seen)))
            if behaviour == "yield_twice":
                yield prefix
                return
            raised = _after_yield(prefix, behaviour, seen)
            if raised is not None:
                raise raised

        return agen

    def gen(ctx: DataAccessContext) -> Iterator[Any]:
        on_setup(ctx)
        if behaviour == "no_yield":
            return
        try:
            yield prefix
        except BaseException as exc:
            seen: BaseException | None = exc
        else:
            seen = None
        rec.log.append((kind, index, "teardown", tag(seen)))
        if behaviour == "yield_twice":
            yield prefix
            return
        raised = _after_yield(prefix, behaviour, seen)
        if raised is not None:
            raise raised

    return gen


def _build(s: Scenario) -> tuple[DataManager, Recorder]:
    rec = Recorder(s.hook_raises)
    dm = DataManager()
    dm.register_context_middleware(*(make_part("mw", i, p, rec) for i, p in enumerate(s.middleware)))
    dm.register_resources(**{f"r{j}": make_part("res", j, p, rec) for j, p in enumerate(s.resources)})
    return dm, rec


def _observe(
    s: Scenario,
    dm: DataManager,
    rec: Recorder,
    ctx: DataAccessContext,
    escaped: BaseException | None,
    body_exc: Boom,
) -> Outcome:
    assert dm.get_active_context() is None
    if tag(escaped) == "body":
        assert escaped is body_exc  # the body's own exception, not a copy
    for exc_type, exc, tb in [*ctx.get_resource_exit_errors(), *ctx.get_hook_errors()]:
        assert exc_type is type(exc)
        assert tb is exc.__traceback__
    logged = []
    for record in rec.records:
        assert record.exc_info is not None
        what = "hook" if hasattr(record, "polydatum_hook") else "resource"
        logged.append((what, tag(record.exc_info[1])))
    return Outcome(
        log=rec.log,
        escaped=tag(escaped),
        exit_errors=[tag(e[1]) for e in ctx.get_resource_exit_errors()],
        hook_errors=[tag(e[1]) for e in ctx.get_hook_errors()],
        logged=logged,
    )


def _assert_single_use(enter: Callable[[], Any]) -> None:
    # A plain try/except: pytest.raises is measurably slow over 20,000 runs.
    try:
        enter()
    except ContextStateError:
        return
    raise AssertionError("an exited context could be entered again")


def run_sync(s: Scenario) -> Outcome:
    dm, rec = _build(s)
    ctx = dm.context()
    body_exc = Boom("body")
    logger = logging.getLogger("polydatum")
    logger.addHandler(rec)
    logger.propagate = False  # ours alone: pytest formatting thousands of tracebacks is slow
    try:
        with ctx:
            rec.log.append(("body",))
            if s.body_hooks:
                ctx.on_commit(rec.hook, "body", "commit")
                ctx.on_rollback(rec.hook, "body", "rollback")
            for j in range(len(s.resources)):
                getattr(ctx, f"r{j}")
            if s.body_raises:
                raise body_exc
    except Exception as exc:
        escaped: BaseException | None = exc
    else:
        escaped = None
    finally:
        logger.removeHandler(rec)
        logger.propagate = True
    _assert_single_use(ctx.__enter__)
    return _observe(s, dm, rec, ctx, escaped, body_exc)


async def run_async(s: Scenario) -> Outcome:
    dm, rec = _build(s)
    ctx = dm.context()
    body_exc = Boom("body")
    hook = rec.ahook if s.async_hooks else rec.hook
    logger = logging.getLogger("polydatum")
    logger.addHandler(rec)
    logger.propagate = False  # ours alone: pytest formatting thousands of tracebacks is slow
    try:
        async with ctx:
            rec.log.append(("body",))
            if s.body_hooks:
                ctx.on_commit(hook, "body", "commit")
                ctx.on_rollback(hook, "body", "rollback")
            for j in range(len(s.resources)):
                await ctx.aget(f"r{j}")
            if s.body_raises:
                raise body_exc
    except Exception as exc:
        escaped: BaseException | None = exc
    else:
        escaped = None
    finally:
        logger.removeHandler(rec)
        logger.propagate = True
    try:
        await ctx.__aenter__()
    except ContextStateError:
        pass
    else:
        raise AssertionError("an exited context could be entered again")
    return _observe(s, dm, rec, ctx, escaped, body_exc)


def assert_matches(actual: Outcome, expected: Outcome) -> None:
    # Compare field by field so a failure says which part of the lifecycle differs.
    assert actual.log == expected.log
    assert actual.escaped == expected.escaped
    assert actual.exit_errors == expected.exit_errors
    assert actual.hook_errors == expected.hook_errors
    assert actual.logged == expected.logged


# -- strategies -------------------------------------------------------------------------------

sync_parts = st.lists(st.builds(Part, st.sampled_from(BEHAVIOURS), st.just(False)), max_size=5).map(tuple)
mixed_parts = st.lists(st.builds(Part, st.sampled_from(BEHAVIOURS), st.booleans()), max_size=5).map(tuple)
sync_scenarios = st.builds(
    Scenario, sync_parts, sync_parts, st.booleans(), st.booleans(), st.just(False), st.booleans()
)
async_scenarios = st.builds(
    Scenario, mixed_parts, mixed_parts, st.booleans(), st.booleans(), st.booleans(), st.booleans()
)

# derandomize: the same examples every run, so CI is reproducible; the
# exhaustive sweep below covers every small case on top of them.
PROPERTY = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much])


@pytest.fixture(name="runner", scope="module")
def fixture_runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


# -- properties ---------------------------------------------------------------------------------


@settings(PROPERTY, max_examples=500)
@given(s=sync_scenarios)
@example(s=Scenario((Part("ok"), Part("suppress")), (Part("ok"), Part("raise_teardown")), body_raises=True))
@example(s=Scenario((Part("replace"), Part("ok")), (Part("replace"),), body_raises=True, hook_raises=True))
@example(s=Scenario((Part("ok"), Part("raise_setup")), (), body_raises=False))
@example(s=Scenario((Part("yield_twice"),), (Part("yield_twice"), Part("no_yield")), body_raises=False))
@example(
    s=Scenario((), (Part("ok"), Part("raise_teardown"), Part("replace")), body_raises=True, body_hooks=False)
)
def test_sync_lifecycle_matches_the_model(s: Scenario) -> None:
    expected = model(s)
    assert_matches(run_sync(s), expected)


@settings(PROPERTY, max_examples=1000)
@given(s=async_scenarios)
@example(
    s=Scenario(
        (Part("ok", True), Part("suppress", False)),
        (Part("ok", True), Part("raise_teardown", False)),
        body_raises=True,
        async_hooks=True,
    )
)
@example(
    s=Scenario((Part("replace", True), Part("raise_setup", True)), (), body_raises=False, hook_raises=True)
)
@example(s=Scenario((Part("yield_twice", True),), (Part("yield_twice", True),), body_raises=True))
@example(s=Scenario((), (Part("replace"), Part("raise_teardown")), body_raises=True, body_hooks=False))
@example(s=Scenario((), (Part("replace", True), Part("raise_teardown")), body_raises=True, body_hooks=False))
def test_async_lifecycle_matches_the_model(s: Scenario, runner: asyncio.Runner) -> None:
    expected = model(s)
    assert_matches(runner.run(run_async(s)), expected)


def small_scenarios() -> Iterator[Scenario]:
    """Every sync scenario with at most two middleware and two resources."""
    parts: list[tuple[Part, ...]] = [()]
    parts += [tuple(Part(b) for b in bs) for n in (1, 2) for bs in itertools.product(BEHAVIOURS, repeat=n)]
    flags = (False, True)
    combos = itertools.product(parts, parts, flags, flags, flags)
    for mws, res, body_raises, hook_raises, body_hooks in combos:
        if hook_raises and not (mws or body_hooks):
            continue  # no hook at all: the same run as hook_raises=False
        yield Scenario(mws, res, body_raises, hook_raises, body_hooks=body_hooks)


def test_every_small_sync_scenario_matches_the_model() -> None:
    mismatches = []
    checked = 0
    for s in small_scenarios():
        expected = model(s)
        checked += 1
        actual = run_sync(s)
        if actual != expected:
            mismatches.append((s, actual, expected))
    assert checked > 20_000
    assert mismatches[:3] == []


# -- setup failures under a middleware that swallows ---------------------------------------


def test_setup_failure_after_a_suppressing_middleware_runs_rollback_hooks() -> None:
    # Minimal repro: the setup error escapes, so the context ended with an
    # exception and docs/hooks.md says on_rollback hooks run, not on_commit.
    dm = DataManager()
    ran: list[str] = []

    def transaction(ctx: DataAccessContext) -> Iterator[None]:
        ctx.on_commit(ran.append, "commit")
        ctx.on_rollback(ran.append, "rollback")
        try:
            yield
        except ValueError:
            pass  # suppresses the error

    def broken(ctx: DataAccessContext) -> Iterator[None]:
        raise ValueError("setup failed")
        yield  # pragma: no cover

    dm.register_context_middleware(transaction, broken)
    with pytest.raises(ValueError, match="setup failed"), dm.context():
        pass  # pragma: no cover
    assert ran == ["rollback"]


async def test_async_setup_failure_after_a_suppressing_middleware_runs_rollback_hooks() -> None:
    dm = DataManager()
    ran: list[str] = []

    async def transaction(ctx: DataAccessContext) -> AsyncIterator[None]:
        ctx.on_commit(ran.append, "commit")
        ctx.on_rollback(ran.append, "rollback")
        try:
            yield
        except ValueError:
            pass

    async def broken(ctx: DataAccessContext) -> AsyncIterator[None]:
        raise ValueError("setup failed")
        yield  # pragma: no cover

    dm.register_context_middleware(transaction, broken)

    async def body() -> None:
        async with dm.context():
            pass  # pragma: no cover

    with pytest.raises(ValueError, match="setup failed"):
        await body()
    assert ran == ["rollback"]


def _passthrough_middleware(ctx: DataAccessContext) -> Iterator[None]:
    yield


def _passthrough_resource(ctx: DataAccessContext) -> Iterator[str]:
    yield "value"


async def _apassthrough_middleware(ctx: DataAccessContext) -> AsyncIterator[None]:
    yield


async def _apassthrough_resource(ctx: DataAccessContext) -> AsyncIterator[str]:
    yield "value"


def test_stop_iteration_from_the_body_passes_through_unchanged() -> None:
    # A middleware or resource that lets the exception through neither
    # suppresses nor replaces it (§1.3); contextlib.contextmanager keeps a
    # StopIteration as is. PEP 479 turns it into a RuntimeError inside the
    # generator, and the core does not undo that.
    dm = DataManager()
    dm.register_context_middleware(_passthrough_middleware)
    dm.register_resources(r=_passthrough_resource)
    stop = StopIteration("body")
    ctx = dm.context()

    def body() -> None:
        with ctx:
            ctx.r
            raise stop

    with pytest.raises(StopIteration) as raised:
        body()
    assert raised.value is stop
    assert ctx.get_resource_exit_errors() == []


@pytest.mark.parametrize("stop_type", [StopIteration, StopAsyncIteration])
async def test_async_stop_iteration_from_the_body_passes_through_unchanged(
    stop_type: type[Exception],
) -> None:
    dm = DataManager()
    dm.register_context_middleware(_apassthrough_middleware)
    dm.register_resources(r=_apassthrough_resource)
    stop = stop_type("body")
    ctx = dm.context()
    # Caught in this very frame: a StopIteration leaving a coroutine would be
    # turned into a RuntimeError by Python itself (PEP 479).
    caught: BaseException | None = None
    try:
        async with ctx:
            await ctx.aget("r")
            raise stop
    except BaseException as exc:
        caught = exc
    assert caught is stop
    assert ctx.get_resource_exit_errors() == []


def test_stop_iteration_through_a_resource_alone_is_not_an_exit_error() -> None:
    dm = DataManager()
    dm.register_resources(r=_passthrough_resource)
    ctx = dm.context()

    def body() -> None:
        with ctx:
            ctx.r
            raise StopIteration("body")

    with pytest.raises(StopIteration):
        body()
    assert ctx.get_resource_exit_errors() == []

"""Core overhead: ns per operation, and the ratio to a plain-Python baseline.

Run: python benchmarks/core.py [--quick] [--processes N] [--no-peers]

Scenarios (docs/benchmarks.md):
  S1 enter+exit an empty context
  S2 S1 + one DAL call dal.users.get(1)
  S3 S2 where the method also touches one lazy generator resource
  S4 one context with 10 DAL calls
  S5 one call to a service nested two deep, dal.users.profile.get(1) (context open)
  S6 S2 with two method middlewares
  S7 async only: one context, one lazily created async generator resource read
     by one awaited DAL call (``await ctx.aget(...)`` inside an async method)
The baseline, measured in the same run: set a ContextVar, call a method on a
plain object, reset the ContextVar. Async variants use ``async with``/``await``.
S7 also has a plain-asyncio floor: the same steps written by hand (a
ContextVar, an async generator run to its ``yield`` and on to its end, an
awaited method).

The peers, measured in the same run when installed (``pip install -e
".[bench]"``; ``--no-peers`` skips them): svcs (a ``Container`` per unit of
work), dishka (a ``Scope.REQUEST`` container) and dependency-injector (a
``DeclarativeContainer`` whose per-request resource is a
``ContextLocalResource``, shut down at the end of the unit of work).
The script also runs against polydatum 0.9.x/1.0 (features they lack print n/a).

Every figure is the median over several fresh processes (5, or 3 with
``--quick``), each keeping the best of its interleaved rounds. One process
is not enough: on this machine the same loop runs up to 1.6x slower in one
process than in the next (the hash seed and the memory layout decide which
lookups collide), and that moves the ratio between two libraries by as much
as +-30%. The peer ratios print their spread over the processes too.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import polydatum
from polydatum import DataManager, Service
from polydatum.context import DataAccessContext

QUICK = "--quick" in sys.argv
LOOPS = 10_000 if QUICK else 50_000
ROUNDS = 7 if QUICK else 15  # for scripts that measure in one process (recorder.py)
PROCESSES = 3 if QUICK else 5
PROCESS_ROUNDS = 3 if QUICK else 5  # each of core.py's processes
WORKER = "--worker" in sys.argv
# Async generator resources (``await ctx.aget``) came with 2.0; older versions print n/a for S7.
ASYNC_RESOURCES = hasattr(DataAccessContext, "aget")


class Bench:
    """Interleaved rounds: every case once per round, the minimum kept.

    On a shared machine load comes and goes; measuring the baseline and all
    scenarios in every round keeps their ratios honest.
    """

    def __init__(self, rounds: int = ROUNDS) -> None:
        self.rounds = rounds
        self.cases: dict[str, Callable[[int], Any]] = {}
        self.best: dict[str, float] = {}

    def add(self, key: str, fn: Callable[[int], Any]) -> None:
        self.cases[key] = fn

    def add_async(self, key: str, make: Callable[[int], Any]) -> None:
        def run(n: int) -> None:
            asyncio.run(make(n))

        self.cases[key] = run

    def run(self) -> dict[str, float]:
        for fn in self.cases.values():
            fn(500)  # warm caches
        for _ in range(self.rounds):
            for key, fn in self.cases.items():
                gc.collect()
                start = time.perf_counter_ns()
                fn(LOOPS)
                ns = (time.perf_counter_ns() - start) / LOOPS
                self.best[key] = min(self.best.get(key, float("inf")), ns)
        return self.best


# -- the plain-Python baseline --------------------------------------------------

_var: contextvars.ContextVar[Any] = contextvars.ContextVar("baseline")


class Plain:
    def get(self, user_id: int) -> int:
        return user_id


def baseline(n: int) -> None:
    obj, var = Plain(), _var
    for _ in range(n):
        token = var.set(obj)
        obj.get(1)
        var.reset(token)


# -- polydatum set-up ---------------------------------------------------------------


class Profiles(Service):
    def get(self, user_id: int) -> int:
        return user_id


class Users(Service):
    def get(self, user_id: int) -> int:
        return user_id

    def get_with_resource(self, user_id: int) -> Any:
        return self._ctx.conn

    async def aget(self, user_id: int) -> int:
        return user_id

    async def aget_with_resource(self, user_id: int) -> Any:
        return self._ctx.conn

    async def aget_with_async_resource(self, user_id: int) -> Any:
        return await self._ctx.aget("aconn")


def conn_resource(ctx: Any) -> Any:
    yield object()


async def aconn_resource(ctx: Any) -> Any:
    yield object()


def make_dm(middleware: int = 0) -> DataManager:
    dm = DataManager()
    dm.register_resources(conn=conn_resource)
    if ASYNC_RESOURCES:
        dm.register_resources(aconn=aconn_resource)
    users = Users()
    users.register_services(profile=Profiles())
    dm.register_services(users=users)
    if middleware:

        def passthrough(request: Any, handler: Any) -> Any:
            return handler(request)

        if hasattr(dm, "register_method_middleware"):
            dm.register_method_middleware(*([passthrough] * middleware))
        else:
            return None  # type: ignore[return-value]
    return dm


def s1(dm: DataManager) -> Callable[[int], None]:
    def run(n: int) -> None:
        context = dm.context
        for _ in range(n):
            with context():
                pass

    return run


def s2(dm: DataManager) -> Callable[[int], None]:
    def run(n: int) -> None:
        context, dal = dm.context, dm.get_dal()
        for _ in range(n):
            with context():
                dal.users.get(1)

    return run


def s3(dm: DataManager) -> Callable[[int], None]:
    def run(n: int) -> None:
        context, dal = dm.context, dm.get_dal()
        for _ in range(n):
            with context():
                dal.users.get_with_resource(1)

    return run


def s4(dm: DataManager) -> Callable[[int], None]:
    def run(n: int) -> None:
        context, dal = dm.context, dm.get_dal()
        for _ in range(n):
            with context():
                dal.users.get(1)
                dal.users.get(1)
                dal.users.get(1)
                dal.users.get(1)
                dal.users.get(1)
                dal.users.get(1)
                dal.users.get(1)
                dal.users.get(1)
                dal.users.get(1)
                dal.users.get(1)

    return run


def s5(dm: DataManager) -> Callable[[int], None]:
    def run(n: int) -> None:
        dal = dm.get_dal()
        with dm.context():
            for _ in range(n):
                dal.users.profile.get(1)

    return run


def a1(dm: DataManager) -> Callable[[int], Any]:
    async def run(n: int) -> None:
        context = dm.context
        for _ in range(n):
            async with context():
                pass

    return run


def a2(dm: DataManager) -> Callable[[int], Any]:
    async def run(n: int) -> None:
        context, dal = dm.context, dm.get_dal()
        for _ in range(n):
            async with context():
                await dal.users.aget(1)

    return run


def a3(dm: DataManager) -> Callable[[int], Any]:
    async def run(n: int) -> None:
        context, dal = dm.context, dm.get_dal()
        for _ in range(n):
            async with context():
                await dal.users.aget_with_resource(1)

    return run


def a4(dm: DataManager) -> Callable[[int], Any]:
    async def run(n: int) -> None:
        context, dal = dm.context, dm.get_dal()
        for _ in range(n):
            async with context():
                for _ in range(10):
                    await dal.users.aget(1)

    return run


def a5(dm: DataManager) -> Callable[[int], Any]:
    async def run(n: int) -> None:
        dal = dm.get_dal()
        async with dm.context():
            for _ in range(n):
                await dal.users.aget(1)

    return run


def a7(dm: DataManager) -> Callable[[int], Any]:
    async def run(n: int) -> None:
        context, dal = dm.context, dm.get_dal()
        for _ in range(n):
            async with context():
                await dal.users.aget_with_async_resource(1)

    return run


class PlainAsync:
    async def get(self, user_id: int) -> int:
        return user_id


async def plain_aconn() -> Any:
    yield object()


async def plain_s7(n: int) -> None:
    """S7 by hand: what an async unit of work with one async resource must do at least."""
    obj, var = PlainAsync(), _var
    for _ in range(n):
        token = var.set(obj)
        gen = plain_aconn()
        await gen.__anext__()
        await obj.get(1)
        try:
            await gen.__anext__()
        except StopAsyncIteration:
            pass
        var.reset(token)


def async_baseline(n: int) -> Any:
    async def run(n: int) -> None:
        obj, var = Plain(), _var
        for _ in range(n):
            token = var.set(obj)
            obj.get(1)
            var.reset(token)

    return run(n)


PEER_SCENARIOS = ("S1", "S2", "S3", "S4", "S7")


class AConn:
    """The peers' async resource (S7)."""


def add_svcs(bench: Bench) -> bool:
    """svcs: a Container per unit of work; Users registered as a value, Conn by a generator factory."""
    try:
        # svcs imports its Starlette/FastAPI integrations when those are installed,
        # and Starlette warns about its test client on import: not ours to show.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import svcs
    except ImportError:
        return False
    registry = svcs.Registry()
    registry.register_value(Users, Users())

    class Conn:
        pass

    def conn_factory() -> Any:
        yield Conn()

    async def aconn_factory() -> Any:
        yield AConn()

    registry.register_factory(Conn, conn_factory)
    registry.register_factory(AConn, aconn_factory)
    Container = svcs.Container

    def v1(n: int) -> None:
        for _ in range(n):
            with Container(registry):
                pass

    def v2(n: int) -> None:
        for _ in range(n):
            with Container(registry) as c:
                c.get(Users).get(1)

    def v3(n: int) -> None:
        for _ in range(n):
            with Container(registry) as c:
                c.get(Users).get(1)
                c.get(Conn)

    def v4(n: int) -> None:
        for _ in range(n):
            with Container(registry) as c:
                for _ in range(10):
                    c.get(Users).get(1)

    async def v7(n: int) -> None:
        for _ in range(n):
            async with Container(registry) as c:
                await c.aget(AConn)
                await c.get(Users).aget(1)

    for key, fn in zip(PEER_SCENARIOS[:4], (v1, v2, v3, v4), strict=True):
        bench.add(f"svcs {key}", fn)
    bench.add_async("svcs S7", v7)
    return True


def add_dishka(bench: Bench) -> bool:
    """dishka: a Scope.REQUEST container per unit of work; Users in Scope.APP."""
    try:
        from dishka import Provider, Scope, make_async_container, make_container
    except ImportError:
        return False
    from collections.abc import AsyncIterator, Iterator

    class DConn:
        pass

    def dconn() -> Iterator[DConn]:
        yield DConn()

    async def daconn() -> AsyncIterator[AConn]:
        yield AConn()

    def users() -> Users:
        return Users()

    # dishka reads return annotations; under ``from __future__ import annotations``
    # these local ones are strings it cannot resolve, so set the real types.
    dconn.__annotations__["return"] = Iterator[DConn]
    daconn.__annotations__["return"] = AsyncIterator[AConn]
    users.__annotations__["return"] = Users
    provider = Provider()
    provider.provide(users, provides=Users, scope=Scope.APP)
    provider.provide(dconn, provides=DConn, scope=Scope.REQUEST)
    container = make_container(provider)
    aprovider = Provider()
    aprovider.provide(users, provides=Users, scope=Scope.APP)
    aprovider.provide(daconn, provides=AConn, scope=Scope.REQUEST)
    acontainer = make_async_container(aprovider)

    def d1(n: int) -> None:
        for _ in range(n):
            with container():
                pass

    def d2(n: int) -> None:
        for _ in range(n):
            with container() as r:
                r.get(Users).get(1)

    def d3(n: int) -> None:
        for _ in range(n):
            with container() as r:
                r.get(Users).get(1)
                r.get(DConn)

    def d4(n: int) -> None:
        for _ in range(n):
            with container() as r:
                for _ in range(10):
                    r.get(Users).get(1)

    async def d7(n: int) -> None:
        for _ in range(n):
            async with acontainer() as r:
                await r.get(AConn)
                await (await r.get(Users)).aget(1)

    for key, fn in zip(PEER_SCENARIOS[:4], (d1, d2, d3, d4), strict=True):
        bench.add(f"dishka {key}", fn)
    bench.add_async("dishka S7", d7)
    return True


def add_dependency_injector(bench: Bench) -> bool:
    """dependency-injector: a DeclarativeContainer, used directly (no wiring).

    Its documented per-request resource is ``providers.ContextLocalResource``
    (a Resource kept in a ContextVar); the unit of work ends with the
    resource's ``shutdown()``, which is what its ``Closing[Provide[...]]``
    marker does after an ``@inject`` function returns. Users is a Singleton,
    as the other peers share one instance. It has no scope object, so S1
    (an empty unit of work) is n/a.
    """
    try:
        from dependency_injector import containers, providers
    except ImportError:
        return False

    class Conn:
        pass

    def conn() -> Any:
        yield Conn()

    async def aconn() -> Any:
        yield AConn()

    class Container(containers.DeclarativeContainer):
        users = providers.Singleton(Users)
        conn_ = providers.ContextLocalResource(conn)
        aconn_ = providers.ContextLocalResource(aconn)

    container = Container()
    users_p, conn_p, aconn_p = container.users, container.conn_, container.aconn_

    def i2(n: int) -> None:
        for _ in range(n):
            users_p().get(1)

    def i3(n: int) -> None:
        for _ in range(n):
            users_p().get(1)
            conn_p()
            conn_p.shutdown()

    def i4(n: int) -> None:
        for _ in range(n):
            for _ in range(10):
                users_p().get(1)

    async def i7(n: int) -> None:
        for _ in range(n):
            await aconn_p()
            await users_p().aget(1)
            await aconn_p.shutdown()

    for key, fn in zip(PEER_SCENARIOS[1:4], (i2, i3, i4), strict=True):
        bench.add(f"dependency-injector {key}", fn)
    bench.add_async("dependency-injector S7", i7)
    return True


def add_peers(bench: Bench) -> list[str]:
    """The nearest peers, measured with the same scenarios if installed."""
    return [
        name
        for name, add in (
            ("svcs", add_svcs),
            ("dishka", add_dishka),
            ("dependency-injector", add_dependency_injector),
        )
        if add(bench)
    ]


SCENARIOS = [
    ("S1", "enter+exit an empty context"),
    ("S2", "S1 + one DAL call"),
    ("S3", "S2 + one lazy generator resource"),
    ("S4", "one context, 10 DAL calls"),
    ("S5", "one call two services deep"),
    ("S6", "S2 with two method middlewares"),
    ("S7", "async: S1 + async resource + DAL call"),
]


def measure() -> tuple[dict[str, float], list[str]]:
    """One process's measurement: the best ns of every case, and the peers measured."""
    supports_async = hasattr(type(polydatum.DataManager().context()), "__aenter__")
    dm = make_dm()
    dm_mw = make_dm(middleware=2)
    bench = Bench(PROCESS_ROUNDS)
    bench.add("baseline", baseline)
    for (key, _), make in zip(SCENARIOS[:5], (s1, s2, s3, s4, s5), strict=True):
        bench.add(key, make(dm))
    if dm_mw is not None:
        bench.add("S6", s2(dm_mw))
    if supports_async:
        bench.add_async("async baseline", async_baseline)
        for (key, _), make in zip(SCENARIOS[:5], (a1, a2, a3, a4, a5), strict=True):
            bench.add_async(f"async {key}", make(dm))
        if dm_mw is not None:
            bench.add_async("async S6", a2(dm_mw))
        if ASYNC_RESOURCES:
            bench.add_async("async S7", a7(dm))
        bench.add_async("plain S7", plain_s7)
    # --peers was needed before the peers were measured by default; still accepted.
    peers = [] if "--no-peers" in sys.argv else add_peers(bench)
    return bench.run(), peers


def in_processes(script: str, count: int) -> list[Any]:
    """Run ``script --worker`` in ``count`` fresh processes, one after another.

    Each worker prints its measurement as one JSON line; this run's
    ``--quick`` and ``--no-peers`` pass on to it.
    """
    flags = [arg for arg in sys.argv[1:] if arg in ("--quick", "--no-peers", "--peers")]
    results = []
    for index in range(count):
        print(f"process {index + 1} of {count}...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, script, "--worker", *flags], check=True, capture_output=True, text=True
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def processes() -> int:
    if "--processes" in sys.argv:
        return max(1, int(sys.argv[sys.argv.index("--processes") + 1]))
    return PROCESSES


class Runs:
    """The measurements of several processes, summarised as medians."""

    def __init__(self, runs: list[dict[str, float]]) -> None:
        self.runs = runs

    def ns(self, key: str) -> float | None:
        values = [run[key] for run in self.runs if key in run]
        return statistics.median(values) if values else None

    def ratios(self, top: str, bottom: str) -> list[float]:
        """``top / bottom`` in each process that measured both."""
        return [run[top] / run[bottom] for run in self.runs if top in run and bottom in run]

    def ratio(self, top: str, bottom: str) -> float | None:
        values = self.ratios(top, bottom)
        return statistics.median(values) if values else None


def main() -> None:
    if WORKER:
        best, peers = measure()
        print(json.dumps({"best": best, "peers": peers}))
        return
    count = processes()
    results = in_processes(__file__, count)
    runs = Runs([result["best"] for result in results])
    peers = results[0]["peers"]
    report(runs, peers, count)


def report(runs: Runs, peers: list[str], count: int) -> None:
    base = runs.ns("baseline") or 1.0
    print(f"polydatum {getattr(polydatum, '__version__', '?')} on Python {sys.version.split()[0]}")
    print(
        f"baseline (ContextVar set + method call + reset): {base:.0f} ns; "
        f"median of {count} processes, each the best of {PROCESS_ROUNDS} rounds of {LOOPS}"
    )
    head = (
        f"{'':3} {'scenario':34} {'sync ns':>8} {'x base':>7} "
        f"{'async ns':>9} {'x base':>7} {'async/sync':>10}"
    )
    print(head)
    for key, desc in SCENARIOS:
        sync_ns = runs.ns(key)
        async_ns = runs.ns(f"async {key}")
        sync_txt = f"{'n/a':>8} {'':7}"
        if sync_ns:
            sync_txt = f"{sync_ns:8.0f} {runs.ratio(key, 'baseline'):7.1f}"
        async_txt = f"{'n/a':>9}"
        if async_ns:
            async_txt = f"{async_ns:9.0f} {runs.ratio(f'async {key}', 'baseline'):7.1f}"
            if sync_ns:
                async_txt += f" {runs.ratio(f'async {key}', key):10.2f}"
        print(f"{key:3} {desc:34} {sync_txt} {async_txt}")
    floor = runs.ns("plain S7")
    if floor:
        print(f"S7 by hand with plain asyncio (the floor): {floor:.0f} ns, {floor / base:.1f}x base")
    if peers:
        print_peers(runs, peers)


def print_peers(runs: Runs, peers: list[str]) -> None:
    """ns and x base per peer and scenario, then each peer's time over polydatum's (>1: polydatum ahead).

    S1-S4 compare with polydatum's sync figures, S7 with its async one. A
    ratio is the median of the per-process ratios; the line under it gives
    their lowest and highest.
    """
    print()
    print(f"{'peer':20} " + " ".join(f"{key:>15}" for key in PEER_SCENARIOS))

    def ours(key: str) -> str:
        return key if key != "S7" else "async S7"

    names = ["polydatum", *peers]
    for name in names:
        cells = []
        for key in PEER_SCENARIOS:
            case = ours(key) if name == "polydatum" else f"{name} {key}"
            ns = runs.ns(case)
            cells.append(f"{'n/a':>15}" if ns is None else f"{ns:8.0f} {runs.ratio(case, 'baseline'):5.1f}x")
        print(f"{name:20} " + " ".join(cells))
    for name in peers:
        middle, spread = [], []
        for key in PEER_SCENARIOS:
            values = runs.ratios(f"{name} {key}", ours(key))
            if not values:
                middle.append(f"{'n/a':>15}")
                spread.append(f"{'':>15}")
                continue
            middle.append(f"{statistics.median(values):15.2f}")
            spread.append(f"{f'{min(values):.2f}-{max(values):.2f}':>15}")
        print(f"{name + '/polydatum':20} " + " ".join(middle))
        print(f"{'  lowest-highest':20} " + " ".join(spread))


if __name__ == "__main__":
    main()

"""Core overhead: ns per operation, and the ratio to a plain-Python baseline.

Run: python benchmarks/core.py [--quick]

Scenarios (DESIGN/issue #2):
  S1 enter+exit an empty context
  S2 S1 + one DAL call dal.users.get(1)
  S3 S2 where the method also touches one lazy generator resource
  S4 one context with 10 DAL calls
  S5 one call to a service nested two deep, dal.users.profile.get(1) (context open)
  S6 S2 with two method middlewares
The baseline, measured in the same run: set a ContextVar, call a method on a
plain object, reset the ContextVar. Async variants use ``async with``/``await``.
The script also runs against polydatum 0.9.x/1.0 (features they lack print n/a).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import polydatum
from polydatum import DataManager, Service

QUICK = "--quick" in sys.argv
LOOPS = 10_000 if QUICK else 50_000
ROUNDS = 7 if QUICK else 15


class Bench:
    """Interleaved rounds: every case once per round, the minimum kept.

    On a shared machine load comes and goes; measuring the baseline and all
    scenarios in every round keeps their ratios honest.
    """

    def __init__(self) -> None:
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
        for _ in range(ROUNDS):
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


def conn_resource(ctx: Any) -> Any:
    yield object()


def make_dm(middleware: int = 0) -> DataManager:
    dm = DataManager()
    dm.register_resources(conn=conn_resource)
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
                dal.users.get(1); dal.users.get(1); dal.users.get(1); dal.users.get(1)  # noqa: E702
                dal.users.get(1); dal.users.get(1); dal.users.get(1); dal.users.get(1)  # noqa: E702
                dal.users.get(1); dal.users.get(1)  # noqa: E702
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


def async_baseline(n: int) -> Any:
    async def run(n: int) -> None:
        obj, var = Plain(), _var
        for _ in range(n):
            token = var.set(obj)
            obj.get(1)
            var.reset(token)
    return run(n)


def add_peers(bench: Bench) -> list[str]:
    """svcs and dishka, the nearest peers, measured with the same scenarios if installed."""
    found = []
    try:
        import svcs
    except ImportError:
        pass
    else:
        registry = svcs.Registry()
        registry.register_value(Users, Users())

        class Conn:
            pass

        def conn_factory() -> Any:
            yield Conn()

        registry.register_factory(Conn, conn_factory)
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

        for key, fn in zip(("S1", "S2", "S3", "S4"), (v1, v2, v3, v4), strict=True):
            bench.add(f"svcs {key}", fn)
        found.append("svcs")
    try:
        from dishka import Provider, Scope, make_container
    except ImportError:
        pass
    else:

        class DConn:
            pass

        provider = Provider()
        provider.provide(lambda: Users(), provides=Users, scope=Scope.APP)

        def dconn() -> Any:
            yield DConn()

        from collections.abc import Iterator

        dconn.__annotations__["return"] = Iterator[DConn]
        provider.provide(dconn, provides=DConn, scope=Scope.REQUEST)
        container = make_container(provider)

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

        for key, fn in zip(("S1", "S2", "S3", "S4"), (d1, d2, d3, d4), strict=True):
            bench.add(f"dishka {key}", fn)
        found.append("dishka")
    return found


SCENARIOS = [
    ("S1", "enter+exit an empty context"),
    ("S2", "S1 + one DAL call"),
    ("S3", "S2 + one lazy generator resource"),
    ("S4", "one context, 10 DAL calls"),
    ("S5", "one call two services deep"),
    ("S6", "S2 with two method middlewares"),
]


def main() -> None:
    supports_async = hasattr(type(polydatum.DataManager().context()), "__aenter__")
    dm = make_dm()
    dm_mw = make_dm(middleware=2)
    bench = Bench()
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
    peers = add_peers(bench) if "--peers" in sys.argv else []
    best = bench.run()
    base = best["baseline"]
    print(f"polydatum {getattr(polydatum, '__version__', '?')} on Python {sys.version.split()[0]}")
    print(f"baseline (ContextVar set + method call + reset): {base:.0f} ns; {ROUNDS} rounds of {LOOPS}")
    head = (f"{'':3} {'scenario':34} {'sync ns':>8} {'x base':>7} "
            f"{'async ns':>9} {'x base':>7} {'async/sync':>10}")
    print(head)
    for key, desc in SCENARIOS:
        sync_ns = best.get(key)
        async_ns = best.get(f"async {key}")
        sync_txt = f"{sync_ns:8.0f} {sync_ns / base:7.1f}" if sync_ns else f"{'n/a':>8} {'':7}"
        async_txt = f"{'n/a':>9}"
        if async_ns and sync_ns:
            async_txt = f"{async_ns:9.0f} {async_ns / base:7.1f} {async_ns / sync_ns:10.2f}"
        print(f"{key:3} {desc:34} {sync_txt} {async_txt}")
    for peer in peers:
        cells = "  ".join(
            f"{key} {best[f'{peer} {key}']:6.0f} ns {best[f'{peer} {key}'] / base:5.1f}x"
            for key in ("S1", "S2", "S3", "S4")
        )
        print(f"peer {peer:7} {cells}")


if __name__ == "__main__":
    main()

"""``Dual``: one registration with a sync and an async form, chosen by how the context was entered."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest

from polydatum import DataManager
from polydatum.errors import ResourceException
from polydatum.resources import Dual


def sync_conn(ctx: object) -> Iterator[str]:
    yield "sync"


async def async_conn(ctx: object) -> AsyncIterator[str]:
    yield "async"


class TestDualResource:
    """A Dual resource gives each kind of context its own form."""

    def test_a_sync_context_uses_the_sync_form(self) -> None:
        """``ctx.conn`` in a ``with`` context comes from the sync factory."""
        dm = DataManager()
        dm.register_resources(conn=Dual(sync_conn, async_conn))
        with dm.context() as ctx:
            assert ctx.conn == "sync"

    async def test_an_async_context_uses_the_async_form(self) -> None:
        """``await ctx.aget`` in an ``async with`` context comes from the async factory."""
        dm = DataManager()
        dm.register_resources(conn=Dual(sync_conn, async_conn))
        async with dm.context() as ctx:
            assert await ctx.aget("conn") == "async"
            assert ctx.conn == "async"  # created: now a plain attribute

    async def test_attribute_access_before_aget_in_an_async_context_names_the_fix(self) -> None:
        """Reading ``ctx.conn`` first in an async context says to use ``await ctx.aget``."""
        dm = DataManager()
        dm.register_resources(conn=Dual(sync_conn, async_conn))
        async with dm.context() as ctx:
            with pytest.raises(ResourceException, match=r"await ctx.aget\(\'conn\'\)"):
                _ = ctx.conn

    def test_aget_in_a_sync_context_uses_the_sync_form(self) -> None:
        """``aget`` is allowed in a sync context and gives the sync form there."""
        import asyncio

        dm = DataManager()
        dm.register_resources(conn=Dual(sync_conn, async_conn))
        with dm.context() as ctx:
            assert asyncio.run(ctx.aget("conn")) == "sync"

    def test_contextmanager_forms_are_accepted(self) -> None:
        """``@contextmanager``/``@asynccontextmanager`` functions are valid forms."""

        @contextmanager
        def cm(ctx: object) -> Iterator[int]:
            yield 1

        @asynccontextmanager
        async def acm(ctx: object) -> AsyncIterator[int]:
            yield 2

        dm = DataManager()
        dm.register_resources(n=Dual(cm, acm))
        with dm.context() as ctx:
            assert ctx.n == 1


class TestDualMiddleware:
    """A Dual context middleware runs the form that matches the context."""

    def _dm(self, log: list[str]) -> DataManager:
        def sync_mw(ctx: object) -> Iterator[None]:
            log.append("sync in")
            yield
            log.append("sync out")

        async def async_mw(ctx: object) -> AsyncIterator[None]:
            log.append("async in")
            yield
            log.append("async out")

        dm = DataManager()
        dm.register_context_middleware(Dual(sync_mw, async_mw))
        return dm

    def test_sync_context_runs_the_sync_form(self) -> None:
        """A ``with`` context sets up and tears down the sync generator only."""
        log: list[str] = []
        with self._dm(log).context():
            pass
        assert log == ["sync in", "sync out"]

    async def test_async_context_runs_the_async_form(self) -> None:
        """An ``async with`` context runs the async generator only."""
        log: list[str] = []
        async with self._dm(log).context():
            pass
        assert log == ["async in", "async out"]


class TestDualRefusals:
    """Dual refuses forms of the wrong kind, naming which one."""

    @pytest.mark.parametrize(
        ("sync", "async_", "which"),
        [
            (async_conn, async_conn, "sync"),
            (sync_conn, sync_conn, "async_"),
            (42, async_conn, "sync"),
            (sync_conn, "nope", "async_"),
        ],
    )
    def test_wrong_kinds_are_refused(self, sync: object, async_: object, which: str) -> None:
        """Each misplaced or non-factory argument raises TypeError naming the argument."""
        with pytest.raises(TypeError, match=rf"Dual\({which}=\.\.\.\)"):
            Dual(sync, async_)

    def test_a_dual_cannot_nest(self) -> None:
        """A Dual is not itself a valid form of another Dual."""
        inner = Dual(sync_conn, async_conn)
        with pytest.raises(TypeError, match=r"Dual\(sync=\.\.\.\)"):
            Dual(inner, async_conn)

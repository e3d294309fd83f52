"""A finished context is freed by reference counting: no cycle left for the garbage collector.

Every request makes one context. A cycle through it (the context holding
hooks bound to objects that hold the context; an error whose traceback
holds the frame that holds the error) keeps it, its meta and whatever its
hooks captured alive until a collection, and makes collections more
frequent and slower under load. Each test turns the collector off and
checks that the context is gone the moment the last name for it is.
"""

from __future__ import annotations

import asyncio
import gc
import traceback
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from polydatum import DataAccessContext, DataManager


class Boom(Exception):
    """Raised on purpose."""


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def transaction(ctx: DataAccessContext) -> Iterator[None]:
    yield  # lets every error through


def session(ctx: DataAccessContext) -> Iterator[object]:
    yield object()


async def atransaction(ctx: DataAccessContext) -> AsyncIterator[None]:
    yield


async def asession(ctx: DataAccessContext) -> AsyncIterator[object]:
    yield object()


class Store:
    """Like the blob store's wrapper: it keeps the context, the context keeps its hooks."""

    def __init__(self, ctx: DataAccessContext) -> None:
        self.ctx = ctx
        ctx.on_commit(self.committed)
        ctx.on_rollback(self.rolled_back)

    def committed(self) -> None:
        pass

    def rolled_back(self) -> None:
        pass


def replacing(ctx: DataAccessContext) -> Iterator[None]:
    """A middleware that raises another error in place of the body's."""
    try:
        yield
    except Boom as exc:
        raise KeyError("replaced") from exc


def make_dm() -> DataManager:
    dm = DataManager()
    dm.register_context_middleware(transaction)
    dm.register_resources(session=session)
    return dm


@pytest.mark.usefixtures("no_gc")
@pytest.mark.parametrize("fail", [False, True], ids=["committed", "rolled-back"])
def test_hooks_holding_the_context_do_not_keep_it(fail: bool) -> None:
    dm = make_dm()
    ctx = dm.context()
    try:
        with ctx:
            Store(ctx)
            ctx.on_commit(print, ctx)  # a hook's arguments may name the context too
            if fail:
                raise Boom
    except Boom:
        pass
    gone = weakref.ref(ctx)
    del ctx
    assert gone() is None


@pytest.mark.usefixtures("no_gc")
def test_an_error_let_through_middleware_and_resources_does_not_keep_the_context() -> None:
    dm = make_dm()
    seen: list[BaseException] = []
    ctx = dm.context()
    try:
        with ctx:
            assert ctx.session is not None
            raise Boom
    except Boom as exc:
        seen.append(exc)
    gone_ctx, gone_exc = weakref.ref(ctx), weakref.ref(seen[0])
    del ctx
    seen.clear()
    assert gone_exc() is None
    assert gone_ctx() is None


@pytest.mark.usefixtures("no_gc")
def test_an_error_a_middleware_raises_instead_does_not_keep_the_context() -> None:
    dm = DataManager()
    dm.register_context_middleware(replacing)
    dm.register_resources(session=session)
    ctx = dm.context()
    try:
        with ctx:
            assert ctx.session is not None
            raise Boom
    except KeyError:
        pass
    gone = weakref.ref(ctx)
    del ctx
    assert gone() is None


def test_an_error_let_through_keeps_the_traceback_it_had() -> None:
    # As contextlib does: the frames of the throw into the middleware and the
    # resource are polydatum's plumbing, not the error's story.
    dm = make_dm()
    raised: list[Boom] = []
    try:
        with dm.context() as ctx:
            assert ctx.session is not None
            raise Boom
    except Boom as exc:
        raised.append(exc)
    names = [frame.name for frame in traceback.extract_tb(raised[0].__traceback__)]
    assert names[-1] == "test_an_error_let_through_keeps_the_traceback_it_had"
    assert not {"finish", "transaction", "session"} & set(names)


def test_an_error_a_middleware_raises_instead_keeps_its_own_traceback() -> None:
    dm = DataManager()
    dm.register_context_middleware(replacing)
    with pytest.raises(KeyError) as raised, dm.context():
        raise Boom
    names = [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
    assert "replacing" in names
    assert isinstance(raised.value.__cause__, Boom)


async def areplacing(ctx: DataAccessContext) -> AsyncIterator[None]:
    try:
        yield
    except Boom:
        raise KeyError("replaced") from None


@pytest.mark.usefixtures("no_gc")
@pytest.mark.parametrize("fail", [False, True, "replaced"], ids=["committed", "rolled-back", "replaced"])
def test_async_context_is_freed_at_once(fail: bool | str) -> None:
    dm = DataManager()
    dm.register_context_middleware(atransaction)
    if fail == "replaced":
        dm.register_context_middleware(areplacing)
    dm.register_resources(asession=asession)
    refs: list[Any] = []

    async def main() -> None:
        ctx = dm.context()
        try:
            async with ctx:
                await ctx.aget("asession")
                Store(ctx)
                if fail:
                    raise Boom
        except (Boom, KeyError):
            pass
        refs.append(weakref.ref(ctx))

    asyncio.run(main())
    assert refs[0]() is None

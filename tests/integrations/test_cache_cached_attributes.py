"""Attributes set on a ``@cached`` method by decorators above it are visible through the bound method."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from polydatum import DataManager, Service
from polydatum.cache import Cache, cached
from polydatum.middleware import DalCommandRequest, dal_resolver
from polydatum.redis import Redis

F = TypeVar("F")


def mark(tag: str) -> Callable[[F], F]:
    """A decorator like an auth mark or route tag: it only sets an attribute."""

    def apply(func: F) -> F:
        func.tag = tag  # type: ignore[attr-defined]
        return func

    return apply


class Notes(Service):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @mark("public")
    @cached(ttl=60, key="note:{note_id}")
    def get(self, note_id: int) -> str:
        self.calls += 1
        return f"note {note_id} v{self.calls}"

    @mark("owner")
    @cached(ttl=60, key="anote:{note_id}")
    async def aget(self, note_id: int) -> str:
        self.calls += 1
        return f"anote {note_id} v{self.calls}"

    @cached(ttl=60)
    def unmarked(self) -> int:
        return 1

    def touch(self, note_id: int) -> None:
        self.get.invalidate(note_id)


@pytest.fixture(name="cache", params=["memory", "redis"])
def fixture_cache(request: pytest.FixtureRequest) -> Iterator[Cache]:
    """A cache on its own namespace, on each backend, emptied afterwards."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    redis = None
    if request.param == "redis":
        redis = Redis(request.getfixturevalue("redis_url"))
        cache = redis.cache(namespace=namespace)
    else:
        cache = Cache(namespace=namespace)
    yield cache
    cache.clear()
    if redis is not None:
        redis.close()


@pytest.fixture(name="dm")
def fixture_dm(cache: Cache) -> DataManager:
    """Notes with a cache installed."""
    dm = DataManager()
    cache.install(dm, name="cache")
    dm.register_services(notes=Notes())
    return dm


def test_the_bound_method_shows_attributes_set_above_cached() -> None:
    """service.method.attr finds what a decorator above @cached set, as a plain bound method would."""
    assert Notes.__dict__["get"].tag == "public"
    notes = Notes()
    assert notes.get.tag == "public"
    assert getattr(notes.aget, "tag", None) == "owner"


def test_missing_attributes_are_still_attribute_errors_naming_the_method() -> None:
    """An attribute nobody set is an AttributeError (so hasattr is False), naming the method."""
    notes = Notes()
    assert not hasattr(notes.unmarked, "tag")
    with pytest.raises(AttributeError, match=r"cached method Notes.unmarked has no attribute 'tag'"):
        _ = notes.unmarked.tag


def test_caching_invalidate_and_key_still_work(dm: DataManager) -> None:
    """The forwarding leaves the bound method's own behaviour alone."""
    with dm.dal() as dal:
        first = dal.notes.get(1)
        assert dal.notes.get(1) == first
        assert dal.notes.get.key(1) == "note:1"
    with dm.dal() as dal:
        assert dal.notes.get(1) == first
        dal.notes.touch(1)
    with dm.dal() as dal:
        assert dal.notes.get(1) != first


async def test_async_cached_method_with_a_mark(dm: DataManager) -> None:
    """An async @cached method keeps its mark and its caching."""
    async with dm.dal() as dal:
        first = await dal.notes.aget(1)
        assert await dal.notes.aget(1) == first


def test_dal_method_middleware_sees_the_mark(dm: DataManager) -> None:
    """A middleware resolving the called method (as an auth check does) reads its mark."""
    seen: list[tuple[str, Any]] = []

    def check(request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
        method = dal_resolver(request.ctx, request.path)
        seen.append((request.path_name, getattr(method, "tag", None)))
        return handler(request)

    dm.register_method_middleware(check)
    with dm.dal() as dal:
        dal.notes.get(1)
        dal.notes.unmarked()
    assert seen == [("notes.get", "public"), ("notes.unmarked", None)]


async def test_async_dal_method_middleware_sees_the_mark(dm: DataManager) -> None:
    """The same through an async context and an async @cached method."""
    seen: list[Any] = []

    def check(request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
        seen.append(getattr(dal_resolver(request.ctx, request.path), "tag", None))
        return handler(request)

    dm.register_method_middleware(check)
    async with dm.dal() as dal:
        await dal.notes.aget(1)
    assert seen == ["owner"]


def test_a_bound_cached_method_can_be_copied() -> None:
    """copy() builds the object without __init__; the forwarding must not recurse then."""
    notes = Notes()
    clone = copy.copy(notes.get)
    assert clone.tag == "public"
    assert clone.key(2) == "note:2"

"""Cache models (polydatum.cache.models), on the memory backend and a real Redis, sync and async."""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time as clock
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from polydatum import DataManager
from polydatum.cache import (
    AsyncCache,
    Cache,
    CacheUnavailable,
    JSONSerializer,
    MemoryBackend,
    SerializationError,
    _serializers,
    register_serializer,
)
from polydatum.cache.models import (
    ModelOptions,
    RecordExists,
    RecordMissing,
    Ref,
    UpdateConflict,
    cache_model,
)
from polydatum.cache.models._model import schema_of
from polydatum.cache.models._repo import deliver
from polydatum.memcached import MemcachedBackend
from polydatum.outbox import Outbox
from polydatum.redis import AsyncRedis, Redis
from polydatum.sqlalchemy import AsyncDatabase, Database
from tests.integrations.conftest import REDIS_KINDS, redis_target
from tests.support.cache_backends import CACHE_BACKENDS, make_async_backend, make_backend
from tests.support.outbox import flush_outboxes  # noqa: F401  # autouse

# Memory, Redis, memcached, files (tests/support/cache_backends.py), then Redis as a cluster and
# behind Sentinel: the session's shared rigs (tests/integrations/conftest.py), which no test here stops.
BACKENDS = [*CACHE_BACKENDS, *(kind for kind in REDIS_KINDS if kind not in CACHE_BACKENDS)]


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class Address:
    city: str
    zip: str | None = None


@cache_model(key="id", namespace="author")
@dataclass
class Author:
    id: int
    name: str


@cache_model(key="id", namespace="post")
@dataclass
class Post:
    id: int
    title: str
    author: Ref[Author]
    editor: Ref[Author] | None = None


@cache_model(key=("tenant", "id"), ttl=60)
@dataclass
class Session:
    tenant: str
    id: int
    user: str
    hits: int = 0
    score: float = 0.0


@cache_model(key="id", namespace="profile")
@dataclass
class Profile:
    id: uuid.UUID
    name: str
    active: bool
    ratio: float
    blob: bytes
    amount: Decimal
    color: Color
    level: Level
    born: date
    wakes: time
    seen: datetime
    naive: datetime
    tags: list[str]
    scores: dict[str, int]
    pair: tuple[int, str]
    many: tuple[int, ...]
    home: Address
    homes: list[Address]
    nickname: str | None = None
    extra: dict[int, list[Decimal]] = field(default_factory=dict)


def a_profile(**changes: Any) -> Profile:
    """A profile using every field type."""
    profile = Profile(
        id=uuid.UUID(int=7),
        name="Ada",
        active=True,
        ratio=0.25,
        blob=b"\x00\xff",
        amount=Decimal("12.340"),
        color=Color.BLUE,
        level=Level.HIGH,
        born=date(1815, 12, 10),
        wakes=time(6, 30, tzinfo=timezone(timedelta(hours=-3, seconds=1, microseconds=5))),
        seen=datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Paris")),
        naive=datetime(2024, 1, 1, 12, 0, 0, 123456),
        tags=["a", "b"],
        scores={"x": 1},
        pair=(1, "one"),
        many=(1, 2, 3),
        home=Address("London", "N1"),
        homes=[Address("Paris")],
        extra={3: [Decimal("1.5")]},
    )
    return dataclasses.replace(profile, **changes)


class Counting:
    """A proxy of a backend counting the calls of each method."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.backend, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)

        return counted


class NoIO:
    """A backend that fails the test on any call: for checks that must come before I/O."""

    def __getattr__(self, name: str) -> Any:
        def called(*args: Any, **kwargs: Any) -> Any:
            pytest.fail(f"backend.{name} was called")

        return called


@pytest.fixture(name="memcached", scope="module")
def _memcached(memcached_address: str) -> Iterator[MemcachedBackend]:
    """The session's memcached, for the memcached parametrization."""
    backend = MemcachedBackend(memcached_address)
    yield backend
    backend.close()


@pytest.fixture(name="redis_pools", scope="module")
def _redis_pools() -> Iterator[dict[str, Redis]]:
    """One Redis per node kind, closed after the module."""
    pools: dict[str, Redis] = {}
    yield pools
    for redis in pools.values():
        redis.close()


def make_cache(request: pytest.FixtureRequest, kind: str, pools: dict[str, Redis], **options: Any) -> Cache:
    """A cache of ``kind`` on a namespace of its own."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    if kind == "memory":
        return Cache(namespace=namespace, **options)
    if kind in ("memcached", "filesystem"):
        backend = make_backend(kind, request, request.getfixturevalue("tmp_path"))
        return Cache(backend, namespace=namespace, **options)
    if kind not in pools:
        url, kwargs = redis_target(request, kind)
        pools[kind] = Redis(url, **kwargs)
    return pools[kind].cache(namespace=namespace, **options)


@pytest.fixture(name="cache", params=BACKENDS)
def _cache(request: pytest.FixtureRequest, redis_pools: dict[str, Redis]) -> Iterator[Cache]:
    """A cache on its own namespace, emptied afterwards."""
    cache = make_cache(request, request.param, redis_pools)
    yield cache
    cache.clear()


@pytest.fixture(name="acache", params=BACKENDS)
async def _acache(request: pytest.FixtureRequest) -> AsyncIterator[AsyncCache]:
    """An async cache on its own namespace, emptied afterwards."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    redis = None
    if request.param in REDIS_KINDS:
        url, options = redis_target(request, request.param)
        redis = AsyncRedis(url, **options)
        cache = redis.cache(namespace=namespace)
    elif request.param in ("memcached", "filesystem"):
        backend = make_backend(request.param, request, request.getfixturevalue("tmp_path"))
        cache = AsyncCache(make_async_backend(request.param, backend), namespace=namespace)
    else:
        cache = AsyncCache(namespace=namespace)
    yield cache
    await cache.clear()
    if redis is not None:
        await redis.aclose()


@pytest.fixture(name="dm")
def _dm(cache: Cache) -> DataManager:
    """A DataManager with ``cache`` installed as ``ctx.cache``."""
    dm = DataManager()
    cache.install(dm)
    return dm


def rolled_back(dm: DataManager, body: Callable[[Any], None]) -> None:
    """Run ``body(ctx)`` in a context that then raises (and so rolls back)."""

    def run() -> None:
        with dm.context() as ctx:
            body(ctx)
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError, match="roll back"):
        run()


class TestDeclaring:
    """Declaring a model: what is refused, and when."""

    def test_a_model_must_be_a_dataclass(self) -> None:
        """A plain class is refused at decoration, naming the fix."""
        with pytest.raises(TypeError, match="needs a dataclass"):

            @cache_model(key="id")
            class Plain:
                id: int

    def test_the_key_must_name_fields(self) -> None:
        """A key naming no field is refused, listing the fields."""
        with pytest.raises(TypeError, match=r"\['nope'\].*fields are: id"):

            @cache_model(key=("id", "nope"))
            @dataclass
            class Thing:
                id: int

    def test_unsupported_field_types_are_refused_on_first_use(self) -> None:
        """An unsupported type (set, a non-Optional union, Any) raises TypeError naming the field."""

        @cache_model
        @dataclass
        class Odd:
            id: int
            bag: set[int]

        with pytest.raises(TypeError, match=r"Odd\.bag: unsupported field type"):
            Cache().models(Odd)

        @cache_model
        @dataclass
        class Union_:
            id: int
            either: int | str

        with pytest.raises(TypeError, match=r"Union_\.either: unsupported"):
            Cache().models(Union_)

    def test_a_key_field_must_be_a_key_type(self) -> None:
        """A float key is refused: it would not print the same way everywhere."""

        @cache_model(key="x")
        @dataclass
        class FloatKey:
            x: float

        with pytest.raises(TypeError, match=r"FloatKey\.x: a key field must be"):
            Cache().models(FloatKey)

    def test_a_ref_must_say_its_model(self) -> None:
        """A bare Ref field is refused, and so is a Ref to something that is no model."""

        @cache_model
        @dataclass
        class Bare:
            id: int
            other: Ref  # type: ignore[type-arg]

        with pytest.raises(TypeError, match=r"Bare\.other: say which model"):
            Cache().models(Bare)

        @cache_model
        @dataclass
        class ToNothing:
            id: int
            other: Ref[Address]

        with pytest.raises(TypeError, match="is not a cache model"):
            Cache().models(ToNothing).save(ToNothing(1, Ref(1)))

    @pytest.mark.parametrize(
        ("options", "error", "match"),
        [
            ({"namespace": ""}, ValueError, "namespace must be non-empty"),
            ({"namespace": "{x}"}, ValueError, "without braces"),
            ({"ttl": 0}, ValueError, "ttl must be positive"),
            ({"serializer": "nope"}, ValueError, "unknown serializer 'nope'"),
            ({"key_format": "{id}/{other}"}, ValueError, "must name only the key fields"),
        ],
    )
    def test_bad_options(self, options: dict[str, Any], error: type[Exception], match: str) -> None:
        """Each bad option raises at decoration, saying what was wrong."""
        with pytest.raises(error, match=match):

            @cache_model(key="id", **options)
            @dataclass
            class Thing:
                id: int

    def test_only_models_have_records(self) -> None:
        """cache.models() of a plain dataclass raises TypeError naming the decorator."""
        with pytest.raises(TypeError, match="decorated with @cache_model"):
            Cache().models(Address)

    def test_options_object_and_key_format(self) -> None:
        """ModelOptions can be passed whole; key_format shapes the stored key."""

        @cache_model(options=ModelOptions(key=("org", "n"), namespace="doc", key_format="{org}/{n}"))
        @dataclass
        class Doc:
            org: str
            n: int

        cache = Cache(namespace="app")
        assert cache.models(Doc).key(("acme", 3)) == "app:1:doc:acme/3"


class TestCompositeKeys:
    def test_separators_inside_key_fields_never_collide(self, cache: Cache) -> None:
        """("acme:eu", 1) and ("acme", "eu:1")-like keys are two records: one tenant never reads another's."""
        sessions = cache.models(Session)
        sessions.save(Session("acme:eu", 1, user="eu user"))
        sessions.save(Session("acme", 1, user="acme user"))
        assert sessions.key(("acme:eu", 1)) != sessions.key(("acme", 1))
        other = cache.models(Session).get(("acme:eu", 1))
        assert other is not None
        assert other.user == "eu user"
        assert sessions.key(("a:b", 2)).endswith(":a%3Ab:2")

    def test_a_lone_surrogate_in_a_field_round_trips(self, cache: Cache) -> None:
        """A str field (or key field) holding a lone surrogate is stored and read back."""
        sessions = cache.models(Session)
        sessions.save(Session("t\udcff", 1, user="u\udcff"))
        got = sessions.get(("t\udcff", 1))
        assert got is not None
        assert got.user == "u\udcff"


class TestRoundTrip:
    """Every supported field type comes back exactly, with each serializer."""

    @pytest.mark.parametrize("serializer", ["json", "msgpack"])
    def test_every_field_type_round_trips(self, cache: Cache, serializer: str) -> None:
        """Equal values, same types, and the very same time zone (an IANA zone stays one)."""

        @cache_model(key="id", namespace=f"profile-{serializer}", serializer=serializer)
        @dataclass
        class P(Profile):
            pass

        profiles = cache.models(P)
        original = P(**dataclasses.asdict(a_profile()) | {"home": Address("London", "N1")})
        original.homes = [Address("Paris")]
        profiles.save(original)
        back = profiles.get(original.id)
        assert back == original
        assert back is not None
        assert back.seen.tzinfo == ZoneInfo("Europe/Paris")
        assert back.seen.fold == 1
        assert back.seen.utcoffset() == timedelta(hours=1)
        assert back.wakes.tzinfo == original.wakes.tzinfo
        assert type(back.pair) is tuple
        assert type(back.level) is Level
        assert type(back.home) is Address

    def test_optional_none_and_defaults(self, cache: Cache) -> None:
        """None in an Optional field round-trips."""
        profiles = cache.models(Profile)
        profiles.save(a_profile(nickname=None))
        got = profiles.get(uuid.UUID(int=7))
        assert got is not None
        assert got.nickname is None


class TestValidation:
    """Wrong values raise TypeError naming the model, the field and the value's type."""

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"name": 1}, r"Profile\.name: expected str, got int"),
            ({"ratio": "1"}, r"Profile\.ratio: expected float, got str"),
            ({"active": 1}, r"Profile\.active: expected bool, got int"),
            ({"amount": 1.5}, r"Profile\.amount: expected Decimal, got float"),
            ({"color": "red"}, r"Profile\.color: expected Color, got str"),
            ({"born": datetime(2020, 1, 1)}, r"Profile\.born: expected date, got datetime"),
            ({"tags": ["a", 2]}, r"Profile\.tags\[1\]: expected str, got int"),
            ({"scores": {"x": "1"}}, r"Profile\.scores\['x'\]: expected int, got str"),
            ({"scores": {1: 1}}, r"Profile\.scores<key>: expected str, got int"),
            ({"pair": (1, 2)}, r"Profile\.pair\[1\]: expected str, got int"),
            ({"pair": (1,)}, r"Profile\.pair: expected tuple\[int, str\], got tuple"),
            ({"many": [1]}, r"Profile\.many: expected tuple\[int, \.\.\.\], got list"),
            ({"home": {"city": "x"}}, r"Profile\.home: expected Address, got dict"),
            ({"homes": [Address(3)]}, r"Profile\.homes\[0\]\.city: expected str, got int"),  # type: ignore[arg-type]
            ({"nickname": 5}, r"Profile\.nickname: expected str \| None, got int"),
            ({"id": str(uuid.UUID(int=7))}, r"Profile\.id: expected UUID, got str"),
        ],
    )
    def test_save_refuses_a_wrong_value(self, changes: dict[str, Any], message: str) -> None:
        """save() checks every field before any I/O."""
        profiles = Cache(NoIO()).models(Profile)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=message):
            profiles.save(a_profile(**changes))

    def test_every_write_validates_before_io(self) -> None:
        """create, replace, insert_many and update refuse wrong values without touching the backend."""
        sessions = Cache(NoIO()).models(Session)  # type: ignore[arg-type]
        bad = Session("acme", 1, user=None)  # type: ignore[arg-type]
        for write in (sessions.create, sessions.replace, sessions.save):
            with pytest.raises(TypeError, match=r"Session\.user: expected str, got NoneType"):
                write(bad)
        with pytest.raises(TypeError, match=r"Session\.user"):
            sessions.insert_many([bad])
        with pytest.raises(TypeError, match=r"Session\.user: expected str, got int"):
            sessions.update(("acme", 1), user=3)
        with pytest.raises(TypeError, match="expected a Session record, got Author"):
            sessions.save(Author(1, "x"))  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("key", "message"),
        [
            (None, r"Session key: expected a tuple of 2 \(tenant, id\), got NoneType"),
            (("acme",), "expected a tuple of 2"),
            (["acme", 1], "got list"),
            (("acme", "1"), r"Session key\.id: expected int, got str"),
            ((None, 1), r"Session key\.tenant: expected str, got NoneType"),
            (("acme", True), r"key\.id: expected int, got bool"),
        ],
    )
    def test_bad_keys_raise_before_io(self, key: Any, message: str) -> None:
        """A key that is None, of the wrong type or length raises TypeError on every operation."""
        sessions = Cache(NoIO()).models(Session)  # type: ignore[arg-type]
        operations = [
            lambda: sessions.get(key),
            lambda: sessions.get_many([key]),
            lambda: sessions.exists(key),
            lambda: sessions.update(key, user="x"),
            lambda: sessions.incr(key, "hits"),
            lambda: sessions.delete(key),
            lambda: sessions.delete_many([key]),
            lambda: sessions.touch(key),
        ]
        for operation in operations:
            with pytest.raises(TypeError, match=message):
                operation()

    def test_record_with_a_bad_key_field(self) -> None:
        """A record whose key field is None is refused before I/O."""
        with pytest.raises(TypeError, match=r"Session\.id: expected int, got NoneType"):
            Cache(NoIO()).models(Session).save(Session("acme", None, "x"))  # type: ignore[arg-type,arg-type]

    def test_update_refuses_unknown_and_key_fields(self) -> None:
        """An unknown field lists the known ones; a key field cannot be changed in place."""
        sessions = Cache(NoIO()).models(Session)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="Session has no field 'nope'; fields are: tenant, id, user"):
            sessions.update(("acme", 1), nope=1)
        with pytest.raises(TypeError, match=r"Session\.id is part of the key"):
            sessions.update(("acme", 1), id=2)

    def test_counters_need_int_fields(self) -> None:
        """incr on a float or unknown field, or with a float delta, raises TypeError."""
        sessions = Cache(NoIO()).models(Session)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"Session\.score: incr and decr need an int field"):
            sessions.incr(("acme", 1), "score")
        with pytest.raises(TypeError, match=r"Session\.nope: incr and decr need an int field"):
            sessions.decr(("acme", 1), "nope")
        with pytest.raises(TypeError, match="the delta must be an int, got float"):
            sessions.incr(("acme", 1), "hits", 1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"Session\.id is part of the key"):
            sessions.incr(("acme", 1), "id")

    def test_preload_names_a_ref_field(self) -> None:
        """Preloading a field that is not a Ref raises TypeError before I/O."""
        with pytest.raises(
            TypeError, match="Post has no Ref field 'title' to preload; Ref fields: author, editor"
        ):
            Cache(NoIO()).models(Post).get_many([1], preload=("title",))  # type: ignore[arg-type]


class TestOperations:
    """The operations outside a context: each writes at once."""

    def test_get_save_exists_delete(self, cache: Cache) -> None:
        """A saved record reads back; exists and delete report what was there."""
        sessions = cache.models(Session)
        assert sessions.get(("acme", 1)) is None
        assert not sessions.exists(("acme", 1))
        sessions.save(Session("acme", 1, "ada"))
        assert sessions.get(("acme", 1)) == Session("acme", 1, "ada")
        assert sessions.exists(("acme", 1))
        assert cache.backend.get(cache.key("session:acme:1")) is not None
        assert sessions.delete(("acme", 1))
        assert not sessions.delete(("acme", 1))
        assert sessions.get(("acme", 1)) is None

    def test_create_and_replace(self, cache: Cache) -> None:
        """create fails on a taken key; replace on a missing one."""
        sessions = cache.models(Session)
        with pytest.raises(RecordMissing, match="no record is stored at"):
            sessions.replace(Session("acme", 1, "ada"))
        sessions.create(Session("acme", 1, "ada"))
        with pytest.raises(RecordExists, match="use save"):
            sessions.create(Session("acme", 1, "bob"))
        sessions.replace(Session("acme", 1, "cy"))
        assert sessions.get(("acme", 1)) == Session("acme", 1, "cy")

    def test_insert_many_and_get_many_are_one_round_trip_each(self, cache: Cache) -> None:
        """100 records go in with one call and come back with one, missing keys left out."""
        counting = Counting(cache.backend)
        cache.backend = counting  # type: ignore[assignment]
        sessions = cache.models(Session)
        sessions.insert_many(Session("acme", i, f"u{i}") for i in range(100))
        found = sessions.get_many([("acme", i) for i in range(105)])
        assert counting.calls == {"set_many": 1, "get_many": 1}
        assert len(found) == 100
        assert found["acme", 42] == Session("acme", 42, "u42")
        assert sessions.delete_many([("acme", i) for i in range(98, 103)]) == 2

    def test_update_incr_decr(self, cache: Cache) -> None:
        """update changes only the named fields; incr and decr count an int field."""
        sessions = cache.models(Session)
        sessions.save(Session("acme", 1, "ada", score=1.5))
        assert sessions.update(("acme", 1), user="bob") == Session("acme", 1, "bob", score=1.5)
        assert sessions.incr(("acme", 1), "hits", 5) == 5
        assert sessions.decr(("acme", 1), "hits") == 4
        assert sessions.get(("acme", 1)) == Session("acme", 1, "bob", hits=4, score=1.5)

    def test_update_and_counters_on_a_missing_record(self, cache: Cache) -> None:
        """update, incr and decr of a missing record raise RecordMissing (a KeyError)."""
        sessions = cache.models(Session)
        with pytest.raises(RecordMissing):
            sessions.update(("acme", 9), user="x")
        with pytest.raises(KeyError):
            sessions.incr(("acme", 9), "hits")

    def test_update_is_atomic_under_concurrent_writers(self, cache: Cache) -> None:
        """Four threads counting and renaming at once lose no increment."""
        sessions = cache.models(Session)
        sessions.save(Session("acme", 1, "ada"))

        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(25):
                    sessions.incr(("acme", 1), "hits")
                    sessions.update(("acme", 1), user=f"t{n}-{i}")
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        got = sessions.get(("acme", 1))
        assert got is not None
        assert got.hits == 100

    def test_update_keeps_the_ttl_and_touch_restarts_it(self, cache: Cache) -> None:
        """The model's TTL applies on save; update keeps what is left; touch sets a new one."""
        sessions = cache.models(Session)
        sessions.save(Session("acme", 1, "ada"))
        full = sessions.key(("acme", 1))
        assert 30_000 < (cache.backend.pttl(full) or 0) <= 60_000
        assert cache.backend.touch(full, 5000)
        sessions.update(("acme", 1), user="bob")
        assert 0 < (cache.backend.pttl(full) or 0) <= 5000
        assert sessions.touch(("acme", 1))
        assert (cache.backend.pttl(full) or 0) > 30_000
        assert sessions.touch(("acme", 1), ttl=None)
        assert cache.backend.pttl(full) == -1
        assert sessions.touch(("acme", 1), ttl=10)
        assert 5000 < (cache.backend.pttl(full) or 0) <= 10_000
        assert not sessions.touch(("acme", 2))

    def test_callable_ttl(self, cache: Cache) -> None:
        """A callable TTL is computed from each record, on save and on touch."""

        @cache_model(key="id", namespace="ttl-fn", ttl=lambda r: None if r.forever else 30)
        @dataclass
        class Temp:
            id: int
            forever: bool

        temps = cache.models(Temp)
        temps.insert_many([Temp(1, True), Temp(2, False)])
        assert cache.backend.pttl(temps.key(1)) == -1
        assert 15_000 < (cache.backend.pttl(temps.key(2)) or 0) <= 30_000
        assert temps.touch(2)
        assert not temps.touch(3)

    def test_update_gives_up_after_losing_every_compare_and_set(self) -> None:
        """A backend whose compare-and-set always loses makes update raise UpdateConflict."""

        class Losing(MemoryBackend):
            def compare_and_set(self, key: str, expected: bytes, value: bytes) -> bool:
                return False

        sessions = Cache(Losing()).models(Session)
        sessions.save(Session("acme", 1, "ada"))
        with pytest.raises(UpdateConflict, match="lost its compare-and-set 50 times"):
            sessions.update(("acme", 1), user="bob")

    def test_backend_down_reads_miss_and_writes_drop(self, caplog: pytest.LogCaptureFixture) -> None:
        """With the backend unreachable, reads miss and writes are dropped with a warning."""

        class Down(MemoryBackend):
            def _down(self, *args: Any) -> Any:
                raise CacheUnavailable("down")

            get = get_many = set = set_many = compare_and_set = touch = pttl = _down  # type: ignore[assignment]

        sessions = Cache(Down(), retry_interval=60).models(Session)
        with caplog.at_level(logging.WARNING, "polydatum.cache"):
            sessions.save(Session("acme", 1, "ada"))
        assert "the backend is unavailable" in caplog.text
        assert sessions.get(("acme", 1)) is None
        assert sessions.get_many([("acme", 1)]) == {}
        assert not sessions.exists(("acme", 1))
        assert sessions.update(("acme", 1), user="x") is None
        assert sessions.incr(("acme", 1), "hits") is None
        assert not sessions.touch(("acme", 1))
        sessions.create(Session("acme", 1, "ada"))  # dropped, not an error


class TestTransactions:
    """Inside a context, writes wait for the commit and the context reads its own writes."""

    def test_writes_wait_for_the_commit(self, dm: DataManager, cache: Cache) -> None:
        """Nothing is stored until the context commits; inside it, reads see the writes."""
        outside = cache.models(Session)
        outside.save(Session("acme", 2, "old"))
        with dm.context() as ctx:
            sessions = ctx.cache.models(Session)
            sessions.create(Session("acme", 1, "ada"))
            sessions.update(("acme", 1), user="bob")
            sessions.incr(("acme", 1), "hits", 2)
            sessions.delete(("acme", 2))
            assert sessions.get(("acme", 1)) == Session("acme", 1, "bob", hits=2)
            assert sessions.exists(("acme", 1))
            assert not sessions.exists(("acme", 2))
            assert sessions.get_many([("acme", 1), ("acme", 2)]) == {
                ("acme", 1): Session("acme", 1, "bob", hits=2)
            }
            assert outside.get(("acme", 1)) is None
            assert outside.get(("acme", 2)) is not None
        assert outside.get(("acme", 1)) == Session("acme", 1, "bob", hits=2)
        assert outside.get(("acme", 2)) is None
        assert 30_000 < (cache.backend.pttl(outside.key(("acme", 1))) or 0) <= 60_000

    def test_rollback_drops_the_writes(self, dm: DataManager, cache: Cache) -> None:
        """A context that raises stores nothing."""
        outside = cache.models(Session)
        outside.save(Session("acme", 2, "old"))

        def body(ctx: Any) -> None:
            sessions = ctx.cache.models(Session)
            sessions.save(Session("acme", 1, "ada"))
            sessions.update(("acme", 2), user="new")

        rolled_back(dm, body)
        assert outside.get(("acme", 1)) is None
        assert outside.get(("acme", 2)) == Session("acme", 2, "old")

    def test_patches_apply_at_commit_to_what_is_stored_then(self, dm: DataManager, cache: Cache) -> None:
        """An increment in a context adds to the value stored at commit, not the one read before."""
        outside = cache.models(Session)
        outside.save(Session("acme", 1, "ada", hits=10))
        with dm.context() as ctx:
            sessions = ctx.cache.models(Session)
            assert sessions.incr(("acme", 1), "hits", 5) == 15
            assert sessions.update(("acme", 1), score=2.0) == Session("acme", 1, "ada", hits=15, score=2.0)
            outside.incr(("acme", 1), "hits", 100)  # another writer, before the commit
            outside.update(("acme", 1), user="zed")
            assert sessions.get(("acme", 1)) == Session("acme", 1, "zed", hits=115, score=2.0)
            sessions.touch(("acme", 1), ttl=None)
        assert outside.get(("acme", 1)) == Session("acme", 1, "zed", hits=115, score=2.0)
        assert cache.backend.pttl(outside.key(("acme", 1))) == -1

    def test_immediate_writes_at_once(self, dm: DataManager, cache: Cache) -> None:
        """immediate=True stores even inside a context that then rolls back."""
        outside = cache.models(Session)

        def body(ctx: Any) -> None:
            ctx.cache.models(Session, immediate=True).save(Session("acme", 1, "ada"))
            assert outside.get(("acme", 1)) is not None

        rolled_back(dm, body)
        assert outside.get(("acme", 1)) == Session("acme", 1, "ada")

    def test_errors_inside_a_context(self, dm: DataManager, cache: Cache) -> None:
        """create on a key taken (in the store or in the context) and replace of a missing one raise."""
        cache.models(Session).save(Session("acme", 1, "ada"))
        with dm.context() as ctx:
            sessions = ctx.cache.models(Session)
            with pytest.raises(RecordExists):
                sessions.create(Session("acme", 1, "bob"))
            sessions.create(Session("acme", 2, "cy"))
            with pytest.raises(RecordExists):
                sessions.create(Session("acme", 2, "cy"))
            with pytest.raises(RecordMissing):
                sessions.replace(Session("acme", 3, "dee"))
            with pytest.raises(RecordMissing):
                sessions.update(("acme", 3), user="x")
            sessions.delete(("acme", 1))
            with pytest.raises(RecordMissing):
                sessions.incr(("acme", 1), "hits")
            sessions.create(Session("acme", 1, "again"))  # deleted in this context: free again
            sessions.replace(Session("acme", 2, "cy2"))
            assert not sessions.touch(("acme", 3))
            assert sessions.delete_many([("acme", 3)]) == 0
        assert cache.models(Session).get_many([("acme", 1), ("acme", 2)]) == {
            ("acme", 1): Session("acme", 1, "again"),
            ("acme", 2): Session("acme", 2, "cy2"),
        }

    def test_a_create_lost_at_commit_is_logged(
        self, dm: DataManager, cache: Cache, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Another writer taking the key before the commit wins; the loss is logged, not raised."""
        outside = cache.models(Session)
        with caplog.at_level(logging.WARNING, "polydatum.cache.models"), dm.context() as ctx:
            ctx.cache.models(Session).create(Session("acme", 1, "mine"))
            outside.save(Session("acme", 1, "theirs"))
        assert outside.get(("acme", 1)) == Session("acme", 1, "theirs")
        assert "create (the key was taken)" in caplog.text

    def test_an_update_whose_record_vanished_is_logged(
        self, dm: DataManager, cache: Cache, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A record deleted by another writer before the commit drops the context's update, logged."""
        outside = cache.models(Session)
        outside.save(Session("acme", 1, "ada"))
        with caplog.at_level(logging.WARNING, "polydatum.cache.models"), dm.context() as ctx:
            ctx.cache.models(Session).incr(("acme", 1), "hits")
            outside.delete(("acme", 1))
        assert outside.get(("acme", 1)) is None
        assert "was gone at commit" in caplog.text

    def test_a_replace_lost_at_commit_and_a_callable_ttl_touch(
        self, dm: DataManager, cache: Cache, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A replace whose record another writer deleted is dropped and logged; touch in a context
        computes a callable TTL from the record the context sees."""

        @cache_model(key="id", namespace="ttl-ctx", ttl=lambda r: 100 if r.long else 10)
        @dataclass
        class Temp:
            id: int
            long: bool

        cache.models(Temp).insert_many([Temp(1, False), Temp(2, False)])
        outside = cache.models(Session)
        outside.save(Session("acme", 1, "ada"))
        with caplog.at_level(logging.WARNING, "polydatum.cache.models"), dm.context() as ctx:
            ctx.cache.models(Session).replace(Session("acme", 1, "bob"))
            outside.delete(("acme", 1))
            temps = ctx.cache.models(Temp)
            temps.update(1, long=True)
            assert temps.touch(1)
            assert not temps.touch(3)
        assert outside.get(("acme", 1)) is None
        assert "replace (the key was gone)" in caplog.text
        assert (cache.backend.pttl(cache.models(Temp).key(1)) or 0) > 50_000

    def test_writes_go_through_the_outbox(self, tmp_path: Path) -> None:
        """With an outbox, writes are rows of the SQL transaction: applied after commit, not on rollback."""
        dm = DataManager()
        db = Database(f"sqlite:///{tmp_path / 'app.db'}").install(dm)
        outbox = Outbox(db).install(dm)
        outbox.create_table()
        cache = Cache(MemoryBackend(), namespace="shop", outbox=outbox).install(dm)
        outside = cache.models(Session)
        outside.save(Session("acme", 5, "old", hits=1))
        rolled_back(dm, lambda ctx: ctx.cache.models(Session).save(Session("acme", 1, "ada")))
        assert outside.get(("acme", 1)) is None
        with dm.context() as ctx:
            sessions = ctx.cache.models(Session)
            sessions.save(Session("acme", 1, "ada"))
            sessions.incr(("acme", 5), "hits", 2)
            sessions.update(("acme", 5), user="new")
            sessions.touch(("acme", 5), ttl=None)
            sessions.delete(("acme", 6))
            assert sessions.get(("acme", 5)) == Session("acme", 5, "new", hits=3)
            assert outside.get(("acme", 1)) is None
        assert outbox.status().pending == 0
        assert outside.get(("acme", 1)) == Session("acme", 1, "ada")
        assert outside.get(("acme", 5)) == Session("acme", 5, "new", hits=3)
        assert cache.backend.pttl(outside.key(("acme", 5))) == -1
        db.dispose()

    def test_writes_wait_in_the_outbox_while_the_backend_is_down(self, tmp_path: Path) -> None:
        """A write the backend refuses at the commit stays an outbox row, and a relay applies it later."""

        class Flaky(MemoryBackend):
            down = False

            def set(self, key: str, value: bytes, ttl_ms: int | None, when: Any) -> bool:
                if self.down:
                    raise CacheUnavailable("down")
                return super().set(key, value, ttl_ms, when)

        dm = DataManager()
        db = Database(f"sqlite:///{tmp_path / 'app.db'}").install(dm)
        outbox = Outbox(db, backoff=0.01, max_backoff=0.01).install(dm)
        outbox.create_table()
        backend = Flaky()
        cache = Cache(backend, namespace="shop", outbox=outbox).install(dm)
        backend.down = True
        with dm.context() as ctx:
            ctx.cache.models(Session).save(Session("acme", 1, "ada"))
        assert outbox.status().pending == 1
        backend.down = False
        relay = outbox.relay()
        end = clock.monotonic() + 30
        while outbox.status().pending and clock.monotonic() < end:
            relay.run_once()
        assert cache.models(Session).get(("acme", 1)) == Session("acme", 1, "ada")
        db.dispose()


class TestEvolution:
    """Records written by an older model load into the current one, or are a logged miss."""

    def declare(self, namespace: str, *fields: tuple[str, Any] | tuple[str, Any, Any]) -> type:
        """A model named Item under ``namespace`` with ``fields``."""
        cls = dataclasses.make_dataclass("Item", [("id", int), *fields])
        return cache_model(key="id", namespace=namespace)(cls)

    def test_compatible_changes_load(self, cache: Cache) -> None:
        """A new field takes its default, a removed one is ignored, an int becomes a float."""
        old = self.declare("evolve", ("price", int), ("gone", str), ("tags", list[str]))
        new = self.declare(
            "evolve",
            ("price", float),
            ("tags", tuple[str, ...]),
            ("added", str, field(default="fresh")),
            ("later", list[int], field(default_factory=list)),
        )
        cache.models(old).save(old(1, 3, "x", ["a"]))
        got = cache.models(new).get(1)
        assert got == new(1, 3.0, ("a",), "fresh", [])
        assert type(got.price) is float

    def test_an_incompatible_record_is_a_miss_logged_once(
        self, cache: Cache, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A field whose type changed incompatibly, or a new required field, misses; one warning per model."""
        old = self.declare("clash", ("price", str))
        cache.models(old).insert_many([old(1, "cheap"), old(2, "dear")])
        new = self.declare("clash", ("price", int))
        with caplog.at_level(logging.WARNING, "polydatum.cache.models"):
            assert cache.models(new).get(1) is None
            assert cache.models(new).get_many([1, 2]) == {}
        warnings = [r for r in caplog.records if r.name == "polydatum.cache.models"]
        assert len(warnings) == 1
        assert "field 'price': expected int, found str" in warnings[0].getMessage()
        required = self.declare("clash", ("price", str), ("owner", str))
        assert cache.models(required).get(1) is None
        with pytest.raises(RecordMissing):
            cache.models(new).update(1, price=3)

    def test_unreadable_bytes_are_a_miss(self, cache: Cache, caplog: pytest.LogCaptureFixture) -> None:
        """Foreign bytes, a corrupt value, a non-record and a refused __post_init__ never raise."""

        @cache_model(key="id", namespace="strict")
        @dataclass
        class Strict:
            id: int
            n: int = 0

            def __post_init__(self) -> None:
                if self.n < 0:
                    raise ValueError("n must not be negative")

        items = cache.models(Strict)
        for i, data in enumerate([b"\x00foreign", b"j{not json", b"j[1,2]", b'j{"id":4,"n":-1}', b"42"]):
            cache.backend.set(items.key(i), data, None, "always")
            assert items.get(i) is None
        assert items.get_many(range(5)) == {}

    @pytest.mark.parametrize(
        ("stored", "hint"),
        [
            ("x", list[int]),
            (["x"], list[int]),
            ("x", dict[str, int]),
            ("x", tuple[int, str]),
            ([1, "a", 2], tuple[int, str]),
            ("x", Address),
            ({"zip": "1"}, Address),
            (1.5, int),
            ("x", Decimal),
            ("not-a-uuid", uuid.UUID),
            (None, int),
            ([1, 2], Ref[Session]),
            ({"$b64": "AA=="}, Address),
            ([1, "Mars/Olympus"], datetime),
        ],
    )
    def test_incompatible_shapes_are_misses(self, stored: Any, hint: Any) -> None:
        """Each stored shape the new type cannot read is a miss, never an exception."""
        namespace = f"shape-{uuid.uuid4().hex[:8]}"
        new = self.declare(namespace, ("v", hint))
        cache = Cache()
        items = cache.models(new)
        data = new.__cache_model__.serializer.dumps({"id": 1, "v": stored})
        cache.backend.set(items.key(1), b"j" + data, None, "always")
        assert items.get(1) is None

    def test_json_of_other_writers_loads(self) -> None:
        """Pretty-printed JSON, a field missing (its default) and an int for a float all load."""
        model = self.declare(
            "spaced",
            ("at", datetime),
            ("tags", list[str]),
            ("price", float),
            ("note", str, field(default="-")),
        )
        cache = Cache()
        items = cache.models(model)
        data = b'j {\n  "id": 1,\n  "at": "2024-01-01T00:00:00+00:00",\n  "tags": ["a"],\n  "price": 3\n}\n'
        cache.backend.set(items.key(1), data, None, "always")
        got = items.get(1)
        assert got == model(1, datetime(2024, 1, 1, tzinfo=timezone.utc), ["a"], 3.0, "-")
        assert type(got.price) is float

    def test_a_value_that_does_not_parse_is_named(self, caplog: pytest.LogCaptureFixture) -> None:
        """Stored text that is no UUID is a miss whose warning names the field and the text."""
        model = self.declare(f"unparsable-{uuid.uuid4().hex[:8]}", ("ref", uuid.UUID))
        cache = Cache()
        items = cache.models(model)
        cache.backend.set(items.key(1), b'j{"id":1,"ref":"nope"}', None, "always")
        with caplog.at_level(logging.WARNING, "polydatum.cache.models"):
            assert items.get(1) is None
        assert "field 'ref': 'nope' does not parse" in caplog.text

    def test_tagged_values_of_other_writers_load(self) -> None:
        """Values the json serializer tagged (a tuple, a datetime, a Decimal) load into the current types."""
        model = self.declare(
            "tagged", ("tags", list[str]), ("at", datetime), ("price", Decimal), ("home", Address)
        )
        cache = Cache()
        items = cache.models(model)
        data = (
            b'j{"id":1,"tags":{"$tuple":["a"]},"at":{"$dt":"2024-01-01T00:00:00+00:00:01.5"},'
            b'"price":{"$dec":"1.5"},"home":{"city":"x","$$odd":1}}'
        )
        cache.backend.set(items.key(1), data, None, "always")
        at = datetime(2024, 1, 1, tzinfo=timezone(timedelta(seconds=1, microseconds=500000)))
        assert items.get(1) == model(1, ["a"], at, Decimal("1.5"), Address("x"))

    def test_json_records_are_the_json_serializers_bytes(self) -> None:
        """The plain-JSON fast path writes exactly what the json serializer would."""
        items = Cache().models(Session)
        data = Session.__cache_model__.encode(Session("acme", 1, "ada", score=1.5))  # type: ignore[attr-defined]
        plain = {"tenant": "acme", "id": 1, "user": "ada", "hits": 0, "score": 1.5}
        assert data == b"j" + JSONSerializer().dumps(plain)
        assert items.key(("acme", 1)) == "default:1:session:acme:1"

    def test_enum_and_zone_evolution(self, cache: Cache) -> None:
        """A stored enum value no longer in the Enum and an unknown zone are misses."""
        old = self.declare("colors", ("c", str))
        cache.models(old).save(old(1, "green"))
        new = self.declare("colors", ("c", Color))
        assert cache.models(new).get(1) is None
        zoned = self.declare("zones", ("at", datetime))
        data = b'j{"id":1,"at":[{"$dt":"2024-01-01T00:00:00+00:00"},"Mars/Olympus"]}'
        cache.backend.set(cache.models(zoned).key(1), data, None, "always")
        assert cache.models(zoned).get(1) is None


class TestRefs:
    """References to other models: lazy, or preloaded in one extra round trip."""

    def test_lazy_load_through_the_same_cache(self, cache: Cache) -> None:
        """A ref of a record read loads its target once, on first get()."""
        cache.models(Author).save(Author(1, "ada"))
        cache.models(Post).save(Post(10, "hello", Ref(1)))
        post = cache.models(Post).get(10)
        assert post is not None
        assert post.author == Ref(1)
        assert not post.author.loaded
        assert post.author.get() == Author(1, "ada")
        assert post.author.loaded
        assert post.editor is None

    def test_preload_is_one_extra_round_trip(self, cache: Cache) -> None:
        """get_many with preload reads the posts, then all their authors at once, and no more."""
        cache.models(Author).insert_many([Author(1, "ada"), Author(2, "bob")])
        cache.models(Post).insert_many(
            [Post(i, f"p{i}", Ref(1 + i % 2), Ref(2) if i == 0 else None) for i in range(10)]
            + [Post(99, "orphan", Ref(3))]
        )
        counting = Counting(cache.backend)
        cache.backend = counting  # type: ignore[assignment]
        posts = cache.models(Post).get_many([*range(10), 99], preload=("author", "editor"))
        assert counting.calls == {"get_many": 3}
        assert [posts[i].author.get() for i in range(2)] == [Author(1, "ada"), Author(2, "bob")]
        assert posts[0].editor is not None
        assert posts[0].editor.get() == Author(2, "bob")
        assert posts[99].author.get() is None
        assert counting.calls == {"get_many": 3}

    def test_ref_to_and_unbound_refs(self) -> None:
        """Ref.to() is loaded already; a ref made by hand cannot load and says why."""
        author = Author(1, "ada")
        ref = Ref.to(author)
        assert ref.loaded
        assert ref.get() is author
        assert repr(ref) == "Ref(1)"
        assert hash(ref) == hash(Ref(1))
        with pytest.raises(RuntimeError, match="not bound to a cache"):
            Ref(1).get()
        with pytest.raises(TypeError, match=r"Post\.author\.key: expected int, got str"):
            Cache(NoIO()).models(Post).save(Post(1, "t", Ref("1")))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"Post\.author: expected Ref\[Author\], got Author"):
            Cache(NoIO()).models(Post).save(Post(1, "t", author))  # type: ignore[arg-type]

    def test_composite_refs(self, cache: Cache) -> None:
        """A ref to a model with a composite key stores and loads the key tuple."""

        @cache_model(key="id", namespace="visit")
        @dataclass
        class Visit:
            id: int
            session: Ref[Session]

        cache.models(Session).save(Session("acme", 1, "ada"))
        cache.models(Visit).save(Visit(1, Ref(("acme", 1))))
        visits = cache.models(Visit).get_many([1], preload=["session"])
        assert visits[1].session.key == ("acme", 1)
        assert visits[1].session.get() == Session("acme", 1, "ada")


class TestAsync:
    """AsyncModels: the same operations, awaited."""

    async def test_operations(self, acache: AsyncCache) -> None:
        """get, create, replace, update, incr, touch, get_many, delete on an async cache."""
        sessions = acache.models(Session)
        assert await sessions.get(("acme", 1)) is None
        await sessions.create(Session("acme", 1, "ada"))
        with pytest.raises(RecordExists):
            await sessions.create(Session("acme", 1, "ada"))
        with pytest.raises(RecordMissing):
            await sessions.replace(Session("acme", 2, "x"))
        await sessions.replace(Session("acme", 1, "bob"))
        assert await sessions.update(("acme", 1), score=1.0) == Session("acme", 1, "bob", score=1.0)
        assert await sessions.incr(("acme", 1), "hits", 3) == 3
        assert await sessions.decr(("acme", 1), "hits") == 2
        with pytest.raises(RecordMissing):
            await sessions.incr(("acme", 2), "hits")
        await sessions.insert_many([Session("acme", 2, "cy")])
        assert await sessions.exists(("acme", 2))
        assert set(await sessions.get_many([("acme", 1), ("acme", 2), ("acme", 3)])) == {
            ("acme", 1),
            ("acme", 2),
        }
        assert await sessions.touch(("acme", 1), ttl=None)
        assert await acache.backend.pttl(sessions.key(("acme", 1))) == -1
        assert await sessions.touch(("acme", 1))
        assert not await sessions.touch(("acme", 3))
        assert await sessions.delete_many([("acme", 1), ("acme", 2), ("acme", 3)]) == 2
        assert not await sessions.exists(("acme", 2))

    async def test_transactions(self, acache: AsyncCache) -> None:
        """In an async context writes wait for the commit, reads see them, rollback drops them."""
        dm = DataManager()
        acache.install(dm)
        outside = acache.models(Session)
        await outside.save(Session("acme", 2, "old"))
        async with dm.context() as ctx:
            sessions = ctx.cache.models(Session)
            await sessions.create(Session("acme", 1, "ada"))
            await sessions.incr(("acme", 2), "hits", 4)
            await sessions.touch(("acme", 2), ttl=None)
            assert await sessions.get(("acme", 2)) == Session("acme", 2, "old", hits=4)
            await sessions.delete(("acme", 3))
            assert await outside.get(("acme", 1)) is None
        assert await outside.get(("acme", 1)) == Session("acme", 1, "ada")
        assert await outside.get(("acme", 2)) == Session("acme", 2, "old", hits=4)

        async def run() -> None:
            async with dm.context() as ctx:
                await ctx.cache.models(Session).delete(("acme", 1))
                raise RuntimeError("roll back")

        with pytest.raises(RuntimeError, match="roll back"):
            await run()
        assert await outside.exists(("acme", 1))

    async def test_commit_time_losses_are_logged(
        self, acache: AsyncCache, caplog: pytest.LogCaptureFixture
    ) -> None:
        """In an async context too, a create that lost its key and an update whose record went are logged."""

        @cache_model(key="id", namespace="ttl-async", ttl=lambda r: 100 if r.long else 10)
        @dataclass
        class Temp:
            id: int
            long: bool

        dm = DataManager()
        acache.install(dm)
        outside = acache.models(Session)
        await outside.save(Session("acme", 2, "ada"))
        await acache.models(Temp).save(Temp(1, True))
        with caplog.at_level(logging.WARNING, "polydatum.cache.models"):
            async with dm.context() as ctx:
                sessions = ctx.cache.models(Session)
                await sessions.create(Session("acme", 1, "mine"))
                await sessions.incr(("acme", 2), "hits")
                await sessions.replace(Session("acme", 2, "bob"))
                await sessions.update(("acme", 2), user="cy")
                assert await ctx.cache.models(Temp).touch(1)
                assert not await ctx.cache.models(Temp).touch(2)
                await outside.save(Session("acme", 1, "theirs"))
                await outside.delete(("acme", 2))
        assert await outside.get(("acme", 1)) == Session("acme", 1, "theirs")
        assert await outside.get(("acme", 2)) is None
        assert "create (the key was taken)" in caplog.text
        assert "replace (the key was gone)" in caplog.text
        assert (await acache.backend.pttl(acache.models(Temp).key(1)) or 0) > 50_000

    async def test_a_patch_whose_record_went_is_logged(
        self, acache: AsyncCache, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An async context's increment of a record deleted before the commit is dropped, logged."""
        dm = DataManager()
        acache.install(dm)
        outside = acache.models(Session)
        await outside.save(Session("acme", 1, "ada"))
        with caplog.at_level(logging.WARNING, "polydatum.cache.models"):
            async with dm.context() as ctx:
                await ctx.cache.models(Session).incr(("acme", 1), "hits")
                await outside.delete(("acme", 1))
        assert "was gone at commit" in caplog.text

    async def test_refs(self, acache: AsyncCache) -> None:
        """Lazy aget() and preload on an async cache."""
        await acache.models(Author).save(Author(1, "ada"))
        await acache.models(Post).insert_many([Post(1, "a", Ref(1)), Post(2, "b", Ref(1))])
        post = await acache.models(Post).get(1)
        assert post is not None
        assert await post.author.aget() == Author(1, "ada")
        posts = await acache.models(Post).get_many([1, 2], preload=("author",))
        assert all(p.author.loaded for p in posts.values())
        assert await posts[2].author.aget() == Author(1, "ada")

    async def test_conflict_and_bad_key(self) -> None:
        """UpdateConflict and TypeError on bad keys, awaited too."""

        class Losing(MemoryBackend):
            def compare_and_set(self, key: str, expected: bytes, value: bytes) -> bool:
                return False

        from polydatum.cache import AsyncMemoryBackend

        sessions = AsyncCache(AsyncMemoryBackend(Losing())).models(Session)
        await sessions.save(Session("acme", 1, "ada"))
        with pytest.raises(UpdateConflict):
            await sessions.update(("acme", 1), user="x")
        with pytest.raises(TypeError, match="Session key"):
            await sessions.get(None)


class TestBackendProtocol:
    """The two backend methods cache models added: compare_and_set and touch."""

    def test_compare_and_set_and_touch(self, cache: Cache) -> None:
        """compare_and_set swaps only the expected bytes and keeps the TTL; touch sets or removes one."""
        backend = cache.backend
        key = cache.key("cas")
        assert not backend.compare_and_set(key, b"a", b"b")
        assert not backend.touch(key, 1000)
        assert not backend.touch(key, None)
        backend.set(key, b"a", 30_000, "always")
        assert not backend.compare_and_set(key, b"x", b"b")
        assert backend.compare_and_set(key, b"a", b"b")
        assert backend.get(key) == b"b"
        assert 15_000 < (backend.pttl(key) or 0) <= 30_000
        assert backend.touch(key, None)
        assert backend.pttl(key) == -1
        assert backend.touch(key, 5000)
        assert 2500 < (backend.pttl(key) or 0) <= 5000


def test_get_many_spans_the_slots_of_a_cluster(
    request: pytest.FixtureRequest, redis_pools: dict[str, Redis]
) -> None:
    """On a cluster the records of one get_many live in many slots (no hash tag pins them), and
    it still finds every one; the compare-and-set script and touch work on whichever node holds a key."""
    cache = make_cache(request, "cluster", redis_pools)
    sessions = cache.models(Session)
    sessions.insert_many(Session(f"t{i}", i, "u") for i in range(20))
    client = redis_pools["cluster"].client()
    assert len({client.keyslot(sessions.key((f"t{i}", i))) for i in range(20)}) > 10
    assert len(sessions.get_many([(f"t{i}", i) for i in range(20)])) == 20
    assert sessions.incr(("t3", 3), "hits") == 1
    assert sessions.touch(("t3", 3), ttl=None)
    cache.clear()


class TestDelivery:
    """What an outbox row applies, and what it refuses."""

    def test_rows_apply_in_order_and_refuse_unknown_models(self, caplog: pytest.LogCaptureFixture) -> None:
        """A set whose condition fails is skipped and logged; a patch of an undeclared model raises."""
        backend = MemoryBackend()
        backend.set("k", b"x", None, "always")
        with caplog.at_level(logging.WARNING, "polydatum.cache.models"):
            deliver(backend, [{"op": "set", "key": "k", "data": "eQ==", "ttl": None, "when": "absent"}])
        assert backend.get("k") == b"x"
        assert "skipped at delivery" in caplog.text
        with pytest.raises(LookupError, match="no cache model 'nobody' is declared in this process"):
            deliver(backend, [{"op": "patch", "key": "k", "model": "nobody", "sets": "", "incr": {}}])

    def test_a_model_sharing_a_namespace_does_not_take_over_a_delivered_patch(self, tmp_path: Path) -> None:
        """A model declared later under the same namespace: the relay still patches with the right one."""
        dm = DataManager()
        db = Database(f"sqlite:///{tmp_path / 'app.db'}").install(dm)
        outbox = Outbox(db, deliver_on_commit=False).install(dm)
        outbox.create_table()
        cache = Cache(MemoryBackend(), namespace="twins", outbox=outbox).install(dm)
        cache.models(Session).save(Session("acme", 5, "old"))
        with dm.context() as ctx:
            ctx.cache.models(Session).update(("acme", 5), user="new")

        @cache_model(key="account", namespace=schema_of(Session).namespace)
        @dataclass
        class Other:  # same namespace, other fields: it must not be used for Session's rows
            account: int

        assert schema_of(Other).namespace == schema_of(Session).namespace
        relay = outbox.relay()
        assert relay.run_once() == 1
        assert outbox.status().pending == 0
        assert outbox.status().dead == 0
        assert cache.models(Session).get(("acme", 5)) == Session("acme", 5, "new")
        db.dispose()


class TestSerializerErrors:
    """A serializer refusing a value names the field."""

    def test_the_field_is_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A registered serializer that cannot store one field's value names that field."""
        # The registry is process-wide: register for this test only.
        monkeypatch.setattr(_serializers, "_SERIALIZERS", dict(_serializers._SERIALIZERS))

        class NoBytes(JSONSerializer):
            name = "no-bytes"

            def dumps(self, value: Any) -> bytes:
                if isinstance(value, dict) and any(type(v) is bytes for v in value.values()):
                    raise SerializationError("cannot serialize a value of type bytes")
                return super().dumps(value)

        name = f"no-bytes-{uuid.uuid4().hex}"
        register_serializer(name, NoBytes)

        @cache_model(key="id", namespace="nobytes", serializer=name)
        @dataclass
        class Blob:
            id: int
            data: bytes

        with pytest.raises(
            SerializationError, match=r"Blob\.data: the 'no-bytes' serializer cannot store it"
        ):
            Cache().models(Blob).save(Blob(1, b"x"))


async def test_async_writes_go_through_the_outbox(tmp_path: Path, redis_url: str) -> None:
    """AsyncRedis.cache(outbox=): rows written through the AsyncSession, applied after the commit."""
    dm = DataManager()
    adb = AsyncDatabase(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}").install(dm)
    outbox = Outbox(adb).install(dm)
    outbox.create_table()
    aredis = AsyncRedis(redis_url)
    cache = aredis.cache(namespace=f"pd-models-{uuid.uuid4().hex[:10]}", outbox=outbox).install(dm)
    outside = cache.models(Session)
    try:
        await outside.save(Session("acme", 1, "ada"))
        async with dm.context() as ctx:
            sessions = ctx.cache.models(Session)
            await sessions.incr(("acme", 1), "hits", 3)
            await sessions.create(Session("acme", 2, "bob"))
            assert await outside.get(("acme", 2)) is None
        outbox.flush()
        assert await outside.get(("acme", 1)) == Session("acme", 1, "ada", hits=3)
        assert await outside.get(("acme", 2)) == Session("acme", 2, "bob")
        assert outbox.status().pending == 0
    finally:
        await cache.clear()
        await aredis.aclose()
        await adb.dispose()

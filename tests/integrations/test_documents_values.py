"""Document values: what is stored with which tag, what is refused (naming the path), what cannot be read."""

from __future__ import annotations

import datetime as dt
import enum
import json
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from polydatum import DataManager
from polydatum.documents import Definition, Documents
from polydatum.errors import InvalidInput
from polydatum.sqlalchemy import Database
from polydatum.testing import transactional_database
from polydatum.werkzeug import PolydatumWSGIMiddleware


class Size(enum.Enum):
    S = "s"
    L = "l"


@dataclass
class Point:
    x: int
    y: int


class Odd(dt.tzinfo):
    """A tzinfo that is neither a ZoneInfo nor a fixed timezone."""

    def utcoffset(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=1)

    def dst(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)


@dataclass
class Setup:
    dm: DataManager
    docs: Documents
    db: Database
    points: Definition[Point]


@pytest.fixture(name="setup")
def fixture_setup() -> Iterator[Setup]:
    """In-memory SQLite documents: ``plain`` and ``sized`` (with Size) dicts, typed ``points``."""
    db = Database("sqlite://")
    dm = DataManager()
    db.install(dm)
    docs = Documents(db)
    docs.define("plain")
    docs.define("sized", types=[Size])
    points = docs.define("points", Point)
    docs.install(dm)
    docs.create_tables()
    yield Setup(dm, docs, db, points)
    db.dispose()


def put(setup: Setup, value: Any, collection: str = "plain") -> None:
    with setup.dm.context() as ctx:
        ctx.docs.collection(collection).put("k", value)


def store_raw(setup: Setup, collection: str, body: str) -> None:
    """Write a body as text, bypassing the codec, as an old or damaged row would be."""
    table = setup.docs.definition(collection).table
    with setup.db.engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO {table.name} (key, version, body) VALUES ('k', 1, ?)", (body,))


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ({"a": {"b": float("nan")}}, InvalidInput, r"document\.a\.b is nan, which JSON cannot carry"),
        ({"a": [{1: "x"}]}, TypeError, r"document\.a\[0\] has a key that is not a str"),
        ({"s": "x\ud800"}, InvalidInput, r"document\.s holds a lone surrogate"),
        ({"b": bytearray(b"x")}, TypeError, r"document\.b is of type bytearray"),
        ({"e": Size.S}, TypeError, r"document\.e is a Size, which this collection was not told about"),
        ({"t": dt.datetime(2024, 1, 1, tzinfo=Odd())}, TypeError, r"document\.t has a tzinfo of type Odd"),
        (
            {"t": dt.time(9, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))},
            TypeError,
            r"document\.t is a time with a non-fixed tzinfo",
        ),
        ({"p": Point(1, 2)}, TypeError, r"document\.p is a Point, which this collection was not told about"),
    ],
)
def test_values_that_cannot_be_stored_are_refused_naming_their_path(
    setup: Setup, value: Any, error: type[Exception], message: str
) -> None:
    """Each refusal names where in the document the value is, before any SQL."""
    with pytest.raises(error, match=message):
        put(setup, value)


def test_an_enum_named_in_types_round_trips(setup: Setup) -> None:
    """define(..., types=[Size]) lets a dict collection store and rebuild Size members."""
    put(setup, {"size": Size.L, "sizes": [Size.S]}, "sized")
    with setup.dm.context() as ctx:
        assert ctx.docs.collection("sized").require("k").value == {"size": Size.L, "sizes": [Size.S]}


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (
            '{"$dataclass": "gone.Cart", "x": 1}',
            TypeError,
            r"holds a Cart \(\$dataclass\), which this collection",
        ),
        ('{"$weird": 1}', ValueError, "unknown type tag '\\$weird'"),
        ('{"a": {"$uuid": 5}}', ValueError, r"a stored \$uuid value is damaged"),
        ("{not json", ValueError, "Expecting property name"),
        ('{"a": {"$datetime": "2024-01-01T00:00:00.000000Z", "tz": "No/Where"}}', ValueError, "damaged"),
    ],
)
def test_stored_documents_that_cannot_be_read_say_why(
    setup: Setup, body: str, error: type[Exception], message: str
) -> None:
    """A renamed class, an unknown tag or a damaged value fails get() naming the collection and key."""
    store_raw(setup, "plain", body)
    with setup.dm.context() as ctx, pytest.raises(error, match=rf"plain 'k' cannot be read: .*{message}"):
        ctx.docs.collection("plain").get("k")


def test_a_dataclass_missing_a_field_cannot_be_rebuilt(setup: Setup) -> None:
    """A stored Point without y (an older class) is a TypeError saying which class and why."""
    name = f"{Point.__module__}.{Point.__qualname__}"
    store_raw(setup, "points", json.dumps({"$dataclass": name, "x": 1}))
    with setup.dm.context() as ctx, pytest.raises(TypeError, match="a stored Point cannot be rebuilt"):
        ctx.docs.collection(setup.points).get("k")


def test_a_typed_collection_refuses_to_return_another_type(setup: Setup) -> None:
    """A dict stored in a Point collection is a TypeError at get(), not a dict passed off as a Point."""
    store_raw(setup, "points", '{"x": 1}')
    with setup.dm.context() as ctx, pytest.raises(TypeError, match="points 'k' holds a dict, not a Point"):
        ctx.docs.collection(setup.points).get("k")


def test_a_stale_put_answers_409_through_the_web_middleware(setup: Setup) -> None:
    """ConcurrencyConflict from a put becomes a 409 response, and the request's writes are rolled back."""
    put(setup, {"n": 1})

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        ctx = setup.dm.require_active_context()
        plain = ctx.docs.collection("plain")
        plain.put("other", {"n": 0})
        plain.put("k", {"n": 2}, expected_version=int(request.args["version"]))
        return Response("ok")(environ, start_response)

    client = Client(PolydatumWSGIMiddleware(app, setup.dm))
    assert client.get("/?version=7").status_code == 409
    with setup.dm.context() as ctx:
        assert ctx.docs.collection("plain").get("other") is None
    assert client.get("/?version=1").status_code == 200


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda db: Documents(db, prefix="Bad-"), ValueError, "prefix is '' or up to 20"),
        (lambda db: Documents(db, max_size=10), ValueError, "max_size is a number of bytes, at least 64"),
        (lambda db: Documents(db).define("x", dict), TypeError, "is not a dataclass"),
        (lambda db: Documents(db).define("x", indexes=["a"]), TypeError, "indexes maps paths to types"),
        (lambda db: Documents(db).define("x", max_size=True), ValueError, "max_size is a number of bytes"),
    ],
)
def test_bad_configuration_is_refused_saying_what_is_accepted(
    setup: Setup, make: Any, error: type[Exception], message: str
) -> None:
    """Documents() and define() check their arguments at once."""
    with pytest.raises(error, match=message):
        make(setup.db)


def test_a_definition_from_other_documents_is_refused(setup: Setup) -> None:
    """ctx.docs.collection() of another Documents' definition of the same name is a ValueError."""
    stranger = Documents(setup.db, prefix="other_").define("points", Point)
    with setup.dm.context() as ctx, pytest.raises(ValueError, match="made by another Documents"):
        ctx.docs.collection(stranger)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1, microseconds=5))),
            "has a UTC offset with microseconds",
        ),
        (
            dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5))),
            "is out of range once converted to UTC",
        ),
    ],
)
def test_datetimes_that_cannot_be_stored_are_refused(setup: Setup, value: dt.datetime, message: str) -> None:
    """An offset with microseconds, or an instant before year 1 in UTC, names the path."""
    with pytest.raises((TypeError, InvalidInput), match=rf"document\.at {message}"):
        put(setup, {"at": value})


async def test_acreate_tables_on_a_sync_database_creates_them(setup: Setup) -> None:
    """acreate_tables() works for a sync Database too (it creates through the engine)."""
    docs = Documents(setup.db, prefix="later_")
    docs.define("things")
    await docs.acreate_tables()
    with setup.db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM later_things").scalar() == 0


def test_documents_are_rolled_back_with_a_transactional_test_database(setup: Setup) -> None:
    """Under polydatum.testing.transactional_database, what contexts wrote is gone after the block."""
    with transactional_database(setup.db):
        with setup.dm.context() as ctx:
            ctx.docs.collection("plain").put("t", {"a": 1})
        with setup.dm.context() as ctx:
            assert ctx.docs.collection("plain").require("t").value == {"a": 1}
    with setup.dm.context() as ctx:
        assert ctx.docs.collection("plain").get("t") is None


def test_long_names_still_make_valid_index_names(setup: Setup) -> None:
    """A 20-character prefix and a 40-character collection name give index names PostgreSQL accepts."""
    docs = Documents(setup.db, prefix="p" * 20)
    long = docs.define("c" * 40, indexes={"a.b.c": str, "d": list})
    docs.create_tables()
    names = [index.name for index in long.table.indexes]
    assert names
    assert all(len(str(name)) <= 63 for name in names)

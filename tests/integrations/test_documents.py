"""polydatum.documents on SQLite and PostgreSQL: keyed reads, versioned writes, queries, bad input."""

from __future__ import annotations

import datetime as dt
import enum
import logging
import uuid
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text

from polydatum import DataManager
from polydatum.documents import Collection, Definition, Documents
from polydatum.errors import AlreadyExistsException, ConcurrencyConflict, InvalidInput, NotFound
from polydatum.sqlalchemy import Database

PARIS = zoneinfo.ZoneInfo("Europe/Paris")


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Line:
    sku: str
    qty: int
    color: Color = Color.RED


@dataclass
class Cart:
    status: str
    total: float
    lines: list[Line] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    placed: dt.datetime | None = None


@dataclass
class World:
    """What the tests share: the DataManager, the Documents and two collection definitions."""

    dm: DataManager
    docs: Documents
    carts: Definition[Cart]
    notes: Definition[dict[str, Any]]
    db: Database


@pytest.fixture(name="shared", scope="module", params=["sqlite", "postgresql"])
def fixture_shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """Per backend, once a module: ``ctx.docs`` with typed ``carts`` and dict ``notes``, tables created."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('documents') / 'app.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
    db = Database(url)
    dm = DataManager()
    db.install(dm)
    docs = Documents(db, prefix=f"t{uuid.uuid4().hex[:8]}_", max_size=4096)
    carts = docs.define(
        "carts",
        Cart,
        indexes={"status": str, "total": float, "tags": list, "placed": dt.datetime},
    )
    notes = docs.define(
        "notes", indexes={"n": int, "flag": bool, "day": dt.date, "ref": uuid.UUID, "who.name": str}
    )
    docs.install(dm)
    docs.create_tables()
    yield World(dm, docs, carts, notes, db)
    docs.metadata.drop_all(db.engine)
    db.dispose()


@pytest.fixture(name="world")
def fixture_world(shared: World) -> World:
    """The module's World with its collections emptied."""
    with shared.db.engine.begin() as conn:
        for definition in (shared.carts, shared.notes):
            conn.execute(definition.table.delete())
    return shared


def cart(status: str = "open", total: float = 10.0, **more: Any) -> Cart:
    return Cart(status, total, **more)


class TestKeyed:
    def test_put_then_get_round_trips_a_typed_document_with_version_1(self, world: World) -> None:
        """A dataclass holding dataclasses, an Enum and an aware datetime comes back equal, at version 1."""
        value = cart(
            lines=[Line("a", 2, Color.BLUE)], tags=["gift"], placed=dt.datetime(2024, 5, 1, 9, tzinfo=PARIS)
        )
        with world.dm.context() as ctx:
            written = ctx.docs.collection(world.carts).put("c1", value)
        assert written.version == 1
        with world.dm.context() as ctx:
            doc = ctx.docs.collection(world.carts).require("c1")
        assert doc.value == value
        assert doc.version == 1
        assert doc.value.placed is not None
        assert doc.value.placed.tzinfo == PARIS

    def test_get_of_a_missing_key_is_none_and_require_raises_not_found(self, world: World) -> None:
        """get() answers None, require() NotFound (404) naming the collection and key."""
        with world.dm.context() as ctx:
            notes = ctx.docs.collection("notes")
            assert notes.get("nope") is None
            with pytest.raises(NotFound, match="notes 'nope' not found"):
                notes.require("nope")

    def test_a_put_with_the_read_version_bumps_it(self, world: World) -> None:
        """put(expected_version=v) replaces the document and returns version v + 1."""
        with world.dm.context() as ctx:
            ctx.docs.collection("notes").put("a", {"n": 1})
        with world.dm.context() as ctx:
            notes = ctx.docs.collection("notes")
            doc = notes.require("a")
            assert notes.put("a", {"n": 2}, expected_version=doc.version).version == 2
            assert notes.require("a").value == {"n": 2}

    def test_a_put_with_a_stale_version_is_a_conflict_and_rolls_the_context_back(self, world: World) -> None:
        """The loser gets ConcurrencyConflict (409) and nothing it wrote in the context is kept."""
        with world.dm.context() as ctx:
            ctx.docs.collection("notes").put("a", {"n": 1})
        with world.dm.context() as ctx:
            ctx.docs.collection("notes").put("a", {"n": 2}, expected_version=1)
        with (  # noqa: PT012 - the context must end inside raises(): its exit rolls back
            pytest.raises(ConcurrencyConflict, match="is at version 2, not 1") as info,
            world.dm.context() as ctx,
        ):
            notes = ctx.docs.collection("notes")
            notes.put("other", {"n": 9})
            notes.put("a", {"n": 3}, expected_version=1)
        assert info.value.code == 409
        with world.dm.context() as ctx:
            notes = ctx.docs.collection("notes")
            assert notes.get("other") is None
            assert notes.require("a").value == {"n": 2}

    def test_a_put_without_a_version_only_creates(self, world: World) -> None:
        """A put that expects no document conflicts with an existing one and says how to replace it."""
        with world.dm.context() as ctx:
            notes = ctx.docs.collection("notes")
            notes.put("a", {"n": 1})
            with pytest.raises(
                ConcurrencyConflict, match="exists already, at version 1; pass expected_version=1"
            ):
                notes.put("a", {"n": 2})

    def test_a_put_of_a_deleted_document_is_a_conflict(self, world: World) -> None:
        """Expecting a version of a document that is gone is a conflict too."""
        with world.dm.context() as ctx:
            notes = ctx.docs.collection("notes")
            notes.put("a", {"n": 1})
            assert notes.delete("a") is True
            with pytest.raises(ConcurrencyConflict, match="does not exist"):
                notes.put("a", {"n": 2}, expected_version=1)

    def test_force_writes_without_a_check_and_still_counts_versions(self, world: World) -> None:
        """force=True creates or replaces whatever is there; the version still goes up by one."""
        with world.dm.context() as ctx:
            notes = ctx.docs.collection("notes")
            assert notes.put("a", {"n": 1}, force=True).version == 1
            assert notes.put("a", {"n": 2}, force=True).version == 2
            assert notes.require("a").value == {"n": 2}

    def test_expected_version_and_force_together_are_refused(self, world: World) -> None:
        """Both at once is a ValueError: they contradict each other."""
        with world.dm.context() as ctx, pytest.raises(ValueError, match="not both"):
            ctx.docs.collection("notes").put("a", {"n": 1}, expected_version=1, force=True)

    @pytest.mark.parametrize("bad", ["1", 0, True, 1.0])
    def test_a_bad_expected_version_is_invalid_input(self, world: World, bad: Any) -> None:
        """expected_version must be an int of at least 1: a form's string is refused before SQL."""
        with world.dm.context() as ctx, pytest.raises(InvalidInput, match="expected_version must be"):
            ctx.docs.collection("notes").put("a", {"n": 1}, expected_version=bad)

    def test_delete_checks_the_version_when_given(self, world: World) -> None:
        """delete(expected_version=) refuses a stale version; a missing document is False."""
        with world.dm.context() as ctx:
            notes = ctx.docs.collection("notes")
            notes.put("a", {"n": 1})
            with pytest.raises(ConcurrencyConflict, match="at version 1, not 5"):
                notes.delete("a", expected_version=5)
            assert notes.delete("a", expected_version=1) is True
            assert notes.delete("a") is False
            assert notes.delete("a", expected_version=1) is False

    @pytest.mark.parametrize("key", ["", "x" * 256, "a\x00b", 7, None, "tab\there"])
    def test_a_bad_key_is_refused(self, world: World, key: Any) -> None:
        """Keys are printable strings of 1 to 255 characters."""
        with world.dm.context() as ctx, pytest.raises(InvalidInput, match="a key of 'notes'"):
            ctx.docs.collection("notes").get(key)

    def test_a_collection_is_in_the_contexts_transaction(self, world: World) -> None:
        """What a failed context wrote is rolled back with its other SQL work."""
        with pytest.raises(RuntimeError, match="boom"), world.dm.context() as ctx:  # noqa: PT012
            ctx.docs.collection("notes").put("a", {"n": 1})
            ctx.db.execute(text("SELECT 1"))
            raise RuntimeError("boom")
        with world.dm.context() as ctx:
            assert ctx.docs.collection("notes").get("a") is None


class TestQueries:
    def seed(self, world: World) -> None:
        with world.dm.context() as ctx:
            carts = ctx.docs.collection(world.carts)
            carts.put("a", cart("open", 5.0, tags=["gift", "red"]))
            carts.put("b", cart("paid", 12.5, tags=["red"], placed=dt.datetime(2024, 1, 1, 12, tzinfo=PARIS)))
            carts.put("c", cart("open", 30.0, placed=dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc)))
            carts.put("d", cart("paid", 12.5))

    def keys(self, world: World, *args: Any, **kwargs: Any) -> list[str]:
        with world.dm.context() as ctx:
            return [d.key for d in ctx.docs.collection(world.carts).find(*args, **kwargs)]

    def test_equality_ranges_in_and_order(self, world: World) -> None:
        """Filters and order_by on indexed paths, ties broken by key."""
        self.seed(world)
        assert self.keys(world, {"status": "paid"}) == ["b", "d"]
        assert self.keys(world, {"total__gte": 12.5}, order_by="-total") == ["c", "b", "d"]
        assert self.keys(world, {"status__in": ["open"], "total__lt": 10}) == ["a"]
        assert self.keys(world, order_by=["status", "-total"]) == ["c", "a", "b", "d"]

    def test_contains_is_array_membership(self, world: World) -> None:
        """tags__contains matches documents whose list holds the value."""
        self.seed(world)
        assert self.keys(world, {"tags__contains": "red"}) == ["a", "b"]
        assert self.keys(world, {"tags__contains": "gift", "status": "open"}) == ["a"]

    def test_datetimes_compare_as_instants_across_time_zones(self, world: World) -> None:
        """Noon in Paris is before noon UTC, whatever the stored zones."""
        self.seed(world)
        noon_utc = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc)
        assert self.keys(world, {"placed__lt": noon_utc}) == ["b"]
        assert self.keys(world, {"placed": noon_utc}) == ["c"]
        assert self.keys(world, {"placed__is_null": True}) == ["a", "d"]

    def test_keyset_pages_walk_every_document_once(self, world: World) -> None:
        """Pages of one, following next_cursor, give the full order; a cursor for another order is refused."""
        self.seed(world)
        seen: list[str] = []
        after = None
        with world.dm.context() as ctx:
            carts = ctx.docs.collection(world.carts)
            while True:
                page = carts.find(order_by="-total", limit=1, after=after)
                seen += [d.key for d in page]
                if page.next_cursor is None:
                    break
                after = page.next_cursor
            assert seen == ["c", "b", "d", "a"]
            first = carts.find(order_by="-total", limit=1)
            with pytest.raises(InvalidInput, match="made for order_by"):
                carts.find(order_by="total", limit=1, after=first.next_cursor)

    def test_count_and_key_filters(self, world: World) -> None:
        """count() takes the same filters; $key filters by the document key."""
        self.seed(world)
        with world.dm.context() as ctx:
            carts = ctx.docs.collection(world.carts)
            assert carts.count({"status": "open"}) == 2
            assert carts.count() == 4
        assert self.keys(world, {"$key__in": ["a", "d"]}) == ["a", "d"]
        assert self.keys(world, order_by="-$key") == ["d", "c", "b", "a"]

    def test_a_path_without_an_index_is_refused_unless_a_scan_is_allowed(
        self, world: World, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An unindexed filter is InvalidInput naming the fix; allow_scan=True runs it and logs it."""
        self.seed(world)
        with world.dm.context() as ctx:
            carts = ctx.docs.collection(world.carts)
            with pytest.raises(InvalidInput, match="path 'lines' of collection 'carts' has no index"):
                carts.find({"lines__is_null": False})
            with caplog.at_level(logging.INFO, logger="polydatum.documents"):
                assert [d.key for d in carts.find({"lines__is_null": False}, allow_scan=True)] == [
                    "a",
                    "b",
                    "c",
                    "d",
                ]
        assert "scanning collection 'carts' for unindexed paths lines" in caplog.text

    def test_scans_compare_by_the_filter_value_type(self, world: World) -> None:
        """A scanned path compares numbers as numbers and text as text; other types read as NULL."""
        with world.dm.context() as ctx:
            notes = ctx.docs.collection("notes")
            notes.put("a", {"size": 3, "tags": ["x"]})
            notes.put("b", {"size": "big", "tags": "x"})
            notes.put("c", {"size": 10.5})
            assert [d.key for d in notes.find({"size__gt": 2}, allow_scan=True)] == ["a", "c"]
            assert [d.key for d in notes.find({"size": "big"}, allow_scan=True)] == ["b"]
            assert [d.key for d in notes.find({"tags__contains": "x"}, allow_scan=True)] == ["a"]

    def test_ordering_needs_an_indexed_path(self, world: World) -> None:
        """order_by an unindexed path (scanned in the same query or not), or a list index, is refused."""
        with world.dm.context() as ctx:
            carts = ctx.docs.collection(world.carts)
            with pytest.raises(InvalidInput, match="has no index"):
                carts.find(order_by="lines")
            with pytest.raises(InvalidInput, match="is a list index"):
                carts.find(order_by="tags")
            with pytest.raises(InvalidInput, match="has no index"):  # a scanned filter is no index
                carts.find({"notes__is_null": True}, order_by="notes", allow_scan=True)

    @pytest.mark.parametrize(
        "path",
        ["status'; DROP TABLE x; --", "status->>'x'", "a;b", "a b", "a.'b'", "$.a", "a..b", "1a", "a" * 400],
    )
    def test_paths_with_injection_attempts_are_refused(self, world: World, path: str) -> None:
        """Quotes, ->>, semicolons and anything but dotted names never reach SQL, even with allow_scan."""
        with world.dm.context() as ctx:
            carts = ctx.docs.collection(world.carts)
            with pytest.raises(InvalidInput, match=r"invalid filter path|filter path must be"):
                carts.find({path: "x"}, allow_scan=True)
            with pytest.raises(InvalidInput, match=r"invalid order_by path|order_by path must be"):
                carts.find(order_by=path)

    @pytest.mark.parametrize(
        ("filters", "message"),
        [
            ({"total": "cheap"}, "expected a float or an int"),
            ({"status__nope": 1}, "unknown operator 'nope'"),
            ({"tags": "red"}, "list index, which takes only contains"),
            ({"tags__contains": ["red"]}, "contains takes one str, number or bool"),
            ({"placed__gt": dt.datetime(2024, 1, 1)}, "an aware datetime"),
            ({3: "x"}, "filter names are strings"),
        ],
    )
    def test_bad_filter_values_are_invalid_input(self, world: World, filters: Any, message: str) -> None:
        """Values are checked against the index's type before any SQL."""
        with world.dm.context() as ctx, pytest.raises(InvalidInput, match=message):
            ctx.docs.collection(world.carts).find(filters)

    @pytest.mark.parametrize("limit", [0, 1001, "5", True])
    def test_a_bad_limit_is_refused(self, world: World, limit: Any) -> None:
        """limit is an int from 1 to 1000."""
        with world.dm.context() as ctx, pytest.raises(InvalidInput, match="limit must be"):
            ctx.docs.collection(world.carts).find(limit=limit)

    def test_filters_must_be_a_mapping(self, world: World) -> None:
        """A list of filters is a TypeError showing the right shape."""
        with world.dm.context() as ctx, pytest.raises(TypeError, match="filters must be a mapping"):
            ctx.docs.collection(world.carts).find([("status", "open")])  # type: ignore[arg-type]

    def test_other_index_types(self, world: World) -> None:
        """int, bool, date, UUID and nested str indexes filter as their Python values."""
        ref = uuid.uuid4()
        with world.dm.context() as ctx:
            notes = ctx.docs.collection("notes")
            notes.put(
                "a", {"n": 1, "flag": True, "day": dt.date(2024, 1, 2), "ref": ref, "who": {"name": "Ann"}}
            )
            notes.put("b", {"n": 2**40, "flag": False, "day": dt.date(2023, 1, 2)})
            assert [d.key for d in notes.find({"n__gt": 5})] == ["b"]
            assert [d.key for d in notes.find({"n__gt": 2**70})] == []
            assert [d.key for d in notes.find({"flag": True})] == ["a"]
            assert [d.key for d in notes.find({"day__lt": dt.date(2024, 1, 1)})] == ["b"]
            assert [d.key for d in notes.find({"ref": ref})] == ["a"]
            assert [d.key for d in notes.find({"who.name__startswith": "A"})] == ["a"]


class TestHostileFilters:
    def test_paging_over_huge_floats_skips_nothing(self, world: World) -> None:
        """A float index over 1e19: PostgreSQL's jsonb gives it back as an int; the cursor keeps it a float.

        (It turned it into None, so page 2 started in the NULL rows and was empty.)
        """
        with world.dm.context() as ctx:
            carts = ctx.docs.collection(world.carts)
            carts.put("a", cart(total=1e300))
            carts.put("b", cart(total=2e300))
            carts.put("c", cart(total=1e22))
        seen: list[str] = []
        after = None
        with world.dm.context() as ctx:
            carts = ctx.docs.collection(world.carts)
            while True:
                page = carts.find({}, order_by="total", limit=1, after=after)
                seen += [d.key for d in page]
                after = page.next_cursor
                if after is None:
                    break
        assert seen == ["c", "a", "b"]

    @pytest.mark.parametrize(
        "bad",
        [
            {"status": "open\udcff"},
            {"status__in": ["open", "\ud800"]},
            {"tags__contains": "x\x00"},
            {"tags__contains": "\ud800"},
            {"status__in": [f"s{i}" for i in range(1001)]},
        ],
        ids=["eq-surrogate", "in-surrogate", "contains-nul", "contains-surrogate", "in-1001"],
    )
    def test_text_no_database_takes_is_refused_before_any_sql(
        self, world: World, bad: dict[str, Any]
    ) -> None:
        """A lone surrogate or NUL in a text filter, or an in list over 1,000: InvalidInput, context intact.

        (They reached the driver: UnicodeEncodeError, PostgreSQL's DataError that aborts
        the transaction, or "number of parameters must be between 0 and 65535".)
        """
        with world.dm.context() as ctx:
            carts = ctx.docs.collection(world.carts)
            with pytest.raises(InvalidInput):
                list(carts.find(bad))
            carts.put("after", cart())  # the transaction is intact
        with world.dm.context() as ctx:
            assert ctx.docs.collection(world.carts).get("after") is not None


class TestBadDocuments:
    def test_a_document_over_the_size_limit_is_refused(self, world: World) -> None:
        """The limit counts bytes of JSON; the message gives both numbers."""
        with (
            world.dm.context() as ctx,
            pytest.raises(InvalidInput, match=r"is \d+ bytes as JSON, over .* 4096"),
        ):
            ctx.docs.collection("notes").put("a", {"text": "é" * 3000})

    def test_a_value_of_the_wrong_type_at_an_indexed_path_is_refused(self, world: World) -> None:
        """An indexed path holds its declared type (or nothing), so the index never lies."""
        with world.dm.context() as ctx, pytest.raises(InvalidInput, match="path 'n' is indexed as int"):
            ctx.docs.collection("notes").put("a", {"n": "one"})

    def test_a_naive_datetime_at_a_datetime_index_is_refused(self, world: World) -> None:
        """A datetime index compares instants, which a naive datetime does not have."""
        with (
            world.dm.context() as ctx,
            pytest.raises(InvalidInput, match="path 'placed' is indexed as datetime"),
        ):
            ctx.docs.collection(world.carts).put("a", cart(placed=dt.datetime(2024, 1, 1)))

    def test_an_unserializable_value_names_its_path(self, world: World) -> None:
        """The error says where in the document the bad value is."""
        with (
            world.dm.context() as ctx,
            pytest.raises(TypeError, match=r"document\.meta\.items\[1\] is of type object"),
        ):
            ctx.docs.collection("notes").put("a", {"meta": {"items": [1, object()]}})

    def test_a_typed_collection_refuses_another_type(self, world: World) -> None:
        """Collection[Cart].put of a dict is a TypeError."""
        with world.dm.context() as ctx, pytest.raises(TypeError, match="holds Cart documents"):
            ctx.docs.collection(world.carts).put("a", {"status": "open"})  # type: ignore[arg-type]

    def test_a_document_is_a_dict_or_a_dataclass(self, world: World) -> None:
        """A list at the top is refused: indexes need named fields."""
        with world.dm.context() as ctx, pytest.raises(TypeError, match="a document is a dict or a dataclass"):
            ctx.docs.collection("notes").put("a", [1, 2])

    def test_nul_characters_are_refused_with_their_path(self, world: World) -> None:
        """PostgreSQL's jsonb cannot store NUL, so neither backend takes it."""
        with world.dm.context() as ctx, pytest.raises(InvalidInput, match=r"document\.a\[0\] holds a NUL"):
            ctx.docs.collection("notes").put("k", {"a": ["x\x00y"]})


class TestSetup:
    def test_an_unknown_collection_lists_the_defined_ones(self, world: World) -> None:
        """ctx.docs.collection('nope') is a KeyError naming the defined collections."""
        with world.dm.context() as ctx, pytest.raises(KeyError, match="Defined: carts, notes"):
            ctx.docs.collection("nope")

    def test_defining_a_collection_twice_is_refused(self, world: World) -> None:
        """define() of an existing name raises AlreadyExistsException."""
        with pytest.raises(AlreadyExistsException, match="defined already"):
            world.docs.define("notes")

    @pytest.mark.parametrize("name", ["Carts", "1x", "a-b", "x" * 41, "a;b"])
    def test_a_bad_collection_name_is_refused(self, world: World, name: str) -> None:
        """Collection names name tables: lowercase identifiers only."""
        with pytest.raises(ValueError, match="a collection name is"):
            world.docs.define(name)

    def test_a_bad_index_declaration_is_refused(self, world: World) -> None:
        """An index type nothing can index, or a path with a quote, fails at define()."""
        with pytest.raises(TypeError, match="an index holds one of"):
            world.docs.define("x1", indexes={"a": dict})
        with pytest.raises(InvalidInput, match="invalid index path"):
            world.docs.define("x2", indexes={"a'b": str})

    def test_install_needs_the_database_session(self, world: World) -> None:
        """Installing without the session resource names what to install first."""
        with pytest.raises(ValueError, match="does not have; install the database first"):
            Documents(world.db).install(DataManager())

    def test_install_refuses_another_databases_session(self, world: World, tmp_path: Any) -> None:
        """The documents must share the context's transaction, so the session must be their database's."""
        other = Database(f"sqlite:///{tmp_path / 'other.db'}")
        with pytest.raises(ValueError, match="belongs to"):
            Documents(other).install(world.dm, name="docs2")
        other.dispose()

    def test_documents_needs_a_database(self) -> None:
        """Documents('sqlite://') is a TypeError: it takes a polydatum Database."""
        with pytest.raises(TypeError, match="needs a polydatum Database"):
            Documents("sqlite://")  # type: ignore[arg-type]

    def test_a_typed_collection_is_typed(self, world: World) -> None:
        """collection(definition) is a Collection whose documents are the dataclass."""
        with world.dm.context() as ctx:
            carts: Collection[Cart] = ctx.docs.collection(world.carts)
            carts.put("a", cart())
            assert isinstance(carts.require("a").value, Cart)

    def test_values_of_every_tagged_type_round_trip(self, world: World) -> None:
        """Decimal, UUID, bytes, sets, tuples, dates, times and timedeltas come back equal and typed."""
        value = {
            "price": Decimal("1.50"),
            "id": uuid.uuid4(),
            "raw": b"\x00\xff",
            "set": {1, 2},
            "frozen": frozenset({"a"}),
            "pair": (1, "x"),
            "day": dt.date(2024, 2, 29),
            "at": dt.time(9, 30),
            "span": dt.timedelta(days=1, seconds=5),
            "naive": dt.datetime(2024, 1, 1, 8),
            "offset": dt.datetime(2024, 1, 1, 8, tzinfo=dt.timezone(dt.timedelta(hours=-3))),
            "$dollar": {"$datetime": "not a tag"},
        }
        with world.dm.context() as ctx:
            ctx.docs.collection("notes").put("a", value)
        with world.dm.context() as ctx:
            got = ctx.docs.collection("notes").require("a").value
        assert got == value
        assert got["offset"].utcoffset() == dt.timedelta(hours=-3)

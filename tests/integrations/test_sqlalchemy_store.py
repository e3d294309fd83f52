"""Store[Model] on SQLite and PostgreSQL: CRUD, validated filters, keyset pagination."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from polydatum import DataManager
from polydatum.dal import DataAccessLayer
from polydatum.errors import NotFound
from polydatum.sqlalchemy import Database, Page, Store, _cursor
from tests.support.sql import Item, Items, Memberships, Tags


@pytest.fixture(name="dm")
def fixture_dm(db: Database) -> DataManager:
    """A DataManager with the stores registered on ``db``."""
    dm = DataManager()
    db.install(dm)
    dm.register_services(items=Items(), tags=Tags(), memberships=Memberships())
    return dm


@pytest.fixture(name="dal")
def fixture_dal(dm: DataManager) -> Iterator[DataAccessLayer]:
    """The DAL of one open context."""
    with dm.dal() as dal:
        yield dal


QTYS = [5, None, 3, 5, None, 1, 8, 3, None, 2, 5, 7]


def seed(dal: DataAccessLayer) -> list[Item]:
    """Twelve items with repeated and missing quantities."""
    return [
        dal.items.create(name=f"item-{i:02d}", qty=q, made=dt.date(2024, 1, 1 + i % 4))
        for i, q in enumerate(QTYS)
    ]


class TestCrud:
    def test_get_returns_none_for_a_missing_key(self, dal: DataAccessLayer) -> None:
        """get() of a key that does not exist is None."""
        assert dal.items.get(404) is None

    def test_require_raises_not_found_naming_the_key(self, dal: DataAccessLayer) -> None:
        """require() of a missing key raises NotFound (404) naming the model and key."""
        with pytest.raises(NotFound, match="Item 404 not found") as info:
            dal.items.require(404)
        assert info.value.code == 404

    def test_create_flushes_and_sets_the_key(self, dal: DataAccessLayer) -> None:
        """create() returns the object with its primary key and version already set."""
        item = dal.items.create(name="a", qty=1)
        assert item.id is not None
        assert item.version == 1
        assert dal.items.get(item.id) is item

    def test_create_with_unknown_attribute_is_a_value_error(self, dal: DataAccessLayer) -> None:
        """create() with a name that is not mapped raises ValueError listing the known ones."""
        with pytest.raises(ValueError, match="unknown attribute 'colour' for Item; known: "):
            dal.items.create(name="a", colour="red")

    def test_update_sets_values(self, dal: DataAccessLayer) -> None:
        """update() changes the given attributes and returns the object."""
        item = dal.items.create(name="a", qty=1)
        assert dal.items.update(item.id, qty=2, name="b") is item
        assert (item.name, item.qty) == ("b", 2)

    def test_update_of_a_missing_key_is_not_found(self, dal: DataAccessLayer) -> None:
        """update() of a missing key raises NotFound."""
        with pytest.raises(NotFound):
            dal.items.update(404, qty=1)

    def test_update_with_unknown_attribute_is_a_value_error(self, dal: DataAccessLayer) -> None:
        """update() with an unmapped name raises ValueError naming it."""
        item = dal.items.create(name="a")
        with pytest.raises(ValueError, match="'colour'"):
            dal.items.update(item.id, colour="red")

    def test_expected_version_without_a_version_column_is_a_value_error(self, dal: DataAccessLayer) -> None:
        """expected_version on a model without Versioned is refused, pointing to the mixin."""
        dal.tags.create(code="red")
        with pytest.raises(ValueError, match=r"Tag has no version column.*add the Versioned mixin"):
            dal.tags.update("red", expected_version=1, item_id=None)
        with pytest.raises(ValueError, match="Tag has no version column"):
            dal.tags.delete("red", expected_version=1)
        assert dal.tags.require("red").code == "red"

    def test_delete_reports_whether_a_row_went(self, dal: DataAccessLayer) -> None:
        """delete() is True when it removed the object and False when there was none."""
        item = dal.items.create(name="a")
        assert dal.items.delete(item.id) is True
        assert dal.items.get(item.id) is None
        assert dal.items.delete(item.id) is False

    def test_string_primary_keys_work(self, dal: DataAccessLayer) -> None:
        """A store over a model with a string primary key gets and deletes by that key."""
        dal.tags.create(code="red")
        assert dal.tags.require("red").code == "red"
        assert dal.tags.delete("red")

    def test_composite_primary_keys_take_a_tuple(self, dal: DataAccessLayer) -> None:
        """A composite key is passed as a tuple to get/require/update/delete; pages follow it."""
        for team, user_id in [("b", 1), ("a", 2), ("a", 1)]:
            dal.memberships.create(team=team, user_id=user_id, role="member")
        assert dal.memberships.get(("a", 3)) is None
        with pytest.raises(NotFound, match=r"Membership \('a', 3\) not found"):
            dal.memberships.require(("a", 3))
        assert dal.memberships.update(("a", 2), role="owner").role == "owner"
        first = dal.memberships.search(limit=2)
        rest = dal.memberships.search(after=first.next_cursor)
        assert [(m.team, m.user_id) for m in [*first, *rest]] == [("a", 1), ("a", 2), ("b", 1)]
        assert dal.memberships.delete(("b", 1))
        assert dal.memberships.count() == 2

    def test_count_and_exists(self, dal: DataAccessLayer) -> None:
        """count() and exists() apply the same filters as search()."""
        seed(dal)
        assert dal.items.count() == len(QTYS)
        assert dal.items.count({"qty": 5}) == 3
        assert dal.items.exists({"qty__gt": 7})
        assert not dal.items.exists({"qty__gt": 8})
        assert dal.items.exists()


class TestFilters:
    @pytest.mark.parametrize(
        ("filters", "expected"),
        [
            ({"qty": 5}, [0, 3, 10]),
            ({"qty__eq": None}, [1, 4, 8]),
            ({"qty__ne": 5}, [2, 5, 6, 7, 9, 11]),
            ({"qty__ne": None}, [0, 2, 3, 5, 6, 7, 9, 10, 11]),
            ({"qty__lt": 3}, [5, 9]),
            ({"qty__lte": 3}, [2, 5, 7, 9]),
            ({"qty__gt": 5}, [6, 11]),
            ({"qty__gte": 7}, [6, 11]),
            ({"qty__in": [1, 2]}, [5, 9]),
            ({"qty__not_in": (1, 2, 3, 5)}, [6, 11]),
            ({"qty__is_null": True}, [1, 4, 8]),
            ({"qty__is_null": False, "qty__lt": 3}, [5, 9]),
            ({"name__like": "item-1%"}, [10, 11]),
            ({"name__ilike": "ITEM-0_"}, list(range(10))),
            ({"name__contains": "-1"}, [10, 11]),
            ({"name__startswith": "item-0"}, list(range(10))),
            ({"made": dt.date(2024, 1, 2)}, [1, 5, 9]),
        ],
    )
    def test_operators(self, dal: DataAccessLayer, filters: dict[str, Any], expected: list[int]) -> None:
        """Every filter operator selects the rows it names."""
        items = seed(dal)
        found = dal.items.search(filters)
        assert sorted(items.index(i) for i in found) == expected

    def test_like_wildcards_are_literal_in_contains(self, dal: DataAccessLayer) -> None:
        """contains/startswith escape % and _, so they match those characters literally."""
        dal.items.create(name="50%_off")
        dal.items.create(name="50 off")
        assert [i.name for i in dal.items.search({"name__contains": "%_"})] == ["50%_off"]

    def test_unknown_column_is_named(self, dal: DataAccessLayer) -> None:
        """A filter on an unknown column raises ValueError naming it and the known columns."""
        with pytest.raises(ValueError, match="unknown column 'colour' in filter 'colour__eq'"):
            dal.items.search({"colour__eq": "red"})

    def test_unknown_operator_is_named(self, dal: DataAccessLayer) -> None:
        """A filter with an unknown operator raises ValueError naming it and the known ones."""
        with pytest.raises(ValueError, match=r"unknown operator 'near' .*known operators: "):
            dal.items.search({"qty__near": 3})

    def test_sql_in_a_filter_key_is_just_an_unknown_column(self, dal: DataAccessLayer) -> None:
        """A filter key holding SQL is refused as an unknown column, never executed."""
        with pytest.raises(ValueError, match="unknown column"):
            dal.items.count({"1=1; DROP TABLE items; --": 1})

    def test_filters_must_be_a_mapping(self, dal: DataAccessLayer) -> None:
        """Filters given as a list raise TypeError showing the expected shape."""
        with pytest.raises(TypeError, match="filters must be a mapping"):
            dal.items.search([("qty", 1)])

    def test_in_needs_a_collection(self, dal: DataAccessLayer) -> None:
        """The in operator refuses a string, which would otherwise match letters."""
        with pytest.raises(ValueError, match="list, tuple or set"):
            dal.items.search({"name__in": "abc"})

    def test_is_null_needs_a_bool(self, dal: DataAccessLayer) -> None:
        """The is_null operator takes only True or False."""
        with pytest.raises(ValueError, match="True or False"):
            dal.items.search({"qty__is_null": "yes"})


class TestPagination:
    @pytest.mark.parametrize("order_by", [None, "qty", "-qty", ["-made", "qty"], ["qty", "-name"]])
    def test_pages_cover_every_row_once_in_order(self, dal: DataAccessLayer, order_by: Any) -> None:
        """Walking the cursors yields every row exactly once, in the order of one big query."""
        seed(dal)
        everything = list(dal.items.search(order_by=order_by))
        walked: list[Item] = []
        cursor = None
        pages = 0
        while True:
            page = dal.items.search(order_by=order_by, limit=5, after=cursor)
            walked.extend(page)
            pages += 1
            cursor = page.next_cursor
            if cursor is None:
                break
        assert pages == 3
        assert walked == everything
        assert len(everything) == len(QTYS)

    def test_nulls_sort_last_in_both_directions(self, dal: DataAccessLayer) -> None:
        """Missing values sort after all others, ascending or descending, on every backend."""
        seed(dal)
        assert [i.qty for i in dal.items.search(order_by="qty")][-3:] == [None] * 3
        assert [i.qty for i in dal.items.search(order_by="-qty")][-3:] == [None] * 3

    def test_filters_apply_to_every_page(self, dal: DataAccessLayer) -> None:
        """The same filters with a cursor continue the filtered listing."""
        seed(dal)
        first = dal.items.search({"qty__is_null": False}, order_by="-qty", limit=4)
        second = dal.items.search({"qty__is_null": False}, order_by="-qty", after=first.next_cursor)
        assert [i.qty for i in [*first, *second]] == [8, 7, 5, 5, 5, 3, 3, 2, 1]
        assert second.next_cursor is None

    def test_order_and_limit_may_be_positional(self, dal: DataAccessLayer) -> None:
        """search(filters, order_by, limit, after=cursor), as the issue spells it, works."""
        seed(dal)
        first = dal.items.search({"qty__gte": 5}, "-qty", 2)
        rest = dal.items.search({"qty__gte": 5}, "-qty", 2, after=first.next_cursor)
        assert [i.qty for i in [*first, *rest]] == [8, 7, 5, 5]

    def test_last_full_page_has_no_cursor(self, dal: DataAccessLayer) -> None:
        """A page that ends exactly at the last row says there is no next page."""
        seed(dal)
        page = dal.items.search(limit=len(QTYS))
        assert len(page) == len(QTYS)
        assert page.next_cursor is None

    def test_cursor_for_another_order_is_refused(self, dal: DataAccessLayer) -> None:
        """A cursor used with a different order_by raises ValueError naming both orders."""
        seed(dal)
        cursor = dal.items.search(order_by="qty", limit=2).next_cursor
        with pytest.raises(ValueError, match=r"made for order_by \['qty', 'id'\]"):
            dal.items.search(order_by="-qty", after=cursor)

    @pytest.mark.parametrize("cursor", ["not base64 !", "bm90IGpzb24", "W1siaWQiXSxbeyJ4IjoxfV1d"])
    def test_garbled_cursor_is_refused(self, dal: DataAccessLayer, cursor: str) -> None:
        """A cursor that was not made by search() raises ValueError saying what to pass."""
        with pytest.raises(ValueError, match="pass the next_cursor of a previous page"):
            dal.items.search(after=cursor)

    @pytest.mark.parametrize("limit", [0, -1, 1001, True, 2.5])
    def test_bad_limit_is_refused(self, dal: DataAccessLayer, limit: Any) -> None:
        """A limit outside 1..max_limit, or not an int, raises ValueError."""
        with pytest.raises(ValueError, match="limit must be an int from 1 to 1000"):
            dal.items.search(limit=limit)

    def test_unknown_order_column_is_named(self, dal: DataAccessLayer) -> None:
        """order_by with an unknown column raises ValueError naming it."""
        with pytest.raises(ValueError, match="unknown column 'colour' in order_by"):
            dal.items.search(order_by="-colour")

    def test_repeated_order_column_is_refused(self, dal: DataAccessLayer) -> None:
        """order_by naming one column twice raises ValueError."""
        with pytest.raises(ValueError, match="'qty' appears twice"):
            dal.items.search(order_by=["qty", "-qty"])

    def test_order_by_must_be_names(self, dal: DataAccessLayer) -> None:
        """order_by with something other than strings raises TypeError."""
        with pytest.raises(TypeError, match="order_by takes column names"):
            dal.items.search(order_by=[Item.qty])


class TestCursorValues:
    @pytest.mark.parametrize(
        "value",
        [
            None,
            True,
            3,
            2.5,
            "x",
            dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc),
            dt.date(2024, 5, 6),
            dt.time(7, 8),
            Decimal("1.10"),
            uuid.uuid4(),
            b"\x00\xff",
        ],
    )
    def test_values_round_trip(self, value: Any) -> None:
        """Every supported sort-key type comes back from a cursor equal and of the same type."""
        order = ["k", "id"]
        decoded = _cursor.decode(_cursor.encode(order, [value, 1]), order)
        assert decoded == [value, 1]
        assert type(decoded[0]) is type(value)

    def test_unsupported_value_is_a_type_error(self) -> None:
        """A sort key of another type (a list) raises TypeError naming what works."""
        with pytest.raises(TypeError, match="order by columns holding numbers"):
            _cursor.encode_value([1])


class TestConstruction:
    def test_store_without_a_model_is_refused(self) -> None:
        """Store() with no model and no type argument raises TypeError showing both fixes."""
        with pytest.raises(TypeError, match=r"subclass Store\[Note\] or pass it"):
            Store()

    def test_model_can_be_passed(self, dm: DataManager) -> None:
        """Store(Model, database=...) works without subclassing."""
        dm.register_services(plain=Store(Item, database="db"))
        with dm.dal() as dal:
            assert dal.plain.create(name="a").id is not None

    def test_subclass_of_a_subclass_keeps_the_model(self) -> None:
        """A subclass of a Store[Item] subclass still knows its model."""

        class MoreItems(Items):
            pass

        assert MoreItems().model is Item

    def test_page_is_a_sized_iterable(self) -> None:
        """A Page iterates over and counts its items."""
        page = Page([1, 2], "c")
        assert list(page) == [1, 2]
        assert len(page) == 2

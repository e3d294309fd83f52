"""Store and AsyncStore refuse hostile input before any SQL, on SQLite and PostgreSQL.

Filters, page cursors, ``expected_version`` and protected columns are checked
against the model, so a bad value is an InvalidInput (HTTP 400) naming what was
wrong, never a database error that aborts the transaction. Boolean and Enum
columns work as sort keys across pages.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from functools import cmp_to_key
from typing import Any

import pytest
from sqlalchemy import JSON, DateTime, Enum, Numeric, String, TypeDecorator, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polydatum import DataManager
from polydatum.dal import DataAccessLayer
from polydatum.errors import ConcurrencyConflict, InvalidInput
from polydatum.sqlalchemy import AsyncDatabase, AsyncStore, Database, Store, Versioned


class Status(enum.Enum):
    """Stored by value: stored order (a, d, p) differs from declaration order (d, p, a)."""

    draft = "d"
    published = "p"
    archived = "a"


class Mood(str, enum.Enum):
    """A str enum stored by name (angry < bored < calm), not by value, as a VARCHAR (native_enum=False)."""

    calm = "c"
    angry = "x"
    bored = "b"


class Email:
    """A value object a TypeDecorator stores as text."""

    def __init__(self, address: str) -> None:
        self.address = address.lower()


class EmailType(TypeDecorator[Email]):
    """Declares no python_type of its own, so the store leaves its values to it."""

    impl = String(200)
    cache_ok = True

    def process_bind_param(self, value: Email | None, dialect: Any) -> str | None:
        return None if value is None else value.address

    def process_result_value(self, value: str | None, dialect: Any) -> Email | None:
        return None if value is None else Email(value)


class InputBase(DeclarativeBase):
    pass


class Post(Versioned, InputBase):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    pinned: Mapped[bool | None]
    status: Mapped[Status | None] = mapped_column(
        Enum(Status, values_callable=lambda kind: [m.value for m in kind])
    )
    mood: Mapped[Mood] = mapped_column(Enum(Mood, native_enum=False), default=Mood.calm)
    score: Mapped[int | None]
    price: Mapped[Decimal | None] = mapped_column(Numeric(10, 2))
    ratio: Mapped[float | None]
    day: Mapped[dt.date | None]
    uid: Mapped[uuid.UUID | None]
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    email: Mapped[Email | None] = mapped_column(EmailType)
    created: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), info={"read_only": True}
    )


class Posts(Store[Post]):
    pass


class AsyncPosts(AsyncStore[Post]):
    pass


@pytest.fixture(name="db")
def fixture_db(url: str) -> Iterator[Database]:
    """A Database with the posts table, dropped afterwards."""
    db = Database(url)
    InputBase.metadata.create_all(db.engine)
    yield db
    InputBase.metadata.drop_all(db.engine)
    db.dispose()


@pytest.fixture(name="dm")
def fixture_dm(db: Database) -> DataManager:
    """The posts store on ``db``."""
    dm = DataManager()
    db.install(dm)
    dm.register_services(posts=Posts())
    return dm


@pytest.fixture(name="dal")
def fixture_dal(dm: DataManager) -> Iterator[DataAccessLayer]:
    """The DAL of one open context."""
    with dm.dal() as dal:
        yield dal


# pinned, status, mood for each seeded post: ties and NULLs in every column that allows them.
ROWS = [
    (True, Status.draft, Mood.calm),
    (None, Status.archived, Mood.bored),
    (False, None, Mood.angry),
    (True, Status.published, Mood.calm),
    (False, Status.draft, Mood.bored),
    (None, None, Mood.calm),
    (True, Status.archived, Mood.angry),
    (False, Status.published, Mood.calm),
    (True, None, Mood.bored),
    (False, Status.draft, Mood.angry),
    (None, Status.published, Mood.calm),
    (True, Status.draft, Mood.calm),
    (False, Status.archived, Mood.bored),
]


def seed(dal: DataAccessLayer) -> list[Post]:
    """The posts of ROWS, with scores 0..12."""
    return [
        dal.posts.create(title=f"post {i:02d}", pinned=p, status=s, mood=m, score=i)
        for i, (p, s, m) in enumerate(ROWS)
    ]


def stored(post: Post, name: str) -> Any:
    """The value the database compares for ``name``: an enum's stored string."""
    value = getattr(post, name)
    if isinstance(value, Status):
        return value.value
    if isinstance(value, Mood):
        return value.name
    return value


def expected_order(posts: list[Post], order: list[str]) -> list[int]:
    """Post ids in ``order`` as the store documents it: NULLs last either way, then the id."""
    keys = [(spec.lstrip("-"), spec.startswith("-")) for spec in order] + [("id", False)]

    def compare(a: Post, b: Post) -> int:
        for name, desc in keys:
            x, y = stored(a, name), stored(b, name)
            if x == y:
                continue
            if x is None or y is None:
                return 1 if x is None else -1
            return (-1 if x < y else 1) * (-1 if desc else 1)
        return 0

    return [p.id for p in sorted(posts, key=cmp_to_key(compare))]


def walk(dal: DataAccessLayer, order: list[str], limit: int) -> list[int]:
    """Every page of a search, concatenated."""
    ids: list[int] = []
    cursor = None
    for _ in range(100):  # a cursor that does not advance would loop forever
        page = dal.posts.search(order_by=order, limit=limit, after=cursor)
        ids += [p.id for p in page]
        cursor = page.next_cursor
        if cursor is None:
            return ids
    pytest.fail(f"the pages of {order} never ended: {ids[:20]}")


class TestBooleanAndEnumOrders:
    @pytest.mark.parametrize(
        "order",
        [
            ["pinned"],
            ["-pinned"],
            ["status"],
            ["-status"],
            ["mood"],
            ["-mood"],
            ["-pinned", "status"],
            ["status", "-pinned"],
            ["mood", "-status", "pinned"],
        ],
    )
    @pytest.mark.parametrize("limit", [1, 2, 5])
    def test_pages_walk_every_row_in_order(self, dal: DataAccessLayer, order: list[str], limit: int) -> None:
        """Walking the pages of a Boolean or Enum order gives the full sorted list, NULLs last."""
        posts = seed(dal)
        everything = [p.id for p in dal.posts.search(order_by=order)]
        assert everything == expected_order(posts, order)
        assert walk(dal, order, limit) == everything

    def test_enums_sort_by_stored_value_on_every_backend(self, dal: DataAccessLayer) -> None:
        """A native ENUM (PostgreSQL) sorts by stored string like a VARCHAR, not by declaration order."""
        seed(dal)
        statuses = [p.status for p in dal.posts.search({"status__is_null": False}, order_by="status")]
        assert statuses == sorted(statuses, key=lambda s: s.value)
        assert statuses[0] is Status.archived

    def test_boolean_and_enum_filters_compare(self, dal: DataAccessLayer) -> None:
        """Ranges on Boolean and Enum columns work and compare as the order does."""
        seed(dal)
        assert dal.posts.count({"pinned__gt": False}) == 5
        assert dal.posts.count({"pinned__lte": False}) == 5
        assert dal.posts.count({"status": Status.draft}) == 4
        assert dal.posts.count({"status": "d"}) == 4
        assert dal.posts.count({"status__in": [Status.archived, "p"]}) == 6
        assert dal.posts.count({"status__gt": "d"}) == 3  # published only: "p" > "d" > "a"
        assert dal.posts.count({"mood__lt": Mood.bored}) == 3  # angry < bored < calm, by name


def forge(order: list[str], values: Any) -> str:
    """A cursor with ``values``, in the format search() makes."""
    return base64.urlsafe_b64encode(json.dumps([order, values]).encode()).decode().rstrip("=")


def nested(depth: int) -> str:
    """A cursor of ``depth`` nested brackets."""
    return base64.urlsafe_b64encode(("[" * depth + "]" * depth).encode()).decode()


FORGED = [
    pytest.param("id", [2**63], id="int past 64 bits"),
    pytest.param("id", ["abc"], id="str for an int key"),
    pytest.param("id", [[1, 2]], id="list"),
    pytest.param("id", [{"decimal": "1e999999"}], id="huge decimal for an int key"),
    pytest.param("id", [{"bytes": "AAAA"}], id="bytes for an int key"),
    pytest.param("id", [None], id="NULL for a key that holds none"),
    pytest.param("id", [True], id="bool for an int key"),
    pytest.param("id", [1.5], id="float for an int key"),
    pytest.param("id", [{"unknown": "x"}], id="unknown tag"),
    pytest.param("id", [{"date": 5}], id="tag with a non-string"),
    pytest.param("id", [{"date": "1", "time": "2"}], id="two tags"),
    pytest.param("price", [{"decimal": "1e999999"}, 1], id="decimal past numeric's range"),
    pytest.param("price", [{"decimal": "NaN"}, 1], id="decimal NaN"),
    pytest.param("status", ["bogus", 1], id="unknown enum value"),
    pytest.param("pinned", [1, 1], id="int for a bool"),
    pytest.param("title", ["a\x00b", 1], id="NUL in a string"),
    pytest.param("title", ["\ud800", 1], id="lone surrogate"),
    pytest.param("day", [{"datetime": "2024-01-01T00:00:00"}, 1], id="datetime for a date"),
    pytest.param("day", [{"date": "2024-13-01"}, 1], id="impossible date"),
    pytest.param("uid", [{"uuid": "not a uuid"}, 1], id="bad uuid"),
    pytest.param("uid", [{"bytes": "!!!!"}, 1], id="bad base64"),
]


def order_of(name: str) -> list[str]:
    return [name] if name == "id" else [name, "id"]


class TestForgedCursors:
    @pytest.mark.parametrize(("name", "values"), FORGED)
    def test_forged_cursor_is_invalid_input_and_the_context_carries_on(
        self, dm: DataManager, db: Database, name: str, values: list[Any]
    ) -> None:
        """A cursor holding a value its column cannot hold is a 400 before any SQL; the context commits."""
        with dm.dal() as dal:
            dal.posts.create(title="before")
            with pytest.raises(InvalidInput, match="invalid page cursor") as info:
                dal.posts.search(order_by=order_of(name), limit=2, after=forge(order_of(name), values))
            assert info.value.code == 400
            assert isinstance(info.value, ValueError)
            assert dal.posts.count() == 1
            dal.posts.create(title="after")
        with db.engine.connect() as conn:
            assert sorted(conn.execute(select(Post.title)).scalars()) == ["after", "before"]

    @pytest.mark.parametrize(
        "cursor",
        [
            nested(3000),
            nested(20_000),
            nested(100_000),
            "A" * 100_000,
            5,
            b"x",
            "%%%",
            "",
            forge(["id"], []),
            forge(["id"], [1, 2]),
            forge("id", [1]),
            forge([["id"]], [1]),
        ],
        ids=[
            "3000 brackets",
            "20000 brackets",
            "100000 brackets",
            "too long",
            "an int",
            "bytes",
            "not base64",
            "empty",
            "no values",
            "two values",
            "order not a list",
            "order of lists",
        ],
    )
    def test_garbled_cursor_is_invalid_input(self, dal: DataAccessLayer, cursor: Any) -> None:
        """Deep nesting, huge or non-string cursors are refused without a RecursionError."""
        with pytest.raises(InvalidInput, match="pass the next_cursor of a previous page"):
            dal.posts.search(order_by="id", after=cursor)
        assert dal.posts.count() == 0

    def test_int_beyond_the_key_column_is_refused(self, dal: DataAccessLayer, backend: str) -> None:
        """2**31 fits SQLite's INTEGER but not PostgreSQL's int4: refused there, a plain page here."""
        dal.posts.create(title="a")
        cursor = forge(["id"], [2**31])
        if backend == "postgresql":
            with pytest.raises(InvalidInput, match=r"Post.id is outside the column's range"):
                dal.posts.search(order_by="id", after=cursor)
        else:
            assert list(dal.posts.search(order_by="id", after=cursor)) == []
        assert dal.posts.count() == 1

    def test_cursors_of_every_column_type_round_trip(self, dal: DataAccessLayer) -> None:
        """Pages ordered by decimal, float, date, uuid and datetime columns walk every row."""
        for i in range(7):
            # created set here: SQLite's CURRENT_TIMESTAMP text does not compare with a bound datetime.
            dal.posts.create(
                title=f"t{i}",
                price=Decimal(i % 3) / 4,
                ratio=(i % 4) / 3,
                day=dt.date(2024, 1, 1 + i % 2),
                uid=uuid.uuid4(),
                created=dt.datetime(2024, 1, 1, i % 3, tzinfo=dt.timezone.utc),
                allow_protected="created",
            )
        for order in (["price"], ["-ratio"], ["day", "-price"], ["uid"], ["-created"], ["-title"]):
            assert walk(dal, order, 2) == [p.id for p in dal.posts.search(order_by=order)], order


HOSTILE_FILTERS = [
    pytest.param({"title": {"a": 1}}, "title", id="dict for a string"),
    pytest.param({"id": [1, 2]}, "id", id="list for an int"),
    pytest.param({"id": "abc"}, "id", id="letters for an int"),
    pytest.param({"id": "1"}, "id", id="digits for an int"),
    pytest.param({"title": b"x"}, "title", id="bytes for a string"),
    pytest.param({"title": "a\x00b"}, "title", id="NUL in a string"),
    pytest.param({"title": "\udfff"}, "title", id="lone surrogate"),
    pytest.param({"id__gt": [1]}, "id", id="list for gt"),
    pytest.param({"title__like": 5}, "title", id="int for like"),
    pytest.param({"title__startswith": 5}, "title", id="int for startswith"),
    pytest.param({"score__in": "abc"}, "score", id="string for in"),
    pytest.param({"score__in": [1, "2"]}, "score", id="string inside in"),
    pytest.param({"score__in": [1, None]}, "score", id="None inside in"),
    pytest.param({"score": 1.5}, "score", id="float for an int"),
    pytest.param({"score": True}, "score", id="bool for an int"),
    pytest.param({"score__like": "1%"}, "score", id="like on an int column"),
    pytest.param({"pinned": "yes"}, "pinned", id="string for a bool"),
    pytest.param({"pinned": 1}, "pinned", id="int for a bool"),
    pytest.param({"status": "bogus"}, "status", id="unknown enum value"),
    pytest.param({"status": "draft"}, "status", id="enum name where values are stored"),
    pytest.param({"status__ilike": "d%"}, "status", id="ilike on an enum"),
    pytest.param({"price": Decimal("1e999999")}, "price", id="decimal past numeric's range"),
    pytest.param({"price": Decimal("NaN")}, "price", id="decimal NaN"),
    pytest.param({"price__lt": float("inf")}, "price", id="infinite float for numeric"),
    pytest.param({"ratio__lt": 2**63}, "ratio", id="int past 64 bits for a float"),
    pytest.param({"ratio": Decimal("1.5")}, "ratio", id="decimal for a float"),
    pytest.param({"day": dt.datetime(2024, 1, 1)}, "day", id="datetime for a date"),
    pytest.param({"created__lt": dt.date(2024, 1, 1)}, "created", id="date for a datetime"),
    pytest.param({"uid": "not-a-uuid"}, "uid", id="string for a uuid"),
    pytest.param({"data": {"a": 1}}, "data", id="compare a JSON column"),
    pytest.param({"title__is_null": "yes"}, "title", id="string for is_null"),
]


class TestFilterValues:
    @pytest.mark.parametrize(("filters", "column"), HOSTILE_FILTERS)
    def test_hostile_value_is_refused_naming_filter_and_column(
        self, dm: DataManager, db: Database, filters: dict[str, Any], column: str
    ) -> None:
        """The value is refused before any SQL, naming filter and column; the context commits."""
        (key,) = filters
        with dm.dal() as dal:
            dal.posts.create(title="before")
            for call in (dal.posts.search, dal.posts.count, dal.posts.exists):
                with pytest.raises(InvalidInput, match=rf"^filter '{key}' on Post\.{column}: ") as info:
                    call(filters)
                assert info.value.code == 400
            assert dal.posts.count() == 1
            dal.posts.create(title="after")
        with db.engine.connect() as conn:
            assert sorted(conn.execute(select(Post.title)).scalars()) == ["after", "before"]

    def test_messages_say_what_was_expected(self, dal: DataAccessLayer) -> None:
        """The issue's three examples say what the column holds and what was sent."""
        with pytest.raises(InvalidInput, match=r"filter 'id' on Post\.id: expected an int, got '1' \(str\)"):
            dal.posts.search({"id": "1"})
        with pytest.raises(InvalidInput, match=r"'score__in' on Post\.score: the in operator takes a list"):
            dal.posts.search({"score__in": "abc"})
        with pytest.raises(InvalidInput, match=r"'title__startswith' on Post\.title: .* got 5 \(int\)"):
            dal.posts.search({"title__startswith": 5})

    def test_a_filter_name_that_is_not_a_string_is_refused(self, dal: DataAccessLayer) -> None:
        """A filter key that is not a string is InvalidInput naming it, not an AttributeError."""
        with pytest.raises(InvalidInput, match=r"filter names are strings like 'age__gte', got 1 \(int\)"):
            dal.posts.count({1: 2})

    def test_a_type_decorator_column_takes_its_own_values(self, dal: DataAccessLayer) -> None:
        """A TypeDecorator without a python_type is not second-guessed: its value objects filter."""
        dal.posts.create(title="a", email=Email("Ann@Example.org"))
        assert dal.posts.count({"email": Email("ann@example.org")}) == 1
        assert dal.posts.count({"email__in": [Email("ANN@example.org"), Email("bob@example.org")]}) == 1

    def test_a_long_value_is_shortened_in_the_message(self, dal: DataAccessLayer) -> None:
        """A megabyte sent as an int is not echoed back whole."""
        with pytest.raises(InvalidInput) as info:
            dal.posts.search({"id": "x" * 1_000_000})
        assert len(str(info.value)) < 200

    @pytest.mark.parametrize(
        ("filters", "expected"),
        [
            ({"id__gte": 1}, 3),
            ({"price": Decimal("1.50")}, 1),
            ({"price__lt": 2}, 2),
            ({"price__lt": 1.6}, 2),
            ({"ratio__gt": 0}, 2),
            ({"ratio": 0.5}, 1),
            ({"day": dt.date(2024, 1, 2)}, 1),
            ({"day__in": [dt.date(2024, 1, 2), dt.date(2024, 1, 3)]}, 1),
            ({"score__in": range(2**63 - 1, 2**63 + 1)}, 0),  # any sequence, its ints range-checked
            ({"uid": uuid.UUID(int=7)}, 1),
            ({"data__is_null": True}, 2),
            ({"data": None}, 2),
            ({"created__lt": dt.datetime(9999, 1, 1, tzinfo=dt.timezone.utc)}, 3),
            ({"title__contains": "é"}, 1),
        ],
    )
    def test_values_of_the_right_type_are_accepted(
        self, dal: DataAccessLayer, filters: dict[str, Any], expected: int
    ) -> None:
        """Ints for numbers, floats for numerics, dates, UUIDs and None all still match."""
        dal.posts.create(
            title="café", price=Decimal("1.50"), ratio=0.5, day=dt.date(2024, 1, 2), uid=uuid.UUID(int=7)
        )
        dal.posts.create(title="b", price=Decimal("0.25"), ratio=1.5, data={"k": 1})
        dal.posts.create(title="c", ratio=0.0)
        assert dal.posts.count(filters) == expected


class TestWrittenText:
    @pytest.mark.parametrize(
        ("title", "problem"),
        [
            ("a\x00b", "without NUL characters or lone surrogates"),
            ("a\udcff", "without NUL characters or lone surrogates"),
            ("x" * 101, "holds at most 100 characters, got 101"),
        ],
        ids=["nul", "surrogate", "too-long"],
    )
    def test_text_no_column_can_store_is_refused_before_any_sql(
        self, dm: DataManager, db: Database, title: str, problem: str
    ) -> None:
        """create/update with such text: InvalidInput (a 400) on SQLite and PostgreSQL alike, nothing written.

        (PostgreSQL used to fail the statement with a DataError, a 500; SQLite stored it.)
        """
        with dm.dal() as dal:
            with pytest.raises(InvalidInput, match=problem):
                dal.posts.create(title=title)
            post = dal.posts.create(title="fine")
            with pytest.raises(InvalidInput, match=problem):
                dal.posts.update(post.id, title=title)
        with dm.dal() as dal:
            assert [p.title for p in dal.posts.search()] == ["fine"]
            assert dal.posts.create(title="x" * 100).title == "x" * 100  # the limit itself is fine


class TestExpectedVersion:
    @pytest.mark.parametrize("version", ["1", "abc", 1.0, True, [1]])
    def test_a_non_int_version_is_refused_before_any_sql(self, dal: DataAccessLayer, version: Any) -> None:
        """A string from a form is InvalidInput saying to convert it, not 'at version 1, not 1'."""
        post = dal.posts.create(title="a")
        with pytest.raises(InvalidInput, match=r"expected_version must be the int version .* int\(\)"):
            dal.posts.update(post.id, expected_version=version, title="b")
        with pytest.raises(InvalidInput, match="expected_version must be the int version"):
            dal.posts.delete(post.id, expected_version=version)
        assert dal.posts.update(post.id, expected_version=1, title="c").version == 2


class TestProtectedColumns:
    def test_update_cannot_rewind_the_version(self, dm: DataManager) -> None:
        """update(version=1) is refused, so a stale expected_version stays a conflict."""
        with dm.dal() as dal:
            post = dal.posts.create(title="v1")
        for text in ("v2", "v3"):
            with dm.dal() as dal:
                dal.posts.update(post.id, title=text)
        with dm.dal() as dal:
            with pytest.raises(
                InvalidInput,
                match=r"Post\.version cannot be set here: it is the "
                r"optimistic-lock version.*allow_protected=\{'version'\}",
            ):
                dal.posts.update(post.id, version=1)
            assert dal.posts.require(post.id).version == 3
        with pytest.raises(ConcurrencyConflict, match="at version 3, not 1"), dm.dal() as dal:
            dal.posts.update(post.id, expected_version=1, title="stale")

    @pytest.mark.parametrize(
        ("method", "values", "reason"),
        [
            ("update", {"id": 99}, "it is the primary key"),
            ("update", {"created": dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)}, "marked read-only"),
            ("create", {"id": 99}, "the database generates it"),
            ("create", {"version": 7}, "optimistic-lock version"),
            ("create", {"created": dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)}, "marked read-only"),
        ],
    )
    def test_protected_columns_are_refused(
        self, dal: DataAccessLayer, method: str, values: dict[str, Any], reason: str
    ) -> None:
        """The primary key, the version and read-only columns are refused, saying why."""
        post = dal.posts.create(title="a")
        call = (
            (lambda: dal.posts.update(post.id, **values))
            if method == "update"
            else (lambda: dal.posts.create(title="b", **values))
        )
        with pytest.raises(InvalidInput, match=reason):
            call()
        assert dal.posts.count() == 1

    def test_allow_protected_opts_in_for_one_call(self, dal: DataAccessLayer) -> None:
        """Naming a protected column in allow_protected writes it; a bare string names one column."""
        when = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
        post = dal.posts.create(title="a", id=41, allow_protected="id")
        assert post.id == 41
        dal.posts.update(41, created=when, allow_protected={"created"})
        assert dal.posts.require(41).created.year == 2020
        with pytest.raises(InvalidInput, match="marked read-only"):
            dal.posts.update(41, created=when, allow_protected={"version"})

    def test_allow_protected_with_an_unprotected_name_is_a_value_error(self, dal: DataAccessLayer) -> None:
        """A name in allow_protected that is not protected (a typo) is refused, listing the protected ones."""
        post = dal.posts.create(title="a")
        with pytest.raises(ValueError, match=r"names 'title'.*protected: created, id, version"):
            dal.posts.update(post.id, title="b", allow_protected=["title"])


@pytest.fixture(name="adb", params=["aiosqlite", "postgresql"])
async def fixture_adb(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[AsyncDatabase]:
    """An AsyncDatabase on each backend with the posts table, dropped afterwards."""
    if request.param == "aiosqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'posts.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
    db = AsyncDatabase(url)
    async with db.engine.begin() as conn:
        await conn.run_sync(InputBase.metadata.create_all)
    yield db
    async with db.engine.begin() as conn:
        await conn.run_sync(InputBase.metadata.drop_all)
    await db.dispose()


async def test_async_store_shares_every_check(adb: AsyncDatabase) -> None:
    """AsyncStore: boolean/enum pages walk, and bad filters, cursors, versions and columns are refused."""
    dm = DataManager()
    adb.install(dm)
    dm.register_services(posts=AsyncPosts())
    async with dm.dal() as dal:
        posts = [
            await dal.posts.create(title=f"p{i}", pinned=p, status=s, mood=m)
            for i, (p, s, m) in enumerate(ROWS)
        ]
        ids: list[int] = []
        cursor = None
        while True:
            page = await dal.posts.search(order_by=["-pinned", "status"], limit=3, after=cursor)
            ids += [p.id for p in page]
            if (cursor := page.next_cursor) is None:
                break
        assert ids == expected_order(posts, ["-pinned", "status"])
        with pytest.raises(InvalidInput, match=r"filter 'id' on Post\.id"):
            await dal.posts.count({"id": "1"})
        with pytest.raises(InvalidInput, match="invalid page cursor"):
            await dal.posts.search(order_by="id", after=forge(["id"], [2**63]))
        with pytest.raises(InvalidInput, match="invalid page cursor"):
            await dal.posts.search(order_by="id", after=nested(3000))
        with pytest.raises(InvalidInput, match="expected_version must be the int version"):
            await dal.posts.update(posts[0].id, expected_version="1", title="x")
        with pytest.raises(InvalidInput, match="expected_version must be the int version"):
            await dal.posts.delete(posts[0].id, expected_version="1")
        with pytest.raises(InvalidInput, match=r"Post\.version cannot be set here"):
            await dal.posts.update(posts[0].id, version=5)
        with pytest.raises(InvalidInput, match=r"Post\.id cannot be set here"):
            await dal.posts.create(title="y", id=1000)
        assert await dal.posts.count() == len(ROWS)

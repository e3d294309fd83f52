"""Store and AsyncStore answer ints no key column can hold as "no such row", on SQLite and PostgreSQL.

On PostgreSQL such a value (2**31 for an INTEGER key) fails the statement with
SQLSTATE 22003 and aborts the transaction; sqlite3 refuses ints past 64 bits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, SmallInteger, select
from sqlalchemy.exc import DataError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polydatum import DataManager
from polydatum.errors import NotFound
from polydatum.sqlalchemy import AsyncDatabase, Database, Store
from tests.support.sql import AsyncItems, Base, Item, Items, Memberships

OUTSIDE_INT32 = [2**31, -(2**31) - 1]
OUTSIDE_INT64 = [2**63, -(2**63) - 1, 10**20, -(10**20)]


class OtherBase(DeclarativeBase):
    pass


class Small(OtherBase):
    __tablename__ = "smalls"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)


class Big(OtherBase):
    __tablename__ = "bigs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


class Smalls(Store[Small]):
    pass


class Bigs(Store[Big]):
    pass


@pytest.fixture(name="db")
def fixture_db(url: str) -> Iterator[Database]:
    """A Database with the test tables, dropped afterwards."""
    db = Database(url)
    Base.metadata.create_all(db.engine)
    OtherBase.metadata.create_all(db.engine)
    yield db
    OtherBase.metadata.drop_all(db.engine)
    Base.metadata.drop_all(db.engine)
    db.dispose()


@pytest.fixture(name="dm")
def fixture_dm(db: Database) -> DataManager:
    """The stores on ``db``."""
    dm = DataManager()
    db.install(dm)
    dm.register_services(items=Items(), memberships=Memberships(), smalls=Smalls(), bigs=Bigs())
    return dm


def names(db: Database) -> list[str]:
    """Item names as a separate connection sees them."""
    with db.engine.connect() as conn:
        return sorted(conn.execute(select(Item.name)).scalars())


def out_of_range(backend: str) -> list[int]:
    """Ints an INTEGER key cannot hold on ``backend`` (SQLite's INTEGER is 64-bit)."""
    return OUTSIDE_INT64 if backend == "sqlite" else OUTSIDE_INT32 + OUTSIDE_INT64


class TestSync:
    def test_every_lookup_is_no_such_row_and_the_context_still_commits(
        self, dm: DataManager, db: Database, backend: str
    ) -> None:
        """get/require/exists/count/delete/update of an out-of-range id, then more work commits."""
        with dm.dal() as dal:
            dal.items.create(name="before")
            for ident in out_of_range(backend):
                assert dal.items.get(ident) is None
                with pytest.raises(NotFound, match=f"Item {ident} not found"):
                    dal.items.require(ident)
                assert dal.items.exists({"id": ident}) is False
                assert dal.items.count({"id": ident}) == 0
                assert dal.items.delete(ident) is False
                with pytest.raises(NotFound, match=f"Item {ident} not found"):
                    dal.items.update(ident, qty=1)
            dal.items.create(name="after")
        assert names(db) == ["after", "before"]

    def test_composite_keys_are_checked_column_by_column(self, dm: DataManager, backend: str) -> None:
        """A tuple or a dict key with an out-of-range int part is no such row."""
        with dm.dal() as dal:
            dal.memberships.create(team="a", user_id=1, role="member")
            ident = out_of_range(backend)[0]
            assert dal.memberships.get(("a", ident)) is None
            assert dal.memberships.get({"team": "a", "user_id": ident}) is None
            assert dal.memberships.delete(("a", ident)) is False
            assert dal.memberships.require({"team": "a", "user_id": 1}).role == "member"

    def test_filters_with_out_of_range_ints_match_as_the_math_says(
        self, dm: DataManager, backend: str
    ) -> None:
        """Each operator with an int beyond the column's range gives the rows it logically matches."""
        with dm.dal() as dal:
            first, *_ = [dal.items.create(name=f"n{i}", qty=None if i == 0 else i) for i in range(4)]
            huge, tiny = 10**20, -(10**20)
            cases: list[tuple[dict[str, Any], int]] = [
                ({"id": huge}, 0),
                ({"id__ne": huge}, 4),
                ({"id__lt": huge}, 4),
                ({"id__lte": tiny}, 0),
                ({"id__gt": huge}, 0),
                ({"id__gte": tiny}, 4),
                ({"id__in": [first.id, huge]}, 1),
                ({"id__in": [huge]}, 0),
                ({"id__not_in": [first.id, huge]}, 3),
                ({"id__not_in": [huge]}, 4),
                ({"qty__lt": huge}, 3),  # a nullable column: NULL is never less than anything
                ({"qty__ne": tiny}, 3),
            ]
            for filters, expected in cases:
                assert dal.items.count(filters) == expected, filters
                assert len(dal.items.search(filters)) == expected, filters
                assert dal.items.exists(filters) is (expected > 0), filters

    def test_ids_in_range_are_still_found(self, dm: DataManager) -> None:
        """The check only skips values the column cannot hold: the extremes it can hold are found."""
        with dm.dal() as dal:
            for ident in (2**15 - 1, -(2**15)):
                dal.smalls.create(id=ident)
                assert dal.smalls.require(ident).id == ident
            for ident in (2**31, 2**63 - 1, -(2**63)):
                dal.bigs.create(id=ident)
                assert dal.bigs.require(ident).id == ident
                assert dal.bigs.count({"id__gte": ident}) >= 1

    def test_smallint_and_bigint_keys_have_their_own_ranges(self, dm: DataManager, backend: str) -> None:
        """SMALLINT is 16-bit and BIGINT 64-bit on PostgreSQL; on SQLite every integer is 64-bit."""
        with dm.dal() as dal:
            dal.smalls.create(id=1)
            assert dal.smalls.get(2**15 if backend == "postgresql" else 2**63) is None
            assert dal.bigs.get(2**63) is None
            assert not dal.bigs.exists({"id": -(2**63) - 1})
            dal.bigs.create(id=2**40)
        with dm.dal() as dal:
            assert dal.bigs.require(2**40).id == 2**40

    def test_other_data_errors_are_not_masked(self, dm: DataManager, backend: str) -> None:
        """A key of the wrong kind is still PostgreSQL's DataError (SQLite just finds no row)."""
        if backend == "sqlite":
            with dm.dal() as dal:
                assert dal.items.get("not a number") is None
            return
        with dm.dal() as dal, pytest.raises(DataError) as info:
            dal.items.get("not a number")
        assert getattr(info.value.orig, "sqlstate", None) == "22P02"  # invalid_text_representation


@pytest.fixture(name="async_url", params=["aiosqlite", "postgresql"])
def fixture_async_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """The async URL of each backend."""
    if request.param == "aiosqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(name="adb")
async def fixture_adb(async_url: str) -> AsyncIterator[AsyncDatabase]:
    """An AsyncDatabase with the test tables, dropped afterwards."""
    db = AsyncDatabase(async_url)
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield db
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
    await db.dispose()


async def test_async_store_treats_out_of_range_ids_as_missing(adb: AsyncDatabase, async_url: str) -> None:
    """AsyncStore: the same answers, and the context commits other work afterwards."""
    dm = DataManager()
    adb.install(dm)
    dm.register_services(items=AsyncItems())
    idents = OUTSIDE_INT64 if async_url.startswith("sqlite") else OUTSIDE_INT32 + OUTSIDE_INT64
    async with dm.dal() as dal:
        await dal.items.create(name="before")
        for ident in idents:
            assert await dal.items.get(ident) is None
            with pytest.raises(NotFound, match=f"Item {ident} not found"):
                await dal.items.require(ident)
            assert await dal.items.exists({"id": ident}) is False
            assert await dal.items.count({"id__in": [ident]}) == 0
            assert len(await dal.items.search({"id__lt": ident})) == (1 if ident > 0 else 0)
            assert await dal.items.delete(ident) is False
            with pytest.raises(NotFound):
                await dal.items.update(ident, qty=1)
        await dal.items.create(name="after")
    async with adb.engine.connect() as conn:
        assert sorted((await conn.execute(select(Item.name))).scalars()) == ["after", "before"]

"""polydatum.testing: overrides, the transactional database, and the pytest plugin (through pytester)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, text

from polydatum import DataManager, Service, ValueResource
from polydatum.errors import InvalidResource
from polydatum.sqlalchemy import AsyncDatabase, Database, Dataset, ReadOnlyError, read_only
from polydatum.testing import (
    Overrides,
    async_transactional_database,
    override_resource,
    override_service,
    transactional_database,
)
from tests.support.sql import AsyncItems, Base, Item, Items, fresh_postgres_database

pytest_plugins = ["pytester"]

# Settings every generated project gets (pytest-asyncio warns without it).
INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


class Profiles(Service):
    def name(self, user_id: int) -> str:
        return f"profile-{user_id}"


class Users(Service):
    def __init__(self) -> None:
        super().__init__()
        self.register_services(profiles=Profiles())

    def get(self, user_id: int) -> str:
        return f"user-{user_id}"


class FakeUsers(Service):
    def get(self, user_id: int) -> str:
        return f"fake-{user_id}"


class FakeProfiles(Service):
    def name(self, user_id: int) -> str:
        return f"fake-profile-{user_id}"


def clock(ctx: object) -> Iterator[str]:
    yield "real clock"


@pytest.fixture
def dm() -> DataManager:
    dm = DataManager()
    dm.register_services(users=Users())
    dm.register_resources(clock=clock)
    return dm


# -- override_service / override_resource ------------------------------------


def test_override_service_swaps_and_restores(dm: DataManager) -> None:
    with dm.dal() as dal:
        assert dal.users.get(1) == "user-1"
    with override_service(dm, "users", FakeUsers()) as fake:
        assert fake._data_manager is dm
        with dm.dal() as dal:
            assert dal.users.get(1) == "fake-1"
    with dm.dal() as dal:
        assert dal.users.get(1) == "user-1"


def test_override_nested_service(dm: DataManager) -> None:
    with override_service(dm, "users.profiles", FakeProfiles()), dm.dal() as dal:
        assert dal.users.profiles.name(3) == "fake-profile-3"
        assert dal.users.get(3) == "user-3"
    with dm.dal() as dal:
        assert dal.users.profiles.name(3) == "profile-3"


def test_override_service_restores_after_an_error(dm: DataManager) -> None:
    with pytest.raises(RuntimeError), override_service(dm, "users", FakeUsers()):
        raise RuntimeError("test failed")
    with dm.dal() as dal:
        assert dal.users.get(2) == "user-2"


def test_override_unknown_service_names_the_nearest(dm: DataManager) -> None:
    with pytest.raises(LookupError, match=r"no service named 'user'.*did you mean 'users'"):
        override_service(dm, "user", FakeUsers()).__enter__()
    with pytest.raises(LookupError, match=r"'users.profile'.*did you mean 'profiles'"):
        override_service(dm, "users.profile", FakeProfiles()).__enter__()
    with pytest.raises(LookupError, match=r"no service named 'nope'"):
        override_service(dm, "nope.profiles", FakeProfiles()).__enter__()


def test_override_service_refuses_a_non_service(dm: DataManager) -> None:
    with pytest.raises(TypeError, match=r"must be a polydatum\.Service"):
        override_service(dm, "users", object()).__enter__()
    with dm.dal() as dal:
        assert dal.users.get(1) == "user-1"


def test_override_resource_swaps_and_restores(dm: DataManager) -> None:
    def failing_test() -> None:
        with override_resource(dm, "clock", ValueResource("frozen")):
            with dm.context() as ctx:
                assert ctx.clock == "frozen"
            raise RuntimeError("test failed")

    with pytest.raises(RuntimeError):
        failing_test()
    with dm.context() as ctx:
        assert ctx.clock == "real clock"


def test_override_resource_errors(dm: DataManager) -> None:
    with pytest.raises(LookupError, match=r"no resource named 'clok'.*did you mean 'clock'"):
        override_resource(dm, "clok", ValueResource(1)).__enter__()
    with pytest.raises(InvalidResource):
        override_resource(dm, "clock", 42).__enter__()
    with dm.context() as ctx:
        assert ctx.clock == "real clock"


def test_overrides_undo_newest_first(dm: DataManager) -> None:
    first, second = FakeUsers(), FakeUsers()
    with Overrides(dm) as overrides:
        overrides.service("users", first)
        overrides.service("users", second)
        overrides.resource("clock", ValueResource("frozen"))
        with dm.dal() as dal:
            assert dm.require_active_context().clock == "frozen"
            assert dal.users.get(1) == "fake-1"
    with dm.dal() as dal:
        assert dal.users.get(1) == "user-1"
        assert dm.require_active_context().clock == "real clock"


# -- transactional_database ----------------------------------------------------


def _count(db: Database) -> int:
    with db.session() as session:
        return len(session.scalars(select(Item)).all())


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'app.db'}")
        Base.metadata.create_all(db.engine)
        yield db
        db.dispose()
        return
    with fresh_postgres_database(request.getfixturevalue("postgres_url")) as url:
        db = Database(url)
        Base.metadata.create_all(db.engine)
        yield db
        db.dispose()


def fail_after_create(dm: DataManager) -> None:
    with dm.dal() as dal:
        dal.items.create(name="rolled back at once", qty=2)
        raise ZeroDivisionError


def test_transactional_database_rolls_back_committed_work(database: Database) -> None:
    dm = DataManager()
    database.install(dm)
    dm.register_services(items=Items(Item))
    with transactional_database(database) as connection:
        with dm.dal() as dal:
            dal.items.create(name="kept until the end", qty=1)
        with pytest.raises(ZeroDivisionError):
            fail_after_create(dm)
        with dm.dal() as dal:
            assert [i.name for i in dal.items.search()] == ["kept until the end"]
        assert connection.execute(text("SELECT count(*) FROM items")).scalar_one() == 1
    assert _count(database) == 0
    with dm.dal() as dal:  # sessions use the pool again
        dal.items.create(name="real", qty=3)
    assert _count(database) == 1


def test_transactional_database_does_not_nest(database: Database) -> None:
    with transactional_database(database), pytest.raises(RuntimeError, match="do not nest"):
        transactional_database(database).__enter__()
    with database.session() as session:  # unpinned again
        assert session.get_bind() is database.engine


# -- async_transactional_database ----------------------------------------------


@pytest.fixture(params=["aiosqlite", "postgresql"])
async def async_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncDatabase]:
    with contextlib.ExitStack() as stack:
        if request.param == "aiosqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
        else:
            url = stack.enter_context(fresh_postgres_database(request.getfixturevalue("postgres_url")))
        db = AsyncDatabase(url)
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield db
        await db.dispose()


async def _acount(db: AsyncDatabase) -> int:
    async with db.engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM items"))).scalar_one())


async def afail_after_create(dm: DataManager) -> None:
    async with dm.dal() as dal:
        await dal.items.create(name="rolled back at once", qty=2)
        raise ZeroDivisionError


async def test_async_transactional_database_rolls_back_committed_work(
    async_database: AsyncDatabase,
) -> None:
    """Committed and failed async contexts inside the block all vanish at its end."""
    dm = DataManager()
    async_database.install(dm)
    dm.register_services(items=AsyncItems())
    async with async_transactional_database(async_database) as connection:
        async with dm.dal() as dal:
            await dal.items.create(name="kept until the end", qty=1)
        with pytest.raises(ZeroDivisionError):
            await afail_after_create(dm)
        async with dm.dal() as dal:
            assert [i.name for i in await dal.items.search()] == ["kept until the end"]
        result = await connection.execute(text("SELECT count(*) FROM items"))
        assert result.scalar_one() == 1
        async with dm.context() as ctx:
            session = await ctx.aget("db")
            read_only(session)
            session.add(Item(name="refused"))
            with pytest.raises(ReadOnlyError):
                await session.flush()
    assert await _acount(async_database) == 0
    async with dm.dal() as dal:  # sessions use the pool again
        await dal.items.create(name="real", qty=3)
    assert await _acount(async_database) == 1
    assert async_database.engine.pool.checkedout() == 0


async def test_async_transactional_database_undoes_itself_after_an_error(
    async_database: AsyncDatabase,
) -> None:
    """A block that raises still rolls back, returns its connection and unpins the database."""
    dm = DataManager()
    async_database.install(dm)
    dm.register_services(items=AsyncItems())

    async def failing_test() -> None:
        async with async_transactional_database(async_database):
            async with dm.dal() as dal:
                await dal.items.create(name="gone")
            raise KeyError("test failed")

    with pytest.raises(KeyError):
        await failing_test()
    assert await _acount(async_database) == 0
    assert async_database.engine.pool.checkedout() == 0
    session = async_database.session()
    assert session.bind is async_database.engine
    await session.close()


async def test_async_transactional_database_does_not_nest(
    async_database: AsyncDatabase,
) -> None:
    """A second block on the same AsyncDatabase raises RuntimeError before connecting."""
    async with async_transactional_database(async_database):
        with pytest.raises(RuntimeError, match="do not nest"):
            await async_transactional_database(async_database).__aenter__()
        assert async_database.engine.pool.checkedout() == 1


# -- the pytest plugin ---------------------------------------------------------


APP = """
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polydatum import DataManager, Service
from polydatum.sqlalchemy import Database, Store


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(100))


class Notes(Store[Note]):
    pass


class Whoami(Service):
    def get(self):
        return self._ctx.meta.user


dm = DataManager()
db = Database({url!r}).install(dm)
Base.metadata.create_all(db.engine)
dm.register_services(notes=Notes(Note), whoami=Whoami())
"""

TESTS = """
import pytest
from polydatum import Service


@pytest.fixture
def polydatum_meta():
    return {"user": "ann"}


class Stub(Service):
    def get(self):
        return "stub"


@pytest.mark.parametrize("n", range(3))
def test_each_test_starts_empty(polydatum_db, polydatum_dal, n):
    assert polydatum_dal.notes.count() == 0
    polydatum_dal.notes.create(text=f"note {n}")
    assert polydatum_dal.notes.count() == 1


def test_meta(polydatum_dal, polydatum_context):
    assert polydatum_dal.whoami.get() == "ann"
    assert polydatum_context.meta.user == "ann"


def test_override_is_undone(polydatum_overrides, polydatum_data_manager):
    polydatum_overrides.service("whoami", Stub())
    with polydatum_data_manager.dal() as dal:
        assert dal.whoami.get() == "stub"


def test_after_override(polydatum_data_manager):
    with polydatum_data_manager.dal({"user": "bob"}) as dal:
        assert dal.whoami.get() == "bob"
"""


def _project(pytester: pytest.Pytester, url: str, ini: str = "polydatum_data_manager = app:dm") -> None:
    pytester.makepyfile(app=APP.format(url=url), test_app=TESTS)
    pytester.makeini(f"{INI}{ini}\n")
    pytester.syspathinsert()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_plugin_fixtures(pytester: pytest.Pytester, backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{pytester.path / 'app.db'}"
        _project(pytester, url)
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
        result.assert_outcomes(passed=6)
        db = Database(url)
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM notes")).scalar_one() == 0
        db.dispose()
        return
    with fresh_postgres_database(request.getfixturevalue("postgres_url")) as url:
        _project(pytester, url)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        result.assert_outcomes(passed=6)
        db = Database(url)
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM notes")).scalar_one() == 0
        db.dispose()


def test_plugin_data_manager_from_a_conftest_fixture(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makeconftest("""
import pytest
from polydatum import DataManager, Service

class Hello(Service):
    def get(self):
        return "hello"

@pytest.fixture
def polydatum_data_manager():
    dm = DataManager()
    dm.register_services(hello=Hello())
    return dm
""")
    pytester.makepyfile("""
def test_it(polydatum_dal):
    assert polydatum_dal.hello.get() == "hello"
""")
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_plugin_without_a_data_manager_says_what_to_do(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile("def test_it(polydatum_dal):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*set polydatum_data_manager = 'package.module:attribute'*"])


@pytest.mark.parametrize(
    ("ini", "message"),
    [
        ("polydatum_data_manager = app", "*must look like 'package.module:attribute'*"),
        ("polydatum_data_manager = app:nothing", "*has no attribute 'nothing'*"),
        ("polydatum_data_manager = app:Notes", "*is a type, not a polydatum.DataManager*"),
    ],
)
def test_plugin_bad_configuration(pytester: pytest.Pytester, ini: str, message: str) -> None:
    _project(pytester, "sqlite://", ini)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-k", "test_meta")
    assert result.ret != 0
    result.stdout.fnmatch_lines([message])


def test_polydatum_db_without_a_database(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makeconftest("""
import pytest
from polydatum import DataManager

@pytest.fixture
def polydatum_data_manager():
    return DataManager()
""")
    pytester.makepyfile("def test_it(polydatum_db):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*found no polydatum.sqlalchemy.Database installed*"])


def test_polydatum_db_with_only_an_async_database(pytester: pytest.Pytester) -> None:
    """polydatum_db in an app with only an AsyncDatabase points to async_transactional_database."""
    pytester.makeini(INI)
    pytester.makeconftest("""
import pytest
from polydatum import DataManager
from polydatum.sqlalchemy import AsyncDatabase

@pytest.fixture
def polydatum_data_manager():
    dm = DataManager()
    AsyncDatabase("sqlite+aiosqlite://").install(dm)
    return dm
""")
    pytester.makepyfile("def test_it(polydatum_db):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*found an AsyncDatabase*async_transactional_database(db)*"])


def test_datasets_are_left_alone(tmp_path: Path) -> None:
    from polydatum.testing import _databases

    dm = DataManager()
    db = Database(f"sqlite:///{tmp_path / 'a.db'}").install(dm)
    Database(f"sqlite:///{tmp_path / 'b.db'}").install(dm, name="analytics")
    Dataset(":memory:").install(dm)
    assert [d.url.database for d in _databases(dm)] == [str(tmp_path / "a.db"), str(tmp_path / "b.db")]
    assert _databases(dm)[0] is db

"""Testing helpers and the polydatum pytest plugin.

The plugin is registered through the ``pytest11`` entry point, so installing
polydatum makes its fixtures available. Tell it which DataManager to use,
either in the pytest configuration::

    [tool.pytest.ini_options]
    polydatum_data_manager = "myapp.data:dm"

or with a fixture of that name in ``conftest.py``. Then:

- ``polydatum_dal``: the DAL of a context open for the whole test
  (its meta comes from the ``polydatum_meta`` fixture, ``{}`` by default);
- ``polydatum_context``: that context itself;
- ``polydatum_overrides``: swap services and resources for one test; every
  swap is undone when the test ends, whatever happened;
- ``polydatum_db``: every SQLAlchemy :class:`~polydatum.sqlalchemy.Database`
  installed in the DataManager runs inside one transaction that is rolled
  back after the test, so tests never see each other's rows.

The same building blocks work without pytest: :func:`override_service`,
:func:`override_resource` and :func:`transactional_database` are context
managers (:func:`async_transactional_database` for an ``AsyncDatabase``).

.. versionadded:: 2.0
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import ExitStack, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from polydatum.dal import DataManager
from polydatum.services import check_service

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from polydatum.context import DataAccessContext
    from polydatum.dal import DataAccessLayer
    from polydatum.sqlalchemy import AsyncDatabase, Database

__all__ = [
    "Overrides",
    "async_transactional_database",
    "override_resource",
    "override_service",
    "transactional_database",
]

S = TypeVar("S")
_INI = "polydatum_data_manager"
_HOW_SERVICE = "overrides replace registered services"


def _unknown(kind: str, name: str, known: list[str], how: str) -> LookupError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    msg = f"no {kind} named {name!r} to override{hint} ({how})"
    return LookupError(msg)


def _require_service(dm: DataManager, path: str) -> None:
    """Raise LookupError naming the first step of ``path`` that is not registered."""
    names = path.split(".")
    for depth in range(1, len(names) + 1):
        here = ".".join(names[:depth])
        if dm.get_service(here) is None:
            known = list(dm.get_services(".".join(names[: depth - 1])))
            raise _unknown("service", here, known, _HOW_SERVICE)


@contextmanager
def override_service(data_manager: DataManager, path: str, service: S) -> Iterator[S]:
    """Serve ``path`` (``"users"`` or nested, ``"users.profiles"``) with ``service`` for a while.

    The DAL calls the replacement from the next call on; the original comes
    back when the block ends, also when it raised.

    Args:
        data_manager: the DataManager under test.
        path: the registered name of the service, dotted for nested services.
        service: the replacement; a :class:`~polydatum.Service` or any object
            with a ``setup(data_manager)`` method.

    Yields:
        ``service``, set up with ``data_manager``.

    Raises:
        LookupError: nothing is registered at ``path`` (a typo is caught
            here, with the nearest registered names).
        TypeError: ``service`` cannot be set up as a service.
    """
    check_service(path, service)
    _require_service(data_manager, path)
    original = data_manager.replace_service(path, service)
    try:
        yield service
    finally:
        data_manager.replace_service(path, original)


@contextmanager
def override_resource(data_manager: DataManager, name: str, resource: Any) -> Iterator[None]:
    """Make contexts create resource ``name`` with ``resource`` for a while.

    Contexts that create the resource inside the block use the replacement
    (a context that already created it keeps its instance). The original
    factory is registered again when the block ends, also when it raised.

    Args:
        data_manager: the DataManager under test.
        name: a registered resource name.
        resource: a resource factory, as accepted by ``register_resources``;
            wrap a ready-made object in :class:`~polydatum.ValueResource`.

    Raises:
        LookupError: no resource ``name`` is registered.
        polydatum.errors.InvalidResource: ``resource`` is not a resource factory.
    """
    if data_manager.get_resource(name) is None:
        known = list(data_manager.resource_manager)
        raise _unknown("resource", name, known, "overrides replace registered resources")
    original = data_manager.replace_resource(name, resource)
    try:
        yield
    finally:
        data_manager.replace_resource(name, original)


@contextmanager
def transactional_database(database: Database | AsyncDatabase) -> Iterator[Any]:
    """Run every session of ``database`` inside one transaction, rolled back at the end.

    One connection is checked out and a transaction begun on it; every
    session made meanwhile (including the per-context ones) joins it, and
    their commits become SAVEPOINT releases. When the block ends the outer
    transaction is rolled back: whatever the code under test wrote is gone.

    All sessions share that one connection, so use it from one thread (or
    one event loop) at a time. Code that needs two truly separate
    transactions (lock or isolation tests) should use the real database.

    Given an :class:`~polydatum.sqlalchemy.AsyncDatabase`, this pins its
    sync side (the sessions of ``with`` contexts, ``database.sync``); use
    :func:`async_transactional_database` for its ``async with`` contexts.

    Yields:
        the :class:`sqlalchemy.engine.Connection` holding the transaction,
        for setup or assertions of your own.
    """
    with database.pinned() as connection:
        yield connection


@asynccontextmanager
async def async_transactional_database(database: AsyncDatabase) -> AsyncIterator[AsyncConnection]:
    """The asyncio twin of :func:`transactional_database`, for an AsyncDatabase.

    Use it as ``async with async_transactional_database(db) as connection:``.
    Every AsyncSession made meanwhile joins one transaction on one connection;
    their commits become SAVEPOINT releases and everything is rolled back
    when the block ends, also when it raised.

    The sessions share that one connection: run one task at a time against
    it (no ``asyncio.gather`` of contexts using the database).

    Sessions of ``with`` contexts (the database's sync side) are pinned too,
    on their first use, to a transaction of their own on a sync connection,
    also rolled back at the end. The two sides are two connections: what
    one side wrote inside the block is not visible to the other.

    Yields:
        the :class:`sqlalchemy.ext.asyncio.AsyncConnection` holding the transaction.

    Raises:
        RuntimeError: ``database`` is already inside such a block (they do not nest).

    .. versionadded:: 2.0
    """
    async with database.apinned() as connection:
        yield connection


class Overrides:
    """Service and resource swaps for one test, all undone together.

    Returned by the ``polydatum_overrides`` fixture; build one yourself with
    a DataManager and close it (or use it as a context manager) when done.
    """

    def __init__(self, data_manager: DataManager) -> None:
        self.data_manager = data_manager
        self._stack = ExitStack()

    def service(self, path: str, service: S) -> S:
        """Serve ``path`` with ``service`` until :meth:`close`; see :func:`override_service`."""
        return self._stack.enter_context(override_service(self.data_manager, path, service))

    def resource(self, name: str, resource: Any) -> None:
        """Create resource ``name`` with ``resource`` until :meth:`close`; see :func:`override_resource`."""
        self._stack.enter_context(override_resource(self.data_manager, name, resource))

    def close(self) -> None:
        """Undo every override, newest first."""
        self._stack.close()

    def __enter__(self) -> Overrides:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _installed(dm: DataManager) -> list[Any]:
    """The Database and AsyncDatabase objects behind the DataManager's resources."""
    found: list[Any] = []
    for name in dm.resource_manager:
        database = getattr(dm.get_resource(name), "database", None)
        if database is not None and database not in found:
            found.append(database)
    return found


def _databases(dm: DataManager) -> list[Database]:
    from polydatum.sqlalchemy import Database, Dataset

    # A Dataset is never written: nothing to roll back.
    return [d for d in _installed(dm) if isinstance(d, Database) and not isinstance(d, Dataset)]


# -- the pytest plugin -------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        _INI,
        "the DataManager the polydatum fixtures use, as 'package.module:attribute'",
        default="",
    )


def _load(spec: str) -> DataManager:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        msg = f"{_INI} = {spec!r} must look like 'package.module:attribute'"
        raise pytest.UsageError(msg)
    module = importlib.import_module(module_name)
    try:
        dm = getattr(module, attribute)
    except AttributeError:
        msg = f"{_INI} = {spec!r}: module {module_name!r} has no attribute {attribute!r}"
        raise pytest.UsageError(msg) from None
    if not isinstance(dm, DataManager):
        msg = f"{_INI} = {spec!r} is a {type(dm).__name__}, not a polydatum.DataManager"
        raise pytest.UsageError(msg)
    return dm


@pytest.fixture
def polydatum_data_manager(pytestconfig: pytest.Config) -> DataManager:
    """The DataManager under test.

    Set ``polydatum_data_manager`` in the pytest configuration, or define
    this fixture in ``conftest.py``.
    """
    spec = str(pytestconfig.getini(_INI)).strip()
    if not spec:
        pytest.fail(
            "the polydatum fixtures need your DataManager: set polydatum_data_manager = "
            "'package.module:attribute' in the pytest configuration, or define a fixture "
            "named polydatum_data_manager in conftest.py",
            pytrace=False,
        )
    return _load(spec)


@pytest.fixture
def polydatum_meta() -> Mapping[str, Any]:
    """Meta of the test's context; override it to act as a given user."""
    return {}


@pytest.fixture
def polydatum_overrides(polydatum_data_manager: DataManager) -> Iterator[Overrides]:
    """Swap services and resources for this test only."""
    with Overrides(polydatum_data_manager) as overrides:
        yield overrides


@pytest.fixture
def polydatum_context(
    polydatum_data_manager: DataManager, polydatum_meta: Mapping[str, Any]
) -> Iterator[DataAccessContext]:
    """A context open for the whole test (it commits if the test passes, like any context)."""
    with polydatum_data_manager.context(polydatum_meta) as ctx:
        yield ctx


@pytest.fixture
def polydatum_dal(polydatum_context: DataAccessContext) -> DataAccessLayer:
    """The DAL, used inside the ``polydatum_context`` of this test."""
    dal: DataAccessLayer = polydatum_context.dal
    return dal


@pytest.fixture
def polydatum_db(polydatum_data_manager: DataManager) -> Iterator[list[Any]]:
    """Roll back, after the test, everything written through the DataManager's SQL databases.

    Every :class:`~polydatum.sqlalchemy.Database` installed in the
    DataManager is wrapped in :func:`transactional_database`; the fixture's
    value is the list of their connections, in installation order.
    """
    databases = _databases(polydatum_data_manager)
    if not databases:
        from polydatum.sqlalchemy import AsyncDatabase

        if any(isinstance(d, AsyncDatabase) for d in _installed(polydatum_data_manager)):
            hint = (
                "it handles Database only, and found an AsyncDatabase: wrap that one with "
                "polydatum.testing.async_transactional_database(db) in an async fixture of your own"
            )
        else:
            hint = "install one with Database(url).install(dm) first"
        pytest.fail(
            f"polydatum_db found no polydatum.sqlalchemy.Database installed in the DataManager; {hint}",
            pytrace=False,
        )
    with ExitStack() as stack:
        yield [stack.enter_context(transactional_database(db)) for db in databases]

"""Engines, per-context sessions and the transaction middleware."""

from __future__ import annotations

import logging
import os
import sqlite3
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext, create_engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.pool import Pool, StaticPool

from polydatum.errors import PolydatumException
from polydatum.sqlalchemy._versioned import conflict_from

if TYPE_CHECKING:
    from typing_extensions import Self

    from polydatum import DataManager
    from polydatum.context import DataAccessContext

logger = logging.getLogger("polydatum.sqlalchemy")

SqliteBegin = Literal["DEFERRED", "IMMEDIATE", "EXCLUSIVE"]

# Keys in Session.info and in connection execution options.
_READ_ONLY = "polydatum_read_only"
_READ_ONLY_BIND = "polydatum_read_only_bind"
_QUERY_ONLY = "polydatum_query_only"
_SQLITE_READONLY = 8

# Commits acknowledged during one retry() attempt; None outside retry().
commit_log: ContextVar[list[str] | None] = ContextVar("polydatum_sqlalchemy_commits", default=None)


class ReadOnlyError(PolydatumException):
    """A write was attempted through a read-only session, context or dataset.

    .. versionadded:: 2.0
    """


class _Session(Session):
    """A Session that refuses writes when read-only and reports stale rows as conflicts."""

    def flush(self, objects: Sequence[Any] | None = None) -> None:
        if self.info.get(_READ_ONLY) and (self.new or self.dirty or self.deleted):
            msg = (
                "this session is read-only and refuses to flush changes; write in a context "
                "whose session is writable (not a Dataset, not installed with read_only=True, "
                "no read_only(session) call)"
            )
            raise ReadOnlyError(msg)
        try:
            super().flush(objects)
        except StaleDataError as exc:
            raise conflict_from(exc) from exc

    def commit(self) -> None:
        # A commit made by the code itself (not by the middleware) is durable
        # too: retry() must not run that unit of work again.
        log = commit_log.get()
        if log is None:  # not inside retry(): the common, fast path
            super().commit()
            return
        began = self.in_transaction()
        super().commit()
        if began:
            log.append("session")


def read_only(session: Session | AsyncSession) -> None:
    """Make a session read-only for the rest of its context.

    Flushing changes then raises :class:`ReadOnlyError`, the transaction
    middleware rolls back instead of committing, and the database is told
    too where it can be (``BEGIN READ ONLY`` on PostgreSQL, ``PRAGMA
    query_only`` on SQLite), so raw SQL writes are refused as well.

    Args:
        session: the context's session, e.g. ``self._ctx.db``.

    Raises:
        RuntimeError: if the session already began a transaction; call this
            before the first query of the context.

    .. versionadded:: 2.0
    """
    sync = session.sync_session if isinstance(session, AsyncSession) else session
    if sync.info.get(_READ_ONLY):
        return
    if sync.in_transaction():
        msg = (
            "read_only(session) was called after the session began its transaction; "
            "call it before the first query of the context"
        )
        raise RuntimeError(msg)
    bind = sync.info.get(_READ_ONLY_BIND)
    if bind is not None:
        sync.bind = bind
    sync.info[_READ_ONLY] = True


def _is_memory(url: URL) -> bool:
    name = url.database or ""
    return name in ("", ":memory:") or name.startswith("file::memory:") or (
        url.query.get("mode") == "memory"
    )


def _engine_options(url: URL, options: Mapping[str, Any]) -> dict[str, Any]:
    opts = dict(options)
    if url.get_backend_name() == "sqlite":
        if _is_memory(url) and url.get_driver_name() != "aiosqlite":
            # One connection shared by every thread: otherwise each thread
            # (SingletonThreadPool) would see its own empty database.
            opts.setdefault("poolclass", StaticPool)
            connect_args = dict(opts.get("connect_args", {}))
            connect_args.setdefault("check_same_thread", False)
            opts["connect_args"] = connect_args
    else:
        # A server may restart or drop idle connections; test each on checkout.
        opts.setdefault("pool_pre_ping", True)
    return opts


def _install_sqlite_transactions(engine: Engine, begin: SqliteBegin) -> None:
    """Let SQLAlchemy emit BEGIN itself (SQLAlchemy's documented pysqlite recipe).

    Without it the sqlite3 module starts transactions late, which breaks
    SAVEPOINT and repeatable reads. Read-only transactions also switch on
    ``PRAGMA query_only`` and begin DEFERRED, so they never take the write lock.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return  # sqlite3 autocommits each statement; a BEGIN would never end
        ro = bool(options.get(_READ_ONLY, False))
        info = conn.connection.info
        if info.get(_QUERY_ONLY, False) is not ro:
            conn.exec_driver_sql(f"PRAGMA query_only = {'ON' if ro else 'OFF'}")
            info[_QUERY_ONLY] = ro
        conn.exec_driver_sql("BEGIN" if ro else f"BEGIN {begin}")


def _is_read_only_violation(orig: BaseException | None) -> bool:
    if orig is None:
        return False
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF == _SQLITE_READONLY)
    if isinstance(orig, sqlite3.Error):
        return "readonly database" in str(orig)
    return (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) == "25006"


def _install_error_mapping(engine: Engine, label: str) -> None:
    @event.listens_for(engine, "handle_error")
    def _handle_error(context: ExceptionContext) -> BaseException | None:
        if not _is_read_only_violation(context.original_exception):
            return None
        msg = (
            f"{label} refused a write because it is read-only ({context.original_exception}); "
            "write through a writable Database, outside read_only(session) contexts"
        )
        return ReadOnlyError(msg)


# -- fork safety ---------------------------------------------------------------

_live: weakref.WeakSet[_EngineOwner] = weakref.WeakSet()
# Pools inherited from the parent are kept referenced in the child: if they were
# garbage collected, some drivers would close the parent's sockets on the way.
_inherited_pools: list[Pool] = []


def _after_fork_in_child() -> None:
    for owner in list(_live):
        engine = owner.sync_engine
        _inherited_pools.append(engine.pool)
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _EngineOwner:
    """What Database and AsyncDatabase share: URL handling, hooks, fork safety."""

    sync_engine: Engine
    url: URL

    def _setup(self, engine: Engine, sqlite_begin: SqliteBegin, autocommit: bool) -> None:
        self.sync_engine = engine
        self.url = engine.url
        if engine.dialect.name == "sqlite" and not autocommit:
            _install_sqlite_transactions(engine, sqlite_begin)
        _install_error_mapping(engine, repr(self))
        _live.add(self)

    def _refuse_pinned(self) -> None:
        if "_unpinned" in self.__dict__:
            msg = f"{self!r} is already pinned to a test transaction; they do not nest"
            raise RuntimeError(msg)

    def _pinned_options(
        self, factory: Any, read_only_engine: Any, bind: Any, sync_bind: Any
    ) -> dict[str, Any]:
        """Remember the unpinned factory; options for one whose sessions join ``bind``'s transaction.

        Shared by :meth:`Database._pin` and :meth:`AsyncDatabase._pin`, which
        differ only in the session maker they build from these options.
        """
        self._refuse_pinned()
        self.__dict__["_unpinned"] = (factory, read_only_engine)
        options = dict(factory.kw)
        info = dict(options.pop("info", None) or {})
        info[_READ_ONLY_BIND] = sync_bind
        options.update(bind=bind, info=info, join_transaction_mode="create_savepoint")
        return options

    def _take_unpinned(self) -> tuple[Any, Any]:
        """The factory and read-only bind saved by :meth:`_pinned_options`, forgotten here."""
        return self.__dict__.pop("_unpinned")  # type: ignore[no-any-return]

    def _read_only_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {_READ_ONLY: True}
        if self.sync_engine.dialect.name == "postgresql":
            opts["postgresql_readonly"] = True
        return opts

    def __repr__(self) -> str:
        url = self.url.render_as_string(hide_password=True)
        return f"{type(self).__name__}({url!r})"


E = TypeVar("E")


def _make_engine(factory: Callable[..., E], url: URL, options: Mapping[str, Any]) -> E:
    try:
        return factory(url, **_engine_options(url, options))
    except ModuleNotFoundError as exc:
        shown = url.render_as_string(hide_password=True)
        msg = (
            f"the database URL {shown!r} needs the driver module {exc.name!r}, which is not "
            "installed; install it, or name an installed driver in the URL, e.g. "
            "postgresql+psycopg://... (pip install \"polydatum[postgresql]\") or "
            "sqlite+aiosqlite://... for AsyncDatabase (pip install \"polydatum[aiosqlite]\")"
        )
        raise ModuleNotFoundError(msg, name=exc.name) from exc


def _check_begin(sqlite_begin: str) -> SqliteBegin:
    if sqlite_begin not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
        msg = f"sqlite_begin must be 'DEFERRED', 'IMMEDIATE' or 'EXCLUSIVE', got {sqlite_begin!r}"
        raise ValueError(msg)
    return sqlite_begin  # type: ignore[return-value]


class Database(_EngineOwner):
    """One database: an Engine (with its pool) shared by the process, and a Session per context.

    Args:
        url: a SQLAlchemy URL, e.g. ``"postgresql+psycopg://app@db/app"`` or
            ``"sqlite:///app.db"``.
        session_options: passed to :class:`~sqlalchemy.orm.sessionmaker`;
            ``expire_on_commit`` defaults to False so objects stay readable
            after their context committed.
        sqlite_begin: how SQLite transactions start. ``"IMMEDIATE"`` (the
            default) takes the write lock at BEGIN, so two writers queue up
            instead of failing with "database is locked" half-way through.
            Read-only sessions always begin DEFERRED.
        **engine_options: passed to :func:`~sqlalchemy.create_engine`.
            ``pool_pre_ping`` defaults to True for server databases; an
            in-memory SQLite database shares one connection (``StaticPool``).

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        url: str | URL,
        *,
        session_options: Mapping[str, Any] | None = None,
        sqlite_begin: SqliteBegin = "IMMEDIATE",
        **engine_options: Any,
    ) -> None:
        parsed = make_url(url)
        begin = _check_begin(sqlite_begin)
        self.engine: Engine = _make_engine(create_engine, parsed, engine_options)
        self._setup(self.engine, begin, engine_options.get("isolation_level") == "AUTOCOMMIT")
        options: dict[str, Any] = {"expire_on_commit": False, "class_": _Session}
        options.update(session_options or {})
        read_only_engine = self.engine.execution_options(**self._read_only_options())
        info = dict(options.pop("info", None) or {})
        info[_READ_ONLY_BIND] = read_only_engine
        #: The session factory; call it for a session outside any context.
        self.session_factory: sessionmaker[Session] = sessionmaker(
            bind=self.engine, info=info, **options
        )
        self._read_only_engine: Engine | Connection = read_only_engine

    def session(self, *, read_only: bool = False) -> Session:
        """A new Session of your own (scripts, migrations); close it when done.

        Args:
            read_only: make it read-only from the start (see :func:`read_only`).
        """
        if read_only:
            return self.session_factory(bind=self._read_only_engine, info={_READ_ONLY: True})
        return self.session_factory()

    def install(
        self,
        data_manager: DataManager,
        name: str = "db",
        *,
        transaction: bool = True,
        read_only: bool = False,
    ) -> Self:
        """Register the session resource ``name`` and its transaction middleware.

        Each context then gets its own Session as ``ctx.<name>``, made on first
        use (a context that never touches it checks out no connection) and
        closed when the context ends, on every path.

        Args:
            data_manager: the DataManager to wire.
            name: the resource name; install several databases under several names.
            transaction: commit when the context ends cleanly and roll back when
                it raises, before the context's ``on_commit``/``on_rollback``
                hooks run. With False, commit yourself; what is left
                uncommitted is rolled back when the session closes.
            read_only: every context's session is read-only (a replica, a
                reporting database): changes are refused and never committed.

        Returns:
            this Database, so ``db = Database(url).install(dm)`` works.
        """
        data_manager.register_resources(**{name: self._resource(read_only)})
        if transaction:
            data_manager.register_context_middleware(transaction_middleware(name))
        return self

    def _resource(self, ro: bool) -> Callable[[DataAccessContext], Iterator[Session]]:
        make = self.session

        def session_resource(ctx: DataAccessContext) -> Iterator[Session]:
            session = make(read_only=ro)
            try:
                yield session
            finally:
                session.close()

        session_resource.database = self  # type: ignore[attr-defined]  # found by polydatum.testing
        return session_resource

    def _pin(self, connection: Connection | None) -> None:
        """Route every new session through ``connection`` (None undoes it).

        Used by :func:`polydatum.testing.transactional_database`: sessions then
        join the connection's open transaction, turning their commits into
        SAVEPOINT releases that the test rolls back at the end.
        """
        if connection is None:
            self.session_factory, self._read_only_engine = self._take_unpinned()
            return
        factory = self.session_factory
        options = self._pinned_options(factory, self._read_only_engine, connection, connection)
        self.session_factory = sessionmaker(class_=factory.class_, **options)
        self._read_only_engine = connection

    def ping(self) -> None:
        """Run ``SELECT 1`` on a pooled connection, for health checks.

        Raises:
            sqlalchemy.exc.DBAPIError: the database cannot be reached.
        """
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        """Close every pooled connection; the next use opens new ones."""
        self.engine.dispose()


def transaction_middleware(name: str) -> Callable[[DataAccessContext], Iterator[None]]:
    """Context middleware committing (or rolling back) the session resource ``name``.

    :meth:`Database.install` registers it; use it directly only to order it
    among other middleware yourself.

    .. versionadded:: 2.0
    """

    def sqlalchemy_transaction(ctx: DataAccessContext) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            if name in ctx:
                _rollback_quietly(getattr(ctx, name), name)
            if isinstance(exc, StaleDataError):
                raise conflict_from(exc) from exc
            raise
        if name in ctx:
            session: Session = getattr(ctx, name)
            if session.info.get(_READ_ONLY):
                session.rollback()
            elif session.in_transaction():
                try:
                    session.commit()
                except StaleDataError as exc:
                    raise conflict_from(exc) from exc
                _acknowledge(name)

    sqlalchemy_transaction.__qualname__ = f"sqlalchemy_transaction[{name}]"
    return sqlalchemy_transaction


def _acknowledge(name: str) -> None:
    log = commit_log.get()
    if log is not None:
        log.append(name)


def _rollback_quietly(session: Session, name: str) -> None:
    # The body's exception is what the caller needs to see; a failing ROLLBACK
    # (the server went away) is logged, and closing the session cleans up.
    try:
        session.rollback()
    except Exception:
        logger.warning("rollback of %r failed", name, exc_info=True,
                       extra={"polydatum_resource": name})


class AsyncDatabase(_EngineOwner):
    """The asyncio twin of :class:`Database`: an AsyncEngine and an AsyncSession per context.

    Get the session with ``await ctx.aget("db")`` inside ``async with dm.context()``.

    Args:
        url: a SQLAlchemy URL with an async driver, e.g.
            ``"postgresql+psycopg://app@db/app"`` or ``"sqlite+aiosqlite:///app.db"``.
        session_options: passed to :class:`~sqlalchemy.ext.asyncio.async_sessionmaker`
            (``expire_on_commit`` defaults to False).
        sqlite_begin: as for :class:`Database`.
        **engine_options: passed to :func:`~sqlalchemy.ext.asyncio.create_async_engine`.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        url: str | URL,
        *,
        session_options: Mapping[str, Any] | None = None,
        sqlite_begin: SqliteBegin = "IMMEDIATE",
        **engine_options: Any,
    ) -> None:
        parsed = make_url(url)
        begin = _check_begin(sqlite_begin)
        self.engine: AsyncEngine = _make_engine(_create_async_engine, parsed, engine_options)
        self._setup(
            self.engine.sync_engine, begin, engine_options.get("isolation_level") == "AUTOCOMMIT"
        )
        options: dict[str, Any] = {"expire_on_commit": False, "sync_session_class": _Session}
        options.update(session_options or {})
        read_only_engine = self.engine.execution_options(**self._read_only_options())
        info = dict(options.pop("info", None) or {})
        info[_READ_ONLY_BIND] = read_only_engine.sync_engine
        #: The session factory; call it for a session outside any context.
        self.session_factory: async_sessionmaker[AsyncSession] = async_sessionmaker(
            bind=self.engine, info=info, **options
        )
        self._read_only_engine: AsyncEngine | AsyncConnection = read_only_engine

    def session(self, *, read_only: bool = False) -> AsyncSession:
        """A new AsyncSession of your own; ``await session.close()`` when done."""
        if read_only:
            return self.session_factory(bind=self._read_only_engine, info={_READ_ONLY: True})
        return self.session_factory()

    def install(
        self,
        data_manager: DataManager,
        name: str = "db",
        *,
        transaction: bool = True,
        read_only: bool = False,
    ) -> Self:
        """Register the async session resource ``name`` and its transaction middleware.

        Same options as :meth:`Database.install`; both are async, so they work
        in ``async with`` contexts only.
        """
        data_manager.register_resources(**{name: self._resource(read_only)})
        if transaction:
            data_manager.register_context_middleware(async_transaction_middleware(name))
        return self

    def _resource(self, ro: bool) -> Callable[[DataAccessContext], AsyncIterator[AsyncSession]]:
        make = self.session

        async def async_session_resource(ctx: DataAccessContext) -> AsyncIterator[AsyncSession]:
            session = make(read_only=ro)
            try:
                yield session
            finally:
                await session.close()

        async_session_resource.database = self  # type: ignore[attr-defined]  # see Database._resource
        return async_session_resource

    def _pin(self, connection: AsyncConnection | None) -> None:
        """Route every new AsyncSession through ``connection`` (None undoes it).

        Used by :func:`polydatum.testing.async_transactional_database`, like
        :meth:`Database._pin`.
        """
        if connection is None:
            self.session_factory, self._read_only_engine = self._take_unpinned()
            return
        factory = self.session_factory
        options = self._pinned_options(
            factory, self._read_only_engine, connection, connection.sync_connection
        )
        self.session_factory = async_sessionmaker(class_=factory.class_, **options)
        self._read_only_engine = connection

    async def aping(self) -> None:
        """Run ``SELECT 1`` on a pooled connection, for health checks.

        Raises:
            sqlalchemy.exc.DBAPIError: the database cannot be reached.
        """
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        """Close every pooled connection; the next use opens new ones."""
        await self.engine.dispose()


def async_transaction_middleware(
    name: str,
) -> Callable[[DataAccessContext], AsyncIterator[None]]:
    """The async twin of :func:`transaction_middleware`, for :class:`AsyncDatabase`.

    .. versionadded:: 2.0
    """

    async def sqlalchemy_async_transaction(ctx: DataAccessContext) -> AsyncIterator[None]:
        try:
            yield
        except BaseException as exc:
            if name in ctx:
                session: AsyncSession = await ctx.aget(name)
                try:
                    await session.rollback()
                except Exception:
                    logger.warning("rollback of %r failed", name, exc_info=True,
                                   extra={"polydatum_resource": name})
            if isinstance(exc, StaleDataError):
                raise conflict_from(exc) from exc
            raise
        if name in ctx:
            session = await ctx.aget(name)
            if session.sync_session.info.get(_READ_ONLY):
                await session.rollback()
            elif session.in_transaction():
                try:
                    await session.commit()
                except StaleDataError as exc:
                    raise conflict_from(exc) from exc
                _acknowledge(name)

    sqlalchemy_async_transaction.__qualname__ = f"sqlalchemy_async_transaction[{name}]"
    return sqlalchemy_async_transaction


class Dataset(Database):
    """A read-only SQLite database shipped with the application (or built in memory for tests).

    The file is opened through SQLite's URI ``mode=ro``: nothing can write to
    it, not even a stray ``PRAGMA``, and pages are read on demand, never the
    whole file at once. Sessions are read-only (:class:`ReadOnlyError` on any
    write) and there is nothing to commit, so :meth:`install` registers only
    the session resource.

    Args:
        path: the SQLite file, or ``":memory:"`` for an in-memory database
            filled by ``populate``.
        populate: for ``":memory:"`` only: called once with a Connection in a
            transaction, to create and fill the tables.
        immutable: also tell SQLite the file never changes (``immutable=1``),
            so it takes no locks; right for a file on read-only media.
        **engine_options: passed to :func:`~sqlalchemy.create_engine`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder.
        TypeError: ``populate`` was given for a file.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        populate: Callable[[Connection], object] | None = None,
        immutable: bool = False,
        **engine_options: Any,
    ) -> None:
        if os.fspath(path) == ":memory:":
            super().__init__("sqlite://", **engine_options)
            if populate is not None:
                with self.engine.begin() as conn:
                    populate(conn)
            self.path: Path | None = None
            return
        if populate is not None:
            msg = "populate= is only for Dataset(':memory:'); a dataset file is never written"
            raise TypeError(msg)
        file = Path(path).resolve()
        if file.is_dir():
            msg = f"dataset path {str(file)!r} is a folder; pass the SQLite file inside it"
            raise IsADirectoryError(msg)
        if not file.is_file():
            msg = f"dataset file {str(file)!r} does not exist; check the path, or ship the file"
            raise FileNotFoundError(msg)
        query = {"mode": "ro", "uri": "true"}
        if immutable:
            query["immutable"] = "1"
        url = URL.create("sqlite", database="file:" + urllib.parse.quote(str(file)), query=query)
        super().__init__(url, **engine_options)
        self.path = file

    def session(self, *, read_only: bool = True) -> Session:
        """A new read-only Session of your own; close it when done.

        Raises:
            ValueError: ``read_only=False``; a dataset is never writable.
        """
        _always_read_only(read_only=read_only, transaction=False)
        return super().session(read_only=True)

    def install(
        self,
        data_manager: DataManager,
        name: str = "dataset",
        *,
        transaction: bool = False,
        read_only: bool = True,
    ) -> Self:
        """Register the read-only session resource ``name`` (no middleware: nothing to commit).

        Raises:
            ValueError: ``read_only=False`` or ``transaction=True``; a dataset
                is never written, so there is nothing to commit.
        """
        _always_read_only(read_only=read_only, transaction=transaction)
        data_manager.register_resources(**{name: self._resource(True)})
        return self


def _always_read_only(*, read_only: bool, transaction: bool) -> None:
    if not read_only or transaction:
        msg = (
            "a Dataset is always read-only and has nothing to commit; drop read_only=False "
            "and transaction=True, or use a Database for data you write"
        )
        raise ValueError(msg)

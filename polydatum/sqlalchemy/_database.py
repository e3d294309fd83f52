"""Engines, per-context sessions and the transaction middleware."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import threading
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import ExitStack, asynccontextmanager, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext, create_engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.pool import NullPool, Pool, StaticPool

from polydatum import _positions
from polydatum._blocking import ElasticThreads, run_blocking
from polydatum._factories import OFFLOAD, Dual
from polydatum._renamed import renamed_keyword
from polydatum.errors import ReadOnlyError
from polydatum.sqlalchemy import _datasets
from polydatum.sqlalchemy._datasets import Source
from polydatum.sqlalchemy._replicas import (
    Node,
    NodeStatus,
    Route,
    Routed,
    Router,
    current_position,
    positions_needed,
    route_options,
    routed_class,
)
from polydatum.sqlalchemy._versioned import conflict_from

if TYPE_CHECKING:
    from typing_extensions import Self

    from polydatum.context import DataAccessContext
    from polydatum.types import ResourceRegistry

logger = logging.getLogger("polydatum.sqlalchemy")

# What ping() reports as False: the database did not answer or refused us.
# Anything else (a bad statement, a closed engine) is a bug and raises.
_UNREACHABLE = (DBAPIError, PoolTimeoutError)

SqliteBegin = Literal["DEFERRED", "IMMEDIATE", "EXCLUSIVE"]

# Keys in Session.info and in connection execution options.
_READ_ONLY = "polydatum_read_only"
_READ_ONLY_BIND = "polydatum_read_only_bind"
_QUERY_ONLY = "polydatum_query_only"
# Set once the transaction middleware has committed or rolled back the context's transaction.
_ENDED = "polydatum_ended"
_SQLITE_READONLY = 8

# Commits acknowledged during one retry() attempt; None outside retry().
commit_log: ContextVar[list[str] | None] = ContextVar("polydatum_sqlalchemy_commits", default=None)


class _Session(Session):
    """A Session that refuses writes when read-only and reports stale rows as conflicts."""

    def use_primary(self) -> None:
        """Send the rest of this session's statements to the primary (see :func:`use_primary`)."""
        use_primary(self)

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
    if isinstance(sync, Routed) and sync.route is not None:
        sync.route.read_only = True


def use_primary(session: Session | AsyncSession) -> None:
    """Send every later statement of ``session`` to the primary, reads included.

    A context reads from a replica until its first write; call this first
    when it must read the newest data (a read that decides a write, say).
    Without replicas it does nothing, so code calling it runs anywhere.
    ``ctx.db.use_primary()`` is the same for a Session.

    .. versionadded:: 2.0
    """
    sync = session.sync_session if isinstance(session, AsyncSession) else session
    if isinstance(sync, Routed) and sync.route is not None and not sync.route.read_only:
        sync.route.primary = True


# Query keys whose value is a credential: "password", "sslpassword", "passwd",
# "pwd", "secret", "token", "api_key", "access_key", "auth_token"...
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|credential|auth", re.IGNORECASE)


def _shown_url(url: URL) -> str:
    """``url`` as text for reprs and messages: its password and secret-looking query values as ``***``."""
    shown = url.set(query={}).render_as_string(hide_password=True)
    if not url.query:
        return shown
    pairs = []
    for key, values in url.query.items():
        for value in (values,) if isinstance(values, str) else values:
            text = "***" if _SECRET_KEY.search(key) else urllib.parse.quote_plus(value)
            pairs.append(f"{urllib.parse.quote_plus(key)}={text}")
    return f"{shown}?{'&'.join(pairs)}"


def _is_memory(url: URL) -> bool:
    name = url.database or ""
    return name in ("", ":memory:") or name.startswith("file::memory:") or (url.query.get("mode") == "memory")


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


# -- datasets: no statement may reach another file --------------------------------

_SQLITE_AUTH = 23  # SQLITE_AUTH: the authorizer denied the statement
_FILE_ACTIONS = frozenset({sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH})


def _dataset_authorizer(
    action: int, arg1: str | None, arg2: str | None, db_name: str | None, source: str | None
) -> int:
    # ATTACH creates the file it names (even under mode=ro or query_only) and
    # stays on the pooled connection; VACUUM INTO is an ATTACH to SQLite.
    if action in _FILE_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() == "load_extension":
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _install_dataset_guard(engine: Engine, label: str) -> None:
    """Refuse, on every pooled connection, the statements that open or write other files."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.set_authorizer(_dataset_authorizer)

    @event.listens_for(engine, "handle_error")
    def _handle_error(context: ExceptionContext) -> BaseException | None:
        orig = context.original_exception
        code = getattr(orig, "sqlite_errorcode", None)
        # A denied function is reported as SQLITE_ERROR, "not authorized to use function".
        if code is None or (code & 0xFF != _SQLITE_AUTH and not str(orig).startswith("not authorized")):
            return None
        msg = (
            f"{label} is read-only and refuses ATTACH, DETACH, VACUUM INTO and load_extension(), "
            "which open or write other files; copy the data you need into a Database instead"
        )
        return ReadOnlyError(msg)


# -- fork safety ---------------------------------------------------------------

_live: weakref.WeakSet[_EngineOwner] = weakref.WeakSet()
_committer_lock = threading.Lock()
# Pools inherited from the parent are kept referenced in the child: if they were
# garbage collected, some drivers would close the parent's sockets on the way.
_inherited_pools: list[Pool] = []


def _after_fork_in_child() -> None:
    for owner in list(_live):
        # The parent's commit threads do not exist here: the child makes its own.
        owner.__dict__.pop("_committer", None)
        engines = [owner.sync_engine]
        if owner.router is not None:
            engines.extend(node.engine for node in owner.router.nodes)
        for engine in engines:
            _inherited_pools.append(engine.pool)
            engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _EngineOwner:
    """What Database and AsyncDatabase share: URL handling, hooks, fork safety, replicas."""

    sync_engine: Engine
    url: URL
    #: The replicas' router; None without replicas.
    router: Router | None = None
    # The resource names this database was installed under (committed_position looks there).
    _names: frozenset[str] = frozenset()

    def committed_position(self, ctx: DataAccessContext) -> str | None:
        """The WAL position at which ``ctx``'s writes to this database are durable.

        Put it in a later context's meta as ``min_position={name: position}``
        (the web and Celery integrations do that for you) and that context
        reads only from replicas that have replayed past it, or from the
        primary.

        Returns:
            a PostgreSQL LSN such as ``"0/16B3748"`` once ``ctx`` committed a
            write through this database's session resource; None when it
            wrote nothing, has not committed yet, or the database has no
            replicas (nothing to wait for).

        .. versionadded:: 2.0
        """
        found: str | None = None
        for name in self._names:
            position = _positions.recorded(ctx, name)
            if position is not None and (found is None or _positions.lsn(position) > _positions.lsn(found)):
                found = position
        return found

    def current_positions(self) -> dict[str, str]:
        """The primary's WAL position now, under each name this database is installed as.

        A reader that waits for this position sees every transaction the
        primary had committed when it was read. A message sent on behalf of
        an earlier commit (the outbox relays one long after the request) can
        carry it as ``min_position`` instead of the commit's own position.

        Returns:
            ``{name: "X/X"}``; empty without replicas (nothing to wait for).

        .. versionadded:: 2.0
        """
        if self.router is None or not self._names:
            return {}
        with self.router.primary.connect() as conn:
            position = current_position(conn)
        return dict.fromkeys(self._names, position)

    def _installed_as(self, name: str) -> None:
        self._names = self._names | {name}

    def _setup(self, engine: Engine, sqlite_begin: SqliteBegin, autocommit: bool) -> None:
        self.sync_engine = engine
        self.url = engine.url
        if engine.dialect.name == "sqlite" and not autocommit:
            _install_sqlite_transactions(engine, sqlite_begin)
        _install_error_mapping(engine, repr(self))
        _live.add(self)

    def count_statements(self, count: Callable[[str], object]) -> Callable[[], None]:
        """Call ``count("sql")`` before every statement this database sends.

        The seam :class:`polydatum.recorder.Recorder` uses to count each
        context's statements (it finds the database through the session
        resource's ``database`` attribute).

        Returns:
            a function that stops the counting.

        .. versionadded:: 2.0
        """

        def before_cursor_execute(*_args: object) -> None:
            count("sql")

        engine = self.sync_engine
        event.listen(engine, "before_cursor_execute", before_cursor_execute)

        def stop() -> None:
            if event.contains(engine, "before_cursor_execute", before_cursor_execute):
                event.remove(engine, "before_cursor_execute", before_cursor_execute)

        return stop

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

    def _primary_status(self) -> NodeStatus:
        return NodeStatus("primary", _shown_url(self.url), "primary", True, "ok")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_shown_url(self.url)!r})"


E = TypeVar("E")


def _make_engine(factory: Callable[..., E], url: URL, options: Mapping[str, Any]) -> E:
    try:
        return factory(url, **_engine_options(url, options))
    except ModuleNotFoundError as exc:
        shown = _shown_url(url)
        msg = (
            f"the database URL {shown!r} needs the driver module {exc.name!r}, which is not "
            "installed; install it, or name an installed driver in the URL, e.g. "
            'postgresql+psycopg://... (pip install "polydatum[postgresql]") or '
            'sqlite+aiosqlite://... for AsyncDatabase (pip install "polydatum[aiosqlite]")'
        )
        raise ModuleNotFoundError(msg, name=exc.name) from exc


def _check_begin(sqlite_begin: str) -> SqliteBegin:
    if sqlite_begin not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
        msg = f"sqlite_begin must be 'DEFERRED', 'IMMEDIATE' or 'EXCLUSIVE', got {sqlite_begin!r}"
        raise ValueError(msg)
    return sqlite_begin  # type: ignore[return-value]


#: Defaults of the replica health settings, in seconds.
DEFAULT_MAX_LAG = 5.0
DEFAULT_CHECK_INTERVAL = 0.5
DEFAULT_RETRY_AFTER = 2.0
#: Threads for the COMMITs of ``async with`` contexts: enough to overlap a few
#: slow ones; more made the ASGI twin benchmark slower (GIL contention).
DEFAULT_COMMIT_THREADS = 4
# More threads start only while those are stuck (a hook waiting on a pool that
# contexts queued behind it hold): the bound of that, not of the usual case.
_MAX_COMMIT_THREADS = 32


def _replica_urls(primary: URL, replicas: Sequence[str | URL]) -> list[URL]:
    if isinstance(replicas, (str, URL)):
        shown = _shown_url(make_url(replicas))
        msg = f"replicas must be a list of URLs, got one URL {shown!r}; wrap it in [...]"
        raise TypeError(msg)
    urls = [make_url(u) for u in replicas]
    for u in urls:
        if u.get_backend_name() != "postgresql" or primary.get_backend_name() != "postgresql":
            msg = (
                f"replicas are PostgreSQL streaming standbys of a PostgreSQL primary; got replica "
                f"{_shown_url(u)!r} for {_shown_url(primary)!r}"
            )
            raise ValueError(msg)
    return urls


def _replica_engine_options(options: Mapping[str, Any]) -> dict[str, Any]:
    opts = dict(options)
    connect_args = dict(opts.get("connect_args", {}))
    # A replica that stopped answering must not hold a request for long: it is skipped.
    connect_args.setdefault("connect_timeout", 2)
    opts["connect_args"] = connect_args
    return opts


def _router(
    primary: Engine, urls: list[URL], engines: list[Any], health: tuple[float, float, float]
) -> Router:
    nodes = []
    for i, (u, engine) in enumerate(zip(urls, engines, strict=True), 1):
        sync_engine = engine if isinstance(engine, Engine) else engine.sync_engine
        _install_error_mapping(sync_engine, f"replica {i} ({_shown_url(u)})")
        nodes.append(Node(f"replica {i}", _shown_url(u), sync_engine))
    max_lag, check_interval, retry_after = health
    return Router(primary, nodes, max_lag=max_lag, check_interval=check_interval, retry_after=retry_after)


def _attach(session: Session, route: Route) -> None:
    """Give ``session`` (of a routed class) its route."""
    if not isinstance(session, Routed):
        msg = f"session_options class_ {type(session).__name__} cannot route reads to replicas"
        raise TypeError(msg)
    session.route = route


def _record_position(ctx: DataAccessContext, name: str, session: Session) -> None:
    """After a commit: remember where the primary's WAL stood, if the session wrote there."""
    route = session.route if isinstance(session, Routed) else None
    if route is None or not route.wrote:
        return
    try:
        with route.router.primary.connect() as conn:
            position = current_position(conn)
    except Exception:
        # The commit is durable; only the position is unknown, so later
        # contexts may read this write late. Their own reads still work.
        logger.warning(
            "could not read the commit position of %r",
            name,
            exc_info=True,
            extra={"polydatum_resource": name},
        )
        return
    _positions.record(ctx, name, position)


def _ask_minimum(session: Session, ctx: DataAccessContext, name: str) -> None:
    """Make ``session`` read only from replicas past the context's ``min_position`` for ``name``."""
    if isinstance(session, Routed) and session.route is not None:
        session.route.minimum = positions_needed(ctx.meta, name)


def _verify_through_sync(
    primary: URL | str, replicas: list[URL | str], health: tuple[float, float, float]
) -> None:
    """Compare the system identifiers of an AsyncDatabase's nodes through the sync driver, if known."""
    if not isinstance(primary, URL) or not all(isinstance(u, URL) for u in replicas):
        return  # no sync driver known: the health checks compare them before first use
    urls = [u for u in replicas if isinstance(u, URL)]
    engines = [create_engine(u, poolclass=NullPool) for u in urls]
    engines.append(create_engine(primary, poolclass=NullPool))
    try:
        _router(engines[-1], urls, engines[:-1], health).verify()
    finally:
        for engine in engines:
            engine.dispose()


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
        replicas: URLs of PostgreSQL streaming replicas of ``url``. Read-only
            contexts, and the reads of a context until its first write, go to
            a fit replica (round robin); see ``docs/scaling.md``.
        max_lag: seconds a replica may be behind before reads skip it.
        check_interval: seconds a replica's health is cached before it is
            checked again.
        retry_after: seconds a replica that failed a connection is skipped.
        commit_threads: the threads that run the COMMITs (and the
            after-commit hooks) of ``async with`` contexts; see
            :func:`threaded_transaction_middleware`. More threads overlap more
            slow COMMITs, and contend more for the GIL; one more starts (up to
            32) only while all of them are stuck with work waiting.
        **engine_options: passed to :func:`~sqlalchemy.create_engine`, for
            the replicas too. ``pool_pre_ping`` defaults to True for server
            databases; an in-memory SQLite database shares one connection
            (``StaticPool``).

    Raises:
        ValueError: a replica is not PostgreSQL, or is a server of another
            cluster (:class:`ReplicaMismatch`, found at start for every
            replica that answers); ``max_lag``, ``check_interval`` or
            ``retry_after`` is 0 or less; ``commit_threads`` is not a whole
            number of 1 or more.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        url: str | URL,
        *,
        session_options: Mapping[str, Any] | None = None,
        sqlite_begin: SqliteBegin = "IMMEDIATE",
        replicas: Sequence[str | URL] = (),
        max_lag: float = DEFAULT_MAX_LAG,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        retry_after: float = DEFAULT_RETRY_AFTER,
        commit_threads: int = DEFAULT_COMMIT_THREADS,
        **engine_options: Any,
    ) -> None:
        if isinstance(commit_threads, bool) or not isinstance(commit_threads, int) or commit_threads < 1:
            msg = f"commit_threads must be a whole number of threads, 1 or more; got {commit_threads!r}"
            raise ValueError(msg)
        self._commit_thread_count = commit_threads
        parsed = make_url(url)
        begin = _check_begin(sqlite_begin)
        health = route_options(max_lag, check_interval, retry_after)
        replica_urls = _replica_urls(parsed, replicas)
        self.engine: Engine = _make_engine(create_engine, parsed, engine_options)
        self._setup(self.engine, begin, engine_options.get("isolation_level") == "AUTOCOMMIT")
        options: dict[str, Any] = {"expire_on_commit": False, "class_": _Session}
        options.update(session_options or {})
        read_only_engine = self.engine.execution_options(**self._read_only_options())
        info = dict(options.pop("info", None) or {})
        info[_READ_ONLY_BIND] = read_only_engine
        if replica_urls:
            options["class_"] = routed_class(options["class_"])
            replica_options = _replica_engine_options(engine_options)
            engines = [_make_engine(create_engine, u, replica_options) for u in replica_urls]
            self.router = _router(self.engine, replica_urls, engines, health)
            try:
                self.router.verify()
            except BaseException:
                self.dispose()
                raise
        #: The session factory; call it for a session outside any context.
        self.session_factory: sessionmaker[Session] = sessionmaker(bind=self.engine, info=info, **options)
        self._read_only_engine: Engine | Connection = read_only_engine

    def session(self, *, read_only: bool = False) -> Session:
        """A new Session of your own (scripts, migrations); close it when done.

        With replicas, it reads from one until it writes (see :func:`use_primary`).

        Args:
            read_only: make it read-only from the start (see :func:`read_only`).
        """
        if read_only:
            session = self.session_factory(bind=self._read_only_engine, info={_READ_ONLY: True})
        else:
            session = self.session_factory()
        router = self.router
        if router is not None and "_unpinned" not in self.__dict__:
            _attach(session, Route(router, self.engine, self._read_only_engine, read_only=read_only))
        return session

    @renamed_keyword("data_manager", "dm")
    def install(
        self,
        dm: ResourceRegistry,
        *,
        name: str = "db",
        transaction: bool = True,
        read_only: bool = False,
    ) -> Self:
        """Register the session resource ``name`` and its transaction middleware.

        Each context then gets its own Session as ``ctx.<name>``, made on first
        use (a context that never touches it checks out no connection) and
        closed when the context ends, on every path.

        Args:
            dm: the DataManager to wire (any :class:`~polydatum.types.ResourceRegistry`).
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
        dm.register_resources(**{name: self._resource(read_only, name)})
        if transaction:
            middleware: Any = transaction_middleware(name)
            if self.engine.dialect.name != "sqlite":
                # ``async with`` contexts (FastAPI's plain def routes) commit off the event loop.
                middleware = Dual(middleware, _threaded_transaction(name, self._commit_threads))
            dm.register_context_middleware(middleware)
        return self

    def _resource(self, ro: bool, name: str) -> Callable[[DataAccessContext], Iterator[Session]]:
        make = self.session
        self._installed_as(name)

        def session_resource(ctx: DataAccessContext) -> Iterator[Session]:
            session = make(read_only=ro)
            _ask_minimum(session, ctx, name)
            _born_ended(session, ctx, name)
            try:
                yield session
            finally:
                _close(session)

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

    @contextmanager
    def pinned(self) -> Iterator[Connection]:
        """Run every session made in the block inside one transaction, rolled back at the end.

        The seam under :func:`polydatum.testing.transactional_database`: one
        connection is checked out and a transaction begun on it; sessions
        join it and their commits become SAVEPOINT releases.

        Yields:
            the connection holding the transaction.

        Raises:
            RuntimeError: the database is pinned already (pins do not nest).

        .. versionadded:: 2.0
        """
        self._refuse_pinned()  # before connecting: a second writer would wait on the first
        with self.engine.connect() as connection:
            outer = connection.begin()
            self._pin(connection)
            try:
                yield connection
            finally:
                self._pin(None)
                if outer.is_active:
                    outer.rollback()

    def ping(self) -> bool:
        """Whether the primary answers ``SELECT 1`` now, for health checks; never raises for an outage.

        Returns:
            True when it answered; False when it could not be reached or
            refused the connection (down, wrong password, pool exhausted).
            Replicas do not count: one that is down degrades reads, it does
            not fail them (see :meth:`health` for each node).

        .. versionchanged:: 2.0
           Returns a bool; the report of each node moved to :meth:`health`.
        """
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except _UNREACHABLE:
            return False
        return True

    def health(self) -> list[NodeStatus]:
        """Run ``SELECT 1`` on the primary, check every replica now, and report each node.

        :meth:`ping` says whether the database answers; this says why not.

        Returns:
            one :class:`NodeStatus` per node, the primary first; a replica
            that is down or lagging is reported (``ok=False``), not raised.

        Raises:
            sqlalchemy.exc.DBAPIError: the primary cannot be reached (its
                message says why).

        .. versionadded:: 2.0
        """
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        router = self.router
        return [self._primary_status(), *(router.report() if router is not None else ())]

    def _commit_threads(self) -> Executor:
        """The threads that run this database's COMMITs (and their hooks) for ``async with`` contexts.

        Its own, not the loop's default executor: a COMMIT holds row locks
        and must not queue behind other blocking work. ``commit_threads``
        of them take the work; more start (up to 32) only while those are
        stuck (:class:`~polydatum._blocking.ElasticThreads`): every thread
        awake contends for the GIL with the app's own (docs/benchmarks.md).
        """
        threads = self.__dict__.get("_committer")
        if threads is None:
            with _committer_lock:
                threads = self.__dict__.get("_committer")
                if threads is None:
                    count = getattr(self, "_commit_thread_count", DEFAULT_COMMIT_THREADS)
                    threads = ElasticThreads(count, _MAX_COMMIT_THREADS, name="polydatum-commit")
                    self.__dict__["_committer"] = threads
        return threads

    def dispose(self) -> None:
        """Close every pooled connection (replicas' too); the next use opens new ones."""
        self.engine.dispose()
        if self.router is not None:
            for node in self.router.nodes:
                node.engine.dispose()


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
            else:
                _ended_unmade(ctx, name)
            if isinstance(exc, StaleDataError):
                raise conflict_from(exc) from exc
            raise
        if name in ctx:
            session: Session = getattr(ctx, name)
            _end_transaction(session, name)
            _record_position(ctx, name, session)
        else:
            _ended_unmade(ctx, name)

    sqlalchemy_transaction.__qualname__ = f"sqlalchemy_transaction[{name}]"
    return sqlalchemy_transaction


def threaded_transaction_middleware(
    name: str, executor: Executor | None = None
) -> Callable[[DataAccessContext], AsyncIterator[None]]:
    """:func:`transaction_middleware` for ``async with`` contexts over a sync Session.

    The COMMIT (or ROLLBACK) runs in a worker thread of ``executor``, so
    the loop serves other requests while the server writes its log; a
    FastAPI app with plain ``def`` routes over a :class:`Database` is the
    case. A cancelled request still waits for the thread: the session is
    never closed while its COMMIT is in flight. :meth:`Database.install`
    registers it as the async form (:class:`~polydatum.resources.Dual`) of
    its middleware, except for SQLite, whose connections may be bound to
    the thread that made them and whose commits do not wait on a network.

    Args:
        name: the session resource.
        executor: the threads that run the COMMITs; the loop's default
            executor if None. :meth:`Database.install` gives the database's
            own, so a COMMIT (holding its row locks) never waits behind
            other blocking work, such as the outbox's deliveries.

    .. versionadded:: 2.0
    """
    return _threaded_transaction(name, lambda: executor)


def _threaded_transaction(
    name: str, threads: Callable[[], Executor | None]
) -> Callable[[DataAccessContext], AsyncIterator[None]]:
    # ``threads`` is asked at each context: a forked child must not reuse its parent's.

    async def sqlalchemy_threaded_transaction(ctx: DataAccessContext) -> AsyncIterator[None]:
        try:
            yield
        except BaseException as exc:
            if name in ctx:
                await run_blocking(_rollback_quietly, getattr(ctx, name), name, executor=threads())
            else:
                _ended_unmade(ctx, name)
            if isinstance(exc, StaleDataError):
                raise conflict_from(exc) from exc
            raise
        if name in ctx:
            session: Session = getattr(ctx, name)
            committer = threads()
            await run_blocking(_end_transaction, session, name, executor=committer)
            if isinstance(session, Routed) and session.route is not None and session.route.wrote:
                await run_blocking(_record_position, ctx, name, session, executor=committer)
        else:
            _ended_unmade(ctx, name)

    sqlalchemy_threaded_transaction.__qualname__ = f"sqlalchemy_threaded_transaction[{name}]"
    # When it is a context's only kind of middleware, the context runs the sync form
    # (transaction_middleware) and its hooks in one trip to these threads instead.
    setattr(sqlalchemy_threaded_transaction, OFFLOAD, threads)
    return sqlalchemy_threaded_transaction


def _end_transaction(session: Session, name: str) -> None:
    """Commit ``session``'s transaction (a read-only session's is rolled back)."""
    if session.info.get(_READ_ONLY):
        session.rollback()
    elif session.in_transaction():
        try:
            session.commit()
        except BaseException as exc:
            # Rolled back now, not at close: the rollback hooks then run on a usable
            # session (a failure record written there is kept, see _close).
            _rollback_quietly(session, name)
            if isinstance(exc, StaleDataError):
                raise conflict_from(exc) from exc
            raise
        _acknowledge(name)
    session.info[_ENDED] = True


def _ended_unmade(ctx: DataAccessContext, name: str) -> None:
    """The middleware ended ``name``'s transaction before the context made the session (see _close)."""
    ctx._ended = ctx._ended | {name}


def _born_ended(session: Session, ctx: DataAccessContext, name: str) -> None:
    """A session first made after its middleware finished (by a hook): its work is its own transaction."""
    if name in ctx._ended:
        session.info[_ENDED] = True


def _worked_after_the_end(session: Session) -> bool:
    """Whether statements ran after the middleware ended the context's transaction.

    A commit or rollback hook, or a resource's teardown, that writes through
    the DAL: its work is a transaction of its own, committed as the session
    closes (closing alone would roll it back, losing it without a word).
    """
    info = session.info
    return bool(info.get(_ENDED)) and session.in_transaction() and not info.get(_READ_ONLY)


def _close(session: Session) -> None:
    """Close a context's session, committing what ran after its transaction ended (see above).

    A failing COMMIT here raises from the resource's teardown: the context
    logs it and collects it in ``ctx.get_resource_exit_errors()``.
    """
    try:
        if _worked_after_the_end(session):
            # Not the unit of work's commit: retry() may still run the unit again.
            token = commit_log.set(None)
            try:
                session.commit()
            finally:
                commit_log.reset(token)
    finally:
        session.close()


async def _aclose(session: AsyncSession) -> None:
    """:func:`_close` for an AsyncSession."""
    try:
        if _worked_after_the_end(session.sync_session):
            token = commit_log.set(None)
            try:
                await session.commit()
            finally:
                commit_log.reset(token)
    finally:
        await session.close()


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
        logger.warning("rollback of %r failed", name, exc_info=True, extra={"polydatum_resource": name})
    else:
        session.info[_ENDED] = True


async def _arollback_quietly(session: AsyncSession, name: str) -> None:
    """:func:`_rollback_quietly` for an AsyncSession."""
    try:
        await session.rollback()
    except Exception:
        logger.warning("rollback of %r failed", name, exc_info=True, extra={"polydatum_resource": name})
    else:
        session.sync_session.info[_ENDED] = True


# The sync driver that reads what an async one wrote: the sync side of an AsyncDatabase.
_SYNC_DRIVERS = {
    "postgresql+asyncpg": "postgresql+psycopg",
    "postgresql+psycopg_async": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",  # psycopg 3 is both
    "sqlite+aiosqlite": "sqlite",
    "mysql+aiomysql": "mysql+pymysql",
    "mysql+asyncmy": "mysql+pymysql",
}


def _derive_sync_url(url: URL) -> URL | str:
    """The URL of the same database through a sync driver, or why there is none."""
    driver = _SYNC_DRIVERS.get(url.drivername)
    if driver is None:
        return f"no sync driver is known for {url.drivername!r}"
    if driver == "sqlite" and _is_memory(url) and url.query.get("cache") != "shared":
        return "a private in-memory SQLite database cannot be opened by a second engine"
    return url.set(drivername=driver)


def _check_sync_url(url: str | URL) -> URL:
    parsed = make_url(url)
    if parsed.get_dialect().is_async:
        msg = (
            f"sync_url={_shown_url(parsed)!r} names an async driver; give the sync driver "
            "sync contexts use, e.g. postgresql+psycopg://... or sqlite:///..."
        )
        raise ValueError(msg)
    return parsed


def _sync_session_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``session_options`` of an AsyncDatabase, as its sync side's ``sessionmaker`` takes them."""
    opts = dict(options)
    opts.pop("class_", None)  # an AsyncSession subclass: the sync side makes plain Sessions
    sync_class = opts.pop("sync_session_class", None)
    if sync_class is not None:
        opts["class_"] = sync_class
    return opts


class _DualSessions(Dual):
    """The session resource of an AsyncDatabase: a Session in ``with``, an AsyncSession in ``async with``."""

    __slots__ = ("database",)  # found by polydatum.testing, as on Database's resource

    database: AsyncDatabase


class AsyncDatabase(_EngineOwner):
    """An AsyncEngine and an AsyncSession per ``async with`` context; a Session per ``with`` context.

    Get the session with ``await ctx.aget("db")`` inside ``async with
    dm.context()``. The same installation serves ``with dm.context()`` too
    (a Celery task, a script beside a FastAPI app): there ``ctx.db`` is a
    plain :class:`~sqlalchemy.orm.Session` of :attr:`sync`, a
    :class:`Database` on the same data made on first sync use, so an app
    that only runs ``async with`` never creates it.

    Args:
        url: a SQLAlchemy URL with an async driver, e.g.
            ``"postgresql+psycopg://app@db/app"`` or ``"sqlite+aiosqlite:///app.db"``.
        session_options: passed to :class:`~sqlalchemy.ext.asyncio.async_sessionmaker`
            (``expire_on_commit`` defaults to False); the sync side gets them
            too, with ``sync_session_class`` as its session class.
        sqlite_begin: as for :class:`Database`.
        sync_url: the URL sync contexts use. By default the same URL with
            the matching sync driver: ``postgresql+asyncpg``,
            ``postgresql+psycopg_async`` and ``postgresql+psycopg`` give
            ``postgresql+psycopg``; ``sqlite+aiosqlite`` gives ``sqlite``;
            ``mysql+aiomysql`` and ``mysql+asyncmy`` give ``mysql+pymysql``.
        sync_engine_options: passed to :func:`~sqlalchemy.create_engine`
            for the sync side; by default the same ``engine_options``.
        **engine_options: passed to :func:`~sqlalchemy.ext.asyncio.create_async_engine`.

    Raises:
        ValueError: ``sync_url`` names an async driver.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        url: str | URL,
        *,
        session_options: Mapping[str, Any] | None = None,
        sqlite_begin: SqliteBegin = "IMMEDIATE",
        sync_url: str | URL | None = None,
        sync_engine_options: Mapping[str, Any] | None = None,
        replicas: Sequence[str | URL] = (),
        max_lag: float = DEFAULT_MAX_LAG,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        retry_after: float = DEFAULT_RETRY_AFTER,
        **engine_options: Any,
    ) -> None:
        parsed = make_url(url)
        begin = _check_begin(sqlite_begin)
        health = route_options(max_lag, check_interval, retry_after)
        replica_urls = _replica_urls(parsed, replicas)
        # The sync side is only described here; see the ``sync`` property.
        self._sync_target: URL | str = (
            _derive_sync_url(parsed) if sync_url is None else _check_sync_url(sync_url)
        )
        sync_options = dict(engine_options if sync_engine_options is None else sync_engine_options)
        sync_options.pop("async_creator", None)
        self._sync_args: dict[str, Any] = {
            "session_options": _sync_session_options(session_options or {}),
            "sqlite_begin": begin,
            **sync_options,
        }
        sync_replicas = [_derive_sync_url(u) for u in replica_urls]
        if replica_urls and all(isinstance(u, URL) for u in sync_replicas):
            max_lag, check_interval, retry_after = health
            self._sync_args.update(
                replicas=sync_replicas,
                max_lag=max_lag,
                check_interval=check_interval,
                retry_after=retry_after,
            )
        self._sync: Database | None = None
        self._sync_lock = threading.Lock()
        # While pinned by async_transactional_database: pins the sync side on its first use.
        self._sync_pin: ExitStack | None = None
        self.engine: AsyncEngine = _make_engine(_create_async_engine, parsed, engine_options)
        self._setup(self.engine.sync_engine, begin, engine_options.get("isolation_level") == "AUTOCOMMIT")
        options: dict[str, Any] = {"expire_on_commit": False, "sync_session_class": _Session}
        options.update(session_options or {})
        read_only_engine = self.engine.execution_options(**self._read_only_options())
        info = dict(options.pop("info", None) or {})
        info[_READ_ONLY_BIND] = read_only_engine.sync_engine
        if replica_urls:
            options["sync_session_class"] = routed_class(options["sync_session_class"])
            replica_options = _replica_engine_options(engine_options)
            engines = [_make_engine(_create_async_engine, u, replica_options) for u in replica_urls]
            self.router = _router(self.engine.sync_engine, replica_urls, engines, health)
            self._replica_engines: list[AsyncEngine] = engines
            # Async engines cannot be used outside the event loop: the
            # identifiers are compared at start through the sync driver.
            _verify_through_sync(self._sync_target, sync_replicas, health)
        #: The session factory; call it for a session outside any context.
        self.session_factory: async_sessionmaker[AsyncSession] = async_sessionmaker(
            bind=self.engine, info=info, **options
        )
        self._read_only_engine: AsyncEngine | AsyncConnection = read_only_engine

    def session(self, *, read_only: bool = False) -> AsyncSession:
        """A new AsyncSession of your own; ``await session.close()`` when done."""
        if read_only:
            session = self.session_factory(bind=self._read_only_engine, info={_READ_ONLY: True})
        else:
            session = self.session_factory()
        router = self.router
        if router is not None and "_unpinned" not in self.__dict__:
            ro_bind = self._read_only_engine
            route = Route(router, self.engine.sync_engine, ro_bind.sync_engine, read_only=read_only)
            _attach(session.sync_session, route)
        return session

    @property
    def sync(self) -> Database:
        """The sync side: a :class:`Database` on the same data, serving ``with`` contexts.

        Made on first use (thread-safe) from ``sync_url`` or the URL with its
        sync driver, the same session options, ``sqlite_begin`` and engine
        options. Use it for sync work of your own too: ``adb.sync.session()``,
        ``adb.sync.engine``, ``await adb.ping()`` checks the async side and ``adb.sync.ping()`` the sync one.

        Raises:
            RuntimeError: no sync driver is known for the URL, or it is a
                private in-memory SQLite database; pass ``sync_url=``.
        """
        side = self._sync
        if side is not None:
            return side
        with self._sync_lock:
            if self._sync is None:
                target = self._sync_target
                if isinstance(target, str):
                    msg = (
                        f"{self!r} cannot serve a sync ('with') context: {target}; pass "
                        "sync_url= with a sync driver (e.g. postgresql+psycopg://... or "
                        "sqlite:///app.db), or enter the context with 'async with'"
                    )
                    raise RuntimeError(msg)
                self._sync = Database(target, **self._sync_args)
            return self._sync

    def _sync_session(self, ro: bool) -> Session:
        side = self.sync
        stack = self._sync_pin
        if stack is not None and "_unpinned" not in side.__dict__:
            self._refuse_two_sqlite_pins()
            stack.enter_context(side.pinned())
        return side.session(read_only=ro)

    def _refuse_pinned(self) -> None:
        super()._refuse_pinned()
        side = self._sync
        if side is not None and "_unpinned" in side.__dict__:
            self._refuse_two_sqlite_pins()

    def _refuse_two_sqlite_pins(self) -> None:
        """Refuse to pin the second side on SQLite, where it would wait for the lock and fail."""
        if self.sync_engine.dialect.name != "sqlite":
            return
        msg = (
            f"the sync and async sides of {self!r} cannot both be pinned to test transactions: "
            "SQLite lets one transaction write at a time and a pinned one holds that lock for "
            "the whole block; pin one side per test (transactional_database(db) for 'with' "
            "contexts, async_transactional_database(db) for 'async with' ones), or test both "
            "sides together on PostgreSQL"
        )
        raise RuntimeError(msg)

    @renamed_keyword("data_manager", "dm")
    def install(
        self,
        dm: ResourceRegistry,
        *,
        name: str = "db",
        transaction: bool = True,
        read_only: bool = False,
    ) -> Self:
        """Register the async session resource ``name`` and its transaction middleware.

        Same options as :meth:`Database.install`. Both have a sync and an
        async form (:class:`~polydatum.resources.Dual`): ``async with``
        contexts get an AsyncSession (``await ctx.aget(name)``), ``with``
        contexts a Session of :attr:`sync` (``ctx.<name>``), committed the
        same way.
        """
        dm.register_resources(**{name: self._resource(read_only, name)})
        if transaction:
            dm.register_context_middleware(
                Dual(transaction_middleware(name), async_transaction_middleware(name))
            )
        return self

    def _resource(self, ro: bool, name: str) -> _DualSessions:
        make = self.session
        make_sync = self._sync_session
        self._installed_as(name)

        async def async_session_resource(ctx: DataAccessContext) -> AsyncIterator[AsyncSession]:
            session = make(read_only=ro)
            _ask_minimum(session.sync_session, ctx, name)
            _born_ended(session.sync_session, ctx, name)
            try:
                yield session
            finally:
                await _aclose(session)

        def session_resource(ctx: DataAccessContext) -> Iterator[Session]:
            session = make_sync(ro)
            _ask_minimum(session, ctx, name)
            _born_ended(session, ctx, name)
            try:
                yield session
            finally:
                _close(session)

        resource = _DualSessions(session_resource, async_session_resource)
        resource.database = self
        return resource

    def _pin(self, connection: AsyncConnection | None) -> None:
        """Route every new AsyncSession through ``connection`` (None undoes it).

        Used by :func:`polydatum.testing.async_transactional_database`, like
        :meth:`Database._pin`. Sessions of the sync side are pinned too, to a
        transaction of their own begun on their first use (an async
        connection cannot serve sync code) and rolled back on unpinning.
        """
        if connection is None:
            stack, self._sync_pin = self._sync_pin, None
            try:
                self.session_factory, self._read_only_engine = self._take_unpinned()
            finally:
                if stack is not None:
                    stack.close()
            return
        factory = self.session_factory
        options = self._pinned_options(
            factory, self._read_only_engine, connection, connection.sync_connection
        )
        self.session_factory = async_sessionmaker(class_=factory.class_, **options)
        self._read_only_engine = connection
        self._sync_pin = ExitStack()

    @contextmanager
    def pinned(self) -> Iterator[Connection]:
        """Pin the sync side (the sessions of ``with`` contexts) to one rolled-back transaction.

        See :meth:`Database.pinned`; :meth:`apinned` pins the ``async with`` side.

        .. versionadded:: 2.0
        """
        if "_unpinned" in self.__dict__:  # the async side is pinned already
            self._refuse_two_sqlite_pins()
        with self.sync.pinned() as connection:
            yield connection

    @asynccontextmanager
    async def apinned(self) -> AsyncIterator[AsyncConnection]:
        """Run every AsyncSession made in the block inside one transaction, rolled back at the end.

        The seam under :func:`polydatum.testing.async_transactional_database`.
        Sessions of the sync side are pinned too, on their first use, to a
        transaction of their own, also rolled back.

        Raises:
            RuntimeError: the database is pinned already (pins do not nest).

        .. versionadded:: 2.0
        """
        self._refuse_pinned()  # before connecting, as in Database.pinned
        async with self.engine.connect() as connection:
            outer = await connection.begin()
            self._pin(connection)
            try:
                yield connection
            finally:
                self._pin(None)
                if outer.is_active:
                    await outer.rollback()

    async def ping(self) -> bool:
        """Whether the primary answers ``SELECT 1`` now (``await adb.ping()``); never raises for an outage.

        The async side only: ``adb.sync.ping()`` asks the sync side's pool.

        Returns:
            True when it answered; False when it could not be reached or
            refused the connection, as :meth:`Database.ping`.

        .. versionchanged:: 2.0
           ``await adb.ping()`` returns a bool; ``aping()`` is gone and the
           report of each node moved to :meth:`health`.
        """
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except _UNREACHABLE:
            return False
        return True

    async def health(self) -> list[NodeStatus]:
        """Run ``SELECT 1`` on a pooled connection (and on :attr:`sync`'s, once made), and report each node.

        Returns:
            one :class:`NodeStatus` per node of the async side, the primary
            first, as :meth:`Database.health` reports them.

        Raises:
            sqlalchemy.exc.DBAPIError: the primary cannot be reached.

        .. versionadded:: 2.0
        """
        router = self.router
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            # The router's checks are sync code on async engines: run them where they may await.
            replicas = await conn.run_sync(lambda _: router.report()) if router is not None else []
        side = self._sync
        if side is not None:
            await asyncio.to_thread(side.health)
        return [self._primary_status(), *replicas]

    async def dispose(self) -> None:
        """Close every pooled connection, of both sides; the next use opens new ones."""
        await self.engine.dispose()
        for engine in self.__dict__.get("_replica_engines", ()):
            await engine.dispose()
        side = self._sync
        if side is not None:
            side.dispose()


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
                await _arollback_quietly(await ctx.aget(name), name)
            else:
                _ended_unmade(ctx, name)
            if isinstance(exc, StaleDataError):
                raise conflict_from(exc) from exc
            raise
        if name not in ctx:
            _ended_unmade(ctx, name)
        else:
            session: AsyncSession = await ctx.aget(name)
            if session.sync_session.info.get(_READ_ONLY):
                await session.rollback()
            elif session.in_transaction():
                try:
                    await session.commit()
                except BaseException as exc:
                    # As _end_transaction: the rollback hooks get a usable session.
                    await _arollback_quietly(session, name)
                    if isinstance(exc, StaleDataError):
                        raise conflict_from(exc) from exc
                    raise
                _acknowledge(name)
            session.sync_session.info[_ENDED] = True
            # Sync code reading the position through the async driver: run where it may await.
            await session.run_sync(lambda sync: _record_position(ctx, name, sync))

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
            _install_dataset_guard(self.engine, "Dataset(':memory:')")
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
        # The file's name only: a message may reach a client, a server path must not.
        _install_dataset_guard(self.engine, f"the dataset {file.name!r}")
        self.path = file

    def session(self, *, read_only: bool = True) -> Session:
        """A new read-only Session of your own; close it when done.

        Raises:
            ValueError: ``read_only=False``; a dataset is never writable.
        """
        _always_read_only(read_only=read_only, transaction=False)
        return super().session(read_only=True)

    @renamed_keyword("data_manager", "dm")
    def install(
        self,
        dm: ResourceRegistry,
        *,
        name: str = "dataset",
        transaction: bool = False,
        read_only: bool = True,
    ) -> Self:
        """Register the read-only session resource ``name`` (no middleware: nothing to commit).

        Raises:
            ValueError: ``read_only=False`` or ``transaction=True``; a dataset
                is never written, so there is nothing to commit.
        """
        _always_read_only(read_only=read_only, transaction=transaction)
        dm.register_resources(**{name: self._resource(True, name)})
        return self

    @staticmethod
    def build(
        path: str | os.PathLike[str],
        models: type | Sequence[type],
        sources: Mapping[Any, Source] | Source,
        *,
        defaults: Mapping[Any, Mapping[str, Any]] | None = None,
        clear: bool = False,
        null: str = "",
        progress: bool | None = None,
        vacuum: bool | None = None,
    ) -> dict[str, int]:
        """Load CSV files, JSON lines files or dicts into the dataset file ``path``.

        The file is built beside ``path`` under a hidden temporary name, then
        indexed, ``ANALYZE``d, ``VACUUM``ed when it has free pages, synced
        and renamed into place: a reader sees the old file or the complete
        new one, never half of one, and a failed build leaves nothing
        behind. When ``path`` exists, the build starts from a copy of it
        (its tables for these models must match them): tables of other
        models are kept and rows are added, so a file can be built one
        model at a time. ``clear=True`` builds it anew instead.

        Every value is converted and checked by its column's type: CSV text
        (``true``/``false``, ISO 8601 dates and times, base64 bytes, JSON
        text for a JSON column, an Enum's stored name) and values of dicts
        alike. A value that is missing (a column absent from the CSV header
        or from a dict) takes ``defaults[Model][column]``, else the column's
        ``default=``, else SQLite's ``server_default``, else NULL. An empty
        value (``null``, the empty cell by default, or None) is NULL in a
        nullable column, the default in a NOT NULL one; a NOT NULL text
        column without a default takes the empty cell as ``""``.

        Args:
            path: the SQLite file to write.
            models: a mapped class, or a list of them; their tables are
                created (loaded parents first, foreign keys checked).
            sources: for one model, its source; for several, a dict
                ``{Model: source}`` (a model without one gets an empty
                table). A source is a ``.csv`` file with a header line, a
                ``.jsonl``/``.ndjson`` file of one object a line, an
                iterable of dicts, or a function returning one.
            defaults: ``{Model: {"column": value or function}}``.
            clear: build the file anew: what ``path`` holds is replaced
                whole, whatever its schema.
            null: the CSV text that stands for NULL (``"\\N"`` to tell it
                from an empty string).
            progress: a progress line on stderr; None: only when stderr is
                a terminal.
            vacuum: True: always ``VACUUM``; None: only when the file has
                free pages (an older file built upon may; a file written
                once from empty has none).

        Returns:
            The rows loaded, per table name.

        Raises:
            DatasetError: a value that does not fit its column (naming the
                file, the line and the column), a source that cannot be
                read, or a file whose schema does not match the models.

        .. versionadded:: 2.0
        """
        return _datasets.build(
            path, models, sources, defaults=defaults, clear=clear, null=null, progress=progress, vacuum=vacuum
        )

    @staticmethod
    def dump(
        path: str | os.PathLike[str],
        model: type,
        out: str | os.PathLike[str] | IO[str],
        *,
        null: str = "",
    ) -> int:
        """Write the table of ``model`` in the dataset file ``path`` to CSV, in the form build reads.

        Rows are ordered by primary key; NULL is written as ``null``; a file
        ``out`` is replaced whole, never left half-written. Build from the
        CSV again and the table is the same.

        Returns:
            The number of rows written.

        Raises:
            DatasetError: the file does not exist or cannot be read, or a
                value reads as the null marker (pass another ``null``).

        .. versionadded:: 2.0
        """
        return _datasets.dump(path, model, out, null=null)

    @staticmethod
    def check(path: str | os.PathLike[str], models: type | Sequence[type]) -> str:
        """Compare the dataset file's schema with the models'; "" when they match.

        Columns (type, NOT NULL, default, primary key), indexes, unique
        constraints and foreign keys are compared, and tables of the file
        that no model describes are listed. ``python -m polydatum.sqlalchemy
        check-dataset`` runs this for a :class:`DatasetSpec`.

        Returns:
            A unified diff from the models to the file, or "".

        Raises:
            DatasetError: the file does not exist or is not SQLite.

        .. versionadded:: 2.0
        """
        return _datasets.check(path, models)


def _always_read_only(*, read_only: bool, transaction: bool) -> None:
    if not read_only or transaction:
        msg = (
            "a Dataset is always read-only and has nothing to commit; drop read_only=False "
            "and transaction=True, or use a Database for data you write"
        )
        raise ValueError(msg)

"""Wiring: one DataManager with SQL, a cache, blobs, jobs, the services and the auth middleware.

:func:`build` makes the whole application from :class:`~notes.config.Settings`;
each integration is installed the same way (``thing.install(dm, name=...)``)
and only this module knows which implementation was configured. Services
only ever see ``ctx.db``, ``ctx.cache``, ``ctx.blobs`` and ``ctx.jobs``.

What happens after a commit (the index job, cache invalidations, attachment
deletes) goes through a transactional outbox: each is a row written in the
request's own transaction, delivered right after the commit, or by the relay
thread of ``notes serve`` if Redis, the storage or the broker was down.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from celery import Celery
from sqlalchemy.exc import SQLAlchemyError

from polydatum import DataManager
from polydatum.blob import BlobError, BlobStore, FileSystemBlobStore
from polydatum.cache import Cache, MemoryBackend
from polydatum.outbox import Outbox
from polydatum.resources import ValueResource
from polydatum.sqlalchemy import Database, NodeStatus

from notes.auth import AuthMiddleware
from notes.config import ConfigError, Settings
from notes.jobs import make_celery
from notes.services import Notebooks, Notes, Users

logger = logging.getLogger("notes")


@dataclass
class NotesApp:
    """The built application: its DataManager and the parts installed in it."""

    settings: Settings
    dm: DataManager
    db: Database
    cache: Cache
    blobs: BlobStore
    celery: Celery
    tasks: SimpleNamespace
    redis: Any = None
    _closers: list[Callable[[], object]] = field(default_factory=list)
    outbox: Outbox | None = None

    def wsgi(self, *, debug: bool = False) -> Any:
        """The WSGI application (each request in a context of ``dm``).

        Args:
            debug: also record every context and serve the live page of the
                recent ones at ``/_polydatum``. Off by default: the page shows
                service paths, timings and request ids to anyone who can
                reach it, without authentication.
        """
        from notes.web import make_wsgi_app

        app = make_wsgi_app(self)
        if not debug:
            return app
        from polydatum.debug import DebugPage
        from polydatum.recorder import Recorder

        # Installed last, so it counts the SQL of the database installed before it.
        recorder = Recorder(limit=200).install(self.dm)
        self._closers.append(recorder.uninstall)
        return DebugPage(recorder, app)  # outside the contexts: the page is not recorded itself

    def asgi(self) -> Any:
        """The JSON API as an ASGI application (FastAPI; see :mod:`notes.asgi`)."""
        from notes.asgi import make_asgi_app

        return make_asgi_app(self)

    def health(self) -> dict[str, dict[str, Any]]:
        """Ping every configured part; never raises.

        Returns:
            ``{part: {"ok": bool, "using": description, "ms": latency, "error": ...}}``.
        """
        using = self.settings.describe()
        report: dict[str, dict[str, Any]] = {}
        for part, ping in (
            ("database", self._ping_database),
            ("cache", self._ping_cache),
            ("blobs", self._ping_blobs),
            ("jobs", self._ping_jobs),
        ):
            start = time.perf_counter()
            try:
                nodes = ping()
            except ConfigError as exc:
                report[part] = {"ok": False, "using": using[part], "error": str(exc)}
                continue
            report[part] = {
                "ok": True,
                "using": using[part],
                "ms": round((time.perf_counter() - start) * 1000, 1),
            }
            if nodes:
                # With replicas: each node's state. A replica down degrades reads, never fails them.
                report[part]["nodes"] = [
                    {"name": n.name, "ok": n.ok, "detail": n.detail, "lag": n.lag} for n in nodes
                ]
        return report

    def check(self) -> None:
        """Ping every part and raise the first failure.

        Raises:
            ConfigError: one line saying which part failed and what to fix.
        """
        for part in self.health().values():
            if not part["ok"]:
                raise ConfigError(part["error"])

    def create_tables(self) -> None:
        """Bring the schema to the newest migration (Alembic, :mod:`notes.migrate`).

        Raises:
            ConfigError: the database cannot be reached or refused a statement.
        """
        from notes.migrate import upgrade

        upgrade(self)

    def close(self) -> None:
        """Release pools and connections (tests build many apps in one process)."""
        for close in reversed(self._closers):
            try:
                close()
            except Exception:  # closing is best effort
                logger.warning("closing %r failed", close, exc_info=True)
        self._closers.clear()

    # -- pings -------------------------------------------------------------

    def _ping_database(self) -> list[NodeStatus] | None:
        """Ping the primary; with replicas, return each node's state."""
        try:
            nodes = self.db.health()  # not ping(): the report says why, and names each node
        except SQLAlchemyError as exc:
            msg = (
                f"cannot use the database at {self.settings.describe()['database']}: {_first_line(exc)}; "
                "start it or fix DATABASE_URL"
            )
            raise ConfigError(msg) from None
        return nodes if len(nodes) > 1 else None

    def _ping_cache(self) -> None:
        if not self.cache.ping():
            msg = (
                f"cannot reach Redis at {self.settings.describe()['cache']}; start it or fix REDIS_URL "
                "(unset REDIS_URL for the in-process cache)"
            )
            raise ConfigError(msg)

    def _ping_blobs(self) -> None:
        try:
            self.blobs.check()  # not ping(): the error says what to fix
        except BlobError as exc:
            msg = f"BLOB_URL={self.settings.blob_url}: {_first_line(exc)}; fix BLOB_URL or the storage"
            raise ConfigError(msg) from None

    def _ping_jobs(self) -> None:
        if self.settings.celery_broker_url is None:
            return  # eager mode: jobs run in-process
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5, timeout=3)
        except Exception as exc:
            broker = self.settings.describe()["jobs"].removeprefix("celery via ")
            msg = (
                f"cannot reach the Celery broker at {broker}: {_first_line(exc)}; "
                "start it or fix CELERY_BROKER_URL (unset it to run jobs in-process)"
            )
            raise ConfigError(msg) from None


def build(settings: Settings) -> NotesApp:
    """Make the application from ``settings``; nothing is contacted yet (see :meth:`NotesApp.check`).

    Raises:
        ConfigError: a setting cannot be used (a missing database driver, a bad Redis URL…).
    """
    dm = DataManager()
    closers: list[Callable[[], object]] = []

    db = _database(settings)
    db.install(dm, name="db")  # ctx.db: a Session per context, committed by middleware
    closers.append(db.dispose)
    # Effects that must survive a crash or an outage: rows of the request's transaction.
    outbox = Outbox(db).install(dm, name="outbox")
    closers.append(outbox.flush)  # closed in reverse: its last deletes before the pool goes

    redis = None
    if settings.redis_url is not None:
        from polydatum.redis import Redis

        try:
            redis = Redis(settings.redis_url)
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL={settings.redis_url!r} is not usable: {exc}; fix it") from None
        closers.append(redis.close)
    try:
        if redis is None:
            cache = Cache(MemoryBackend(), namespace=settings.cache_namespace, outbox=outbox)
        else:
            cache = redis.cache(namespace=settings.cache_namespace, outbox=outbox)
    except ValueError as exc:
        raise ConfigError(f"CACHE_NAMESPACE is not usable: {exc}") from None
    cache.install(dm, name="cache")  # ctx.cache: invalidations wait for the commit

    blobs = _blob_store(settings)
    # ctx.blobs: puts undone on rollback (or by the relay), deletes after the commit
    blobs.install(dm, name="blobs", outbox=outbox)

    celery, tasks = make_celery(settings, dm, outbox)
    closers.append(celery.close)
    dm.register_resources(jobs=ValueResource(tasks))  # ctx.jobs.index_note.delay(...)

    dm.register_services(users=Users(settings.secret_key), notebooks=Notebooks(), notes=Notes())
    dm.register_method_middleware(AuthMiddleware())  # around every DAL call
    return NotesApp(settings, dm, db, cache, blobs, celery, tasks, redis, closers, outbox)


def _database(settings: Settings) -> Database:
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        folder = Path(url.database).parent
        _ignore_in_git(settings, folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"cannot create {str(folder)!r} for the SQLite database: {exc.strerror}; fix DATABASE_URL"
            raise ConfigError(msg) from None
    try:
        return Database(url, replicas=list(settings.database_replicas))
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        what = "DATABASE_URL or DATABASE_REPLICAS" if settings.database_replicas else "DATABASE_URL"
        msg = f"{what} cannot be used: {_first_line(exc)}; install its driver or fix the URL"
        raise ConfigError(msg) from None


def _blob_store(settings: Settings) -> BlobStore:
    parts = urllib.parse.urlsplit(settings.blob_url)
    if parts.scheme == "file":
        root = urllib.parse.unquote(parts.path)
        _ignore_in_git(settings, Path(root))
        return FileSystemBlobStore(root)
    from polydatum.s3 import S3BlobStore

    options: dict[str, Any] = {}
    if settings.aws_endpoint_url:
        options["endpoint_url"] = settings.aws_endpoint_url
    # Fail fast at start-up and in /health rather than retrying for half a minute.
    return S3BlobStore(
        parts.netloc, prefix=parts.path.strip("/"), connect_timeout=3, max_attempts=2, **options
    )


def _ignore_in_git(settings: Settings, path: Path) -> None:
    """Keep the embedded defaults' data out of version control, as virtualenvs do."""
    data = settings.data_dir
    if not path.resolve().is_relative_to(data):
        return
    try:
        data.mkdir(parents=True, exist_ok=True)
        marker = data / ".gitignore"
        if not marker.exists():
            marker.write_text("# made by polydatum-notes: local data, never committed\n*\n")
    except OSError:
        pass  # the part that needs the folder reports the problem with its own message


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def data_manager() -> DataManager:
    """The DataManager of the application the environment configures; nothing is contacted.

    For tools that take one: ``polydatum inspect "notes.app:data_manager()"``.
    """
    return build(Settings.from_env()).dm

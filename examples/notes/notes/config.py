"""Settings from environment variables, checked before anything starts.

Every variable is optional; without any of them the app runs on embedded
parts only (a SQLite file and a blob directory under ``NOTES_DATA``, an
in-process cache, Celery in eager mode):

==================== ====================================================
``NOTES_DATA``       directory for the embedded defaults (``./notes-data``)
``DATABASE_URL``     SQLAlchemy URL; ``postgresql://`` means psycopg 3
``DATABASE_REPLICAS`` comma-separated URLs of PostgreSQL read replicas
``REDIS_URL``        ``redis://host:6379/0``: the cache lives in Redis
``CACHE_NAMESPACE``  prefix of every cache key (``notes``)
``BLOB_URL``         ``file:///path`` or ``s3://bucket/prefix``
``AWS_ENDPOINT_URL`` S3 endpoint (MinIO, moto); credentials as for boto3
``CELERY_BROKER_URL`` e.g. ``amqp://guest:guest@localhost//``: a real worker
``CELERY_QUEUE``     the queue the jobs go to (``notes``)
``SECRET_KEY``       signs the API tokens (a fixed development key if unset)
==================== ====================================================

A value that cannot work raises :class:`ConfigError` with one line naming
the variable and what to do; :mod:`notes.cli` prints it and exits.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEV_SECRET = "polydatum-notes-development-key"


class ConfigError(Exception):
    """A setting is wrong or a configured server cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Settings:
    """What the application is built from (see the module documentation)."""

    data_dir: Path
    database_url: str
    blob_url: str
    database_replicas: tuple[str, ...] = ()
    redis_url: str | None = None
    cache_namespace: str = "notes"
    aws_endpoint_url: str | None = None
    celery_broker_url: str | None = None
    celery_queue: str = "notes"
    secret_key: str = DEV_SECRET

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``environ`` (default: ``os.environ``).

        Raises:
            ConfigError: a value is malformed (servers are checked later, by ``connect``).
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        data_dir = Path(get("NOTES_DATA") or "notes-data").expanduser().resolve()
        database_url = normalise_database_url(get("DATABASE_URL") or f"sqlite:///{data_dir / 'notes.db'}")
        replicas = tuple(
            normalise_database_url(u.strip())
            for u in (get("DATABASE_REPLICAS") or "").split(",")
            if u.strip()
        )
        blob_url = get("BLOB_URL") or (data_dir / "blobs").as_uri()
        check_blob_url(blob_url)
        redis_url = get("REDIS_URL")
        if redis_url is not None:
            scheme = urllib.parse.urlsplit(redis_url).scheme
            if scheme not in ("redis", "rediss", "unix"):
                msg = (
                    f"REDIS_URL={redis_url!r} is not a Redis URL; use redis://host:6379/0 "
                    "(or unset REDIS_URL for the in-process cache)"
                )
                raise ConfigError(msg)
        broker = get("CELERY_BROKER_URL")
        if broker is not None and "://" not in broker:
            msg = (
                f"CELERY_BROKER_URL={broker!r} is not a broker URL; use e.g. "
                "amqp://guest:guest@localhost:5672// (or unset it to run jobs in-process)"
            )
            raise ConfigError(msg)
        return cls(
            data_dir=data_dir,
            database_url=database_url,
            database_replicas=replicas,
            blob_url=blob_url,
            redis_url=redis_url,
            cache_namespace=get("CACHE_NAMESPACE") or "notes",
            aws_endpoint_url=get("AWS_ENDPOINT_URL"),
            celery_broker_url=broker,
            celery_queue=get("CELERY_QUEUE") or "notes",
            secret_key=get("SECRET_KEY") or DEV_SECRET,
        )

    def describe(self) -> dict[str, str]:
        """What each part runs on, passwords hidden (for ``check`` and ``/health``)."""
        return {
            "database": _hide_password(self.database_url),
            "cache": _hide_password(self.redis_url) if self.redis_url else "in-process memory",
            "blobs": self.blob_url,
            "jobs": (
                f"celery via {_hide_password(self.celery_broker_url)}"
                if self.celery_broker_url
                else "celery, eager (in-process)"
            ),
        }


def normalise_database_url(url: str) -> str:
    """Accept the ``postgres://``/``postgresql://`` URLs hosting platforms give, meaning psycopg 3.

    Raises:
        ConfigError: the URL is not a SQLAlchemy URL, or names an unknown database.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        msg = (
            f"DATABASE_URL={url!r} is not a database URL; use e.g. sqlite:///notes.db or "
            "postgresql://user:password@host:5432/notes"
        )
        raise ConfigError(msg) from None
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        msg = (
            f"DATABASE_URL uses {backend!r}, which this example does not support; "
            "use sqlite:///notes.db or postgresql://user:password@host:5432/notes"
        )
        raise ConfigError(msg)
    return parsed.render_as_string(hide_password=False)


def check_blob_url(url: str) -> None:
    """Refuse a BLOB_URL that is neither ``file:///path`` nor ``s3://bucket[/prefix]``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            msg = f"BLOB_URL={url!r} needs an absolute path: file:///var/lib/notes/blobs"
            raise ConfigError(msg)
        return
    if parts.scheme == "s3":
        if not parts.netloc:
            msg = f"BLOB_URL={url!r} names no bucket; use s3://bucket or s3://bucket/prefix"
            raise ConfigError(msg)
        return
    msg = f"BLOB_URL={url!r} is not supported; use file:///absolute/path or s3://bucket/prefix"
    raise ConfigError(msg)


def _hide_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

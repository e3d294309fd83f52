"""Helpers shared by the WSGI and ASGI middleware tests."""

from __future__ import annotations

import importlib
import os
import pkgutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm.exc import StaleDataError

import polydatum
from polydatum import Service
from polydatum.blob import BlobError, FileSystemBlobStore
from polydatum.errors import DalMethodError, EffectDeferred, ErrorsOnClose, PolydatumException, ServiceError
from polydatum.sqlalchemy._versioned import conflict_from
from polydatum.sync import ApplyError, FingerprintError, UnsortedInput
from polydatum.werkzeug import request_context
from tests.support.sql import Item


class Probe(Service):
    """Tells which request's context it runs in: its request id and user."""

    def who(self) -> tuple[Any, Any]:
        meta = self._ctx.meta
        return meta.request_id, meta.user


def record_outcome(events: list[tuple[str, str]], name: str) -> None:
    """Append ``("commit", name)`` or ``("rollback", name)`` when the request's context ends."""
    ctx = request_context()
    ctx.on_commit(events.append, ("commit", name))
    ctx.on_rollback(events.append, ("rollback", name))


class Handle:
    """What the tracking resource yields: readable only while its context is open."""

    def __init__(self, tracker: Tracker, meta: Any) -> None:
        self.tracker = tracker
        self.meta = meta
        self.closed = False
        self.reads = 0

    def read(self, value: Any) -> Any:
        if self.closed:
            msg = "read from a closed resource: the context ended too early"
            raise RuntimeError(msg)
        self.reads += 1
        return value


class Tracker:
    """A resource factory counting opens and closes (thread-safe), for leak checks."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.opened = 0
        self.closed = 0
        self.open_now = 0
        self.max_open = 0
        self.handles: list[Handle] = []

    def __call__(self, ctx: Any) -> Iterator[Handle]:
        handle = Handle(self, ctx.meta)
        with self.cond:
            self.opened += 1
            self.open_now += 1
            self.max_open = max(self.max_open, self.open_now)
            self.handles.append(handle)
        try:
            yield handle
        finally:
            handle.closed = True
            with self.cond:
                self.closed += 1
                self.open_now -= 1
                self.cond.notify_all()

    def wait_closed(self, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` handles were closed; fail after ``timeout`` seconds."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.closed >= count, timeout):
                msg = f"{self.closed} of {count} resources closed after {timeout}s: a context leaked"
                raise AssertionError(msg)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout}s: {what}")
        time.sleep(0.01)


def item_names(engine: Engine) -> set[str]:
    """The names of the rows in ``items``, read on a connection of its own."""
    with engine.connect() as conn:
        return set(conn.execute(select(Item.name)).scalars())


# -- errors that carry server details in their message --------------------------------

#: What no error body may show: a server path, a bucket, a host, a URL, a table, a key.
SECRETS = (
    "secret-root",
    "secret-bucket",
    "minio.internal",
    "127.0.0.1",
    "https://",
    "secret_table",
    "notes/1/a",
)

DETAILS = (
    "could not write blob 'notes/1/a' under '/srv/secret-root' in bucket 'secret-bucket' "
    "at https://minio.internal:9000: Not a directory"
)


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def every_polydatum_error() -> list[BaseException]:
    """One error of every PolydatumException subclass polydatum defines, with server details in its message.

    Each is built as polydatum's own code builds it: a blob error with a key,
    a conflict from SQLAlchemy's StaleDataError (whose text names the table),
    the classes users raise themselves with ``public_message``, the way
    polydatum raises them when its message holds details.
    """
    for module in pkgutil.walk_packages(polydatum.__path__, "polydatum."):
        if module.name.endswith(".__main__"):
            continue  # a program's entry point, not a library module
        importlib.import_module(module.name)  # every module's error classes, optional extras included
    stale = StaleDataError("UPDATE statement on table 'secret_table' expected to update 1 row(s); 0 matched")
    errors: list[BaseException] = []
    for cls in sorted(set(_subclasses(PolydatumException)), key=lambda c: (c.__module__, c.__qualname__)):
        if not cls.__module__.startswith("polydatum."):
            continue  # a test's own subclass
        if issubclass(cls, BlobError):
            errors.append(cls(DETAILS, key="notes/1/a"))
        elif cls.__name__ == "ConcurrencyConflict":
            errors.append(conflict_from(stale))
        elif issubclass(cls, ServiceError) and cls.__module__ == "polydatum.errors":
            errors.append(cls(DETAILS, public_message="the service could not do that"))
        elif cls is DalMethodError:
            errors.append(DalMethodError(message=DETAILS))
        elif cls is ErrorsOnClose:
            errors.append(ErrorsOnClose(DETAILS, [OSError(DETAILS)]))
        elif cls is EffectDeferred:
            errors.append(EffectDeferred(DETAILS, retry_after=1.0))
        elif issubclass(cls, (UnsortedInput, FingerprintError)):
            errors.append(cls(DETAILS, side="source", key="k"))
        elif cls is ApplyError:
            errors.append(ApplyError(DETAILS, key="k", kind="new"))
        else:
            errors.append(cls(DETAILS))
    return errors


def real_blob_errors(tmp: Path) -> list[BaseException]:
    """Blob errors raised by real stores: a filesystem root that cannot be written, an S3 endpoint down."""
    from polydatum.s3 import S3BlobStore

    errors: list[BaseException] = []
    root = tmp / "secret-root"
    store = FileSystemBlobStore(root)
    os.makedirs(root)
    (root / ".polydatum").write_bytes(b"")  # where the store keeps its temporary files
    for operation in (
        lambda: store.put("notes/1/a", b"x"),
        store.check,
        lambda: store.get("notes/1/a"),
        lambda: store.url("notes/1/a", expires=60),
    ):
        try:
            operation()
        except BlobError as exc:
            errors.append(exc)
    with socket.socket() as sock:  # a port nothing listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s3 = S3BlobStore(
        "secret-bucket",
        endpoint_url=f"http://127.0.0.1:{port}",
        max_attempts=1,
        connect_timeout=1,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    for operation in (lambda: s3.get("notes/1/a"), s3.check):
        try:
            operation()
        except BlobError as exc:
            errors.append(exc)
    if len(errors) != 6 or not all(f"127.0.0.1:{port}" in str(e) for e in errors[4:]):
        msg = f"the stores did not fail as this helper expects: {errors!r}"
        raise AssertionError(msg)
    return errors


def leaked(body: str) -> list[str]:
    """The SECRETS that show in ``body``."""
    return [secret for secret in SECRETS if secret in body]

"""SQL through SQLAlchemy 2: a session per context, committed by middleware.

One :class:`Database` per database and process holds the Engine and its
pool. ``install`` registers a session resource and a transaction
middleware: each context gets its own Session on first use, committed when
the context ends cleanly and rolled back when it raises, before the
context's ``on_commit``/``on_rollback`` hooks run. :class:`Store` is a
ready-made service for one mapped class::

    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
    from polydatum import DataManager
    from polydatum.sqlalchemy import Database, Store, Versioned

    class Base(DeclarativeBase):
        pass

    class Note(Versioned, Base):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        text: Mapped[str]

    class Notes(Store[Note]):
        pass

    db = Database("sqlite://")
    Base.metadata.create_all(db.engine)
    dm = DataManager()
    db.install(dm, name="db")
    dm.register_services(notes=Notes())

    with dm.dal() as dal:
        note = dal.notes.create(text="hello")       # committed when the block ends
    with dm.dal() as dal:
        assert dal.notes.require(note.id).text == "hello"
        page = dal.notes.search({"text__startswith": "he"}, order_by="-id", limit=20)

Also here: :class:`AsyncDatabase` and :class:`AsyncStore` for asyncio (an
AsyncDatabase serves ``with`` contexts too, through a sync engine on the same
data, so one DataManager serves a FastAPI app and its Celery workers),
:class:`Dataset` for read-only SQLite files (built from CSV or JSON lines
by :meth:`Dataset.build`, or ``python -m polydatum.sqlalchemy build-dataset``), :func:`read_only` for one
context, read replicas (``Database(url, replicas=[...])``, :func:`use_primary`,
``docs/scaling.md``), :class:`Versioned` for optimistic concurrency
(:class:`~polydatum.errors.ConcurrencyConflict`), and :func:`retry` for
serialization failures. The guide is ``docs/integrations/sqlalchemy.md``.

.. versionadded:: 2.0
"""

from __future__ import annotations

try:
    import sqlalchemy
except ImportError:  # pragma: no cover - exercised only without the extra
    msg = 'polydatum.sqlalchemy needs SQLAlchemy 2; install it with: pip install "polydatum[sqlalchemy]"'
    raise ImportError(msg) from None

if not sqlalchemy.__version__.startswith("2."):  # pragma: no cover
    msg = (
        f"polydatum.sqlalchemy needs SQLAlchemy 2, found {sqlalchemy.__version__}; "
        'upgrade it with: pip install -U "polydatum[sqlalchemy]"'
    )
    raise ImportError(msg)

from polydatum.errors import DatasetError, ReadOnlyError, ReplicaMismatch
from polydatum.sqlalchemy._database import (
    AsyncDatabase,
    Database,
    Dataset,
    async_transaction_middleware,
    read_only,
    threaded_transaction_middleware,
    transaction_middleware,
    use_primary,
)
from polydatum.sqlalchemy._datasets import DatasetSpec
from polydatum.sqlalchemy._replicas import NodeStatus
from polydatum.sqlalchemy._retry import aretry, is_transient, retry
from polydatum.sqlalchemy._store import AsyncStore, Page, Store
from polydatum.sqlalchemy._versioned import Versioned

__all__ = [
    "AsyncDatabase",
    "AsyncStore",
    "Database",
    "Dataset",
    "DatasetError",
    "DatasetSpec",
    "NodeStatus",
    "Page",
    "ReadOnlyError",
    "ReplicaMismatch",
    "Store",
    "Versioned",
    "aretry",
    "async_transaction_middleware",
    "is_transient",
    "read_only",
    "retry",
    "threaded_transaction_middleware",
    "transaction_middleware",
    "use_primary",
]

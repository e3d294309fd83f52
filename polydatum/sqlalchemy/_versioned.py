"""Optimistic concurrency: the ``Versioned`` mixin and the StaleDataError mapping."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Integer
from sqlalchemy.orm import Mapped, declared_attr, mapped_column
from sqlalchemy.orm.exc import StaleDataError

from polydatum.errors import ConcurrencyConflict


class Versioned:
    """Mixin for a mapped class: adds a ``version`` column checked on every UPDATE and DELETE.

    SQLAlchemy's ``version_id_col`` does the work: each UPDATE or DELETE says
    ``WHERE id = :id AND version = :seen`` and bumps the version; when another
    unit of work changed the row first, no row matches and the write fails.
    polydatum turns that failure into :class:`~polydatum.errors.ConcurrencyConflict`
    (HTTP 409) and the context rolls back, so nothing is half-written::

        class Note(Versioned, Base):
            __tablename__ = "notes"
            id: Mapped[int] = mapped_column(primary_key=True)
            text: Mapped[str]

    A class that needs its own ``__mapper_args__`` must repeat
    ``"version_id_col": __table__.c.version`` in them, since they replace the mixin's.

    ``Store.create`` and ``Store.update`` refuse to write ``version`` (setting
    it back would let a stale ``expected_version`` pass) unless the call says
    ``allow_protected={"version"}``; ``expected_version`` must be an int.

    .. versionadded:: 2.0
    """

    version: Mapped[int] = mapped_column(Integer, nullable=False)

    @declared_attr.directive
    def __mapper_args__(cls) -> dict[str, Any]:
        # __table__ exists by now: declarative builds the table before the mapper.
        table: Any = getattr(cls, "__table__")  # noqa: B009 - not declared on the mixin
        return {"version_id_col": table.c.version}


def conflict_from(exc: StaleDataError) -> ConcurrencyConflict:
    """The ConcurrencyConflict to raise in place of SQLAlchemy's StaleDataError."""
    msg = (
        f"a row was changed or deleted by another unit of work since it was read ({exc}); "
        "reload it and apply the change again"
    )
    # SQLAlchemy's text names the table: the log gets it, the client does not.
    public = "the record was changed by someone else since it was read; reload it and try again"
    return ConcurrencyConflict(msg, public_message=public)

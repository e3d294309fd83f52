"""The example's tables, declared again without polydatum (same names, columns and keys).

``notes.version`` is SQLAlchemy's own ``version_id_col``: an UPDATE or DELETE
of a note says ``WHERE version = <the version read>``, as the example's
``Versioned`` mixin does. The outbox table is the one polydatum's outbox
uses, so rows either app leaves behind look the same to its relay.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of the twin's tables."""


class User(Base):
    """Someone who owns notebooks."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Notebook(Base):
    """A named collection of notes."""

    __tablename__ = "notebooks"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))


class Note(Base):
    """A note; ``version`` is checked by every UPDATE and DELETE."""

    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    notebook_id: Mapped[int] = mapped_column(ForeignKey("notebooks.id"), index=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer, nullable=False)

    __mapper_args__: Any = {"version_id_col": version}


class Attachment(Base):
    """A file attached to a note; its bytes are in S3 under ``key``."""

    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(primary_key=True)
    note_id: Mapped[int] = mapped_column(ForeignKey("notes.id"), index=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(200))
    content_type: Mapped[str] = mapped_column(String(200))
    size: Mapped[int]
    key: Mapped[str] = mapped_column(String(300), unique=True)


class NoteIndex(Base):
    """Which version of a note its word index was built from (written by the job)."""

    __tablename__ = "note_index"

    note_id: Mapped[int] = mapped_column(ForeignKey("notes.id"), primary_key=True)
    version: Mapped[int]


class NoteWord(Base):
    """One word of a note and how often it occurs (written by the job)."""

    __tablename__ = "note_words"
    __table_args__ = (Index("ix_note_words_word", "word"),)

    note_id: Mapped[int] = mapped_column(ForeignKey("notes.id"), primary_key=True)
    word: Mapped[str] = mapped_column(String(100), primary_key=True)
    count: Mapped[int]


outbox = Table(
    "polydatum_outbox",
    Base.metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("topic", String(200), nullable=False),
    Column("key", String(200), nullable=True),
    Column("payload", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("available_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("dead", Boolean, nullable=False, default=False),
    Column("lease_owner", String(100), nullable=True),
    Column("lease_until", Float, nullable=True),
    Index("ix_polydatum_outbox_due", "dead", "available_at"),
    Index("ix_polydatum_outbox_key", "key", "id"),
)

"""The SQL tables: users own notebooks, notebooks hold notes, notes have attachments and words."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, ForeignKey, Index, String, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polydatum.sqlalchemy import Versioned


class Base(DeclarativeBase):
    """Declarative base of the notes tables."""


class User(Base):
    """Someone who owns notebooks."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Notebook(Base):
    """A named collection of notes, owned by one user."""

    __tablename__ = "notebooks"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))


class Note(Versioned, Base):
    """A note; ``version`` (from :class:`Versioned`) makes concurrent edits a 409."""

    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    notebook_id: Mapped[int] = mapped_column(ForeignKey("notebooks.id"), index=True)
    # Denormalised from the notebook: ownership checks and counts need one lookup.
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text, default="")


class Attachment(Base):
    """A file attached to a note; its bytes live in the blob store under ``key``."""

    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(primary_key=True)
    note_id: Mapped[int] = mapped_column(ForeignKey("notes.id"), index=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(200))
    content_type: Mapped[str] = mapped_column(String(200))
    size: Mapped[int]
    key: Mapped[str] = mapped_column(String(300), unique=True)


class NoteIndex(Base):
    """Which version of a note its word index was built from.

    A table of its own: writing it on the note would bump the note's version
    and turn the job's write into a conflict for the note's editor.
    """

    __tablename__ = "note_index"

    note_id: Mapped[int] = mapped_column(ForeignKey("notes.id"), primary_key=True)
    version: Mapped[int]


class NoteWord(Base):
    """One word of a note and how often it occurs: built by the background job."""

    __tablename__ = "note_words"
    __table_args__ = (Index("ix_note_words_word", "word"),)

    note_id: Mapped[int] = mapped_column(ForeignKey("notes.id"), primary_key=True)
    word: Mapped[str] = mapped_column(String(100), primary_key=True)
    count: Mapped[int]

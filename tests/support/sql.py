"""Models, services and throwaway PostgreSQL databases for the SQLAlchemy tests."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import ForeignKey, String, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

from polydatum.sqlalchemy import AsyncStore, Store, Versioned


class Base(DeclarativeBase):
    pass


class Item(Versioned, Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    qty: Mapped[int | None]
    made: Mapped[dt.date | None]


class Counter(Base):
    __tablename__ = "counters"

    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int]


class Tag(Base):
    """Not versioned, with a foreign key and a string primary key."""

    __tablename__ = "tags"

    code: Mapped[str] = mapped_column(String(20), primary_key=True)
    item_id: Mapped[int | None] = mapped_column(ForeignKey("items.id"))


class Membership(Base):
    """A composite primary key."""

    __tablename__ = "memberships"

    team: Mapped[str] = mapped_column(String(20), primary_key=True)
    user_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    role: Mapped[str] = mapped_column(String(20))


class Memberships(Store[Membership]):
    pass


class Items(Store[Item]):
    pass


class Tags(Store[Tag]):
    pass


class AsyncItems(AsyncStore[Item]):
    pass


@contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """Create a uniquely named database on the server; yield its URL; drop it afterwards."""
    name = f"polydatum_sa_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def server_connections(server_url: str, database: str) -> int:
    """How many sessions pg_stat_activity shows connected to ``database``."""
    admin = create_engine(server_url, poolclass=NullPool)
    try:
        with admin.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"), {"d": database}
                ).scalar_one()
            )
    finally:
        admin.dispose()

"""Models of a small geography data set, for the dataset build tests.

A module of its own, importing only SQLAlchemy: the command-line tests copy
it beside a spec module, and a subprocess imports it quickly.
"""

from __future__ import annotations

import datetime
import enum
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, ForeignKey, LargeBinary, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Kind(enum.Enum):
    city = 1
    town = 2


class Country(Base):
    __tablename__ = "countries"

    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str]
    population: Mapped[int | None]
    eu: Mapped[bool] = mapped_column(default=False)
    joined: Mapped[datetime.date | None]


class City(Base):
    __tablename__ = "cities"

    id: Mapped[int] = mapped_column(primary_key=True)
    country: Mapped[str] = mapped_column(ForeignKey("countries.code"), index=True)
    name: Mapped[str] = mapped_column(String(40))
    kind: Mapped[Kind] = mapped_column(default=Kind.city)
    area: Mapped[Decimal | None] = mapped_column(Numeric(10, 2))
    score: Mapped[float | None]
    tags: Mapped[Any] = mapped_column(JSON, nullable=True)
    founded: Mapped[datetime.datetime | None]
    uid: Mapped[uuid.UUID | None]
    flag: Mapped[bytes | None] = mapped_column(LargeBinary)
    census: Mapped[str] = mapped_column(server_default="2020")

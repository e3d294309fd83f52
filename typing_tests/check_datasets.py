"""Type-checked, never run: building, dumping and checking dataset files."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from typing_extensions import assert_type

from polydatum.sqlalchemy import Dataset, DatasetSpec


class Base(DeclarativeBase):
    pass


class Country(Base):
    __tablename__ = "countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str]


def rows() -> Iterator[dict[str, Any]]:
    yield {"code": "fr", "name": "France"}


def usage(folder: Path) -> None:
    assert_type(Dataset.build(folder / "geo.sqlite", Country, "countries.csv"), dict[str, int])
    Dataset.build(folder / "geo.sqlite", [Country], {Country: rows}, defaults={Country: {"name": "?"}})
    Dataset.build("geo.sqlite", Country, [{"code": "fr", "name": "France"}], clear=True, progress=False)
    assert_type(Dataset.dump(folder / "geo.sqlite", Country, io.StringIO()), int)
    assert_type(Dataset.check(folder / "geo.sqlite", [Country]), str)
    spec = DatasetSpec(folder / "geo.sqlite", Country, folder / "countries.csv")
    assert_type(spec.build(progress=False), dict[str, int])
    assert_type(spec.check(), str)
    Dataset.build(folder / "geo.sqlite", Country, 42)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]

"""Dataset.build, Dataset.dump, Dataset.check and ``python -m polydatum.sqlalchemy``, on real SQLite files."""

from __future__ import annotations

import datetime
import enum
import hashlib
import io
import json
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Numeric, String, TypeDecorator, Uuid, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polydatum import DataManager
from polydatum.sqlalchemy import Dataset, DatasetError, DatasetSpec, Store
from polydatum.sqlalchemy._cli import main
from tests.support import geo_models
from tests.support.geo_models import Base, City, Country, Kind


class Other(enum.Enum):
    city = 1


COUNTRIES = """\
code,name,population,eu,joined
fr,France,68000000,true,1958-01-01
de,Germany,84000000,yes,1958-01-01
jp,Japan,,false,
"""

CITIES = [
    {
        "country": "fr",
        "name": "Paris",
        "area": "105.40",
        "score": 0.1,
        "tags": ["capital", {"river": "Seine"}],
        "founded": "2024-05-17T09:30:00",
        "uid": "12345678-1234-5678-1234-567812345678",
        "flag": "AAEC",
        "census": "2021",
    },
    {"country": "de", "name": "Bonn", "kind": "town", "area": 141, "census": "2019"},
    {"country": "jp", "name": "", "kind": Kind.town, "tags": "just text", "census": "2020"},
]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(path: Path, model: type[Base]) -> list[tuple[Any, ...]]:
    """Every row of the model's table, read back through SQLAlchemy's types."""
    dataset = Dataset(path)
    try:
        with dataset.session() as session:
            table = model.__table__
            return [tuple(row) for row in session.execute(select(table).order_by(*table.primary_key))]
    finally:
        dataset.dispose()


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files a build or dump left in the folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(name="countries_csv")
def fixture_countries_csv(tmp_path: Path) -> Path:
    return write(tmp_path / "countries.csv", COUNTRIES)


@pytest.fixture(name="geo")
def fixture_geo(tmp_path: Path, countries_csv: Path) -> Path:
    path = tmp_path / "geo.sqlite"
    Dataset.build(path, [City, Country], {Country: countries_csv, City: CITIES}, progress=False)
    return path


class TestBuild:
    def test_csv_values_are_converted_by_the_model_columns(self, geo: Path) -> None:
        """Integers, booleans, dates and empty cells of a CSV become typed values; a Store reads them."""
        assert rows(geo, Country) == [
            ("de", "Germany", 84_000_000, True, datetime.date(1958, 1, 1)),
            ("fr", "France", 68_000_000, True, datetime.date(1958, 1, 1)),
            ("jp", "Japan", None, False, None),
        ]
        dm = DataManager()
        Dataset(geo).install(dm, name="geo")
        dm.register_services(countries=Store(Country, database="geo"))
        with dm.dal() as dal:
            assert dal.countries.count({"eu": True}) == 2

    def test_dict_values_are_converted_and_defaults_filled(self, geo: Path) -> None:
        """Dicts load through the same types: text dates, UUIDs, base64, decimals; Enum and JSON as given."""
        paris, bonn, tokyo = rows(geo, City)
        assert paris == (
            1,
            "fr",
            "Paris",
            Kind.city,  # the column's default=
            Decimal("105.40"),
            0.1,
            ["capital", {"river": "Seine"}],
            datetime.datetime(2024, 5, 17, 9, 30),
            uuid.UUID("12345678-1234-5678-1234-567812345678"),
            b"\x00\x01\x02",
            "2021",
        )
        assert bonn[3:6] == (Kind.town, Decimal("141.00"), None)
        assert tokyo[2:4] == ("", Kind.town)
        assert tokyo[6] == "just text"

    def test_parents_are_loaded_first_and_indexes_analyzed(self, geo: Path) -> None:
        """Parents load first; the model's indexes exist, ANALYZE ran, no temporary file is left."""
        conn = sqlite3.connect(geo)
        try:
            indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            assert "ix_cities_country" in indexes
            stats = {row[0] for row in conn.execute("SELECT tbl FROM sqlite_stat1")}
            assert stats == {"cities", "countries"}
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        finally:
            conn.close()
        assert leftovers(geo.parent) == []
        assert Dataset.check(geo, [Country, City]) == ""

    def test_json_lines_and_a_function_returning_rows(self, tmp_path: Path, countries_csv: Path) -> None:
        """A .jsonl file (blank lines skipped) and a function returning dicts are sources too."""
        cities = tmp_path / "cities.jsonl"
        cities.write_text(
            '{"id": 7, "country": "fr", "name": "Lyon"}\n\n{"country": "jp", "name": "Kyoto"}\n'
        )
        path = tmp_path / "geo.sqlite"
        loaded = Dataset.build(path, [Country, City], {Country: countries_csv, City: cities})
        assert loaded == {"countries": 3, "cities": 2}
        assert [(r[0], r[2]) for r in rows(path, City)] == [(7, "Lyon"), (8, "Kyoto")]
        Dataset.build(path, Country, lambda: [{"code": "it", "name": "Italy"}])
        assert [r[0] for r in rows(path, Country)] == ["de", "fr", "it", "jp"]

    def test_one_model_at_a_time_keeps_the_other_tables(self, tmp_path: Path, countries_csv: Path) -> None:
        """Building into an existing file adds rows and keeps other tables; clear=True builds anew."""
        path = tmp_path / "geo.sqlite"
        Dataset.build(path, Country, countries_csv)
        Dataset.build(path, City, [{"country": "fr", "name": "Nice"}])
        assert len(rows(path, Country)) == 3
        Dataset.build(path, City, [{"country": "de", "name": "Bonn"}])
        assert [r[2] for r in rows(path, City)] == ["Nice", "Bonn"]
        Dataset.build(
            path,
            [Country, City],
            {Country: countries_csv, City: [{"country": "jp", "name": "Osaka"}]},
            clear=True,
        )
        assert [r[2] for r in rows(path, City)] == ["Osaka"]
        assert len(rows(path, Country)) == 3

    def test_clear_builds_anew_whatever_the_file_held(self, tmp_path: Path, countries_csv: Path) -> None:
        """clear=True replaces a file whose schema no longer matches the models (the migration path)."""
        path = tmp_path / "geo.sqlite"
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE countries (code VARCHAR(2) PRIMARY KEY, name VARCHAR)")
            conn.execute("CREATE TABLE legacy (x INTEGER)")
        conn.close()
        Dataset.build(path, Country, countries_csv, clear=True)
        assert Dataset.check(path, Country) == ""

    def test_free_pages_of_a_file_built_upon_are_vacuumed(self, tmp_path: Path) -> None:
        """A file with free pages is vacuumed after the build; none are left."""
        path = tmp_path / "geo.sqlite"
        Dataset.build(path, Country, [{"code": f"{i:02d}", "name": "x" * 500} for i in range(100)])
        with sqlite3.connect(path) as conn:
            conn.execute("DELETE FROM countries")
            assert conn.execute("PRAGMA freelist_count").fetchone()[0] > 0
        conn.close()
        Dataset.build(path, Country, [{"code": "fr", "name": "France"}])
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
        finally:
            conn.close()

    def test_defaults_per_column(self, tmp_path: Path) -> None:
        """defaults= fills absent values: constants converted by type, functions called per row."""
        source = write(tmp_path / "countries.csv", "code,name,population\nfr,France,\nde,Germany,5\n")
        path = tmp_path / "geo.sqlite"
        days = iter(range(1, 10))
        Dataset.build(
            path,
            Country,
            source,
            defaults={
                Country: {"eu": "true", "joined": lambda: datetime.date(2000, 1, next(days)), "population": 7}
            },
        )
        assert rows(path, Country) == [
            ("de", "Germany", 5, True, datetime.date(2000, 1, 2)),
            ("fr", "France", None, True, datetime.date(2000, 1, 1)),  # empty in a nullable column: NULL
        ]

    def test_round_trip_build_dump_build(self, tmp_path: Path, geo: Path) -> None:
        """build -> dump -> build gives the same rows, and dumping again gives the same CSV."""
        again = tmp_path / "again.sqlite"
        texts = {}
        for model in (Country, City):
            out = tmp_path / f"{model.__tablename__}.csv"
            assert Dataset.dump(geo, model, out, null="\\N") == len(rows(geo, model))
            texts[model] = out.read_text()
        Dataset.build(
            again,
            [Country, City],
            {Country: tmp_path / "countries.csv", City: tmp_path / "cities.csv"},
            null="\\N",
        )
        for model in (Country, City):
            assert rows(again, model) == rows(geo, model)
            stream = io.StringIO()
            Dataset.dump(again, model, stream, null="\\N")
            assert stream.getvalue() == texts[model]
        assert leftovers(tmp_path) == []

    def test_dump_writes_csv_in_primary_key_order(self, geo: Path) -> None:
        """dump writes a header and rows by primary key; NULL is the empty cell by default."""
        out = io.StringIO()
        Dataset.dump(geo, Country, out)
        assert out.getvalue().splitlines() == [
            "code,name,population,eu,joined",
            "de,Germany,84000000,true,1958-01-01",
            "fr,France,68000000,true,1958-01-01",
            "jp,Japan,,false,",
        ]

    def test_a_null_marker_keeps_empty_text_apart_from_null(self, tmp_path: Path) -> None:
        """With null='\\N', an empty cell is the empty string and \\N is NULL, in dump and build."""
        path = tmp_path / "geo.sqlite"
        Dataset.build(path, Country, [{"code": "fr", "name": "France"}])
        Dataset.build(path, City, [{"id": 1, "country": "fr", "name": "", "tags": None}])
        source = write(tmp_path / "cities.csv", "id,country,name,census,tags\n2,fr,x,\\N,\\N\n")
        with pytest.raises(DatasetError, match=r"line 2, column 'census': a value is required"):
            Dataset.build(path, City, source, null="\\N")
        out = io.StringIO()
        Dataset.dump(path, City, out, null="\\N")
        assert out.getvalue().splitlines()[1].startswith("1,fr,,city,\\N,")

    def test_progress_is_shown_on_request(self, geo: Path, countries_csv: Path, capsys: Any) -> None:
        """progress=True prints one line per source on stderr; progress=False prints nothing."""
        Dataset.build(geo, Country, countries_csv, clear=True, progress=True)
        err = capsys.readouterr().err
        assert "countries.csv  100% 3 rows" in err
        Dataset.build(geo, Country, countries_csv, clear=True, progress=False)
        assert capsys.readouterr().err == ""

    def test_vacuum_can_be_forced(self, tmp_path: Path, countries_csv: Path) -> None:
        """vacuum=True vacuums a fresh file too (the built file is the same either way)."""
        path = tmp_path / "geo.sqlite"
        Dataset.build(path, Country, countries_csv, vacuum=True)
        assert len(rows(path, Country)) == 3


class Lower(TypeDecorator[str]):
    """Stores text lower-cased: a TypeDecorator sees the value parsed as its underlying type."""

    impl = String(10)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else value.lower()


class MoreBase(DeclarativeBase):
    pass


class Shift(MoreBase):
    __tablename__ = "shifts"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(Lower)
    starts: Mapped[datetime.time]
    ref: Mapped[str] = mapped_column(Uuid(as_uuid=False))
    rate: Mapped[float] = mapped_column(Numeric(6, 2, asdecimal=False))


def test_other_column_types_from_csv(tmp_path: Path) -> None:
    """Times, UUIDs kept as text, non-decimal Numerics and a TypeDecorator load from CSV and dump back."""
    source = write(
        tmp_path / "shifts.csv",
        "id,code,starts,ref,rate\n1,NIGHT,22:30:00,12345678123456781234567812345678,1.5\n",
    )
    path = tmp_path / "shifts.sqlite"
    Dataset.build(path, Shift, source)
    assert rows(path, Shift) == [
        (1, "night", datetime.time(22, 30), "12345678-1234-5678-1234-567812345678", 1.5)
    ]
    out = io.StringIO()
    Dataset.dump(path, Shift, out)
    assert out.getvalue().splitlines()[1] == "1,night,22:30:00,12345678-1234-5678-1234-567812345678,1.5"
    source.write_text("id,code,starts,ref,rate\n1,x,25:00,nope,1\n")
    with pytest.raises(DatasetError, match=r"line 2, column 'starts': '25:00' is not a time"):
        Dataset.build(tmp_path / "other.sqlite", Shift, source)


class NoteBase(DeclarativeBase):
    pass


class Note(NoteBase):
    """A table of awkward values for the round-trip property."""

    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]
    note: Mapped[str | None]
    n: Mapped[int | None]
    x: Mapped[float | None]


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12).filter(lambda t: t != "\\N")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "text": TEXT,
                "note": st.none() | TEXT,
                "n": st.none() | st.integers(-(2**63), 2**63 - 1),
                "x": st.none() | st.floats(allow_nan=False),
            }
        ),
        max_size=8,
    )
)
def test_any_rows_survive_build_dump_build(tmp_path: Path, items: list[dict[str, Any]]) -> None:
    """Commas, quotes, line breaks, any Unicode, extreme numbers: build -> dump -> build is equal."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    first, again, csv_file = folder / "a.sqlite", folder / "b.sqlite", folder / "notes.csv"
    Dataset.build(first, Note, items, null="\\N")
    assert Dataset.dump(first, Note, csv_file, null="\\N") == len(items)
    Dataset.build(again, Note, csv_file, null="\\N")
    assert rows(again, Note) == rows(first, Note)
    columns = ("text", "note", "n", "x")
    assert [row[1:] for row in rows(first, Note)] == [tuple(item[c] for c in columns) for item in items]


class TestBadInput:
    @pytest.mark.parametrize(
        ("line", "message"),
        [
            ("it,Italy,lots,true,", r"line 5, column 'population': 'lots' is not an integer"),
            ("it,Italy,1,maybe,", r"line 5, column 'eu': 'maybe' is not a boolean"),
            ("it,Italy,1,true,1958-13-01", r"line 5, column 'joined': '1958-13-01' is not a date"),
            ("ita,Italy,1,true,", r"line 5, column 'code': 'ita' is 3 characters long; .* at most 2"),
            (",Italy,1,true,", r"line 5, column 'code': a value is required"),
            ("it,Italy,1,true", r"line 5: 4 fields where the header has 5"),
            ("fr,France again,1,true,", r"line 5, column 'code': UNIQUE constraint failed"),
            ("it,Italy,18446744073709551616,true,", r"line 5: holds an integer beyond 64 bits"),
        ],
    )
    def test_a_row_that_does_not_fit_fails_the_build(
        self, tmp_path: Path, countries_csv: Path, line: str, message: str
    ) -> None:
        """A bad row names the file, the line and the column; no output file or temporary file is left."""
        countries_csv.write_text(COUNTRIES + line + "\n")
        path = tmp_path / "geo.sqlite"
        with pytest.raises(DatasetError, match=r"^countries\.csv, " + message) as failed:
            Dataset.build(path, Country, countries_csv)
        assert str(tmp_path) not in str(failed.value)
        assert failed.value.source == "countries.csv"
        assert failed.value.line == 5
        assert not path.exists()
        assert leftovers(tmp_path) == []

    @pytest.mark.parametrize("cell", ["nan", "NaN", "-nan"])
    def test_a_nan_fails_the_build(self, tmp_path: Path, geo: Path, cell: str) -> None:
        """NaN in a float column names the cell (SQLite stored it as NULL); an infinity is stored."""
        source = write(tmp_path / "cities.csv", f"country,name,score\nfr,Paris,inf\nfr,Lyon,{cell}\n")
        with pytest.raises(
            DatasetError, match=rf"cities\.csv, line 3, column 'score': '{cell}' is not a number"
        ):
            Dataset.build(geo, City, source)

    @pytest.mark.parametrize("value", [float("nan"), 2**64])
    def test_a_number_sqlite_cannot_store_fails_a_dict_build(self, geo: Path, value: Any) -> None:
        """From dicts too: NaN and ints past 64 bits are refused naming the item and the column."""
        with pytest.raises(DatasetError, match=r"column 'score'.* is not a number SQLite stores"):
            Dataset.build(geo, City, [{"country": "fr", "name": "Paris", "score": value}])

    def test_a_failed_build_leaves_the_old_file_as_it_was(self, geo: Path, countries_csv: Path) -> None:
        """A build that fails over an existing file leaves its bytes unchanged."""
        before = digest(geo)
        countries_csv.write_text(COUNTRIES + "it,Italy,x,true,\n")
        with pytest.raises(DatasetError, match="line 5"):
            Dataset.build(geo, Country, countries_csv, clear=True)
        assert digest(geo) == before
        assert leftovers(geo.parent) == []

    def test_line_numbers_count_lines_of_quoted_values(self, tmp_path: Path) -> None:
        """A value spanning lines is counted in the line numbers of the rows after it."""
        source = write(tmp_path / "countries.csv", 'code,name\nfr,"France\nla belle"\nde,Germany,x\n')
        with pytest.raises(DatasetError, match=r"countries\.csv, line 4: 3 fields"):
            Dataset.build(tmp_path / "geo.sqlite", Country, source)

    @pytest.mark.parametrize(
        ("header", "message"),
        [
            ("code,nme", r"line 1, column 'nme': not a column of the table; did you mean 'name'\?"),
            ("code,name,code", r"line 1, column 'code': appears twice"),
            ("code,population", r"line 1, column 'name': is required \(NOT NULL, no default\) and missing"),
        ],
    )
    def test_a_header_that_does_not_fit_fails_the_build(
        self, tmp_path: Path, header: str, message: str
    ) -> None:
        """An unknown, repeated or missing required column in the header fails at line 1."""
        source = write(tmp_path / "countries.csv", header + "\n")
        with pytest.raises(DatasetError, match=message):
            Dataset.build(tmp_path / "geo.sqlite", Country, source)
        assert list(tmp_path.iterdir()) == [source]

    def test_an_empty_file_fails_the_build(self, tmp_path: Path) -> None:
        """A CSV without a header line says the first line must name the columns."""
        source = write(tmp_path / "countries.csv", "")
        with pytest.raises(DatasetError, match=r"countries\.csv, line 1: the file is empty"):
            Dataset.build(tmp_path / "geo.sqlite", Country, source)

    def test_a_file_that_is_not_csv_fails_the_build(self, tmp_path: Path) -> None:
        """A field past the csv module's size limit fails the build naming the file and its line."""
        source = write(tmp_path / "countries.csv", "code,name\nfr,France\nde," + "x" * 200_000 + "\n")
        with pytest.raises(DatasetError, match=r"countries\.csv, line 3: not valid CSV \(field larger than"):
            Dataset.build(tmp_path / "geo.sqlite", Country, source)

    def test_a_file_that_is_not_utf8_fails_the_build(self, tmp_path: Path) -> None:
        """A CSV in another encoding is refused, saying to save it as UTF-8."""
        source = tmp_path / "countries.csv"
        source.write_bytes("code,name\nfr,Fran\xe7e\n".encode("latin-1"))
        with pytest.raises(DatasetError, match=r"^countries\.csv: is not UTF-8 text"):
            Dataset.build(tmp_path / "geo.sqlite", Country, source)

    @pytest.mark.parametrize(
        ("item", "message"),
        [
            ({"country": "fr", "name": 5}, r"item 2, column 'name': 5 is not text"),
            (
                {"country": "fr", "name": "x", "score": "high"},
                r"item 2, column 'score': 'high' is not a number",
            ),
            ({"country": "fr", "name": "x", "id": True}, r"item 2, column 'id': True is not an integer"),
            (
                {"country": "fr", "name": "x", "kind": "village"},
                r"column 'kind': 'village' is not one of city",
            ),
            (
                {"country": "fr", "name": "x", "kind": Other.city},
                r"column 'kind': <Other.city: 1> is not one of",
            ),
            ({"country": "fr", "name": "x", "tags": {1}}, r"column 'tags': TypeError"),
            ({"country": "fr", "name": "x", "mayor": "y"}, r"column 'mayor': not a column of the table"),
            ({"country": "fr", "name": None}, r"item 2, column 'name': a value is required"),
            (["fr", "x"], r"item 2: a list, not a dict of column values"),
            ({"country": "xx", "name": "x"}, r"a row of 'cities' \(rowid 2\) refers to a row of 'countries'"),
        ],
    )
    def test_a_dict_that_does_not_fit_fails_the_build(
        self, tmp_path: Path, countries_csv: Path, item: Any, message: str
    ) -> None:
        """A bad dict names the item (counted from 1) and the column; no file is left."""
        path = tmp_path / "geo.sqlite"
        source = [{"country": "fr", "name": "Paris"}, item]
        with pytest.raises(DatasetError, match=message):
            Dataset.build(path, [Country, City], {Country: countries_csv, City: source})
        assert not path.exists()
        assert leftovers(tmp_path) == []

    def test_duplicates_under_a_unique_index_fail_the_build(self, tmp_path: Path) -> None:
        """A unique index, built after the rows are in, fails the build naming the table and column."""

        class Other(DeclarativeBase):
            pass

        class Tag(Other):
            __tablename__ = "tags"
            id: Mapped[int] = mapped_column(primary_key=True)
            label: Mapped[str] = mapped_column(index=True, unique=True)

        path = tmp_path / "tags.sqlite"
        with pytest.raises(DatasetError, match=r"^UNIQUE constraint failed: tags\.label; fix the data"):
            Dataset.build(path, Tag, [{"label": "a"}, {"label": "b"}, {"label": "a"}])
        assert not path.exists()
        assert leftovers(tmp_path) == []

    def test_a_datetime_is_not_a_date(self, tmp_path: Path) -> None:
        """A datetime given for a Date column is refused rather than cut to its day."""
        moment = datetime.datetime(1958, 1, 1, 12, 30)
        with pytest.raises(
            DatasetError, match=r"item 1, column 'joined': datetime.datetime\(1958, 1, 1, 12, 30\) is not"
        ):
            Dataset.build(
                tmp_path / "geo.sqlite", Country, [{"code": "fr", "name": "France", "joined": moment}]
            )

    def test_a_server_default_column_must_be_given_in_the_first_row_or_none(self, tmp_path: Path) -> None:
        """A column filled by its server default when the first row lacks it cannot appear later."""
        source = [{"country": "fr", "name": "a"}, {"country": "fr", "name": "b", "census": "1999"}]
        with pytest.raises(DatasetError, match=r"item 2, column 'census': is missing from the first row"):
            Dataset.build(tmp_path / "geo.sqlite", City, source)

    def test_bad_json_lines_name_their_line(self, tmp_path: Path) -> None:
        """A line that is not JSON names its line, blank lines counted."""
        source = tmp_path / "cities.jsonl"
        source.write_text('{"country": "fr", "name": "a"}\n\n{"country": "fr", "name": \n')
        with pytest.raises(DatasetError, match=r"cities\.jsonl, line 3: not JSON"):
            Dataset.build(tmp_path / "geo.sqlite", City, source)
        source.write_text('{"country": "fr", "name": "a"}\n\n{"country": "fr", "name": 3}\n')
        with pytest.raises(DatasetError, match=r"cities\.jsonl, line 3, column 'name': 3 is not text"):
            Dataset.build(tmp_path / "geo.sqlite", City, source)

    @pytest.mark.parametrize(
        ("models", "sources", "message"),
        [
            (Country, "countries.xlsx", r"'countries.xlsx' is neither \.csv nor \.jsonl"),
            (Country, "missing.csv", r"^missing\.csv: cannot be read \(No such file or directory\)"),
            (Country, "some text", r"neither \.csv nor"),
            (Country, 42, r"the source for 'countries' is a int"),
            (Country, {City: []}, r"sources name .*City.*, which is not among the models"),
            ([Country, City], "countries.csv", r"with several models, sources must be a dict"),
            (str, "countries.csv", r"is not a mapped class with a table"),
            ([], {}, r"no models given"),
        ],
    )
    def test_bad_arguments_are_refused(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models: Any, sources: Any, message: str
    ) -> None:
        """Sources and models that cannot be used raise DatasetError saying what to pass, no folder named."""
        monkeypatch.chdir(tmp_path)
        with pytest.raises(DatasetError, match=message) as refused:
            Dataset.build(tmp_path / "geo.sqlite", models, sources)
        assert str(tmp_path) not in str(refused.value)
        assert not (tmp_path / "geo.sqlite").exists()

    def test_bad_defaults_are_refused(self, tmp_path: Path, countries_csv: Path) -> None:
        """Defaults for an unknown column, another model or of the wrong type raise DatasetError."""
        path = tmp_path / "geo.sqlite"
        with pytest.raises(DatasetError, match=r"defaults for 'countries' name 'mayor', not columns"):
            Dataset.build(path, Country, countries_csv, defaults={Country: {"mayor": "x"}})
        with pytest.raises(DatasetError, match=r"defaults name .*City.*, which is not among the models"):
            Dataset.build(path, Country, countries_csv, defaults={City: {"name": "x"}})
        with pytest.raises(DatasetError, match=r"column 'joined': the default 'soon' is not a date"):
            Dataset.build(path, Country, countries_csv, defaults={Country: {"joined": "soon"}})

    def test_the_output_folder_must_exist_and_path_be_a_file(
        self, tmp_path: Path, countries_csv: Path
    ) -> None:
        """A missing folder or a folder as path is refused, naming only the file."""
        with pytest.raises(DatasetError, match=r"the folder for 'geo.sqlite' does not exist") as refused:
            Dataset.build(tmp_path / "nope" / "geo.sqlite", Country, countries_csv)
        assert str(tmp_path) not in str(refused.value)
        (tmp_path / "out").mkdir()
        with pytest.raises(DatasetError, match=r"'out' is a folder"):
            Dataset.build(tmp_path / "out", Country, countries_csv)

    @pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, unwritable even by root")
    def test_a_folder_that_cannot_be_written_fails_the_build(self, countries_csv: Path) -> None:
        """A folder where the file cannot be written raises DatasetError with the reason, not the path."""
        with pytest.raises(
            DatasetError, match=r"^cannot write 'geo.sqlite' \(.*\); check that its folder"
        ) as refused:
            Dataset.build(Path("/proc/geo.sqlite"), Country, countries_csv)
        assert "/proc" not in str(refused.value)

    def test_an_existing_file_with_another_schema_is_not_built_upon(self, tmp_path: Path) -> None:
        """Adding to a file whose table differs from the model fails with the diff, the file untouched."""
        path = tmp_path / "geo.sqlite"
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE countries (code VARCHAR(2) PRIMARY KEY, name VARCHAR)")
        conn.close()
        before = digest(path)
        with pytest.raises(
            DatasetError, match=r"(?s)do not match the models.*-  column name VARCHAR NOT NULL"
        ):
            Dataset.build(path, Country, [{"code": "fr", "name": "France"}])
        assert digest(path) == before
        assert leftovers(tmp_path) == []

    def test_an_existing_file_that_is_not_sqlite_is_refused(self, tmp_path: Path) -> None:
        """Building upon a file that is not SQLite says so, and leaves it alone."""
        path = tmp_path / "geo.sqlite"
        path.write_text("not a database\n" * 100)
        with pytest.raises(DatasetError, match=r"the dataset 'geo.sqlite' cannot be read"):
            Dataset.build(path, Country, [{"code": "fr", "name": "France"}])
        assert path.read_text().startswith("not a database")


class TestDumpAndCheck:
    def test_dump_refuses_values_equal_to_the_null_marker(self, tmp_path: Path) -> None:
        """An empty string in a nullable column cannot be written with null=''; the output is not written."""
        path = tmp_path / "geo.sqlite"
        Dataset.build(path, Country, [{"code": "fr", "name": "France", "joined": None}])
        Dataset.build(path, City, [{"country": "fr", "name": "x", "tags": ""}])
        out = tmp_path / "cities.csv"
        with pytest.raises(
            DatasetError, match=r"geo\.sqlite, column 'tags': a value equal to the null marker"
        ):
            Dataset.dump(path, City, out, null='""')
        assert not out.exists()
        assert leftovers(tmp_path) == []

    def test_dump_and_check_need_the_file(self, tmp_path: Path) -> None:
        """dump and check of a missing file raise DatasetError naming only the file."""
        with pytest.raises(DatasetError, match=r"the dataset 'nope.sqlite' does not exist") as missing:
            Dataset.dump(tmp_path / "nope.sqlite", Country, io.StringIO())
        assert str(tmp_path) not in str(missing.value)
        with pytest.raises(DatasetError, match=r"the dataset 'nope.sqlite' does not exist"):
            Dataset.check(tmp_path / "nope.sqlite", Country)

    def test_check_shows_what_differs(self, tmp_path: Path) -> None:
        """A changed type, a missing index and a table without a model show in a unified diff."""
        path = tmp_path / "geo.sqlite"
        with sqlite3.connect(path) as conn:
            conn.execute(
                "CREATE TABLE countries (code VARCHAR(3) PRIMARY KEY NOT NULL, name VARCHAR NOT NULL, "
                "population INTEGER, eu BOOLEAN NOT NULL, joined DATE)"
            )
            conn.execute("CREATE TABLE legacy (x INTEGER)")
        conn.close()
        diff = Dataset.check(path, Country)
        assert diff.splitlines()[:2] == ["--- models", "+++ geo.sqlite"]
        assert "-  column code VARCHAR(2) NOT NULL PRIMARY KEY" in diff
        assert "+  column code VARCHAR(3) NOT NULL PRIMARY KEY" in diff
        assert "+table legacy" in diff
        assert str(tmp_path) not in diff


# --- the command line ---------------------------------------------------------------------------

SPEC_MODULE = """
from pathlib import Path

from {models_module} import City, Country
from polydatum.sqlalchemy import DatasetSpec

HERE = Path(__file__).parent
SOURCES = {{Country: HERE / "countries.csv", City: HERE / "cities.jsonl"}}
geo = DatasetSpec(HERE / "geo.sqlite", [Country, City], SOURCES)


def make_spec():
    return geo


number = 42
"""


def run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polydatum.sqlalchemy", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(name="project")
def fixture_project(tmp_path: Path, countries_csv: Path) -> Path:
    """A folder with the test's models importable and a spec module, as an application has."""
    (tmp_path / "geo_models.py").write_text(Path(geo_models.__file__).read_text())
    (tmp_path / "geo_spec.py").write_text(SPEC_MODULE.format(models_module="geo_models"))
    (tmp_path / "cities.jsonl").write_text("\n".join(json.dumps(c) for c in CITIES[:2]) + "\n")
    return tmp_path


@pytest.fixture(name="in_process")
def fixture_in_process(project: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The project importable in this process, its modules forgotten afterwards."""
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    yield project
    for name in ("geo_spec", "geo_models"):
        sys.modules.pop(name, None)


class TestCommandLine:
    def test_build_check_and_dump(self, project: Path) -> None:
        """build-dataset builds the spec's file, check-dataset finds it matching, dump-dataset prints."""
        built = run(project, "build-dataset", "geo_spec:make_spec()", "--no-progress")
        assert built.returncode == 0, built.stderr
        assert built.stdout == "built geo.sqlite: countries 3 rows, cities 2 rows\n"
        checked = run(project, "check-dataset", "geo_spec:geo")
        assert (checked.returncode, checked.stdout) == (0, "geo.sqlite matches the models\n")
        dumped = run(project, "dump-dataset", "geo_spec:geo", "countries")
        assert dumped.returncode == 0, dumped.stderr
        expected = io.StringIO()
        Dataset.dump(project / "geo.sqlite", Country, expected)
        assert dumped.stdout == expected.getvalue()
        assert dumped.stdout.splitlines()[1] == "de,Germany,84000000,true,1958-01-01"

    def test_check_fails_with_a_diff_when_a_model_changed(self, project: Path) -> None:
        """check-dataset exits 1 with the diff when the models no longer match the shipped file."""
        assert run(project, "build-dataset", "geo_spec:geo").returncode == 0
        source = (project / "geo_models.py").read_text()
        changed = source.replace("population: Mapped[int | None]", "population: Mapped[int]", 1)
        assert changed != source
        (project / "geo_models.py").write_text(changed)
        checked = run(project, "check-dataset", "geo_spec:geo")
        assert checked.returncode == 1
        assert "-  column population INTEGER NOT NULL\n+  column population INTEGER\n" in checked.stdout
        assert "geo.sqlite does not match the models; rebuild it with:" in checked.stderr
        assert str(project) not in checked.stdout + checked.stderr

    def test_a_bad_row_exits_1_and_leaves_no_file(self, project: Path) -> None:
        """A row that does not fit exits 1 with one line naming file, line and column; no file is built."""
        (project / "countries.csv").write_text(COUNTRIES + "it,Italy,many,true,\n")
        built = run(project, "build-dataset", "geo_spec:geo")
        assert built.returncode == 1
        assert built.stderr == (
            "python -m polydatum.sqlalchemy build-dataset: "
            "countries.csv, line 5, column 'population': 'many' is not an integer\n"
        )
        assert not (project / "geo.sqlite").exists()
        assert leftovers(project) == []

    def test_a_bad_target_exits_2_with_one_line(self, project: Path) -> None:
        """A target that is not a DatasetSpec exits 2 with one line saying what to pass."""
        result = run(project, "build-dataset", "geo_spec:number")
        assert result.returncode == 2
        assert result.stderr == (
            "python -m polydatum.sqlalchemy build-dataset: 'geo_spec:number' is an object of type int, "
            "not a DatasetSpec; pass MODULE:NAME naming a polydatum.sqlalchemy.DatasetSpec "
            "(e.g. myapp.data:countries), or MODULE:FACTORY() naming a function that returns one\n"
        )

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["check-dataset", "nowhere:geo"], "check-dataset: no module named 'nowhere'; pass MODULE:NAME"),
            (["build-dataset", "geo_spec"], "build-dataset: 'geo_spec' is not MODULE:NAME; pass MODULE:NAME"),
            (
                ["dump-dataset", "geo_spec:geo", "towns"],
                "no table 'towns' in the spec; known: countries, cities",
            ),
        ],
    )
    def test_other_bad_targets_exit_2(
        self, in_process: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
    ) -> None:
        """A module that is not there, a target without a name, or an unknown table exit 2 with one line."""
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err
        assert err.count("\n") == 1
        assert str(in_process) not in err

    def test_a_missing_file_fails_check_and_dump(
        self, in_process: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """check-dataset and dump-dataset of a file not built yet exit 1 saying to build it."""
        assert main(["check-dataset", "geo_spec:geo"]) == 1
        assert "the dataset 'geo.sqlite' does not exist; build it first" in capsys.readouterr().err
        assert main(["dump-dataset", "geo_spec:geo", "cities"]) == 1
        assert main(["build-dataset", "geo_spec:geo", "--progress"]) == 0
        assert "countries.csv  100% 3 rows" in capsys.readouterr().err
        assert main(["dump-dataset", "geo_spec:geo", "cities", "--out", "cities.csv"]) == 0
        assert (in_process / "cities.csv").read_text().startswith("id,country,name,kind,")


def test_spec_builds_and_checks(tmp_path: Path, countries_csv: Path) -> None:
    """A DatasetSpec builds its file and checks it, as the command does."""
    spec = DatasetSpec(tmp_path / "geo.sqlite", Country, countries_csv)
    assert spec.build(progress=False) == {"countries": 3}
    assert spec.check() == ""
    assert spec.file_name == "geo.sqlite"
    assert spec.model_list() == [Country]

"""Building, dumping and checking dataset files: the other half of :class:`Dataset`.

:func:`build` loads CSV files, JSON lines files or iterables of dicts into a
new SQLite file, converting every value through the model's column types,
and renames it into place only once it is complete (``ANALYZE``d and
``VACUUM``ed). :func:`dump` writes a table back to CSV in the form
:func:`build` reads. :func:`check` compares a file's schema with the models
and returns a unified diff (empty when they match). :class:`DatasetSpec`
bundles what a build needs, for ``python -m polydatum.sqlalchemy``.

A bad value fails the build with a :class:`DatasetError` naming the source
file (never its folder), the line and the column; no output file is left.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import datetime
import difflib
import json
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, TypeAlias, Union

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Enum,
    Float,
    LargeBinary,
    Numeric,
    String,
    Table,
    create_engine,
    select,
    type_coerce,
)
from sqlalchemy.engine import URL
from sqlalchemy.schema import CreateIndex, CreateTable, sort_tables

from polydatum.errors import DatasetError
from polydatum.sqlalchemy._dataset_columns import (
    DIALECT,
    NO_DEFAULT,
    Bad,
    PlannedColumn,
    base_type,
    careful_converter,
    omitted,
    plan_table,
    row_maker,
)

__all__ = ["DatasetSpec", "Source", "build", "check", "dump"]

#: Where a model's rows come from: a ``.csv`` or ``.jsonl`` (``.ndjson``) file,
#: an iterable of dicts, or a function returning one (called once per build).
Source: TypeAlias = Union[
    str, "os.PathLike[str]", Iterable[Mapping[str, Any]], Callable[[], Iterable[Mapping[str, Any]]]
]

# How many SQLite VM steps between two looks at the progress bar (a few hundred rows).
_PROGRESS_STEPS = 50_000


# --- reading sources ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Cursor:
    """Where the row loop is, for the error raised by SQLite on the row just given."""

    source: str
    line: int = 0
    rows: int = 0
    # A CSV source's reader: its line_num is the line of the row SQLite was given last.
    reader: Any = None

    def current_line(self) -> int:
        return int(self.reader.line_num) if self.reader is not None else self.line


class _ProgressBar:
    """A one-line progress report on a terminal, redrawn at most 5 times a second."""

    def __init__(self, stream: IO[str], label: str, total: int | None) -> None:
        self.stream = stream
        self.label = label
        self.total = total
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, rows: int, done: int | None, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < 0.2:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        share = f"{min(done / self.total, 1.0):4.0%} " if self.total and done is not None else ""
        line = f"\r{self.label}  {share}{rows:,} rows  {rows / elapsed:,.0f} rows/s"
        self.stream.write(line + ("\n" if final else ""))
        self.stream.flush()


def _name_of(source: Any) -> str:
    return Path(os.fspath(source)).name


def _kind_of_file(source: str | os.PathLike[str]) -> str:
    suffix = Path(os.fspath(source)).suffix.lower()
    if suffix in (".csv", ".jsonl", ".ndjson"):
        return suffix
    raise DatasetError(
        f"{_name_of(source)!r} is neither .csv nor .jsonl/.ndjson; name the file after its format, "
        "or pass an iterable of dicts"
    )


def _csv_rows(
    file: IO[str], plan: Mapping[str, PlannedColumn], cursor: _Cursor, null: str
) -> tuple[list[str], Iterator[Sequence[Any]]]:
    """The INSERT's columns, from the header, and the stored values row by row."""
    reader = csv.reader(file)
    header = next(reader, None)
    cursor.line = 1
    if not header:
        raise DatasetError(
            "the file is empty; the first line must name the columns", source=cursor.source, line=1
        )
    _check_names(header, plan, cursor)
    cols = [plan[name] for name in header]
    filled = [col for name, col in plan.items() if name not in header and not omitted(col)]
    careful = [careful_converter(col, null) for col in cols]
    width = len(header)

    def bad(row: list[str]) -> NoReturn:
        # The slow path, for a row the fast one refused: say which value and why.
        line = reader.line_num
        if len(row) != width:
            raise DatasetError(
                f"{len(row)} fields where the header has {width}; quote values that hold commas",
                source=cursor.source,
                line=line,
            )
        for col, convert, text in zip(cols, careful, row, strict=True):
            try:
                convert(text)
            except Exception as exc:  # any failure of a converter is the value's
                problem = str(exc) if isinstance(exc, Bad) else f"{type(exc).__name__}: {exc}"
                raise DatasetError(problem, source=cursor.source, line=line, column=col.name) from None
        for col in filled:
            try:
                col.missing()
            except Exception as exc:  # any failure of a converter is the value's
                problem = str(exc) if isinstance(exc, Bad) else f"{type(exc).__name__}: {exc}"
                raise DatasetError(problem, source=cursor.source, line=line, column=col.name) from None
        raise DatasetError("the row does not fit the table", source=cursor.source, line=line)

    cursor.reader = reader
    make = row_maker(cols, filled, null, bad)
    # filter(None, ...) drops blank lines (csv gives []); no Python loop of ours runs per row.
    return [col.name for col in cols] + [col.name for col in filled], map(make, filter(None, reader))


def _check_names(names: Iterable[str], plan: Mapping[str, PlannedColumn], cursor: _Cursor) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DatasetError("appears twice", source=cursor.source, line=cursor.line, column=name)
        seen.add(name)
        if name not in plan:
            close = difflib.get_close_matches(name, plan, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DatasetError(
                f"not a column of the table; {hint}known: {', '.join(plan)}",
                source=cursor.source,
                line=cursor.line,
                column=name,
            )
    for name, col in plan.items():
        if name not in seen and not omitted(col) and col.default is NO_DEFAULT:
            raise DatasetError(
                "is required (NOT NULL, no default) and missing; add it, or give a default",
                source=cursor.source,
                line=cursor.line,
                column=name,
            )


def _dict_rows(
    items: Iterable[Any], plan: Mapping[str, PlannedColumn], cursor: _Cursor
) -> tuple[list[str], Iterator[list[Any]]]:
    """The INSERT's columns and the stored values of dicts (from an iterable or JSON lines)."""
    iterator = iter(items)
    cols = [col for col in plan.values() if not (col.server_default and col.default is NO_DEFAULT)]
    # A column filled by SQLite's server default is inserted only when the
    # first row gives it: one INSERT serves every row.
    first = next(iterator, None)
    if first is not None:
        for col in plan.values():
            if col not in cols and isinstance(first, Mapping) and col.name in first:
                cols.append(col)

    def stored(item: Any) -> list[Any]:
        if not isinstance(item, Mapping):
            raise DatasetError(
                f"a {type(item).__name__}, not a dict of column values",
                source=cursor.source,
                line=cursor.line,
            )
        unknown = [key for key in item if key not in plan]
        if unknown:
            _check_names(unknown, plan, cursor)
        for key in item:
            if plan[key] not in cols:
                raise DatasetError(
                    "is missing from the first row, so SQLite's server default fills it in every row; "
                    "give it in the first row too, or in none",
                    source=cursor.source,
                    line=cursor.line,
                    column=key,
                )
        values = []
        for col in cols:
            try:
                value = item.get(col.name, NO_DEFAULT)
                if value is NO_DEFAULT or (value is None and not col.nullable):
                    values.append(col.missing())
                elif value is None:
                    values.append(None)
                else:
                    values.append(col.to_db(col.coerce(value)))
            except Bad as exc:
                raise DatasetError(
                    str(exc), source=cursor.source, line=cursor.line, column=col.name
                ) from None
            except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError) as exc:
                # A bind processor or TypeDecorator refusing the value, or a default that needs more.
                problem = f"{type(exc).__name__}: {exc}"
                raise DatasetError(problem, source=cursor.source, line=cursor.line, column=col.name) from None
        return values

    def rows() -> Iterator[list[Any]]:
        if first is None:
            return
        for count, item in enumerate(_chain_first(first, iterator, cursor), 1):
            values = stored(item)
            cursor.rows = count
            yield values

    return [col.name for col in cols], rows()


def _chain_first(first: Any, rest: Iterator[Any], cursor: _Cursor) -> Iterator[Any]:
    cursor.line += 1
    yield first
    for item in rest:
        cursor.line += 1
        yield item


def _json_lines(file: IO[str], cursor: _Cursor) -> Iterator[Any]:
    # _chain_first counts the items; here each item is one non-blank line.
    for number, line in enumerate(file, 1):
        if not line.strip():
            continue
        cursor.line = number - 1  # _chain_first adds one
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"not JSON ({exc.msg}); one object a line", source=cursor.source, line=number
            ) from None
        yield item


# --- build --------------------------------------------------------------------------------------


def _models(models: type | Sequence[type]) -> list[Table]:
    listed = [models] if isinstance(models, type) else list(models)
    if not listed:
        raise DatasetError("no models given; pass a mapped class, or a list of them")
    tables = []
    for model in listed:
        table = getattr(model, "__table__", None)
        if not isinstance(table, Table):
            raise DatasetError(f"{model!r} is not a mapped class with a table; pass your declarative models")
        tables.append(table)
    return tables


def _sources(tables: list[Table], sources: Any) -> dict[str, Any]:
    if isinstance(sources, Mapping) and all(isinstance(key, type) for key in sources):
        by_table: dict[str, Any] = {}
        for model, source in sources.items():
            table = getattr(model, "__table__", None)
            if not isinstance(table, Table) or table not in tables:
                raise DatasetError(
                    f"sources name {model!r}, which is not among the models given; add it to models"
                )
            by_table[table.name] = source
        return by_table
    if len(tables) != 1:
        raise DatasetError("with several models, sources must be a dict {Model: source}")
    return {tables[0].name: sources}


def _defaults(
    tables: list[Table], defaults: Mapping[Any, Mapping[str, Any]] | None
) -> dict[str, Mapping[str, Any]]:
    by_table: dict[str, Mapping[str, Any]] = {}
    for model, values in (defaults or {}).items():
        table = getattr(model, "__table__", None)
        if not isinstance(table, Table) or table not in tables:
            raise DatasetError(
                f"defaults name {model!r}, which is not among the models given; add it to models"
            )
        by_table[table.name] = values
    return by_table


def _ddl(element: Any) -> str:
    return str(element.compile(dialect=DIALECT)).strip()


def _existing_tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {row[0] for row in rows}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _constraint_column(message: str, table: str) -> str | None:
    # "UNIQUE constraint failed: countries.code" -> "code"
    _, _, names = message.partition(": ")
    columns = [name.strip().removeprefix(table + ".") for name in names.split(",") if name.strip()]
    return ", ".join(columns) if columns else None


def _load(
    conn: sqlite3.Connection,
    table: Table,
    source: Any,
    plan: Mapping[str, PlannedColumn],
    *,
    null: str,
    progress: IO[str] | None,
) -> int:
    opened: IO[str] | None = None
    size: int | None = None
    label = f"{table.name} rows"
    try:
        if isinstance(source, (str, os.PathLike)):
            kind = _kind_of_file(source)
            label = _name_of(source)
            try:
                opened = open(source, encoding="utf-8-sig", newline="" if kind == ".csv" else None)  # noqa: SIM115
                size = os.fstat(opened.fileno()).st_size
            except OSError as exc:
                raise DatasetError(
                    f"cannot be read ({exc.strerror or type(exc).__name__}); check the path in the spec",
                    source=label,
                ) from None
            cursor = _Cursor(label)
            if kind == ".csv":
                columns, rows = _csv_rows(opened, plan, cursor, null)
            else:
                columns, rows = _dict_rows(_json_lines(opened, cursor), plan, cursor)
        else:
            items = source() if callable(source) else source
            if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
                raise DatasetError(
                    f"the source for {table.name!r} is a {type(items).__name__}; pass a .csv or .jsonl path, "
                    "an iterable of dicts, or a function returning one"
                )
            cursor = _Cursor(label)
            columns, rows = _dict_rows(items, plan, cursor)
        statement = (
            f"INSERT INTO {_quote(table.name)} ({', '.join(map(_quote, columns))}) "
            f"VALUES ({', '.join('?' * len(columns))})"
        )
        bar = _ProgressBar(progress, label, size) if progress is not None else None
        buffer: Any = getattr(opened, "buffer", None)

        def done() -> int:
            # A CSV's lines stand for its rows here; exact counts come at the end.
            return cursor.current_line() - 1 if cursor.reader is not None else cursor.rows

        def show() -> int:
            assert bar is not None
            bar.update(done(), buffer.tell() if buffer is not None else None)
            return 0  # go on

        if bar is not None:
            conn.set_progress_handler(show, _PROGRESS_STEPS)
        try:
            loaded = conn.executemany(statement, rows).rowcount
        except csv.Error as exc:
            raise DatasetError(
                f"not valid CSV ({exc})", source=cursor.source, line=cursor.current_line()
            ) from None
        except OverflowError:
            # An int past 64 bits, met by SQLite's bind: the row the source gave last.
            raise DatasetError(
                "holds an integer beyond 64 bits, which SQLite's INTEGER cannot store",
                source=cursor.source,
                line=cursor.current_line(),
            ) from None
        except sqlite3.IntegrityError as exc:
            # SQLite stopped on the row the source gave last.
            problem = f"{exc}; the row does not fit the table's constraints"
            raise DatasetError(
                problem,
                source=cursor.source,
                line=cursor.current_line(),
                column=_constraint_column(str(exc), table.name),
            ) from None
        finally:
            conn.set_progress_handler(None, 0)
        if bar is not None:
            bar.update(loaded, size, final=True)
        return max(loaded, 0)
    except UnicodeDecodeError:
        # Text is decoded ahead of the rows, in blocks: no line number would be right.
        raise DatasetError("is not UTF-8 text; save it as UTF-8", source=label) from None
    finally:
        if opened is not None:
            opened.close()


def _foreign_key_problems(conn: sqlite3.Connection, tables: list[Table]) -> None:
    for table in tables:
        broken = conn.execute(f"PRAGMA foreign_key_check({_quote(table.name)})").fetchmany(1)
        if broken:
            _, rowid, parent, _ = broken[0]
            raise DatasetError(
                f"a row of {table.name!r} (rowid {rowid}) refers to a row of {parent!r} that does not exist; "
                f"load {parent!r} in the same build, or fix the reference"
            )


def _order(tables: list[Table]) -> list[Table]:
    # Parents before children, as SQLAlchemy orders a metadata's tables.
    return list(sort_tables(tables))


def _temp_beside(target: Path, what: str) -> Path:
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.{what}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build(
    path: str | os.PathLike[str],
    models: type | Sequence[type],
    # Keyed by Any: Mapping's key type is invariant, and {Country: ...} is a dict[type[Country], ...].
    sources: Mapping[Any, Source] | Source,
    *,
    defaults: Mapping[Any, Mapping[str, Any]] | None = None,
    clear: bool = False,
    null: str = "",
    progress: bool | None = None,
    vacuum: bool | None = None,
) -> dict[str, int]:
    """Build (or add to) the dataset file ``path``; see :meth:`Dataset.build`."""
    target = Path(path)
    tables = _models(models)
    by_table = _sources(tables, sources)
    table_defaults = _defaults(tables, defaults)
    plans = {table.name: plan_table(table, table_defaults.get(table.name, {})) for table in tables}
    if not target.parent.is_dir():
        raise DatasetError(f"the folder for {target.name!r} does not exist; create it first")
    if target.is_dir():
        raise DatasetError(f"{target.name!r} is a folder; pass the path of the SQLite file to write")
    stream = sys.stderr if progress or (progress is None and sys.stderr.isatty()) else None
    temp = _temp_beside(target, "building")
    loaded: dict[str, int] = {}
    try:
        if target.exists() and not clear:
            _copy_existing(target, temp, tables)
        conn = sqlite3.connect(temp, isolation_level=None)
        try:
            # The file is thrown away if anything fails: no journal, no syncs until the end.
            conn.execute("PRAGMA journal_mode = OFF")
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute("BEGIN")
            existing = _existing_tables(conn)
            new = [table for table in tables if table.name not in existing]
            for table in new:
                conn.execute(_ddl(CreateTable(table)))
            for table in _order(tables):
                if table.name in by_table:
                    loaded[table.name] = _load(
                        conn, table, by_table[table.name], plans[table.name], null=null, progress=stream
                    )
            # Indexes last: building them once is faster than keeping them up to date row by row.
            for table in new:
                for index in sorted(table.indexes, key=lambda index: str(index.name)):
                    conn.execute(_ddl(CreateIndex(index)))
            _foreign_key_problems(conn, tables)
            conn.execute("COMMIT")
            conn.execute("ANALYZE")
            # A file written once from empty has no free page to give back: VACUUM
            # would rewrite it whole for nothing (a fifth of a build's time).
            if vacuum or (vacuum is None and conn.execute("PRAGMA freelist_count").fetchone()[0]):
                conn.execute("VACUUM")
        finally:
            conn.close()
        _fsync(temp)
        os.replace(temp, target)  # readers see the old file or the new one, never half of one
        with contextlib.suppress(OSError):  # not every platform can sync a folder
            _fsync(target.parent)
    except sqlite3.IntegrityError as exc:
        temp.unlink(missing_ok=True)
        raise DatasetError(f"{exc}; fix the data or the model") from None
    except (OSError, sqlite3.OperationalError) as exc:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        # The reason only: an OSError's text holds the full path.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        msg = f"cannot write {target.name!r} ({reason}); check that its folder is writable and has room"
        raise DatasetError(msg) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return loaded


def _copy_existing(target: Path, temp: Path, tables: list[Table]) -> None:
    """Start from a copy of the existing file, once its schema matches the models."""
    source = _open_read_only(target)
    try:
        have = _existing_tables(source)
        present = [table for table in tables if table.name in have]
        diff = _diff(source, present, target.name, only=True)
        if diff:
            msg = (
                f"the tables of {target.name!r} do not match the models; build it anew with "
                f"clear=True, or fix the models:\n{diff}"
            )
            raise DatasetError(msg)
        copy = sqlite3.connect(temp)
        try:
            source.backup(copy)
        finally:
            copy.close()
    finally:
        source.close()


def _open_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise DatasetError(f"the dataset {path.name!r} does not exist; build it first")
    uri = "file:" + _uri_path(path) + "?mode=ro"
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(uri, uri=True)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()
        raise DatasetError(f"the dataset {path.name!r} cannot be read: {exc}") from None
    return conn


def _uri_path(path: Path) -> str:
    from urllib.parse import quote

    return quote(str(path.resolve()))


# --- schema check -------------------------------------------------------------------------------


def _schema(conn: sqlite3.Connection, names: Iterable[str]) -> list[str]:
    """A table-by-table text of the schema, in an order that does not depend on how it was made."""
    lines = []
    for name in sorted(names):
        q = _quote(name)
        lines.append(f"table {name}")
        columns = conn.execute(f"PRAGMA table_info({q})").fetchall()
        for _, column, type_, notnull, default, pk in sorted(columns, key=lambda row: row[1]):
            parts = [f"  column {column} {(type_ or '(no type)').upper()}"]
            if notnull:
                parts.append("NOT NULL")
            if default is not None:
                parts.append(f"DEFAULT {default}")
            if pk:
                parts.append("PRIMARY KEY" if pk == 1 else f"PRIMARY KEY #{pk}")
            lines.append(" ".join(parts))
        for _, index, unique, origin, _ in sorted(
            conn.execute(f"PRAGMA index_list({q})").fetchall(), key=str
        ):
            indexed = [row[2] for row in conn.execute(f"PRAGMA index_info({_quote(index)})").fetchall()]
            label = {"pk": "primary key", "u": "unique constraint"}.get(origin, f"index {index}")
            lines.append(f"  {'unique ' if unique and origin == 'c' else ''}{label} ({', '.join(indexed)})")
        keys = conn.execute(f"PRAGMA foreign_key_list({q})").fetchall()
        for key in sorted(keys, key=lambda row: (row[2], row[3])):
            lines.append(f"  foreign key ({key[3]}) references {key[2]} ({key[4]})")
    return lines


def _expected(tables: list[Table]) -> list[str]:
    conn = sqlite3.connect(":memory:")
    try:
        for table in tables:
            conn.execute(_ddl(CreateTable(table)))
            for index in table.indexes:
                conn.execute(_ddl(CreateIndex(index)))
        return _schema(conn, [table.name for table in tables])
    finally:
        conn.close()


def _diff(conn: sqlite3.Connection, tables: list[Table], file_name: str, *, only: bool = False) -> str:
    have = {name for name in _existing_tables(conn) if not name.startswith("sqlite_")}
    names = {table.name for table in tables} if only else have
    actual = _schema(conn, sorted(names & have))
    expected = _expected(tables)
    if actual == expected:
        return ""
    return "\n".join(difflib.unified_diff(expected, actual, "models", file_name, lineterm=""))


def check(path: str | os.PathLike[str], models: type | Sequence[type]) -> str:
    """The difference between the file's schema and the models', as a unified diff; "" when they match."""
    tables = _models(models)
    target = Path(path)
    conn = _open_read_only(target)
    try:
        return _diff(conn, tables, target.name)
    finally:
        conn.close()


# --- dump ---------------------------------------------------------------------------------------


def _formatter(column: Column[Any]) -> Callable[[Any], str]:
    type_ = base_type(column.type)
    if isinstance(type_, Boolean):
        return lambda value: "true" if value else "false"
    if isinstance(type_, JSON):
        return lambda value: json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(type_, LargeBinary):
        return lambda value: base64.b64encode(value).decode("ascii")
    if isinstance(type_, (Float, Numeric)):
        return repr if isinstance(type_, Float) or not type_.asdecimal else str
    return lambda value: (
        value.isoformat() if isinstance(value, (datetime.date, datetime.time)) else str(value)
    )


def dump(
    path: str | os.PathLike[str], model: type, out: str | os.PathLike[str] | IO[str], *, null: str = ""
) -> int:
    """Write the model's table from the dataset file to CSV; see :meth:`Dataset.dump`."""
    (table,) = _models(model)
    target = Path(path)
    _open_read_only(target).close()
    url = URL.create("sqlite", database="file:" + _uri_path(target), query={"mode": "ro", "uri": "true"})
    engine = create_engine(url)
    selected = [
        # An Enum is written as stored, whatever Python value it maps to.
        type_coerce(column, String()) if isinstance(base_type(column.type), Enum) else column
        for column in table.columns
    ]
    order = list(table.primary_key.columns) or list(table.columns)
    formats = [_formatter(column) for column in table.columns]
    names = [column.name for column in table.columns]
    written = 0
    try:
        with engine.connect() as conn, _output(out) as file:
            writer = csv.writer(_LineFeeds(file))
            writer.writerow(names)
            for row in conn.execute(select(*selected).order_by(*order)):
                cells = []
                for name, fmt, value in zip(names, formats, row, strict=True):
                    if value is None:
                        cells.append(null)
                        continue
                    text = fmt(value)
                    if text == null:
                        raise DatasetError(
                            f"a value equal to the null marker {null!r} cannot be told from NULL in the CSV; "
                            "pass another null= (e.g. null='\\\\N') to dump and to build",
                            source=target.name,
                            column=name,
                        )
                    cells.append(text)
                writer.writerow(cells)
                written += 1
    finally:
        engine.dispose()
    return written


class _LineFeeds:
    """Ends each CSV row with "\\n" where the csv module writes "\\r\\n".

    The writer quotes a value holding a character of its line terminator, so
    it must be "\\r\\n" for a lone "\\r" to be quoted (and read back as
    part of the value); the rows themselves end as files under version
    control usually do. The writer writes each row with one call, ending in
    the terminator, so only that last "\\r\\n" changes.
    """

    def __init__(self, file: IO[str]) -> None:
        self.file = file

    def write(self, row: str) -> int:
        return self.file.write(row[:-2] + "\n" if row.endswith("\r\n") else row)


@contextlib.contextmanager
def _output(out: str | os.PathLike[str] | IO[str]) -> Iterator[IO[str]]:
    if not isinstance(out, (str, os.PathLike)):
        yield out
        return
    target = Path(out)
    temp = _temp_beside(target, "writing")
    try:
        with open(temp, "w", encoding="utf-8", newline="") as file:
            yield file
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# --- spec ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What one dataset file is built from, for ``python -m polydatum.sqlalchemy build-dataset``.

    Args:
        path: the SQLite file to write (relative paths are relative to the
            current directory; use ``Path(__file__).parent / ...`` for a
            file in your package).
        models: the mapped class, or a list of them, whose tables the file holds.
        sources: a source for one model, or a dict ``{Model: source}``;
            see :meth:`Dataset.build`.
        defaults: ``{Model: {"column": value}}``; see :meth:`Dataset.build`.
        clear: build the file anew, replacing what it holds (True, the default
            for a spec: it describes the whole file); False adds to it.
        null: the CSV text that stands for NULL.
        vacuum: True: always ``VACUUM`` the file; None: when it has free pages.

    .. versionadded:: 2.0
    """

    path: str | os.PathLike[str]
    models: type | Sequence[type]
    sources: Mapping[Any, Source] | Source
    defaults: Mapping[Any, Mapping[str, Any]] | None = None
    clear: bool = True
    null: str = ""
    vacuum: bool | None = None

    @property
    def file_name(self) -> str:
        """The file's name, without its folder (what messages show)."""
        return Path(os.fspath(self.path)).name

    def model_list(self) -> list[type]:
        """The models, as a list."""
        return [self.models] if isinstance(self.models, type) else list(self.models)

    def build(self, *, progress: bool | None = None) -> dict[str, int]:
        """Build the file; returns the rows loaded per table. See :meth:`Dataset.build`."""
        return build(
            self.path,
            self.models,
            self.sources,
            defaults=self.defaults,
            clear=self.clear,
            null=self.null,
            progress=progress,
            vacuum=self.vacuum,
        )

    def check(self) -> str:
        """The schema difference between the file and the models ("" when none). See :meth:`Dataset.check`."""
        return check(self.path, self.models)

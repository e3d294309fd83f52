"""What a dataset column accepts: values checked and converted by the column's type.

:func:`plan_table` turns a table into one :class:`PlannedColumn` per column:
how text (a CSV cell) and Python values (from dicts or JSON lines) become
the value SQLite stores, and what a missing or empty value becomes.
:func:`row_maker` compiles the fast path from a CSV row to its stored
values; :func:`careful_converter` is the slow path that says which value
failed and why. :mod:`polydatum.sqlalchemy._datasets` builds files with them.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Date,
    DateTime,
    Enum,
    Float,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Table,
    Time,
    TypeDecorator,
    Uuid,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.types import TypeEngine

from polydatum.errors import DatasetError
from polydatum.sqlalchemy._filters import _INT64

__all__ = [
    "DIALECT",
    "NO_DEFAULT",
    "Bad",
    "PlannedColumn",
    "base_type",
    "careful_converter",
    "omitted",
    "plan_table",
    "row_maker",
]

DIALECT = sqlite_dialect.dialect()
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})


class Bad(Exception):
    """One value does not fit its column (caught and placed by the row loop)."""


# --- what a column accepts ----------------------------------------------------------------------


def _storable_number(value: Any) -> bool:
    """A number SQLite stores as it is: a 64-bit int, a float or Decimal that is not NaN (infinities are)."""
    if isinstance(value, int):
        return _INT64[0] <= value <= _INT64[1]
    if isinstance(value, float):
        return value == value
    return not isinstance(value, decimal.Decimal) or not value.is_nan()


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(value: object, what: str) -> NoReturn:
    raise Bad(f"{_short(value)} is not {what}")


def base_type(type_: TypeEngine[Any]) -> TypeEngine[Any]:
    # A TypeDecorator's text is parsed as its underlying type; its own
    # process_bind_param then sees that value.
    while isinstance(type_, TypeDecorator):
        type_ = type_.impl_instance
    return type_


def _text_parser(column: Column[Any]) -> Callable[[str], Any] | None:
    """How a CSV cell (text) becomes the column's Python value; None when text is the value."""
    type_ = base_type(column.type)
    if isinstance(type_, Boolean):

        def parse_bool(text: str) -> bool:
            lowered = text.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            _fail(text, "a boolean (true/false, 1/0, yes/no)")

        return parse_bool
    if isinstance(type_, Integer):

        def parse_int(text: str) -> int:
            try:
                number = int(text)
            except ValueError:
                _fail(text, "an integer")
            if not _INT64[0] <= number <= _INT64[1]:
                _fail(text, "an integer of at most 64 bits (SQLite's INTEGER)")
            return number

        return parse_int
    # Float is a Numeric in SQLAlchemy 2.0, not in 2.1: test both.
    if isinstance(type_, (Float, Numeric)):
        if isinstance(type_, Float) or not type_.asdecimal:

            def parse_float(text: str) -> float:
                try:
                    number = float(text)
                except ValueError:
                    _fail(text, "a number")
                if number != number:  # NaN: SQLite would store it as NULL
                    _fail(text, "a number (not NaN)")
                return number

            return parse_float

        def parse_decimal(text: str) -> decimal.Decimal:
            try:
                number = decimal.Decimal(text.strip())
            except decimal.InvalidOperation:
                _fail(text, "a decimal number")
            if number.is_nan():
                _fail(text, "a decimal number (not NaN)")
            return number

        return parse_decimal
    if isinstance(type_, DateTime):
        return _iso(datetime.datetime.fromisoformat, "a date and time (ISO 8601, 2024-05-17T09:30:00)")
    if isinstance(type_, Date):
        return _iso(datetime.date.fromisoformat, "a date (ISO 8601, 2024-05-17)")
    if isinstance(type_, Time):
        return _iso(datetime.time.fromisoformat, "a time (ISO 8601, 09:30:00)")
    if isinstance(type_, Enum):
        return _enum_check(type_)
    if isinstance(type_, String):
        return _length_check(type_.length)
    if isinstance(type_, JSON):

        def parse_json(text: str) -> Any:
            try:
                return json.loads(text)
            except ValueError:
                _fail(text, "JSON")

        return parse_json
    if isinstance(type_, LargeBinary):

        def parse_base64(text: str) -> bytes:
            try:
                return base64.b64decode(text, validate=True)
            except ValueError:
                _fail(text, "base64")

        return parse_base64
    if isinstance(type_, Uuid):
        as_uuid = type_.as_uuid

        def parse_uuid(text: str) -> uuid.UUID | str:
            try:
                value = uuid.UUID(text)
            except ValueError:
                _fail(text, "a UUID")
            return value if as_uuid else str(value)

        return parse_uuid
    return None  # an unknown type gets the text as it is


def _iso(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def parse_iso(text: str) -> Any:
        try:
            return parse(text)
        except ValueError:
            _fail(text, what)

    return parse_iso


def _enum_check(type_: Enum) -> Callable[[str], str]:
    allowed = frozenset(type_.enums)
    listed = ", ".join(type_.enums)

    def parse_enum(text: str) -> str:
        if text not in allowed:
            _fail(text, f"one of {listed}")
        return text

    return parse_enum


def _length_check(length: int | None) -> Callable[[str], str] | None:
    if length is None:
        return None

    def parse_text(text: str) -> str:
        if len(text) > length:
            raise Bad(f"{_short(text)} is {len(text)} characters long; the column holds at most {length}")
        return text

    return parse_text


def _value_coercer(column: Column[Any]) -> Callable[[Any], Any]:
    """How a Python value (from a dict or a JSON line) is checked against the column."""
    type_ = base_type(column.type)
    parse = _text_parser(column)
    if isinstance(type_, JSON):
        return lambda value: value  # any JSON value, strings included
    if isinstance(type_, Boolean):
        accepted: tuple[type, ...] = (bool,)
        what = "a boolean"
    elif isinstance(type_, Integer):
        accepted, what = (int,), "an integer"
    elif isinstance(type_, (Float, Numeric)):
        accepted, what = (int, float, decimal.Decimal), "a number"
    elif isinstance(type_, DateTime):
        accepted, what = (datetime.datetime,), "a date and time"
    elif isinstance(type_, Date):
        accepted, what = (datetime.date,), "a date"
    elif isinstance(type_, Time):
        accepted, what = (datetime.time,), "a time"
    elif isinstance(type_, Enum):
        accepted, what = (
            (type_.enum_class,) if type_.enum_class is not None else (),
            "one of " + ", ".join(type_.enums),
        )
    elif isinstance(type_, String):
        accepted, what = (), "text"
    elif isinstance(type_, LargeBinary):
        accepted, what = (bytes, bytearray, memoryview), "bytes (or base64 text)"
    elif isinstance(type_, Uuid):
        accepted, what = (uuid.UUID,), "a UUID"
    else:
        return lambda value: value

    # bool is an int, and a datetime is a date: neither passes for the other.
    refused: tuple[type, ...] = ()
    if isinstance(type_, (Integer, Float, Numeric)) and not isinstance(type_, Boolean):
        refused = (bool,)
    elif isinstance(type_, Date) and not isinstance(type_, DateTime):
        refused = (datetime.datetime,)

    numeric = isinstance(type_, (Integer, Float, Numeric)) and not isinstance(type_, Boolean)

    def coerce(value: Any) -> Any:
        if isinstance(value, str):
            return parse(value) if parse is not None else value
        if accepted and isinstance(value, accepted) and not isinstance(value, refused):
            if numeric and not _storable_number(value):
                _fail(value, "a number SQLite stores (not NaN; an integer of at most 64 bits)")
            return value
        _fail(value, what)

    return coerce


# --- a model's plan: columns, defaults, the INSERT ---------------------------------------------


NO_DEFAULT = object()


@dataclasses.dataclass
class PlannedColumn:
    column: Column[Any]
    name: str
    parse: Callable[[str], Any] | None
    coerce: Callable[[Any], Any]
    bind: Callable[[Any], Any] | None
    nullable: bool
    # A value to use when the row gives none: a constant or a function.
    default: Any
    default_is_callable: bool
    server_default: bool

    def to_db(self, value: Any) -> Any:
        return value if self.bind is None or value is None else self.bind(value)

    def missing(self) -> Any:
        """The stored value for a row that gives none (the default, or NULL)."""
        if self.default_is_callable:
            value = self.default()
            return None if value is None else self.to_db(self.coerce(value))
        if self.default is not NO_DEFAULT:
            return self.default  # stored form, converted once
        if self.nullable:
            return None
        raise Bad("a value is required (NOT NULL) and the column has no default; give one, or a default")

    def empty(self) -> Any:
        """The stored value for an empty value (None, the CSV's null marker): NULL where allowed."""
        return None if self.nullable else self.missing()


def _plan_column(column: Column[Any], defaults: Mapping[str, Any], autoincrement: bool) -> PlannedColumn:
    impl = column.type.dialect_impl(DIALECT)
    bind = impl.bind_processor(DIALECT)
    coerce = _value_coercer(column)
    default: Any = NO_DEFAULT
    is_callable = False
    if column.name in defaults:
        given = defaults[column.name]
        if callable(given):
            default, is_callable = given, True
        else:
            try:
                default = (bind or (lambda v: v))(coerce(given)) if given is not None else None
            except Bad as exc:
                raise DatasetError(f"the default {exc}", column=column.name) from None
    elif column.default is not None and (column.default.is_scalar or column.default.is_callable):
        arg: Any = column.default.arg  # type: ignore[attr-defined]
        if column.default.is_callable:
            # SQLAlchemy wraps a function of no argument to take the insert context.
            default, is_callable = (lambda: arg(None)), True
        else:
            default = (bind or (lambda v: v))(coerce(arg)) if arg is not None else None
    return PlannedColumn(
        column=column,
        name=column.name,
        parse=_text_parser(column),
        coerce=coerce,
        bind=bind,
        nullable=bool(column.nullable) or autoincrement,
        default=default,
        default_is_callable=is_callable,
        server_default=column.server_default is not None,
    )


def plan_table(table: Table, defaults: Mapping[str, Any]) -> dict[str, PlannedColumn]:
    autoincrement = table.autoincrement_column
    unknown = sorted(set(defaults) - set(table.columns.keys()))
    if unknown:
        raise DatasetError(
            f"defaults for {table.name!r} name {', '.join(map(repr, unknown))}, not columns of the table; "
            f"known: {', '.join(table.columns.keys())}"
        )
    return {column.name: _plan_column(column, defaults, column is autoincrement) for column in table.columns}


def omitted(col: PlannedColumn) -> bool:
    """Whether a column absent from a source is left out of the INSERT (SQLite fills it)."""
    return col.default is NO_DEFAULT and (col.server_default or col.nullable)


def careful_converter(col: PlannedColumn, null: str) -> Callable[[str], Any]:
    """One cell to its stored value, with a message when it does not fit (the slow path)."""
    parse, bind = col.parse, col.bind
    empty_is_missing = bool(null) or col.nullable or parse is not None or col.default is not NO_DEFAULT

    def convert(text: str) -> Any:
        if text == null and empty_is_missing:
            return col.empty()
        value = text if parse is None else parse(text)
        return value if bind is None else bind(value)

    return convert


def row_maker(
    cols: list[PlannedColumn], filled: list[PlannedColumn], null: str, bad: Callable[[list[str]], NoReturn]
) -> Callable[[list[str]], tuple[Any, ...]]:
    """A function from a CSV row to the stored values, compiled for these columns.

    The speed trick of the build: one generated function per source does
    what a hand-written loader does (``(int(r[0]), r[1], float(r[2]))``),
    with no loop over columns and no call for a text column. Only column
    positions and fixed expressions enter the source; converters, defaults
    and the null marker are passed in by name. When anything in it raises,
    ``bad`` runs the careful converters on the row to say which value failed.

    ==========================================  =================================
    column                                      expression for cell ``x``
    ==========================================  =================================
    text, no length, NOT NULL, no default       ``x``
    Integer / Float, NOT NULL, no default       ``int(x)`` / ``float(x)``
    any other                                   ``(conv(x) if x != null else missing())``
    ==========================================  =================================
    """
    names: dict[str, Any] = {"bad": bad, "N": null}
    parts = []
    for i, col in enumerate(cols):
        x = f"r[{i}]"
        type_ = base_type(col.column.type)
        required = not col.nullable and col.default is NO_DEFAULT
        if isinstance(type_, Integer) and not isinstance(type_, Boolean):
            # Past 64 bits SQLite's bind raises OverflowError: the build says where (see _datasets).
            conv, numeric = f"int({x})", True
        elif isinstance(type_, Float) or (isinstance(type_, Numeric) and not type_.asdecimal):
            # NaN fails "v == v" (SQLite would store it as NULL): the careful path then
            # says which cell. Inline: a call per cell would slow builds.
            conv, numeric = f"(v{i} if (v{i} := float({x})) == v{i} else bad(r))", True
        else:
            numeric = False
            conv = x
            if col.parse is not None:
                names[f"p{i}"] = col.parse
                conv = f"p{i}({conv})"
            if col.bind is not None:
                names[f"b{i}"] = col.bind
                conv = f"b{i}({conv})"
        if not null and required and (numeric or (col.parse is None and col.bind is None)):
            # "" fails int()/float() (the careful path says why), and is itself a text value.
            parts.append(conv)
        else:
            names[f"m{i}"] = col.empty
            test = x if not null else f"{x} != N"
            parts.append(f"({conv} if {test} else m{i}())")
    for j, col in enumerate(filled):
        names[f"f{j}"] = col.missing
        parts.append(f"f{j}()")
    source = (
        "def make(r):\n"
        f"    if len(r) != {len(cols)}:\n"
        "        bad(r)\n"
        "    try:\n"
        f"        return ({', '.join(parts)},)\n"
        "    except Exception:\n"
        "        bad(r)\n"
    )
    exec(compile(source, "<polydatum dataset row>", "exec"), names)  # generated from positions only
    make: Callable[[list[str]], tuple[Any, ...]] = names["make"]
    return make

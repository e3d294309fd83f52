"""Indexed paths: their SQL expression on each backend, and what their values may be.

A declared index is an expression index (PostgreSQL and SQLite), and the
queries use the very same expression, literal path included, so the planner
can match them. Each expression is guarded by the JSON type at the path
(``CASE WHEN jsonb_typeof(...) = 'number' THEN ... END``): a value of another
type reads as NULL instead of failing a cast, so a stray document never
aborts a transaction. ``put`` also refuses a value of the wrong type at an
indexed path. Text compares as code points on both backends (``COLLATE "C"``
on PostgreSQL), as Python compares str.

=============  =====================================  ==============================
declared as    a document holds                       a filter takes
=============  =====================================  ==============================
``str``        a str                                  a str
``int``        an int of at most 64 bits              an int
``float``      a float, or an int of at most 64 bits  a float or an int
``bool``       a bool                                 a bool
``datetime``   an aware datetime (any time zone)      an aware datetime
``date``       a date                                 a date
``UUID``       a UUID                                 a UUID
``list``       a list                                 ``contains``: one str, number or bool
=============  =====================================  ==============================
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Float,
    Index,
    Numeric,
    String,
    Table,
    Text,
    TypeDecorator,
    and_,
    case,
    cast,
    exists,
    func,
    literal,
    literal_column,
    select,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import Grouping

from polydatum.documents import _codec
from polydatum.documents._paths import Path
from polydatum.errors import InvalidInput
from polydatum.sqlalchemy._filters import Column
from polydatum.sqlalchemy._filters import _is_text as is_storable_text

_INT64 = (-(2**63), 2**63 - 1)
DIALECTS = ("postgresql", "sqlite")


class _UtcText(TypeDecorator[str]):
    """Binds an aware datetime as the text a datetime index compares: its UTC instant."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return _codec.utc_text(value) if isinstance(value, dt.datetime) else value


class _IsoText(TypeDecorator[str]):
    """Binds a date or a UUID as the text it is stored as."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if isinstance(value, dt.date):
            return value.isoformat()
        if isinstance(value, uuid.UUID):
            return str(value)
        return value


def _is_text(value: Any) -> bool:
    # Exactly a str (not a str enum), and text a database can hold, as the filter language checks it.
    return type(value) is str and is_storable_text(value)


def _is_int(value: Any) -> bool:
    return type(value) is int and _INT64[0] <= value <= _INT64[1]


def _is_number(value: Any) -> bool:
    return _is_int(value) or (type(value) is float and math.isfinite(value))


def _is_aware(value: Any) -> bool:
    return isinstance(value, dt.datetime) and value.utcoffset() is not None


def _is_date(value: Any) -> bool:
    return isinstance(value, dt.date) and not isinstance(value, dt.datetime)


def _is_member(value: Any) -> bool:
    kind = type(value)
    if kind is str:
        return _is_text(value)
    return kind in (bool, int, float) and (kind is not float or math.isfinite(value))


@dataclass(frozen=True)
class Kind:
    """One type an index may be declared with.

    Attributes:
        name: as messages show it.
        kind: the filter language's kind (``text``, ``int``, ``float``, ``bool``,
            ``other``), or ``list`` for membership only.
        sql_type: the type comparisons bind their values with.
        expected: what a filter value must be, in words.
        accepts: whether a filter value fits.
        stored: whether a value at the path of an encoded document (JSON) fits.
        python: the value as SQL sees it, from the decoded document's value
            at the path (None where SQL reads NULL).
        tag: the key inside a tagged value that holds the compared text.
    """

    name: str
    kind: str
    sql_type: Any
    expected: str
    accepts: Callable[[Any], bool]
    stored: Callable[[Any], bool]
    python: Callable[[Any], Any]
    tag: str | None = None


def _keep_if(test: Callable[[Any], bool]) -> Callable[[Any], Any]:
    return lambda value: value if test(value) else None


def _as_float_index(value: Any) -> Any:
    """A float index's value as SQL compares it.

    PostgreSQL's jsonb gives a large float back as an int (1e300 as 10**300):
    that is the float SQL compares, not a missing value (None would send a
    cursor into the NULL rows and skip the rest of the page).
    """
    if _is_number(value):
        return value
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _tagged(tag: str, *more: str) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, dict) and tag in value and all(k in value for k in more)


KINDS: dict[Any, Kind] = {
    str: Kind(
        "str",
        "text",
        String(),
        "a str without NUL or lone surrogates",
        _is_text,
        _is_text,
        _keep_if(_is_text),
    ),
    # Any int as a filter value: the filter language answers one past 64 bits without the database.
    int: Kind("int", "int", BigInteger(), "an int", lambda v: type(v) is int, _is_int, _keep_if(_is_number)),
    float: Kind("float", "float", Float(), "a float or an int", _is_number, _is_number, _as_float_index),
    bool: Kind(
        "bool",
        "bool",
        Boolean(),
        "True or False",
        lambda v: type(v) is bool,
        lambda v: type(v) is bool,
        _keep_if(lambda v: type(v) is bool),
    ),
    dt.datetime: Kind(
        "datetime",
        "other",
        _UtcText(),
        "an aware datetime (with a tzinfo)",
        _is_aware,
        _tagged("$datetime", "tz"),
        _keep_if(_is_aware),
        "$datetime",
    ),
    dt.date: Kind(
        "date", "other", _IsoText(), "a date", _is_date, _tagged("$date"), _keep_if(_is_date), "$date"
    ),
    uuid.UUID: Kind(
        "UUID",
        "other",
        _IsoText(),
        "a uuid.UUID",
        lambda v: isinstance(v, uuid.UUID),
        _tagged("$uuid"),
        _keep_if(lambda v: isinstance(v, uuid.UUID)),
        "$uuid",
    ),
    list: Kind(
        "list",
        "list",
        None,
        "one str (without NUL or lone surrogates), number or bool",
        _is_member,
        lambda v: isinstance(v, list),
        _keep_if(lambda v: isinstance(v, list)),
    ),
}


def kind_of(declared: Any, path: str) -> Kind:
    """The :class:`Kind` an index was declared with (``str``, ``int``, ...).

    Raises:
        TypeError: a type no index can hold.
    """
    found = KINDS.get(declared)
    if found is None:
        names = "str, int, float, bool, datetime, date, UUID, list"
        msg = f"index {path!r} is declared as {declared!r}; an index holds one of: {names}"
        raise TypeError(msg)
    return found


# -- the expressions ------------------------------------------------------------------


def _quoted(text: str) -> Any:
    # Only ever given validated names (see _paths) and fixed tags: nothing to escape.
    return literal_column(f"'{text}'")


def _pg_path(path: Path) -> Any:
    return _quoted("{" + ",".join(path) + "}")


def _lite_path(path: Path) -> Any:
    return _quoted("$." + ".".join(f'"{name}"' if name.startswith("$") else name for name in path))


def _pg_typeof(body: Any, path: Path) -> Any:
    return func.jsonb_typeof(body.op("#>", return_type=JSONB)(_pg_path(path)))


def _lite_type(body: Any, path: Path) -> Any:
    return func.json_type(body, _lite_path(path))


_PG_JSON = {"text": "string", "int": "number", "float": "number", "bool": "boolean", "other": "string"}
_LITE_JSON = {
    "text": ("text",),
    "int": ("integer", "real"),
    "float": ("integer", "real"),
    "bool": ("true", "false"),
    "other": ("text",),
}


def expression(body: Any, path: Path, kind: Kind, dialect: str) -> Any:
    """The typed value at ``path``, NULL when absent or of another JSON type."""
    at = (*path, kind.tag) if kind.tag else path
    if dialect == "postgresql":
        guard = _pg_typeof(body, at) == _quoted(_PG_JSON[kind.kind])
        if kind.name == "datetime":  # naive datetimes have no tz and would compare as local text
            guard = and_(guard, _pg_typeof(body, (*path, "tz")).is_not(None))
        text = body.op("#>>", return_type=Text)(_pg_path(at))
        if kind.kind == "int":
            value = cast(text, Numeric)
        elif kind.kind == "float":
            value = cast(text, Float(precision=53))
        elif kind.kind == "bool":
            value = cast(text, Boolean)
        else:
            return type_coerce(case((guard, text)).collate("C"), kind.sql_type)
        return type_coerce(case((guard, value)), kind.sql_type)
    types = _LITE_JSON[kind.kind]
    kind_test = _lite_type(body, at)
    guard = kind_test == _quoted(types[0]) if len(types) == 1 else kind_test.in_([_quoted(t) for t in types])
    if kind.name == "datetime":
        guard = and_(guard, _lite_type(body, (*path, "tz")).is_not(None))
    return type_coerce(case((guard, func.json_extract(body, _lite_path(at)))), kind.sql_type)


def contains(body: Any, path: Path, value: Any, dialect: str) -> ColumnElement[bool]:
    """Whether the list at ``path`` holds ``value`` (a str, number or bool)."""
    if dialect == "postgresql":
        array = body.op("#>", return_type=JSONB)(_pg_path(path))
        # JSON text cast to jsonb: also renders as a literal (benchmarks/documents.py's EXPLAIN).
        needle = cast(literal(json.dumps([value]), Text), JSONB)
        return array.op("@>")(needle)  # type: ignore[no-any-return]
    items = func.json_each(body, _lite_path(path)).table_valued("value", "type").alias("item")
    match: Any
    if type(value) is bool:
        match = items.c.type == ("true" if value else "false")
    elif type(value) is str:
        match = and_(items.c.type == "text", items.c.value == value)
    else:
        match = and_(items.c.type.in_(("integer", "real")), items.c.value == value)
    is_array = _lite_type(body, path) == _quoted("array")
    return and_(is_array, exists(select(literal_column("1")).select_from(items).where(match)))


def column(collection: str, name: str, body: Any, path: Path, kind: Kind, dialect: str) -> Column:
    """The filter language's view of an indexed (or scanned) path."""
    return Column(
        name,
        f"{collection}.{name}",
        expression(body, path, kind, dialect),
        kind.sql_type,
        True,
        kind.kind,
        kind.expected,
        kind.accepts,
    )


def presence(collection: str, name: str, body: Any, path: Path, dialect: str) -> Column:
    """A scanned path for ``is_null``: NULL where the path is absent or holds JSON null."""
    kind = _pg_typeof(body, path) if dialect == "postgresql" else _lite_type(body, path)
    expr = func.nullif(kind, _quoted("null"))
    return Column(name, f"{collection}.{name}", expr, String(), True, "unchecked", "anything", bool)


def ddl(table: Table, indexes: Mapping[str, tuple[Path, Kind]]) -> None:
    """Add the expression indexes of ``indexes`` to ``table``, one set per backend."""
    body = table.c.body
    for name, (path, kind) in indexes.items():
        digest = hashlib.sha256(f"{table.name}:{name}:{kind.name}".encode()).hexdigest()[:10]
        for dialect in DIALECTS:
            # At most 57 characters: PostgreSQL's identifiers stop at 63.
            index_name = f"ix_{table.name[:40]}_{digest}_{dialect[:2]}"
            if kind.kind == "list":
                if dialect != "postgresql":
                    continue  # SQLite has no index over array members; contains scans there
                array = body.op("#>", return_type=JSONB)(_pg_path(path))
                index = Index(index_name, Grouping(array), postgresql_using="gin")
            else:
                # PostgreSQL wants an index expression other than a function call in parentheses.
                index = Index(index_name, Grouping(expression(body, path, kind, dialect)), table.c.key)
            index.ddl_if(dialect=dialect)  # the expressions bound it to the table already


def check_stored(tree: Any, path: Path, kind: Kind) -> bool:
    """Whether the encoded document ``tree`` holds a value ``kind`` indexes (or nothing) at ``path``."""
    value = tree
    for name in path:
        if not isinstance(value, dict):
            return True  # SQL reads NULL here too
        value = value.get(name)
    return value is None or kind.stored(value)


def python_value(document: Any, path: Path, kind: Kind) -> Any:
    """The value SQL compares for ``path`` of a decoded document (None for NULL)."""
    value = document
    for name in path:
        if isinstance(value, dict):
            value = value.get(name)
        elif hasattr(type(value), "__dataclass_fields__") and name in type(value).__dataclass_fields__:
            value = getattr(value, name)
        else:
            return None
    return None if value is None else kind.python(value)


def refuse_scan(name: str, collection: str, known: list[str]) -> InvalidInput:
    shown = ", ".join(known) or "none"
    msg = (
        f"path {name!r} of collection {collection!r} has no index, so this query would read every "
        f"document; declare the index (indexes={{{name!r}: str}} in define()), or pass "
        f"allow_scan=True to accept the scan. Indexed paths: {shown}"
    )
    return InvalidInput(msg)

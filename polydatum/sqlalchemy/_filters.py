"""The filter language of ``Store``: filters, ``order_by`` and page conditions for one mapped class.

Everything a caller passes is hostile until checked. Names are looked up in
the mapper, so no SQL is built from strings. Values are checked against their
column's Python type before any SQL is built, the same way on every dialect:
a value the database would refuse fails the statement on PostgreSQL and
aborts the whole transaction, so it is refused here instead, with
:class:`~polydatum.errors.InvalidInput` (a ``ValueError``, HTTP 400) naming the
filter and the column. Page cursors (``_cursor``) get the same checks.

What each column accepts, by its SQLAlchemy type:

============================  ===================================================
``Boolean``                   ``True``/``False``
``Integer`` (and its kinds)   an ``int``; one beyond the column's range matches
                              what the arithmetic says, without a query
``Float``                     a ``float``, or an ``int`` of at most 64 bits
``Numeric``                   a finite ``Decimal`` in PostgreSQL's numeric range,
                              a finite ``float`` or an ``int`` of at most 64 bits
``String``, ``Text``          a ``str`` with no NUL and no lone surrogate
``Enum``                      a member, or one of the stored strings
``Date`` / ``DateTime``...    ``date`` (not a ``datetime``) / ``datetime``...
``Uuid``                      a ``uuid.UUID`` (a UUID string for ``as_uuid=False``)
``JSON``, ``ARRAY``           nothing but ``is_null``: they compare differently
                              on each backend
other types                   an instance of the type's ``python_type``; none
                              declared (a ``TypeDecorator``): not checked
============================  ===================================================
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ARRAY,
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    Date,
    DateTime,
    Enum,
    Float,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    SmallInteger,
    String,
    Time,
    Uuid,
    and_,
    cast,
    false,
    inspect,
    literal,
    or_,
    type_coerce,
)

from polydatum.errors import InvalidInput
from polydatum.sqlalchemy import _cursor

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.orm import Mapper

Filters = Mapping[str, Any]
OrderBy = str | Sequence[str]
# (attribute name, descending) for each sort column, the primary key last.
Keys = tuple[tuple[str, bool], ...]
# Called only when a check depends on the backend, so most statements never ask.
DialectOf = Callable[[], "Dialect"]

# -- integer ranges ------------------------------------------------------------------
# The integers each dialect can bind for an integer column; a value outside makes
# PostgreSQL fail the statement (SQLSTATE 22003, aborting the transaction) and
# sqlite3 raise OverflowError, so such values are answered without asking.
_INT64 = (-(2**63), 2**63 - 1)
_POSTGRES_INTS: tuple[tuple[type[Any], tuple[int, int]], ...] = (
    (SmallInteger, (-(2**15), 2**15 - 1)),
    (BigInteger, _INT64),
    (Integer, (-(2**31), 2**31 - 1)),
)
# Below this magnitude an int fits every integer column, so no bounds are looked up.
SMALL_INT = 2**15
# PostgreSQL's numeric holds up to 131072 digits before the point and 16383 after.
_NUMERIC_MAX_ADJUSTED = 131071
_NUMERIC_MIN_EXPONENT = -16383


def _int_range(type_: Any, dialect: str) -> tuple[int, int] | None:
    """The values an integer column of ``type_`` holds on ``dialect``; None if unknown or not an integer."""
    if not isinstance(type_, Integer):
        return None
    if dialect == "sqlite":
        return _INT64  # any integer type is a 64-bit INTEGER there
    if dialect == "postgresql":
        for kind, bounds in _POSTGRES_INTS:
            if isinstance(type_, kind):
                return bounds
    return None  # other dialects (e.g. MySQL's unsigned types) are left to the database


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _large(value: Any) -> bool:
    """Whether ``value`` (or an item of it, for in/not_in) is an int some integer column cannot hold."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_large(v) for v in value)
    return _is_int(value) and not -SMALL_INT < value < SMALL_INT


def _outside(value: Any, bounds: tuple[int, int]) -> bool:
    return _is_int(value) and not bounds[0] <= value <= bounds[1]


def _bounded(op: str, col: Any, value: Any, bounds: tuple[int, int]) -> ColumnElement[bool] | None:
    """``col <op> value`` for an int out of the column's range, decided without the database.

    None when the value is in range (or not an int): then the operator runs as usual.
    """
    if op in ("in", "not_in"):
        values = list(value)
        if not any(_outside(v, bounds) for v in values):
            return None
        kept = [v for v in values if not _outside(v, bounds)]
        if op == "in":
            return col.in_(kept) if kept else false()
        # No row holds the dropped values, so only the kept ones can exclude a row.
        return col.not_in(kept) if kept else col.is_not(None)  # type: ignore[no-any-return]
    if not _outside(value, bounds):
        return None
    above = value > bounds[1]
    if op == "eq":
        return false()
    if op == "ne":
        return col.is_not(None)  # type: ignore[no-any-return]
    if op in ("lt", "lte"):
        return col.is_not(None) if above else false()
    if op in ("gt", "gte"):
        return false() if above else col.is_not(None)
    return None


# -- what a column accepts ---------------------------------------------------------------


def _fits_int64(value: Any) -> bool:
    return _is_int(value) and _INT64[0] <= value <= _INT64[1]


def _is_float(value: Any) -> bool:
    # An int past 64 bits is bound as a numeric, which PostgreSQL casts to bigint and SQLite refuses.
    return isinstance(value, float) or _fits_int64(value)


def _is_decimal(value: Any) -> bool:
    if isinstance(value, Decimal):
        if not value.is_finite():
            return False
        exponent = value.as_tuple().exponent
        return (
            isinstance(exponent, int)
            and value.adjusted() <= _NUMERIC_MAX_ADJUSTED
            and exponent >= _NUMERIC_MIN_EXPONENT
        )
    return (isinstance(value, float) and math.isfinite(value)) or _fits_int64(value)


def _is_text(value: Any) -> bool:
    # PostgreSQL text cannot hold NUL, and a lone surrogate cannot be encoded for any driver.
    if not isinstance(value, str) or "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_date(value: Any) -> bool:
    # A datetime is a date too, but compares differently on each backend.
    return isinstance(value, dt.date) and not isinstance(value, dt.datetime)


def _is_uuid_text(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 64:  # longer than any UUID spelling
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _instance_of(kind: type[Any] | tuple[type[Any], ...]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, kind)


def _nothing(value: Any) -> bool:
    return False


def _anything(value: Any) -> bool:
    return True


@dataclass(frozen=True)
class Column:
    """One mapped column and the values it accepts.

    Attributes:
        name: the attribute's name.
        label: ``Model.attribute``, for messages.
        kind: ``bool int float decimal text enum structured unchecked`` or ``other``.
        expected: what it accepts, in words, for messages.
        accepts: whether a value (not None) fits the column.
        stored: for an Enum with a class, the stored string of each member.
    """

    name: str
    label: str
    attribute: Any
    type: Any
    nullable: bool
    kind: str
    expected: str
    accepts: Callable[[Any], bool]
    stored: Mapping[Any, str] = field(default_factory=dict)

    def sort_key(self, dialect: DialectOf) -> Any:
        """The expression to order and compare by: an Enum by its stored string, on every backend."""
        if self.kind != "enum":
            return self.attribute
        if self.type.native_enum and dialect().supports_native_enum:
            # A native ENUM sorts in declaration order; as text it sorts as on other backends.
            return cast(self.attribute, String)
        return type_coerce(self.attribute, String)

    def param(self, value: Any) -> Any:
        """``value`` as the right side of a comparison with this column."""
        if self.kind == "bool":
            # SQLAlchemy allows only = and != with a bare True/False; a typed literal compares.
            return literal(value, self.type)
        if self.kind == "enum" and isinstance(value, enum.Enum):
            # Also for a str-mixin member: it is stored by name unless values_callable says otherwise.
            return self.stored[value]
        return value


def _column(model: str, name: str, attribute: Any, type_: Any, nullable: bool) -> Column:
    """What a column of ``type_`` accepts (see the module's table); ``type_`` None: not one column."""
    label = f"{model}.{name}"

    def make(kind: str, expected: str, accepts: Callable[[Any], bool]) -> Column:
        return Column(name, label, attribute, type_, nullable, kind, expected, accepts)

    if isinstance(type_, Boolean):
        return make("bool", "True or False", _instance_of(bool))
    if isinstance(type_, Enum):
        return _enum_column(name, label, attribute, type_, nullable)
    if isinstance(type_, Integer):
        return make("int", "an int", _is_int)
    if isinstance(type_, (Numeric, Float)):  # Float is not a Numeric from SQLAlchemy 2.1 on
        if type_.asdecimal:
            return make("decimal", "a finite Decimal, float or int in the column's range", _is_decimal)
        return make("float", "a float, or an int of at most 64 bits", _is_float)
    if isinstance(type_, Uuid) and not type_.as_uuid:
        return make("other", "a UUID string", _is_uuid_text)
    if isinstance(type_, String):
        return make("text", "a str without NUL characters or lone surrogates", _is_text)
    if isinstance(type_, (JSON, ARRAY)):
        return make("structured", "nothing: JSON and ARRAY columns take only is_null", _nothing)
    for sql_type, accepts, expected in (
        (DateTime, _instance_of(dt.datetime), "a datetime.datetime"),
        (Date, _is_date, "a datetime.date (not a datetime)"),
        (Time, _instance_of(dt.time), "a datetime.time"),
        (Interval, _instance_of(dt.timedelta), "a datetime.timedelta"),
        (LargeBinary, _instance_of(bytes), "bytes"),
        (Uuid, _instance_of(uuid.UUID), "a uuid.UUID"),
    ):
        if isinstance(type_, sql_type):
            return make("other", expected, accepts)
    try:
        python_type = object if type_ is None else type_.python_type
    except NotImplementedError:  # SQLAlchemy before 2.1, for a type that declares none
        python_type = object
    if python_type is object:
        return make("unchecked", "anything", _anything)
    return make("other", f"a {python_type.__qualname__}", _instance_of(python_type))


def _enum_column(name: str, label: str, attribute: Any, type_: Enum, nullable: bool) -> Column:
    enums = frozenset(type_.enums)
    shown = ", ".join(repr(e) for e in type_.enums[:10]) + (", ..." if len(type_.enums) > 10 else "")
    enum_class = type_.enum_class
    if enum_class is None:
        return Column(
            name,
            label,
            attribute,
            type_,
            nullable,
            "enum",
            f"one of {shown}",
            lambda value: isinstance(value, str) and value in enums,
        )
    # The member each stored string stands for, first name winning for aliases, as SQLAlchemy does.
    members = [enum_class.__members__[key] for key in enum_class.__members__]
    stored = dict(zip(reversed(members), reversed(type_.enums), strict=False))

    def accepts(value: Any) -> bool:
        return isinstance(value, enum_class) or (isinstance(value, str) and value in enums)

    expected = f"a {enum_class.__name__} member or one of its stored values {shown}"
    return Column(name, label, attribute, type_, nullable, "enum", expected, accepts, stored)


#: The most values an ``in``/``not_in`` filter takes: each is a bound parameter, and
#: PostgreSQL refuses a statement with more than 65,535 of them.
MAX_IN_VALUES = 1000


def show(value: Any) -> str:
    """A short, safe rendering of a value a client sent."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


# -- the language -------------------------------------------------------------------------

_LIKE = {
    "like": lambda c, v: c.like(v),
    "ilike": lambda c, v: c.ilike(v),
    "contains": lambda c, v: c.contains(v, autoescape=True),
    "startswith": lambda c, v: c.startswith(v, autoescape=True),
}
_COMPARE = {
    "eq": lambda c, v: c == v,
    "ne": lambda c, v: c != v,
    "lt": lambda c, v: c < v,
    "lte": lambda c, v: c <= v,
    "gt": lambda c, v: c > v,
    "gte": lambda c, v: c >= v,
}
OPERATORS = frozenset({*_COMPARE, *_LIKE, "in", "not_in", "is_null"})


class Schema:
    """The filter language over named columns: every name and value checked before any SQL.

    :meth:`for_model` builds it for a mapped class (``Store``); ``polydatum.documents``
    builds it from the indexed paths of a collection.
    """

    def __init__(self, name: str, columns: Mapping[str, Column], primary_key: Sequence[str]) -> None:
        self.name = name
        self.columns: dict[str, Column] = dict(columns)
        self.primary_key = tuple(primary_key)
        self._ranges: dict[str, dict[str, tuple[int, int]]] = {}

    @classmethod
    def for_model(cls, model: type[Any]) -> Schema:
        """The language of a mapped class: one :class:`Column` per column attribute."""
        mapper: Mapper[Any] = inspect(model)
        name = model.__name__
        columns: dict[str, Column] = {}
        for prop in mapper.column_attrs:
            nullable = any(getattr(c, "nullable", True) for c in prop.columns)
            # A property over several columns (or an expression) is not type-checked.
            type_ = prop.columns[0].type if len(prop.columns) == 1 else None
            columns[prop.key] = _column(name, prop.key, getattr(model, prop.key), type_, nullable)
        return cls(name, columns, [mapper.get_property_by_column(c).key for c in mapper.primary_key])

    def ranges(self, dialect: str) -> dict[str, tuple[int, int]]:
        """The bounds of this model's integer columns on ``dialect``, by attribute name."""
        ranges = self._ranges.get(dialect)
        if ranges is None:
            ranges = {}
            for name, column in self.columns.items():
                bounds = _int_range(column.type, dialect)
                if bounds is not None:
                    ranges[name] = bounds
            self._ranges[dialect] = ranges
        return ranges

    def holds_no_row(self, values: Mapping[str, Any], dialect: DialectOf) -> bool:
        """Whether an int of ``values`` (by attribute) is one its integer column cannot hold.

        ``dialect`` is called only for large ints, keeping the usual key lookup free of work.
        """
        if not any(_large(v) for v in values.values()):
            return False
        ranges = self.ranges(dialect().name)
        return any(name in ranges and _outside(v, ranges[name]) for name, v in values.items())

    # -- filters

    def where(self, filters: Filters | None, dialect: DialectOf) -> list[ColumnElement[bool]]:
        """The clauses of ``filters``; out-of-range ints are decided here, without the database.

        Raises:
            TypeError: ``filters`` is not a mapping.
            InvalidInput: an unknown column or operator, or a value its column cannot hold.
        """
        if filters is None:
            return []
        if not isinstance(filters, Mapping):
            msg = (
                "filters must be a mapping like {'name': 'x', 'age__gte': 18}, "
                f"got {type(filters).__name__}"
            )
            raise TypeError(msg)
        return [self._clause(key, value, dialect) for key, value in filters.items()]

    def _clause(self, key: Any, value: Any, dialect: DialectOf) -> ColumnElement[bool]:
        if not isinstance(key, str):
            msg = f"filter names are strings like 'age__gte', got {show(key)}"
            raise InvalidInput(msg)
        name, op = (key, "eq") if key in self.columns else _split(key)
        column = self.columns.get(name)
        if column is None:
            msg = (
                f"unknown column {name!r} in filter {key!r} for {self.name}; "
                f"known columns: {', '.join(sorted(self.columns))}"
            )
            raise InvalidInput(msg)
        if op not in OPERATORS:
            msg = (
                f"unknown operator {op!r} in filter {key!r}; known operators: {', '.join(sorted(OPERATORS))}"
            )
            raise InvalidInput(msg)
        col = column.attribute
        if op == "is_null":
            if not isinstance(value, bool):
                raise _refused(key, column, f"the is_null operator takes True or False, got {show(value)}")
            return col.is_(None) if value else col.is_not(None)  # type: ignore[no-any-return]
        if op in _LIKE:
            if column.kind not in ("text", "unchecked"):
                raise _refused(
                    key,
                    column,
                    f"the {op} operator matches text, and this column holds "
                    f"{column.expected}; use eq, lt, gt... instead",
                )
            if not _is_text(value):
                raise _refused(
                    key,
                    column,
                    f"the {op} operator takes a str without NUL characters or lone surrogates, "
                    f"got {show(value)}",
                )
            return _LIKE[op](col, value)  # type: ignore[no-any-return]
        if op in ("in", "not_in"):
            value = values = self._values(key, column, op, value)  # a list, whatever sequence came
        elif value is None and op in ("eq", "ne"):
            return col.is_(None) if op == "eq" else col.is_not(None)  # type: ignore[no-any-return]
        else:
            self._check(key, column, value)
        if column.kind == "int" and _large(value):
            bounds = self.ranges(dialect().name).get(name)
            decided = None if bounds is None else _bounded(op, col, value, bounds)
            if decided is not None:
                return decided
        if op == "in":
            return col.in_(values)  # type: ignore[no-any-return]
        if op == "not_in":
            return col.not_in(values)  # type: ignore[no-any-return]
        if op in ("eq", "ne"):
            return _COMPARE[op](col, value)  # type: ignore[no-any-return]
        # Ranges compare as the order does: booleans as typed literals, enums by stored string.
        return _COMPARE[op](column.sort_key(dialect), column.param(value))  # type: ignore[no-any-return]

    def _values(self, key: str, column: Column, op: str, value: Any) -> list[Any]:
        if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, (Sequence, set, frozenset)):
            raise _refused(
                key, column, f"the {op} operator takes a list, tuple or set of values, got {show(value)}"
            )
        if len(value) > MAX_IN_VALUES:
            raise _refused(
                key,
                column,
                f"an {op} list holds at most {MAX_IN_VALUES} values, got {len(value)}; "
                "query in batches, or filter another way",
            )
        values = list(value)
        for item in values:
            if item is None:
                raise _refused(
                    key,
                    column,
                    f"None in an {op} list never matches a row; filter with column__is_null instead",
                )
            self._check(key, column, item)
        return values

    def _check(self, key: str, column: Column, value: Any) -> None:
        if not column.accepts(value):
            raise _refused(key, column, f"expected {column.expected}, got {show(value)}")

    # -- order and pages

    def order(self, order_by: OrderBy | None) -> Keys:
        """(column, descending) pairs, ending with the primary key so the order is total.

        Raises:
            TypeError: ``order_by`` holds something other than strings.
            InvalidInput: an unknown or repeated column.
        """
        names = [order_by] if isinstance(order_by, str) else list(order_by or ())
        keys: list[tuple[str, bool]] = []
        for spec in names:
            if not isinstance(spec, str):
                msg = f"order_by takes column names like 'name' or '-created', got {spec!r}"
                raise TypeError(msg)
            desc = spec.startswith("-")
            name = spec[1:] if desc else spec
            if name not in self.columns:
                msg = (
                    f"unknown column {name!r} in order_by for {self.name}; "
                    f"known columns: {', '.join(sorted(self.columns))}"
                )
                raise InvalidInput(msg)
            if any(name == k for k, _ in keys):
                msg = f"column {name!r} appears twice in order_by"
                raise InvalidInput(msg)
            keys.append((name, desc))
        keys.extend((k, False) for k in self.primary_key if all(k != n for n, _ in keys))
        return tuple(keys)

    def order_clauses(self, keys: Keys, dialect: DialectOf) -> list[Any]:
        clauses = []
        for name, desc in keys:
            column = self.columns[name]
            expr = column.sort_key(dialect)
            clause = expr.desc() if desc else expr.asc()
            # One NULL placement for every backend, which the keyset relies on.
            clauses.append(clause.nulls_last() if column.nullable else clause)
        return clauses

    def cursor(self, keys: Keys, row: Any, value_of: Callable[[Any, str], Any] = getattr) -> str:
        """The cursor of the page that ends with ``row``; ``value_of(row, name)`` reads a sort value."""
        values = []
        for name, _ in keys:
            value = value_of(row, name)
            column = self.columns[name]
            if column.kind == "enum" and value is not None:
                value = column.param(value)  # its stored string
            values.append(value)
        return _cursor.encode(_names(keys), values)

    def after(self, keys: Keys, cursor: Any, dialect: DialectOf) -> ColumnElement[bool]:
        """Rows strictly after the cursor's row in ``keys`` order (NULLs last).

        Raises:
            InvalidInput: the cursor is garbled, made for another order, or holds
                a value its column cannot (a forged one).
        """
        values = _cursor.decode(cursor, _names(keys))
        columns = [self.columns[name] for name, _ in keys]
        for column, value in zip(columns, values, strict=True):
            self._check_cursor_value(column, value, dialect)
        exprs = [c.sort_key(dialect) for c in columns]
        alternatives = []
        for i, (column, (_, desc)) in enumerate(zip(columns, keys, strict=True)):
            ties = [_equal(columns[j], exprs[j], values[j]) for j in range(i)]
            alternatives.append(and_(*ties, _beyond(column, exprs[i], desc, values[i])))
        return or_(*alternatives)

    def _check_cursor_value(self, column: Column, value: Any, dialect: DialectOf) -> None:
        if value is None:
            if column.nullable:
                return
            problem = "is NULL, which that column never holds"
        elif not column.accepts(value):
            problem = f"is not {column.expected}"
        elif column.kind == "int":
            bounds = self.ranges(dialect().name).get(column.name)
            if bounds is None or not _outside(value, bounds):
                return
            problem = f"is outside the column's range, {bounds[0]} to {bounds[1]}"
        else:
            return
        msg = (
            f"invalid page cursor: its value for {column.label} {problem}; "
            "pass the next_cursor of a previous page unchanged"
        )
        raise InvalidInput(msg)


def _refused(key: str, column: Column, problem: str) -> InvalidInput:
    return InvalidInput(f"filter {key!r} on {column.label}: {problem}")


def _split(key: str) -> tuple[str, str]:
    name, sep, op = key.rpartition("__")
    return (name, op) if sep else (key, "eq")


def _names(keys: Keys) -> list[str]:
    return [("-" if desc else "") + name for name, desc in keys]


def _equal(column: Column, expr: Any, value: Any) -> ColumnElement[bool]:
    return expr.is_(None) if value is None else expr == column.param(value)  # type: ignore[no-any-return]


def _beyond(column: Column, expr: Any, desc: bool, value: Any) -> ColumnElement[bool]:
    if value is None:
        return false()  # NULLs sort last: nothing comes after them in this column
    param = column.param(value)
    beyond = expr < param if desc else expr > param
    return or_(beyond, expr.is_(None)) if column.nullable else beyond

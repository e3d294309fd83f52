"""``Store[Model]``: a generic service for one mapped class, with validated queries."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import typing
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    SmallInteger,
    and_,
    false,
    func,
    inspect,
    or_,
    select,
)
from sqlalchemy.orm import InstrumentedAttribute, Mapper

from polydatum import Service
from polydatum.errors import ConcurrencyConflict, NotFound

if TYPE_CHECKING:
    from sqlalchemy import Select
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

M = TypeVar("M")

Filters = Mapping[str, Any]
OrderBy = str | Sequence[str]


def _in(col: Any, value: Any) -> ColumnElement[bool]:
    return col.in_(_sequence(value))  # type: ignore[no-any-return]


def _not_in(col: Any, value: Any) -> ColumnElement[bool]:
    return col.not_in(_sequence(value))  # type: ignore[no-any-return]


def _is_null(col: Any, value: Any) -> ColumnElement[bool]:
    if not isinstance(value, bool):
        msg = f"the is_null operator takes True or False, got {value!r}"
        raise ValueError(msg)
    return col.is_(None) if value else col.is_not(None)  # type: ignore[no-any-return]


def _sequence(value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, set, frozenset)):
        msg = f"the in/not_in operators take a list, tuple or set of values, got {value!r}"
        raise ValueError(msg)
    return list(value)


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
_SMALL = 2**15


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
    return _is_int(value) and not -_SMALL < value < _SMALL


def _outside(value: Any, bounds: tuple[int, int]) -> bool:
    return _is_int(value) and not bounds[0] <= value <= bounds[1]


def _bounded(
    op: str, col: Any, value: Any, bounds: tuple[int, int]
) -> ColumnElement[bool] | None:
    """``col <op> value`` for an int out of the column's range, decided without the database.

    None when the value is in range (or not an int): then the operator runs as usual.
    """
    if op in ("in", "not_in"):
        values = _sequence(value)
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


_OPERATORS: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
    "eq": lambda c, v: c.is_(None) if v is None else c == v,
    "ne": lambda c, v: c.is_not(None) if v is None else c != v,
    "lt": lambda c, v: c < v,
    "lte": lambda c, v: c <= v,
    "gt": lambda c, v: c > v,
    "gte": lambda c, v: c >= v,
    "in": _in,
    "not_in": _not_in,
    "like": lambda c, v: c.like(v),
    "ilike": lambda c, v: c.ilike(v),
    "contains": lambda c, v: c.contains(v, autoescape=True),
    "startswith": lambda c, v: c.startswith(v, autoescape=True),
    "is_null": _is_null,
}


@dataclass(frozen=True)
class Page(Generic[M]):
    """One page of :meth:`Store.search` results.

    Attributes:
        items: the objects on this page, in order.
        next_cursor: pass it as ``after=`` for the next page; None on the last page.

    .. versionadded:: 2.0
    """

    items: list[M]
    next_cursor: str | None = None

    def __iter__(self) -> Iterator[M]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _Queries:
    """Statements for one mapped class; everything user-supplied is checked against the mapper."""

    def __init__(self, model: type[Any]) -> None:
        mapper: Mapper[Any] = inspect(model)
        self.model = model
        self.name = model.__name__
        self.attributes = frozenset(mapper.attrs.keys())
        self.columns: dict[str, InstrumentedAttribute[Any]] = {}
        self.nullable: dict[str, bool] = {}
        for prop in mapper.column_attrs:
            self.columns[prop.key] = getattr(model, prop.key)
            self.nullable[prop.key] = any(getattr(c, "nullable", True) for c in prop.columns)
        self.primary_key = tuple(mapper.get_property_by_column(c).key for c in mapper.primary_key)
        self.types: dict[str, Any] = {
            prop.key: prop.columns[0].type for prop in mapper.column_attrs if len(prop.columns) == 1
        }
        self._ranges: dict[str, dict[str, tuple[int, int]]] = {}
        version = mapper.version_id_col
        self.version = None if version is None else mapper.get_property_by_column(version).key

    def _unknown(self, what: str, name: str, known: Any) -> ValueError:
        return ValueError(
            f"unknown {what} {name!r} for {self.name}; known: {', '.join(sorted(known))}"
        )

    def check_values(self, values: Mapping[str, Any]) -> None:
        for key in values:
            if key not in self.attributes:
                raise self._unknown("attribute", key, self.attributes)

    def ranges(self, dialect: str) -> dict[str, tuple[int, int]]:
        """The bounds of this model's integer columns on ``dialect``, by attribute name."""
        ranges = self._ranges.get(dialect)
        if ranges is None:
            ranges = {}
            for name, type_ in self.types.items():
                bounds = _int_range(type_, dialect)
                if bounds is not None:
                    ranges[name] = bounds
            self._ranges[dialect] = ranges
        return ranges

    def _key_values(self, ident: Any) -> dict[str, Any]:
        """The primary key's values by attribute name; {} for a shape Session.get will refuse."""
        pk = self.primary_key
        if isinstance(ident, Mapping):
            return {name: ident[name] for name in pk if name in ident}
        if isinstance(ident, (tuple, list)):
            return dict(zip(pk, ident, strict=False)) if len(ident) == len(pk) else {}
        return {pk[0]: ident} if len(pk) == 1 else {}

    def absent_key(self, ident: Any, dialect: Callable[[], str]) -> bool:
        """Whether ``ident`` has an int no key column can hold, so no row can have it.

        ``dialect`` is called only for large ints, keeping the usual lookup free of work.
        """
        values = self._key_values(ident)
        if not any(_large(v) for v in values.values()):
            return False
        ranges = self.ranges(dialect())
        return any(name in ranges and _outside(v, ranges[name]) for name, v in values.items())

    def where(
        self, filters: Filters | None, dialect: Callable[[], str] | None = None
    ) -> list[ColumnElement[bool]]:
        """The clauses of ``filters``; with ``dialect``, out-of-range ints are decided here."""
        if filters is None:
            return []
        if not isinstance(filters, Mapping):
            msg = (
                "filters must be a mapping like {'name': 'x', 'age__gte': 18}, "
                f"got {type(filters).__name__}"
            )
            raise TypeError(msg)
        clauses = []
        for key, value in filters.items():
            name, op = (key, "eq") if key in self.columns else _split(key)
            column = self.columns.get(name)
            if column is None:
                msg = (
                    f"unknown column {name!r} in filter {key!r} for {self.name}; "
                    f"known columns: {', '.join(sorted(self.columns))}"
                )
                raise ValueError(msg)
            operator = _OPERATORS.get(op)
            if operator is None:
                msg = (
                    f"unknown operator {op!r} in filter {key!r}; "
                    f"known operators: {', '.join(sorted(_OPERATORS))}"
                )
                raise ValueError(msg)
            bounds = None
            if dialect is not None and name in self.types and _large(value):
                bounds = self.ranges(dialect()).get(name)
            clause = None if bounds is None else _bounded(op, column, value, bounds)
            clauses.append(operator(column, value) if clause is None else clause)
        return clauses

    def order(self, order_by: OrderBy | None) -> tuple[tuple[str, bool], ...]:
        """(column, descending) pairs, ending with the primary key so the order is total."""
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
                raise ValueError(msg)
            if any(name == k for k, _ in keys):
                msg = f"column {name!r} appears twice in order_by"
                raise ValueError(msg)
            keys.append((name, desc))
        keys.extend((k, False) for k in self.primary_key if all(k != n for n, _ in keys))
        return tuple(keys)

    def order_clauses(self, keys: tuple[tuple[str, bool], ...]) -> list[Any]:
        clauses = []
        for name, desc in keys:
            col = self.columns[name]
            clause = col.desc() if desc else col.asc()
            # One NULL placement for every backend, which the keyset relies on.
            clauses.append(clause.nulls_last() if self.nullable[name] else clause)
        return clauses

    def after(self, keys: tuple[tuple[str, bool], ...], cursor: str) -> ColumnElement[bool]:
        """Rows strictly after the cursor's row in ``keys`` order (NULLs last)."""
        values = _decode_cursor(cursor, keys)
        alternatives = []
        for i, (name, desc) in enumerate(keys):
            ties = [self._equal(n, values[j]) for j, (n, _) in enumerate(keys[:i])]
            alternatives.append(and_(*ties, self._beyond(name, desc, values[i])))
        return or_(*alternatives)

    def _equal(self, name: str, value: Any) -> ColumnElement[bool]:
        col = self.columns[name]
        return col.is_(None) if value is None else col == value

    def _beyond(self, name: str, desc: bool, value: Any) -> ColumnElement[bool]:
        col = self.columns[name]
        if value is None:
            return false()  # NULLs sort last: nothing comes after them in this column
        beyond = col < value if desc else col > value
        return or_(beyond, col.is_(None)) if self.nullable[name] else beyond

    def search(
        self,
        filters: Filters | None,
        order_by: OrderBy | None,
        limit: int | None,
        after: str | None,
        max_limit: int,
        dialect: Callable[[], str] | None = None,
    ) -> tuple[Select[Any], tuple[tuple[str, bool], ...]]:
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= max_limit
        ):
            msg = f"limit must be an int from 1 to {max_limit}, got {limit!r}"
            raise ValueError(msg)
        keys = self.order(order_by)
        stmt = select(self.model).where(*self.where(filters, dialect))
        if after is not None:
            stmt = stmt.where(self.after(keys, after))
        stmt = stmt.order_by(*self.order_clauses(keys))
        if limit is not None:
            stmt = stmt.limit(limit + 1)  # one more tells whether a next page exists
        return stmt, keys

    def page(
        self, rows: list[Any], limit: int | None, keys: tuple[tuple[str, bool], ...]
    ) -> Page[Any]:
        if limit is None or len(rows) <= limit:
            return Page(rows)
        rows = rows[:limit]
        last = rows[-1]
        return Page(rows, _encode_cursor(keys, [getattr(last, name) for name, _ in keys]))

    def count(self, filters: Filters | None, dialect: Callable[[], str] | None = None) -> Select[Any]:
        return select(func.count()).select_from(self.model).where(*self.where(filters, dialect))

    def exists(self, filters: Filters | None, dialect: Callable[[], str] | None = None) -> Select[Any]:
        pk = self.columns[self.primary_key[0]]
        return select(select(pk).where(*self.where(filters, dialect)).exists())

    def check_version(self, obj: Any, ident: Any, expected: int | None) -> None:
        if expected is None:
            return
        if self.version is None:
            msg = (
                f"{self.name} has no version column, so expected_version cannot be checked; "
                "add the Versioned mixin to the model"
            )
            raise ValueError(msg)
        current = getattr(obj, self.version)
        if current != expected:
            msg = (
                f"{self.name} {ident!r} is at version {current}, not {expected}: someone else "
                "changed it; reload it and apply the change again"
            )
            raise ConcurrencyConflict(msg)


def _split(key: str) -> tuple[str, str]:
    name, sep, op = key.rpartition("__")
    return (name, op) if sep else (key, "eq")


# -- cursors ---------------------------------------------------------------------
# A cursor is the sort key of the last row of a page plus the order it was made
# for, as base64url JSON. It is opaque to callers but not secret or signed:
# forging one only lets a caller start a page elsewhere, which filters allow anyway.

_TAGS: dict[str, Callable[[str], Any]] = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "decimal": Decimal,
    "uuid": uuid.UUID,
    "bytes": lambda s: base64.b64decode(s.encode()),
}


def _encode_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    for tag, kind in (("datetime", dt.datetime), ("date", dt.date), ("time", dt.time)):
        if isinstance(value, kind):
            return {tag: value.isoformat()}
    if isinstance(value, Decimal):
        return {"decimal": str(value)}
    if isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    msg = (
        f"cannot make a page cursor from a {type(value).__name__} value; order by columns "
        "holding numbers, strings, dates, times, decimals, UUIDs or bytes"
    )
    raise TypeError(msg)


def _encode_cursor(keys: tuple[tuple[str, bool], ...], values: list[Any]) -> str:
    order = [("-" if desc else "") + name for name, desc in keys]
    payload = json.dumps([order, [_encode_value(v) for v in values]], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, keys: tuple[tuple[str, bool], ...]) -> list[Any]:
    order = [("-" if desc else "") + name for name, desc in keys]
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        made_for, values = json.loads(raw)
        decoded = [_decode_value(v) for v in values]
    except (ValueError, TypeError, KeyError, ArithmeticError, binascii.Error):
        msg = "invalid page cursor; pass the next_cursor of a previous page unchanged"
        raise ValueError(msg) from None
    if made_for != order or len(decoded) != len(keys):
        msg = (
            f"this cursor was made for order_by {made_for!r}, not {order!r}; "
            "search with the same filters and order_by as the page it came from"
        )
        raise ValueError(msg)
    return decoded


def _decode_value(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    ((tag, text),) = value.items()
    return _TAGS[tag](text)


# -- the services ------------------------------------------------------------------


def _model_from_generic(cls: type[Any], base: type[Any]) -> type[Any] | None:
    for orig in getattr(cls, "__orig_bases__", ()):
        origin = typing.get_origin(orig)
        if isinstance(origin, type) and issubclass(origin, base):
            (arg,) = typing.get_args(orig)
            if isinstance(arg, type):
                return arg
    return None


class _StoreBase(Service, Generic[M]):
    model: type[M]
    database: str = "db"
    max_limit: int = 1000

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found = _model_from_generic(cls, _StoreBase)
        if found is not None:
            cls.model = found

    def __init__(self, model: type[M] | None = None, *, database: str | None = None) -> None:
        super().__init__()
        if model is not None:
            self.model = model
        if database is not None:
            self.database = database
        if getattr(self, "model", None) is None:
            msg = (
                f"{type(self).__name__} needs a mapped class: subclass "
                f"{type(self).__name__}[Note] or pass it, as in Store(Note)"
            )
            raise TypeError(msg)

    @cached_property
    def _queries(self) -> _Queries:
        return _Queries(self.model)

    def _dialect(self, session: Session | AsyncSession) -> Callable[[], str]:
        """A function naming the dialect ``session`` uses for this model (no round trip)."""
        return lambda: session.get_bind(self.model).dialect.name


class Store(_StoreBase[M]):
    """A service for one mapped class, on the session resource ``database`` (default ``"db"``).

    Subclass it with the model as type argument and add your own methods::

        class Notes(Store[Note]):
            def by_author(self, author_id: int) -> Page[Note]:
                return self.search({"author_id": author_id}, order_by="-created")

        dm.register_services(notes=Notes())

    Filters map ``"column"`` or ``"column__operator"`` to a value; operators are
    ``eq ne lt lte gt gte in not_in like ilike contains startswith is_null``.
    Every name is checked against the mapper, so no SQL is ever built from
    strings: an unknown column or operator is a ValueError naming it.

    Class attributes: ``model``, ``database`` (the resource name) and
    ``max_limit`` (the largest page, 1000).

    .. versionadded:: 2.0
    """

    @property
    def session(self) -> Session:
        """The active context's session for this store's database."""
        session: Session = getattr(self._ctx, self.database)
        return session

    def get(self, ident: Any) -> M | None:
        """The object with this primary key (a tuple for composite keys), or None.

        An int no key column can hold (``2**31`` for an INTEGER key on
        PostgreSQL) is None without a query, so the transaction stays usable.
        """
        session = self.session
        if self._queries.absent_key(ident, self._dialect(session)):
            return None
        return session.get(self.model, ident)

    def require(self, ident: Any) -> M:
        """The object with this primary key.

        Raises:
            NotFound: there is none.
        """
        obj = self.get(ident)
        if obj is None:
            msg = f"{self.model.__name__} {ident!r} not found"
            raise NotFound(msg)
        return obj

    def create(self, **values: Any) -> M:
        """Add a new object and flush it, so defaults and the primary key are set.

        Raises:
            ValueError: a name in ``values`` is not a mapped attribute.
        """
        self._queries.check_values(values)
        obj = self.model(**values)
        session = self.session
        session.add(obj)
        session.flush()
        return obj

    def update(self, ident: Any, /, *, expected_version: int | None = None, **values: Any) -> M:
        """Set attributes of an existing object and flush.

        Args:
            ident: the primary key.
            expected_version: for :class:`Versioned` models, the version the
                caller saw (e.g. sent back by a form); another version means
                someone else changed the row first.
            **values: the attributes to set.

        Raises:
            NotFound: no such object.
            ConcurrencyConflict: the version differs, or the row changed
                while this context was writing it.
            ValueError: a name in ``values`` is not a mapped attribute.
        """
        self._queries.check_values(values)
        obj = self.require(ident)
        self._queries.check_version(obj, ident, expected_version)
        for key, value in values.items():
            setattr(obj, key, value)
        self.session.flush()
        return obj

    def delete(self, ident: Any, /, *, expected_version: int | None = None) -> bool:
        """Delete the object with this primary key; False if there was none.

        Args:
            ident: the primary key.
            expected_version: as for :meth:`update`: the version the caller saw.

        Raises:
            ConcurrencyConflict: the version differs, or the row changed
                while this context was deleting it.
        """
        obj = self.get(ident)
        if obj is None:
            return False
        self._queries.check_version(obj, ident, expected_version)
        session = self.session
        session.delete(obj)
        session.flush()
        return True

    def search(
        self,
        filters: Filters | None = None,
        order_by: OrderBy | None = None,
        limit: int | None = None,
        *,
        after: str | None = None,
    ) -> Page[M]:
        """Objects matching ``filters``, one page at a time (keyset pagination).

        Args:
            filters: e.g. ``{"author_id": 3, "created__gte": since}``.
            order_by: column names, ``"-name"`` for descending; the primary
                key is always added last so the order is total.
            limit: page size, 1 to ``max_limit``; None returns every match.
            after: the ``next_cursor`` of the previous page.

        Raises:
            ValueError: unknown column or operator, bad limit, or a cursor made
                for another order.
        """
        q = self._queries
        session = self.session
        stmt, keys = q.search(filters, order_by, limit, after, self.max_limit, self._dialect(session))
        return q.page(list(session.scalars(stmt)), limit, keys)

    def count(self, filters: Filters | None = None) -> int:
        """How many objects match ``filters``."""
        session = self.session
        return int(session.scalar(self._queries.count(filters, self._dialect(session))) or 0)

    def exists(self, filters: Filters | None = None) -> bool:
        """Whether any object matches ``filters``."""
        session = self.session
        return bool(session.scalar(self._queries.exists(filters, self._dialect(session))))


class AsyncStore(_StoreBase[M]):
    """The asyncio twin of :class:`Store`, on an :class:`AsyncDatabase` resource.

    Same methods, awaited: ``await dal.notes.get(1)``.

    .. versionadded:: 2.0
    """

    async def session(self) -> AsyncSession:
        """The active context's AsyncSession for this store's database."""
        session: AsyncSession = await self._ctx.aget(self.database)
        return session

    async def get(self, ident: Any) -> M | None:
        """The object with this primary key, or None (see :meth:`Store.get`)."""
        session = await self.session()
        if self._queries.absent_key(ident, self._dialect(session)):
            return None
        return await session.get(self.model, ident)

    async def require(self, ident: Any) -> M:
        """The object with this primary key; raises NotFound when there is none."""
        obj = await self.get(ident)
        if obj is None:
            msg = f"{self.model.__name__} {ident!r} not found"
            raise NotFound(msg)
        return obj

    async def create(self, **values: Any) -> M:
        """Add a new object and flush it (see :meth:`Store.create`)."""
        self._queries.check_values(values)
        obj = self.model(**values)
        session = await self.session()
        session.add(obj)
        await session.flush()
        return obj

    async def update(
        self, ident: Any, /, *, expected_version: int | None = None, **values: Any
    ) -> M:
        """Set attributes of an existing object and flush (see :meth:`Store.update`)."""
        self._queries.check_values(values)
        obj = await self.require(ident)
        self._queries.check_version(obj, ident, expected_version)
        for key, value in values.items():
            setattr(obj, key, value)
        await (await self.session()).flush()
        return obj

    async def delete(self, ident: Any, /, *, expected_version: int | None = None) -> bool:
        """Delete the object with this primary key; False if there was none (see :meth:`Store.delete`)."""
        obj = await self.get(ident)
        if obj is None:
            return False
        session = await self.session()
        self._queries.check_version(obj, ident, expected_version)
        await session.delete(obj)
        await session.flush()
        return True

    async def search(
        self,
        filters: Filters | None = None,
        order_by: OrderBy | None = None,
        limit: int | None = None,
        *,
        after: str | None = None,
    ) -> Page[M]:
        """Objects matching ``filters``, one page at a time (see :meth:`Store.search`)."""
        q = self._queries
        session = await self.session()
        stmt, keys = q.search(filters, order_by, limit, after, self.max_limit, self._dialect(session))
        result = await session.scalars(stmt)
        return q.page(list(result), limit, keys)

    async def count(self, filters: Filters | None = None) -> int:
        """How many objects match ``filters``."""
        session = await self.session()
        return int(await session.scalar(self._queries.count(filters, self._dialect(session))) or 0)

    async def exists(self, filters: Filters | None = None) -> bool:
        """Whether any object matches ``filters``."""
        session = await self.session()
        return bool(await session.scalar(self._queries.exists(filters, self._dialect(session))))

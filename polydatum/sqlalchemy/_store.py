"""``Store[Model]``: a generic service for one mapped class, with validated queries.

The filter language (names, values, order, page conditions) lives in
``_filters`` and the page cursor format in ``_cursor``; this module adds the
statements and the services.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import func, inspect, select

from polydatum import Service
from polydatum.errors import ConcurrencyConflict, InvalidInput, NotFound, ResourceException
from polydatum.sqlalchemy._database import use_primary
from polydatum.sqlalchemy._filters import SMALL_INT, Filters, Keys, OrderBy, Schema, _is_text, show

if TYPE_CHECKING:
    from sqlalchemy import Select
    from sqlalchemy.engine import Dialect
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Mapper, Session

M = TypeVar("M")


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


def _protected(mapper: Mapper[Any]) -> tuple[dict[str, str], dict[str, str]]:
    """The attributes create and update refuse unless asked for, each with the reason.

    Both refuse the version column (writing it would rewind the optimistic lock)
    and columns marked ``info={"read_only": True}``. Update also refuses the
    primary key; create refuses only a key the database generates (an
    autoincrement or defaulted column), since a natural key must be given.
    """
    create: dict[str, str] = {}
    update: dict[str, str] = {}
    for prop in mapper.column_attrs:
        # getattr: a column_property may map an expression, which has no info.
        if any(getattr(c, "info", {}).get("read_only") for c in prop.columns):
            create[prop.key] = update[prop.key] = "it is marked read-only"
    for column in mapper.primary_key:
        key = mapper.get_property_by_column(column).key
        update[key] = "it is the primary key"
        generated = (
            column.default is not None
            or column.server_default is not None
            or column is column.table.autoincrement_column
        )
        if generated:
            create[key] = "the database generates it"
    version = mapper.version_id_col
    if version is not None:
        key = mapper.get_property_by_column(version).key
        create[key] = update[key] = "it is the optimistic-lock version, set by every write"
    return create, update


class _Queries:
    """Statements for one mapped class; everything user-supplied is checked against the mapper."""

    def __init__(self, model: type[Any]) -> None:
        mapper: Mapper[Any] = inspect(model)
        self.model = model
        self.name = model.__name__
        self.schema = Schema.for_model(model)
        self.attributes = frozenset(mapper.attrs.keys())
        self.primary_key = self.schema.primary_key
        self.protected_on_create, self.protected_on_update = _protected(mapper)
        version = mapper.version_id_col
        self.version = None if version is None else mapper.get_property_by_column(version).key
        # String(n) columns: a longer value is refused before the SQL (PostgreSQL would
        # fail the statement, SQLite would store it: the same answer everywhere).
        self.max_lengths = {
            prop.key: length
            for prop in mapper.column_attrs
            if len(prop.columns) == 1
            and isinstance(length := getattr(getattr(prop.columns[0], "type", None), "length", None), int)
        }

    def check_values(
        self, values: Mapping[str, Any], protected: Mapping[str, str], allowed: Collection[str] | str
    ) -> None:
        """Refuse unknown names, and protected ones that ``allowed`` does not name."""
        names = (allowed,) if isinstance(allowed, str) else allowed
        if names:
            for name in names:
                if name not in protected:
                    msg = (
                        f"allow_protected names {name!r}, which is not a protected attribute of "
                        f"{self.name} here; protected: {', '.join(sorted(protected)) or 'none'}"
                    )
                    raise ValueError(msg)
        attributes = self.attributes
        for key in values:  # one pass, two dict lookups a name: create/update stay cheap
            if key not in attributes:
                known = ", ".join(sorted(attributes))
                msg = f"unknown attribute {key!r} for {self.name}; known: {known}"
                raise InvalidInput(msg)
            if key in protected and key not in names:
                msg = (
                    f"{self.name}.{key} cannot be set here: {protected[key]}; pass "
                    f"allow_protected={{{key!r}}} if this call really means to write it"
                )
                raise InvalidInput(msg)
            value = values[key]
            if isinstance(value, str):
                self._check_text(key, value)

    def _check_text(self, key: str, value: str) -> None:
        """Refuse text no database column can store, or longer than its String(n), before any SQL."""
        if not _is_text(value):
            msg = (
                f"{self.name}.{key} takes text without NUL characters or lone surrogates "
                f"(the database cannot store them), got {show(value)}"
            )
            raise InvalidInput(msg)
        limit = self.max_lengths.get(key)
        if limit is not None and len(value) > limit:
            msg = f"{self.name}.{key} holds at most {limit} characters, got {len(value)}"
            raise InvalidInput(msg)

    def check_expected(self, expected: Any) -> None:
        """Refuse an ``expected_version`` that is not an int, before any SQL."""
        if expected is None:
            return
        if self.version is None:
            msg = (
                f"{self.name} has no version column, so expected_version cannot be checked; "
                "add the Versioned mixin to the model"
            )
            raise ValueError(msg)
        if not isinstance(expected, int) or isinstance(expected, bool):
            msg = (
                f"expected_version must be the int version the caller saw, got {show(expected)}; "
                "convert a form or query-string value with int() "
                "and answer a non-number as a bad request"
            )
            raise InvalidInput(msg)

    def check_version(self, obj: Any, ident: Any, expected: int | None) -> None:
        if expected is None:
            return
        current = getattr(obj, str(self.version))
        if current != expected:
            msg = (
                f"{self.name} {ident!r} is at version {current}, not {expected}: someone else "
                "changed it; reload it and apply the change again"
            )
            raise ConcurrencyConflict(msg)

    def absent_key(self, ident: Any, dialect: Callable[[], Dialect]) -> bool:
        """Whether ``ident`` has an int no key column can hold, so no row can have it.

        ``dialect`` is called only for large ints, keeping the usual lookup free of work.
        """
        if type(ident) is int and -SMALL_INT < ident < SMALL_INT:
            return False  # the usual key: nothing to build or look up
        pk = self.primary_key
        if isinstance(ident, Mapping):
            values = {name: ident[name] for name in pk if name in ident}
        elif isinstance(ident, (tuple, list)):
            # A shape Session.get will refuse is left to it.
            values = dict(zip(pk, ident, strict=False)) if len(ident) == len(pk) else {}
        else:
            values = {pk[0]: ident} if len(pk) == 1 else {}
        return self.schema.holds_no_row(values, dialect)

    def search(
        self,
        filters: Filters | None,
        order_by: OrderBy | None,
        limit: int | None,
        after: str | None,
        max_limit: int,
        dialect: Callable[[], Dialect],
    ) -> tuple[Select[Any], Keys]:
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= max_limit
        ):
            msg = f"limit must be an int from 1 to {max_limit}, got {limit!r}"
            raise InvalidInput(msg)
        schema = self.schema
        keys = schema.order(order_by)
        stmt = select(self.model).where(*schema.where(filters, dialect))
        if after is not None:
            stmt = stmt.where(schema.after(keys, after, dialect))
        stmt = stmt.order_by(*schema.order_clauses(keys, dialect))
        if limit is not None:
            stmt = stmt.limit(limit + 1)  # one more tells whether a next page exists
        return stmt, keys

    def page(self, rows: list[Any], limit: int | None, keys: Keys) -> Page[Any]:
        if limit is None or len(rows) <= limit:
            return Page(rows)
        rows = rows[:limit]
        return Page(rows, self.schema.cursor(keys, rows[-1]))

    def count(self, filters: Filters | None, dialect: Callable[[], Dialect]) -> Select[Any]:
        return select(func.count()).select_from(self.model).where(*self.schema.where(filters, dialect))

    def exists(self, filters: Filters | None, dialect: Callable[[], Dialect]) -> Select[Any]:
        pk = self.schema.columns[self.primary_key[0]].attribute
        return select(select(pk).where(*self.schema.where(filters, dialect)).exists())


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

    def _dialect(self, session: Session | AsyncSession) -> Callable[[], Dialect]:
        """A function giving the dialect ``session`` uses for this model (no round trip)."""
        return lambda: session.get_bind(self.model).dialect


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
    strings, and every value against its column's type before any SQL: an
    unknown column or operator, or a value its column cannot hold, is
    :class:`~polydatum.errors.InvalidInput` (a ValueError, HTTP 400) naming the
    filter and the column. Page cursors are checked the same way.

    ``create`` and ``update`` refuse the version column, columns marked
    ``info={"read_only": True}``, and the primary key (on create, only a key
    the database generates) unless the call names them in ``allow_protected``.

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

    def create(self, *, allow_protected: Collection[str] | str = (), **values: Any) -> M:
        """Add a new object and flush it, so defaults and the primary key are set.

        Args:
            allow_protected: protected attributes this call may set (see the class).
            **values: the attributes to set.

        Raises:
            InvalidInput: a name in ``values`` is not a mapped attribute, or is
                protected and not in ``allow_protected``.
        """
        q = self._queries
        q.check_values(values, q.protected_on_create, allow_protected)
        obj = self.model(**values)
        session = self.session
        session.add(obj)
        session.flush()
        return obj

    def update(
        self,
        ident: Any,
        /,
        *,
        expected_version: int | None = None,
        allow_protected: Collection[str] | str = (),
        **values: Any,
    ) -> M:
        """Set attributes of an existing object and flush.

        Args:
            ident: the primary key.
            expected_version: for :class:`Versioned` models, the int version the
                caller saw (e.g. sent back by a form); another version means
                someone else changed the row first.
            allow_protected: protected attributes this call may set (see the class).
            **values: the attributes to set.

        Raises:
            NotFound: no such object.
            ConcurrencyConflict: the version differs, or the row changed
                while this context was writing it.
            InvalidInput: a name in ``values`` is not a mapped attribute, or is
                protected and not in ``allow_protected``; ``expected_version``
                is not an int (a string from a form: convert it first).
        """
        q = self._queries
        q.check_values(values, q.protected_on_update, allow_protected)
        q.check_expected(expected_version)
        use_primary(self.session)  # with replicas: the row a write starts from is the newest
        obj = self.require(ident)
        q.check_version(obj, ident, expected_version)
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
            InvalidInput: ``expected_version`` is not an int.
        """
        self._queries.check_expected(expected_version)
        use_primary(self.session)
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
            InvalidInput: unknown column or operator, a value its column
                cannot hold, a bad limit, or a cursor that is garbled, forged
                or made for another order. It is a ValueError (HTTP 400).
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
        """The active context's AsyncSession for this store's database.

        Raises:
            ResourceException: the context was entered with ``with``, where
                the database gives a sync Session (before any SQL is sent).
        """
        ctx = self._ctx
        if not ctx._async:
            msg = (
                f"{type(self).__name__} is an AsyncStore: its methods need a context entered with "
                f'"async with dm.context():" (in a "with" context the database gives a sync Session; '
                f"use a Store there)"
            )
            raise ResourceException(msg)
        session: AsyncSession = await ctx.aget(self.database)
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

    async def create(self, *, allow_protected: Collection[str] | str = (), **values: Any) -> M:
        """Add a new object and flush it (see :meth:`Store.create`)."""
        q = self._queries
        q.check_values(values, q.protected_on_create, allow_protected)
        obj = self.model(**values)
        session = await self.session()
        session.add(obj)
        await session.flush()
        return obj

    async def update(
        self,
        ident: Any,
        /,
        *,
        expected_version: int | None = None,
        allow_protected: Collection[str] | str = (),
        **values: Any,
    ) -> M:
        """Set attributes of an existing object and flush (see :meth:`Store.update`)."""
        q = self._queries
        q.check_values(values, q.protected_on_update, allow_protected)
        q.check_expected(expected_version)
        use_primary(await self.session())
        obj = await self.require(ident)
        q.check_version(obj, ident, expected_version)
        for key, value in values.items():
            setattr(obj, key, value)
        await (await self.session()).flush()
        return obj

    async def delete(self, ident: Any, /, *, expected_version: int | None = None) -> bool:
        """Delete the object with this primary key; False if there was none (see :meth:`Store.delete`)."""
        self._queries.check_expected(expected_version)
        use_primary(await self.session())
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

"""``Collection`` and ``AsyncCollection``: keyed reads and versioned writes, and queries by indexed paths.

Both run their statements on the context's own session of the database, so
a collection is part of the context's transaction like any Store: what a
context wrote is committed with it, or rolled back with it.

How the version check works (and what it costs): a put that expects a
version is one ``UPDATE ... SET version = version + 1 WHERE key = :k AND
version = :expected`` -- the same single statement an unchecked write would
be, with one more condition. There is no read before the write and no
``SELECT ... FOR UPDATE``. The row lock the UPDATE takes anyway is held until
the commit, so nobody can change the document between the check and the
commit: a concurrent writer waits for the lock, then finds another version
and loses. A put that expects no document is an ``INSERT ... ON CONFLICT
DO NOTHING``. Only the losing path reads again, to say which version it found.
The conflict is raised at the ``put`` call (not later, at the commit), so the
caller may catch it; left uncaught, it rolls the whole context back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from polydatum.documents import _indexes
from polydatum.documents._definition import MAX_KEY, Definition
from polydatum.documents._query import Query
from polydatum.errors import ConcurrencyConflict, InvalidInput, NotFound
from polydatum.sqlalchemy import Page
from polydatum.sqlalchemy._filters import Filters, Keys, OrderBy, Schema, show

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from polydatum.context import DataAccessContext

T = TypeVar("T")


@dataclass(frozen=True)
class Doc(Generic[T]):
    """A document with its key and version.

    Attributes:
        key: its key in the collection.
        version: 1 when first written, one more at each write; pass it back
            as ``expected_version`` to update it.
        value: the document (a dict, or the collection's dataclass).

    .. versionadded:: 2.0
    """

    key: str
    version: int
    value: T


class CollectionBase(Generic[T]):
    """What both collections share: checking input, building statements, reading rows."""

    def __init__(
        self, definition: Definition[T], ctx: DataAccessContext, session: str, dialect: Dialect
    ) -> None:
        self.definition = definition
        self.name = definition.name
        self._ctx = ctx
        self._session_name = session
        # The database's dialect, known without asking the session (get_bind() costs a lookup).
        self._dialect = dialect
        self._dialect_name = dialect.name
        self._query = Query(definition)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- input

    def _key(self, key: Any) -> str:
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY or "\x00" in key or not key.isprintable():
            msg = f"a key of {self.name!r} is a printable str of 1 to {MAX_KEY} characters, got {show(key)}"
            raise InvalidInput(msg)
        return key

    def _expected(self, expected: Any, force: bool) -> int | None:
        if expected is None:
            return None
        if force:
            msg = "pass expected_version or force=True, not both: force writes without checking the version"
            raise ValueError(msg)
        if isinstance(expected, bool) or not isinstance(expected, int) or expected < 1:
            msg = (
                f"expected_version must be the int version the caller read (1 or more), got {show(expected)}"
            )
            raise InvalidInput(msg)
        return expected

    def _encode(self, key: str, value: Any) -> str:
        definition = self.definition
        where = f"{self.name} {key!r}"
        if definition.type is not None and not isinstance(value, definition.type):
            msg = (
                f"{where}: this collection holds {definition.type.__qualname__} documents, got {show(value)}"
            )
            raise TypeError(msg)
        is_dataclass = hasattr(type(value), "__dataclass_fields__") and not isinstance(value, type)
        if definition.type is None and not (isinstance(value, dict) or is_dataclass):
            msg = f"{where}: a document is a dict or a dataclass, got {show(value)}"
            raise TypeError(msg)
        codec = definition.codec
        tree = codec.tree(value, where)
        for name, (path, kind) in definition.indexes.items():
            if not _indexes.check_stored(tree, path, kind):
                msg = (
                    f"{where}: path {name!r} is indexed as {kind.name}, and the document holds "
                    "something else there; store a value of that type, None, or nothing"
                )
                raise InvalidInput(msg)
        return codec.dumps(tree, value, where)

    def _doc(self, key: str, version: int, text: str) -> Doc[T]:
        try:
            value = self.definition.codec.decode(text)
        except (TypeError, ValueError) as exc:
            msg = f"{self.name} {key!r} cannot be read: {exc}"
            raise (TypeError if isinstance(exc, TypeError) else ValueError)(msg) from None
        kind = self.definition.type
        if kind is not None and not isinstance(value, kind):
            msg = f"{self.name} {key!r} holds a {type(value).__qualname__}, not a {kind.__qualname__}"
            raise TypeError(msg)
        return Doc(key, int(version), value)

    def _lost(self, key: str, expected: int | None, found: int | None) -> ConcurrencyConflict:
        where = f"{self.name} {key!r}"
        if expected is None:
            msg = (
                f"{where} exists already, at version {found}; pass expected_version={found} "
                "to replace it (after reading it), or force=True"
            )
        elif found is None:
            msg = f"{where} does not exist (any more), so version {expected} cannot be replaced"
        else:
            msg = (
                f"{where} is at version {found}, not {expected}: someone else changed it; "
                "reload it and apply the change again"
            )
        return ConcurrencyConflict(msg)

    # -- queries

    def _page(self, rows: list[Any], limit: int | None, keys: Keys, schema: Schema) -> Page[Doc[T]]:
        docs = [self._doc(key, version, text) for key, version, text in rows]
        if limit is None or len(docs) <= limit:
            return Page(docs)
        docs = docs[:limit]
        last = docs[-1]
        return Page(docs, self._query.cursor(keys, schema, last.key, last.value))


class Collection(CollectionBase[T]):
    """A collection of documents in a ``with`` context: ``ctx.docs.collection("carts")``.

    Every method runs on the context's session, in its transaction.

    .. versionadded:: 2.0
    """

    def _session(self) -> Session:
        session: Session = getattr(self._ctx, self._session_name)
        return session

    def get(self, key: str) -> Doc[T] | None:
        """The document with this key and its version, or None."""
        session = self._session()
        row = session.execute(
            self.definition.statements(self._dialect_name).get, {"k": self._key(key)}
        ).first()
        return None if row is None else self._doc(key, row[0], row[1])

    def require(self, key: str) -> Doc[T]:
        """The document with this key.

        Raises:
            NotFound: there is none (HTTP 404).
        """
        doc = self.get(key)
        if doc is None:
            msg = f"{self.name} {key!r} not found"
            raise NotFound(msg)
        return doc

    def put(self, key: str, value: T, *, expected_version: int | None = None, force: bool = False) -> Doc[T]:
        """Write a document; by default only if the caller's view of it is current.

        Args:
            key: the document's key.
            value: the document: a dict (or a dataclass), or the collection's dataclass.
            expected_version: the version the caller read; None expects no
                document under ``key`` (a create).
            force: write whatever is there, without a check.

        Returns:
            the document with its new version.

        Raises:
            ConcurrencyConflict: the document is at another version (or
                exists, or not) than the caller expected (HTTP 409).
            InvalidInput: a bad key or version, a value of the wrong type at an
                indexed path, a document over the size limit, a str with NUL.
            TypeError: a value that cannot be stored; the message names its path.
        """
        session = self._session()
        statements = self.definition.statements(self._dialect_name)
        key = self._key(key)
        expected = self._expected(expected_version, force)
        params = {"k": key, "b": self._encode(key, value)}
        if force:
            version = session.execute(statements.upsert, params).scalar_one()
            return Doc(key, int(version), value)
        if expected is None:
            written = session.execute(statements.insert, params).scalar()
        else:
            written = session.execute(statements.update, {**params, "v": expected}).scalar()
        if written is None:
            found = session.execute(statements.version, {"k": key}).scalar()
            raise self._lost(key, expected, found)
        return Doc(key, 1 if expected is None else expected + 1, value)

    def delete(self, key: str, *, expected_version: int | None = None) -> bool:
        """Delete a document; False if there was none.

        Raises:
            ConcurrencyConflict: ``expected_version`` is given and the
                document is at another version.
        """
        session = self._session()
        statements = self.definition.statements(self._dialect_name)
        key = self._key(key)
        expected = self._expected(expected_version, False)
        if expected is None:
            return session.execute(statements.delete, {"k": key}).scalar() is not None
        if session.execute(statements.delete_checked, {"k": key, "v": expected}).scalar() is not None:
            return True
        found = session.execute(statements.version, {"k": key}).scalar()
        if found is None:
            return False
        raise self._lost(key, expected, found)

    def find(
        self,
        filters: Filters | None = None,
        order_by: OrderBy | None = None,
        limit: int | None = None,
        *,
        after: str | None = None,
        allow_scan: bool = False,
    ) -> Page[Doc[T]]:
        """Documents matching ``filters``, one page at a time (keyset pagination, as ``Store.search``).

        Args:
            filters: indexed paths (or ``$key``) with Store's operators, e.g.
                ``{"status": "open", "total__gte": 10, "tags__contains": "gift"}``.
            order_by: indexed paths, ``"-total"`` for descending; the key is
                always added last so the order is total.
            limit: page size, 1 to 1000; None returns every match.
            after: the ``next_cursor`` of the previous page.
            allow_scan: allow filters on paths without an index (each such
                query is logged); they read every document.

        Raises:
            InvalidInput: a path with no index (without ``allow_scan``), a path
                that is not dot-separated names, an unknown operator, a value
                its index cannot hold, a bad limit or cursor (HTTP 400).
        """
        session = self._session()
        stmt, keys, schema = self._query.find(filters, order_by, limit, after, allow_scan, self._dialect)
        return self._page(list(session.execute(stmt)), limit, keys, schema)

    def count(self, filters: Filters | None = None, *, allow_scan: bool = False) -> int:
        """How many documents match ``filters`` (see :meth:`find`)."""
        session = self._session()
        return int(session.execute(self._query.count(filters, allow_scan, self._dialect)).scalar_one())


class AsyncCollection(CollectionBase[T]):
    """The asyncio twin of :class:`Collection`: the same methods, awaited.

    ``(await ctx.aget("docs")).collection("carts")`` in an ``async with`` context.

    .. versionadded:: 2.0
    """

    async def _session(self) -> AsyncSession:
        session: AsyncSession = await self._ctx.aget(self._session_name)
        return session

    async def get(self, key: str) -> Doc[T] | None:
        """The document with this key and its version, or None."""
        session = await self._session()
        stmt = self.definition.statements(self._dialect_name).get
        row = (await session.execute(stmt, {"k": self._key(key)})).first()
        return None if row is None else self._doc(key, row[0], row[1])

    async def require(self, key: str) -> Doc[T]:
        """The document with this key; NotFound when there is none."""
        doc = await self.get(key)
        if doc is None:
            msg = f"{self.name} {key!r} not found"
            raise NotFound(msg)
        return doc

    async def put(
        self, key: str, value: T, *, expected_version: int | None = None, force: bool = False
    ) -> Doc[T]:
        """Write a document (see :meth:`Collection.put`)."""
        session = await self._session()
        statements = self.definition.statements(self._dialect_name)
        key = self._key(key)
        expected = self._expected(expected_version, force)
        params = {"k": key, "b": self._encode(key, value)}
        if force:
            version = (await session.execute(statements.upsert, params)).scalar_one()
            return Doc(key, int(version), value)
        if expected is None:
            result = await session.execute(statements.insert, params)
        else:
            result = await session.execute(statements.update, {**params, "v": expected})
        if result.scalar() is None:
            found = (await session.execute(statements.version, {"k": key})).scalar()
            raise self._lost(key, expected, found)
        return Doc(key, 1 if expected is None else expected + 1, value)

    async def delete(self, key: str, *, expected_version: int | None = None) -> bool:
        """Delete a document; False if there was none (see :meth:`Collection.delete`)."""
        session = await self._session()
        statements = self.definition.statements(self._dialect_name)
        key = self._key(key)
        expected = self._expected(expected_version, False)
        if expected is None:
            result = await session.execute(statements.delete, {"k": key})
            return result.scalar() is not None
        result = await session.execute(statements.delete_checked, {"k": key, "v": expected})
        if result.scalar() is not None:
            return True
        found = (await session.execute(statements.version, {"k": key})).scalar()
        if found is None:
            return False
        raise self._lost(key, expected, found)

    async def find(
        self,
        filters: Filters | None = None,
        order_by: OrderBy | None = None,
        limit: int | None = None,
        *,
        after: str | None = None,
        allow_scan: bool = False,
    ) -> Page[Doc[T]]:
        """Documents matching ``filters``, one page at a time (see :meth:`Collection.find`)."""
        session = await self._session()
        stmt, keys, schema = self._query.find(filters, order_by, limit, after, allow_scan, self._dialect)
        rows = list(await session.execute(stmt))
        return self._page(rows, limit, keys, schema)

    async def count(self, filters: Filters | None = None, *, allow_scan: bool = False) -> int:
        """How many documents match ``filters``."""
        session = await self._session()
        result = await session.execute(self._query.count(filters, allow_scan, self._dialect))
        return int(result.scalar_one())

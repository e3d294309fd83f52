"""StoreSide and CollectionSide (imported through polydatum.sync.sql, which checks for SQLAlchemy)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, inspect, select
from sqlalchemy.orm import Mapper

from polydatum.sqlalchemy import Store
from polydatum.sync._differ import getter_of
from polydatum.sync._sides import check_page_size

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

    from polydatum.dal import DataManager
    from polydatum.documents import Definition, Doc


class StoreSide:
    """The rows of a mapped class, keyed by one column, as a :class:`~polydatum.sync.Side`.

    Items are dicts of the row's column attributes (plain values, no ORM
    object: nothing to expire or detach once the page's context is closed).

    Args:
        data_manager: where the session resource ``database`` is installed.
        model: the mapped class, or a :class:`~polydatum.sqlalchemy.Store`
            (its ``model`` and ``database`` are used).
        key: the attribute that holds the key: unique, not null, and indexed.
        fingerprint: an attribute name (a hash or version column), a
            callable given the row dict, or None to compare whole rows.
        database: the session resource's name (default ``"db"``, or the Store's).
        page_size: rows read a page.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        data_manager: DataManager,
        model: type[Any] | Store[Any],
        *,
        key: str,
        fingerprint: str | Callable[[dict[str, Any]], Any] | None = None,
        database: str | None = None,
        page_size: int = 1000,
    ) -> None:
        if isinstance(model, Store):
            database = database or model.database
            model = model.model
        mapper = inspect(model, raiseerr=False)
        if not isinstance(mapper, Mapper):
            msg = f"StoreSide needs a mapped class or a Store, got {model!r}"
            raise TypeError(msg)
        attributes = {prop.key: prop for prop in mapper.column_attrs}
        for what, name in (("key", key), ("fingerprint", fingerprint)):
            if isinstance(name, str) and name not in attributes:
                known = ", ".join(sorted(attributes))
                msg = f"{what}={name!r} is not a column attribute of {model.__name__}; known: {known}"
                raise ValueError(msg)
        if not isinstance(key, str):
            msg = f"key must be the name of the key column's attribute, got {type(key).__name__}"
            raise TypeError(msg)
        check_page_size(page_size)
        self.data_manager = data_manager
        self.model = model
        self.key = key
        self.database = database or "db"
        self.page_size = page_size
        self._fingerprint = getter_of(fingerprint, "fingerprint")
        self._columns = [getattr(model, name).label(name) for name in attributes]
        self._key_column = getattr(model, key)
        self._key_type = attributes[key].columns[0].type
        self._collate: bool | None = None  # known at the first page, from the dialect

    def __repr__(self) -> str:
        return f"StoreSide({self.model.__name__}, key={self.key!r})"

    def scan(self, after: Any = None) -> Iterator[tuple[Any, dict[str, Any]]]:
        """``(key, row dict)`` in key order, a page at a time."""
        name = self.key
        while True:
            rows = self._page(after)
            for row in rows:
                yield row[name], row
            if len(rows) < self.page_size:
                return
            after = rows[-1][name]

    def _page(self, after: Any) -> list[dict[str, Any]]:
        with self.data_manager.context() as ctx:
            session = getattr(ctx, self.database)
            column: Any = self._key_column
            if self._collate is None:
                self._collate = self._needs_collate(session.get_bind(self.model).dialect)
            if self._collate:
                column = column.collate("C")
            stmt = select(*self._columns).order_by(column).limit(self.page_size)
            if after is not None:
                stmt = stmt.where(column > after)
            return [dict(row._mapping) for row in session.execute(stmt)]

    def _needs_collate(self, dialect: Dialect) -> bool:
        """Whether text keys need ``COLLATE "C"`` to come in code point order (PostgreSQL only)."""
        if dialect.name != "postgresql":
            return False  # SQLite's BINARY collation compares UTF-8 bytes: code point order
        impl = self._key_type.dialect_impl(dialect)
        return isinstance(impl, String) and impl.collation != "C"

    def fingerprint(self, item: dict[str, Any]) -> Hashable:
        """The fingerprint column's value (or what the callable makes of the row)."""
        fingerprint = self._fingerprint
        if fingerprint is None:
            return tuple(sorted(item.items()))
        result: Hashable = fingerprint(item)
        return result


class CollectionSide:
    """The documents of a collection (:mod:`polydatum.documents`), keyed by document key.

    Items are :class:`~polydatum.documents.Doc` objects.

    Args:
        data_manager: where the documents are installed (``ctx.docs``).
        collection: the collection's name or its definition.
        docs: the resource name of the documents (default ``"docs"``).
        fingerprint: None (default): a SHA-256 of the document's canonical
            JSON, which is the same wherever the same value is stored; a
            callable given the :class:`~polydatum.documents.Doc` (``lambda d:
            d.version`` compares versions, which only mean something within
            one database).
        page_size: documents read a page.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        data_manager: DataManager,
        collection: str | Definition[Any],
        *,
        docs: str = "docs",
        fingerprint: Callable[[Doc[Any]], Any] | None = None,
        page_size: int = 1000,
    ) -> None:
        name = collection if isinstance(collection, str) else getattr(collection, "name", None)
        if not isinstance(name, str):
            msg = f"collection must be a collection name or its Definition, got {type(collection).__name__}"
            raise TypeError(msg)
        if fingerprint is not None and not callable(fingerprint):
            msg = f"fingerprint must be None or a callable given the Doc, got {type(fingerprint).__name__}"
            raise TypeError(msg)
        check_page_size(page_size)
        self.data_manager = data_manager
        self.collection = name
        self.docs = docs
        self.page_size = page_size
        self._fingerprint = fingerprint
        self._tree: Callable[[Any, str], Any] | None = None

    def __repr__(self) -> str:
        return f"CollectionSide({self.collection!r})"

    def scan(self, after: Any = None) -> Iterator[tuple[str, Doc[Any]]]:
        """``(key, Doc)`` in key order, a page at a time."""
        while True:
            docs = self._page(after)
            for doc in docs:
                yield doc.key, doc
            if len(docs) < self.page_size:
                return
            after = docs[-1].key

    def _page(self, after: Any) -> list[Doc[Any]]:
        with self.data_manager.context() as ctx:
            collection = getattr(ctx, self.docs).collection(self.collection)
            self._tree = collection.definition.codec.tree
            filters = None if after is None else {"$key__gt": after}
            return list(collection.find(filters, limit=self.page_size))

    def fingerprint(self, item: Doc[Any]) -> Hashable:
        """A hash of the document's canonical JSON (or what ``fingerprint=`` makes of it)."""
        if self._fingerprint is not None:
            result: Hashable = self._fingerprint(item)
            return result
        tree = self._tree
        assert tree is not None
        text = json.dumps(
            tree(item.value, item.key), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

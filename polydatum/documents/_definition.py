"""One collection's definition: its table, indexes, codec, and statements for each backend."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    cast,
    delete,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from polydatum.documents import _indexes
from polydatum.documents._codec import Codec, classes_of
from polydatum.documents._paths import Path, parse
from polydatum.sqlalchemy import _filters
from polydatum.sqlalchemy._filters import Schema

T = TypeVar("T")

#: The longest document key, in characters.
MAX_KEY = 255
#: The name the document key goes by in filters and ``order_by``.
KEY = "$key"


@dataclass
class Statements:
    """The keyed statements of one collection on one backend, built once."""

    get: Any
    version: Any
    insert: Any
    update: Any
    upsert: Any
    delete: Any
    delete_checked: Any
    body: Any  # the body column as JSON text, for SELECTs


@dataclass(eq=False)
class Definition(Generic[T]):
    """A collection declared with :meth:`Documents.define <polydatum.documents.Documents.define>`.

    Pass it to ``ctx.docs.collection(...)`` for a collection typed ``Collection[T]``.

    Attributes:
        name: the collection's name.
        type: the dataclass its documents are, or None for dicts.
        table: its SQL table (``key``, ``version``, ``body``).
        indexes: the indexed paths, with their kinds.

    .. versionadded:: 2.0
    """

    name: str
    type: type[T] | None
    table: Table
    indexes: dict[str, tuple[Path, _indexes.Kind]]
    codec: Codec
    _schemas: dict[str, Schema] = field(default_factory=dict, repr=False)
    _statements: dict[str, Statements] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def schema(self, dialect: str) -> Schema:
        """The filter language over this collection's indexed paths (and its key) on ``dialect``."""
        found = self._schemas.get(dialect)
        if found is None:
            columns = {KEY: self.key_column()}
            body = self.table.c.body
            for name, (path, kind) in self.indexes.items():
                if kind.kind != "list":
                    columns[name] = _indexes.column(self.name, name, body, path, kind, dialect)
            found = self._schemas[dialect] = Schema(self.name, columns, [KEY])
        return found

    def key_column(self) -> _filters.Column:
        """The document key, as filters and ``order_by`` name it (``$key``)."""
        key = _indexes.KINDS[str]
        return _filters.Column(
            KEY, f"{self.name}.{KEY}", self.table.c.key, String(), False, "text", key.expected, key.accepts
        )

    def statements(self, dialect: str) -> Statements:
        found = self._statements.get(dialect)
        if found is None:
            with self._lock:
                found = self._statements.get(dialect) or _build(self.table, dialect)
                self._statements[dialect] = found
        return found


def _build(t: Table, dialect: str) -> Statements:
    if dialect == "postgresql":
        body_in: Any = cast(bindparam("b", type_=Text), postgresql.JSONB)
        body_out: Any = cast(t.c.body, Text)
        insert_of: Any = postgresql.insert
    else:
        body_in = bindparam("b", type_=Text)
        body_out = type_coerce(t.c.body, Text)
        insert_of = sqlite.insert
    key = bindparam("k", type_=String)
    new = insert_of(t).values(key=key, version=1, body=body_in)
    return Statements(
        get=select(t.c.version, body_out).where(t.c.key == key),
        version=select(t.c.version).where(t.c.key == key),
        # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT here.
        insert=new.on_conflict_do_nothing(index_elements=[t.c.key]).returning(t.c.version),
        update=update(t)
        .where(t.c.key == key, t.c.version == bindparam("v"))
        .values(version=t.c.version + 1, body=body_in)
        .returning(t.c.version),
        upsert=new.on_conflict_do_update(
            index_elements=[t.c.key], set_={"version": t.c.version + 1, "body": new.excluded.body}
        ).returning(t.c.version),
        delete=delete(t).where(t.c.key == key).returning(t.c.version),
        delete_checked=delete(t).where(t.c.key == key, t.c.version == bindparam("v")).returning(t.c.version),
        body=body_out,
    )


def make_table(metadata: MetaData, table_name: str) -> Table:
    """A collection's table: the key, the version, and the document as JSONB (JSON on SQLite)."""
    return Table(
        table_name,
        metadata,
        # Keys order as code points on every backend, like Python's str.
        Column(
            "key",
            String(MAX_KEY).with_variant(String(MAX_KEY, collation="C"), "postgresql"),
            primary_key=True,
        ),
        Column("version", BigInteger, nullable=False),
        Column("body", JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
    )


def define(
    metadata: MetaData,
    name: str,
    table_name: str,
    type_: type[T] | None,
    indexes: Mapping[str, Any],
    types: Iterable[type[Any]],
    max_size: int,
) -> Definition[T]:
    """Build a :class:`Definition` (see ``Documents.define``)."""
    if type_ is not None and not (isinstance(type_, type) and hasattr(type_, "__dataclass_fields__")):
        msg = f"a typed collection holds dataclasses; {type_!r} is not a dataclass"
        raise TypeError(msg)
    if not isinstance(indexes, Mapping):
        msg = f"indexes maps paths to types, like {{'status': str, 'total': float}}, got {indexes!r}"
        raise TypeError(msg)
    declared: dict[str, tuple[Path, _indexes.Kind]] = {}
    for path, kind in indexes.items():
        declared[path] = (parse(path, what="index path"), _indexes.kind_of(kind, path))
    table = make_table(metadata, table_name)
    _indexes.ddl(table, declared)
    codec = Codec(classes_of(type_, types), max_size)
    return Definition(name, type_, table, declared, codec)

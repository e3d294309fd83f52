"""Queries over a collection: its filters and ``order_by`` checked against the indexed paths.

Filters use Store's language (``_filters``) on the collection's indexed paths
and its key (``$key``); a ``list`` index takes ``contains`` (membership). A path
with no index is refused unless the caller allows a scan, which is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from polydatum.documents import _indexes
from polydatum.documents._definition import KEY, Definition
from polydatum.documents._paths import parse
from polydatum.errors import InvalidInput
from polydatum.sqlalchemy._filters import Filters, Keys, OrderBy, Schema, show

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement, Select
    from sqlalchemy.engine import Dialect

logger = logging.getLogger("polydatum.documents")

#: The largest page ``find`` returns.
MAX_LIMIT = 1000


class Query:
    """Statements for ``find`` and ``count`` over one collection; every name and value checked first."""

    def __init__(self, definition: Definition[Any]) -> None:
        self.definition = definition
        self.name = definition.name

    def find(
        self,
        filters: Filters | None,
        order_by: OrderBy | None,
        limit: int | None,
        after: str | None,
        allow_scan: bool,
        dialect: Dialect,
    ) -> tuple[Select[Any], Keys, Schema]:
        """The SELECT of one page, its sort keys, and the schema that checked it (see ``Collection.find``)."""
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT
        ):
            msg = f"limit must be an int from 1 to {MAX_LIMIT}, got {show(limit)}"
            raise InvalidInput(msg)
        clauses, schema = self._where(filters, allow_scan, dialect)
        self._check_order(order_by)
        keys = schema.order(order_by)
        of = _constant(dialect)
        table = self.definition.table
        body = self.definition.statements(dialect.name).body
        stmt = select(table.c.key, table.c.version, body).where(*clauses)
        if after is not None:
            stmt = stmt.where(schema.after(keys, after, of))
        stmt = stmt.order_by(*schema.order_clauses(keys, of))
        if limit is not None:
            stmt = stmt.limit(limit + 1)  # one more tells whether a next page exists
        return stmt, keys, schema

    def count(self, filters: Filters | None, allow_scan: bool, dialect: Dialect) -> Select[Any]:
        """The SELECT count(*) of the documents matching ``filters``."""
        clauses, _ = self._where(filters, allow_scan, dialect)
        return select(func.count()).select_from(self.definition.table).where(*clauses)

    def _where(
        self, filters: Filters | None, allow_scan: bool, dialect: Dialect
    ) -> tuple[list[ColumnElement[bool]], Schema]:
        definition = self.definition
        schema = definition.schema(dialect.name)
        if filters is None:
            return [], schema
        if not isinstance(filters, Mapping):
            msg = (
                f"filters must be a mapping like {{'status': 'open', 'total__gte': 10}}, got {show(filters)}"
            )
            raise TypeError(msg)
        body = definition.table.c.body
        plain: dict[str, Any] = {}
        clauses: list[ColumnElement[bool]] = []
        scanned: set[str] = set()
        for key, value in filters.items():
            if not isinstance(key, str):
                msg = f"filter names are strings like 'total__gte', got {show(key)}"
                raise InvalidInput(msg)
            name, sep, op = key.rpartition("__") if key not in schema.columns else ("", "", "")
            if not sep:
                name, op = key, "eq"
            if name in schema.columns:
                plain[key] = value
                continue
            declared = definition.indexes.get(name)
            if declared is not None:  # a list index: the indexes of other kinds are schema columns
                clauses.append(self._contains(key, name, declared[0], op, value, dialect.name))
                continue
            path = parse(name, what="filter path")
            if not allow_scan:
                raise _indexes.refuse_scan(name, self.name, sorted(definition.indexes))
            scanned.add(name)
            if op == "contains":
                clauses.append(self._contains(key, name, path, op, value, dialect.name))
                continue
            if op == "is_null":
                column = _indexes.presence(self.name, name, body, path, dialect.name)
            else:
                column = _indexes.column(self.name, name, body, path, _scan_kind(op, value), dialect.name)
            schema = Schema(schema.name, {**schema.columns, name: column}, [KEY])
            plain[key] = value
        if scanned:
            logger.info(
                "scanning collection %r for unindexed paths %s (allow_scan=True)",
                self.name,
                ", ".join(sorted(scanned)),
                extra={"polydatum_collection": self.name, "polydatum_scanned": sorted(scanned)},
            )
        clauses.extend(schema.where(plain, _constant(dialect)))
        return clauses, schema

    def _contains(self, key: str, name: str, path: Any, op: str, value: Any, dialect: str) -> Any:
        if op != "contains" and name in self.definition.indexes:
            msg = f"filter {key!r}: {self.name}.{name} is a list index, which takes only contains"
            raise InvalidInput(msg)
        if not _indexes.KINDS[list].accepts(value):
            msg = f"filter {key!r}: contains takes one str, number or bool, got {show(value)}"
            raise InvalidInput(msg)
        return _indexes.contains(self.definition.table.c.body, path, value, dialect)

    def _check_order(self, order_by: OrderBy | None) -> None:
        names = [order_by] if isinstance(order_by, str) else list(order_by or ())
        for spec in names:
            if not isinstance(spec, str):
                continue  # Schema.order names the problem
            name = spec[1:] if spec.startswith("-") else spec
            declared = self.definition.indexes.get(name)
            if name == KEY or (declared is not None and declared[1].kind != "list"):
                continue  # not schema.columns: a scanned path is a column of this query's schema too
            if declared is not None:
                msg = f"order_by {spec!r}: {self.name}.{name} is a list index; order by a str, number or date"
                raise InvalidInput(msg)
            parse(name, what="order_by path")
            msg = (
                f"order_by {spec!r}: path {name!r} of {self.name!r} has no index; order by indexed "
                f"paths ({', '.join(sorted(self.definition.indexes)) or 'none'}) or {KEY!r}"
            )
            raise InvalidInput(msg)

    def cursor(self, keys: Keys, schema: Schema, key: str, value: Any) -> str:
        """The cursor of the page that ends with the document ``key`` holding ``value``."""

        def sort_value(_: object, name: str) -> Any:
            if name == KEY:
                return key
            path, kind = self.definition.indexes[name]
            return _indexes.python_value(value, path, kind)

        return schema.cursor(keys, None, sort_value)


def _constant(dialect: Dialect) -> Callable[[], Dialect]:
    return lambda: dialect


def _scan_kind(op: str, value: Any) -> _indexes.Kind:
    """The kind a scanned path is compared as, from the filter's value."""
    sample = value
    if op in ("in", "not_in") and isinstance(value, (list, tuple, set, frozenset)) and value:
        sample = next(iter(value))
    for declared, kind in _indexes.KINDS.items():
        if declared is not list and kind.accepts(sample):
            return kind
    return _indexes.KINDS[str]  # the filter language then names what is wrong with the value

"""Schemaless, versioned documents in SQL: one table per collection, JSONB on PostgreSQL, JSON on SQLite.

Needs the ``sqlalchemy`` extra. The guide is ``docs/integrations/documents.md``::

    from polydatum.documents import Documents

    docs = Documents(db)                       # db: a Database installed on dm as "db"
    carts = docs.define("carts", indexes={"status": str, "total": float})
    docs.install(dm)                           # ctx.docs in every context
    docs.create_tables()

    with dm.context() as ctx:
        ctx.docs.collection("carts").put("c1", {"status": "open", "total": 12.5})
    with dm.context() as ctx:
        cart = ctx.docs.collection(carts).require("c1")
        ctx.docs.collection(carts).put("c1", {**cart.value, "status": "paid"},
                                       expected_version=cart.version)

.. versionadded:: 2.0
"""

from __future__ import annotations

import polydatum.sqlalchemy  # noqa: F401 - fails with the install hint when SQLAlchemy is missing
from polydatum.documents._collection import AsyncCollection, Collection, Doc
from polydatum.documents._definition import Definition
from polydatum.documents._documents import MAX_SIZE, Collections, Documents

__all__ = [
    "MAX_SIZE",
    "AsyncCollection",
    "Collection",
    "Collections",
    "Definition",
    "Doc",
    "Documents",
]

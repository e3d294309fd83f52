"""Sync sides in SQL: rows of a mapped class (a Store's model) and a document collection.

Needs the ``sqlalchemy`` extra: ``pip install "polydatum[sqlalchemy]"``.
Both sides read one page at a time, each page in a short context of its own
(``data_manager.context()``) that is closed before the page's items are
handed on, so no transaction stays open while the Syncer writes, and the
next page starts after the last key seen (keyset pagination: no OFFSET, so a
page costs the same at the start and at the end of a million rows)::

    from polydatum.sync import BlobSide, Differ, Syncer
    from polydatum.sync.sql import StoreSide

    differ = Differ(BlobSide(blobs, "notes/"), StoreSide(dm, Attachment, key="key", fingerprint="sha256"))

On PostgreSQL a text key is compared and ordered with ``COLLATE "C"`` (code
point order, the order Python compares ``str`` in) unless its column is
declared with that collation already. Declare it so (``String(300,
collation="C")``) and index it: then each page is an index range scan.

.. versionadded:: 2.0
"""

from __future__ import annotations

import polydatum.sqlalchemy  # noqa: F401 - fails with the install hint when SQLAlchemy is missing
from polydatum.sync._sql import CollectionSide, StoreSide

__all__ = ["CollectionSide", "StoreSide"]

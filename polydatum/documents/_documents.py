"""``Documents``: the collections of one database, and their per-context resource."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from sqlalchemy import MetaData

from polydatum._factories import Dual
from polydatum._renamed import renamed_keyword
from polydatum.documents._collection import AsyncCollection, Collection, CollectionBase
from polydatum.documents._definition import Definition, define
from polydatum.documents._paths import check_collection
from polydatum.errors import AlreadyExistsException
from polydatum.sqlalchemy import AsyncDatabase, Database

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from typing_extensions import Self

    from polydatum import DataManager
    from polydatum.context import DataAccessContext

T = TypeVar("T")
C = TypeVar("C", bound=CollectionBase[Any])

_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,19}")

#: The largest document by default: 1 MiB of JSON.
MAX_SIZE = 1024 * 1024


class Documents:
    """Collections of schemaless, versioned documents, each in one table of ``database``.

    Args:
        database: the :class:`~polydatum.sqlalchemy.Database` (or
            :class:`~polydatum.sqlalchemy.AsyncDatabase`) the tables live in;
            install it on the DataManager as ``session`` so that collections
            write in the context's transaction.
        session: the name of ``database``'s session resource.
        prefix: put before a collection's name to name its table.
        max_size: the largest document, in bytes of JSON (each
            :meth:`define` may lower or raise it).
        metadata: the :class:`~sqlalchemy.MetaData` to define the tables in
            (your Alembic ``target_metadata``); default a new one, :attr:`metadata`.

    Raises:
        TypeError: ``database`` is not a Database or AsyncDatabase.
        ValueError: a bad ``prefix`` or ``max_size``.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        database: Database | AsyncDatabase,
        *,
        session: str = "db",
        prefix: str = "doc_",
        max_size: int = MAX_SIZE,
        metadata: MetaData | None = None,
    ) -> None:
        if not isinstance(database, (Database, AsyncDatabase)):
            msg = f"Documents() needs a polydatum Database or AsyncDatabase, got {type(database).__name__}"
            raise TypeError(msg)
        if not isinstance(prefix, str) or (prefix and not _PREFIX.fullmatch(prefix)):
            msg = (
                "prefix is '' or up to 20 lowercase ASCII letters, digits and underscores, "
                f"starting with a letter (it starts table names), got {prefix!r}"
            )
            raise ValueError(msg)
        self.database = database
        self.session_name = session
        self.prefix = prefix
        self.max_size = _check_size(max_size)
        #: The tables' MetaData; give it to Alembic, or call :meth:`create_tables`.
        self.metadata = metadata if metadata is not None else MetaData()
        self._definitions: dict[str, Definition[Any]] = {}

    def __repr__(self) -> str:
        return f"Documents({self.database!r}, collections={sorted(self._definitions)!r})"

    @overload
    def define(
        self,
        name: str,
        type: None = None,
        *,
        indexes: Mapping[str, Any] | None = None,
        types: Iterable[type[Any]] = (),
        max_size: int | None = None,
    ) -> Definition[dict[str, Any]]: ...

    @overload
    def define(
        self,
        name: str,
        type: type[T],
        *,
        indexes: Mapping[str, Any] | None = None,
        types: Iterable[type[Any]] = (),
        max_size: int | None = None,
    ) -> Definition[T]: ...

    def define(
        self,
        name: str,
        type: type[Any] | None = None,
        *,
        indexes: Mapping[str, Any] | None = None,
        types: Iterable[type[Any]] = (),
        max_size: int | None = None,
    ) -> Definition[Any]:
        """Declare the collection ``name`` (its table is ``prefix + name``).

        Args:
            name: lowercase letters, digits and underscores.
            type: the dataclass its documents are; None for dicts.
            indexes: indexed paths and what they hold, e.g. ``{"status": str,
                "total": float, "customer.city": str, "placed": datetime,
                "tags": list}``; queries may filter and order only by these
                (see ``_indexes`` for what each type accepts).
            types: more dataclasses and Enums the documents hold, beyond those
                ``type``'s fields name.
            max_size: this collection's largest document, in bytes of JSON.

        Returns:
            the definition; ``ctx.docs.collection(definition)`` is then a
            ``Collection[type]``.

        Raises:
            AlreadyExistsException: ``name`` is defined already.
            ValueError: a bad name.
            InvalidInput: a bad index path.
            TypeError: ``type`` is not a dataclass, or an index type no index holds.
        """
        check_collection(name)
        if name in self._definitions:
            msg = f"the collection {name!r} is defined already; define each collection once"
            raise AlreadyExistsException(msg)
        size = self.max_size if max_size is None else _check_size(max_size)
        definition = define(self.metadata, name, self.prefix + name, type, indexes or {}, types, size)
        self._definitions[name] = definition
        return definition

    def definition(self, name: str) -> Definition[Any]:
        """The definition of the collection ``name``.

        Raises:
            KeyError: no collection has that name; the message lists those there are.
        """
        found = self._definitions.get(name) if isinstance(name, str) else None
        if found is None:
            known = ", ".join(sorted(self._definitions)) or "none"
            msg = f"no collection {name!r}; define it with docs.define({name!r}, ...). Defined: {known}"
            raise KeyError(msg)
        return found

    @property
    def engine(self) -> Engine:
        """The sync engine :meth:`create_tables` uses (an AsyncDatabase's sync side)."""
        db = self.database
        return db.sync.engine if isinstance(db, AsyncDatabase) else db.engine

    def create_tables(self) -> None:
        """Create the collections' tables and indexes that do not exist yet."""
        tables = [d.table for d in self._definitions.values()]
        self.metadata.create_all(self.engine, tables=tables)

    async def acreate_tables(self) -> None:
        """:meth:`create_tables` through an AsyncDatabase's async engine."""
        db = self.database
        if not isinstance(db, AsyncDatabase):
            self.create_tables()
            return
        tables = [d.table for d in self._definitions.values()]
        async with db.engine.begin() as conn:
            await conn.run_sync(lambda sync: self.metadata.create_all(sync, tables=tables))

    @renamed_keyword("data_manager", "dm")
    def install(self, dm: DataManager, *, name: str = "docs") -> Self:
        """Register the resource ``name``: ``ctx.docs.collection("carts")`` in ``with`` contexts.

        In ``async with`` contexts, ``(await ctx.aget(name)).collection("carts")``
        is an :class:`AsyncCollection`.

        Raises:
            ValueError: the DataManager has no session resource ``session``, or
                it belongs to another database.
        """
        self._check_session(dm)
        dm.register_resources(**{name: Dual(self._sync_resource, self._async_resource)})
        return self

    def _check_session(self, data_manager: DataManager) -> None:
        resources = data_manager.resource_manager
        if self.session_name not in resources:
            msg = (
                f"documents are written through the session resource {self.session_name!r}, which this "
                f"DataManager does not have; install the database first "
                f"(database.install(dm, name={self.session_name!r})), or pass session= to Documents()"
            )
            raise ValueError(msg)
        other = getattr(resources[self.session_name], "database", None)
        if other is not None and other is not self.database:
            msg = (
                f"the session resource {self.session_name!r} belongs to {other!r}, not to "
                f"{self.database!r}; build Documents on that database, or pass session= naming this one's"
            )
            raise ValueError(msg)

    def _sync_resource(self, ctx: DataAccessContext) -> Iterator[Collections[Collection[Any]]]:
        yield Collections(self, ctx, Collection)

    async def _async_resource(
        self, ctx: DataAccessContext
    ) -> AsyncIterator[Collections[AsyncCollection[Any]]]:
        yield Collections(self, ctx, AsyncCollection)


class Collections(Generic[C]):
    """A context's view of the collections: ``ctx.docs``.

    .. versionadded:: 2.0
    """

    def __init__(self, documents: Documents, ctx: DataAccessContext, kind: type[C]) -> None:
        self._documents = documents
        self._ctx = ctx
        self._kind = kind
        self._open: dict[str, C] = {}

    @overload
    def collection(self: Collections[Collection[Any]], which: Definition[T]) -> Collection[T]: ...
    @overload
    def collection(self: Collections[Collection[Any]], which: str) -> Collection[Any]: ...
    @overload
    def collection(self: Collections[AsyncCollection[Any]], which: Definition[T]) -> AsyncCollection[T]: ...
    @overload
    def collection(self: Collections[AsyncCollection[Any]], which: str) -> AsyncCollection[Any]: ...

    def collection(self, which: Definition[Any] | str) -> Any:
        """The collection ``which`` (a name, or the definition ``define`` returned), in this context.

        Raises:
            KeyError: no collection has that name.
            ValueError: the definition belongs to another Documents.
        """
        name = which.name if isinstance(which, Definition) else which
        found = self._open.get(name)
        if found is None:
            definition = self._documents.definition(name)
            if isinstance(which, Definition) and which is not definition:
                msg = f"the definition of {name!r} was made by another Documents than ctx.docs"
                raise ValueError(msg)
            documents = self._documents
            found = self._open[name] = self._kind(
                definition, self._ctx, documents.session_name, documents.database.sync_engine.dialect
            )
        return found


def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 64:
        msg = f"max_size is a number of bytes, at least 64, got {size!r}"
        raise ValueError(msg)
    return size

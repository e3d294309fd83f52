"""Resources: lazily created, per-context handles (a session, a client...).

A resource is a generator callable taking the context and yielding once; the
code after ``yield`` is its teardown, and an exception raised in the context
is thrown in at the ``yield``::

    def db_session(ctx):
        session = Session(engine)
        try:
            yield session
        finally:
            session.close()

    dm.register_resources(db=db_session)
    with dm.context() as ctx:
        ctx.db  # created now, closed when the context exits
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from polydatum import _factories
from polydatum._factories import Dual
from polydatum.errors import AlreadyExistsException, InvalidResource

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.dal import DataManager

__all__ = ["Dual", "Resource", "ResourceManager", "ValueResource"]

T = TypeVar("T")

# Names a context already uses: a resource registered under one of them could
# never be reached as ``ctx.<name>``.
_RESERVED = frozenset({"data_manager", "dal", "meta"})


class Resource:
    """Base class for class-based resources: override :meth:`__call__`."""

    # Deprecated since 0.8.4: use ``context.data_manager`` inside __call__.
    _data_manager: DataManager | None = None

    def setup(self, data_manager: DataManager) -> None:
        """Deprecated hook, called once at registration with the DataManager."""
        self._data_manager = data_manager

    def __call__(self, context: DataAccessContext) -> Generator[Any, None, None]:
        """Yield the value this resource provides in ``context``, then clean up."""
        yield None


class ValueResource(Resource, Generic[T]):
    """A resource that is just a value, the same in every context."""

    def __init__(self, value: T) -> None:
        super().__init__()
        self._value = value

    def __call__(self, context: DataAccessContext) -> Generator[T, None, None]:
        yield self._value


class ResourceManager:
    """The registry of resources of one DataManager."""

    def __init__(self, data_manager: DataManager | None) -> None:
        self._resources: dict[str, Any] = {}
        self._data_manager = data_manager

    def register_resources(self, **resources: Any) -> None:
        """Register resources by name.

        Raises:
            AlreadyExistsException: if a name is already registered.
            InvalidResource: if a value is not a resource factory.
        """
        for key in resources:
            if key in self._resources:
                msg = f"a resource named {key!r} is already registered; use replace_resource() to swap it"
                raise AlreadyExistsException(msg)
        for key, resource in resources.items():
            self._init_resource(key, resource)

    def replace_resource(self, key: str, resource: Any) -> None:
        """Register ``resource`` under ``key``, replacing any previous one (tests)."""
        self._init_resource(key, resource)

    def _init_resource(self, key: str, resource: Any) -> None:
        from polydatum.context import DataAccessContext

        if key in _RESERVED or key.startswith("__") or hasattr(DataAccessContext, key):
            msg = f"resource name {key!r} is taken by DataAccessContext; pick another name"
            raise ValueError(msg)
        if _factories.as_factory(resource) is None:
            msg = f"resource {key!r} must be {_factories.ACCEPTED}; got {_factories.describe(resource)}"
            raise InvalidResource(msg)
        setup = getattr(resource, "setup", None)
        if callable(setup) and self._data_manager is not None:
            setup(self._data_manager)
        self._resources[key] = resource

    def __getitem__(self, name: str) -> Any:
        return self._resources[name]

    def __contains__(self, name: object) -> bool:
        return name in self._resources

    def __iter__(self) -> Iterator[str]:
        return iter(self._resources)

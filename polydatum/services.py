"""Services: the business logic reached through the DAL.

A service is a plain object; subclass :class:`Service` so it can reach the
active context (``self._ctx``), the DAL (``self._dal``) and nest other
services::

    class Profiles(Service):
        def get(self, user_id):
            return self._ctx.db.get(Profile, user_id)

    class Users(Service):
        def get(self, user_id):
            return self._ctx.db.get(User, user_id)

    dm.register_services(users=Users().register_services(profile=Profiles()))
    with dm.dal() as dal:
        dal.users.profile.get(42)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic

from polydatum import _invalidation
from polydatum._factories import describe
from polydatum._generics import CtxT, DalT
from polydatum._stack import NO_CONTEXT, OPEN
from polydatum.errors import NoActiveContextError

if TYPE_CHECKING:
    from typing_extensions import Self

    from polydatum.dal import DataManager

__all__ = ["Service"]


class _SubServices(dict[str, Any]):
    """``service._services``: writes are mirrored onto the owner as attributes.

    Sub-services are plain instance attributes, so ``dal.users.profile`` is an
    ordinary lookup and Service needs no ``__getattr__`` (which would slow
    every attribute access on every service). Code written for 1.0 that
    fills ``self._services`` directly keeps working through this mirror.
    """

    __slots__ = ("_owner",)

    def __init__(self, owner: Service) -> None:
        super().__init__()
        self._owner = owner

    def __setitem__(self, key: str, service: Any) -> None:
        super().__setitem__(key, service)
        owner = self._owner
        # A name the class defines keeps the 1.0 precedence: the class attribute wins.
        if not hasattr(type(owner), key):
            owner.__dict__[key] = service
        _invalidation.bump()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._owner.__dict__.pop(key, None)
        _invalidation.bump()

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def check_service(name: str, service: Any) -> None:
    """Refuse anything that cannot be set up as a service."""
    if isinstance(service, type):
        msg = (
            f"service {name!r} must be a polydatum.Service instance, got the class {service.__qualname__}; "
            f"register {service.__qualname__}() instead"
        )
        raise TypeError(msg)
    if not callable(getattr(service, "setup", None)):
        msg = (
            f"service {name!r} must be a polydatum.Service (or have a setup(data_manager) "
            f"method), got {describe(service)}"
        )
        raise TypeError(msg)


class Service(Generic[DalT, CtxT]):
    """Base class for services.

    Generic, for type checkers only, like :class:`~polydatum.DataManager`:
    ``class Users(Service[Dal, Ctx])`` types ``self._dal`` as ``Dal`` and
    ``self._ctx`` as ``Ctx`` (see docs/typing.md); plain ``Service`` keeps
    them untyped.

    Attributes:
        _data_manager: the DataManager this service is registered with (None before).
        _dal: that DataManager's DataAccessLayer (None before).
    """

    _data_manager: DataManager | None = None
    _dal: DalT = None  # type: ignore[assignment]
    # The manager's stack getter, kept at setup: ``self._ctx`` is on every
    # service method's path. (Mangled, so no subclass attribute collides.)
    __top: Callable[[], Any] = staticmethod(lambda: NO_CONTEXT)

    def __init__(self) -> None:
        self._services: dict[str, Any] = _SubServices(self)

    def _sub_services(self) -> dict[str, Any]:
        services = self.__dict__.get("_services")
        if not isinstance(services, _SubServices):
            # A subclass that skipped Service.__init__, or replaced the dict.
            mirror = _SubServices(self)
            if services:
                mirror.update(services)
            self.__dict__["_services"] = services = mirror
        return services

    def register_services(self, **services: Any) -> Self:
        """Nest services under this one; returns ``self`` for chaining.

        As in 1.0, a name nested already is replaced (the next DAL call sees
        the new one), and any name is accepted; but a name starting with
        ``_``, or one of this service's own attributes (a method wins over a
        sub-service of its name), is not reachable as ``dal.<this>.<name>``.

        Raises:
            TypeError: if a value is not a service.
            ValueError: a service is registered with another DataManager.
        """
        for key, service in services.items():
            check_service(key, service)
        own = self._sub_services()
        for key, service in services.items():
            service.setup(self._data_manager)
            own[key] = service
        return self

    def setup(self, data_manager: DataManager | None) -> None:
        """Bind this service, and its sub-services, to ``data_manager``.

        Raises:
            ValueError: it is registered with another DataManager already (one
                instance serves one manager: its ``_ctx`` reads that manager's contexts).
        """
        current = self._data_manager
        if data_manager is None:
            if current is not None:
                return  # nested under a service not registered yet: it stays with its manager
        elif current is not None and current is not data_manager:
            msg = (
                f"{type(self).__name__} {self!r} is registered with another DataManager already; "
                "a service instance serves one DataManager, so register a new instance here"
            )
            raise ValueError(msg)
        self._data_manager = data_manager
        self._dal = data_manager.get_dal() if data_manager else None  # type: ignore[assignment]
        if data_manager is not None:
            self.__top = data_manager.wiring.stack.get
        for service in self._sub_services().values():
            service.setup(data_manager)

    @property
    def _ctx(self) -> CtxT:
        """The active context.

        Raises:
            NoActiveContextError: outside a context, or if the service is not registered.
        """
        ctx = self.__top()
        if ctx._state == OPEN:
            return ctx  # type: ignore[no-any-return]
        dm = self._data_manager
        if dm is None:
            msg = (
                f"{type(self).__name__} is not registered with a DataManager; "
                "register it with dm.register_services(...) before using self._ctx"
            )
            raise NoActiveContextError(msg)
        return dm.require_active_context()  # type: ignore[return-value]  # closing, or none: the manager decides

"""polydatum: a service-layer data access framework.

Register services, lazily created resources and middleware on one
:class:`DataManager`; run each unit of work in a context; call services
through the DAL::

    dm = DataManager()
    dm.register_services(users=Users())
    with dm.dal(meta={"user": "ann"}) as dal:
        dal.users.get(42)
"""

from polydatum.config import Config
from polydatum.context import DataAccessContext, Meta
from polydatum.dal import DataAccessLayer, DataManager
from polydatum.errors import (
    AlreadyExistsException,
    ConcurrencyConflict,
    ContextStateError,
    DalMethodError,
    NoActiveContextError,
    NotFound,
    PolydatumException,
    ServiceError,
)
from polydatum.middleware import DalCommand, DalCommandRequest
from polydatum.resources import Resource, ValueResource
from polydatum.services import Service

__version__ = "2.0.0.dev0"

__all__ = [
    "AlreadyExistsException",
    "ConcurrencyConflict",
    "Config",
    "ContextStateError",
    "DalCommand",
    "DalCommandRequest",
    "DalMethodError",
    "DataAccessContext",
    "DataAccessLayer",
    "DataManager",
    "Meta",
    "NoActiveContextError",
    "NotFound",
    "PolydatumException",
    "Resource",
    "Service",
    "ServiceError",
    "ValueResource",
]

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
    InvalidInput,
    NoActiveContextError,
    NotFound,
    PolydatumException,
    ServiceError,
)
from polydatum.middleware import DalCommand, DalCommandRequest, PathSegment
from polydatum.resources import Resource, ValueResource
from polydatum.services import Service
from polydatum.types import ResourceRegistry

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
    "InvalidInput",
    "Meta",
    "NoActiveContextError",
    "NotFound",
    "PathSegment",
    "PolydatumException",
    "Resource",
    "ResourceRegistry",
    "Service",
    "ServiceError",
    "ValueResource",
]

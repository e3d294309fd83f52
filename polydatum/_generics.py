"""The type parameters of DataManager, DataAccessContext and Service.

``DalT`` is the application's declaration of its services (what ``dal.<name>``
is), ``CtxT`` its context class (what ``ctx.<name>`` is); see docs/typing.md.
Both default to the untyped 1.0 style, so ``DataManager()`` still means
``dal.anything`` is ``Any``.

Only type checkers see the defaults: ``typing.TypeVar`` takes ``default=``
from Python 3.13 on, and the core imports no third-party package at run
time, so the run-time TypeVars are plain ones (they only make the classes
subscriptable: ``DataManager[Dal, Ctx]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import TypeVar

    from polydatum.context import DataAccessContext

    DalT = TypeVar("DalT", default=Any)
    # Covariant, so that a DataManager[Dal, Ctx] is still a plain DataManager
    # to the integrations' install(dm, ...).
    CtxT = TypeVar(
        "CtxT",
        bound="DataAccessContext[Any]",
        default="DataAccessContext[DalT]",
        covariant=True,
    )
else:
    from typing import TypeVar

    DalT = TypeVar("DalT")
    CtxT = TypeVar("CtxT", covariant=True)

__all__ = ["CtxT", "DalT"]

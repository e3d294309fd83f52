"""polydatum 1.0's module-level access to "the" active context (deprecated).

1.0 kept one global stack; 2.0 keeps one per DataManager. These accessors
look through the DataManagers created so far, newest first, and return the
first open context found. With one DataManager per process (the 1.0 norm)
that is exactly 1.0's behaviour.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any

from polydatum._stack import no_context_error

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.dal import DataManager

__all__ = ["current_context", "get_active_context", "track"]

_managers: list[weakref.ref[DataManager]] = []


def track(dm: DataManager) -> None:
    """Remember ``dm`` for the deprecated accessors (weakly)."""
    _managers[:] = [ref for ref in _managers if ref() is not None]
    _managers.append(weakref.ref(dm))


def _global_active_context() -> DataAccessContext | None:
    # The most recently created DataManager with an open context wins; with one
    # DataManager per process (the 1.0 norm) that is simply its active context.
    for ref in reversed(_managers):
        dm = ref()
        if dm is not None:
            ctx = dm.get_active_context()
            if ctx is not None:
                return ctx
    return None


def get_active_context() -> DataAccessContext | None:
    """Deprecated since 0.8.4: use ``DataManager.get_active_context()``.

    Returns the active context of this thread or task, or ``None``.
    """
    warnings.warn(
        "polydatum.context.get_active_context() is deprecated; use dm.get_active_context()",
        DeprecationWarning,
        stacklevel=2,
    )
    return _global_active_context()


class _ContextProxy:
    """Deprecated 1.0 ``current_context``: forwards to the active context."""

    __slots__ = ()

    def _get_current_object(self) -> DataAccessContext:
        warnings.warn(
            "polydatum.context.current_context is deprecated; use self._ctx in services "
            "or dm.require_active_context()",
            DeprecationWarning,
            stacklevel=3,
        )
        ctx = _global_active_context()
        if ctx is None:
            raise no_context_error(None, "current_context")
        return ctx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get_current_object(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._get_current_object(), name, value)

    def __contains__(self, name: object) -> bool:
        return name in self._get_current_object()

    def __bool__(self) -> bool:
        return _global_active_context() is not None

    def __eq__(self, other: object) -> bool:
        return _global_active_context() is other

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        ctx = _global_active_context()
        return f"<current_context proxy to {ctx!r}>"


current_context: Any = _ContextProxy()

"""The one seam between a DataManager and its contexts.

A DataManager never lends its private state to its contexts. On every
registration it builds a new, frozen :class:`Wiring` and hands it to its
:class:`ContextClasses`, which binds it to the context classes the manager
made. A context reads only its class's wiring: the stack variable, the
middleware and resource specs, and the flags that pick its fast paths.

Why context classes per manager: each class carries one
:class:`ResourceAttribute` per registered resource, so ``ctx.db`` is a class
attribute lookup until the resource exists and a plain instance attribute
after; and the manager, DAL and wiring are class attributes, so making a
context costs one allocation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from polydatum._factories import Factory
from polydatum._stack import OPEN
from polydatum.meta import EMPTY_META, Meta

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.dal import DataManager
    from polydatum.observer import Observer

__all__ = ["ContextClasses", "ResourceAttribute", "Wiring"]


@dataclass(frozen=True, slots=True)
class Wiring:
    """What a DataManager's contexts read from it (rebuilt, never changed).

    Attributes:
        stack: the manager's active-context variable (see ``_stack.py``).
        middleware: the context middleware, normalised, in order.
        middleware_for: when the manager overrides ``get_middleware``, the
            function giving one context its middleware; else None.
        resources: the registered resources, normalised, by name.
        resource_for: when resources must be looked up through the manager
            (it overrides ``get_resource``, or its resource manager its
            lookups), that lookup; else None, and ``resources`` is complete.
        observer: the manager's :class:`~polydatum.observer.Observer`, or None.
        lean: no context middleware, so entering is a push plus the observer's call.
        plain: lean and no observer, so entering is a push.
    """

    stack: ContextVar[Any]
    middleware: tuple[Factory, ...]
    middleware_for: Callable[[DataAccessContext], tuple[Factory, ...]] | None
    resources: Mapping[str, Factory]
    resource_for: Callable[[str], Factory | None] | None
    observer: Observer | None
    lean: bool
    plain: bool


class ResourceAttribute:
    """Class-level accessor for one resource: creates it on first read.

    It defines only ``__get__``, so once the value is stored on the instance
    every later read is a plain attribute lookup.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, ctx: DataAccessContext | None, owner: type | None = None) -> Any:
        if ctx is None:
            return self
        return ctx._get_resource(self.name)

    def __repr__(self) -> str:
        return f"<resource {self.name!r}>"


def _lookup_attribute(ctx: DataAccessContext, name: str) -> Any:
    """``__getattr__`` of classes whose resources are looked up through the manager."""
    if name[:2] == "__":
        raise AttributeError(name)
    return ctx._get_resource(name)


def _bound_init(self: DataAccessContext, meta: Mapping[str, Any] | None = None) -> None:
    # The manager and DAL are class attributes of a bound class: only meta is per context.
    if meta is not None:
        self.meta = meta if type(meta) is Meta or isinstance(meta, Meta) else Meta(meta)


class WarnIfCollectedOpen:
    """Mixin: emit a ``ResourceWarning`` when an open context is garbage-collected.

    A finaliser costs every context on its way out, while ``ResourceWarning``
    is ignored by Python's default filters. A DataManager therefore mixes this
    into its context classes only when, at its creation, ResourceWarning is
    not ignored: under ``python -X dev``, ``-W default`` or pytest.
    """

    __slots__ = ()
    _state: int

    def __del__(self) -> None:
        if self._state == OPEN:
            warnings.warn(
                f"{self!r} was garbage-collected while still open; use it as "
                '"with dm.context():" so it is always exited',
                ResourceWarning,
                stacklevel=1,
            )


def resource_warnings_shown() -> bool:
    """Whether the current warning filters let a ResourceWarning through."""
    for action, message, category, module, _ in warnings.filters:
        if issubclass(ResourceWarning, category) and message is None and module is None:
            return action != "ignore"
    return True


class ContextClasses:
    """The context classes one DataManager has made, kept in step with its wiring."""

    def __init__(self, manager: DataManager, wiring: Wiring) -> None:
        self._manager = manager
        self._wiring = wiring
        self._classes: dict[type[DataAccessContext], type[DataAccessContext]] = {}
        self._warn = resource_warnings_shown()

    def bind(self, cls: type[DataAccessContext]) -> type[DataAccessContext]:
        """The subclass of ``cls`` the manager's contexts use (made once per class)."""
        if cls.__dict__.get("_bound_to") is self._manager:
            return cls
        bound = self._classes.get(cls)
        if bound is None:
            bound = self._classes[cls] = self._make(cls)
            self._apply(bound, self._wiring, self._wiring.resources)
        return bound

    def _make(self, cls: type[DataAccessContext]) -> type[DataAccessContext]:
        from polydatum.context import DataAccessContext

        manager = self._manager
        namespace: dict[str, Any] = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "_bound_to": manager,
        }
        if cls is DataAccessContext:
            namespace.update(
                __init__=_bound_init, data_manager=manager, dal=manager.get_dal(), meta=EMPTY_META
            )
        # Only a manager whose resources are looked up dynamically pays for
        # __getattr__ (its presence slows every attribute read of a context).
        if self._wiring.resource_for is not None and "__getattr__" not in cls.__dict__:
            namespace["__getattr__"] = _lookup_attribute
        bases: tuple[type, ...] = (cls, WarnIfCollectedOpen) if self._warn else (cls,)
        return type(cls.__name__, bases, namespace)

    def rewire(self, wiring: Wiring) -> None:
        """Hand a new wiring to every class made so far."""
        added = {k: v for k, v in wiring.resources.items() if k not in self._wiring.resources}
        self._wiring = wiring
        for bound in self._classes.values():
            self._apply(bound, wiring, added)

    @staticmethod
    def _apply(bound: type[DataAccessContext], wiring: Wiring, names: Mapping[str, Any]) -> None:
        bound._wiring = wiring
        bound._plain = wiring.plain and not bound._has_legacy_hooks
        bound._lean = wiring.lean and not bound._has_legacy_hooks
        bound._push_ctx = staticmethod(wiring.stack.set)  # type: ignore[assignment]
        for name in names:
            if not isinstance(bound.__dict__.get(name), ResourceAttribute):
                setattr(bound, name, ResourceAttribute(name))

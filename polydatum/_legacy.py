"""polydatum 1.0's module-level access to "the" active context (deprecated).

1.0 kept one global stack; 2.0 keeps one per DataManager. These accessors
look through the DataManagers created so far, newest first, and return the
first open context found. With one DataManager per process (the 1.0 norm)
that is exactly 1.0's behaviour.
"""

from __future__ import annotations

import warnings
import weakref
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from polydatum._stack import OPEN, no_context_error
from polydatum.errors import ContextStateError

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.dal import DataManager

__all__ = ["LEGACY_STACK", "ContextStack", "current_context", "get_active_context", "track"]

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
            ctx: DataAccessContext | None = dm.get_active_context()
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


# Pushes made through ContextStack.push in this thread or task, newest last:
# (stack variable, context, token to undo the push).
_pushed: ContextVar[tuple[tuple[ContextVar[Any], Any, Token[Any]], ...]] = ContextVar(
    "polydatum.legacy_pushes", default=()
)


class ContextStack:
    """1.0's ``dm.ctx_stack`` (a werkzeug ``LocalStack``): ``top``, ``push``, ``pop``.

    ``push(ctx)`` makes an entered context active in the current thread or
    task (1.0 code does that in worker threads); ``pop()`` undoes the newest
    such push. A context entered with ``with`` leaves the stack when its
    block ends, not through ``pop()``.
    """

    __slots__ = ("_dm",)

    def __init__(self, dm: DataManager) -> None:
        self._dm = dm

    @property
    def top(self) -> DataAccessContext | None:
        """The active context, or None."""
        return self._dm.get_active_context()

    def push(self, ctx: DataAccessContext) -> None:
        """Make ``ctx`` (entered elsewhere, still open) the active context here."""
        if ctx.data_manager is not self._dm or ctx._state != OPEN:
            msg = (
                f"cannot push {ctx!r}: push a context of this DataManager that was entered "
                '(with "with dm.context() as ctx:") and has not exited'
            )
            raise ContextStateError(msg)
        var = self._dm.wiring.stack
        _pushed.set((*_pushed.get(), (var, ctx, var.set(ctx))))

    def pop(self) -> DataAccessContext | None:
        """Undo the newest ``push`` of this stack here; returns that context (None if none)."""
        var = self._dm.wiring.stack
        pushes = _pushed.get()
        for index in range(len(pushes) - 1, -1, -1):
            pushed_var, ctx, token = pushes[index]
            if pushed_var is var:
                break
        else:
            top = var.get()
            if getattr(top, "_state", None) == OPEN:
                msg = (
                    f'cannot pop {top!r}: it was entered with "with" (or "async with"), not '
                    "pushed; it leaves the stack when its block ends"
                )
                raise ContextStateError(msg)
            return None  # an empty stack, as 1.0's LocalStack.pop()
        if var.get() is not ctx:
            msg = (
                f'cannot pop {ctx!r}: a context entered with "with" is above it; '
                "it leaves the stack when its block ends"
            )
            raise ContextStateError(msg)
        var.reset(token)
        _pushed.set(pushes[:index] + pushes[index + 1 :])
        return ctx  # type: ignore[no-any-return]

    def __call__(self) -> Any:
        """A proxy to the top context (1.0: ``LocalStack()`` returned a ``LocalProxy``)."""
        return current_context


class _LegacyStack:
    """1.0's module-level ``polydatum.context._ctx_stack``, across DataManagers."""

    __slots__ = ()

    @property
    def top(self) -> DataAccessContext | None:
        return _global_active_context()

    def push(self, ctx: DataAccessContext) -> None:
        ctx.data_manager.ctx_stack.push(ctx)

    def pop(self) -> DataAccessContext | None:
        top = _global_active_context()
        return None if top is None else top.data_manager.ctx_stack.pop()

    def __call__(self) -> Any:
        return current_context


LEGACY_STACK = _LegacyStack()


class _ContextProxy:
    """Deprecated 1.0 ``current_context``: forwards to the active context.

    Like the werkzeug ``LocalProxy`` it was in 1.0, it reports the context's
    class (``isinstance(current_context, DataAccessContext)``) and string.
    """

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

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        ctx = _global_active_context()
        return type(self) if ctx is None else type(ctx)

    def __str__(self) -> str:
        return str(self._get_current_object())

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

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._get_current_object()(*args, **kwargs)


current_context: Any = _ContextProxy()

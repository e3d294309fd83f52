"""The active-context stack of one DataManager.

Each DataManager owns a ``ContextVar`` whose value is the innermost active
context; the context keeps the token, and the token's ``old_value`` is the
context it shadowed, so the stack is a linked list that is never mutated in
place: push is ``var.set(ctx)``, pop is ``var.reset(token)``. Threads and
asyncio tasks each see their own value, and two DataManagers never see each
other's contexts because they never share a variable.

A ``ContextVar`` made at run time (not at module scope) is kept alive by every
``contextvars.Context`` that ever set it, so one is created per DataManager,
never per context.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from typing import Any

from polydatum.errors import ContextStateError, NoActiveContextError

# Context states. ``OPEN`` covers setup, the body, middleware teardown and the
# commit/rollback hooks: resources may be used (and created) in all of them.
CREATED = 0
OPEN = 1
CLOSING = 2
EXITED = 3


class _NoContext:
    """The value of an empty stack: never open, so every use of it fails."""

    _state = CREATED
    _async = False

    def __repr__(self) -> str:
        return "<no active context>"


NO_CONTEXT: Any = _NoContext()


def new_stack_var(owner: object) -> ContextVar[Any]:
    """A fresh stack variable for one DataManager."""
    return ContextVar(f"polydatum.active_context.{id(owner):x}", default=NO_CONTEXT)


def _in_event_loop() -> bool:
    """Whether this thread runs an asyncio event loop (asyncio is not imported for this)."""
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and asyncio._get_running_loop() is not None


def no_context_error(ctx: Any, what: str = "the DAL") -> NoActiveContextError | ContextStateError:
    """The error for using ``what`` when ``ctx`` (the top of a stack) is not open."""
    if ctx is NO_CONTEXT or ctx is None:
        opener = "async with" if _in_event_loop() else "with"
        msg = f'no active polydatum context for {what}; open one with "{opener} dm.context():"'
        return NoActiveContextError(msg)
    if ctx._state == CREATED:
        msg = f'{ctx!r} was never entered; use it as "with dm.context() as ctx:"'
        return ContextStateError(msg)
    if ctx._state == CLOSING:
        msg = (
            f"{ctx!r} is closing: its middleware has finished, so {what} cannot be used from "
            "a hook or a resource's teardown; do that work in the context's body"
        )
        return ContextStateError(msg)
    msg = (
        f"{ctx!r} has already exited (was it used from a task or thread that outlived it?); "
        f'open a new one with "with dm.context():"'
    )
    return ContextStateError(msg)

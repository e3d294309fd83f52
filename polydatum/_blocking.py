"""Blocking work moved off the event loop, finished even when the awaiting task is cancelled."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

__all__ = ["run_blocking"]

T = TypeVar("T")


async def run_blocking(fn: Callable[..., T], /, *args: Any, executor: Executor | None = None) -> T:
    """Run ``fn(*args)`` in ``executor`` (the event loop's default one if None) and return its result.

    The call sees the caller's context variables (a copy, as
    :func:`asyncio.to_thread` gives). Unlike ``to_thread``, a cancellation of
    the awaiting task neither abandons the thread nor hides what it did: the
    work is waited for (a COMMIT half done must not meet the session's close
    running beside it), its result returned or its error raised, and the
    cancellation is requested again, so it arrives at the task's next
    ``await``.
    """
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    future = loop.run_in_executor(executor, call)
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            # wait() leaves the future alone when this task is cancelled.
            await asyncio.wait((future,))
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        task = asyncio.current_task()
        if task is not None:
            # Put the request back as it was (3.11+ counts them: asyncio.timeout relies on it).
            uncancel = getattr(task, "uncancel", None)
            if uncancel is not None:
                uncancel()
            task.cancel(*cancelled.args)
    return future.result()

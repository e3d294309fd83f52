"""Blocking work moved off the event loop, finished even when the awaiting task is cancelled."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = ["ElasticThreads", "run_blocking"]

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


class ElasticThreads(Executor):
    """A thread pool that keeps ``core`` threads busy and adds one only when they are stuck.

    ``ThreadPoolExecutor`` starts a thread whenever none is idle, so under
    load it runs as many threads as work items in flight, and every one of
    them awake competes for the GIL with the application's own threads. This
    pool queues work behind its ``core`` threads instead, and starts another
    (up to ``limit``) only when work waits and no thread finished anything
    for ``patience`` seconds: busy threads make progress and get no company
    (that would only add contention), stuck ones do, so work that blocks (a
    COMMIT's hook waiting for a pooled connection that a queued item holds)
    cannot starve the queue. Threads beyond ``core`` leave after ``linger`` idle seconds; all of
    them are daemon threads, started on first use.

    With ``grow_after`` (seconds), the rule is for work that mostly waits on
    I/O (reading a slow store's blocks), where a thread waiting costs no GIL
    and a queue behind two threads would make every reader wait for all the
    others: when every thread has been on its current item for
    ``grow_after`` and work has waited as long, a thread is added for each
    such waiting item. Threads that keep finishing quick items (a busy
    machine, not a slow store) get no company.
    """

    def __init__(
        self,
        core: int,
        limit: int,
        *,
        name: str,
        patience: float = 1.0,
        linger: float = 2.0,
        grow_after: float | None = None,
    ) -> None:
        self._core = core
        self._limit = max(core, limit)
        self._name = name
        self._patience = patience if grow_after is None else grow_after
        self._grow_after = grow_after
        self._linger = linger
        self._queue: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...], float]] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._threads = 0
        self._idle = 0
        self._started = 0
        self._finished = 0
        self._since: dict[int, float] = {}  # thread ident -> when its current item started (grow_after)
        self._watching = False
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queue ``fn(*args, **kwargs)``; its future."""
        future: Future[T] = Future()
        call = functools.partial(fn, *args, **kwargs) if kwargs else fn
        with self._ready:
            if self._shutdown:
                msg = "cannot schedule new work after shutdown"
                raise RuntimeError(msg)
            self._queue.append((future, call, args if not kwargs else (), time.monotonic()))
            if self._idle > 0:
                self._ready.notify()
            elif self._threads < self._core:
                self._start()
            elif not self._watching and self._threads < self._limit:
                self._watching = True
                self._spawn(self._watch, "watch")
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; the threads leave once the queue is empty (``cancel_futures`` empties it)."""
        with self._ready:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            self._ready.notify_all()

    def _spawn(self, target: Callable[[], None], role: str) -> None:
        self._started += 1
        thread = threading.Thread(target=target, name=f"{self._name}_{role}{self._started}", daemon=True)
        thread.start()

    def _start(self) -> None:
        self._threads += 1
        self._spawn(self._work, "")

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    if self._shutdown:
                        self._threads -= 1
                        return
                    self._idle += 1
                    woken = self._ready.wait(self._linger if self._threads > self._core else None)
                    self._idle -= 1
                    if not woken and not self._queue and self._threads > self._core:
                        self._threads -= 1
                        return
                future, call, args, _ = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            if self._grow_after is not None:
                self._since[threading.get_ident()] = time.monotonic()
            try:
                result = call(*args)
            except BaseException as exc:  # the caller gets it, as from ThreadPoolExecutor
                future.set_exception(exc)
                del exc
            else:
                future.set_result(result)
            if self._grow_after is not None:
                self._since.pop(threading.get_ident(), None)
            del future, call, args
            self._finished += 1  # read by _watch; a lost update only delays it a tick

    def _watch(self) -> None:
        # Runs while work waits: one more thread each ``patience`` in which none finished
        # anything; with ``grow_after``, one more for each item that waited that long.
        finished = self._finished
        grow_after = self._grow_after
        while True:
            time.sleep(self._patience)
            with self._ready:
                if not self._queue or self._shutdown or self._threads >= self._limit:
                    self._watching = False
                    return
                now = time.monotonic()
                if grow_after is not None:
                    held = sum(1 for since in list(self._since.values()) if now - since >= grow_after)
                    if self._idle or held < self._threads:
                        continue  # a thread is free or still cycling through quick items
                    waited = 0
                    for item in self._queue:  # oldest first
                        if now - item[3] < grow_after:
                            break
                        waited += 1
                    for _ in range(min(waited, self._limit - self._threads)):
                        self._start()
                    continue
                stuck = self._finished == finished
                finished = self._finished
                if stuck and self._idle == 0 and now - self._queue[0][3] >= self._patience:
                    self._start()

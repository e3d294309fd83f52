"""Where the integrations report to telemetry, when someone listens.

The cache and blob integrations report what they moved; polydatum.celery
hands over the messages it sends and the tasks it runs so that the trace
travels with them. ``sink`` is None until a listener is added (by
:func:`polydatum.otel.instrument` or :meth:`polydatum.recorder.Recorder.install`),
so an application that is not instrumented pays one module attribute test
per cache lookup, blob transfer or task. With one listener ``sink`` is that
listener; with several it is a fan-out that tells each in turn. It is
process-wide, like the cache and blob objects that report to it (they are
shared by every context).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["Listener", "listen", "sink", "unlisten"]


class Listener:
    """What the integrations report; each method does nothing until overridden."""

    def cache_lookup(self, namespace: str, hits: int, misses: int) -> None:
        """A cache read in ``namespace`` found ``hits`` keys and missed ``misses``."""

    def blob_bytes(self, direction: str, count: int) -> None:
        """``count`` bytes went ``"in"`` (stored) or ``"out"`` (read) of a blob store."""

    def inject(self, headers: dict[str, Any]) -> None:
        """Put the current trace context into ``headers``."""

    def publish(self, task: str, headers: dict[str, Any], send: Callable[[], T]) -> T:
        """Run ``send()`` (once), its trace context put into ``headers`` first."""
        return send()

    def task_started(self, carrier: Mapping[str, Any]) -> Any:
        """A task starts: continue the trace in ``carrier``; the result goes to :meth:`task_ended`."""
        return None

    def task_ended(self, token: Any) -> None:
        """The task started with :meth:`task_started` has ended."""


class _Fanout(Listener):
    """Several listeners behind the one ``sink`` slot, told in the order they were added."""

    def __init__(self, listeners: tuple[Listener, ...]) -> None:
        self.listeners = listeners

    def cache_lookup(self, namespace: str, hits: int, misses: int) -> None:
        for listener in self.listeners:
            listener.cache_lookup(namespace, hits, misses)

    def blob_bytes(self, direction: str, count: int) -> None:
        for listener in self.listeners:
            listener.blob_bytes(direction, count)

    def inject(self, headers: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener.inject(headers)

    def publish(self, task: str, headers: dict[str, Any], send: Callable[[], T]) -> T:
        # Each listener wraps the next one's send, so the message goes out once.
        for listener in reversed(self.listeners):
            send = _wrapped(listener, task, headers, send)
        return send()

    def task_started(self, carrier: Mapping[str, Any]) -> Any:
        return [listener.task_started(carrier) for listener in self.listeners]

    def task_ended(self, token: Any) -> None:
        for listener, part in reversed(list(zip(self.listeners, token, strict=True))):
            listener.task_ended(part)


def _wrapped(
    listener: Listener, task: str, headers: dict[str, Any], send: Callable[[], T]
) -> Callable[[], T]:
    return lambda: listener.publish(task, headers, send)


sink: Listener | None = None
_listeners: list[Listener] = []
_lock = threading.Lock()


def listen(listener: Listener) -> None:
    """Add ``listener`` (once; adding it again does nothing)."""
    with _lock:
        if not any(existing is listener for existing in _listeners):
            _listeners.append(listener)
            _publish()


def unlisten(listener: Listener) -> None:
    """Remove ``listener`` (idempotent)."""
    with _lock:
        _listeners[:] = [existing for existing in _listeners if existing is not listener]
        _publish()


def _publish() -> None:
    global sink  # the one slot the integrations read
    if not _listeners:
        sink = None
    elif len(_listeners) == 1:
        sink = _listeners[0]
    else:
        sink = _Fanout(tuple(_listeners))

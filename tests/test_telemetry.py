"""The process-wide telemetry slot: one listener is the slot itself, several share it through a fan-out."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import pytest

from polydatum import _telemetry

T = TypeVar("T")


class Tape(_telemetry.Listener):
    """A listener that writes down what it hears, under its own name."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def cache_lookup(self, namespace: str, hits: int, misses: int) -> None:
        self.log.append(f"{self.name} cache {namespace} {hits}/{misses}")

    def blob_bytes(self, direction: str, count: int) -> None:
        self.log.append(f"{self.name} blob {direction} {count}")

    def inject(self, headers: dict[str, Any]) -> None:
        headers[self.name] = "injected"

    def publish(self, task: str, headers: dict[str, Any], send: Callable[[], T]) -> T:
        self.log.append(f"{self.name} before {task}")
        try:
            return send()
        finally:
            self.log.append(f"{self.name} after {task}")

    def task_started(self, carrier: Mapping[str, Any]) -> Any:
        self.log.append(f"{self.name} started")
        return self.name

    def task_ended(self, token: Any) -> None:
        self.log.append(f"{self.name} ended {token}")


@pytest.fixture(name="log")
def fixture_log() -> Iterator[list[str]]:
    log: list[str] = []
    yield log
    assert _telemetry.sink is None, "a test left a listener behind"


def test_one_listener_is_the_slot_and_leaves_it_empty(log: list[str]) -> None:
    """With one listener the integrations call it directly; removing it empties the slot."""
    tape = Tape("a", log)
    _telemetry.listen(tape)
    _telemetry.listen(tape)  # adding it twice does not double what it hears
    try:
        assert _telemetry.sink is tape
    finally:
        _telemetry.unlisten(tape)
    _telemetry.unlisten(tape)  # idempotent
    assert _telemetry.sink is None


def test_several_listeners_each_hear_every_report_in_order(log: list[str]) -> None:
    """Two listeners: both hear lookups and transfers, headers get both, a send happens once."""
    first, second = Tape("a", log), Tape("b", log)
    _telemetry.listen(first)
    _telemetry.listen(second)
    try:
        sink = _telemetry.sink
        assert sink is not None
        sink.cache_lookup("ns", 1, 2)
        sink.blob_bytes("in", 5)
        headers: dict[str, Any] = {}
        sink.inject(headers)
        sends: list[str] = []
        assert sink.publish("t", headers, lambda: sends.append("sent") or "result") == "result"
        token = sink.task_started({})
        sink.task_ended(token)
    finally:
        _telemetry.unlisten(first)
        _telemetry.unlisten(second)
    assert headers == {"a": "injected", "b": "injected"}
    assert sends == ["sent"]
    assert log == [
        "a cache ns 1/2",
        "b cache ns 1/2",
        "a blob in 5",
        "b blob in 5",
        "a before t",
        "b before t",
        "b after t",
        "a after t",
        "a started",
        "b started",
        "b ended b",
        "a ended a",
    ]


def test_removing_one_of_two_leaves_the_other_as_the_slot(log: list[str]) -> None:
    """The slot goes back to the single remaining listener, not a fan-out of one."""
    first, second = Tape("a", log), Tape("b", log)
    _telemetry.listen(first)
    _telemetry.listen(second)
    _telemetry.unlisten(first)
    try:
        assert _telemetry.sink is second
    finally:
        _telemetry.unlisten(second)

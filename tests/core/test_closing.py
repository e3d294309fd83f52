"""A closing context: resource teardowns and the final hook may use the DAL, but create nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from polydatum import DataManager, Service
from polydatum.errors import ContextStateError


class Users(Service):
    def get(self, user_id: int) -> int:
        return user_id


class Audit(Service):
    """Keeps what resources flushed on their way out."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[object] = []

    def flush(self, entries: list[str]) -> None:
        self.flushed.append((list(entries), self._ctx.meta.user))


def test_resource_teardown_calls_the_dal() -> None:
    """A resource flushing its buffer through a service at teardown reaches the service."""
    dm = DataManager()
    audit = Audit()
    dm.register_services(audit=audit)

    def buffer(ctx: object) -> Iterator[list[str]]:
        entries: list[str] = []
        yield entries
        dm.get_dal().audit.flush(entries)

    dm.register_resources(buffer=buffer)
    with dm.context(meta={"user": "ann"}) as ctx:
        ctx.buffer.append("signed in")
    assert audit.flushed == [(["signed in"], "ann")]
    assert ctx.get_resource_exit_errors() == []


def test_resource_teardown_calls_the_dal_through_method_middleware() -> None:
    """With method middleware registered, the teardown's DAL call still runs the chain."""
    dm = DataManager()
    audit = Audit()
    dm.register_services(audit=audit)
    calls: list[str] = []

    def record(request: object, handler: object) -> object:
        calls.append(request.path_name)  # type: ignore[attr-defined]
        return handler(request)  # type: ignore[operator]

    dm.register_method_middleware(record)

    def buffer(ctx: object) -> Iterator[list[str]]:
        entries: list[str] = []
        yield entries
        dm.get_dal().audit.flush(entries)

    dm.register_resources(buffer=buffer)
    with dm.context(meta={"user": "bob"}) as ctx:
        ctx.buffer.append("x")
    assert calls == ["audit.flush"]
    assert audit.flushed == [(["x"], "bob")]


def test_creating_a_resource_while_closing_is_refused_with_the_reason() -> None:
    """A teardown reaching for a resource nobody created is told the context is closing."""
    dm = DataManager()
    seen: list[BaseException] = []

    def late(ctx: object) -> Iterator[str]:
        yield "late"

    def audit(ctx: object) -> Iterator[str]:
        yield "audit"
        try:
            ctx.late  # type: ignore[attr-defined]
        except ContextStateError as exc:
            seen.append(exc)

    dm.register_resources(audit=audit, late=late)
    with dm.context() as ctx:
        assert ctx.audit == "audit"
    assert len(seen) == 1
    message = str(seen[0])
    assert "is closing" in message
    assert "'late' cannot be created" in message


def test_after_exit_the_message_is_about_an_exited_context() -> None:
    """A command called with an exited context on the stack says the context has exited."""
    dm = DataManager()
    dm.register_services(users=Users())
    with dm.context():
        command = dm.get_dal().users.get
    with dm.context() as ctx:
        pass
    token = dm.wiring.stack.set(ctx)  # what a task that outlived the context inherits
    try:
        with pytest.raises(ContextStateError, match="has already exited"):
            command(1)
    finally:
        dm.wiring.stack.reset(token)

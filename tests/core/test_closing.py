"""What a hook or a resource's teardown meets when it reaches for the DAL of a closing context."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from polydatum import DataManager, Service
from polydatum.errors import ContextStateError


class Users(Service):
    def get(self, user_id: int) -> int:
        return user_id


def test_resource_teardown_using_the_dal_is_told_why_it_cannot() -> None:
    dm = DataManager()
    dm.register_services(users=Users())
    seen: list[BaseException] = []

    def audit(ctx: object) -> Iterator[str]:
        yield "audit"
        try:
            dm.get_dal().users.get(1)
        except ContextStateError as exc:
            seen.append(exc)

    dm.register_resources(audit=audit)
    with dm.context() as ctx:
        assert ctx.audit == "audit"
    assert len(seen) == 1
    message = str(seen[0])
    assert "is closing" in message
    assert "do that work in the context's body" in message
    assert "outlived" not in message  # not the message for a context used after it exited


def test_after_exit_the_message_is_about_an_exited_context() -> None:
    dm = DataManager()
    dm.register_services(users=Users())
    with dm.context():
        command = dm.get_dal().users.get
    with dm.context() as ctx:
        pass
    token = dm._ctx_var.set(ctx)  # what a task that outlived the context inherits
    try:
        with pytest.raises(ContextStateError, match="has already exited"):
            command(1)
    finally:
        dm._ctx_var.reset(token)

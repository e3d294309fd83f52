"""The smallest complete polydatum program: a service, a resource, a hook.

Run: python examples/quickstart.py
"""

from __future__ import annotations

from collections.abc import Generator

from polydatum import DataAccessContext, DataManager, Service
from polydatum.errors import NotFound

USERS = {42: "ann"}


class Users(Service):
    """Looks users up and records what it did."""

    def get(self, user_id: int) -> str:
        self._ctx.audit.append(f"get {user_id} for {self._ctx.meta.request_id}")
        if user_id not in USERS:
            raise NotFound(f"no user {user_id}")
        self._ctx.on_commit(print, f"request {self._ctx.meta.request_id} done")
        return USERS[user_id]


def audit_log(ctx: DataAccessContext) -> Generator[list[str], None, None]:
    """A resource: created on first use in a context, closed when it ends."""
    entries: list[str] = []
    yield entries
    print("audit:", entries)


def main() -> None:
    dm = DataManager()
    dm.register_resources(audit=audit_log)
    dm.register_services(users=Users())
    with dm.dal(meta={"request_id": "r-1"}) as dal:
        print("user 42 is", dal.users.get(42))
    try:
        with dm.dal(meta={"request_id": "r-2"}) as dal:
            dal.users.get(7)
    except NotFound as exc:
        print("not found:", exc)


if __name__ == "__main__":
    main()

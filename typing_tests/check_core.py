"""Type-checked, never run: the public API as a user would type it."""

from __future__ import annotations

from collections.abc import Generator

from polydatum import DataAccessContext, DataAccessLayer, DataManager, Meta, Service


class Users(Service):
    def get(self, user_id: int) -> dict[str, int]:
        ctx: DataAccessContext = self._ctx
        assert isinstance(ctx.meta, Meta)
        return {"id": user_id}


def connection(ctx: DataAccessContext) -> Generator[str, None, None]:
    yield "conn"


def sync_usage(dm: DataManager) -> None:
    dm.register_resources(conn=connection)
    dm.register_services(users=Users())
    with dm.context(meta={"user": "ann"}) as ctx:
        meta: Meta = ctx.meta
        user: object = meta.user
        ctx.on_commit(print, "done", user)
    with dm.dal() as dal:
        layer: DataAccessLayer = dal
        layer.users.get(1)


async def async_usage(dm: DataManager) -> None:
    async with dm.context() as ctx:
        await ctx.aget("conn")
    async with dm.dal() as dal:
        await dal.users.get(1)

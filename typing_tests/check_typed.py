"""The typed DAL, context and resources: what the checkers must infer, and must refuse.

Every ``assert_type`` fails the run if a type is lost (it became ``Any`` or
changed). Every line ending in ``# type: ignore[code]`` (mypy, with
``warn_unused_ignores``) and ``# pyright: ignore[rule]`` (pyright, with
``reportUnnecessaryTypeIgnoreComment``) must stay an error: if it stopped
being one, the unused ignore fails the run.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from typing_extensions import assert_type

from polydatum import DataAccessContext, DataAccessLayer, DataManager, Meta, Service
from polydatum.blob import BlobStore
from polydatum.cache import AsyncCache, Cache

from .app_types import Ctx, Dal, Profiles, Users, dm


def sync_dal() -> None:
    with dm.dal() as dal:
        assert_type(dal, Dal)
        assert_type(dal.users, Users)
        assert_type(dal.users.get(1), dict[str, int])
        assert_type(dal.users.profile, Profiles)
        assert_type(dal.users.profile.get(1), str)
        dal.userz  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue]
        dal.users.gett(1)  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue]
        dal.users.get("1")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        dal.users.profile.get()  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]


async def async_dal() -> None:
    async with dm.dal(meta={"user": 1}) as dal:
        assert_type(dal, Dal)
        assert_type(await dal.users.fetch(1), list[int])
        assert_type(dal.users.get(1), dict[str, int])
        dal.userz  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue]


def sync_context() -> None:
    with dm.context() as ctx:
        assert_type(ctx, Ctx)
        assert_type(ctx.db, Session)
        assert_type(ctx.cache, Cache)
        assert_type(ctx.blobs, BlobStore)
        assert_type(ctx.meta, Meta)
        assert_type(ctx.dal, Dal)
        assert_type(ctx.dal.users.get(1), dict[str, int])
        ctx.dbb  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue]
        ctx.db.no_such_method()  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue]
    active = dm.get_active_context()
    assert_type(active, "Ctx | None")
    assert_type(dm.require_active_context(), Ctx)


async def async_context() -> None:
    async with dm.context() as ctx:
        assert_type(ctx, Ctx)
        assert_type(await ctx.aget("db"), AsyncSession)
        assert_type(await ctx.aget("cache"), AsyncCache)
        assert_type(await ctx.aget("anything else"), Any)


def inside_a_service(users: Users) -> None:
    assert_type(users._dal, Dal)
    assert_type(users._ctx, Ctx)
    assert_type(users._ctx.db, Session)
    assert_type(users._dal.users.profile.get(1), str)
    users._dal.profiles  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue]


def decorated() -> None:
    @dm.dal()
    def job(n: int) -> int:
        return n

    assert_type(job(1), int)


# -- the integrations take a typed DataManager like any other ----------------


def takes_any_manager(manager: DataManager) -> DataAccessContext:
    return manager.context()


def typed_is_a_data_manager() -> None:
    takes_any_manager(dm)


# -- 1.0's untyped style: everything past the DataManager is Any, never an error --


class Untyped(Service):
    def get(self, user_id):  # type: ignore[no-untyped-def]
        return self._dal.others.get(user_id)


def untyped_style() -> None:
    plain = DataManager()
    plain.register_services(users=Untyped())
    with plain.dal() as dal:
        assert_type(dal, Any)
        dal.users.get(1)
        dal.anything.at.all(1, 2)
    with plain.context() as ctx:
        assert_type(ctx, DataAccessContext[Any])
        assert_type(ctx.dal, Any)
    assert_type(Untyped()._dal, Any)
    layer: DataAccessLayer = plain.get_dal()
    layer.users.get(1)  # the DataAccessLayer itself keeps its dynamic paths
    layer["users.get"](1)


def services_only() -> None:
    """Declaring only the services is one type argument."""
    services_dm = DataManager[Dal]()
    with services_dm.dal() as dal:
        assert_type(dal.users.get(1), dict[str, int])
    with services_dm.context() as ctx:
        assert_type(ctx, DataAccessContext[Dal])
        ctx.db  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue]


def wrong_declarations() -> None:
    DataManager[Dal, int]  # type: ignore[type-var]  # pyright: ignore[reportInvalidTypeArguments]

"""A typed application, the way docs/typing.md declares one (type-checked, never run).

The declaration is two classes next to each other: ``Dal`` names the
services (what ``dal.<name>`` is), ``Ctx`` the resources (what ``ctx.<name>``
is). Services say which application they belong to with
``Service[Dal, Ctx]``, which types their ``self._dal`` and ``self._ctx``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, overload

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from polydatum import DataAccessContext, DataManager, Service
from polydatum.blob import BlobStore
from polydatum.cache import AsyncCache, Cache


class Profiles(Service["Dal", "Ctx"]):
    def get(self, user_id: int) -> str:
        return f"profile {user_id}"


class Users(Service["Dal", "Ctx"]):
    profile: Profiles  # nested: Users().register_services(profile=Profiles())

    def get(self, user_id: int) -> dict[str, int]:
        self._ctx.db.execute  # a Session: a typo here would be an error
        return {"id": user_id}

    def name(self, user_id: int) -> str:
        # Another service through the typed DAL of the same application.
        return self._dal.users.profile.get(user_id)

    async def fetch(self, user_id: int) -> list[int]:
        session = await self._ctx.aget("db")
        await session.commit()
        return [user_id]


class Dal:
    """The application's services: ``dal.users`` is a ``Users``."""

    users: Users


class Ctx(DataAccessContext[Dal]):
    """The application's resources: ``ctx.db`` is a ``Session``."""

    db: Session
    cache: Cache
    blobs: BlobStore

    if TYPE_CHECKING:
        # What ``await ctx.aget(name)`` gives, for the resources that differ in
        # an ``async with`` context (a Dual gives an AsyncSession there).
        @overload
        async def aget(self, name: Literal["db"]) -> AsyncSession: ...
        @overload
        async def aget(self, name: Literal["cache"]) -> AsyncCache: ...
        @overload
        async def aget(self, name: str) -> Any: ...
        async def aget(self, name: str) -> Any: ...


dm = DataManager[Dal, Ctx]()
dm.register_services(users=Users().register_services(profile=Profiles()))

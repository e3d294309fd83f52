"""Type-checked, never run: typed document collections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from typing_extensions import assert_type

from polydatum import DataManager
from polydatum.documents import AsyncCollection, Collection, Collections, Definition, Doc, Documents
from polydatum.sqlalchemy import Database


@dataclass
class Cart:
    status: str


def usage(dm: DataManager, db: Database) -> None:
    docs = Documents(db)
    carts = docs.define("carts", Cart, indexes={"status": str})
    assert_type(carts, Definition[Cart])
    assert_type(docs.define("notes"), Definition[dict[str, Any]])
    with dm.context() as ctx:
        view: Collections[Collection[Any]] = getattr(ctx, "docs")  # noqa: B009 - a resource, typed here
        typed = view.collection(carts)
        assert_type(typed, Collection[Cart])
        doc = typed.put("c1", Cart("open"))
        assert_type(doc, Doc[Cart])
        assert_type(typed.require("c1").value, Cart)
        assert_type(view.collection("notes"), Collection[Any])


async def async_usage(dm: DataManager, carts: Definition[Cart]) -> None:
    async with dm.context() as ctx:
        view: Collections[AsyncCollection[Any]] = await ctx.aget("docs")
        typed = view.collection(carts)
        assert_type(typed, AsyncCollection[Cart])
        found = await typed.get("c1")
        assert_type(found, Doc[Cart] | None)

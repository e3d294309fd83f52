"""Type-checked, never run: cache models keep the model's type through every operation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from typing_extensions import assert_type

from polydatum.cache import AsyncCache, Cache
from polydatum.cache.models import AsyncModels, Models, Ref, cache_model


@cache_model(key="id")
@dataclass
class Author:
    id: int
    name: str


@cache_model(key=("tenant", "id"), ttl=60, serializer="msgpack")
@dataclass
class Post:
    tenant: str
    id: int
    author: Ref[Author]


def sync_usage(cache: Cache) -> None:
    assert_type(Author, type[Author])  # the decorator hands back the class itself
    posts = cache.models(Post)
    assert_type(posts, Models[Post])
    assert_type(posts.get(("acme", 1)), Post | None)
    assert_type(posts.get_many([("acme", 1)], preload=("author",)), dict[Any, Post])
    assert_type(posts.update(("acme", 1), author=Ref(2)), Post | None)
    assert_type(posts.incr(("acme", 1), "id"), int | None)
    assert_type(posts.exists(("acme", 1)), bool)
    assert_type(posts.delete_many([("acme", 1)]), int)
    post = posts.get(("acme", 1))
    if post is not None:
        assert_type(post.author.get(), Author | None)
        assert_type(Ref.to(Author(1, "ada")), Ref[Author])
    posts.save(Author(1, "ada"))  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    cache.models(Post, immediate=True).create(post)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]


async def async_usage(acache: AsyncCache) -> None:
    authors = acache.models(Author)
    assert_type(authors, AsyncModels[Author])
    assert_type(await authors.get(1), Author | None)
    assert_type(await authors.get_many([1, 2]), dict[Any, Author])
    assert_type(await authors.touch(1, ttl=None), bool)
    post = await acache.models(Post).get(("acme", 1))
    if post is not None:
        assert_type(await post.author.aget(), Author | None)

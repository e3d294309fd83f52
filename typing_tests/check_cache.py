"""Type-checked, never run: the cache and Redis vocabulary (install, ping, locks)."""

from __future__ import annotations

from typing_extensions import assert_type

from polydatum import DataManager
from polydatum.cache import AsyncCache, AsyncMemoryLock, Cache, LockBase, MemoryBackend, MemoryLock
from polydatum.redis import AsyncRedis, AsyncRedisLock, Redis, RedisLock


class AppCache(Cache):
    """A subclass: install() hands back the subclass, not Cache."""


def sync_usage(dm: DataManager, redis: Redis) -> None:
    assert_type(AppCache().install(dm, name="cache"), AppCache)
    assert_type(redis.install(dm, name="redis"), Redis)
    assert_type(redis.ping(), bool)
    assert_type(redis.cache().ping(), bool)
    lock = MemoryLock(MemoryBackend(), "job", 5, None)
    with lock as held:
        assert_type(held, MemoryLock)
    with redis.lock("job", timeout=5) as rheld:
        assert_type(rheld, RedisLock)
    base: LockBase = rheld
    assert_type(base.acquire(blocking=False), bool)
    redis.install(dm, "redis")  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]


async def async_usage(dm: DataManager, aredis: AsyncRedis, acache: AsyncCache) -> None:
    assert_type(acache.install(dm, name="cache"), AsyncCache)
    assert_type(aredis.install(dm, name="redis"), AsyncRedis)
    assert_type(await acache.ping(), bool)
    assert_type(await aredis.ping(), bool)
    async with aredis.lock("job", timeout=5) as held:
        assert_type(held, AsyncRedisLock)
    async with AsyncMemoryLock(MemoryLock(MemoryBackend(), "job", 5, None)) as mheld:
        assert_type(mheld, AsyncMemoryLock)

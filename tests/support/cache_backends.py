"""The four cache backends every cache contract runs over: memory, Redis, memcached, files.

A suite parametrizes over :data:`CACHE_BACKENDS` and builds each with
:func:`make_backend` (sync) or :func:`make_async_backend` (its async twin on
the same store), so a new suite (the cache models') runs on all four alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from polydatum.cache import (
    AsyncFileSystemBackend,
    AsyncMemoryBackend,
    FileSystemBackend,
    MemoryBackend,
)

CACHE_BACKENDS = ["memory", "redis", "memcached", "filesystem"]


def make_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A fresh sync backend of ``kind``; Redis and memcached are the session's servers.

    The Redis backend comes from a module fixture ``redis_pool`` (a
    :class:`~polydatum.redis.Redis`) and the memcached one from ``memcached``
    (a :class:`~polydatum.memcached.MemcachedBackend`), which the suite defines.
    """
    if kind == "redis":
        from polydatum.redis import RedisBackend

        return RedisBackend(request.getfixturevalue("redis_pool"))
    if kind == "memcached":
        return request.getfixturevalue("memcached")
    if kind == "filesystem":
        return FileSystemBackend(tmp_path / "cache")
    if kind == "memory":
        return MemoryBackend()
    raise ValueError(f"unknown cache backend kind {kind!r}; known: {CACHE_BACKENDS}")


def make_async_backend(kind: str, backend: Any, aredis: Any = None) -> Any:
    """The async twin of ``backend`` (from :func:`make_backend`) on the same store."""
    if kind == "redis":
        from polydatum.redis import AsyncRedisBackend

        return AsyncRedisBackend(aredis)
    if kind == "memcached":
        from polydatum.memcached import AsyncMemcachedBackend

        return AsyncMemcachedBackend(backend=backend)
    if kind == "filesystem":
        return AsyncFileSystemBackend(backend=backend)
    return AsyncMemoryBackend(backend)

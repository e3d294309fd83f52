"""Type-checked, never run: every shipped backend satisfies the backend protocols."""

from __future__ import annotations

from typing_extensions import assert_type

from polydatum.cache import (
    AsyncCache,
    AsyncCacheBackend,
    AsyncFileSystemBackend,
    Cache,
    CacheBackend,
    FileSystemBackend,
    FileSystemLock,
    LockBase,
    ThreadedAsyncLock,
)
from polydatum.memcached import AsyncMemcachedBackend, MemcachedBackend, MemcachedLock
from polydatum.protobuf import ProtobufSerializer


def backends(files: FileSystemBackend, memcached: MemcachedBackend) -> None:
    sync: list[CacheBackend] = [files, memcached]
    asynchronous: list[AsyncCacheBackend] = [
        AsyncFileSystemBackend(backend=files),
        AsyncMemcachedBackend(memcached),
    ]
    assert_type(files.lock("job", 5, None), FileSystemLock)
    assert_type(memcached.lock("job", 5, None), MemcachedLock)
    base: LockBase = memcached.lock("job", 5, None)
    assert_type(AsyncFileSystemBackend(files).lock("job", 5, None), ThreadedAsyncLock)
    assert_type(Cache(memcached).ping(), bool)
    assert_type(AsyncCache(AsyncMemcachedBackend(backend=memcached)), AsyncCache)
    assert_type(memcached.ping(), bool)
    assert_type(files.sweep(), int)
    del sync, asynchronous, base


def serializer(protobuf: ProtobufSerializer) -> None:
    assert_type(protobuf(), ProtobufSerializer)
    assert_type(protobuf.dumps({"id": 1}), bytes)

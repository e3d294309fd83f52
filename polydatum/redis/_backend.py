"""The cache backends storing entries in Redis: :class:`RedisBackend` and :class:`AsyncRedisBackend`.

They share :class:`BackendBase` (the client, its checks and the Lua scripts);
each does its own I/O. Any failure that means Redis cannot serve us now
becomes a :class:`~polydatum.cache.CacheUnavailable` (a full pool, a
:class:`~polydatum.redis.PoolTimeout`), which the cache rides out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import redis as _redis
from redis.asyncio.cluster import RedisCluster as _AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

from polydatum.cache import CounterError
from polydatum.cache._backends import When
from polydatum.redis._base import RedisBase
from polydatum.redis._connections import UNAVAILABLE, AsyncClient, SyncClient, unavailable
from polydatum.redis._locks import AsyncRedisLock, RedisLock

if TYPE_CHECKING:
    from polydatum.redis._client import AsyncRedis, Redis


def check_bytes(client: Any) -> None:
    if isinstance(client, RedisCluster | _AsyncRedisCluster):
        decodes = client.get_encoder().decode_responses
    else:
        decodes = client.get_connection_kwargs().get("decode_responses")
    if decodes:
        msg = (
            "a cache needs the raw bytes Redis stores, but this client has "
            "decode_responses=True; give the cache a Redis made without it"
        )
        raise ValueError(msg)


# KEYS[1] value key, KEYS[2] guard; ARGV value, token, ttl in ms ("" for none).
# A compare-and-set: a cached() result is stored only while its computing
# claim is intact, so an invalidation (which deletes the claim) voids it.
SET_GUARDED = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('SET', KEYS[1], ARGV[1])
else redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3]) end
redis.call('DEL', KEYS[2])
return 1
"""
DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS[1] record; ARGV expected, new value. KEEPTTL (Redis 6+) leaves the expiry alone.
COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""


def glob_escape(prefix: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in prefix)


class BackendBase:
    """What both backends share: the client, its checks and the scripts, no I/O.

    Args:
        redis: a :class:`~polydatum.redis.Redis` or :class:`~polydatum.redis.AsyncRedis`,
            or a redis-py client of the matching kind.
    """

    def __init__(self, redis: RedisBase | Any) -> None:
        self.client = redis.client() if isinstance(redis, RedisBase) else redis
        check_bytes(self.client)
        # MGET and MSET need every key in one slot; their cluster forms split them.
        self._cluster = isinstance(self.client, RedisCluster | _AsyncRedisCluster)
        # Script objects reload themselves after a restart empties the script cache.
        self._set_guarded = self.client.register_script(SET_GUARDED)
        self._delete_if = self.client.register_script(DELETE_IF)
        self._compare_and_set = self.client.register_script(COMPARE_AND_SET)


class RedisBackend(BackendBase):
    """The :class:`~polydatum.cache.CacheBackend` storing entries in Redis.

    Args:
        redis: a :class:`Redis` (or a ``redis.Redis`` or
            ``redis.cluster.RedisCluster`` client) to use.

    .. versionadded:: 2.0
    """

    client: SyncClient

    def __init__(self, redis: Redis | SyncClient) -> None:
        super().__init__(redis)
        # Redis.get hands keys=[key] down every layer of redis-py for its client-side
        # cache alone; without one (redis-py < 5.1 has none), a bare GET costs about
        # 1 µs less. Looked up at each call, not bound here: instrumentation such as
        # OpenTelemetry's wraps execute_command on the class, maybe after we start.
        get_cache = getattr(self.client, "get_cache", None)
        self._bare_get = not self._cluster and (get_cache is None or get_cache() is None)

    def get(self, key: str) -> bytes | None:
        """GET (on a cluster, straight to the node that holds the key's slot)."""
        try:
            if self._bare_get:
                return self.client.execute_command("GET", key)  # type: ignore[no-untyped-call,no-any-return]
            if self._cluster:
                return self._get_on_node(cast("RedisCluster", self.client), key)
            return cast("bytes | None", self.client.get(key))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    @staticmethod
    def _get_on_node(cluster: RedisCluster, key: str) -> bytes | None:
        # A cache hit is one GET, and RedisCluster.get costs about 40 % more CPU
        # than Redis.get (command policies, retries, metrics) before it reaches
        # that node's own client. Send it there directly; anything unusual (a
        # MOVED slot, a node failing over) takes the cluster client's full path,
        # which follows redirections and refreshes its map of the slots.
        # surrogatepass: the bytes the client sends for this key (see _connections.py)
        node = cluster.nodes_manager.get_node_from_slot(key_slot(key.encode("utf-8", "surrogatepass")))
        client = node.redis_connection
        if client is not None:
            try:
                return cast("bytes | None", client.get(key))
            except (_redis.ResponseError, _redis.ConnectionError, _redis.TimeoutError):
                pass
        return cast("bytes | None", cluster.get(key))

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """MGET (one per slot on a cluster)."""
        try:
            if self._cluster:
                return cast("list[bytes | None]", self.client.mget_nonatomic(keys))  # type: ignore[union-attr]
            return cast("list[bytes | None]", self.client.mget(keys))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    def set(self, key: str, value: bytes, ttl_ms: int | None, when: When) -> bool:
        """SET with PX, and NX (``absent``) or XX (``present``)."""
        try:
            done = self.client.set(key, value, px=ttl_ms, nx=when == "absent", xx=when == "present")
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc
        return bool(done)

    def set_many(self, items: Mapping[str, bytes], ttl_ms: int | None) -> None:
        """MSET, or one pipelined SET PX per item when there is a TTL."""
        try:
            if ttl_ms is None:
                if self._cluster:
                    self.client.mset_nonatomic(dict(items))  # type: ignore[union-attr]
                else:
                    self.client.mset(dict(items))
                return
            with self.client.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, value, px=ttl_ms)
                pipe.execute()
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    def delete_many(self, keys: Sequence[str]) -> int:
        """UNLINK (memory is freed in the background); returns how many existed."""
        try:
            return int(self.client.unlink(*keys))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    def incr(self, key: str, delta: int) -> int:
        """INCRBY."""
        try:
            return int(self.client.incrby(key, delta))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc
        except _redis.ResponseError as exc:
            raise CounterError(str(exc)) from None

    def pttl(self, key: str) -> int | None:
        """PTTL: milliseconds left, -1 for no expiry, None when missing."""
        try:
            ms = int(self.client.pttl(key))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc
        return None if ms == -2 else ms

    def clear(self, prefix: str) -> int:
        """SCAN for ``prefix*`` (every primary of a cluster) and UNLINK in batches (never KEYS)."""
        deleted = 0
        batch: list[bytes] = []
        try:
            for key in self.client.scan_iter(match=glob_escape(prefix) + "*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(self.client.unlink(*batch))
                    batch.clear()
            if batch:
                deleted += int(self.client.unlink(*batch))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc
        return deleted

    def set_guarded(self, key: str, value: bytes, ttl_ms: int | None, guard: str, token: bytes) -> bool:
        """One Lua script: SET ``key`` and DEL ``guard`` only if ``guard`` holds ``token``."""
        try:
            ttl = b"" if ttl_ms is None else ttl_ms
            return bool(self._set_guarded(keys=[key, guard], args=[value, token, ttl]))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    def delete_if(self, key: str, token: bytes) -> bool:
        """One Lua script: DEL ``key`` only if it holds ``token``."""
        try:
            return bool(self._delete_if(keys=[key], args=[token]))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    def compare_and_set(self, key: str, expected: bytes, value: bytes) -> bool:
        """One Lua script: SET ``key`` KEEPTTL only if it holds ``expected``."""
        try:
            return bool(self._compare_and_set(keys=[key], args=[expected, value]))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    def touch(self, key: str, ttl_ms: int | None) -> bool:
        """PEXPIRE (PERSIST when ``ttl_ms`` is None, after checking the key exists)."""
        try:
            if ttl_ms is not None:
                return bool(self.client.pexpire(key, ttl_ms))
            with self.client.pipeline(transaction=not self._cluster) as pipe:
                pipe.exists(key)
                pipe.persist(key)
                exists, _ = pipe.execute()
            return bool(exists)
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    def lock(self, key: str, timeout: float, blocking_timeout: float | None) -> RedisLock:
        """A :class:`RedisLock` on ``key``."""
        return RedisLock(self.client, key, timeout, blocking_timeout)

    def ping(self) -> bool:
        """PING."""
        try:
            return bool(self.client.ping())
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc


class AsyncRedisBackend(BackendBase):
    """The :class:`~polydatum.cache.AsyncCacheBackend` storing entries in Redis.

    .. versionadded:: 2.0
    """

    client: AsyncClient

    def __init__(self, redis: AsyncRedis | AsyncClient) -> None:
        super().__init__(redis)

    async def get(self, key: str) -> bytes | None:
        """GET."""
        try:
            return cast("bytes | None", await self.client.get(key))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """MGET (one per slot on a cluster)."""
        try:
            if self._cluster:
                return cast("list[bytes | None]", await self.client.mget_nonatomic(keys))  # type: ignore[union-attr]
            return cast("list[bytes | None]", await self.client.mget(keys))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    async def set(self, key: str, value: bytes, ttl_ms: int | None, when: When) -> bool:
        """SET with PX and NX/XX."""
        try:
            done = await self.client.set(key, value, px=ttl_ms, nx=when == "absent", xx=when == "present")
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc
        return bool(done)

    async def set_many(self, items: Mapping[str, bytes], ttl_ms: int | None) -> None:
        """MSET, or pipelined SET PX."""
        try:
            if ttl_ms is None:
                if self._cluster:
                    await self.client.mset_nonatomic(dict(items))  # type: ignore[union-attr]
                else:
                    await self.client.mset(dict(items))
                return
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, value, px=ttl_ms)
                await pipe.execute()
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    async def delete_many(self, keys: Sequence[str]) -> int:
        """UNLINK."""
        try:
            return int(await self.client.unlink(*keys))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    async def incr(self, key: str, delta: int) -> int:
        """INCRBY."""
        try:
            return int(await self.client.incrby(key, delta))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc
        except _redis.ResponseError as exc:
            raise CounterError(str(exc)) from None

    async def pttl(self, key: str) -> int | None:
        """PTTL."""
        try:
            ms = int(await self.client.pttl(key))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc
        return None if ms == -2 else ms

    async def clear(self, prefix: str) -> int:
        """SCAN and UNLINK in batches."""
        deleted = 0
        batch: list[bytes] = []
        try:
            async for key in self.client.scan_iter(match=glob_escape(prefix) + "*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(await self.client.unlink(*batch))
                    batch.clear()
            if batch:
                deleted += int(await self.client.unlink(*batch))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc
        return deleted

    async def set_guarded(self, key: str, value: bytes, ttl_ms: int | None, guard: str, token: bytes) -> bool:
        """See :meth:`RedisBackend.set_guarded`."""
        try:
            ttl = b"" if ttl_ms is None else ttl_ms
            return bool(await self._set_guarded(keys=[key, guard], args=[value, token, ttl]))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    async def delete_if(self, key: str, token: bytes) -> bool:
        """See :meth:`RedisBackend.delete_if`."""
        try:
            return bool(await self._delete_if(keys=[key], args=[token]))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    async def compare_and_set(self, key: str, expected: bytes, value: bytes) -> bool:
        """See :meth:`RedisBackend.compare_and_set`."""
        try:
            return bool(await self._compare_and_set(keys=[key], args=[expected, value]))
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    async def touch(self, key: str, ttl_ms: int | None) -> bool:
        """See :meth:`RedisBackend.touch`."""
        try:
            if ttl_ms is not None:
                return bool(await self.client.pexpire(key, ttl_ms))
            async with self.client.pipeline(transaction=not self._cluster) as pipe:
                pipe.exists(key)
                pipe.persist(key)
                exists, _ = await pipe.execute()
            return bool(exists)
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    def lock(self, key: str, timeout: float, blocking_timeout: float | None) -> AsyncRedisLock:
        """An :class:`AsyncRedisLock` on ``key``."""
        return AsyncRedisLock(self.client, key, timeout, blocking_timeout)

    async def ping(self) -> bool:
        """PING."""
        try:
            return bool(await self.client.ping())
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

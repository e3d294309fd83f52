"""Stampede claims: who computes a :func:`~polydatum.cache.cached` entry that is missing.

Of the callers that miss the same key at once, the one whose ``add`` of the
key's claim (``ns:1#claim:<key>``, see ``_base.py``) succeeds computes it; the
others wait for its result. The value is stored only while the claim is
intact (one atomic compare-and-set in the backend), and an invalidation
deletes the claim along with the entry, so a result computed from data read
before the invalidation is never stored after it. A claim that can neither be
stored under nor released (the backend failed meanwhile) is deleted once the
backend answers again.

:class:`Claims` holds the claims of a :class:`~polydatum.cache.Cache`,
:class:`AsyncClaims` those of an :class:`~polydatum.cache.AsyncCache`; each
cache class inherits its own and supplies ``backend`` and ``_call``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from polydatum.cache._backends import AsyncCacheBackend, CacheBackend
from polydatum.cache._base import MISS, TTL, CacheBase, ttl_ms


class Claims(CacheBase):
    """The claims of a cache on a :class:`CacheBackend`."""

    backend: CacheBackend

    def _call(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:  # pragma: no cover - Cache's
        raise NotImplementedError

    def _claim(self, key: str, ttl: float) -> bytes | None:
        """Claim the computing of ``key`` for ``ttl`` seconds; the token, or None if taken."""
        token = self._new_token()
        claim = self._claim_key(key)
        done = self._call("add", self.backend.set, claim, token, ttl_ms(ttl), "absent")
        return token if done is True else None

    def _is_claimed(self, key: str) -> bool:
        found = self._call("get", self.backend.get, self._claim_key(key))
        return found is not None and found is not MISS

    def _store_claimed(self, key: str, value: Any, ttl: TTL, token: bytes) -> bool:
        """Store ``value`` only while our claim on ``key`` is intact; True when stored."""
        full = self._prefix + key
        data = self._encode(value)
        claim = self._claim_key(key)
        done = self._call("set", self.backend.set_guarded, full, data, ttl_ms(ttl), claim, token)
        if done is MISS:
            self._orphaned(claim)
        return done is True

    def _release_claim(self, key: str, token: bytes) -> None:
        claim = self._claim_key(key)
        if self._call("delete", self.backend.delete_if, claim, token) is MISS:
            self._orphaned(claim)


class AsyncClaims(CacheBase):
    """:class:`Claims` on an :class:`AsyncCacheBackend`."""

    backend: AsyncCacheBackend

    async def _call(  # pragma: no cover - AsyncCache's
        self, op: str, fn: Callable[..., Awaitable[Any]], *args: Any
    ) -> Any:
        raise NotImplementedError

    async def _claim(self, key: str, ttl: float) -> bytes | None:
        """See :meth:`Claims._claim`."""
        token = self._new_token()
        claim = self._claim_key(key)
        done = await self._call("add", self.backend.set, claim, token, ttl_ms(ttl), "absent")
        return token if done is True else None

    async def _is_claimed(self, key: str) -> bool:
        found = await self._call("get", self.backend.get, self._claim_key(key))
        return found is not None and found is not MISS

    async def _store_claimed(self, key: str, value: Any, ttl: TTL, token: bytes) -> bool:
        """See :meth:`Claims._store_claimed`."""
        full = self._prefix + key
        data = self._encode(value)
        claim = self._claim_key(key)
        done = await self._call("set", self.backend.set_guarded, full, data, ttl_ms(ttl), claim, token)
        if done is MISS:
            self._orphaned(claim)
        return done is True

    async def _release_claim(self, key: str, token: bytes) -> None:
        claim = self._claim_key(key)
        if await self._call("delete", self.backend.delete_if, claim, token) is MISS:
            self._orphaned(claim)

"""Commit deferral: invalidations that wait for their context's commit.

``cache.invalidate(*keys)`` deletes nothing at once. The keys are held per
context until it commits (then deleted, each with its ``cached()`` claim) or
rolls back (then forgotten); meanwhile :func:`~polydatum.cache.cached` skips
them in that context, so it reads its own writes. With an outbox the delete is
an outbox row of the context's transaction instead of a commit hook.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from polydatum.cache._errors import CacheError
from polydatum.cache._keys import claim_key

if TYPE_CHECKING:
    from polydatum.cache._backends import CacheBackend
    from polydatum.context import DataAccessContext


class Deferral:
    """The invalidations of one cache that wait for a commit, per context.

    Args:
        namespace: the cache's namespace (the outbox topic is
            ``"polydatum.cache:<namespace>"``).
        entries: the prefix of the cache's entries (``"ns:1:"``).
        claims: the prefix of its claims (``"ns:1#claim:"``).
    """

    def __init__(self, namespace: str, entries: str, claims: str) -> None:
        self.entries = entries
        self.claims = claims
        self.topic = f"polydatum.cache:{namespace}"
        # context -> keys whose deletion waits for that context's commit.
        self.pending: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self.outbox: Any = None

    def use_outbox(self, outbox: Any, deliver_to: CacheBackend | None) -> None:
        """Send invalidations through ``outbox`` (None: commit hooks); ``deliver_to`` deletes them."""
        self.outbox = outbox
        if outbox is None:
            return
        from polydatum.outbox import Outbox

        if not isinstance(outbox, Outbox):
            msg = f"outbox must be a polydatum.outbox.Outbox, got {type(outbox).__name__}"
            raise TypeError(msg)
        assert deliver_to is not None

        def deliver_invalidation(effect: Any) -> None:
            # Straight to the backend: an unavailable one raises, and the outbox retries later.
            deliver_to.delete_many(effect.payload["keys"])

        outbox.add_handler_once(self.topic, deliver_invalidation)

    def invalidate(
        self, keys: Sequence[str], ctx: DataAccessContext | None, flush: Callable[[DataAccessContext], Any]
    ) -> None:
        """Hold ``keys`` for ``ctx``'s commit: ``flush(ctx)`` then, or an outbox row now."""
        if self.outbox is None:
            self.defer(keys, ctx, flush)
            return
        # Read-your-writes as without the outbox; the delete itself is an outbox row.
        self.defer(keys, ctx, self.forget)
        assert ctx is not None  # defer() raised otherwise
        # In an ``async with`` context the row joins the AsyncSession's transaction before its COMMIT.
        self.outbox.add(ctx, self.topic, {"keys": self.full_keys(keys)})

    def defer(
        self, keys: Sequence[str], ctx: DataAccessContext | None, flush: Callable[[DataAccessContext], Any]
    ) -> None:
        """Hold ``keys`` until ``ctx`` ends; on its commit call ``flush(ctx)``.

        Raises:
            CacheError: ``ctx`` is None.
        """
        if ctx is None:
            msg = (
                "invalidate() must know which context's commit to wait for; call it on the "
                "cache resource (ctx.cache.invalidate(...)) or pass ctx=, or call delete_many() "
                "to delete at once"
            )
            raise CacheError(msg)
        pending = self.pending.setdefault(ctx, set())
        first = not pending
        pending.update(keys)
        if first:
            ctx.on_commit(flush, ctx)
            ctx.on_rollback(self.pending.pop, ctx, None)

    def forget(self, ctx: DataAccessContext) -> None:
        """Drop what ``ctx`` held."""
        self.pending.pop(ctx, None)

    def is_pending(self, ctx: DataAccessContext | None, key: str) -> bool:
        """True when ``key`` was invalidated in ``ctx`` and waits for its commit."""
        waiting = self.pending
        if not waiting or ctx is None:  # the common case: nothing invalidated
            return False
        pending = waiting.get(ctx)
        return pending is not None and key in pending

    def pop(self, ctx: DataAccessContext) -> list[str]:
        """The full keys to delete for ``ctx``'s invalidations, which are forgotten."""
        return self.full_keys(sorted(self.pending.pop(ctx, ())))

    def full_keys(self, keys: Sequence[str]) -> list[str]:
        """The entries of ``keys`` and their claims.

        Each key goes with its claim, so a cached() caller that read the
        database before the commit cannot store its stale result afterwards.
        """
        entries, claims = self.entries, self.claims
        return [*(entries + k for k in keys), *(claim_key(claims, entries, k) for k in keys)]

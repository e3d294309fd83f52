"""Hash tags: which part of a key a Redis Cluster hashes to pick its slot.

A Redis Cluster keeps each key in one of 16384 slots, found by hashing the
key, or only its *hash tag* when it has one: the text between the first
``{`` and the first ``}`` after it, when that text is not empty. A Lua script
may touch several keys only when they all hash to one slot, so a cache entry
and the claim that guards its store (see :func:`claim_key`) always do.
"""

from __future__ import annotations


def hash_tag(key: str) -> str | None:
    """The hash tag of ``key`` as Redis Cluster reads it, or None when it has none."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:  # no closing brace, or "{}": the whole key is hashed
        return None
    return key[start + 1 : end]


def slot_safe(key: str) -> bool:
    """True when :func:`claim_key` can put a claim in ``key``'s slot.

    That fails only for a key without a hash tag that holds a ``}``:
    :func:`~polydatum.cache.cached` hashes such keys (as it does long ones).
    """
    return "}" not in key or hash_tag(key) is not None


def claim_key(claims: str, entries: str, key: str) -> str:
    """The claim of ``key``: under the ``claims`` prefix, in the slot of its entry.

    A key with a hash tag keeps it (``ns:1#claim:{user:1}:profile``); the claim
    of a key without one takes the entry's full name as its tag
    (``ns:1#claim:{ns:1:user:1}``), which hashes as the entry does. Neither
    prefix holds a brace (the cache refuses such namespaces).
    """
    full = entries + key
    if "{" in key and hash_tag(key) is not None:
        return claims + key
    if "}" in full:  # not slot_safe(): no cached() key is like this
        return claims + key
    return f"{claims}{{{full}}}"

"""The cache backend storing entries in memcached, on pymemcache.

Three things memcached lacks are built here:

* **clear(prefix)**: memcached cannot list keys. Every stored key carries the
  *generation* of each of its first ``clear_depth`` ``:``-prefixes (``ns:``,
  ``ns:1:``), kept in counters under ``:gen:<prefix>``; clearing a prefix
  bumps its counter, so every key under it is stored under a new name and the
  old entries are never read again (memcached evicts them in time). A counter
  that is missing (never made, or evicted) is created with a value never used
  before, so an eviction can only clear, never bring old entries back.
* **keys**: memcached takes at most 250 bytes of printable ASCII without
  spaces. A key that is longer once its generations are added, or holds
  anything else (a space, a control character, non-ASCII), is stored as
  ``~`` plus the hex SHA-256 of its UTF-8.
* **compare-and-delete** (locks, the claims of ``cached()``): ``gets`` gives
  a value's CAS id, and the meta command ``md <key> C<cas>`` deletes only
  while the value is unchanged.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pymemcache.client.base import PooledClient
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
)

from polydatum.cache import CacheBusy, CacheError, CacheUnavailable, CounterError, ItemTooLarge
from polydatum.cache._backends import When
from polydatum.cache._locks import TokenLock

#: The longest key memcached accepts, in bytes.
MAX_KEY_BYTES = 250
#: memcached's default item size limit (its ``-I`` option): 1 MiB.
DEFAULT_MAX_ITEM_SIZE = 1024 * 1024
# A relative expiry longer than 30 days is read by memcached as a Unix time.
_RELATIVE_LIMIT = 30 * 24 * 3600
_INT64 = (-(2**63), 2**63 - 1)
_INTEGER = re.compile(rb"-?[0-9]+")
_PLAIN_KEY = re.compile(r"[\x21-\x7e]+")
_GEN = ":gen:"
# How many prefixes' generations one backend remembers.
_MAX_KNOWN_GENS = 10_000
# Room memcached needs beside the value in one item (header, key, suffix).
_ITEM_OVERHEAD = 512


def _unavailable(exc: BaseException) -> CacheUnavailable:
    # The reason, not the address: errors never name a server.
    return CacheUnavailable(f"memcached is unavailable: {type(exc).__name__}")


# What means "memcached cannot serve us now".
_DOWN = (OSError, MemcacheUnexpectedCloseError)


@contextmanager
def _io() -> Iterator[None]:
    try:
        yield
    except _DOWN as exc:
        raise _unavailable(exc) from exc
    except RuntimeError as exc:
        if "Too many objects" not in str(exc):
            raise
        # pymemcache's pool is full: not an outage, so the cache must not degrade.
        msg = (
            "every memcached connection of the pool is in use (max_pool_size); pass a larger "
            "MemcachedBackend(max_pool_size=...) or run fewer operations at once"
        )
        raise CacheBusy(msg) from None


def _check_meta(reply: bytes) -> None:
    if reply.startswith((b"ERROR", b"CLIENT_ERROR")):
        msg = (
            "this memcached does not understand the meta commands (mg, md) that TTLs, locks and "
            "claims use; they need memcached 1.6 or later"
        )
        raise CacheError(msg)


def wire_key(key: str) -> str:
    """The key memcached is sent for ``key``: itself, or ``~`` + SHA-256 hex when it cannot be.

    A key is sent as it is when it is printable ASCII without spaces and at
    most 250 bytes; any other key is hashed.
    """
    if len(key) <= MAX_KEY_BYTES and _PLAIN_KEY.fullmatch(key) and key[:1] != "~":
        return key
    return "~" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


_LAST_EXPIRY = 2**31 - 1  # 2038-01-19, the last absolute expiry memcached can hold


def _expire(ttl_ms: int | None) -> int:
    """memcached's expiry for ``ttl_ms``: whole seconds rounded up, 0 for none."""
    if ttl_ms is None:
        return 0
    seconds = max(1, math.ceil(ttl_ms / 1000))
    if seconds > _RELATIVE_LIMIT:
        # An absolute time, which memcached keeps in 32 bits: past 2038 it would
        # wrap into the past and the item be dropped at once. Keep it until then.
        return min(int(time.time()) + seconds, _LAST_EXPIRY)
    return seconds


class MemcachedBackend:
    """The :class:`~polydatum.cache.CacheBackend` storing entries in memcached.

    Args:
        server: ``"host:port"``, a ``(host, port)`` pair, or a pymemcache
            ``PooledClient``/``Client`` made with ``default_noreply=False``
            and no serde (values are bytes).
        connect_timeout: seconds to wait for a connection.
        timeout: seconds to wait for an answer.
        max_pool_size: connections kept open (for a ``server`` address).
        max_item_size: the server's item size limit (its ``-I``); larger
            values raise :class:`~polydatum.cache.ItemTooLarge` before any I/O.
        clear_depth: how many ``:``-separated segments a :meth:`clear`
            prefix may have (``"ns:"`` is 1, ``"ns:child:"`` is 2). Each
            distinct prefix of that depth has a counter: 2 makes one per
            namespace and version; 3, for a child of a child namespace, also
            one per first segment of the keys of a top-level namespace.
        generation_refresh: seconds a plain ``set`` may trust the
            generations it last read (see the module's notes); reads,
            deletes, counters and claims always read them afresh.

    TTLs are whole seconds in memcached: a TTL is rounded up to the next
    second. :meth:`clear` returns 0, as memcached cannot count what it drops.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        server: str | tuple[str, int] | Any = "127.0.0.1:11211",
        *,
        connect_timeout: float = 1.0,
        timeout: float = 2.0,
        max_pool_size: int = 50,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
        clear_depth: int = 2,
        generation_refresh: float = 1.0,
    ) -> None:
        if clear_depth < 1:
            msg = f"clear_depth must be at least 1, got {clear_depth!r}"
            raise ValueError(msg)
        if isinstance(server, str | tuple):
            self.client: Any = PooledClient(
                server,
                connect_timeout=connect_timeout,
                timeout=timeout,
                max_pool_size=max_pool_size,
                default_noreply=False,
                # Requests are small and answered at once: Nagle's delay only slows them.
                no_delay=True,
            )
        else:
            self.client = server
        self.max_item_size = max_item_size
        self.clear_depth = clear_depth
        self.generation_refresh = generation_refresh
        # prefix -> (generation, when read): what this process last saw.
        self._gens: dict[str, tuple[str, float]] = {}
        self._gens_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<MemcachedBackend clear_depth={self.clear_depth}>"

    def close(self) -> None:
        """Close every connection (a later call opens new ones)."""
        self.client.close()

    # -- keys and generations ------------------------------------------------------

    def _prefixes(self, key: str) -> list[str]:
        """The ``:``-prefixes of ``key`` that carry a generation (none for ``:``-keys: locks)."""
        if key[:1] == ":":
            return []
        found: list[str] = []
        start = 0
        while len(found) < self.clear_depth:
            i = key.find(":", start)
            if i < 0:
                break
            found.append(key[: i + 1])
            start = i + 1
        return found

    def _stored(self, key: str, gens: Mapping[str, str]) -> str:
        prefixes = self._prefixes(key)
        if not prefixes:
            return wire_key(key)
        sig = ".".join(gens[p] for p in prefixes)
        return wire_key(f"{sig}/{key}")

    @staticmethod
    def _fresh_generation() -> str:
        # Never used before (time plus randomness), so a counter lost to an
        # eviction can never bring back the entries of an older generation.
        return str(time.time_ns() // 1000 * 1000 + uuid.uuid4().int % 1000)

    def _read_gens(self, prefixes: set[str], known: Mapping[str, Any] | None = None) -> dict[str, str]:
        """The current generation of each prefix (one ``get_many``), creating missing ones."""
        if not prefixes:
            return {}
        wanted = {wire_key(_GEN + p): p for p in prefixes}
        found = known if known is not None else self.client.get_many(list(wanted))
        gens: dict[str, str] = {}
        for wire, prefix in wanted.items():
            value = found.get(wire)
            if value is None:
                fresh = self._fresh_generation()
                if not self.client.add(wire, fresh.encode(), expire=0, noreply=False):
                    value = self.client.get(wire)
                gens[prefix] = fresh if value is None else value.decode()
            else:
                gens[prefix] = value.decode()
        now = time.monotonic()
        with self._gens_lock:
            if len(self._gens) > _MAX_KNOWN_GENS:
                self._gens.clear()  # a bound on memory; they are read again when needed
            for prefix, gen in gens.items():
                self._gens[prefix] = (gen, now)
        return gens

    def _cached_gens(self, prefixes: set[str], max_age: float) -> dict[str, str] | None:
        now = time.monotonic()
        with self._gens_lock:
            out: dict[str, str] = {}
            for prefix in prefixes:
                entry = self._gens.get(prefix)
                if entry is None or now - entry[1] > max_age:
                    return None
                out[prefix] = entry[0]
            return out

    def _keys_now(self, keys: Sequence[str]) -> list[str]:
        """The stored names of ``keys`` under the current generations (read afresh)."""
        prefixes = {p for k in keys for p in self._prefixes(k)}
        gens = self._read_gens(prefixes)
        return [self._stored(k, gens) for k in keys]

    def _check_size(self, key: str, value: bytes) -> None:
        if len(value) + _ITEM_OVERHEAD > self.max_item_size:
            msg = (
                f"the value for cache key {key!r} is {len(value)} bytes; memcached stores items of "
                f"at most max_item_size={self.max_item_size} bytes (its -I option) including about "
                f"{_ITEM_OVERHEAD} bytes of overhead; store less, or raise the server's -I and "
                "MemcachedBackend(max_item_size=...)"
            )
            raise ItemTooLarge(msg)

    def _refused(self, key: str, exc: MemcacheServerError) -> CacheError:
        """memcached's SERVER_ERROR for a store as one of ours: ItemTooLarge, or a CacheError."""
        reason = (
            exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        )
        if "too large" in reason:
            msg = (
                f"memcached refused the value for cache key {key!r} as too large for one item "
                f"(MemcachedBackend(max_item_size={self.max_item_size}) did not catch it: the "
                "server's -I option is lower); store less, or raise the server's -I"
            )
            return ItemTooLarge(msg)
        msg = f"memcached refused to store cache key {key!r}: {reason}"
        return CacheError(msg)

    # -- reads ---------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """GET, checking the generations in the same round trip."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One ``get_many`` of the entries and their generations (two if a generation moved)."""
        if not keys:
            return []
        prefixes = {p for k in keys for p in self._prefixes(k)}
        with _io():
            guess = self._cached_gens(prefixes, math.inf)
            if guess is None:
                gens = self._read_gens(prefixes)
            else:
                # Speculatively: the entries under the generations last seen, and the
                # generations themselves; only a clear since then costs a second trip.
                wires = [self._stored(k, guess) for k in keys]
                gen_wires = [wire_key(_GEN + p) for p in prefixes]
                found = self.client.get_many([*wires, *gen_wires])
                gens = self._read_gens(prefixes, found)
                if gens == guess:
                    return [found.get(w) for w in wires]
            wires = [self._stored(k, gens) for k in keys]
            found = self.client.get_many(wires)
        return [found.get(w) for w in wires]

    def pttl(self, key: str) -> int | None:
        """The meta command ``mg <key> t``: whole seconds left, as milliseconds."""
        with _io():
            (wire,) = self._keys_now([key])
            reply = self.client.raw_command(f"mg {wire} t".encode(), b"\r\n")
        _check_meta(reply)
        if not reply.startswith(b"HD"):
            return None
        for token in reply.split()[1:]:
            if token.startswith(b"t"):
                seconds = int(token[1:])
                return -1 if seconds < 0 else max(1, seconds * 1000)
        return -1

    # -- writes --------------------------------------------------------------------

    def set(self, key: str, value: bytes, ttl_ms: int | None, when: When) -> bool:
        """SET, or ADD (``absent``), or REPLACE (``present``)."""
        self._check_size(key, value)
        with _io():
            if when == "always":
                (wire,) = self._write_keys([key])
            else:
                (wire,) = self._keys_now([key])
            op = {"always": self.client.set, "absent": self.client.add, "present": self.client.replace}[when]
            try:
                return bool(op(wire, value, expire=_expire(ttl_ms), noreply=False))
            except MemcacheServerError as exc:
                raise self._refused(key, exc) from None

    def _write_keys(self, keys: Sequence[str]) -> list[str]:
        # A plain set may use generations read up to generation_refresh ago: a set
        # that lands in an older generation is only a lost write (a later miss).
        prefixes = {p for k in keys for p in self._prefixes(k)}
        gens = self._cached_gens(prefixes, self.generation_refresh)
        if gens is None:
            gens = self._read_gens(prefixes)
        return [self._stored(k, gens) for k in keys]

    def set_many(self, items: Mapping[str, bytes], ttl_ms: int | None) -> None:
        """``set_many``: every item with the same TTL."""
        for key, value in items.items():
            self._check_size(key, value)
        keys = list(items)
        with _io():
            wires = self._write_keys(keys)
            try:
                # set answers STORED or an error (raised), so no key is left unstored silently.
                self.client.set_many(
                    {w: items[k] for w, k in zip(wires, keys, strict=True)},
                    expire=_expire(ttl_ms),
                    noreply=False,
                )
            except MemcacheServerError as exc:
                raise self._refused(keys[0], exc) from None

    def delete_many(self, keys: Sequence[str]) -> int:
        """DELETE each key (under the generations read afresh); how many existed."""
        with _io():
            deleted = 0
            for wire in self._keys_now(keys):
                deleted += bool(self.client.delete(wire, noreply=False))
        return deleted

    def incr(self, key: str, delta: int) -> int:
        """INCR for a non-negative counter (keeps the TTL); a CAS loop for negative ones."""
        if not _INT64[0] <= delta <= _INT64[1]:
            msg = "value is not an integer or out of range"
            raise CounterError(msg)
        with _io():
            (wire,) = self._keys_now([key])
            for _ in range(100):
                done = self._incr_once(wire, delta)
                if done is not None:
                    return done
        msg = f"cache key {key!r}: the counter kept changing under 100 compare-and-set attempts"
        raise CacheError(msg)

    def _incr_once(self, wire: str, delta: int) -> int | None:
        if delta >= 0:
            try:
                found = self.client.incr(wire, delta, noreply=False)
            except MemcacheClientError:
                found = None  # a negative number (or no number): the slow path says which
            else:
                if found is None:
                    if self.client.add(wire, str(delta).encode(), expire=0, noreply=False):
                        return delta
                    return None
                number = int(found)
                if number > _INT64[1]:
                    # Only memcached's counters are unsigned 64 bits: undo, then refuse.
                    self.client.decr(wire, delta, noreply=False)
                    msg = "value is not an integer or out of range"
                    raise CounterError(msg)
                return number
        value, cas = self.client.gets(wire)
        if value is None:
            return delta if self.client.add(wire, str(delta).encode(), expire=0, noreply=False) else None
        if not _INTEGER.fullmatch(value):
            msg = "value is not an integer or out of range"
            raise CounterError(msg)
        number = int(value) + delta
        if not _INT64[0] <= number <= _INT64[1]:
            msg = "value is not an integer or out of range"
            raise CounterError(msg)
        expire = self._expire_left(wire)  # cas takes an expiry: carry the one left over
        return (
            number if self.client.cas(wire, str(number).encode(), cas, expire=expire, noreply=False) else None
        )

    def _expire_left(self, wire: str) -> int:
        """The expiry ``wire`` has left, as an expiry to store again with (0: none)."""
        reply = self.client.raw_command(f"mg {wire} t".encode(), b"\r\n")
        left = next((int(t[1:]) for t in reply.split()[1:] if t.startswith(b"t")), -1)
        return 0 if left < 0 else max(1, left)

    def clear(self, prefix: str) -> int:
        """Bump the generation of ``prefix``: every entry under it is unreachable at once.

        Returns 0: memcached cannot count the entries it leaves behind (they
        expire or are evicted in time).

        Raises:
            ValueError: ``prefix`` does not end with ``:``, starts with ``:``, or
                has more segments than ``clear_depth``.
        """
        segments = prefix.count(":")
        if not prefix.endswith(":") or prefix[:1] == ":" or segments > self.clear_depth:
            msg = (
                f"memcached clears by namespace: the prefix must end with ':', not start with "
                f"one, and have at most clear_depth={self.clear_depth} segments, got {prefix!r}; "
                "pass a larger MemcachedBackend(clear_depth=...) for deeper namespaces"
            )
            raise ValueError(msg)
        wire = wire_key(_GEN + prefix)
        with _io():
            found = self.client.incr(wire, 1, noreply=False)
            if found is None and not self.client.add(
                wire, self._fresh_generation().encode(), expire=0, noreply=False
            ):
                found = self.client.incr(wire, 1, noreply=False)
        with self._gens_lock:
            # Forget what we knew: the next operation reads the new generation.
            for known in [p for p in self._gens if p.startswith(prefix)]:
                del self._gens[known]
        return 0

    # -- compare-and-set -----------------------------------------------------------

    def _delete_cas(self, wire: str, cas: bytes) -> bool:
        """Meta delete ``md <key> C<cas>``: only while the value is the one read."""
        reply = self.client.raw_command(b"md " + wire.encode() + b" C" + cas, b"\r\n")
        _check_meta(reply)
        return bool(reply.startswith(b"HD"))

    def set_guarded(self, key: str, value: bytes, ttl_ms: int | None, guard: str, token: bytes) -> bool:
        """Store ``value`` only while ``guard`` holds ``token``, and delete the guard.

        memcached has no transaction over two keys: the value is stored, then
        the guard deleted by CAS; if the guard changed meanwhile (an
        invalidation deleted it) the value is deleted again, so it is visible
        for at most that one round trip.
        """
        self._check_size(key, value)
        with _io():
            wire, guard_wire = self._keys_now([key, guard])
            held, cas = self.client.gets(guard_wire)
            if held != token:
                return False
            try:
                self.client.set(wire, value, expire=_expire(ttl_ms), noreply=False)
            except MemcacheServerError as exc:
                raise self._refused(key, exc) from None
            if self._delete_cas(guard_wire, cas):
                return True
            self.client.delete(wire, noreply=False)
            return False

    def delete_if(self, key: str, token: bytes) -> bool:
        """GETS, then a CAS delete: ``key`` is deleted only while it holds ``token``."""
        with _io():
            (wire,) = self._keys_now([key])
            return self._delete_if_wire(wire, token)

    def _delete_if_wire(self, wire: str, token: bytes) -> bool:
        held, cas = self.client.gets(wire)
        if held != token:
            return False
        return self._delete_cas(wire, cas)

    def compare_and_set(self, key: str, expected: bytes, value: bytes) -> bool:
        """GETS, then CAS: store ``value`` only while ``key`` holds ``expected``, keeping its expiry."""
        self._check_size(key, value)
        with _io():
            (wire,) = self._keys_now([key])
            held, cas = self.client.gets(wire)
            if held is None or held != expected:
                return False
            try:
                return bool(self.client.cas(wire, value, cas, expire=self._expire_left(wire), noreply=False))
            except MemcacheServerError as exc:
                raise self._refused(key, exc) from None

    def touch(self, key: str, ttl_ms: int | None) -> bool:
        """TOUCH: a new expiry for ``key`` (whole seconds; None: never); False when it is missing."""
        with _io():
            (wire,) = self._keys_now([key])
            return bool(self.client.touch(wire, expire=_expire(ttl_ms), noreply=False))

    def lock(self, key: str, timeout: float, blocking_timeout: float | None) -> MemcachedLock:
        """A :class:`MemcachedLock` on ``key``."""
        return MemcachedLock(self, key, timeout, blocking_timeout)

    def ping(self) -> bool:
        """``version``: True when memcached answers."""
        try:
            with _io():
                self.client.version()
        except CacheUnavailable:
            return False
        except MemcacheError:
            return False
        return True


class MemcachedLock(TokenLock):
    """A lock in memcached: ADD with an expiry, released by a CAS delete of its token.

    Its expiry is whole seconds (``timeout`` rounded up). Releasing a lock
    that expired (and maybe was taken by another since) raises
    :class:`~polydatum.cache.LockExpired`; the backend being down raises
    :class:`~polydatum.cache.CacheUnavailable`.

    .. versionadded:: 2.0
    """

    #: Seconds between two tries of a blocking ``acquire``.
    pause = 0.01

    def __init__(
        self, backend: MemcachedBackend, name: str, timeout: float, blocking_timeout: float | None
    ) -> None:
        super().__init__(name, timeout, blocking_timeout)
        self._backend = backend
        self._wire = wire_key(name)

    def locked(self) -> bool:
        """True when anyone holds the lock."""
        with _io():
            return self._backend.client.get(self._wire) is not None

    def take(self) -> bytes | None:
        """One try at the lock: the token it is held with, or None."""
        token = uuid.uuid4().hex.encode()
        expire = max(1, math.ceil(self.timeout))
        with _io():
            taken = self._backend.client.add(self._wire, token, expire=expire, noreply=False)
        return token if taken else None

    def release_token(self, token: bytes | None) -> None:
        """Release the lock held with ``token`` (None: not held)."""
        if token is None:
            raise self.not_held_error("releasing")
        with _io():
            released = self._backend._delete_if_wire(self._wire, token)
        if not released:
            raise self.expired_error()

"""The operations on a cache model: :class:`Models` (sync) and :class:`AsyncModels`.

Inside a context, writes wait for its commit in a :class:`Unit` (one per
cache and context): each key holds one :class:`Pending` state, which later
writes to the key fold into, and which reads of the key in the same context
see. On commit the unit is applied (or, with an outbox, each write was an
outbox row of the context's transaction); on rollback it is dropped.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import random
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from polydatum.cache._backends import When
from polydatum.cache._base import MISS
from polydatum.cache._errors import RecordExists, RecordMissing, UpdateConflict
from polydatum.cache.models._model import Schema, model_id, registered, schema_of

if TYPE_CHECKING:
    from polydatum.cache._backends import CacheBackend
    from polydatum.cache._cache import AsyncCache, Cache
    from polydatum.context import DataAccessContext

logger = logging.getLogger("polydatum.cache.models")

M = TypeVar("M")

#: Compare-and-set attempts of one partial update before :class:`UpdateConflict`.
MAX_TRIES = 50


def _backoff(attempt: int) -> float:
    """Seconds to wait after losing compare-and-set ``attempt`` times: none at first, then jittered.

    Without it, writers on a backend whose compare-and-set takes several
    round trips (memcached) can keep overtaking one another.
    """
    return 0.0 if attempt < 2 else random.uniform(0, min(0.02, 0.0005 * 2 ** min(attempt, 6)))


_NO_TOUCH: Any = object()


@dataclasses.dataclass
class Pending:
    """What a context did to one key, folded into one state."""

    schema: Schema
    state: Literal["set", "delete", "patch"]
    data: bytes | None = None  # "set": the record's bytes
    when: When = "always"
    ttl: int | None = None
    sets: dict[str, Any] = dataclasses.field(default_factory=dict)  # "patch"
    incr: dict[str, int] = dataclasses.field(default_factory=dict)  # "patch"
    touch: Any = _NO_TOUCH  # a new TTL in ms (or None) to give the key after the write


class Unit:
    """The cache-model writes of one context on one cache, keyed by full key."""

    def __init__(self) -> None:
        self.pending: dict[str, Pending] = {}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def topic_of(cache: Cache | AsyncCache) -> str:
    """The outbox topic of a cache's model writes."""
    return f"polydatum.cache.models:{cache.namespace}"


def cas_update(
    backend: CacheBackend, full: str, schema: Schema, sets: dict[str, Any], incr: dict[str, int]
) -> Any:
    """Apply a partial update straight to ``backend`` (read, change, compare-and-set, retry).

    Returns the new record, or None when there is none (or it is unreadable).

    Raises:
        UpdateConflict: other writers won every attempt.
    """
    for attempt in range(MAX_TRIES):
        if attempt:
            time.sleep(_backoff(attempt))
        raw = backend.get(full)
        if raw is None:
            return None
        record = schema.decode(raw, full)
        if record is None:
            return None
        new = schema.apply(record, sets, incr)
        if backend.compare_and_set(full, raw, schema.encode(new)):
            return new
    raise _conflict(schema, full)


def _conflict(schema: Schema, full: str) -> UpdateConflict:
    msg = (
        f"{schema.name}: the update of {full!r} lost its compare-and-set {MAX_TRIES} times in a row "
        f"to other writers; retry it later"
    )
    return UpdateConflict(msg)


def deliver(backend: CacheBackend, ops: list[dict[str, Any]]) -> None:
    """Apply the writes of an outbox row to ``backend`` (an unavailable one raises: the outbox retries)."""
    for op in ops:
        kind, full = op["op"], op.get("key", "")
        if kind == "set":
            done = backend.set(full, base64.b64decode(op["data"]), op["ttl"], op["when"])
            if not done:
                logger.warning(
                    "cache model write to %r skipped at delivery: when=%s failed", full, op["when"]
                )
        elif kind == "delete":
            backend.delete_many(op["keys"])
        elif kind == "patch":
            schema = registered(op["model"])
            if schema is None:
                msg = (
                    f"no cache model {op['model']!r} is declared in this process "
                    "(import its module in the relay)"
                )
                raise LookupError(msg)
            sets = schema.decode_changes(base64.b64decode(op["sets"]))
            cas_update(backend, full, schema, sets, op["incr"])
        elif kind == "touch":
            backend.touch(full, op["ttl"])


class _Base(Generic[M]):
    """What :class:`Models` and :class:`AsyncModels` share, without I/O."""

    _cache: Any

    def __init__(self, cache: Cache | AsyncCache, model: type[M], *, immediate: bool = False) -> None:
        self._schema = schema = schema_of(model).compile()
        self._cache = cache
        self.model = model
        self.immediate = immediate
        self._prefix = cache.key(f"{schema.namespace}:")
        self._ctx: DataAccessContext | None = cache._ctx
        # Writes wait for the context's commit unless asked not to (or outside any context).
        self._deferred = not immediate and self._ctx is not None
        self._outbox = cache.outbox
        # What every get needs, looked up once (a read is the hot path).
        self._key_text = schema.key_text
        self._fast_key = schema._fast_key
        self._decode = schema.decode
        self._refs = bool(schema.ref_fields)

    def __repr__(self) -> str:
        mode = "immediate" if not self._deferred else "transactional"
        return f"<{type(self).__name__} {self._schema.name} {self._prefix!r} {mode}>"

    def key(self, key: Any) -> str:
        """The full backend key of a record's key (TypeError for a bad key, before any I/O)."""
        return self._prefix + self._schema.key_text(key)

    def key_of(self, record: M) -> Any:
        """The key of ``record``: its key field, or a tuple of its key fields."""
        return self._schema.key_value(record)

    def _full_of(self, record: Any) -> str:
        self._schema.check_record(record)
        return self._prefix + self._schema.key_text(self._schema.key_value(record))

    def _by_ttl(self, records: Iterable[M]) -> dict[int | None, dict[str, bytes]]:
        """``records`` encoded and grouped by TTL (one ``set_many`` each): what ``insert_many`` stores."""
        by_ttl: dict[int | None, dict[str, bytes]] = {}
        for record in records:
            full, data = self._encoded(record)
            by_ttl.setdefault(self._schema.ttl_of(record), {})[full] = data
        return by_ttl

    def _encoded(self, record: Any) -> tuple[str, bytes]:
        """The full key and the bytes of ``record``, validated once (TypeError naming the field)."""
        data = self._schema.encode(record)
        return self._prefix + self._schema.key_text(self._schema.key_value(record)), data

    def _unit(self, create: bool) -> Unit | None:
        ctx = self._ctx
        if ctx is None:
            return None
        units = self._cache._model_units
        unit: Unit | None = units.get(ctx)
        if unit is None and create:
            unit = units[ctx] = Unit()
            if self._outbox is None:
                ctx.on_commit(self._flush, ctx)
            else:
                # Each write already is an outbox row; the unit only serves reads.
                ctx.on_commit(units.pop, ctx, None)
            ctx.on_rollback(units.pop, ctx, None)
        return unit

    def _pending(self, full: str) -> Pending | None:
        ctx = self._ctx
        if ctx is None:
            return None
        unit: Unit | None = self._cache._model_units.get(ctx)
        return None if unit is None else unit.pending.get(full)

    def _flush(self, ctx: DataAccessContext) -> Any:  # pragma: no cover - both subclasses define it
        raise NotImplementedError

    def _record(self, data: Any, full: str) -> M | None:
        if data is None or data is MISS:
            return None
        record = self._schema.decode(data, full)
        if record is not None and self._schema.ref_fields:
            self._bind_refs(record)
        return record  # type: ignore[no-any-return]

    def _bind_refs(self, record: Any) -> None:
        for name, kind in self._schema.ref_fields.items():
            ref = getattr(record, name)
            if ref is not None and ref._models is None:
                ref._models = self._cache.models(kind.target, immediate=self.immediate)

    def _fulls(self, keys: list[Any]) -> list[str]:
        prefix, key_text = self._prefix, self._schema.key_text
        return [prefix + key_text(k) for k in keys]

    def _results(self, keys: list[Any], fulls: list[str], found: Any) -> dict[Any, M]:
        """``{key: record}`` of what a get_many found, seen through the context's own writes."""
        if found is MISS:
            found = [None] * len(fulls)
        unit: Unit | None = self._cache._model_units.get(self._ctx) if self._ctx is not None else None
        pending = unit.pending if unit is not None else None
        decode, bind = self._schema.decode, bool(self._schema.ref_fields)
        result: dict[Any, M] = {}
        for key, full, data in zip(keys, fulls, found, strict=True):
            waiting = pending.get(full) if pending else None
            if waiting is not None:
                record = self._view(waiting, data, full)
            elif data is None:
                continue
            else:
                record = decode(data, full)
                if bind and record is not None:
                    self._bind_refs(record)
            if record is not None:
                result[key] = record
        return result

    def _check_preload(self, preload: Sequence[str]) -> None:
        if isinstance(preload, str):
            preload = (preload,)
        for name in preload:
            if name not in self._schema.ref_fields:
                known = ", ".join(self._schema.ref_fields) or "none"
                msg = f"{self._schema.name} has no Ref field {name!r} to preload; Ref fields: {known}"
                raise TypeError(msg)

    # -- folding a write into the context's pending state ------------------------

    def _write(self, full: str, pending: Pending, op: dict[str, Any]) -> None:
        unit = self._unit(create=True)
        assert unit is not None
        previous = unit.pending.get(full)
        if previous is not None and pending.touch is _NO_TOUCH and pending.state == "patch":
            pending.touch = previous.touch
        unit.pending[full] = pending
        if self._outbox is not None:
            assert self._ctx is not None
            self._outbox.add(self._ctx, topic_of(self._cache), {"ops": [op]})

    def _defer_set(self, full: str, data: bytes, ttl: int | None, when: When) -> None:
        self._write(
            full,
            Pending(self._schema, "set", data=data, when=when, ttl=ttl),
            {"op": "set", "key": full, "data": _b64(data), "ttl": ttl, "when": when},
        )

    def _defer_delete(self, fulls: list[str]) -> None:
        if not fulls:
            return
        for full in fulls:
            pending = Pending(self._schema, "delete")
            unit = self._unit(create=True)
            assert unit is not None
            unit.pending[full] = pending
        if self._outbox is not None:
            assert self._ctx is not None
            self._outbox.add(self._ctx, topic_of(self._cache), {"ops": [{"op": "delete", "keys": fulls}]})

    def _defer_update(self, full: str, new: Any, sets: dict[str, Any], incr: dict[str, int]) -> None:
        previous = self._pending(full)
        if previous is not None and previous.state == "set":
            # Created or saved in this context: the patch folds into the record itself.
            data = self._schema.encode(new)
            self._write(
                full,
                Pending(self._schema, "set", data=data, when=previous.when, ttl=previous.ttl),
                {"op": "set", "key": full, "data": _b64(data), "ttl": previous.ttl, "when": previous.when},
            )
            return
        merged_sets = dict(previous.sets) if previous is not None else {}
        merged_incr = dict(previous.incr) if previous is not None else {}
        for name in sets:
            merged_incr.pop(name, None)
        merged_sets.update(sets)
        for name, delta in incr.items():
            if name in merged_sets:
                merged_sets[name] += delta
            else:
                merged_incr[name] = merged_incr.get(name, 0) + delta
        self._write(
            full,
            Pending(self._schema, "patch", sets=merged_sets, incr=merged_incr),
            {
                "op": "patch",
                "key": full,
                "model": model_id(self._schema.cls),
                "sets": _b64(self._schema.encode_changes(sets)),
                "incr": incr,
            },
        )

    def _defer_touch(self, full: str, ttl: int | None) -> None:
        previous = self._pending(full)
        unit = self._unit(create=True)
        assert unit is not None
        if previous is None:
            previous = Pending(self._schema, "patch")
        previous.touch = ttl
        unit.pending[full] = previous
        if self._outbox is not None:
            assert self._ctx is not None
            self._outbox.add(
                self._ctx, topic_of(self._cache), {"ops": [{"op": "touch", "key": full, "ttl": ttl}]}
            )

    def _view(self, pending: Pending, base: Any, full: str) -> M | None:
        """What the context sees at a key it wrote (``base``: the stored bytes, for a patch)."""
        if pending.state == "delete":
            return None
        if pending.state == "set":
            return self._record(pending.data, full)
        record = self._record(base, full)
        if record is None:
            return None
        return self._schema.apply(record, pending.sets, pending.incr)  # type: ignore[no-any-return]


class Models(_Base[M]):
    """The records of one cache model in a :class:`~polydatum.cache.Cache`: ``ctx.cache.models(User)``.

    Reads see the writes the context made; writes wait for the context's
    commit (and are dropped on rollback) unless the cache is used outside a
    context or with ``immediate=True``. A key is a value of the key field, or
    a tuple of the key fields' values for a composite key; a wrong one raises
    TypeError before any I/O.

    When the backend is unavailable (``on_unavailable="warn"``), reads miss
    and writes are dropped with a warning, as for the cache itself.

    .. versionadded:: 2.0
    """

    _cache: Cache

    # -- reads ----------------------------------------------------------------

    def get(self, key: Any) -> M | None:
        """The record stored under ``key``, or None."""
        # self.key() and self._record() inlined: this is the hot path.
        full = self._prefix + (str(key) if type(key) is self._fast_key else self._key_text(key))
        cache = self._cache
        if self._ctx is not None and (pending := self._pending(full)) is not None:
            if pending.state != "patch":
                return self._view(pending, None, full)
            return self._view(pending, cache._call("get", cache.backend.get, full), full)
        data = cache._call("get", cache.backend.get, full)
        if data is None or data is MISS:
            return None
        record = self._decode(data, full)
        if self._refs and record is not None:
            self._bind_refs(record)
        return record  # type: ignore[no-any-return]

    def get_many(self, keys: Iterable[Any], *, preload: Sequence[str] = ()) -> dict[Any, M]:
        """``{key: record}`` for the keys present, read in one round trip.

        Args:
            keys: record keys.
            preload: names of :class:`Ref` fields whose targets to load too,
                in one more round trip each.
        """
        keys = list(keys)
        self._check_preload(preload)
        fulls = self._fulls(keys)
        cache = self._cache
        found = cache._call("get_many", cache.backend.get_many, fulls) if fulls else []
        result = self._results(keys, fulls, found)
        for name in (preload,) if isinstance(preload, str) else preload:
            self._preload(name, list(result.values()))
        return result

    def _preload(self, name: str, records: list[Any]) -> None:
        refs = [ref for record in records if (ref := getattr(record, name)) is not None and not ref.loaded]
        if not refs:
            return
        target: Any = self._cache.models(self._schema.ref_fields[name].target, immediate=self.immediate)
        loaded = target.get_many(list(dict.fromkeys(ref.key for ref in refs)))
        for ref in refs:
            ref._set(loaded.get(ref.key))

    def exists(self, key: Any) -> bool:
        """True when a record is stored under ``key``."""
        full = self.key(key)
        pending = self._pending(full)
        if pending is not None:
            return self.get(key) is not None
        cache = self._cache
        ms = cache._call("exists", cache.backend.pttl, full)
        return ms is not None and ms is not MISS

    # -- writes ----------------------------------------------------------------

    def save(self, record: M) -> None:
        """Store ``record``, replacing any record under its key (an upsert).

        Raises:
            TypeError: a field holds a value of the wrong type (the message
                names the model, the field and the value's type).
        """
        self._set(record, "always")

    def create(self, record: M) -> None:
        """Store ``record`` only if its key is free.

        Raises:
            RecordExists: a record is stored under the key (in a context, at
                the time of the call; a concurrent creator that commits
                first wins, and the loss is logged at the commit).
        """
        full = self._full_of(record)
        if self._deferred:
            pending = self._pending(full)
            if self.exists(self._schema.key_value(record)):
                raise _exists(self._schema, full)
            when: When = "always" if pending is not None else "absent"
            self._defer_set(full, self._schema.encode(record), self._schema.ttl_of(record), when)
            return
        if self._set(record, "absent") is False:
            raise _exists(self._schema, full)

    def replace(self, record: M) -> None:
        """Store ``record`` only if a record is stored under its key.

        Raises:
            RecordMissing: no record is stored under the key.
        """
        full = self._full_of(record)
        if self._deferred:
            pending = self._pending(full)
            if not self.exists(self._schema.key_value(record)):
                raise _missing(self._schema, full)
            when: When = pending.when if pending is not None and pending.state == "set" else "present"
            self._defer_set(full, self._schema.encode(record), self._schema.ttl_of(record), when)
            return
        if self._set(record, "present") is False:
            raise _missing(self._schema, full)

    def _set(self, record: M, when: When) -> bool | None:
        full, data = self._encoded(record)
        ttl = self._schema.ttl_of(record)
        if self._deferred:
            self._defer_set(full, data, ttl, when)
            return None
        cache = self._cache
        done = cache._call(when, cache.backend.set, full, data, ttl, when)
        return None if done is MISS else bool(done)

    def insert_many(self, records: Iterable[M]) -> None:
        """Store every record (an upsert each), in one round trip per distinct TTL."""
        for ttl, items in self._by_ttl(records).items():
            if self._deferred:
                for full, data in items.items():
                    self._defer_set(full, data, ttl, "always")
            else:
                cache = self._cache
                cache._call("set_many", cache.backend.set_many, items, ttl)

    def update(self, key: Any, **fields: Any) -> M | None:
        """Change some fields of the record under ``key``; return the updated record.

        Atomic: the record is read, changed and written back with a
        compare-and-set, retried while other writers change it in between.
        In a context the change waits for the commit, then is applied the
        same way to what is stored then. Returns None when the backend is
        unavailable.

        Raises:
            TypeError: an unknown field, a key field, or a value of the wrong type.
            RecordMissing: no record is stored under ``key``.
            UpdateConflict: other writers won every attempt.
        """
        full = self.key(key)
        self._schema.check_changes(fields)
        return self._patch(key, full, fields, {})  # type: ignore[no-any-return]

    def incr(self, key: Any, field: str, delta: int = 1) -> int | None:
        """Add ``delta`` to the int field ``field`` atomically; return its new value.

        In a context the new value is the one the context sees; the addition
        itself is applied at the commit to what is stored then. None when the
        backend is unavailable.

        Raises:
            TypeError: ``field`` is not an int field.
            RecordMissing: no record is stored under ``key``.
        """
        full = self.key(key)
        self._schema.check_counter(field, delta)
        record = self._patch(key, full, {}, {field: delta})
        return None if record is None else int(getattr(record, field))

    def decr(self, key: Any, field: str, delta: int = 1) -> int | None:
        """Subtract ``delta``; see :meth:`incr`."""
        self._schema.check_counter(field, delta)
        return self.incr(key, field, -delta)

    def _patch(self, key: Any, full: str, sets: dict[str, Any], incr: dict[str, int]) -> Any:
        if self._deferred:
            current = self.get(key)
            if current is None:
                raise _missing(self._schema, full)
            new = self._schema.apply(current, sets, incr)
            self._schema.check_record(new)
            self._defer_update(full, new, sets, incr)
            return new
        cache = self._cache
        new = cache._call("update", cas_update, cache.backend, full, self._schema, sets, incr)
        if new is MISS:
            return None
        if new is None:
            raise _missing(self._schema, full)
        return new

    def delete(self, key: Any) -> bool:
        """Delete the record under ``key``; True when there was one."""
        return self.delete_many([key]) == 1

    def delete_many(self, keys: Iterable[Any]) -> int:
        """Delete the records under ``keys``; return how many there were.

        Deletes missed while the backend is down are replayed once it answers
        (see :class:`~polydatum.cache.Cache`).
        """
        keys = list(keys)
        fulls = [self.key(k) for k in keys]
        if self._deferred:
            present = len(self.get_many(keys))
            self._defer_delete(fulls)
            return present
        return self._cache._delete(fulls)

    def touch(self, key: Any, ttl: float | Literal["model"] | None = "model") -> bool:
        """Restart the record's TTL: the model's (by default) or ``ttl`` seconds (None: never expire).

        Returns:
            True when there was a record to touch.
        """
        full = self.key(key)
        ttl_ms = self._touch_ttl(key, ttl)
        if ttl_ms is False:
            return False
        if self._deferred:
            if not self.exists(key):
                return False
            self._defer_touch(full, ttl_ms)
            return True
        cache = self._cache
        done = cache._call("touch", cache.backend.touch, full, ttl_ms)
        return done is True

    def _touch_ttl(self, key: Any, ttl: float | Literal["model"] | None) -> Any:
        from polydatum.cache._base import ttl_ms

        if ttl != "model":
            return ttl_ms(ttl)
        if self._schema._ttl_fn is None:
            return self._schema._ttl_fixed
        record = self.get(key)  # a callable TTL is computed from the record
        return False if record is None else self._schema.ttl_of(record)

    # -- the commit ---------------------------------------------------------------

    def _flush(self, ctx: DataAccessContext) -> None:
        unit: Unit | None = self._cache._model_units.pop(ctx, None)
        if unit is None:
            return
        cache = self._cache
        deletes = []
        for full, p in unit.pending.items():
            if p.state == "delete":
                deletes.append(full)
            elif p.state == "set":
                done = cache._call(p.when, cache.backend.set, full, p.data, p.ttl, p.when)
                if done is False:
                    _lost(p, full)
            elif p.sets or p.incr:
                new = cache._call("update", cas_update, cache.backend, full, p.schema, p.sets, p.incr)
                if new is None:
                    logger.warning(
                        "cache model %s: %r was gone at commit; its update is dropped", p.schema.name, full
                    )
            if p.touch is not _NO_TOUCH and p.state != "delete":
                cache._call("touch", cache.backend.touch, full, p.touch)
        cache._delete(deletes)


class AsyncModels(_Base[M]):
    """:class:`Models` on an :class:`~polydatum.cache.AsyncCache`: every operation is awaited.

    .. versionadded:: 2.0
    """

    _cache: AsyncCache

    async def get(self, key: Any) -> M | None:
        """See :meth:`Models.get`."""
        full = self._prefix + (str(key) if type(key) is self._fast_key else self._key_text(key))
        cache = self._cache
        if self._ctx is not None and (pending := self._pending(full)) is not None:
            if pending.state != "patch":
                return self._view(pending, None, full)
            return self._view(pending, await cache._call("get", cache.backend.get, full), full)
        data = await cache._call("get", cache.backend.get, full)
        if data is None or data is MISS:
            return None
        record = self._decode(data, full)
        if self._refs and record is not None:
            self._bind_refs(record)
        return record  # type: ignore[no-any-return]

    async def get_many(self, keys: Iterable[Any], *, preload: Sequence[str] = ()) -> dict[Any, M]:
        """See :meth:`Models.get_many`."""
        keys = list(keys)
        self._check_preload(preload)
        fulls = self._fulls(keys)
        cache = self._cache
        found = await cache._call("get_many", cache.backend.get_many, fulls) if fulls else []
        result = self._results(keys, fulls, found)
        for name in (preload,) if isinstance(preload, str) else preload:
            await self._preload(name, list(result.values()))
        return result

    async def _preload(self, name: str, records: list[Any]) -> None:
        refs = [ref for record in records if (ref := getattr(record, name)) is not None and not ref.loaded]
        if not refs:
            return
        target: Any = self._cache.models(self._schema.ref_fields[name].target, immediate=self.immediate)
        loaded = await target.get_many(list(dict.fromkeys(ref.key for ref in refs)))
        for ref in refs:
            ref._set(loaded.get(ref.key))

    async def exists(self, key: Any) -> bool:
        """See :meth:`Models.exists`."""
        full = self.key(key)
        if self._pending(full) is not None:
            return await self.get(key) is not None
        cache = self._cache
        ms = await cache._call("exists", cache.backend.pttl, full)
        return ms is not None and ms is not MISS

    async def save(self, record: M) -> None:
        """See :meth:`Models.save`."""
        await self._set(record, "always")

    async def create(self, record: M) -> None:
        """See :meth:`Models.create`."""
        full = self._full_of(record)
        if self._deferred:
            pending = self._pending(full)
            if await self.exists(self._schema.key_value(record)):
                raise _exists(self._schema, full)
            when: When = "always" if pending is not None else "absent"
            self._defer_set(full, self._schema.encode(record), self._schema.ttl_of(record), when)
            return
        if await self._set(record, "absent") is False:
            raise _exists(self._schema, full)

    async def replace(self, record: M) -> None:
        """See :meth:`Models.replace`."""
        full = self._full_of(record)
        if self._deferred:
            pending = self._pending(full)
            if not await self.exists(self._schema.key_value(record)):
                raise _missing(self._schema, full)
            when: When = pending.when if pending is not None and pending.state == "set" else "present"
            self._defer_set(full, self._schema.encode(record), self._schema.ttl_of(record), when)
            return
        if await self._set(record, "present") is False:
            raise _missing(self._schema, full)

    async def _set(self, record: M, when: When) -> bool | None:
        full, data = self._encoded(record)
        ttl = self._schema.ttl_of(record)
        if self._deferred:
            self._defer_set(full, data, ttl, when)
            return None
        cache = self._cache
        done = await cache._call(when, cache.backend.set, full, data, ttl, when)
        return None if done is MISS else bool(done)

    async def insert_many(self, records: Iterable[M]) -> None:
        """See :meth:`Models.insert_many`."""
        for ttl, items in self._by_ttl(records).items():
            if self._deferred:
                for full, data in items.items():
                    self._defer_set(full, data, ttl, "always")
            else:
                cache = self._cache
                await cache._call("set_many", cache.backend.set_many, items, ttl)

    async def update(self, key: Any, **fields: Any) -> M | None:
        """See :meth:`Models.update`."""
        full = self.key(key)
        self._schema.check_changes(fields)
        return await self._patch(key, full, fields, {})  # type: ignore[no-any-return]

    async def incr(self, key: Any, field: str, delta: int = 1) -> int | None:
        """See :meth:`Models.incr`."""
        full = self.key(key)
        self._schema.check_counter(field, delta)
        record = await self._patch(key, full, {}, {field: delta})
        return None if record is None else int(getattr(record, field))

    async def decr(self, key: Any, field: str, delta: int = 1) -> int | None:
        """See :meth:`Models.decr`."""
        self._schema.check_counter(field, delta)
        return await self.incr(key, field, -delta)

    async def _patch(self, key: Any, full: str, sets: dict[str, Any], incr: dict[str, int]) -> Any:
        if self._deferred:
            current = await self.get(key)
            if current is None:
                raise _missing(self._schema, full)
            new = self._schema.apply(current, sets, incr)
            self._schema.check_record(new)
            self._defer_update(full, new, sets, incr)
            return new
        new = await self._cache._call("update", self._cas, full, self._schema, sets, incr)
        if new is MISS:
            return None
        if new is None:
            raise _missing(self._schema, full)
        return new

    async def _cas(self, full: str, schema: Schema, sets: dict[str, Any], incr: dict[str, int]) -> Any:
        backend = self._cache.backend
        for attempt in range(MAX_TRIES):
            if attempt:
                await asyncio.sleep(_backoff(attempt))
            raw = await backend.get(full)
            if raw is None:
                return None
            record = schema.decode(raw, full)
            if record is None:
                return None
            new = schema.apply(record, sets, incr)
            if await backend.compare_and_set(full, raw, schema.encode(new)):
                return new
        raise _conflict(schema, full)

    async def delete(self, key: Any) -> bool:
        """See :meth:`Models.delete`."""
        return await self.delete_many([key]) == 1

    async def delete_many(self, keys: Iterable[Any]) -> int:
        """See :meth:`Models.delete_many`."""
        keys = list(keys)
        fulls = [self.key(k) for k in keys]
        if self._deferred:
            present = len(await self.get_many(keys))
            self._defer_delete(fulls)
            return present
        return await self._cache._delete(fulls)

    async def touch(self, key: Any, ttl: float | Literal["model"] | None = "model") -> bool:
        """See :meth:`Models.touch`."""
        full = self.key(key)
        ttl_ms = await self._touch_ttl(key, ttl)
        if ttl_ms is False:
            return False
        if self._deferred:
            if not await self.exists(key):
                return False
            self._defer_touch(full, ttl_ms)
            return True
        cache = self._cache
        done = await cache._call("touch", cache.backend.touch, full, ttl_ms)
        return done is True

    async def _touch_ttl(self, key: Any, ttl: float | Literal["model"] | None) -> Any:
        from polydatum.cache._base import ttl_ms

        if ttl != "model":
            return ttl_ms(ttl)
        if self._schema._ttl_fn is None:
            return self._schema._ttl_fixed
        record = await self.get(key)
        return False if record is None else self._schema.ttl_of(record)

    async def _flush(self, ctx: DataAccessContext) -> None:
        unit: Unit | None = self._cache._model_units.pop(ctx, None)
        if unit is None:
            return
        cache = self._cache
        deletes = []
        for full, p in unit.pending.items():
            if p.state == "delete":
                deletes.append(full)
            elif p.state == "set":
                done = await cache._call(p.when, cache.backend.set, full, p.data, p.ttl, p.when)
                if done is False:
                    _lost(p, full)
            elif p.sets or p.incr:
                new = await cache._call("update", self._cas, full, p.schema, p.sets, p.incr)
                if new is None:
                    logger.warning(
                        "cache model %s: %r was gone at commit; its update is dropped", p.schema.name, full
                    )
            if p.touch is not _NO_TOUCH and p.state != "delete":
                await cache._call("touch", cache.backend.touch, full, p.touch)
        await cache._delete(deletes)


def _exists(schema: Schema, full: str) -> RecordExists:
    msg = f"{schema.name}: a record is already stored at {full!r}; use save() to overwrite it"
    return RecordExists(msg)


def _missing(schema: Schema, full: str) -> RecordMissing:
    msg = f"{schema.name}: no record is stored at {full!r}; use save() or create() to store one"
    return RecordMissing(msg)


def _lost(p: Pending, full: str) -> None:
    what = "create (the key was taken)" if p.when == "absent" else "replace (the key was gone)"
    logger.warning(
        "cache model %s: the %s of %r at commit lost to another writer; it is dropped",
        p.schema.name,
        what,
        full,
        extra={"polydatum_cache_model": p.schema.name},
    )

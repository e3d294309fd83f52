"""What Cache and AsyncCache share that does no I/O: options, keys, encoding, binding."""

from __future__ import annotations

import logging
import math
import numbers
import uuid
import weakref
from collections.abc import Sequence
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from polydatum.cache._deferral import Deferral
from polydatum.cache._health import Health
from polydatum.cache._keys import claim_key
from polydatum.cache._serializers import Serializer, get_serializer

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.types import ResourceRegistry

logger = logging.getLogger("polydatum.cache")

TTL = float | timedelta | None
C = TypeVar("C", bound="CacheBase")

#: What an operation returns when the backend could not serve it.
MISS: Any = object()


#: The longest ttl any backend takes (100 years); longer would overflow some of them.
MAX_TTL = 100 * 365 * 24 * 3600


def seconds_of(value: Any, what: str, *, zero: bool = False) -> float:
    """``value`` (seconds or a timedelta) as a float, checked the same way for every option.

    Raises:
        TypeError: not a number of seconds (a str, a bool...).
        ValueError: not finite, not positive (or negative, with ``zero``), or over :data:`MAX_TTL`.
    """
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (numbers.Real, Decimal)):
        msg = f"{what} must be a number of seconds or a timedelta, got {value!r}"
        raise TypeError(msg)
    try:
        seconds = float(seconds)  # a Decimal, a Fraction, a numpy number
    except OverflowError:  # an int beyond any float
        seconds = math.inf
    except ValueError:  # Decimal("sNaN")
        seconds = math.nan
    low_ok = seconds >= 0 if zero else seconds > 0  # both refuse NaN
    if not low_ok or seconds == math.inf:
        kind = "zero or more" if zero else "positive"
        msg = f"{what} must be {kind}, finite seconds, got {value!r}"
        raise ValueError(msg)
    if seconds > MAX_TTL:
        msg = f"{what} is over {MAX_TTL} seconds (100 years), got {value!r}; use None for no expiry"
        raise ValueError(msg)
    return seconds  # a float already


def lock_times(timeout: Any, blocking_timeout: Any) -> tuple[float, float | None]:
    """A lock's ``timeout`` and ``blocking_timeout``, checked alike on every backend.

    A lock always expires: ``timeout`` is finite seconds, at least a
    millisecond (Redis counts in milliseconds; less would be 0, refused by the
    server). ``blocking_timeout`` is None (wait forever) or zero or more
    finite seconds (0: try once).

    Raises:
        TypeError: either is not a number of seconds (or a timedelta).
        ValueError: either is out of range (NaN and infinity included).
    """
    seconds = lock_seconds(timeout, "lock timeout")
    if blocking_timeout is None:
        return seconds, None
    try:
        wait = seconds_of(blocking_timeout, "blocking_timeout", zero=True)
    except ValueError:
        msg = (
            f"blocking_timeout must be zero or more, finite seconds of at most {MAX_TTL} (100 years), "
            f"got {blocking_timeout!r}; None waits as long as it takes"
        )
        raise ValueError(msg) from None
    # Plain numbers go on as given (error messages show what the caller wrote).
    return seconds, blocking_timeout if type(blocking_timeout) in (int, float) else wait


def lock_seconds(value: Any, what: str) -> float:
    """Seconds a lock is held for (its ``timeout``, or what ``extend()`` adds): finite, at least 1 ms.

    Raises:
        TypeError: not a number of seconds (or a timedelta).
        ValueError: under a millisecond, over 100 years, or not finite.
    """
    try:
        seconds = seconds_of(value, what)
    except ValueError:
        msg = (
            f"{what} must be finite seconds from 0.001 (a millisecond) to {MAX_TTL} (100 years), "
            f"got {value!r}; locks always expire"
        )
        raise ValueError(msg) from None
    if seconds < 0.001:
        msg = f"{what} must be at least 0.001 seconds (a millisecond), got {value!r}"
        raise ValueError(msg)
    return value if type(value) in (int, float) else seconds


def ttl_ms(ttl: TTL) -> int | None:
    """``ttl`` in whole milliseconds, rounded up (None: no expiry).

    Raises:
        TypeError: ``ttl`` is not a number of seconds or a timedelta.
        ValueError: ``ttl`` is not positive, not finite or over 100 years.
    """
    if ttl is None:
        return None
    if type(ttl) is int and 0 < ttl <= MAX_TTL:  # the common case, checked in one step
        return ttl * 1000
    return max(1, math.ceil(seconds_of(ttl, "ttl") * 1000))


class CacheBase:
    """Keys, encoding and failure handling shared by :class:`Cache` and :class:`AsyncCache`.

    The failure handling is a :class:`~polydatum.cache._health.Health` (the
    subclass makes it, for its kind of backend) and the waiting invalidations
    a :class:`~polydatum.cache._deferral.Deferral`; both are shared with the
    cache's per-context copies.
    """

    _health: Health
    _backend_obj: Any

    def __init__(
        self,
        *,
        namespace: str,
        version: int | str,
        serializer: str | Serializer,
        on_unavailable: Literal["warn", "raise"],
        retry_interval: float,
        max_undelivered: int = 10_000,
    ) -> None:
        if not namespace or ":" in namespace[:1] + namespace[-1:]:
            msg = f"namespace must be non-empty and not start or end with ':', got {namespace!r}"
            raise ValueError(msg)
        if "{" in f"{namespace}{version}" or "}" in f"{namespace}{version}":
            msg = (
                f"namespace and version must not hold '{{' or '}}' (Redis Cluster reads them as a "
                f"hash tag), got namespace={namespace!r}, version={version!r}; put hash tags in keys"
            )
            raise ValueError(msg)
        if on_unavailable not in ("warn", "raise"):
            msg = f'on_unavailable must be "warn" or "raise", got {on_unavailable!r}'
            raise ValueError(msg)
        self.namespace = namespace
        self.version = version
        self.serializer = get_serializer(serializer) if isinstance(serializer, str) else serializer
        if max_undelivered < 0:
            msg = f"max_undelivered must be 0 or more keys, got {max_undelivered!r}"
            raise ValueError(msg)
        self.on_unavailable = on_unavailable
        self.retry_interval = retry_interval
        self.max_undelivered = max_undelivered
        # Key layout, for namespace "ns" and version 1:
        #   ns:1:<key>        entries (what key() returns)
        #   ns:1#claim:<key>  cached() claims: outside the entries' key space, so
        #                     no key (no argument of a cached() method) names one,
        #                     yet under "ns:" so that clear() drops them too. In the
        #                     entry's cluster slot: a key with a hash tag keeps it,
        #                     one without becomes ns:1#claim:{ns:1:<key>} (_keys.py)
        #   :lock:ns:<name>   locks: no namespace starts with ":", so no clear() of
        #                     any namespace reaches a lock that is still held
        self._prefix = f"{namespace}:{version}:"
        self._claims = f"{namespace}:{version}#claim:"
        self._locks = f":lock:{namespace}:"
        self._tag = self.serializer.tag
        self._dumps = self.serializer.dumps
        self._loads = self.serializer.loads
        self._deferral = Deferral(namespace, self._prefix, self._claims)
        self._ctx: DataAccessContext | None = None
        # Cache-model writes waiting for their context's commit (see models/_repo.py), per context.
        self._model_units: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} namespace={self.namespace!r} version={self.version!r} "
            f"serializer={self.serializer.name!r} backend={type(self._backend_obj).__name__}>"
        )

    @property
    def outbox(self) -> Any:
        """The :class:`~polydatum.outbox.Outbox` invalidations go through, or None."""
        return self._deferral.outbox

    def key(self, key: str) -> str:
        """The full backend key for ``key``: ``"<namespace>:<version>:<key>"``."""
        return self._prefix + key

    def _claim_key(self, key: str) -> str:
        return claim_key(self._claims, self._prefix, key)

    def _encode(self, value: Any) -> bytes:
        if type(value) is int:
            return str(value).encode()
        return self._tag + self._dumps(value)

    def _decode(self, data: bytes, key: str) -> Any:
        if data[:1] == self._tag:
            try:
                return self._loads(data[1:])
            except Exception as exc:
                why = f"it does not decode ({type(exc).__name__}: {exc})"
        elif data[:1].isdigit() or data[:1] == b"-":
            try:
                return int(data)
            except ValueError:
                why = "it is not an integer"
        else:
            why = f"it was not written by the {self.serializer.name!r} serializer"
        logger.warning(
            "cache %s: ignoring the value at %r: %s; treating it as a miss",
            self.namespace,
            self._prefix + key,
            why,
            extra={"polydatum_cache": self.namespace},
        )
        return MISS

    def _new_token(self) -> bytes:
        return self._encode(uuid.uuid4().hex)

    # -- degraded mode (see _health.py) ---------------------------------------------

    def is_down(self) -> bool:
        """True while the backend is being left alone after a failure."""
        return self._health.is_down()

    def _undelivered(self) -> tuple[list[str], list[str]]:
        """The deletes (full keys) and clears (prefixes) held for the backend's return."""
        return self._health.undelivered()

    def _orphaned(self, claim: str) -> None:
        """A claim we could neither store under nor release: delete it once the backend answers.

        Left alone it would make every caller of its key wait ``wait`` seconds,
        then compute without storing, until ``lock_timeout`` ran out (after a
        failover the promoted replica has it). Deleting a claim is always safe:
        its holder then only fails to store, as after an invalidation.
        """
        self._health.hold([claim])

    # -- commit deferral (see _deferral.py) -------------------------------------------

    def is_pending(self, ctx: DataAccessContext | None, key: str) -> bool:
        """True when ``key`` was invalidated in ``ctx`` and waits for its commit."""
        return self._deferral.is_pending(ctx, key)

    def _invalidate(self, keys: Sequence[str], ctx: DataAccessContext | None, flush: Any) -> None:
        self._deferral.invalidate(keys, ctx if ctx is not None else self._ctx, flush)

    # -- cache models (see models/_repo.py) ------------------------------------------

    def _deliver_models_to(self, backend: Any) -> None:
        """With an outbox: apply the cache-model writes its rows carry to ``backend``."""
        outbox = self._deferral.outbox
        if outbox is None:
            return
        from polydatum.cache.models._repo import deliver, topic_of

        def deliver_model_writes(effect: Any) -> None:
            deliver(backend, effect.payload["ops"])

        outbox.add_handler_once(topic_of(self), deliver_model_writes)  # type: ignore[arg-type]

    # -- resources ---------------------------------------------------------------

    def _bind(self: C, ctx: DataAccessContext) -> C:
        """A copy of this cache for ``ctx`` (what ``ctx.<name>`` returns); state is shared."""
        # Cheaper than copy.copy, which matters once per context.
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)
        bound._ctx = ctx
        return bound

    def _resource(self, dm: ResourceRegistry, name: str) -> None:
        def cache_resource(ctx: DataAccessContext) -> Any:
            yield self._bind(ctx)

        dm.register_resources(**{name: cache_resource})

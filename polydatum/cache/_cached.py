"""``cached``: cache a service method's result, as a decorator or as DAL method middleware."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
import string
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from polydatum.cache._base import MISS, TTL, CacheBase, seconds_of
from polydatum.cache._cache import AsyncCache, Cache
from polydatum.cache._errors import CacheError, ItemTooLarge, SerializationError
from polydatum.cache._keys import hash_tag, slot_safe

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.middleware import DalCommandRequest

logger = logging.getLogger("polydatum.cache")

KeySpec = str | Callable[..., str] | None
_MAX_KEY = 200
# A str argument is escaped before it fills a key template, so that it cannot
# write the separator (":" by convention), the mark of a hashed key ("#") or a
# Redis Cluster hash tag ("{...}", which only the template may set): with
# "user:{name}", name="ada:friends" must not reach "user:{name}:friends".
_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "#": "%23", "{": "%7B", "}": "%7D"})
_SPECIAL = frozenset("%:#{}")


def escape_key_text(text: str) -> str:
    """``text`` with the separator and the key marks percent-escaped (unchanged when it has none)."""
    return text if _SPECIAL.isdisjoint(text) else text.translate(_ESCAPES)


def _escaped(named: dict[str, Any]) -> dict[str, Any]:
    for value in named.values():
        if isinstance(value, str) and not _SPECIAL.isdisjoint(value):
            return {k: v.translate(_ESCAPES) if isinstance(v, str) else v for k, v in named.items()}
    return named  # the common case: nothing to escape, no copy


# Formatted as they are: what they write cannot hold a separator or a mark.
_PLAIN = (str, int, float, type(None))


class _EscapingFormatter(string.Formatter):
    """``str.format`` that escapes what any other argument writes (a datetime, an object's __format__)."""

    def format_field(self, value: Any, format_spec: str) -> str:
        text: str = format(value, format_spec)
        return text if isinstance(value, (int, float)) else escape_key_text(text)


_ESCAPING = _EscapingFormatter()


def _hashed(text: str, head: str = "") -> str:
    # Starts with "#" (after head), which no escaped argument can write, so no
    # short key is ever one of these; the same text always hashes to the same
    # key, as it would be. A hash tag is kept, so the key stays in its slot.
    digest = head + "#" + hashlib.sha256(text.encode()).hexdigest()
    tag = hash_tag(text)
    return digest if tag is None else f"{digest}{{{tag}}}"


def _fit(text: str, head: str = "") -> str:
    """``text`` as a key: hashed when too long, or when no claim could share its slot."""
    if len(text) <= _MAX_KEY and slot_safe(text):
        return text
    return _hashed(text, head)


def cached(
    ttl: TTL,
    *,
    key: KeySpec = None,
    using: str | Cache | AsyncCache = "cache",
    stale: float = 0.0,
    wait: float = 2.0,
    lock_timeout: float = 10.0,
) -> CachePolicy:
    """Cache what a service method returns, for ``ttl`` seconds.

    As a decorator::

        class Users(Service):
            @cached(ttl=60, key="user:{user_id}")
            def get(self, user_id): ...

    or, for services you do not want to touch, as DAL method middleware::

        dm.register_method_middleware(cached(ttl=60, key="user:{user_id}").middleware("users.get"))

    The method's arguments are bound to its signature, so ``key`` is a
    :meth:`str.format` template over their names (``"{0}"`` also works for
    the first one), or a callable taking the same arguments. Without ``key``
    the method's qualified name and the ``repr`` of its arguments are used.
    In a template, ``%``, ``:``, ``#``, ``{`` and ``}`` in a str argument
    are percent-escaped, so no argument can write a key of another shape or
    pick its Redis Cluster slot; only the template sets a hash tag
    (``key="{{user:{user_id}}}:posts"`` keeps a user's keys in one slot). A
    key longer than 200 characters, or with a ``}`` outside a hash tag, is
    replaced by ``"#"``, its SHA-256 and its hash tag (``"{...}"``) if any.
    ``None`` results are cached too; exceptions never are.

    Invalidate with ``self.get.invalidate(user_id)`` inside a service (or
    ``ctx.cache.invalidate("user:1")``): the key is deleted once the context
    commits, and until then that context computes the method itself.

    Stampede protection: on a miss one caller claims the key and computes
    while the others poll for its result for up to ``wait`` seconds (then
    compute themselves, without storing). With ``stale`` > 0 an entry is kept
    ``stale`` seconds past ``ttl``; in that window one caller recomputes while
    the others get the previous value at once.

    A result is stored only while its caller's claim is intact, and an
    invalidation deletes the claim with the entry: a caller that read the
    database before a commit cannot store its stale result after that
    commit's invalidation. A computation longer than ``lock_timeout`` loses
    its claim and is not stored.

    Args:
        ttl: seconds a result stays fresh.
        key: the cache key, as a template or a callable (see above).
        using: the cache resource name in the context, or a cache object.
        stale: seconds an expired result may still be served during a refresh.
        wait: seconds a caller waits for another one computing the same key.
        lock_timeout: seconds after which a computing caller's claim lapses.

    .. versionadded:: 2.0
    """
    return CachePolicy(ttl, key=key, using=using, stale=stale, wait=wait, lock_timeout=lock_timeout)


class CachePolicy:
    """What :func:`cached` returns: apply it to a function, or make middleware of it.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        ttl: TTL,
        *,
        key: KeySpec,
        using: str | Cache | AsyncCache,
        stale: float,
        wait: float,
        lock_timeout: float,
    ) -> None:
        if ttl is None:
            msg = "cached(ttl=...) must be positive seconds, got None"
            raise ValueError(msg)
        seconds = seconds_of(ttl, "cached(ttl=...)")
        stale = seconds_of(stale, "cached(stale=...)", zero=True)
        wait = seconds_of(wait, "cached(wait=...)", zero=True)
        lock_timeout = seconds_of(lock_timeout, "cached(lock_timeout=...)")
        if not (key is None or isinstance(key, str) or callable(key)):
            msg = f"cached(key=...) must be a str template or a callable, got {key!r}"
            raise TypeError(msg)
        self.ttl = float(seconds)
        self.key = key
        self.using = using
        self.stale = stale
        self.wait = wait
        self.lock_timeout = lock_timeout

    def __call__(self, func: Callable[..., Any]) -> CachedFunction:
        """Decorate ``func`` (a service method or a plain function)."""
        return CachedFunction(self, func)

    def middleware(self, *paths: str) -> CacheMiddleware:
        """DAL method middleware caching the DAL methods at ``paths`` (``"users.get"``)."""
        if not paths:
            msg = 'middleware() needs at least one DAL path, e.g. cached(ttl=60).middleware("users.get")'
            raise ValueError(msg)
        return CacheMiddleware(self, paths)

    # -- the shared algorithm -----------------------------------------------

    def find_cache(self, ctx: DataAccessContext | None) -> Cache | AsyncCache:
        using = self.using
        if not isinstance(using, str):
            return using
        if ctx is None:
            msg = (
                f"cached(using={using!r}) looks the cache up in the active context, but there is "
                "none; call the method through the DAL inside `with dm.context():`, or pass "
                "using=<a Cache>"
            )
            raise CacheError(msg)
        cache = getattr(ctx, using)
        if not isinstance(cache, CacheBase):
            msg = (
                f"ctx.{using} is {cache!r}, not a Cache; install one with "
                f"Cache(...).install(dm, name={using!r})"
            )
            raise CacheError(msg)
        return cache  # type: ignore[return-value]

    def _entry(self, value: Any) -> list[Any]:
        return [time.time() + self.ttl, value]

    def _unstorable(self, exc: SerializationError, where: str) -> SerializationError:
        return SerializationError(f"the result of {where} cannot be cached: {exc}")

    def run(self, cache: Cache, ctx: Any, key: str, compute: Callable[[], Any], where: str) -> Any:
        """Return the cached value of ``key``, or compute, store and return it.

        Only a caller holding the key's claim stores, and only while the claim
        is intact: an invalidation deletes the claim, so a caller that read the
        database before a commit cannot put its stale result back after it.
        """
        if cache.is_pending(ctx, key):
            return compute()  # invalidated in this context: read our own writes
        entry = _unpack(cache.get(key, MISS))
        if entry is not None and entry[0] > time.time():
            return entry[1]
        token = cache._claim(key, self.lock_timeout)
        if token is None:
            if entry is not None:
                return entry[1]  # another caller refreshes; serve the previous value
            if not cache.is_down():
                deadline = time.monotonic() + self.wait
                pause = 0.002
                while time.monotonic() < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
                    entry = _unpack(cache.get(key, MISS))
                    if entry is not None:
                        return entry[1]
                    if not cache._is_claimed(key):
                        break  # the other caller failed, gave up or was invalidated
            token = cache._claim(key, self.lock_timeout)
            if token is None:
                return compute()  # still claimed (or cache down): compute, never store unguarded
        # Another caller may have stored and released between our read and our
        # claim (its store deletes its claim in the same step): read once more.
        fresh = _unpack(cache.get(key, MISS))
        if fresh is not None and fresh[0] > time.time():
            cache._release_claim(key, token)
            return fresh[1]
        try:
            value = compute()
        except BaseException:
            cache._release_claim(key, token)
            raise
        try:
            cache._store_claimed(key, self._entry(value), self.ttl + self.stale, token)
        except SerializationError as exc:
            cache._release_claim(key, token)
            raise self._unstorable(exc, where) from None
        except ItemTooLarge as exc:
            cache._release_claim(key, token)
            _too_large(where, exc)  # the result is good; only this backend cannot hold it
        except BaseException:
            cache._release_claim(key, token)
            raise
        return value

    async def arun(
        self, cache: Cache | AsyncCache, ctx: Any, key: str, compute: Callable[[], Any], where: str
    ) -> Any:
        """:meth:`run` for async methods; ``compute`` returns an awaitable."""
        if isinstance(cache, Cache):
            sync_cache = cache

            async def call(name: str, *args: Any) -> Any:
                return getattr(sync_cache, name)(*args)
        else:
            async_cache = cache

            async def call(name: str, *args: Any) -> Any:
                return await getattr(async_cache, name)(*args)

        if cache.is_pending(ctx, key):
            return await compute()
        entry = _unpack(await call("get", key, MISS))
        if entry is not None and entry[0] > time.time():
            return entry[1]
        token = await call("_claim", key, self.lock_timeout)
        if token is None:
            if entry is not None:
                return entry[1]
            if not cache.is_down():
                deadline = time.monotonic() + self.wait
                pause = 0.002
                while time.monotonic() < deadline:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.05)
                    entry = _unpack(await call("get", key, MISS))
                    if entry is not None:
                        return entry[1]
                    if not await call("_is_claimed", key):
                        break
            token = await call("_claim", key, self.lock_timeout)
            if token is None:
                return await compute()
        fresh = _unpack(await call("get", key, MISS))  # see run()
        if fresh is not None and fresh[0] > time.time():
            await call("_release_claim", key, token)
            return fresh[1]
        try:
            value = await compute()
        except BaseException:
            await call("_release_claim", key, token)
            raise
        try:
            await call("_store_claimed", key, self._entry(value), self.ttl + self.stale, token)
        except SerializationError as exc:
            await call("_release_claim", key, token)
            raise self._unstorable(exc, where) from None
        except ItemTooLarge as exc:
            await call("_release_claim", key, token)
            _too_large(where, exc)
        except BaseException:
            await call("_release_claim", key, token)
            raise
        return value


def _too_large(where: str, exc: ItemTooLarge) -> None:
    """A result over the backend's item limit (memcached's ``-I``): served, not cached, logged."""
    logger.warning("the result of %s is not cached: %s", where, exc)


def _unpack(entry: Any) -> list[Any] | None:
    """The ``[fresh_until, value]`` pair, or None for a miss or a foreign value."""
    if type(entry) is list and len(entry) == 2 and isinstance(entry[0], (int, float)):
        return entry
    return None


class _KeyMaker:
    """Turns call arguments into a cache key for one function."""

    def __init__(self, policy: CachePolicy, func: Callable[..., Any], drop_first: bool) -> None:
        self.spec = policy.key
        self.prefix = f"{func.__module__}.{func.__qualname__}"
        self.signature = inspect.signature(func)
        self.drop_first = drop_first
        params = list(self.signature.parameters.values())
        self.first = params[0].name if drop_first and params else None
        rest = params[1:] if drop_first else params
        # Plain parameters only: then positional arguments, one for each, bind
        # to their names directly (Signature.bind costs several microseconds).
        plain = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in rest)
        self.positional = tuple(p.name for p in rest) if plain else None

    def __call__(self, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
        spec = self.spec
        if callable(spec):
            made: str = spec(*args, **kwargs)
            return _fit(made)
        names = self.positional
        if names is not None and not kwargs and len(args) == len(names):
            named = dict(zip(names, args, strict=True))
        else:
            named = self._bind(args, kwargs)
        if spec is None:
            return _fit(f"{self.prefix}:{tuple(named.values())!r}", f"{self.prefix}:")
        safe = _escaped(named)
        try:
            if all(isinstance(v, _PLAIN) for v in safe.values()):
                text = spec.format(*safe.values(), **safe)
            else:  # an object, a datetime...: its text is escaped too (the slower path)
                text = _ESCAPING.vformat(spec, tuple(safe.values()), safe)
        except (KeyError, IndexError) as exc:
            msg = (
                f"cached(key={spec!r}) on {self.prefix} names {exc}, which is not one of its "
                f"arguments: {', '.join(named) or 'none'}"
            )
            raise CacheError(msg) from None
        return _fit(text)

    def _bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        full = (None, *args) if self.drop_first else args
        try:
            bound = self.signature.bind(*full, **kwargs)
        except TypeError as exc:
            msg = f"{self.prefix}() called with arguments that do not fit its signature: {exc}"
            raise TypeError(msg) from None
        bound.apply_defaults()
        named = dict(bound.arguments)
        if self.first is not None:
            named.pop(self.first, None)
        return named


class CachedFunction:
    """A function wrapped by :func:`cached`; on a class it binds like a method.

    .. versionadded:: 2.0
    """

    def __init__(self, policy: CachePolicy, func: Callable[..., Any]) -> None:
        self.policy = policy
        self.func = func
        self.is_async = inspect.iscoroutinefunction(func)
        self._method_keys = _KeyMaker(policy, func, drop_first=True)
        self._function_keys = _KeyMaker(policy, func, drop_first=False)
        functools.update_wrapper(self, func)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        bound_cls = _AsyncBoundCached if self.is_async else _BoundCached
        return bound_cls(self, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call a decorated plain function (``using`` must then be a cache object)."""
        key = self._function_keys(args, kwargs)
        where = f"{self.func.__qualname__}()"
        cache = self.policy.find_cache(None)
        compute = functools.partial(self.func, *args, **kwargs)
        if self.is_async:
            return self.policy.arun(cache, None, key, compute, where)
        return self.policy.run(_sync(cache, where), None, key, compute, where)

    def key(self, *args: Any, **kwargs: Any) -> str:
        """The cache key a method call with these arguments uses (without ``self``)."""
        return self._method_keys(args, kwargs)


def _sync(cache: Cache | AsyncCache, where: str) -> Cache:
    if isinstance(cache, AsyncCache):
        msg = f"{where} is not async, so it cannot use an AsyncCache; make it `async def` or use a Cache"
        raise CacheError(msg)
    return cache


class _BoundCached:
    """A cached method bound to its service; ``.invalidate(...)`` schedules deletion."""

    def __init__(self, cached: CachedFunction, instance: Any) -> None:
        self._cached = cached
        self._instance = instance
        self.__name__ = cached.func.__name__
        self.__qualname__ = cached.func.__qualname__
        self.__doc__ = cached.func.__doc__
        self.__wrapped__ = cached.func

    def __getattr__(self, name: str) -> Any:
        """Attributes of the :class:`CachedFunction`, as a bound method shows its function's.

        Decorators stacked above ``@cached`` (auth marks, route tags) set them
        there. Called only for names this object lacks, so calls cost nothing more.
        """
        cached = self.__dict__.get("_cached")  # absent while unpickling or copying
        if cached is None:
            raise AttributeError(name)
        try:
            return getattr(cached, name)
        except AttributeError:
            msg = f"cached method {self.__qualname__} has no attribute {name!r}"
            raise AttributeError(msg) from None

    def _ctx(self) -> Any:
        return getattr(self._instance, "_ctx", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cached = self._cached
        ctx = self._ctx()
        cache = cached.policy.find_cache(ctx)
        key = cached._method_keys(args, kwargs)
        where = f"{cached.func.__qualname__}()"
        compute = functools.partial(cached.func, self._instance, *args, **kwargs)
        return cached.policy.run(_sync(cache, where), ctx, key, compute, where)

    def key(self, *args: Any, **kwargs: Any) -> str:
        """The cache key used for a call with these arguments."""
        return self._cached._method_keys(args, kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        """Delete the entry for these arguments once the context commits."""
        ctx = self._ctx()
        self._cached.policy.find_cache(ctx).invalidate(self.key(*args, **kwargs), ctx=ctx)

    def __repr__(self) -> str:
        return f"<cached method {self.__qualname__} of {self._instance!r}>"


class _AsyncBoundCached(_BoundCached):
    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cached = self._cached
        ctx = self._ctx()
        cache = cached.policy.find_cache(ctx)
        key = cached._method_keys(args, kwargs)
        compute = functools.partial(cached.func, self._instance, *args, **kwargs)
        return await cached.policy.arun(cache, ctx, key, compute, f"{cached.func.__qualname__}()")


class CacheMiddleware:
    """DAL method middleware caching some DAL paths; made by :meth:`CachePolicy.middleware`.

    .. versionadded:: 2.0
    """

    def __init__(self, policy: CachePolicy, paths: Sequence[str]) -> None:
        self.policy = policy
        self.paths = frozenset(paths)
        self._keys: dict[Any, _KeyMaker] = {}

    def _key_maker(self, method: Any) -> _KeyMaker:
        if isinstance(method, _BoundCached):  # already @cached: key it like its function
            func, drop_first = method._cached.func, True
        else:
            func, drop_first = getattr(method, "__func__", method), hasattr(method, "__self__")
        maker = self._keys.get(func)
        if maker is None:
            maker = _KeyMaker(self.policy, func, drop_first=drop_first)
            self._keys[func] = maker
        return maker

    def __call__(self, request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
        """Serve ``request`` from the cache when its path is one of ours."""
        path = request.path_name
        if path not in self.paths:
            return handler(request)
        from polydatum.middleware import dal_resolver

        ctx = request.ctx
        method = dal_resolver(ctx, request.path)
        key = self._key_maker(method)(request.args, request.kwargs)
        cache = self.policy.find_cache(ctx)
        where = f"dal.{path}()"
        # A cached method is typed by its class: inspecting it would go through __getattr__.
        if isinstance(method, _BoundCached):
            is_async = isinstance(method, _AsyncBoundCached)
        else:
            is_async = inspect.iscoroutinefunction(method)
        if is_async:
            return self.policy.arun(cache, ctx, key, lambda: handler(request), where)
        return self.policy.run(_sync(cache, where), ctx, key, lambda: handler(request), where)

    def invalidate(self, ctx: DataAccessContext, path: str, *args: Any, **kwargs: Any) -> None:
        """Delete the entry of ``dal.<path>(*args, **kwargs)`` once ``ctx`` commits."""
        from polydatum.middleware import PathSegment, dal_resolver

        method = dal_resolver(ctx, tuple(PathSegment(n) for n in path.split(".")))
        key = self._key_maker(method)(args, kwargs)
        self.policy.find_cache(ctx).invalidate(key, ctx=ctx)

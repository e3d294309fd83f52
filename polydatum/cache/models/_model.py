"""Declaring a cache model: :func:`cache_model`, :class:`ModelOptions`, :class:`Ref`, the schema."""

from __future__ import annotations

import dataclasses
import enum
import json
import json.scanner
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar, get_args, get_origin, overload

from polydatum.cache._base import ttl_ms
from polydatum.cache._cached import escape_key_text
from polydatum.cache._errors import SerializationError
from polydatum.cache._serializers import JSONSerializer, Serializer, ascii_json, get_serializer
from polydatum.cache.models._schema import (
    Choice,
    Compiler,
    Dumper,
    Exact,
    Field,
    Incompatible,
    Kind,
    Loader,
    Optional_,
    Problem,
    _type_name,
    dumper_of,
    loader_of,
    native,
)

if TYPE_CHECKING:
    from polydatum.cache.models._repo import AsyncModels, Models

logger = logging.getLogger("polydatum.cache.models")


def _json_chunks() -> Callable[[Any, int], Any]:
    """What the json serializer writes for values that need no type tag (see Schema._json).

    ``json.JSONEncoder.encode`` builds a C encoder for every call; this one is
    built once. It is made without the circular-reference check, whose state
    a shared encoder cannot keep between threads: a record reaching it was
    validated field by field, so it holds no cycle. Where the C encoder is
    missing or differs, the plain encoder serves.
    """
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    try:
        basestring = json.encoder.encode_basestring
        chunks = make(None, encoder.default, basestring, None, ":", ",", False, False, True)  # type: ignore[misc]
        probe = {"a": [1, -2.5, "é\n", None, True, {"b": 1e300}]}
        if "".join(chunks(probe, 0)) == encoder.encode(probe):
            return chunks  # type: ignore[no-any-return]
    except Exception:  # no C encoder of this shape here
        pass
    return lambda plain, _level: (encoder.encode(plain),)


_JSON_CHUNKS = _json_chunks()
# json.loads less its layers around the scanner: the encoding sniffing, the slice off the
# serializer's tag byte (the scan starts after it) and the whitespace skipping.
_JSON_SCAN = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]

M = TypeVar("M")
T = TypeVar("T")

#: A model's TTL: seconds, a timedelta, None (never expire) or a callable of the record giving one.
ModelTTL = float | timedelta | Callable[[Any], "float | timedelta | None"] | None

# Key parts a key may be made of: they print the same way everywhere.
_KEY_TYPES = (int, str, uuid.UUID, date)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a cache model is stored.

    Args:
        key: the primary key: a field name, or several for a composite key.
        namespace: the part of every key after the cache's prefix; the class
            name in lower case by default.
        ttl: seconds (or a timedelta) a record lives, None for ever, or a
            callable taking the record and returning one of those.
        serializer: a serializer name from the registry
            (:func:`~polydatum.cache.register_serializer`).
        key_format: how the key's fields make the key, e.g.
            ``"{tenant}/{id}"``; by default the key fields joined with ``":"``.

    .. versionadded:: 2.0
    """

    key: str | tuple[str, ...]
    namespace: str | None = None
    ttl: ModelTTL = None
    serializer: str = "json"
    key_format: str | None = None


@overload
def cache_model(
    cls: type[M],
    /,
) -> type[M]: ...


@overload
def cache_model(
    *,
    key: str | Sequence[str] = "id",
    namespace: str | None = None,
    ttl: ModelTTL = None,
    serializer: str = "json",
    key_format: str | None = None,
    options: ModelOptions | None = None,
) -> Callable[[type[M]], type[M]]: ...


def cache_model(
    cls: type[M] | None = None,
    /,
    *,
    key: str | Sequence[str] = "id",
    namespace: str | None = None,
    ttl: ModelTTL = None,
    serializer: str = "json",
    key_format: str | None = None,
    options: ModelOptions | None = None,
) -> type[M] | Callable[[type[M]], type[M]]:
    """Make a dataclass a cache model (decorate it below ``@dataclass``)::

        @cache_model(key=("tenant", "id"), ttl=3600)
        @dataclass
        class Session:
            tenant: str
            id: int
            user: str

    The arguments are those of :class:`ModelOptions` (or pass ``options=``).
    The class is returned unchanged apart from its options; its field types
    are checked on first use (so :class:`Ref` may name a model declared later).

    Raises:
        TypeError: the class is not a dataclass, or the key names no field.
        ValueError: a bad namespace, TTL or serializer name.

    .. versionadded:: 2.0
    """
    if options is None:
        keys = (key,) if isinstance(key, str) else tuple(key)
        options = ModelOptions(
            key=keys[0] if len(keys) == 1 else keys,
            namespace=namespace,
            ttl=ttl,
            serializer=serializer,
            key_format=key_format,
        )

    def decorate(model: type[M]) -> type[M]:
        schema = Schema(model, options)
        model.__cache_model__ = schema  # type: ignore[attr-defined]
        with _REGISTRY_LOCK:
            # By the class's full name: two models may share a namespace (two apps
            # in one process, a test and the docs), and a relay must not mix them up.
            _REGISTRY[model_id(model)] = schema
            _REGISTRY[schema.namespace] = schema  # rows written before model ids were stored
        return model

    return decorate if cls is None else decorate(cls)


# Model id (module:qualname) -> schema, so an outbox relay can apply a partial update it delivers.
_REGISTRY: dict[str, Schema] = {}
_REGISTRY_LOCK = threading.Lock()


def model_id(cls: type) -> str:
    """What an outbox row names a model by: ``module:qualname``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def registered(name: str) -> Schema | None:
    """The schema of the model ``name`` (a :func:`model_id`, or a namespace for older rows)."""
    return _REGISTRY.get(name)


def schema_of(model: Any) -> Schema:
    """The schema of a cache model class.

    Raises:
        TypeError: ``model`` is not a class decorated with :func:`cache_model`.
    """
    schema = getattr(model, "__cache_model__", None) if isinstance(model, type) else None
    if not isinstance(schema, Schema) or schema.cls is not model:
        msg = (
            f"{model!r} is not a cache model; declare it as a dataclass decorated with "
            f"@cache_model(key=...) from polydatum.cache.models"
        )
        raise TypeError(msg)
    return schema


class Ref(Generic[M]):
    """A reference to another cache model's record, by key, loaded lazily through the same cache.

    Declare a field as ``author: Ref[Author]`` and store ``Ref(author_id)`` (or
    ``Ref.to(author)``). A record read through ``ctx.cache.models(Post)``
    gives refs bound to that cache: ``post.author.get()`` (``await
    post.author.aget()`` on an async cache) loads the author once; a
    ``get_many(..., preload=("author",))`` has loaded them already.

    .. versionadded:: 2.0
    """

    __slots__ = ("_loaded", "_models", "_value", "key")

    def __init__(self, key: Any) -> None:
        self.key = key
        self._loaded = False
        self._value: M | None = None
        self._models: Any = None

    @classmethod
    def to(cls, record: T) -> Ref[T]:
        """A ref to ``record`` (already loaded: :meth:`get` returns it without I/O)."""
        ref: Ref[T] = Ref(schema_of(type(record)).key_value(record))
        ref._loaded = True
        ref._value = record
        return ref

    def __repr__(self) -> str:
        return f"Ref({self.key!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def loaded(self) -> bool:
        """True once the target was loaded (or preloaded): :meth:`get` then does no I/O."""
        return self._loaded

    def _bound(self) -> Any:
        if self._models is None:
            msg = (
                f"{self!r} is not bound to a cache: only refs of records read through "
                f"ctx.<cache>.models(Model) load lazily; load it with .models(Target).get(ref.key)"
            )
            raise RuntimeError(msg)
        return self._models

    def get(self) -> M | None:
        """The referenced record (None when it is missing), loaded on first call."""
        if not self._loaded:
            models: Models[M] = self._bound()
            self._set(models.get(self.key))
        return self._value

    async def aget(self) -> M | None:
        """:meth:`get` on an async cache."""
        if not self._loaded:
            models: AsyncModels[M] = self._bound()
            self._set(await models.get(self.key))
        return self._value

    def _set(self, value: M | None) -> None:
        self._value = value
        self._loaded = True


class RefKind(Kind):
    """A :class:`Ref` field: stored as the target's key."""

    def __init__(self, target: type) -> None:
        self.target = target
        self.expected = f"Ref[{target.__qualname__}]"

    @property
    def schema(self) -> Schema:
        return schema_of(self.target)

    def problem(self, value: Any, path: str) -> Problem | None:
        if not isinstance(value, Ref):
            return (path, self.expected, value)
        return self.schema.key_problem(value.key, f"{path}.key")

    def dump(self, value: Any) -> Any:
        fields = self.schema.key_fields
        if len(fields) == 1:
            return fields[0].kind.dump(value.key)
        return [f.kind.dump(part) for f, part in zip(fields, value.key, strict=True)]

    def native_form(self) -> bool:
        return all(native(f.kind) for f in self.schema.compile().key_fields)

    def load(self, plain: Any) -> Any:
        schema = self.schema
        if len(schema.key_fields) == 1:
            return Ref(schema.key_fields[0].kind.load(plain))
        if type(plain) is not list or len(plain) != len(schema.key_fields):
            raise Incompatible(f"expected a key of {len(schema.key_fields)} parts, found {plain!r}")
        return Ref(tuple(f.kind.load(p) for f, p in zip(schema.key_fields, plain, strict=True)))


def _ref_hook(hint: Any, where: str) -> Kind | None:
    if get_origin(hint) is Ref:
        (target,) = get_args(hint)
        return RefKind(target)
    if hint is Ref:
        msg = f"{where}: say which model a Ref points to, e.g. Ref[Author]"
        raise TypeError(msg)
    return None


def _key_text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if type(value) is date:
        return value.isoformat()
    return str(value)


def _key_part(value: Any) -> str:
    """One field of a composite key, with the separator and key marks escaped (see ``cached``)."""
    return escape_key_text(_key_text(value))


class Schema:
    """A cache model compiled: its fields, key, serializer and TTL (one per model class)."""

    def __init__(self, cls: type, options: ModelOptions) -> None:
        if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
            msg = f"@cache_model needs a dataclass; decorate {cls!r} with @dataclass first (below it)"
            raise TypeError(msg)
        self.cls = cls
        self.name = cls.__qualname__
        self.options = options
        names = {f.name for f in dataclasses.fields(cls)}
        keys = (options.key,) if isinstance(options.key, str) else tuple(options.key)
        unknown = [k for k in keys if k not in names]
        if not keys or unknown:
            msg = (
                f"{self.name}: the key names {unknown or 'no field'}; fields are: {', '.join(sorted(names))}"
            )
            raise TypeError(msg)
        self.key_names = keys
        namespace = options.namespace if options.namespace is not None else cls.__name__.lower()
        if not namespace or "{" in namespace or "}" in namespace:
            msg = f"{self.name}: namespace must be non-empty, without braces, got {namespace!r}"
            raise ValueError(msg)
        self.namespace = namespace
        self.serializer: Serializer = get_serializer(options.serializer)
        ttl = options.ttl
        self._ttl_fixed: int | None = None if callable(ttl) else ttl_ms(ttl)  # ValueError if not > 0
        self._ttl_fn = ttl if callable(ttl) else None
        if options.key_format is not None:
            try:
                options.key_format.format(**dict.fromkeys(keys, ""))
            except (KeyError, IndexError, ValueError) as exc:
                msg = (
                    f"{self.name}: key_format {options.key_format!r} must name only the key fields "
                    f"{keys} ({exc!r})"
                )
                raise ValueError(msg) from None
        self._compiled = False
        self._json = False
        self._fast_key: type | None = None
        self._lock = threading.Lock()
        self.warned = False
        self.fields: list[Field] = []
        self.key_fields: list[Field] = []
        self.ref_fields: dict[str, RefKind] = {}
        self.by_name: dict[str, Field] = {}

    def compile(self) -> Schema:
        """Resolve and check the field types (once, on first use)."""
        if self._compiled:
            return self
        with self._lock:
            if not self._compiled:
                fields = Compiler(self.name, _ref_hook).fields(self.cls)
                by_name = {f.name: f for f in fields}
                key_fields = [by_name[k] for k in self.key_names]
                for f in key_fields:
                    if not (isinstance(f.kind, Exact) and f.kind.kind in _KEY_TYPES) and not isinstance(
                        f.kind, Choice
                    ):
                        msg = (
                            f"{self.name}.{f.name}: a key field must be int, str, UUID, date or an Enum, "
                            f"not {f.kind.expected}"
                        )
                        raise TypeError(msg)
                refs: dict[str, RefKind] = {}
                for f in fields:
                    kind = f.kind.inner if isinstance(f.kind, Optional_) else f.kind
                    if isinstance(kind, RefKind):
                        refs[f.name] = kind
                self.fields, self.key_fields, self.by_name, self.ref_fields = (
                    fields,
                    key_fields,
                    by_name,
                    refs,
                )
                only = key_fields[0].kind if len(key_fields) == 1 else None
                if type(only) is Exact and only.kind in (int, str) and self.options.key_format is None:
                    self._fast_key = only.kind
                self._load: Loader = loader_of(self.cls, fields)
                self._dump: Dumper = dumper_of(self.cls, fields, self.invalid)
                # Fields JSON stores as they are: the plain json codec, same bytes, no type tags.
                self._json = type(self.serializer) is JSONSerializer and all(native(f.kind) for f in fields)
                self._tag = self.serializer.tag
                self._dumps = self.serializer.dumps
                self._loads = self.serializer.loads
                self._compiled = True
        return self

    # -- keys -------------------------------------------------------------------

    def key_problem(self, key: Any, path: str) -> Problem | None:
        """Why ``key`` is not a key of this model, or None."""
        self.compile()
        fields = self.key_fields
        if len(fields) == 1:
            return fields[0].kind.problem(key, path)
        if type(key) is not tuple or len(key) != len(fields):
            return (path, f"a tuple of {len(fields)} ({', '.join(f.name for f in fields)})", key)
        for f, part in zip(fields, key, strict=True):
            if (found := f.kind.problem(part, f"{path}.{f.name}")) is not None:
                return found
        return None

    def key_text(self, key: Any) -> str:
        """The formatted key of ``key`` (a value, or a tuple for a composite key).

        Raises:
            TypeError: ``key`` is None, of the wrong type, or of the wrong length.
        """
        if type(key) is self._fast_key:  # a plain int or str key: nothing to check or format
            return str(key)
        found = self.key_problem(key, "key")
        if found is not None:
            path, expected, value = found
            msg = f"{self.name} {path}: expected {expected}, got {_type_name(value)}"
            raise TypeError(msg)
        parts = key if type(key) is tuple else (key,)
        if self.options.key_format is None:
            if len(parts) == 1:
                return _key_text(parts[0])
            # Escaped like cached()'s arguments: ("acme:eu", "x") and ("acme", "eu:x")
            # must not share a key (one tenant would read the other's record).
            return ":".join(_key_part(p) for p in parts)
        return self.options.key_format.format(
            **{n: _key_part(p) for n, p in zip(self.key_names, parts, strict=True)}
        )

    def key_value(self, record: Any) -> Any:
        """The key of ``record``: its key field's value, or a tuple of them."""
        if len(self.key_names) == 1:
            return getattr(record, self.key_names[0])
        return tuple(getattr(record, n) for n in self.key_names)

    # -- records ------------------------------------------------------------------

    def invalid(self, path: str, expected: str, value: Any) -> TypeError:
        """The TypeError for a wrong value at ``path``."""
        msg = f"{self.name}.{path}: expected {expected}, got {_type_name(value)}"
        return TypeError(msg)

    def check_record(self, record: Any) -> None:
        """Raise TypeError naming the first field of ``record`` holding a wrong value."""
        self.compile()
        if type(record) is not self.cls:
            msg = f"expected a {self.name} record, got {_type_name(record)}"
            raise TypeError(msg)
        for f in self.fields:
            if (found := f.kind.problem(getattr(record, f.name), f.name)) is not None:
                raise self.invalid(*found)

    def encode(self, record: Any) -> bytes:
        """The stored bytes of ``record`` after validating it (TypeError naming the field)."""
        if not self._compiled:
            self.compile()
        if type(record) is not self.cls:
            self.check_record(record)
        plain = self._dump(record)
        if self._json:
            try:
                return self._tag + "".join(_JSON_CHUNKS(plain, 0)).encode()
            except UnicodeEncodeError:  # a lone surrogate in a str field
                return self._tag + ascii_json(plain)
        try:
            return self._tag + self._dumps(plain)
        except SerializationError as exc:
            raise self._unencodable(plain, exc) from None

    def _unencodable(self, plain: dict[str, Any], exc: SerializationError) -> SerializationError:
        """The error naming the first field the serializer refuses (it said only what type)."""
        for name, value in plain.items():
            try:
                self._dumps({name: value})
            except SerializationError:
                msg = f"{self.name}.{name}: the {self.serializer.name!r} serializer cannot store it: {exc}"
                return SerializationError(msg)
        return exc

    def decode(self, data: bytes, where: str) -> Any:
        """The record stored as ``data``; None (logged once per model) when it cannot be read."""
        try:
            if data[:1] != self._tag:
                raise Incompatible(f"it was not written by the {self.serializer.name!r} serializer")
            if self._json:
                try:
                    text = data.decode()
                    plain, end = _JSON_SCAN(text, 1)
                    if end == len(text) and type(plain) is dict:
                        return self._load(plain)
                except Exception:  # written by an older model, maybe with type tags: the full path below
                    pass
            try:
                plain = self._loads(data[1:])
            except Exception as exc:
                raise Incompatible(f"it does not decode ({type(exc).__name__})") from None
            if type(plain) is not dict:
                raise Incompatible(f"it holds a {_type_name(plain)}, not a record")
            return self._load(plain)
        except Incompatible as exc:
            self.miss(where, str(exc))
        except (TypeError, ValueError) as exc:  # the class's own __post_init__ refused it
            self.miss(where, f"{type(exc).__name__}: {exc}")
        return None

    def miss(self, where: str, why: str) -> None:
        """Log (once per model) that a stored record was unreadable and counts as a miss."""
        if self.warned:
            return
        self.warned = True
        logger.warning(
            "cache model %s: the record at %r cannot be read (%s); treating it as a miss "
            "(logged once per model)",
            self.name,
            where,
            why,
            extra={"polydatum_cache_model": self.name},
        )

    def ttl_of(self, record: Any) -> int | None:
        """The TTL in milliseconds for ``record`` (None: no expiry)."""
        if self._ttl_fn is None:
            return self._ttl_fixed
        return ttl_ms(self._ttl_fn(record))

    # -- partial updates ----------------------------------------------------------

    def check_changes(self, changes: dict[str, Any]) -> None:
        """Raise TypeError for an unknown field, a key field or a wrong value in ``changes``."""
        self.compile()
        for name, value in changes.items():
            field = self.by_name.get(name)
            if field is None or not field.init:
                known = ", ".join(f.name for f in self.fields if f.init)
                msg = f"{self.name} has no field {name!r}; fields are: {known}"
                raise TypeError(msg)
            if name in self.key_names:
                msg = (
                    f"{self.name}.{name} is part of the key; save a new record and delete the old one instead"
                )
                raise TypeError(msg)
            if (found := field.kind.problem(value, name)) is not None:
                raise self.invalid(*found)

    def check_counter(self, name: str, delta: Any) -> None:
        """Raise TypeError unless ``name`` is an int field (not in the key) and ``delta`` an int."""
        self.compile()
        field = self.by_name.get(name)
        if field is None or not (isinstance(field.kind, Exact) and field.kind.kind is int):
            msg = f"{self.name}.{name}: incr and decr need an int field"
            raise TypeError(msg)
        if name in self.key_names:
            msg = f"{self.name}.{name} is part of the key; it cannot be counted"
            raise TypeError(msg)
        if type(delta) is not int:
            msg = f"{self.name}.{name}: the delta must be an int, got {_type_name(delta)}"
            raise TypeError(msg)

    def apply(self, record: Any, sets: dict[str, Any], incr: dict[str, int]) -> Any:
        """``record`` with the fields in ``sets`` replaced and those in ``incr`` counted."""
        changes = dict(sets)
        for name, delta in incr.items():
            changes[name] = changes.get(name, getattr(record, name)) + delta
        return dataclasses.replace(record, **changes)

    def encode_changes(self, sets: dict[str, Any]) -> bytes:
        """``sets`` as stored bytes (for an outbox row)."""
        return self._dumps({name: self.by_name[name].kind.dump(v) for name, v in sets.items()})

    def decode_changes(self, data: bytes) -> dict[str, Any]:
        """What :meth:`encode_changes` wrote."""
        self.compile()
        plain = self._loads(data)
        return {name: self.by_name[name].kind.load(v) for name, v in plain.items()}

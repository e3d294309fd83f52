"""Field types: validation, the plain form a serializer stores, and loading with evolution.

Each field type compiles once into a :class:`Kind` with three jobs:

- ``problem(value, path)``: why ``value`` cannot be stored (a path, what was
  expected, the value), or None;
- ``dump(value)``: the plain form handed to the serializer;
- ``load(plain)``: the value back, converting what evolved compatibly
  (an ``int`` stored where a ``float`` is now expected) and raising
  :class:`Incompatible` for what did not.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
import uuid
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Union, get_args, get_origin

from polydatum.cache._serializers import _datetime_from_iso, _time_from_iso

try:  # zoneinfo needs the system's tz database only when a zone is used
    from zoneinfo import ZoneInfo
except ImportError:  # pragma: no cover - every supported Python has it
    ZoneInfo = None  # type: ignore[assignment,misc]

Problem = tuple[str, str, Any]


class Incompatible(Exception):
    """A stored value that the current model cannot read (a miss, logged once)."""


def _type_name(value: Any) -> str:
    return type(value).__qualname__


class Kind:
    """A compiled field type (see the module docstring)."""

    expected: str = "?"
    #: For a type stored as text: the parser of that text (the fast path of loading).
    parse: Callable[[str], Any] | None = None

    def problem(self, value: Any, path: str) -> Problem | None:
        """Why ``value`` cannot be stored at ``path``, or None."""
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        """The plain form of a valid ``value``."""
        return value

    def load(self, plain: Any) -> Any:
        """The value of ``plain``; :class:`Incompatible` when it cannot be read."""
        raise NotImplementedError

    def native_form(self) -> bool:
        """True when the plain form holds only JSON's own types (see :func:`native`)."""
        return False


class Exact(Kind):
    """A type checked with ``type(v) is T`` (int refuses bool, date refuses datetime)."""

    def __init__(self, kind: type, loaders: dict[type, Callable[[Any], Any]] | None = None) -> None:
        self.kind = kind
        self.expected = kind.__name__
        # Stored types read through a conversion (schema evolution).
        self.loaders = loaders or {}

    def problem(self, value: Any, path: str) -> Problem | None:
        return None if type(value) is self.kind else (path, self.expected, value)

    def load(self, plain: Any) -> Any:
        if type(plain) is self.kind:
            return plain
        convert = self.loaders.get(type(plain))
        if convert is None:
            raise Incompatible(f"expected {self.expected}, found {_type_name(plain)}")
        try:
            return convert(plain)
        except (ValueError, ArithmeticError) as exc:
            raise Incompatible(str(exc)) from None


class Float(Exact):
    """A float; an int is accepted (and stored as a float), as typing allows."""

    def __init__(self) -> None:
        super().__init__(float, {int: float})

    def problem(self, value: Any, path: str) -> Problem | None:
        kind = type(value)
        return None if kind is float or kind is int else (path, "float", value)

    def dump(self, value: Any) -> Any:
        return float(value)


def _parse_datetime(text: str) -> datetime:
    # Only an offset with seconds (a fifth colon) needs the slow, exact parse before Python 3.12.
    return _datetime_from_iso(text) if text.count(":") > 4 else datetime.fromisoformat(text)


def _parse_time(text: str) -> time:
    return _time_from_iso(text) if text.count(":") > 3 else time.fromisoformat(text)


class Text(Exact):
    """A type stored as text (ISO dates and times, Decimal, UUID): every serializer keeps
    text as it is, so nothing needs the serializer's own type tags (smaller, faster)."""

    def __init__(
        self, kind: type, parse: Callable[[str], Any], loaders: dict[type, Callable[[Any], Any]]
    ) -> None:
        super().__init__(kind, {str: parse, **loaders})
        self.parse: Callable[[str], Any] = parse

    def dump(self, value: Any) -> Any:
        return value.isoformat() if isinstance(value, date | time) else str(value)

    def load(self, plain: Any) -> Any:
        if type(plain) is str:  # the stored form: straight to the parser
            try:
                return self.parse(plain)
            except (ValueError, ArithmeticError) as exc:
                raise Incompatible(f"{plain!r} is not a {self.expected} ({exc})") from None
        return super().load(plain)


class DateTime(Text):
    """A datetime whose time zone comes back exactly: a fixed offset, or an IANA zone by name."""

    def __init__(self) -> None:
        super().__init__(datetime, _parse_datetime, {})

    def dump(self, value: Any) -> Any:
        tz = value.tzinfo
        if ZoneInfo is not None and isinstance(tz, ZoneInfo) and tz.key:
            # The offset alone would lose the zone's future rules (DST); keep its name.
            return [value.isoformat(), tz.key]
        return value.isoformat()

    def load(self, plain: Any) -> Any:
        if type(plain) is list and len(plain) == 2:
            when, zone = self.load(plain[0]), plain[1]
            try:
                return when.astimezone(ZoneInfo(zone)) if ZoneInfo is not None else when
            except (ValueError, KeyError, OSError, TypeError) as exc:
                raise Incompatible(f"unknown time zone {zone!r} ({exc})") from None
        return super().load(plain)


class Choice(Kind):
    """An Enum, stored as its value."""

    def __init__(self, kind: type[enum.Enum]) -> None:
        self.kind = kind
        self.expected = kind.__qualname__

    def problem(self, value: Any, path: str) -> Problem | None:
        return None if isinstance(value, self.kind) else (path, self.expected, value)

    def dump(self, value: Any) -> Any:
        return value.value

    def load(self, plain: Any) -> Any:
        try:
            return self.kind(plain)
        except (ValueError, TypeError):
            raise Incompatible(f"{plain!r} is not a {self.expected}") from None


class Optional_(Kind):
    """``X | None``."""

    def __init__(self, inner: Kind) -> None:
        self.inner = inner
        self.expected = f"{inner.expected} | None"

    def problem(self, value: Any, path: str) -> Problem | None:
        if value is None:
            return None
        found = self.inner.problem(value, path)
        return (
            None if found is None else (found[0], self.expected if found[0] == path else found[1], found[2])
        )

    def dump(self, value: Any) -> Any:
        return None if value is None else self.inner.dump(value)

    def load(self, plain: Any) -> Any:
        return None if plain is None else self.inner.load(plain)


class ListOf(Kind):
    """``list[X]``; a stored tuple reads as a list."""

    def __init__(self, inner: Kind) -> None:
        self.inner = inner
        self.expected = f"list[{inner.expected}]"
        # Items stored as they are (ints, strs...) need no conversion: the fast path.
        self.same: type | None = inner.kind if type(inner) is Exact else None

    def problem(self, value: Any, path: str) -> Problem | None:
        if type(value) is not list:
            return (path, self.expected, value)
        inner = self.inner
        for i, item in enumerate(value):
            if (found := inner.problem(item, f"{path}[{i}]")) is not None:
                return found
        return None

    def dump(self, value: Any) -> Any:
        dump = self.inner.dump
        return [dump(item) for item in value]

    def load(self, plain: Any) -> Any:
        if type(plain) is not list and type(plain) is not tuple:
            raise Incompatible(f"expected a list, found {_type_name(plain)}")
        same = self.same
        if same is not None and all(type(item) is same for item in plain):
            return plain if type(plain) is list else list(plain)
        load = self.inner.load
        return [load(item) for item in plain]


class TupleOf(Kind):
    """``tuple[X, ...]`` or ``tuple[X, Y]``; a stored list reads as a tuple."""

    def __init__(self, items: list[Kind] | None, rest: Kind | None) -> None:
        self.items = items
        self.rest = rest
        inner = f"{rest.expected}, ..." if rest is not None else ", ".join(k.expected for k in items or ())
        self.expected = f"tuple[{inner}]"

    def _kinds(self, n: int) -> list[Kind] | None:
        if self.rest is not None:
            return [self.rest] * n
        return self.items if self.items is not None and len(self.items) == n else None

    def problem(self, value: Any, path: str) -> Problem | None:
        kinds = self._kinds(len(value)) if type(value) is tuple else None
        if kinds is None:
            return (path, self.expected, value)
        for i, (kind, item) in enumerate(zip(kinds, value, strict=True)):
            if (found := kind.problem(item, f"{path}[{i}]")) is not None:
                return found
        return None

    def dump(self, value: Any) -> Any:
        kinds = self._kinds(len(value))
        assert kinds is not None
        # A list: every serializer stores one natively, and loading takes a list back as a tuple.
        return [kind.dump(item) for kind, item in zip(kinds, value, strict=True)]

    def load(self, plain: Any) -> Any:
        kinds = self._kinds(len(plain)) if type(plain) is tuple or type(plain) is list else None
        if kinds is None:
            raise Incompatible(f"expected a {self.expected}, found {_type_name(plain)}")
        return tuple(kind.load(item) for kind, item in zip(kinds, plain, strict=True))


class DictOf(Kind):
    """``dict[K, V]``."""

    def __init__(self, key: Kind, value: Kind) -> None:
        self.key = key
        self.value = value
        self.expected = f"dict[{key.expected}, {value.expected}]"

    def problem(self, value: Any, path: str) -> Problem | None:
        if type(value) is not dict:
            return (path, self.expected, value)
        for k, v in value.items():
            if (found := self.key.problem(k, f"{path}<key>")) is not None:
                return found
            if (found := self.value.problem(v, f"{path}[{k!r}]")) is not None:
                return found
        return None

    def dump(self, value: Any) -> Any:
        dk, dv = self.key.dump, self.value.dump
        return {dk(k): dv(v) for k, v in value.items()}

    def load(self, plain: Any) -> Any:
        if type(plain) is not dict:
            raise Incompatible(f"expected a dict, found {_type_name(plain)}")
        lk, lv = self.key.load, self.value.load
        return {lk(k): lv(v) for k, v in plain.items()}


class Nested(Kind):
    """A nested dataclass, stored as a dict of its fields (evolving as a record does)."""

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self.expected = kind.__qualname__
        self.fields: list[Field] = []  # filled after construction: a dataclass may nest itself
        self.loader: Loader  # likewise

    def problem(self, value: Any, path: str) -> Problem | None:
        if type(value) is not self.kind:
            return (path, self.expected, value)
        for field in self.fields:
            found = field.kind.problem(getattr(value, field.name), f"{path}.{field.name}")
            if found is not None:
                return found
        return None

    def dump(self, value: Any) -> Any:
        return {f.name: f.kind.dump(getattr(value, f.name)) for f in self.fields}

    def load(self, plain: Any) -> Any:
        if type(plain) is not dict:
            raise Incompatible(f"expected a {self.expected} (a dict), found {_type_name(plain)}")
        if len(plain) == 1 and next(iter(plain))[:1] == "$":  # {"$tuple": ...}: a type tag, not a record
            raise Incompatible(f"expected a {self.expected}, found a tagged value")
        return self.loader(plain)


class Field:
    """One field of a model (or nested dataclass), compiled.

    Args:
        name: the field's name.
        kind: its compiled type.
        default: a factory for the default (a missing stored field takes
            it); None when the field is required.
        init: False for a field the constructor does not take.
    """

    __slots__ = ("default", "init", "kind", "name", "same")

    def __init__(self, name: str, kind: Kind, default: Callable[[], Any] | None, init: bool = True) -> None:
        self.name = name
        self.kind = kind
        self.default = default
        self.init = init
        # The type whose values are stored as they are and read back unchanged: the fast path.
        self.same: type | None = kind.kind if type(kind) is Exact or type(kind) is Float else None


#: Builds a record (or nested dataclass) from its stored fields: see :func:`loader_of`.
Loader = Callable[[dict[str, Any]], Any]


def _converter(f: Field) -> Callable[[Any], Any]:
    """What a loader does with a stored value that is not already of the field's own type."""
    name, load, default = f.name, f.kind.load, f.default

    def convert(value: Any) -> Any:
        if value is _ABSENT:  # a field the writer's model did not have
            if default is None:
                msg = f"field {name!r} is missing and has no default"
                raise Incompatible(msg)
            return default()
        try:
            return load(value)
        except Incompatible as exc:
            raise Incompatible(f"field {name!r}: {exc}") from None
        except (ValueError, ArithmeticError) as exc:
            raise Incompatible(f"field {name!r}: {value!r} does not parse ({exc})") from None

    return convert


def _unparsable(name: str, value: str, exc: Exception) -> Incompatible:
    return Incompatible(f"field {name!r}: {value!r} does not parse ({exc})")


def loader_of(cls: type, fields: list[Field]) -> Loader:
    """The function turning the stored fields of a ``cls`` into one, generated once per class.

    A missing field takes its default, an extra one is ignored, and a value
    of another type is converted (schema evolution) or raises
    :class:`Incompatible` naming the field. A read is the hot path of a
    cache, so rather than loop over the fields and gather the arguments in
    a dict, the generated code reads every field by subscript (a missing one
    takes the slower ``get`` path), keeps a value already of the field's own
    type as it is, hands stored text straight to its parser (datetime,
    Decimal, UUID) and calls ``cls`` with literal keywords, as a
    hand-written reader would.
    """
    names: dict[str, Any] = {"_A": _ABSENT, "_cls": cls, "_unparsable": _unparsable}
    reads, gets, converts, call = [], [], [], []
    for i, f in enumerate(field for field in fields if field.init):
        v, kind = f"v{i}", f.kind
        names[f"c{i}"] = _converter(f)
        reads.append(f"        {v} = plain[{f.name!r}]")
        gets.append(f"        {v} = get({f.name!r}, _A)")
        if f.same is not None:  # int, str...: stored as they are
            names[f"t{i}"] = f.same
            converts.append(f"    if type({v}) is not t{i}: {v} = c{i}({v})")
        elif kind.parse is not None:  # datetime, Decimal, UUID...: stored as text
            names[f"p{i}"] = kind.parse
            converts += [
                f"    if type({v}) is str:",
                "        try:",
                f"            {v} = p{i}({v})",
                "        except (ValueError, ArithmeticError) as exc:",
                f"            raise _unparsable({f.name!r}, {v}, exc) from None",
                "    else:",
                f"        {v} = c{i}({v})",
            ]
        elif isinstance(kind, ListOf) and kind.same is not None:  # a list of ints, strs...
            names[f"t{i}"] = kind.same
            converts += _same_list_lines(v, f"t{i}", f"c{i}")
        else:
            converts.append(f"    {v} = c{i}({v})")
        call.append(f"{f.name}={v}")
    lines = [
        "def load(plain):",
        "    try:",
        *(reads or ["        pass"]),
        "    except KeyError:  # written by a model without some field: its default, or Incompatible",
        "        get = plain.get",
        *(gets or ["        pass"]),
        *converts,
        f"    return _cls({', '.join(call)})",
    ]
    # Made of field names only, which a dataclass has as identifiers.
    exec(compile("\n".join(lines), f"<cache model loader of {cls.__qualname__}>", "exec"), names)
    loader: Loader = names["load"]
    return loader


def _same_list_lines(v: str, item_type: str, slow: str) -> list[str]:
    """Generated lines keeping ``v`` when it is a list of exactly ``item_type`` items, else ``v = slow(v)``.

    The loader and the dumper both take this fast path for lists of ints,
    strs...; ``slow`` is their full conversion or check.
    """
    return [
        f"    if type({v}) is list:",
        f"        for item in {v}:",
        f"            if type(item) is not {item_type}:",
        f"                {v} = {slow}({v})",
        "                break",
        "    else:",
        f"        {v} = {slow}({v})",
    ]


#: A record's (or nested dataclass's) fields in the plain form a serializer stores: see :func:`dumper_of`.
Dumper = Callable[[Any], dict[str, Any]]


def _checker(f: Field, invalid: Callable[[str, str, Any], Exception]) -> Callable[[Any], Any]:
    """What a dumper does with a value that is not plainly of the field's own type: check, then dump."""
    name, problem, dump = f.name, f.kind.problem, f.kind.dump

    def check(value: Any) -> Any:
        if (found := problem(value, name)) is not None:
            raise invalid(*found)
        return dump(value)

    return check


def dumper_of(cls: type, fields: list[Field], invalid: Callable[[str, str, Any], Exception]) -> Dumper:
    """The function validating a ``cls`` record and giving its fields' plain forms, generated once.

    ``invalid(path, expected, value)`` makes the error for a wrong value. The
    generated code reads each field in a line of its own and stores a value
    of the field's own type (an int, a str, a list of strs...) as it is,
    leaving the full check to the values that need it.
    """
    names: dict[str, Any] = {}
    lines = ["def dump(record):"]
    items = []
    for i, f in enumerate(fields):
        v, kind = f"v{i}", f.kind
        names[f"s{i}"] = _checker(f, invalid)
        lines.append(f"    {v} = record.{f.name}")
        if f.same is not None:  # int, str...: stored as they are
            names[f"t{i}"] = f.same
            lines.append(f"    if type({v}) is not t{i}: {v} = s{i}({v})")
        elif isinstance(kind, Text) and type(kind).problem is Exact.problem:  # Decimal, UUID, dates
            names[f"t{i}"] = kind.kind
            names[f"d{i}"] = str if kind.kind in (uuid.UUID, Decimal) else kind.dump
            lines.append(f"    {v} = d{i}({v}) if type({v}) is t{i} else s{i}({v})")
        elif isinstance(kind, ListOf) and kind.same is not None:  # a list of ints, strs...
            names[f"t{i}"] = kind.same
            lines += _same_list_lines(v, f"t{i}", f"s{i}")
        else:
            lines.append(f"    {v} = s{i}({v})")
        items.append(f"{f.name!r}: {v}")
    lines.append(f"    return {{{', '.join(items)}}}")
    exec(compile("\n".join(lines), f"<cache model dumper of {cls.__qualname__}>", "exec"), names)
    dumper: Dumper = names["dump"]
    return dumper


_ABSENT: Any = object()


# Types checked exactly, with what each also reads from an older stored type.
_EXACT: dict[Any, Callable[[], Kind]] = {
    int: lambda: Exact(int),
    bool: lambda: Exact(bool),
    str: lambda: Exact(str),
    bytes: lambda: Exact(bytes),
    float: Float,
    Decimal: lambda: Text(Decimal, Decimal, {int: Decimal}),
    uuid.UUID: lambda: Text(uuid.UUID, uuid.UUID, {}),
    date: lambda: Text(date, date.fromisoformat, {}),
    time: lambda: Text(time, _parse_time, {}),
    datetime: DateTime,
}


class Compiler:
    """Turns type hints into :class:`Kind` objects; ``ref`` handles ``Ref[...]`` (models.py)."""

    def __init__(self, owner: str, ref: Callable[[Any, str], Kind | None]) -> None:
        self.owner = owner
        self.ref = ref
        self.nested: dict[type, Nested] = {}

    def compile(self, hint: Any, where: str) -> Kind:
        """The :class:`Kind` of ``hint``; TypeError naming ``where`` when it is not supported."""
        if hint in _EXACT:
            return _EXACT[hint]()
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return Choice(hint)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self.nested_kind(hint)
        found = self.ref(hint, f"{self.owner}.{where}")
        if found is not None:
            return found
        origin, args = get_origin(hint), get_args(hint)
        if origin is Union or origin is types.UnionType:
            rest = [a for a in args if a is not type(None)]
            if len(rest) == 1 and len(args) == 2:
                return Optional_(self.compile(rest[0], where))
        elif origin is list and len(args) == 1:
            return ListOf(self.compile(args[0], where))
        elif origin is tuple and args:
            if len(args) == 2 and args[1] is Ellipsis:
                return TupleOf(None, self.compile(args[0], where))
            return TupleOf([self.compile(a, where) for a in args], None)
        elif origin is dict and len(args) == 2:
            return DictOf(self.compile(args[0], where), self.compile(args[1], where))
        msg = (
            f"{self.owner}.{where}: unsupported field type {hint!r}; a cache model supports int, float, "
            f"bool, str, bytes, Decimal, UUID, Enum, date, time, datetime, list/dict/tuple of these, "
            f"nested dataclasses, Ref[Model] and Optional of any"
        )
        raise TypeError(msg)

    def nested_kind(self, kind: type) -> Nested:
        """The :class:`Nested` of a dataclass (one per class, so recursion terminates)."""
        if kind in self.nested:
            return self.nested[kind]
        nested = self.nested[kind] = Nested(kind)
        nested.fields = self.fields(kind, prefix=f"{kind.__qualname__}.")
        nested.loader = loader_of(kind, nested.fields)
        return nested

    def fields(self, cls: type, prefix: str = "") -> list[Field]:
        """The compiled fields of dataclass ``cls``."""
        hints = typing.get_type_hints(cls)
        result = []
        for f in dataclasses.fields(cls):
            default: Callable[[], Any] | None = None
            if f.default is not dataclasses.MISSING:
                value = f.default
                default = lambda value=value: value  # noqa: E731 - a tiny closure per field
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory
            result.append(Field(f.name, self.compile(hints[f.name], prefix + f.name), default, f.init))
        return result


def native(kind: Kind, seen: set[int] | None = None) -> bool:
    """True when the plain form of ``kind`` holds only JSON's own types.

    JSON then needs no type tags for it, so a record of such fields is
    encoded and decoded by the plain JSON codec (the same bytes as the
    ``json`` serializer writes, only faster).
    """
    seen = set() if seen is None else seen
    if type(kind) is Exact:
        return kind.kind in (int, str, bool)
    if isinstance(kind, Float | Text):
        return True
    if isinstance(kind, Choice):
        return all(type(member.value) in (int, str, float) for member in kind.kind)
    if isinstance(kind, Optional_ | ListOf):
        return native(kind.inner, seen)
    if isinstance(kind, TupleOf):
        kinds = [kind.rest] if kind.rest is not None else kind.items or []
        return all(native(k, seen) for k in kinds)
    if isinstance(kind, Nested):
        if id(kind) in seen:
            return True
        seen.add(id(kind))
        return all(native(f.kind, seen) for f in kind.fields)
    return kind.native_form()

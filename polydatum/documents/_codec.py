"""Documents as JSON text with type tags, and back. Never pickle.

Plain JSON carries None, bools, ints, finite floats, strings, lists and dicts
with str keys. Everything else becomes a dict whose one ``$``-key names the
type (a user's own key that starts with ``$`` is stored with a second ``$``):

==========================  ==================================================
``datetime`` (aware)        ``{"$datetime": "<UTC, fixed width>Z", "tz": "Europe/Paris"}``
                            (``tz``: a ZoneInfo key, or a fixed offset in seconds)
``datetime`` (naive)        ``{"$datetime": "2024-05-01T09:30:00.000000"}``
``date``, ``time``          ``{"$date": "2024-05-01"}``, ``{"$time": "09:30:00"}``
``timedelta``               ``{"$timedelta": [days, seconds, microseconds]}``
``Decimal``, ``UUID``       ``{"$decimal": "1.50"}``, ``{"$uuid": "..."}``
``bytes``                   ``{"$bytes": "<base64>"}``
``set``, ``frozenset``,     ``{"$set": [...]}``, ``{"$frozenset": [...]}``,
``tuple``                   ``{"$tuple": [...]}``
``Enum`` member             ``{"$enum": "module.Class", "value": ...}``
dataclass                   ``{"$dataclass": "module.Class", "field": ..., ...}``
==========================  ==================================================

Aware datetimes are stored as their UTC instant in fixed width, so the text
sorts as the instants do: that is what a datetime index compares. Enums and
dataclasses are rebuilt only from classes the collection was told about
(its document type and what its fields name, plus ``types=``): a stored name
never makes the codec import anything.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import json
import math
import typing
import uuid
import zoneinfo
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

from polydatum.errors import InvalidInput

_UTC = dt.timezone.utc
_SIMPLE = (str, int, bool, type(None))


class Unbuildable(TypeError):
    """A stored Enum or dataclass the collection was not told about, or cannot rebuild from its fields."""


class _Refused(Exception):
    """Raised deep in the walk; each container on the way out adds its key to ``path``."""

    def __init__(self, problem: str, kind: type[Exception]) -> None:
        super().__init__(problem)
        self.problem = problem
        self.kind = kind
        self.path: list[str | int] = []


def _type_name(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def classes_of(root: type[Any] | None, extra: Iterable[type[Any]]) -> dict[str, type[Any]]:
    """The dataclasses and Enums ``root`` names in its fields (recursively), and ``extra``, by name."""
    found: dict[str, type[Any]] = {}
    todo: list[Any] = [root, *extra]
    while todo:
        hint = todo.pop()
        if hint is None:
            continue
        todo.extend(typing.get_args(hint))
        if not isinstance(hint, type):
            continue
        is_data = dataclasses.is_dataclass(hint)
        if not (is_data or issubclass(hint, enum.Enum)):
            continue
        name = _type_name(hint)
        if found.get(name) is hint:
            continue
        found[name] = hint
        if is_data:
            try:
                todo.extend(typing.get_type_hints(hint).values())
            except (NameError, TypeError):  # an unresolved forward reference: name it in types=
                pass
    return found


class Codec:
    """Encodes and decodes the documents of one collection.

    Args:
        classes: the dataclasses and Enums it may write and rebuild, by name
            (see :func:`classes_of`).
        max_size: the largest encoded document, in bytes of UTF-8.
    """

    def __init__(self, classes: dict[str, type[Any]], max_size: int) -> None:
        self.classes = classes
        self.known = frozenset(classes.values())
        self.max_size = max_size
        self._fields: dict[type[Any], tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._tags: dict[str, Callable[[dict[str, Any]], Any]] = {
            "$datetime": _datetime,
            "$date": lambda d: dt.date.fromisoformat(d["$date"]),
            "$time": lambda d: dt.time.fromisoformat(d["$time"]),
            "$timedelta": lambda d: dt.timedelta(*d["$timedelta"]),
            "$decimal": lambda d: Decimal(d["$decimal"]),
            "$uuid": lambda d: uuid.UUID(d["$uuid"]),
            "$bytes": lambda d: base64.b64decode(d["$bytes"], validate=True),
            "$set": lambda d: set(d["$set"]),
            "$frozenset": lambda d: frozenset(d["$frozenset"]),
            "$tuple": lambda d: tuple(d["$tuple"]),
            "$enum": self._enum,
            "$dataclass": self._dataclass,
        }

    # -- encoding

    def encode(self, value: Any, where: str) -> str:
        """``value`` as JSON text (:meth:`tree`, then :meth:`dumps`)."""
        return self.dumps(self.tree(value, where), value, where)

    def tree(self, value: Any, where: str) -> Any:
        """``value`` as plain JSON values, tagged where JSON has no type for it.

        Raises:
            TypeError: a value no tag covers, or a class the collection does
                not know; the message names its path in the document.
            InvalidInput: a float that is not finite.
        """
        try:
            return self._encode(value)
        except _Refused as refused:
            raise refused.kind(f"{where}: {_render(refused.path)} {refused.problem}") from None

    def dumps(self, tree: Any, value: Any, where: str) -> str:
        """``tree`` (made by :meth:`tree` from ``value``) as JSON text.

        Raises:
            InvalidInput: a str with NUL or a lone surrogate (named by its
                path), or a document larger than ``max_size``.
        """
        text = json.dumps(tree, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        try:
            data = text.encode("utf-8")
            if "\\u0000" in text:  # rare: look for a real NUL (PostgreSQL's jsonb refuses it)
                self._check_strings(value)
        except UnicodeEncodeError:
            data = b""
            try:
                self._check_strings(value)
            except _Refused as refused:
                raise refused.kind(f"{where}: {_render(refused.path)} {refused.problem}") from None
        except _Refused as refused:
            raise refused.kind(f"{where}: {_render(refused.path)} {refused.problem}") from None
        if len(data) > self.max_size:
            msg = (
                f"{where}: the document is {len(data)} bytes as JSON, over this collection's "
                f"limit of {self.max_size}; store large content in a blob and keep its key here"
            )
            raise InvalidInput(msg)
        return text

    def _encode(self, value: Any) -> Any:
        kind = type(value)
        if kind in _SIMPLE:
            return value
        if kind is float:
            if not math.isfinite(value):
                raise _Refused(f"is {value!r}, which JSON cannot carry", InvalidInput)
            return value
        if kind is dict:
            out: dict[str, Any] = {}
            key: Any = None
            try:
                for key, item in value.items():
                    if type(key) is not str:
                        key = None
                        msg = "has a key that is not a str; document keys are strings"
                        raise _Refused(msg, TypeError)
                    out["$" + key if key[:1] == "$" else key] = self._encode(item)
            except _Refused as refused:
                if key is not None:
                    refused.path.append(key)
                raise
            return out
        if kind is list:
            return self._items(value)
        return self._tagged(value)

    def _items(self, value: Iterable[Any]) -> list[Any]:
        out: list[Any] = []
        try:
            for item in value:
                out.append(self._encode(item))
        except _Refused as refused:
            refused.path.append(len(out))
            raise
        return out

    def _tagged(self, value: Any) -> Any:
        if isinstance(value, enum.Enum):
            cls = type(value)
            self._check_known(cls)
            try:
                return {"$enum": _type_name(cls), "value": self._encode(value.value)}
            except _Refused as refused:
                refused.path.append("value")
                raise
        if isinstance(value, dt.datetime):
            return _encode_datetime(value)
        if isinstance(value, dt.date):
            return {"$date": value.isoformat()}
        if isinstance(value, dt.time):
            if value.tzinfo is not None and not isinstance(value.tzinfo, dt.timezone):
                msg = "is a time with a non-fixed tzinfo, which has no offset without a date"
                raise _Refused(msg, TypeError)
            return {"$time": value.isoformat()}
        if isinstance(value, dt.timedelta):
            return {"$timedelta": [value.days, value.seconds, value.microseconds]}
        if isinstance(value, Decimal):
            return {"$decimal": str(value)}
        if isinstance(value, uuid.UUID):
            return {"$uuid": str(value)}
        if isinstance(value, bytes):
            return {"$bytes": base64.b64encode(value).decode("ascii")}
        if isinstance(value, (set, frozenset)):
            tag = "$frozenset" if isinstance(value, frozenset) else "$set"
            return {tag: self._items(_stable(value))}
        if isinstance(value, tuple):
            return {"$tuple": self._items(value)}
        if isinstance(value, list):
            return self._items(value)
        if isinstance(value, dict):
            return self._encode(dict(value))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return self._encode_dataclass(value)
        msg = (
            f"is of type {type(value).__qualname__}, which a document cannot hold; store str, int, float, "
            "bool, None, lists, dicts with str keys, datetimes, dates, times, timedeltas, Decimals, "
            "UUIDs, bytes, sets, tuples, Enums or dataclasses"
        )
        raise _Refused(msg, TypeError)

    def _encode_dataclass(self, value: Any) -> dict[str, Any]:
        cls = type(value)
        self._check_known(cls)
        out: dict[str, Any] = {"$dataclass": _type_name(cls)}
        name = None
        try:
            for name in self._field_names(cls)[0]:
                out[name] = self._encode(getattr(value, name))
        except _Refused as refused:
            refused.path.append(str(name))
            raise
        return out

    def _field_names(self, cls: type[Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """All field names of a dataclass, and those its ``__init__`` takes."""
        names = self._fields.get(cls)
        if names is None:
            fields = dataclasses.fields(cls)
            names = (tuple(f.name for f in fields), tuple(f.name for f in fields if f.init))
            self._fields[cls] = names
        return names

    def _check_known(self, cls: type[Any]) -> None:
        if cls not in self.known:
            msg = (
                f"is a {cls.__qualname__}, which this collection was not told about, so it could "
                f"not rebuild it; name the class in define(..., types=[{cls.__qualname__}])"
            )
            raise _Refused(msg, TypeError)

    def _check_strings(self, value: Any) -> None:
        """Find the str (or key) holding a NUL or a lone surrogate; the slow path of :meth:`encode`."""
        if isinstance(value, str):
            if "\x00" in value:
                raise _Refused("holds a NUL character, which PostgreSQL's jsonb cannot store", InvalidInput)
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _Refused("holds a lone surrogate, which is not valid Unicode", InvalidInput) from None
            return
        if isinstance(value, enum.Enum):
            self._check_strings(value.value)
            return
        if isinstance(value, dict):
            children: Iterable[tuple[Any, Any]] = [(k, k) for k in value] + list(value.items())
        elif isinstance(value, (list, tuple)):
            children = enumerate(value)
        elif isinstance(value, (set, frozenset)):
            children = enumerate(_stable(value))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            children = [(n, getattr(value, n)) for n in self._field_names(type(value))[0]]
        else:
            return
        for key, child in children:
            try:
                self._check_strings(child)
            except _Refused as refused:
                refused.path.append(key)
                raise

    # -- decoding

    def decode(self, text: str) -> Any:
        """The value :meth:`encode` turned into ``text``.

        Raises:
            TypeError: it names a class the collection does not know, or one
                that cannot be built from the stored fields.
            ValueError: a tag holds something it never writes.
        """
        if '"$' not in text:  # no tag and no escaped key: the C decoder alone, no hook per object
            return json.loads(text)
        return json.loads(text, object_hook=self._hook)

    def _hook(self, obj: dict[str, Any]) -> Any:
        escaped = False
        for key in obj:
            if key[:1] == "$":
                if key[:2] != "$$":
                    decode = self._tags.get(key)
                    if decode is None:
                        msg = f"unknown type tag {key!r} in a stored document"
                        raise ValueError(msg)
                    try:
                        return decode(obj)
                    except Unbuildable:
                        raise
                    except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
                        # binascii.Error and ZoneInfoNotFoundError are among these too.
                        msg = f"a stored {key} value is damaged ({type(exc).__name__})"
                        raise ValueError(msg) from None
                escaped = True
        if escaped:
            return {k[1:] if k[:2] == "$$" else k: v for k, v in obj.items()}
        return obj

    def _class(self, name: Any, tag: str) -> type[Any]:
        cls = self.classes.get(name) if isinstance(name, str) else None
        if cls is None:
            shown = str(name).rpartition(".")[2][:60]
            msg = (
                f"a stored document holds a {shown} ({tag}), which this collection does not know; "
                f"name the class in define(..., types=[{shown}])"
            )
            raise Unbuildable(msg)
        return cls

    def _enum(self, obj: dict[str, Any]) -> Any:
        return self._class(obj["$enum"], "$enum")(obj["value"])

    def _dataclass(self, obj: dict[str, Any]) -> Any:
        cls = self._class(obj["$dataclass"], "$dataclass")
        names, init = self._field_names(cls)
        try:
            made = cls(**{n: obj[n] for n in init if n in obj})
        except TypeError as exc:
            msg = f"a stored {cls.__qualname__} cannot be rebuilt from its fields: {exc}"
            raise Unbuildable(msg) from None
        for name in names:
            if name not in init and name in obj:
                object.__setattr__(made, name, obj[name])  # works for frozen classes too
        return made


def _encode_datetime(value: dt.datetime) -> dict[str, Any]:
    tz = value.tzinfo
    if tz is None or value.utcoffset() is None:
        return {"$datetime": value.replace(tzinfo=None).isoformat(timespec="microseconds")}
    if isinstance(tz, zoneinfo.ZoneInfo) and tz.key is not None:
        zone: str | int = tz.key
    elif isinstance(tz, dt.timezone):
        offset = tz.utcoffset(None)
        if offset.microseconds:
            raise _Refused("has a UTC offset with microseconds, which is not stored", TypeError)
        zone = offset.days * 86400 + offset.seconds
    else:
        msg = (
            f"has a tzinfo of type {type(tz).__qualname__}, which cannot be rebuilt; "
            "use zoneinfo.ZoneInfo or datetime.timezone"
        )
        raise _Refused(msg, TypeError)
    try:
        utc = value.astimezone(_UTC).replace(tzinfo=None)
    except OverflowError:
        raise _Refused("is out of range once converted to UTC", InvalidInput) from None
    return {"$datetime": utc.isoformat(timespec="microseconds") + "Z", "tz": zone}


def utc_text(value: dt.datetime) -> str:
    """What an aware datetime is stored and compared as: its UTC instant, fixed width."""
    return value.astimezone(_UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _datetime(obj: dict[str, Any]) -> dt.datetime:
    text = obj["$datetime"]
    zone = obj.get("tz")
    if zone is None:
        return dt.datetime.fromisoformat(text)
    moment = dt.datetime.fromisoformat(text[:-1]).replace(tzinfo=_UTC)
    tz = zoneinfo.ZoneInfo(zone) if isinstance(zone, str) else dt.timezone(dt.timedelta(seconds=zone))
    return moment.astimezone(tz)


def _stable(items: set[Any] | frozenset[Any]) -> list[Any]:
    """A set's items in sorted order when they sort, so equal sets store the same text."""
    try:
        return sorted(items)
    except TypeError:
        return list(items)


def _render(path: list[str | int]) -> str:
    text = "document"
    for step in reversed(path):
        if isinstance(step, int):
            text += f"[{step}]"
        elif step.isidentifier():
            text += f".{step}"
        else:
            text += f"[{step[:40]!r}]"
    return text

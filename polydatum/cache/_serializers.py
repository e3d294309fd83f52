"""Serializers: values to bytes and back, picked by name."""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from decimal import Decimal
from typing import Any, Protocol, cast, runtime_checkable

from polydatum.cache._errors import SerializationError


@runtime_checkable
class Serializer(Protocol):
    """**Protocol:** turns values into bytes and back.

    ``tag`` is one byte stored in front of every value, so values of another
    serializer are recognised as foreign. It must not be a digit or ``-``
    (those start plain integer counters).

    .. versionadded:: 2.0
    """

    name: str
    tag: bytes

    def dumps(self, value: Any) -> bytes:
        """Serialize ``value``; raise :class:`SerializationError` naming what is unsupported."""

    def loads(self, data: bytes) -> Any:
        """Deserialize bytes written by :meth:`dumps`; raise anything on corrupt input."""


def _unsupported(value: object, serializer: str, hint: str) -> SerializationError:
    kind = type(value)
    msg = (
        f"cannot serialize a value of type {kind.__module__}.{kind.__qualname__} with the "
        f"{serializer!r} serializer; {hint}"
    )
    return SerializationError(msg)


_JSON_HINT = (
    "it supports None, bool, int, float, str, bytes, list, tuple, set, frozenset, dict, "
    "datetime, date, time, Decimal and UUID; convert the value first, or use "
    "serializer='pickle' for trusted data only"
)


def _to_json(value: Any) -> Any:
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is list:
        return [_to_json(item) for item in value]
    if kind is dict:
        if all(type(k) is str for k in value):
            # A "$" key is escaped with a second "$" so it never reads as a type tag.
            return {("$" + k if k[:1] == "$" else k): _to_json(v) for k, v in value.items()}
        return {"$map": [[_to_json(k), _to_json(v)] for k, v in value.items()]}
    if kind is datetime:
        return {"$dt": value.isoformat()}
    if kind is date:
        return {"$date": value.isoformat()}
    if kind is dt_time:
        return {"$time": value.isoformat()}
    if kind is Decimal:
        return {"$dec": str(value)}
    if kind is uuid.UUID:
        return {"$uuid": str(value)}
    if kind is bytes:
        return {"$b64": base64.b64encode(value).decode("ascii")}
    if kind is tuple:
        return {"$tuple": [_to_json(item) for item in value]}
    if kind is set:
        return {"$set": [_to_json(item) for item in value]}
    if kind is frozenset:
        return {"$fset": [_to_json(item) for item in value]}
    raise _unsupported(value, "json", _JSON_HINT)


def _exact_offset(text: str) -> timezone | None:
    """The UTC offset at the end of an ISO string, when it has a fraction of a second.

    ``fromisoformat`` before Python 3.12 drops the microseconds of an offset
    such as ``+00:00:00.000001``; parse such offsets here instead.
    """
    cut = max(text.rfind("+"), text.rfind("-"))
    offset = text[cut:] if cut > 0 and text.find(":", cut) > 0 else ""
    if "." not in offset:
        return None
    hours, minutes, seconds = offset[1:].split(":")
    whole, _, fraction = seconds.partition(".")
    delta = timedelta(
        hours=int(hours), minutes=int(minutes), seconds=int(whole), microseconds=int(fraction.ljust(6, "0"))
    )
    return timezone(-delta if offset[0] == "-" else delta)


def _datetime_from_iso(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    tz = _exact_offset(text) if value.tzinfo is not None else None
    return value if tz is None else value.replace(tzinfo=tz)


def _time_from_iso(text: str) -> dt_time:
    value = dt_time.fromisoformat(text)
    tz = _exact_offset(text) if value.tzinfo is not None else None
    return value if tz is None else value.replace(tzinfo=tz)


_JSON_DECODERS: dict[str, Callable[[Any], Any]] = {
    "$dt": _datetime_from_iso,
    "$date": date.fromisoformat,
    "$time": _time_from_iso,
    "$dec": Decimal,
    "$uuid": uuid.UUID,
    "$b64": lambda s: base64.b64decode(s, validate=True),
    "$tuple": tuple,
    "$set": set,
    "$fset": frozenset,
    "$map": dict,
}


def _json_object(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        ((key, value),) = obj.items()
        if key[:1] == "$" and key[1:2] != "$":
            try:
                decode = _JSON_DECODERS[key]
            except KeyError:
                msg = f"unknown type tag {key!r}"
                raise ValueError(msg) from None
            return decode(value)
    for key in obj:
        if key[:1] == "$":
            return {(k[1:] if k[:1] == "$" else k): v for k, v in obj.items()}
    return obj


class JSONSerializer:
    """JSON, extended so the common Python value types round-trip exactly.

    Supported: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``,
    ``list``, ``tuple``, ``set``, ``frozenset``, ``dict`` (any hashable
    supported keys), ``datetime``, ``date``, ``time``, ``Decimal``, ``UUID``.
    Subclasses (enums, ``OrderedDict``...) are refused rather than silently
    turned into their base type. Aware datetimes come back with a fixed UTC
    offset as their ``tzinfo``.

    .. versionadded:: 2.0
    """

    name = "json"
    tag = b"j"

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
        self._decoder = json.JSONDecoder(object_hook=_json_object)

    def dumps(self, value: Any) -> bytes:
        """Serialize ``value`` to UTF-8 JSON."""
        try:
            plain = _to_json(value)
        except RecursionError:
            msg = "the value is nested too deeply, or contains itself (json cannot store it)"
            raise SerializationError(msg) from None
        try:
            return self._encoder.encode(plain).encode()
        except UnicodeEncodeError:
            return ascii_json(plain)

    def loads(self, data: bytes) -> Any:
        """Deserialize UTF-8 JSON written by :meth:`dumps`."""
        return self._decoder.decode(data.decode())


def ascii_json(plain: Any) -> bytes:
    """JSON with every non-ASCII character escaped: what a str holding a lone surrogate needs.

    UTF-8 cannot encode a lone surrogate (``"\\udcff"`` from a JSON body or
    ``surrogateescape``), but JSON's ``\\u`` escape writes it, and reading
    it back gives the same str.
    """
    return json.dumps(plain, separators=(",", ":"), ensure_ascii=True).encode()


class PickleSerializer:
    """:mod:`pickle`: any picklable object. Use only for data you wrote yourself.

    Unpickling runs code chosen by whoever wrote the bytes, so a cache using
    it must sit on a Redis only your application can write to.

    .. versionadded:: 2.0
    """

    name = "pickle"
    tag = b"p"

    def dumps(self, value: Any) -> bytes:
        """Pickle ``value`` with the highest protocol."""
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise _unsupported(value, "pickle", f"it is not picklable ({exc})") from None

    def loads(self, data: bytes) -> Any:
        """Unpickle bytes written by :meth:`dumps`."""
        return pickle.loads(data)


# msgpack extension codes for the types it lacks natively.
_EXT_CODES: dict[type, int] = {
    datetime: 1,
    date: 2,
    dt_time: 3,
    Decimal: 4,
    uuid.UUID: 5,
    tuple: 6,
    set: 7,
    frozenset: 8,
    int: 9,
}


_EXT_PARSERS: dict[int, Callable[[str], Any]] = {
    1: _datetime_from_iso,
    2: date.fromisoformat,
    3: _time_from_iso,
    4: Decimal,
    9: int,
}


class MsgpackSerializer:
    """msgpack, with the same supported types as :class:`JSONSerializer`.

    Needs the ``msgpack`` package: ``pip install "polydatum[msgpack]"``.

    .. versionadded:: 2.0
    """

    name = "msgpack"
    tag = b"m"

    def __init__(self) -> None:
        try:
            import msgpack
        except ImportError:
            msg = (
                'serializer="msgpack" needs the msgpack package; install it with: '
                'pip install "polydatum[msgpack]"'
            )
            raise ImportError(msg) from None
        self._msgpack = msgpack

    def _default(self, value: Any) -> Any:
        code = _EXT_CODES.get(type(value))
        if code is None:
            raise _unsupported(value, "msgpack", _JSON_HINT.replace("JSON", "msgpack"))
        if code in (6, 7, 8):
            payload = self.dumps(list(value))
        elif code == 5:
            payload = value.bytes
        else:  # ISO text for dates and times, str() for Decimal and integers past 64 bits
            payload = (value.isoformat() if code <= 3 else str(value)).encode()
        return self._msgpack.ExtType(code, payload)

    def _ext_hook(self, code: int, payload: bytes) -> Any:
        if code in (6, 7, 8):
            return (tuple, set, frozenset)[code - 6](self.loads(payload))
        if code == 5:
            return uuid.UUID(bytes=payload)
        return _EXT_PARSERS[code](payload.decode())

    def dumps(self, value: Any) -> bytes:
        """Serialize ``value`` to msgpack."""
        try:
            return cast(
                bytes,
                self._msgpack.packb(value, default=self._default, strict_types=True),
            )
        except SerializationError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise _unsupported(value, "msgpack", str(exc)) from None

    def loads(self, data: bytes) -> Any:
        """Deserialize msgpack written by :meth:`dumps`."""
        return self._msgpack.unpackb(data, ext_hook=self._ext_hook, strict_map_key=False, raw=False)


_SERIALIZERS: dict[str, Callable[[], Serializer]] = {
    "json": JSONSerializer,
    "msgpack": MsgpackSerializer,
    "pickle": PickleSerializer,
}


def register_serializer(name: str, factory: Callable[[], Serializer]) -> None:
    """Make a serializer available by name to ``Cache(serializer=name)``.

    Args:
        name: the name caches ask for.
        factory: called (without arguments) once per cache that uses it.

    Raises:
        ValueError: ``name`` is taken.

    .. versionadded:: 2.0
    """
    if name in _SERIALIZERS:
        msg = f"a serializer named {name!r} is already registered; pick another name"
        raise ValueError(msg)
    _SERIALIZERS[name] = factory


def get_serializer(name: str) -> Serializer:
    """Return a new instance of the serializer registered as ``name``.

    Raises:
        ValueError: no serializer has that name; the message lists the known ones.

    .. versionadded:: 2.0
    """
    try:
        factory = _SERIALIZERS[name]
    except KeyError:
        known = ", ".join(sorted(_SERIALIZERS))
        msg = f"unknown serializer {name!r}; known: {known} (add one with register_serializer)"
        raise ValueError(msg) from None
    serializer = factory()
    tag = serializer.tag
    if len(tag) != 1 or tag in b"-0123456789":
        msg = f"serializer {name!r} has tag {tag!r}; use one byte that is not a digit or '-'"
        raise ValueError(msg)
    return serializer

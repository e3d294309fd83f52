"""Protocol Buffers: a cache serializer for one message type
==========================================================

:class:`ProtobufSerializer` stores values as one protobuf message type, the
most compact of the serializers for records with a fixed shape::

    from polydatum.cache import Cache, register_serializer
    from polydatum.protobuf import ProtobufSerializer

    from myapp.users_pb2 import User

    register_serializer("protobuf.user", ProtobufSerializer(User))
    cache = Cache(namespace="users", serializer="protobuf.user")
    cache.set("user:1", {"id": 1, "name": "Ada", "tags": ["admin"]})
    cache.get("user:1")   # {"id": 1, "name": "Ada", "tags": ["admin"], ...}

It stores a message of its type, a mapping of field names to values or a
dataclass instance (nested messages as mappings too); it reads back a dict of
every field (``as_message=True``: the message itself). A value a field
cannot hold raises :class:`~polydatum.cache.SerializationError` naming the
field. Needs ``pip install "polydatum[protobuf]"``.

.. versionadded:: 2.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

try:
    from google.protobuf import message_factory
    from google.protobuf.message import DecodeError, EncodeError, Message
except ImportError:  # pragma: no cover - exercised only without the extra
    msg = 'polydatum.protobuf needs the protobuf package; install it with: pip install "polydatum[protobuf]"'
    raise ImportError(msg) from None

from polydatum.cache import SerializationError

__all__ = ["ProtobufSerializer"]


def _repeated(field: Any) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 5.28; .label is deprecated there
    if flag is not None:
        return bool(flag)
    return bool(field.label == field.LABEL_REPEATED)


def _is_map(field: Any) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


class ProtobufSerializer:
    """A :class:`~polydatum.cache.Serializer` for values of one protobuf message type.

    An instance is its own factory (calling it returns it), so it can be
    passed straight to :func:`~polydatum.cache.register_serializer`.

    Args:
        message_type: the generated (or ``message_factory``-made) message class.
        as_message: :meth:`loads` returns a message instead of a dict.
        tag: the one byte stored in front of each value (see
            :class:`~polydatum.cache.Serializer`).

    .. versionadded:: 2.0
    """

    tag: bytes

    def __init__(self, message_type: type[Message], *, as_message: bool = False, tag: bytes = b"P") -> None:
        if not (isinstance(message_type, type) and issubclass(message_type, Message)):
            msg = f"ProtobufSerializer takes a protobuf message class, got {message_type!r}"
            raise TypeError(msg)
        self.message_type = message_type
        self.as_message = as_message
        self.tag = tag
        self.name = f"protobuf:{message_type.DESCRIPTOR.full_name}"

    def __call__(self) -> ProtobufSerializer:
        """This serializer: an instance is its own factory for ``register_serializer``."""
        return self

    def __repr__(self) -> str:
        return f"<ProtobufSerializer {self.message_type.DESCRIPTOR.full_name}>"

    # -- encoding ------------------------------------------------------------------

    def dumps(self, value: Any) -> bytes:
        """Serialize a message, a mapping of fields or a dataclass.

        Raises:
            SerializationError: the value is none of those, names an unknown
                field, or holds a value its field cannot; the message names the field.
        """
        message = self._message(value)
        try:
            return bytes(message.SerializeToString(deterministic=True))
        except EncodeError as exc:  # a required field left unset (proto2)
            msg = f"cannot serialize {self.message_type.DESCRIPTOR.full_name}: {exc}"
            raise SerializationError(msg) from None

    def _message(self, value: Any) -> Message:
        if isinstance(value, self.message_type):
            return value
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if not isinstance(value, Mapping):
            kind = type(value)
            msg = (
                f"the {self.name!r} serializer stores a {self.message_type.__name__} message, a "
                f"mapping of its fields or a dataclass, not {kind.__module__}.{kind.__qualname__}"
            )
            raise SerializationError(msg)
        return self._build(self.message_type, value, "")

    def _build(self, cls: Any, fields: Mapping[str, Any], path: str) -> Message:
        message = cls()
        descriptor = cls.DESCRIPTOR
        for name, value in fields.items():
            field = descriptor.fields_by_name.get(name) if isinstance(name, str) else None
            where = f"{path}{name}"
            if field is None:
                known = ", ".join(f.name for f in descriptor.fields)
                msg = (
                    f"{self.message_type.DESCRIPTOR.full_name} has no field {where!r} "
                    f"(in {descriptor.full_name}: {known})"
                )
                raise SerializationError(msg)
            if value is None:
                continue  # left unset
            try:
                self._set(message, field, value, where)
            except SerializationError:
                raise
            except (TypeError, ValueError, AttributeError) as exc:
                kind = type(value)
                msg = (
                    f"cannot store a value of type {kind.__module__}.{kind.__qualname__} in field "
                    f"{where!r} of {self.message_type.DESCRIPTOR.full_name} ({exc})"
                )
                raise SerializationError(msg) from None
        return message

    def _set(self, message: Any, field: Any, value: Any, where: str) -> None:
        target: Any = getattr(message, field.name) if _repeated(field) or field.message_type else None
        if _is_map(field):
            entry = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                if entry.message_type is not None:
                    target[key].CopyFrom(self._sub(entry.message_type, item, f"{where}[{key!r}]."))
                else:
                    target[key] = item
        elif _repeated(field):
            if isinstance(value, str | bytes | Mapping):
                msg = f"a list, got {type(value).__name__}"
                raise TypeError(msg)
            for i, item in enumerate(value):
                if field.message_type is not None:
                    target.add().CopyFrom(self._sub(field.message_type, item, f"{where}[{i}]."))
                else:
                    target.append(item)
        elif field.message_type is not None:
            target.CopyFrom(self._sub(field.message_type, value, f"{where}."))
        else:
            setattr(message, field.name, value)

    def _sub(self, descriptor: Any, value: Any, path: str) -> Message:
        if isinstance(value, Message):
            return value
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if not isinstance(value, Mapping):
            msg = f"a {descriptor.name} message or a mapping of its fields, got {type(value).__name__}"
            raise TypeError(msg)
        return self._build(message_factory.GetMessageClass(descriptor), value, path)

    # -- decoding ------------------------------------------------------------------

    def loads(self, data: bytes) -> Any:
        """A dict of every field (unset messages as None), or the message with ``as_message``."""
        try:
            message = self.message_type.FromString(data)
        except DecodeError as exc:
            msg = f"not a {self.message_type.DESCRIPTOR.full_name} message: {exc}"
            raise ValueError(msg) from None
        return message if self.as_message else _to_dict(message)


def _to_dict(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if _is_map(field):
            entry = field.message_type.fields_by_name["value"]
            out[field.name] = {
                k: _to_dict(v) if entry.message_type is not None else v for k, v in value.items()
            }
        elif _repeated(field):
            out[field.name] = [_to_dict(v) if field.message_type is not None else v for v in value]
        elif field.message_type is not None:
            out[field.name] = _to_dict(value) if message.HasField(field.name) else None
        else:
            out[field.name] = value
    return out

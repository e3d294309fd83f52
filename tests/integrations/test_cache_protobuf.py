"""ProtobufSerializer, on a message type built at test time (descriptor_pb2, no protoc)."""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from polydatum.cache import Cache, SerializationError, _serializers, register_serializer
from polydatum.protobuf import ProtobufSerializer

F = descriptor_pb2.FieldDescriptorProto


def _message_types() -> tuple[Any, Any]:
    """test.User {id, name, active, score, avatar, tags[], address: Address, labels: map}."""
    proto = descriptor_pb2.FileDescriptorProto(name=f"user_{uuid.uuid4().hex}.proto", package="test")
    proto.syntax = "proto3"
    address = proto.message_type.add(name="Address")
    address.field.add(name="city", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    address.field.add(name="zip", number=2, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    user = proto.message_type.add(name="User")
    user.field.add(name="id", number=1, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    user.field.add(name="name", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    user.field.add(name="active", number=3, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    user.field.add(name="score", number=4, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    user.field.add(name="avatar", number=5, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL)
    user.field.add(name="tags", number=6, type=F.TYPE_STRING, label=F.LABEL_REPEATED)
    user.field.add(
        name="address", number=7, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, type_name=".test.Address"
    )
    user.field.add(
        name="past", number=8, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED, type_name=".test.Address"
    )
    entry = user.nested_type.add(name="LabelsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    user.field.add(
        name="labels",
        number=9,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=".test.User.LabelsEntry",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    make = message_factory.GetMessageClass
    return make(pool.FindMessageTypeByName("test.User")), make(pool.FindMessageTypeByName("test.Address"))


UserMessage, AddressMessage = _message_types()

RECORD = {
    "id": 2**40,
    "name": "Ada",
    "active": True,
    "score": 2.5,
    "avatar": b"\x89PNG",
    "tags": ["admin", "ops"],
    "address": {"city": "London", "zip": 12},
    "past": [{"city": "Paris", "zip": 75}],
    "labels": {"a": 1},
}


@pytest.fixture(name="registered")
def _registered(monkeypatch: pytest.MonkeyPatch) -> str:
    """ "protobuf.user" registered for this test only (the registry is global)."""
    monkeypatch.setattr(_serializers, "_SERIALIZERS", dict(_serializers._SERIALIZERS))
    register_serializer("protobuf.user", ProtobufSerializer(UserMessage))
    return "protobuf.user"


class TestRoundTrip:
    def test_a_cache_stores_records_by_name(self, registered: str) -> None:
        """register_serializer("protobuf.user", ProtobufSerializer(User)); the record comes back as a dict."""
        cache = Cache(namespace="users", serializer=registered)
        cache.set("user:1", RECORD)
        assert cache.get("user:1") == RECORD
        raw = cache.backend.get(cache.key("user:1"))
        assert raw is not None
        assert raw[:1] == b"P"
        assert UserMessage.FromString(raw[1:]).address.city == "London"

    def test_messages_and_dataclasses_are_stored_too(self) -> None:
        """A message of the type, or a dataclass with its fields; unset fields read as defaults."""

        @dataclasses.dataclass
        class User:
            id: int
            name: str
            address: Any = None

        serializer = ProtobufSerializer(UserMessage)
        got = serializer.loads(serializer.dumps(User(1, "Bo")))
        assert (got["id"], got["name"], got["address"], got["tags"]) == (1, "Bo", None, [])
        message = UserMessage(id=3)
        assert serializer.loads(serializer.dumps(message))["id"] == 3
        as_message = ProtobufSerializer(UserMessage, as_message=True)
        assert as_message.loads(as_message.dumps({"id": 4})) == UserMessage(id=4)
        assert as_message() is as_message
        assert "test.User" in repr(as_message)


class TestBadInput:
    @pytest.mark.parametrize(
        ("record", "field"),
        [
            ({"id": "seven"}, "'id'"),
            ({"active": "yes"}, "'active'"),
            ({"tags": "admin"}, "'tags'"),
            ({"tags": [1]}, "'tags'"),
            ({"address": {"zip": "x"}}, "'address.zip'"),
            ({"past": [{"city": 5}]}, "'past[0].city'"),
            ({"address": 5}, "'address'"),
            ({"labels": {"a": "b"}}, "'labels'"),
            ({"id": 2**70}, "'id'"),
        ],
    )
    def test_a_value_a_field_cannot_hold_names_the_field(self, record: dict[str, Any], field: str) -> None:
        """SerializationError (a TypeError) names the field, the message type and the value's type."""
        with pytest.raises(SerializationError, match=re.escape(field)) as info:
            ProtobufSerializer(UserMessage).dumps(record)
        assert "test.User" in str(info.value)
        assert isinstance(info.value, TypeError)

    def test_unknown_field_is_named(self) -> None:
        """A field the message lacks is refused, listing the ones it has."""
        with pytest.raises(SerializationError, match=r"no field 'nickname'.*id, name"):
            ProtobufSerializer(UserMessage).dumps({"nickname": "x"})
        with pytest.raises(SerializationError, match=r"no field 'address.country'"):
            ProtobufSerializer(UserMessage).dumps({"address": {"country": "UK"}})

    def test_other_values_and_types_are_refused(self) -> None:
        """Not a message, mapping or dataclass: refused; a non-message class is refused up front."""
        with pytest.raises(SerializationError, match=r"builtins\.list"):
            ProtobufSerializer(UserMessage).dumps([1, 2])
        with pytest.raises(TypeError, match="message class"):
            ProtobufSerializer(dict)  # type: ignore[arg-type]

    def test_a_missing_required_field_is_named(self) -> None:
        """proto2: a required field left unset is a SerializationError naming it."""
        proto = descriptor_pb2.FileDescriptorProto(name=f"req_{uuid.uuid4().hex}.proto", package="req")
        proto.syntax = "proto2"
        ticket = proto.message_type.add(name="Ticket")
        ticket.field.add(name="code", number=1, type=F.TYPE_STRING, label=F.LABEL_REQUIRED)
        ticket.field.add(name="note", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(proto)
        Ticket = message_factory.GetMessageClass(pool.FindMessageTypeByName("req.Ticket"))
        with pytest.raises(SerializationError, match=r"req\.Ticket.*code"):
            ProtobufSerializer(Ticket).dumps({"note": "no code"})

    def test_foreign_bytes_are_a_miss_with_a_warning(
        self, registered: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Bytes that do not parse as the message are a cache miss, never an exception."""
        cache = Cache(namespace="users", serializer=registered)
        cache.backend.set(cache.key("k"), b"P\xff\xff\xff", None, "always")
        assert cache.get("k") is None
        assert "does not decode" in caplog.text

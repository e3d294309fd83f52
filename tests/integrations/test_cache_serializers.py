"""Serializers: every supported type round-trips exactly; unsupported ones are named."""

from __future__ import annotations

import enum
import logging
import string
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime, time, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polydatum.cache import (
    Cache,
    JSONSerializer,
    MemoryBackend,
    SerializationError,
    Serializer,
    _serializers,
    get_serializer,
    register_serializer,
)

SERIALIZERS = ["json", "msgpack", "pickle"]

offsets = st.builds(
    timezone,
    st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23)),
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.datetimes(timezones=st.none() | offsets)
    | st.dates()
    | st.times(timezones=st.none() | offsets)
    | st.decimals(allow_nan=False)
    | st.uuids()
)
hashables = st.recursive(
    scalars,
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(alphabet=string.ascii_letters + "$", max_size=4), inner, max_size=4)
        | st.dictionaries(hashables, inner, max_size=3)
        | st.sets(hashables, max_size=3)
        | st.frozensets(hashables, max_size=3)
    ),
    max_leaves=12,
)


def assert_same(a: Any, b: Any) -> None:
    """Equal values of the very same types, all the way down."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    else:
        assert a == b


@pytest.mark.parametrize("name", SERIALIZERS)
@pytest.mark.parametrize(
    "offset",
    [timedelta(microseconds=1), -timedelta(hours=5, seconds=3, microseconds=120), timedelta(0)],
    ids=["plus-1us", "minus-5h3s120us", "utc"],
)
def test_offsets_with_fractions_of_a_second_survive(name: str, offset: timedelta) -> None:
    """datetime.fromisoformat before 3.12 drops an offset's microseconds; ours keep them."""
    serializer = get_serializer(name)
    tz = timezone(offset)
    for value in (datetime(2000, 1, 1, 3, 4, 5, 600, tzinfo=tz), time(3, 4, 5, 7, tzinfo=tz)):
        back = serializer.loads(serializer.dumps(value))
        assert back == value
        assert back.utcoffset() == offset


@pytest.mark.parametrize("name", SERIALIZERS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=values)
def test_every_supported_value_round_trips(name: str, value: Any) -> None:
    """Any mix of the supported types comes back equal and of the same types."""
    serializer = get_serializer(name)
    assert_same(serializer.loads(serializer.dumps(value)), value)


@pytest.mark.parametrize("name", SERIALIZERS)
@settings(max_examples=50, deadline=None)
@given(value=values)
def test_values_round_trip_through_a_cache(name: str, value: Any) -> None:
    """Through Cache.set/get (with the tag and int fast path) values come back the same."""
    cache = Cache(MemoryBackend(), serializer=name)
    cache.set("k", value)
    assert_same(cache.get("k", KeyError), value)


def test_aware_datetimes_keep_their_offset() -> None:
    """An aware datetime comes back with the same UTC offset."""
    from datetime import datetime

    value = datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    back = get_serializer("json").loads(get_serializer("json").dumps(value))
    assert back.utcoffset() == timedelta(hours=2)


def test_dollar_keys_are_not_mistaken_for_type_tags() -> None:
    """A user dict whose only key looks like a type tag stays a dict."""
    serializer = JSONSerializer()
    for value in ({"$dt": "2024-01-01"}, {"$$x": 1}, {"$tuple": [1]}):
        assert serializer.loads(serializer.dumps(value)) == value


class Colour(enum.IntEnum):
    RED = 1


class Opaque:
    pass


@pytest.mark.parametrize("name", ["json", "msgpack"])
@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (Opaque(), "Opaque"),
        (Colour.RED, "Colour"),
        (OrderedDict(a=1), "OrderedDict"),
        (1 + 2j, "complex"),
        ([1, {"deep": object()}], "object"),
        (timedelta(1), "timedelta"),
    ],
)
def test_unsupported_type_raises_naming_it(name: str, value: Any, type_name: str) -> None:
    """An unsupported value raises SerializationError naming its type and what to do."""
    with pytest.raises(SerializationError, match=type_name) as info:
        get_serializer(name).dumps(value)
    assert "convert the value first" in str(info.value)


def test_unpicklable_value_raises_naming_it() -> None:
    """pickle refuses what it cannot pickle, naming the type."""
    with pytest.raises(SerializationError, match="function"):
        get_serializer("pickle").dumps(lambda: 1)


def test_unknown_json_type_tag_is_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    """A JSON value with a type tag this version does not know is a miss, not a crash."""
    cache = Cache()
    cache.backend.set(cache.key("k"), b'j{"$nope":1}', None, "always")
    with caplog.at_level(logging.WARNING, logger="polydatum.cache"):
        assert cache.get("k") is None
    assert "unknown type tag" in caplog.text


class Upper:
    """A toy serializer for the registry tests."""

    name = "upper"
    tag = b"u"

    def dumps(self, value: Any) -> bytes:
        return str(value).upper().encode()

    def loads(self, data: bytes) -> Any:
        return data.decode()


@pytest.fixture(autouse=True)
def _serializer_registry_restored() -> Iterator[None]:
    """Serializers a test registers are gone afterwards: the registry is process-wide."""
    saved = dict(_serializers._SERIALIZERS)
    yield
    _serializers._SERIALIZERS.clear()
    _serializers._SERIALIZERS.update(saved)


def test_register_a_serializer() -> None:
    """A registered serializer is used by name; the name cannot be taken twice."""
    register_serializer("upper-test", Upper)
    cache = Cache(serializer="upper-test")
    cache.set("k", "abc")
    assert cache.get("k") == "ABC"
    assert isinstance(cache.serializer, Serializer)
    with pytest.raises(ValueError, match="already registered"):
        register_serializer("upper-test", Upper)


@pytest.mark.parametrize("tag", [b"7", b"-", b"ab", b""])
def test_serializer_tag_must_be_one_non_digit_byte(tag: bytes) -> None:
    """A tag that could clash with integer counters is refused."""

    class Bad(Upper):
        pass

    Bad.tag = tag
    register_serializer(f"bad-{tag!r}", Bad)
    with pytest.raises(ValueError, match="one byte"):
        get_serializer(f"bad-{tag!r}")


def test_serializer_instance_can_be_passed() -> None:
    """Cache(serializer=...) also takes a serializer object."""
    assert Cache(serializer=Upper()).serializer.name == "upper"


def test_json_keeps_a_lone_surrogate() -> None:
    """A str with a lone surrogate (a JSON body, surrogateescape) round-trips (was a UnicodeEncodeError)."""
    serializer = get_serializer("json")
    value = {"name": "ada\udcff", "plain": "é"}
    data = serializer.dumps(value)
    data.decode("utf-8")  # still valid UTF-8: the surrogate travels as a JSON \u escape
    assert serializer.loads(data) == value


def test_json_refuses_a_value_that_contains_itself() -> None:
    """A self-referencing list is a SerializationError like any unstorable value (it was a RecursionError)."""
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(SerializationError, match="contains itself"):
        get_serializer("json").dumps(looped)

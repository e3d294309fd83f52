"""Cache models on Redis against hand-written redis-py + json and against cacheorm 0.0.1.

Run: .venv/bin/python benchmarks/cache_models.py [--quick]
     (REDIS_URL overrides 127.0.0.1:6379; cacheorm is compared when installed:
     pip install "polydatum[bench]")

The record has 10 fields (int, str, str, int, float, bool, datetime, list of
str, Decimal, UUID). Each side stores the same record and reads it back as
the same dataclass:

1. ``get``: ``models.get(key)`` vs ``client.get`` + ``json.loads`` + the
   conversions a hand-written reader needs (ISO datetimes, Decimal, UUID) +
   the dataclass; cacheorm 0.0.1 has backends and serializers but no models
   yet, so its side is its ``RedisBackend.get`` + its JSON serializer + the
   same conversions. Target: <= cacheorm, within 1.25x of hand-written.
2. ``save``: the reverse (validation included on our side).
3. ``get_many`` of 100 records: one MGET each; hand-written is MGET + decode.
   Target: within 1.2x.
4. Bytes per record: the stored value with json, msgpack and protobuf (a
   message type built here with descriptor_pb2: dates, Decimal and UUID as
   strings, as the models store them), and what Redis says the key takes
   (MEMORY USAGE).

Rounds are short (50 operations) and interleaved, the order of the sides
turning every round so each takes each place as often, and the collector
is off inside a round; ratios are the median of each round's ratio, which
keeps the machine's drift out. The summary line gives polydatum's time over
each other side's.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from polydatum.cache.models import cache_model
from polydatum.redis import Redis

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
QUICK = "--quick" in sys.argv
OPS = 50
ROUNDS = 12 if QUICK else 160
NAMESPACE = f"bench-models-{os.getpid()}"


@cache_model(key="id", namespace="user")
@dataclass
class User:
    id: int
    name: str
    email: str
    age: int
    score: float
    active: bool
    created: datetime
    tags: list[str]
    balance: Decimal
    ref: uuid.UUID


@cache_model(key="id", namespace="user-mp", serializer="msgpack")
@dataclass
class UserMsgpack(User):
    pass


def register_protobuf_user() -> None:
    """The record as a protobuf message, registered as the serializer "protobuf.bench-user"."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    from polydatum.cache import register_serializer
    from polydatum.protobuf import ProtobufSerializer

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="bench_user.proto", package="bench", syntax="proto3")
    message = proto.message_type.add(name="User")
    for number, (name, kind) in enumerate(
        [
            ("id", field.TYPE_INT64),
            ("name", field.TYPE_STRING),
            ("email", field.TYPE_STRING),
            ("age", field.TYPE_INT64),
            ("score", field.TYPE_DOUBLE),
            ("active", field.TYPE_BOOL),
            ("created", field.TYPE_STRING),
            ("tags", field.TYPE_STRING),
            ("balance", field.TYPE_STRING),
            ("ref", field.TYPE_STRING),
        ],
        start=1,
    ):
        label = field.LABEL_REPEATED if name == "tags" else field.LABEL_OPTIONAL
        message.field.add(name=name, number=number, type=kind, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    register_serializer(
        "protobuf.bench-user",
        ProtobufSerializer(message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.User"))),
    )


register_protobuf_user()


@cache_model(key="id", namespace="user-pb", serializer="protobuf.bench-user")
@dataclass
class UserProtobuf(User):
    pass


def a_user(i: int, cls: type[User] = User) -> User:
    """The benchmark's record."""
    return cls(
        id=i,
        name="Ada Lovelace",
        email="ada@example.com",
        age=36,
        score=97.5,
        active=True,
        created=datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc),
        tags=["admin", "author"],
        balance=Decimal("1234.50"),
        ref=uuid.UUID(int=i),
    )


def to_json(user: User) -> bytes:
    """How a hand-written writer stores the record."""
    return json.dumps(
        {
            "id": user.id,
            "name": user.name,
            "email": user.email,
            "age": user.age,
            "score": user.score,
            "active": user.active,
            "created": user.created.isoformat(),
            "tags": user.tags,
            "balance": str(user.balance),
            "ref": str(user.ref),
        },
        separators=(",", ":"),
    ).encode()


def from_json(data: bytes) -> User:
    """How a hand-written reader loads it."""
    return from_dict(json.loads(data))


def from_dict(d: dict[str, Any]) -> User:
    """The record from its decoded JSON (the conversions every hand-written side does)."""
    return User(
        id=d["id"],
        name=d["name"],
        email=d["email"],
        age=d["age"],
        score=d["score"],
        active=d["active"],
        created=datetime.fromisoformat(d["created"]),
        tags=d["tags"],
        balance=Decimal(d["balance"]),
        ref=uuid.UUID(d["ref"]),
    )


def round_us(fn: Callable[[], Any], n: int = OPS) -> float:
    """Wall-clock µs per call over one round (the collector off: it would land on whichever side)."""
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        return (time.perf_counter_ns() - start) / n / 1000
    finally:
        gc.enable()


def compare(sides: dict[str, Callable[[], Any]], n: int = OPS) -> dict[str, list[float]]:
    """µs per call of each side in every round.

    Rounds are short and interleaved, and the order of the sides turns
    every round (each side takes each place as often, forwards and
    backwards), so the machine's drift and whatever ran just before hit
    every side alike.
    """
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for fn in sides.values():  # warm up
        round_us(fn, 20)
    for r in range(ROUNDS):
        turn = r % len(names)
        order = names[turn:] + names[:turn]
        gc.collect()
        for name in order if (r // len(names)) % 2 == 0 else reversed(order):
            times[name].append(round_us(sides[name], n))
    return times


def ratio(times: dict[str, list[float]], side: str, base: str) -> float:
    """The median over the rounds of ``side``'s time over ``base``'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[side], times[base], strict=True))


def main() -> None:
    redis = Redis(REDIS_URL)
    cache = redis.cache(namespace=NAMESPACE)
    client = redis.client()
    models = cache.models(User)
    try:
        import cacheorm.backends
        import cacheorm.serializers

        orm_backend: Any = cacheorm.backends.RedisBackend(client=client)
        orm_json: Any = cacheorm.serializers.JSONSerializer()
    except ImportError:
        orm_backend = orm_json = None

    user = a_user(1)
    models.save(user)
    client.set("hand:user:1", to_json(user))
    if orm_backend is not None:
        orm_backend.set("orm:user:1", orm_json.dumps(json.loads(to_json(user))), ttl=0)

    def orm_get() -> User:
        return from_dict(orm_json.loads(orm_backend.get("orm:user:1")))

    def orm_save() -> None:
        orm_backend.set("orm:user:1", orm_json.dumps(json.loads(to_json(user))), ttl=0)

    assert models.get(1) == from_json(client.get("hand:user:1")) == user  # type: ignore[arg-type]
    gets: dict[str, Callable[[], Any]] = {
        "polydatum": lambda: models.get(1),
        "hand-written": lambda: from_json(client.get("hand:user:1")),  # type: ignore[arg-type]
    }
    saves: dict[str, Callable[[], Any]] = {
        "polydatum": lambda: models.save(user),
        "hand-written": lambda: client.set("hand:user:1", to_json(user)),
    }
    if orm_backend is not None:
        assert orm_get() == user
        gets["cacheorm 0.0.1"] = orm_get
        saves["cacheorm 0.0.1"] = orm_save

    users = [a_user(i) for i in range(100)]
    models.insert_many(users)
    hand_keys = [f"hand:user:{u.id}" for u in users]
    client.mset({k: to_json(u) for k, u in zip(hand_keys, users, strict=True)})
    keys = [u.id for u in users]
    many: dict[str, Callable[[], Any]] = {
        "polydatum": lambda: models.get_many(keys),
        "hand-written": lambda: [from_json(d) for d in client.mget(hand_keys) if d is not None],
    }

    print(f"cache models vs hand-written redis-py + json ({ROUNDS} rounds; µs per operation, median)")
    summary = []
    for title, sides, n in (("get", gets, OPS), ("save", saves, OPS), ("get_many(100)", many, OPS // 4)):
        times = compare(sides, n)
        cells = ", ".join(f"{name} {statistics.median(t):.1f}" for name, t in times.items())
        vs = ", ".join(
            f"{name} {ratio(times, name, 'hand-written'):.2f}x" for name in times if name != "hand-written"
        )
        print(f"  {title:14} {cells}\n  {'':14} ratio to hand-written: {vs}")
        line = f"{title} {ratio(times, 'polydatum', 'hand-written'):.2f}x hand-written"
        if "cacheorm 0.0.1" in times:
            line += f", {ratio(times, 'polydatum', 'cacheorm 0.0.1'):.2f}x cacheorm"
        summary.append(line)
    print("summary, polydatum's time over the other's (<= 1.00x: as fast or faster):")
    print("  " + "; ".join(summary))

    mp = cache.models(UserMsgpack)
    mp.save(a_user(1, UserMsgpack))
    json_bytes = len(client.get(models.key(1)) or b"")
    mp_bytes = len(client.get(mp.key(1)) or b"")
    json_mem = client.memory_usage(models.key(1))
    mp_mem = client.memory_usage(mp.key(1))
    pb = cache.models(UserProtobuf)
    pb.save(a_user(1, UserProtobuf))
    assert pb.get(1) == a_user(1, UserProtobuf)  # it reads back the same record
    pb_bytes = len(client.get(pb.key(1)) or b"")
    pb_mem = client.memory_usage(pb.key(1))
    hand_bytes = len(to_json(user))
    print("bytes per 10-field record (value; Redis MEMORY USAGE of the key)")
    print(f"  json     {json_bytes:4d} B; {json_mem} B   (hand-written json: {hand_bytes} B)")
    print(f"  msgpack  {mp_bytes:4d} B; {mp_mem} B")
    print(f"  protobuf {pb_bytes:4d} B; {pb_mem} B")
    cache.clear()
    client.delete(*hand_keys, "orm:user:1")
    redis.close()


if __name__ == "__main__":
    main()

"""The outbox table and the JSON encoding of payloads."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

#: The longest topic or key an effect may carry.
MAX_NAME = 200


def make_table(metadata: MetaData, name: str) -> Table:
    """The outbox table ``name`` in ``metadata``.

    Times are epoch seconds (a float): the same on SQLite and PostgreSQL, with
    no time zone to get wrong between the writer and the relay.
    """
    return Table(
        name,
        metadata,
        # BIGINT on servers; on SQLite an INTEGER PRIMARY KEY is the rowid, which autoincrements.
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("topic", String(MAX_NAME), nullable=False),
        Column("key", String(MAX_NAME), nullable=True),
        Column("payload", Text, nullable=False),
        Column("created_at", Float, nullable=False),
        Column("available_at", Float, nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("last_error", Text, nullable=True),
        Column("dead", Boolean, nullable=False, default=False),
        Column("lease_owner", String(100), nullable=True),
        Column("lease_until", Float, nullable=True),
        Index(f"ix_{name}_due", "dead", "available_at"),
        Index(f"ix_{name}_key", "key", "id"),
    )


def make_inbox_table(metadata: MetaData, name: str) -> Table:
    """The inbox table ``name``: message ids already run, with when."""
    return Table(
        name,
        metadata,
        Column("message_id", String(MAX_NAME), primary_key=True),
        Column("received_at", Float, nullable=False, index=True),
    )


def encode(payload: Any) -> str:
    """``payload`` as JSON text, or TypeError/ValueError naming the path of what cannot be.

    Refused: values JSON has no type for (a datetime, a set, an object),
    keys that are not str (JSON would turn ``1`` into ``"1"`` silently), and
    floats that are not finite (not JSON).
    """
    _check(payload, "payload")
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _check(value: Any, path: str) -> None:
    # Walked before dumping so the error names where the bad value is; json
    # itself only says "Object of type set is not JSON serializable".
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            msg = f"{path} is {value!r}, which JSON cannot carry; send a finite number or None"
            raise ValueError(msg)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                msg = (
                    f"{path} has a key of type {type(key).__name__} ({key!r}); JSON object keys "
                    f"are strings, convert it before add()"
                )
                raise TypeError(msg)
            _check(item, f"{path}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    msg = (
        f"{path} is a {type(value).__name__}, which JSON cannot carry; convert it to str, "
        f"int, float, bool, None, a list or a dict with str keys before add()"
    )
    raise TypeError(msg)

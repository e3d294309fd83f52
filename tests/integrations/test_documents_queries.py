"""Queries over documents return exactly what a Python filter over the same documents returns (hypothesis)."""

from __future__ import annotations

import datetime as dt
import functools
import uuid
import zoneinfo
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polydatum import DataManager
from polydatum.documents import Definition, Documents
from polydatum.sqlalchemy import Database

INDEXES: dict[str, Any] = {"s": str, "n": int, "f": float, "b": bool, "at": dt.datetime, "tags": list}
ZONES = [dt.timezone.utc, dt.timezone(dt.timedelta(hours=-5)), zoneinfo.ZoneInfo("Europe/Paris")]

texts = st.text(alphabet="aAbé€😀 -", max_size=3)
ints = st.integers(-5, 5) | st.sampled_from([-(2**63), 2**63 - 1])
floats = st.floats(-1e6, 1e6, allow_nan=False, width=64) | st.integers(-3, 3)
moments = st.builds(
    lambda minutes, zone: (
        dt.datetime(2024, 3, 31, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=minutes)
    ).astimezone(zone),
    st.integers(-180, 180).map(lambda m: m * 30),
    st.sampled_from(ZONES),
)
VALUES = {"s": texts, "n": ints, "f": floats, "b": st.booleans(), "at": moments}
tags = st.lists(st.sampled_from(["x", "y", "z"]), max_size=3)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A document where each indexed path is missing, None, or a value of its type."""
    doc: dict[str, Any] = {}
    for name, values in VALUES.items():
        choice = draw(st.sampled_from(["value", "value", "none", "missing"]))
        if choice != "missing":
            doc[name] = draw(values) if choice == "value" else None
    if draw(st.booleans()):
        doc["tags"] = draw(tags)
    return doc


@st.composite
def filters(draw: st.DrawFn) -> dict[str, Any]:
    """Up to two filters on scalar indexes, or a contains on tags."""
    out: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from([*VALUES, "tags"]))
        if name == "tags":
            out["tags__contains"] = draw(st.sampled_from(["x", "y", "z"]))
            continue
        op = draw(st.sampled_from(["eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in", "is_null"]))
        if op == "is_null":
            value: Any = draw(st.booleans())
        elif op in ("in", "not_in"):
            value = draw(st.lists(VALUES[name], min_size=1, max_size=3))
        else:
            value = draw(VALUES[name])
        out[f"{name}__{op}"] = value
    return out


orders = st.lists(st.sampled_from(list(VALUES)), max_size=2, unique=True).flatmap(
    lambda names: st.tuples(*[st.sampled_from([n, "-" + n]) for n in names]).map(list)
)


def sql_value(doc: dict[str, Any], name: str) -> Any:
    """The value SQL compares for ``name``: None when missing, None, or of another type."""
    value = doc.get(name)
    kinds = {"s": (str,), "n": (int,), "f": (int, float), "b": (bool,), "at": (dt.datetime,)}[name]
    if value is None or (isinstance(value, bool) and name != "b") or not isinstance(value, kinds):
        return None
    return value


def matches(doc: dict[str, Any], key: str, value: Any) -> bool:
    name, _, op = key.rpartition("__")
    if name == "tags":
        items = doc.get("tags")
        return isinstance(items, list) and value in items
    have = sql_value(doc, name)
    if op == "is_null":
        return (have is None) is value
    if have is None:
        return False
    tests = {
        "eq": lambda: have == value,
        "ne": lambda: have != value,
        "lt": lambda: have < value,
        "lte": lambda: have <= value,
        "gt": lambda: have > value,
        "gte": lambda: have >= value,
        "in": lambda: have in value,
        "not_in": lambda: have not in value,
    }
    return bool(tests[op]())


def expected(docs: dict[str, dict[str, Any]], where: dict[str, Any], order: list[str]) -> list[str]:
    """The keys a Python filter keeps, in ``order`` (NULLs last either way), ties by key."""
    keys = [k for k, d in docs.items() if all(matches(d, f, v) for f, v in where.items())]

    def compare(a: str, b: str) -> int:
        for spec in order:
            desc = spec.startswith("-")
            name = spec.lstrip("-")
            x, y = sql_value(docs[a], name), sql_value(docs[b], name)
            if x is None or y is None:
                if (x is None) != (y is None):
                    return 1 if x is None else -1
                continue
            if x != y:
                return (1 if x > y else -1) * (-1 if desc else 1)
        return (a > b) - (a < b)

    return sorted(keys, key=functools.cmp_to_key(compare))


@pytest.fixture(name="store", scope="module", params=["sqlite", "postgresql"])
def fixture_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DataManager, Definition[dict[str, Any]], Database]]:
    """One collection with every kind of index, per backend, for the whole module."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('docq') / 'q.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
    db = Database(url)
    dm = DataManager()
    db.install(dm)
    docs = Documents(db, prefix=f"q{uuid.uuid4().hex[:8]}_")
    things = docs.define("things", indexes=INDEXES)
    docs.install(dm)
    docs.create_tables()
    yield dm, things, db
    docs.metadata.drop_all(db.engine)
    db.dispose()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    docs=st.lists(documents(), max_size=10),
    where=filters(),
    order=orders,
    limit=st.integers(1, 4),
)
def test_find_matches_a_python_filter(
    store: tuple[DataManager, Definition[dict[str, Any]], Database],
    docs: list[dict[str, Any]],
    where: dict[str, Any],
    order: list[str],
    limit: int,
) -> None:
    """find() (page by page) and count() agree with the same filter and order computed in Python."""
    dm, things, db = store
    by_key = {f"k{i:02d}": d for i, d in enumerate(docs)}
    with db.engine.begin() as conn:
        conn.execute(things.table.delete())
    with dm.context() as ctx:
        collection = ctx.docs.collection(things)
        for key, doc in by_key.items():
            collection.put(key, doc)
    with dm.context() as ctx:
        collection = ctx.docs.collection(things)
        got: list[str] = []
        after = None
        while True:
            page = collection.find(where, order_by=order, limit=limit, after=after)
            got += [d.key for d in page]
            if page.next_cursor is None:
                break
            after = page.next_cursor
        want = expected(by_key, where, order)
        assert got == want
        assert collection.count(where) == len(want)

"""polydatum.otel's cache, blob and outbox metrics, read back through the real SDK's in-memory reader."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from polydatum import DataManager, _telemetry
from polydatum.blob import FileSystemBlobStore
from polydatum.cache import Cache
from polydatum.otel import instrument, instrument_outbox
from polydatum.outbox import Outbox
from polydatum.recorder import Recorder
from polydatum.redis import Redis
from polydatum.sqlalchemy import Database
from tests.support.otel import Telemetry, in_memory_telemetry


@pytest.fixture(name="telemetry")
def fixture_telemetry() -> Iterator[Telemetry]:
    """The SDK's in-memory span exporter and metric reader."""
    with in_memory_telemetry() as telemetry:
        yield telemetry


@pytest.fixture(name="cache", params=["memory", "redis"])
def fixture_cache(request: pytest.FixtureRequest) -> Iterator[Cache]:
    """A cache on a namespace of its own, in memory or on the shared Redis server; emptied afterwards."""
    namespace = f"otel-{uuid.uuid4().hex[:12]}"
    redis = None
    if request.param == "redis":
        redis = Redis(request.getfixturevalue("redis_url"))
        cache = redis.cache(namespace=namespace)
    else:
        cache = Cache(namespace=namespace)
    yield cache
    cache.clear()
    if redis is not None:
        redis.close()


def by_attribute(points: list[Any], key: str) -> dict[Any, Any]:
    return {p.attributes[key]: p.value for p in points}


def test_cache_hits_and_misses_are_counted_by_namespace(cache: Cache, telemetry: Telemetry) -> None:
    """get and get_many count the keys they found and missed, per namespace, in {key}."""
    other = cache.namespaced("users")
    cache.set("a", 1)
    other.set("u1", {"id": 1})
    with instrument(DataManager(), telemetry.tracer_provider, telemetry.meter_provider):
        assert cache.get("a") == 1
        assert cache.get("nope") is None
        assert cache.get_many(["a", "b", "c"]) == {"a": 1}
        assert other.get("u1") == {"id": 1}
    points = telemetry.metrics()
    hits = by_attribute(points["polydatum.cache.hits"], "polydatum.cache.namespace")
    misses = by_attribute(points["polydatum.cache.misses"], "polydatum.cache.namespace")
    assert hits == {cache.namespace: 2, other.namespace: 1}
    assert misses == {cache.namespace: 3}
    assert telemetry.units()["polydatum.cache.hits"] == "{key}"


def test_nothing_is_counted_when_not_instrumented(cache: Cache, telemetry: Telemetry) -> None:
    """Before instrument() and after uninstrument() cache reads report to no one."""
    assert _telemetry.sink is None
    cache.get("before")
    with instrument(DataManager(), telemetry.tracer_provider, telemetry.meter_provider):
        cache.get("during")
    assert _telemetry.sink is None
    cache.get("after")
    assert by_attribute(telemetry.metrics()["polydatum.cache.misses"], "polydatum.cache.namespace") == {
        cache.namespace: 1
    }


def test_blob_bytes_in_and_out_are_counted(tmp_path: Path, telemetry: Telemetry) -> None:
    """put counts bytes in; get and download count bytes out, in By, on a filesystem store."""
    blobs = FileSystemBlobStore(tmp_path / "blobs")
    with instrument(DataManager(), telemetry.tracer_provider, telemetry.meter_provider):
        blobs.put("notes/1/a.txt", b"hello")
        blobs.put("notes/1/b.bin", io.BytesIO(b"0123456789"))
        assert blobs.get("notes/1/a.txt") == b"hello"
        target = io.BytesIO()
        assert blobs.download("notes/1/b.bin", target) == 10
    blobs.put("notes/1/c.txt", b"not counted")
    points = telemetry.metrics()
    assert by_attribute(points["polydatum.blob.bytes"], "polydatum.blob.direction") == {"in": 15, "out": 15}
    assert telemetry.units()["polydatum.blob.bytes"] == "By"


@pytest.fixture(name="outbox")
def fixture_outbox(tmp_path: Path) -> Iterator[Outbox]:
    """An outbox on a SQLite file, its table created, with a handler for "mail"."""
    db = Database(f"sqlite:///{tmp_path / 'outbox.db'}")
    dm = DataManager()
    db.install(dm)
    outbox = Outbox(db).install(dm)
    outbox.create_table()
    outbox.add_handler("mail", lambda effect: None)
    yield outbox
    db.dispose()


def test_outbox_pending_rows_and_oldest_age_are_gauges(outbox: Outbox, telemetry: Telemetry) -> None:
    """Rows not delivered yet show as polydatum.outbox.pending ({row}) and the oldest one's age in s."""
    stop = instrument_outbox(outbox, telemetry.meter_provider)
    points = telemetry.metrics()
    assert by_attribute(points["polydatum.outbox.pending"], "polydatum.outbox.table") == {
        outbox.table.name: 0
    }
    outbox.add_detached("mail", {"to": "ann"}, delay=3600)
    outbox.add_detached("mail", {"to": "bob"}, delay=3600)
    points = telemetry.metrics()
    assert by_attribute(points["polydatum.outbox.pending"], "polydatum.outbox.table") == {
        outbox.table.name: 2
    }
    (age,) = points["polydatum.outbox.oldest_pending_age"]
    assert age.value >= 0.0
    units = telemetry.units()
    assert (units["polydatum.outbox.pending"], units["polydatum.outbox.oldest_pending_age"]) == ("{row}", "s")
    stop()
    assert "polydatum.outbox.pending" not in telemetry.metrics()


def test_an_outbox_that_cannot_be_read_reports_nothing(
    outbox: Outbox, telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    """When the status query fails (the table is gone), the gauges are empty and a warning is logged."""
    instrument_outbox(outbox, telemetry.meter_provider)
    outbox.table.drop(outbox.engine)
    assert "polydatum.outbox.pending" not in telemetry.metrics()
    assert "could not read the outbox's status" in caplog.text


def test_caches_report_to_the_latest_instrumentation_still_active(cache: Cache, telemetry: Telemetry) -> None:
    """With two managers instrumented, lookups go to the latest; once it is undone, to the other again."""
    with in_memory_telemetry() as second:
        with instrument(DataManager(), telemetry.tracer_provider, telemetry.meter_provider):
            inner = instrument(DataManager(), second.tracer_provider, second.meter_provider)
            cache.get("to-the-second")
            inner.uninstrument()
            cache.get("to-the-first")
        assert _telemetry.sink is None
        for reader in (telemetry, second):
            misses = by_attribute(reader.metrics()["polydatum.cache.misses"], "polydatum.cache.namespace")
            assert misses == {cache.namespace: 1}


def test_a_recorder_and_the_instrumentation_both_hear_a_lookup(cache: Cache, telemetry: Telemetry) -> None:
    """Installed together, the recorder counts the lookup on its context and the meter counts it too."""
    dm = DataManager()
    with (
        instrument(dm, telemetry.tracer_provider, telemetry.meter_provider),
        Recorder().install(dm) as recorder,
    ):
        with dm.context():
            assert cache.get("shared") is None
        # The recorder leaves; the instrumentation goes on hearing lookups alone.
        recorder.uninstall()
        assert cache.get("shared") is None
    assert _telemetry.sink is None
    (record,) = recorder.contexts()
    assert record.counts == {"cache.miss": 1}
    misses = by_attribute(telemetry.metrics()["polydatum.cache.misses"], "polydatum.cache.namespace")
    assert misses == {cache.namespace: 2}

"""Primary failover: a replica is promoted and writes resume through a libpq multi-host URL, no restart."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import String
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polydatum import DataManager
from polydatum.sqlalchemy import Database, Store
from tests.support.replication import ReplicatedPostgres

RUN = uuid.uuid4().hex[:8]


class Base(DeclarativeBase):
    pass


class Entry(Base):
    __tablename__ = f"failover_entries_{RUN}"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Entries(Store[Entry]):
    pass


@pytest.fixture(name="rig", scope="module")
def fixture_rig() -> Iterator[ReplicatedPostgres]:
    """A primary and one streaming replica, for this module's destructive test."""
    rig = ReplicatedPostgres(replicas=1).start()
    try:
        yield rig
    finally:
        rig.close()


def test_writes_resume_on_the_promoted_replica(rig: ReplicatedPostgres) -> None:
    """Kill the primary, promote the replica: writes fail during the switch only, then resume."""
    old, standby = rig.primary, rig.replicas[0]
    url = (
        f"postgresql+psycopg://postgres@/postgres?host=127.0.0.1:{old.port}&host=127.0.0.1:{standby.port}"
        "&target_session_attrs=read-write&connect_timeout=2"
    )
    db = Database(url, replicas=[standby.url], check_interval=0.05)
    Base.metadata.create_all(db.engine)
    dm = DataManager()
    db.install(dm)
    dm.register_services(entries=Entries())
    try:
        with dm.context() as ctx:
            before = ctx.dal.entries.create(name="before")
        rig.wait_replayed(standby, db.committed_position(ctx) or "0/0")

        old.kill()
        # No primary yet: writes are refused, not queued.
        with pytest.raises(DBAPIError), dm.context() as ctx:
            ctx.dal.entries.create(name="during")
        standby.promote()

        failures = 0
        deadline = time.monotonic() + 20
        while True:
            try:
                with dm.context() as ctx:
                    after = ctx.dal.entries.create(name="after")
                break
            except DBAPIError:
                failures += 1
                assert time.monotonic() < deadline, "writes did not resume within 20 s of the promotion"
                time.sleep(0.1)
        with dm.context() as ctx:
            assert ctx.dal.entries.require(before.id).name == "before"  # replayed before the crash
            assert ctx.dal.entries.require(after.id).name == "after"
            assert ctx.dal.entries.count({"name": "during"}) == 0
        report = db.health()
        assert report[1].ok is False
        assert "not in recovery" in report[1].detail  # the promoted node is no longer a replica
        print(f"failover: {failures} failed write attempts after the promotion")
    finally:
        db.dispose()

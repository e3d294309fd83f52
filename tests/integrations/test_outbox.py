"""polydatum.outbox on SQLite and PostgreSQL: effects commit with the data and are delivered once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, func, select, text

from polydatum import DataManager
from polydatum.errors import AlreadyExistsException
from polydatum.outbox import Effect, EffectDeferred, Inbox, Outbox
from polydatum.sqlalchemy import AsyncDatabase, Database
from tests.support.outbox import flush_outboxes  # noqa: F401  # autouse
from tests.support.sql import fresh_postgres_database

DEADLINE = 60.0  # seconds; a ceiling for waiting, never a pass/fail timing
REPO = Path(__file__).resolve().parents[2]

NOTES = MetaData()
notes = Table("notes", NOTES, Column("id", Integer, primary_key=True), Column("n", Integer))


@pytest.fixture(name="pg_url", scope="module")
def fixture_pg_url(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL database of this module's own, dropped afterwards."""
    with fresh_postgres_database(postgres_url) as url:
        yield url


@pytest.fixture(name="url", params=["sqlite", "postgresql"])
def fixture_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(name="db")
def fixture_db(url: str) -> Iterator[Database]:
    """A Database with the notes table, dropped afterwards (with the outbox tables)."""
    db = Database(url)
    NOTES.create_all(db.engine)
    yield db
    NOTES.drop_all(db.engine)
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS polydatum_outbox"))
        conn.execute(text("DROP TABLE IF EXISTS polydatum_inbox"))
    db.dispose()


def make(db: Database, **options: Any) -> tuple[DataManager, Outbox]:
    """A DataManager with ``db`` and an outbox installed, its table created."""
    dm = DataManager()
    db.install(dm)
    outbox = Outbox(db, **options).install(dm)
    outbox.create_table()
    return dm, outbox


def rows(outbox: Outbox) -> list[dict[str, Any]]:
    """Every row of the outbox table, oldest first (deletes of delivered rows done first)."""
    outbox.flush()
    t = outbox.table
    with outbox.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(t).order_by(t.c.id))]


def drain(relay: Any, done: Callable[[], bool]) -> None:
    """Run the relay until ``done()``; fail after the deadline."""
    end = time.monotonic() + DEADLINE
    while not done():
        if time.monotonic() > end:
            pytest.fail("the relay did not deliver before the deadline")
        if relay.run_once() == 0:
            time.sleep(0.05)


# -- commit and rollback --------------------------------------------------------------------------


def test_commit_records_every_effect_and_rollback_none(db: Database) -> None:
    """A committed context leaves one row per add(); one that rolled back leaves none."""
    dm, outbox = make(db, deliver_on_commit=False)
    with dm.context() as ctx:
        ctx.db.execute(notes.insert().values(n=1))
        for i in range(3):
            ctx.outbox.add("t", {"i": i}, key="k")

    def rolled_back() -> None:
        with dm.context() as ctx:
            ctx.db.execute(notes.insert().values(n=2))
            ctx.outbox.add("t", {"i": 99})
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        rolled_back()
    got = rows(outbox)
    assert [r["payload"] for r in got] == ['{"i":0}', '{"i":1}', '{"i":2}']
    assert {r["key"] for r in got} == {"k"}
    assert outbox.status().pending == 3


def test_happy_path_delivers_after_commit_and_deletes(db: Database) -> None:
    """After the commit the handler gets the effect, and its row is gone."""
    dm, outbox = make(db)
    seen: list[Effect] = []
    outbox.handler("greet")(seen.append)
    with dm.context() as ctx:
        row_id = ctx.outbox.add("greet", {"to": "ada", "tags": ("a", "b")}, key="ada")
        assert seen == []  # nothing before the commit
    assert [(e.id, e.topic, e.key, e.payload, e.attempts) for e in seen] == [
        (row_id, "greet", "ada", {"to": "ada", "tags": ["a", "b"]}, 0)
    ]
    assert rows(outbox) == []


def test_rolled_back_context_delivers_nothing(db: Database) -> None:
    """A context that rolls back never calls the handler."""
    dm, outbox = make(db)
    seen: list[Effect] = []
    outbox.handler("greet")(seen.append)

    def rolled_back() -> None:
        with dm.context() as ctx:
            ctx.outbox.add("greet", {})
            raise KeyError("x")

    with pytest.raises(KeyError):
        rolled_back()
    assert seen == []
    assert rows(outbox) == []


async def test_async_context_adds_and_delivers(tmp_path: Path) -> None:
    """An async context adds through its AsyncSession; delivery runs after the commit."""
    adb = AsyncDatabase(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    dm = DataManager()
    adb.install(dm)
    outbox = Outbox(adb).install(dm)
    outbox.create_table()
    seen: list[Any] = []
    outbox.handler("t")(lambda e: seen.append(e.payload))
    try:
        async with dm.context() as ctx:
            sender = await ctx.aget("outbox")
            await sender.add("t", [1, 2])
        assert seen == [[1, 2]]
        assert rows(outbox) == []

        async def rolled_back() -> None:
            async with dm.context() as ctx:
                await (await ctx.aget("outbox")).add("t", [3])
                raise ValueError("roll back")

        with pytest.raises(ValueError, match="roll"):
            await rolled_back()
        assert seen == [[1, 2]]
        assert rows(outbox) == []
    finally:
        await adb.dispose()


# -- bad input ------------------------------------------------------------------------------------


def test_unserializable_payload_fails_at_add_and_rolls_back(db: Database) -> None:
    """add() refuses a payload JSON cannot carry, naming where, and the context rolls back."""
    dm, outbox = make(db)

    def write() -> None:
        with dm.context() as ctx:
            ctx.db.execute(notes.insert().values(n=5))
            ctx.outbox.add("t", {"items": [1, {2}]})

    with pytest.raises(TypeError, match=r"payload\['items'\]\[1\] is a set"):
        write()
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(notes)).scalar_one() == 0
    assert rows(outbox) == []


@pytest.mark.parametrize(
    ("payload", "error", "match"),
    [
        ({1: "a"}, TypeError, r"payload has a key of type int"),
        ({"x": float("nan")}, ValueError, r"payload\['x'\] is nan"),
        (object(), TypeError, "payload is a object"),
    ],
)
def test_payload_refusals_name_the_value(tmp_path: Path, payload: Any, error: type, match: str) -> None:
    """Keys that are not str, non-finite floats and objects are refused at add()."""
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    dm, _ = make(db)
    with pytest.raises(error, match=match), dm.context() as ctx:
        ctx.outbox.add("t", payload)


@pytest.mark.parametrize(
    ("topic", "key", "error"), [("", None, TypeError), ("t", 5, TypeError), ("x" * 201, None, ValueError)]
)
def test_bad_topic_or_key_is_refused(tmp_path: Path, topic: Any, key: Any, error: type) -> None:
    """A topic or key that is not a short non-empty str is refused at add()."""
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    dm, _ = make(db)
    with pytest.raises(error), dm.context() as ctx:
        ctx.outbox.add(topic, {}, key=key)


def test_handler_registered_twice_is_refused(tmp_path: Path) -> None:
    """A topic has one handler; registering a second raises."""
    outbox = Outbox(Database(f"sqlite:///{tmp_path / 'a.db'}"))
    outbox.handler("t")(print)
    with pytest.raises(AlreadyExistsException, match="'t' already has a handler"):
        outbox.handler("t")(print)


@pytest.mark.parametrize(("option", "value"), [("max_attempts", 0), ("backoff", -1), ("lease", 0)])
def test_bad_options_are_refused(tmp_path: Path, option: str, value: Any) -> None:
    """Out-of-range options raise ValueError when the Outbox is made."""
    with pytest.raises(ValueError, match=option):
        Outbox(Database(f"sqlite:///{tmp_path / 'a.db'}"), **{option: value})


def test_outbox_needs_a_database() -> None:
    """Anything but a Database or AsyncDatabase is refused."""
    with pytest.raises(TypeError, match="Database or AsyncDatabase"):
        Outbox("sqlite://")  # type: ignore[arg-type]


def test_unknown_topic_is_dead_lettered_naming_it(db: Database) -> None:
    """A row whose topic has no handler goes to dead-letter at once, its error naming the topic."""
    dm, outbox = make(db)
    with dm.context() as ctx:
        ctx.outbox.add("nobody.listens", {})
    (dead,) = outbox.dead()
    assert dead.topic == "nobody.listens"
    assert "no handler for topic 'nobody.listens'" in (dead.last_error or "")
    assert outbox.status().dead == 1
    assert outbox.status().pending == 0


def test_poison_row_dead_letters_after_n_attempts_without_holding_up_other_keys(db: Database) -> None:
    """A row that always fails is dead after max_attempts; rows of other keys are delivered meanwhile."""
    dm, outbox = make(db, max_attempts=3, backoff=0.01, max_backoff=0.02, deliver_on_commit=False)
    delivered: list[Any] = []

    @outbox.handler("t")
    def handle(effect: Effect) -> None:
        if effect.payload == "poison":
            raise RuntimeError("cannot digest")
        delivered.append(effect.payload)

    with dm.context() as ctx:
        ctx.outbox.add("t", "poison", key="a")
        ctx.outbox.add("t", "after poison", key="a")
        ctx.outbox.add("t", "other", key="b")
    relay = outbox.relay()
    drain(relay, lambda: outbox.status().dead == 1 and "after poison" in delivered)
    assert delivered.index("other") < delivered.index("after poison")  # b never waited for a
    (dead,) = outbox.dead()
    assert (dead.payload, dead.attempts) == ('"poison"', 3)
    assert dead.last_error == "RuntimeError: cannot digest"
    assert relay.metrics().failed == 3
    assert relay.metrics().delivered == 2


def test_failure_backs_off_and_counts_attempts(db: Database) -> None:
    """A failed delivery is retried later (available_at moves on), its attempts and error recorded."""
    dm, outbox = make(db, backoff=100.0)
    outbox.handler("t")(lambda e: 1 / 0)
    before = time.time()
    with dm.context() as ctx:
        ctx.outbox.add("t", {})
    (row,) = rows(outbox)
    assert row["attempts"] == 1
    assert row["last_error"] == "ZeroDivisionError: division by zero"
    assert row["available_at"] >= before + 50  # 100 s with jitter: at least half
    assert row["lease_owner"] is None
    assert outbox.relay().run_once() == 0  # not due yet


def test_a_deferred_effect_waits_without_spending_an_attempt(db: Database) -> None:
    """EffectDeferred from a handler: the row waits retry_after seconds, no attempt spent, key order kept."""
    dm, outbox = make(db, max_attempts=1)
    deferring = {"on": True}
    order: list[Any] = []

    @outbox.handler("t")
    def handle(effect: Effect) -> None:
        if deferring["on"]:
            raise EffectDeferred("the target is down (known since a moment ago)", retry_after=100.0)
        order.append(effect.payload)

    before = time.time()
    with dm.context() as ctx:
        ctx.outbox.add("t", 1, key="k")
        ctx.outbox.add("t", 2, key="k")
    first, second = rows(outbox)
    assert first["attempts"] == 0  # max_attempts=1 would have buried a counted failure
    assert not first["dead"]
    assert first["last_error"] == "the target is down (known since a moment ago)"
    assert first["available_at"] >= before + 100
    assert second["attempts"] == 0  # it waited behind row 1
    assert second["last_error"] is None
    relay = outbox.relay()
    assert relay.run_once() == 0  # not due yet
    assert relay.metrics().failed == 0
    deferring["on"] = False
    with db.engine.begin() as conn:
        conn.execute(outbox.table.update().values(available_at=0.0))
    drain(relay, lambda: order == [1, 2])


def test_effect_deferred_clamps_a_negative_wait_to_zero() -> None:
    """retry_after below 0 is taken as 0 (due at once), never as a time in the past."""
    assert EffectDeferred("x", -5).retry_after == 0.0
    assert EffectDeferred("x", 2).retry_after == 2.0


def test_same_key_waits_for_the_earlier_row(db: Database) -> None:
    """A later row of a key is not delivered while an earlier one of that key is pending."""
    dm, outbox = make(db, backoff=0.01, max_backoff=0.02)
    failing = {"first": True}
    order: list[Any] = []

    @outbox.handler("t")
    def handle(effect: Effect) -> None:
        if effect.payload == 1 and failing["first"]:
            raise RuntimeError("down")
        order.append(effect.payload)

    with dm.context() as ctx:
        ctx.outbox.add("t", 1, key="k")
    with dm.context() as ctx:  # its own commit hook must not overtake row 1
        ctx.outbox.add("t", 2, key="k")
    assert order == []
    failing["first"] = False
    drain(outbox.relay(), lambda: order == [1, 2])


def test_requeue_dead_puts_rows_back(db: Database) -> None:
    """requeue_dead() makes dead rows pending again, and a relay then delivers them."""
    dm, outbox = make(db)
    with dm.context() as ctx:
        ctx.outbox.add("late", {"n": 1})
        ctx.outbox.add("late", {"n": 2})
    assert outbox.status().dead == 2
    seen: list[Any] = []
    outbox.handler("late")(lambda e: seen.append(e.payload))
    relay = outbox.relay()
    first = outbox.dead()[0].id
    assert relay.requeue_dead([first]) == 1
    drain(relay, lambda: seen == [{"n": 1}])
    assert relay.requeue_dead() == 1
    drain(relay, lambda: len(seen) == 2)
    assert outbox.status().dead == 0
    assert relay.requeue_dead([]) == 0


def test_metrics_show_pending_and_oldest_age(db: Database) -> None:
    """metrics() counts pending rows and the age of the oldest one."""
    dm, outbox = make(db, deliver_on_commit=False)
    relay = outbox.relay()
    assert relay.metrics().pending == 0
    assert relay.metrics().oldest_pending_age == 0.0
    with dm.context() as ctx:
        ctx.outbox.add("t", 1)
    m = relay.metrics()
    assert m.pending == 1
    assert m.oldest_pending_age >= 0.0
    assert (m.delivered, m.failed, m.dead) == (0, 0, 0)


def test_relay_thread_delivers_and_stops(db: Database) -> None:
    """start() runs the relay in a thread that delivers new rows; stop() ends it."""
    dm, outbox = make(db, deliver_on_commit=False)
    got = threading.Event()
    outbox.handler("t")(lambda e: got.set())
    relay = outbox.relay(poll=0.05)
    thread = relay.start()
    try:
        with dm.context() as ctx:
            ctx.outbox.add("t", 1)
        assert got.wait(DEADLINE)
    finally:
        relay.stop()
        thread.join(DEADLINE)
    assert not thread.is_alive()
    drain(relay, lambda: outbox.status().pending == 0)


# -- crashes --------------------------------------------------------------------------------------

CRASH_AFTER_COMMIT = """
import os, signal, sys
from polydatum import DataManager
from polydatum.outbox import Outbox
from polydatum.sqlalchemy import Database

dm = DataManager()
db = Database(sys.argv[1]).install(dm)
outbox = Outbox(db, lease=1.0).install(dm)
outbox.handler("t")(lambda e: print("DELIVERED IN THE DYING PROCESS", flush=True))
with dm.context() as ctx:
    # Registered before the outbox's own hook (on the first add): runs first, after COMMIT.
    ctx.on_commit(os.kill, os.getpid(), signal.SIGKILL)
    for i in range(int(sys.argv[2])):
        ctx.outbox.add("t", {"i": i}, key=f"k{i % 3}")
print("NOT KILLED", flush=True)
"""


def test_crash_after_commit_loses_nothing(db: Database, tmp_path: Path) -> None:
    """A process SIGKILLed between COMMIT and delivery loses no effect: a relay delivers them all."""
    _, outbox = make(db)
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASH_AFTER_COMMIT))
    proc = subprocess.run(
        [sys.executable, str(script), str(db.url.render_as_string(False)), "25"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=DEADLINE,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == ""
    assert outbox.status().pending == 25  # committed, not delivered
    seen: list[int] = []
    outbox.handler("t")(lambda e: seen.append(e.payload["i"]))
    drain(outbox.relay(), lambda: len(seen) >= 25)  # once the dead process's leases lapsed
    assert sorted(seen) == list(range(25))
    assert outbox.status().pending == 0


RELAY_THAT_HANGS = """
import sys, time
from polydatum.outbox import Outbox
from polydatum.sqlalchemy import Database

outbox = Outbox(Database(sys.argv[1]), lease=1.0)

@outbox.handler("t")
def hang(effect):
    print("CLAIMED", effect.id, flush=True)
    time.sleep(3600)

outbox.relay(batch=10).run_once()
"""


def test_relay_killed_mid_batch_another_delivers_after_lease(db: Database, tmp_path: Path) -> None:
    """A relay SIGKILLed while holding leases: another relay delivers its rows once they lapse."""
    dm, outbox = make(db, deliver_on_commit=False)
    with dm.context() as ctx:
        for i in range(5):
            ctx.outbox.add("t", i)
    script = tmp_path / "relay.py"
    script.write_text(textwrap.dedent(RELAY_THAT_HANGS))
    proc = subprocess.Popen(
        [sys.executable, str(script), db.url.render_as_string(False)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("CLAIMED")
        leased = [r for r in rows(outbox) if r["lease_owner"]]
        assert len(leased) == 5
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    seen: list[int] = []
    outbox.handler("t")(lambda e: seen.append(e.payload))
    relay = outbox.relay()
    drain(relay, lambda: len(seen) >= 5)
    assert sorted(seen) == list(range(5))


# -- several relays on PostgreSQL -----------------------------------------------------------------


@pytest.mark.parametrize("relays", [2, 4])
def test_several_relays_deliver_each_row_once_in_key_order(pg_url: str, relays: int) -> None:
    """2 and 4 relays on PostgreSQL: every row delivered exactly once, each key in commit order."""
    db = Database(pg_url, pool_size=relays * 2)
    dm, outbox = make(db, deliver_on_commit=False)
    total, keys = 400, 16
    lock = threading.Lock()
    delivered: dict[int, int] = defaultdict(int)
    by_key: dict[str, list[int]] = defaultdict(list)
    done = threading.Event()

    @outbox.handler("t")
    def handle(effect: Effect) -> None:
        with lock:
            delivered[effect.payload["seq"]] += 1
            by_key[effect.key or ""].append(effect.payload["seq"])
            if len(delivered) == total:
                done.set()

    workers = [outbox.relay(batch=7, poll=0.05, name=f"r{i}") for i in range(relays)]
    threads = [w.start(name=f"relay-{i}") for i, w in enumerate(workers)]
    try:
        for start in range(0, total, 20):  # 20 commits of 20 rows
            with dm.context() as ctx:
                for seq in range(start, start + 20):
                    ctx.outbox.add("t", {"seq": seq}, key=f"k{seq % keys}")
        assert done.wait(DEADLINE)
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(DEADLINE)
    assert sorted(delivered) == list(range(total))
    assert set(delivered.values()) == {1}
    for seqs in by_key.values():
        assert seqs == sorted(seqs)
    assert sum(w.metrics().delivered for w in workers) == total
    assert outbox.status().pending == 0
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE polydatum_outbox"))
        conn.execute(text("DROP TABLE polydatum_inbox"))
    db.dispose()


def test_postgres_relay_wakes_on_notify(pg_url: str) -> None:
    """With deliver_on_commit=False on PostgreSQL, the INSERT's NOTIFY wakes a relay that polls rarely."""
    db = Database(pg_url)
    dm, outbox = make(db, deliver_on_commit=False, table="outbox_notify")
    got = threading.Event()
    outbox.handler("t")(lambda e: got.set())
    relay = outbox.relay(poll=3600)
    thread = relay.start()
    try:
        # Let the relay reach its LISTEN wait: its first batch found nothing.
        end = time.monotonic() + DEADLINE
        while relay._listener is None and time.monotonic() < end:
            time.sleep(0.01)
        assert relay._listener is not None
        with dm.context() as ctx:
            ctx.outbox.add("t", 1)
        assert got.wait(DEADLINE)
    finally:
        relay.stop()
        with dm.context() as ctx:  # wake it up to see the stop
            ctx.outbox.add("t", 2)
        thread.join(DEADLINE)
        with db.engine.begin() as conn:
            conn.execute(text("DROP TABLE outbox_notify"))
            conn.execute(text("DROP TABLE IF EXISTS polydatum_inbox"))
        db.dispose()
    assert not thread.is_alive()


# -- the inbox ------------------------------------------------------------------------------------


def test_inbox_records_an_id_once_and_forgets_a_rolled_back_one(db: Database) -> None:
    """seen() is False the first time, True after that run committed, False again if it rolled back."""
    dm, outbox = make(db)
    inbox = Inbox(outbox)
    with dm.context() as ctx:
        assert inbox.seen(ctx, "m-1") is False
    with dm.context() as ctx:
        assert inbox.seen(ctx, "m-1") is True

    def rolled_back() -> None:
        with dm.context() as ctx:
            assert inbox.seen(ctx, "m-2") is False
            raise RuntimeError("the run failed")

    with pytest.raises(RuntimeError):
        rolled_back()
    with dm.context() as ctx:
        assert inbox.seen(ctx, "m-2") is False  # the failed run left no trace: this one runs


def test_inbox_refuses_bad_sources_and_options(tmp_path: Path) -> None:
    """Inbox() needs an Outbox or a Database, and positive durations."""
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(TypeError, match="needs an Outbox"):
        Inbox("sqlite://")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retention"):
        Inbox(db, retention=0)
    inbox = Inbox(db, table="my_inbox")
    inbox.create_table()
    assert inbox.prune() == 0


def test_outbox_works_inside_transactional_database(tmp_path: Path) -> None:
    """Under polydatum.testing.transactional_database, delivery joins the test's transaction."""
    from polydatum.testing import transactional_database

    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    dm, outbox = make(db)
    seen: list[Any] = []
    outbox.handler("t")(lambda e: seen.append(e.payload))
    with transactional_database(db):
        with dm.context() as ctx:
            ctx.outbox.add("t", 1)
        assert seen == [1]
        assert outbox.status().pending == 0
    db.dispose()


def test_rows_of_an_uncommitted_transaction_are_not_delivered(tmp_path: Path, caplog: Any) -> None:
    """With transaction=False and no commit by hand, the hook delivers nothing (the rows roll back)."""
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    dm = DataManager()
    db.install(dm, transaction=False)
    outbox = Outbox(db).install(dm)
    outbox.create_table()
    seen: list[Any] = []
    outbox.handler("t")(seen.append)
    with dm.context() as ctx:
        ctx.outbox.add("t", 1)
    assert seen == []
    assert rows(outbox) == []
    assert "still open when the context ended" in caplog.text
    db.dispose()


def test_delivered_rows_are_deleted_in_the_background(db: Database) -> None:
    """The DELETE of delivered rows leaves the request: a background thread removes them soon after."""
    dm, outbox = make(db)
    outbox.handler("t")(lambda e: None)
    for i in range(5):
        with dm.context() as ctx:
            ctx.outbox.add("t", i)
    t = outbox.table
    end = time.monotonic() + DEADLINE
    while True:  # read behind the outbox's back: no flush() here
        with db.engine.connect() as conn:
            left = conn.execute(select(func.count()).select_from(t)).scalar_one()
        if left == 0:
            break
        assert time.monotonic() < end, "the delivered rows were never deleted"
        time.sleep(0.01)


def test_in_memory_sqlite_deletes_inline() -> None:
    """With an in-memory SQLite database (one shared connection) delivered rows are deleted at once."""
    db = Database("sqlite://")
    dm, outbox = make(db)
    outbox.handler("t")(lambda e: None)
    for i in range(20):
        with dm.context() as ctx:
            ctx.outbox.add("t", i)
    with db.engine.connect() as conn:  # no flush(): nothing may be left to a thread
        assert conn.execute(select(func.count()).select_from(outbox.table)).scalar_one() == 0
    db.dispose()


def test_install_refuses_a_session_of_another_database(tmp_path: Path) -> None:
    """install() refuses a DataManager without the session, or whose session is another database's."""
    dm = DataManager()
    outbox = Outbox(Database(f"sqlite:///{tmp_path / 'a.db'}"))
    with pytest.raises(ValueError, match="does not have; install the database first"):
        outbox.install(dm)
    Database(f"sqlite:///{tmp_path / 'b.db'}").install(dm)
    with pytest.raises(ValueError, match="not to Database"):
        outbox.install(dm)

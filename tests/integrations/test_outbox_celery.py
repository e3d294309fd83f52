"""polydatum.celery through the outbox: sends survive a broker outage; the inbox runs a message once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Queue
from kombu.exceptions import EncodeError
from kombu.utils import json as kombu_json
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from polydatum import DataManager
from polydatum.celery import OUTBOX_TOPIC, PendingResult, install
from polydatum.outbox import Inbox, Outbox
from polydatum.sqlalchemy import Database
from tests.support.celery_worker import close_suite_app, in_thread_worker, suite_app
from tests.support.outbox import flush_outboxes  # noqa: F401  # autouse
from tests.support.servers import PrivateRedis
from tests.support.sql import fresh_postgres_database

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")

WAIT = 30  # seconds; a ceiling for waiting, never a pass/fail timing

RUNS: dict[str, int] = {}
RUNS_LOCK = threading.Lock()


def count_run(token: str) -> None:
    """Count one run of a task body under ``token``."""
    with RUNS_LOCK:
        RUNS[token] = RUNS.get(token, 0) + 1


@pytest.fixture(scope="module")
def env(postgres_url: str, rabbitmq_url: str, redis_url: str) -> Iterator[SimpleNamespace]:
    """PostgreSQL, an outbox with its inbox, a Celery app wired to both, one solo worker."""
    run = uuid.uuid4().hex[:10]
    queue = f"polydatum-test-outbox-{run}"
    with fresh_postgres_database(postgres_url) as url:
        setup = create_engine(url, poolclass=NullPool)
        with setup.begin() as conn:
            conn.execute(text("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)"))
        setup.dispose()
        dm = DataManager()
        db = Database(url).install(dm)
        outbox = Outbox(db).install(dm)
        outbox.create_table()
        app = suite_app("polydatum_outbox_tests", rabbitmq_url, redis_url, queue, f"pd-outbox-{run}:")
        install(app, dm, outbox=outbox, inbox=True, headers=("request_id",))

        @app.task(shared=False, name="pdoutbox.note")
        def note(token: str, body: str) -> str:
            count_run(token)
            ctx = dm.require_active_context()
            ctx.db.execute(text("INSERT INTO notes (body) VALUES (:b)"), {"b": body})
            return str(ctx.meta.get("request_id"))

        try:
            with in_thread_worker(app):
                yield SimpleNamespace(
                    dm=dm, db=db, outbox=outbox, app=app, note=note, url=url, queue=queue, broker=rabbitmq_url
                )
        finally:
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
            close_suite_app(app)
            outbox.flush()  # the background deletes first: none may reconnect after dispose()
            db.dispose()


def notes(env: SimpleNamespace, body: str) -> int:
    """How many committed notes have ``body``."""
    with env.db.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM notes WHERE body = :b"), {"b": body}).scalar_one())


def test_delay_in_a_context_goes_through_the_outbox(env: SimpleNamespace) -> None:
    """delay() in a context writes an outbox row; after the commit it is sent with the id returned."""
    token = uuid.uuid4().hex
    with env.dm.context({"request_id": "req-7"}) as ctx:
        result = env.note.delay(token, token)
        assert isinstance(result, PendingResult)
        t = env.outbox.table  # the row, seen from the context's own (uncommitted) transaction
        (payload,) = ctx.db.execute(
            t.select().with_only_columns(t.c.payload).where(t.c.topic == OUTBOX_TOPIC)
        ).scalars()
        assert json.loads(payload)["id"] == result.id
    assert result.outcome == "in outbox"
    assert result.get(timeout=WAIT) == "req-7"  # the meta's header travelled
    assert notes(env, token) == 1
    assert env.outbox.status().pending == 0


def test_rolled_back_context_sends_nothing(env: SimpleNamespace) -> None:
    """A context that rolls back leaves no outbox row and its result says discarded."""
    token = uuid.uuid4().hex

    def send_then_fail() -> PendingResult:
        with env.dm.context():
            result = env.note.delay(token, token)
            raise LookupError(result)

    with pytest.raises(LookupError) as raised:
        send_then_fail()
    result = raised.value.args[0]
    assert result.outcome == "discarded"
    assert env.outbox.status().pending == 0
    env.note.delay(token, "control").get(timeout=WAIT)  # anything sent before has run
    assert RUNS[token] == 1


def test_unserializable_argument_fails_at_delay(env: SimpleNamespace) -> None:
    """An argument the serializer refuses fails at delay(), inside the context, which rolls back."""

    def send() -> None:
        with env.dm.context() as ctx:
            ctx.db.execute(text("INSERT INTO notes (body) VALUES ('unserializable')"))
            env.note.delay("t", object())

    with pytest.raises(EncodeError):
        send()
    assert notes(env, "unserializable") == 0
    assert env.outbox.status().pending == 0


def test_inbox_runs_a_message_delivered_twice_once(env: SimpleNamespace) -> None:
    """The same message (same task id) delivered twice: its body runs once, its note is written once."""
    token = uuid.uuid4().hex
    task_id = uuid.uuid4().hex
    for _ in range(2):  # a redelivery: the relay, the broker or acks_late send it again
        env.app.send_task("pdoutbox.note", (token, token), task_id=task_id)
    env.note.delay(token, "control").get(timeout=WAIT)  # one solo worker: both copies ran before
    assert RUNS[token] == 2  # the first copy and the control: the duplicate did not run
    assert notes(env, token) == 1
    with env.db.engine.connect() as conn:
        recorded = conn.execute(
            text("SELECT count(*) FROM polydatum_inbox WHERE message_id = :i"), {"i": task_id}
        ).scalar_one()
    assert recorded == 1


def test_inbox_prune_drops_old_ids(env: SimpleNamespace) -> None:
    """prune() deletes ids older than the retention and keeps newer ones."""
    inbox = Inbox(env.outbox, retention=100)
    with env.db.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO polydatum_inbox VALUES ('old-id', :t), ('new-id', :n)"),
            {"t": time.time() - 1000, "n": time.time()},
        )
    assert inbox.prune() >= 1
    with env.db.engine.connect() as conn:
        left = {r[0] for r in conn.execute(text("SELECT message_id FROM polydatum_inbox"))}
    assert "old-id" not in left
    assert "new-id" in left


RELAY_DIES_AFTER_SENDING = """
import sys, time
from celery import Celery
from polydatum import DataManager
from polydatum.celery import OUTBOX_TOPIC, install
from polydatum.outbox import Outbox
from polydatum.sqlalchemy import Database

url, broker, queue = sys.argv[1:4]
dm = DataManager()
db = Database(url).install(dm)
outbox = Outbox(db, lease=1.0).install(dm)
app = Celery("dying_relay", broker=broker, set_as_current=False)
app.conf.update(task_default_queue=queue, task_serializer="json")
install(app, dm, outbox=outbox)
send = outbox._handlers[OUTBOX_TOPIC]
sent = []

def send_then_hang(effect):
    send(effect)
    sent.append(effect.id)
    if len(sent) == 3:  # three messages are out, and no row was deleted
        print("SENT", flush=True)
        time.sleep(3600)

outbox._handlers[OUTBOX_TOPIC] = send_then_hang
outbox.relay(batch=10).run_once()
"""


def test_relay_killed_after_sending_duplicates_run_once(env: SimpleNamespace, tmp_path: Path) -> None:
    """A relay SIGKILLed after sending 3 of 5: another resends all 5, and the inbox runs each body once."""
    token = uuid.uuid4().hex
    bodies = [f"{token}-{i}" for i in range(5)]
    env.outbox.deliver_on_commit = False  # leave the rows to relays
    try:
        with env.dm.context():
            for body in bodies:
                env.note.delay(token, body)
    finally:
        env.outbox.deliver_on_commit = True
    script = tmp_path / "relay.py"
    script.write_text(textwrap.dedent(RELAY_DIES_AFTER_SENDING))
    proc = subprocess.Popen(
        [sys.executable, str(script), env.url, env.broker, env.queue],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "SENT"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    relay = env.outbox.relay()
    end = time.monotonic() + WAIT
    while env.outbox.status().pending:  # once the dead relay's leases lapsed
        assert time.monotonic() < end, "the second relay did not deliver"
        if relay.run_once() == 0:
            time.sleep(0.05)
    assert relay.metrics().delivered == 5  # 3 of them for the second time
    env.note.delay(token, "control").get(timeout=WAIT)  # one solo worker: everything before has run
    assert RUNS[token] == 6  # 5 bodies once each, and the control
    assert [notes(env, body) for body in bodies] == [1] * 5


# -- without a worker -----------------------------------------------------------------------------


def _rows(outbox: Outbox) -> list[dict[str, Any]]:
    outbox.flush()
    t = outbox.table
    with outbox.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(t.select().order_by(t.c.id))]


def wired(tmp_path: Path, broker: str, **options: Any) -> SimpleNamespace:
    """SQLite, an outbox and a Celery app on ``broker`` (nothing consumes)."""
    dm = DataManager()
    db = Database(f"sqlite:///{tmp_path / 'app.db'}").install(dm)
    outbox = Outbox(db, **options).install(dm)
    outbox.create_table()
    app = Celery("polydatum_outbox_down", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue="outboxq",
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=False,
        task_serializer="json",
    )
    install(app, dm, outbox=outbox, headers=("request_id",))

    @app.task(shared=False, name="pdoutbox.work")
    def work(n: int) -> None:
        return None

    return SimpleNamespace(dm=dm, db=db, outbox=outbox, app=app, work=work)


def test_countdown_becomes_an_absolute_eta_and_options_are_kept(tmp_path: Path) -> None:
    """The row holds eta = write time + countdown, an absolute expires, the headers and the task id."""
    w = wired(tmp_path, "redis://127.0.0.1:1/0", deliver_on_commit=False)
    before = datetime.now(timezone.utc)
    with w.dm.context({"request_id": "r-1"}):
        result = w.work.apply_async((1,), countdown=60, expires=120, priority=3)
    after = datetime.now(timezone.utc)
    (row,) = _rows(w.outbox)
    payload = json.loads(row["payload"])
    options = kombu_json.loads(payload["options"])
    assert payload["id"] == result.id
    assert payload["task"] == "pdoutbox.work"
    assert before.timestamp() + 60 <= options["eta"].timestamp() <= after.timestamp() + 60
    assert before.timestamp() + 120 <= options["expires"].timestamp() <= after.timestamp() + 120
    assert options["headers"] == {"request_id": "r-1"}
    assert options["priority"] == 3
    assert "countdown" not in options
    w.app.close()
    w.db.dispose()


def test_broker_down_sends_wait_in_the_outbox_then_land(tmp_path: Path) -> None:
    """Broker stopped while 20 writers commit: each commit returns, rows wait, a relay delivers all 20."""
    # Persistent, as a broker must be: kombu's Redis transport drops a message
    # published after a restart that lost its queue bindings (docs/integrations/outbox.md).
    broker = PrivateRedis(persistent=True).start()
    try:
        w = wired(tmp_path, broker.url, backoff=0.05, max_backoff=0.1)
        broker.stop()
        ids: list[str] = []
        lock = threading.Lock()
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            try:
                with w.dm.context({"request_id": f"r{n}"}):
                    result = w.work.delay(n)
                with lock:
                    ids.append(result.id)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert errors == []
        assert not any(t.is_alive() for t in threads)  # no request hung on the dead broker
        assert w.outbox.status().pending == 20
        rows = _rows(w.outbox)
        # Each failed or was deferred (the sender does not knock again on a broker it
        # just found down: those rows wait without spending an attempt).
        assert all(r["last_error"] for r in rows)
        assert any(r["attempts"] >= 1 for r in rows)
        broker.start()  # the same port: the broker is back
        relay = w.outbox.relay()
        end = time.monotonic() + WAIT
        while w.outbox.status().pending and time.monotonic() < end:
            if relay.run_once() == 0:
                time.sleep(0.05)
        assert w.outbox.status().pending == 0
        assert w.outbox.status().dead == 0  # deferred sends spent no attempts
        queued = redis.Redis.from_url(broker.url).lrange("outboxq", 0, -1)
        sent = sorted(json.loads(m)["headers"]["id"] for m in queued)
        assert sent == sorted(ids)  # 0 lost, none twice, each with the id delay() returned
        w.app.close()
        w.db.dispose()
    finally:
        broker.close()


def test_immediate_send_skips_the_outbox(tmp_path: Path) -> None:
    """polydatum_immediate=True sends at once (here: fails at once, broker down) and writes no row."""
    w = wired(tmp_path, "redis://127.0.0.1:1/0")
    with w.dm.context(), pytest.raises(Exception, match=r"Connection refused|Error 111"):
        w.work.apply_async((1,), polydatum_immediate=True, retry=False)
    assert _rows(w.outbox) == []
    w.app.close()
    w.db.dispose()


def test_install_refuses_a_bad_outbox_or_inbox(tmp_path: Path) -> None:
    """outbox= must be an Outbox; inbox=True needs one."""
    dm = DataManager()
    with pytest.raises(TypeError, match=r"outbox must be a polydatum\.outbox\.Outbox"):
        install(Celery(set_as_current=False), dm, outbox="nope")
    with pytest.raises(TypeError, match="inbox=True needs outbox"):
        install(Celery(set_as_current=False), dm, inbox=True)
    with pytest.raises(TypeError, match="inbox must be True, False or"):
        install(Celery(set_as_current=False), dm, inbox="yes")


def test_a_message_the_broker_refuses_waits_in_the_outbox(tmp_path: Path, rabbitmq_url: str) -> None:
    """A RabbitMQ queue that refuses publishes when full (x-max-length 1, x-overflow reject-publish): a row
    is deleted only once the broker confirmed its message, so the refused ones wait, say why, and land
    as the queue drains; 0 lost, none twice."""
    name = f"pd-outbox-full-{uuid.uuid4().hex[:10]}"
    w = wired(tmp_path, rabbitmq_url, backoff=0.05, max_backoff=0.1, deliver_on_commit=False)
    w.app.conf.task_default_queue = name
    w.app.conf.task_queues = [
        Queue(name, queue_arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ]
    try:
        ids = []
        for n in range(3):
            with w.dm.context():
                ids.append(w.work.delay(n).id)
        relay = w.outbox.relay()
        relay.run_once()
        assert w.outbox.status().pending == 2  # one went in; the full queue refused two
        assert all("refused" in r["last_error"] for r in _rows(w.outbox))
        received: list[str] = []
        with w.app.connection_for_write() as connection:
            channel = connection.default_channel
            end = time.monotonic() + WAIT
            while len(received) < 3 and time.monotonic() < end:
                message = channel.basic_get(name, no_ack=True)
                if message is not None:
                    received.append(message.headers["id"])
                relay.run_once()
                time.sleep(0.06)  # past the rows' backoff
            assert w.outbox.status().pending == 0
            assert channel.basic_get(name, no_ack=True) is None
        assert sorted(received) == sorted(ids)
    finally:
        with w.app.connection_for_write() as connection:
            connection.default_channel.queue_delete(name)
        w.app.close()
        w.db.dispose()

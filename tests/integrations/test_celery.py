"""polydatum.celery with a real worker, RabbitMQ as broker, Redis for results, PostgreSQL for data.

One in-thread worker (solo pool, so messages run one at a time in the order
RabbitMQ delivers them) consumes a queue of this session's own. "Never ran"
is proven by sending a control task afterwards and waiting for it: by then
anything sent earlier has run.
"""

from __future__ import annotations

import pickle
import re
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from celery import Celery, _state, group
from celery.exceptions import Ignore
from celery.result import AsyncResult
from kombu.exceptions import EncodeError
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from polydatum import DataManager
from polydatum.celery import (
    PendingResult,
    PolydatumTask,
    TaskNotSent,
    check_header,
    install,
    send_immediately,
)
from polydatum.errors import AlreadyExistsException, InvalidInput
from polydatum.sqlalchemy import Database
from tests.support.celery_worker import close_suite_app, in_thread_worker, suite_app
from tests.support.sql import fresh_postgres_database

# Celery's Redis result backend still calls redis-py's deprecated setex().
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")

T = TypeVar("T")

WAIT = 20  # seconds; a ceiling for result.get(), never a pass/fail timing

# What task runs saw, by test token. The worker runs in this process, so a
# plain dict survives the rollback of the run that wrote to it.
RUNS: dict[str, list[dict[str, Any]]] = defaultdict(list)
RUNS_LOCK = threading.Lock()


def remember(token: str, **what: Any) -> None:
    """Record what a task run saw, under the test's token."""
    with RUNS_LOCK:
        RUNS[token].append(what)


def runs(token: str) -> list[dict[str, Any]]:
    """What task runs recorded under ``token``, in order."""
    with RUNS_LOCK:
        return list(RUNS[token])


SCHEMA = [
    "CREATE TABLE notes (id serial PRIMARY KEY, body text UNIQUE NOT NULL)",
    "CREATE TABLE counters (id int PRIMARY KEY, value int NOT NULL)",
    # Checked at COMMIT, so the body returns fine and the commit fails.
    "CREATE TABLE late_checks (k text, CONSTRAINT late_unique UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)",
]


def build(database_url: str, broker: str, backend: str, queue: str, prefix: str) -> SimpleNamespace:
    """The app under test: a DataManager with PostgreSQL, a Celery app, its tasks."""
    dm = DataManager()
    db = Database(database_url).install(dm)
    # A connection of its own, outside every context: the "other transaction".
    other = create_engine(database_url, poolclass=NullPool)

    app = suite_app("polydatum_celery_tests", broker, backend, queue, prefix)
    install(app, dm, meta=lambda task: {"hostname": task.request.hostname}, headers=("tenant", "user"))
    # A plain Celery app on the same queue: it sends what polydatum's sending side would refuse.
    forger = Celery("polydatum_celery_forger", broker=broker, set_as_current=False)
    forger.conf.update(
        task_default_queue=queue, task_serializer="json", broker_connection_retry_on_startup=True
    )

    def ctx() -> Any:
        return dm.require_active_context()

    def add_note(body: str) -> int:
        return int(
            ctx()
            .db.execute(text("INSERT INTO notes (body) VALUES (:b) RETURNING id"), {"b": body})
            .scalar_one()
        )

    @app.task(shared=False, name="pdtest.write_note")
    def write_note(body: str) -> int:
        return add_note(body)

    @app.task(shared=False, name="pdtest.write_then_fail")
    def write_then_fail(body: str) -> None:
        add_note(body)
        raise ValueError(f"failing after writing {body}")

    @app.task(shared=False, name="pdtest.read_note")
    def read_note(body: str) -> str | None:
        found = ctx().db.execute(text("SELECT body FROM notes WHERE body = :b"), {"b": body})
        return found.scalar_one_or_none()  # type: ignore[no-any-return]

    @app.task(shared=False, name="pdtest.record", bind=True)
    def record(self: Any, token: str, label: str) -> dict[str, Any]:
        meta = dict(ctx().meta)
        remember(token, label=label, meta=meta)
        return meta

    @app.task(shared=False, name="pdtest.retry_once", bind=True)
    def retry_once(self: Any, token: str) -> int:
        meta = dict(ctx().meta)
        add_note(f"{token}-attempt-{meta['retries']}")
        remember(token, meta=meta, ctx=id(ctx()))
        if meta["retries"] == 0:
            raise self.retry(countdown=0)
        return int(meta["retries"])

    def bump_counter(token: str, row: int, conflicts: int) -> int:
        """Read, let another transaction update the row, then write: SQLSTATE 40001."""
        session = ctx().db
        session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        retries = ctx().meta.retries
        remember(token, retries=retries)
        add_note(f"{token}-attempt-{retries}")
        value = session.execute(text("SELECT value FROM counters WHERE id = :i"), {"i": row}).scalar_one()
        if retries < conflicts:
            with other.begin() as conn:
                conn.execute(text("UPDATE counters SET value = value + 100 WHERE id = :i"), {"i": row})
        session.execute(text("UPDATE counters SET value = :v WHERE id = :i"), {"v": value + 1, "i": row})
        return int(retries)

    @app.task(shared=False, name="pdtest.conflict", retry_transient=2, retry_transient_backoff=0.01)
    def conflict(token: str, row: int, conflicts: int) -> int:
        return bump_counter(token, row, conflicts)

    @app.task(shared=False, name="pdtest.conflict_no_retry")
    def conflict_no_retry(token: str, row: int, conflicts: int) -> int:
        return bump_counter(token, row, conflicts)

    @app.task(shared=False, name="pdtest.divide_by_zero", retry_transient=3)
    def divide_by_zero(token: str) -> None:
        remember(token, retries=ctx().meta.retries)
        ctx().db.execute(text("SELECT 1 / 0"))

    @app.task(shared=False, name="pdtest.spawn", bind=True)
    def spawn(self: Any, token: str, fail: bool) -> str:
        child = record.delay(token, "child")
        remember(token, label="parent", child_id=child.id, pending=isinstance(child, PendingResult))
        if fail:
            raise RuntimeError("parent fails after sending a child")
        return str(child.id)

    @app.task(shared=False, name="pdtest.ignore")
    def ignore(body: str) -> None:
        add_note(body)
        raise Ignore()

    @app.task(shared=False, name="pdtest.commit_fails")
    def commit_fails(key: str) -> str:
        for _ in range(2):
            ctx().db.execute(text("INSERT INTO late_checks (k) VALUES (:k)"), {"k": key})
        return "the body returned"

    @app.task(shared=False, name="pdtest.typed")
    def typed(a: int, b: int) -> int:
        return a + b

    return SimpleNamespace(
        dm=dm,
        db=db,
        app=app,
        forger=forger,
        other=other,
        write_note=write_note,
        write_then_fail=write_then_fail,
        read_note=read_note,
        record=record,
        retry_once=retry_once,
        conflict=conflict,
        conflict_no_retry=conflict_no_retry,
        divide_by_zero=divide_by_zero,
        spawn=spawn,
        ignore=ignore,
        typed=typed,
        commit_fails=commit_fails,
    )


@pytest.fixture(scope="module")
def env(postgres_url: str, rabbitmq_url: str, redis_url: str) -> Iterator[SimpleNamespace]:
    """The app of :func:`build` on a fresh database, served by one solo worker on a queue of its own."""
    run = uuid.uuid4().hex[:10]
    queue = f"polydatum-test-celery-{run}"
    with fresh_postgres_database(postgres_url) as url:
        setup = create_engine(url, poolclass=NullPool)
        with setup.begin() as conn:
            for statement in SCHEMA:
                conn.execute(text(statement))
        setup.dispose()
        ns = build(url, rabbitmq_url, redis_url, queue, f"polydatum-test-celery-{run}:")
        try:
            with in_thread_worker(ns.app):
                yield ns
        finally:
            with ns.app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
            close_suite_app(ns.app)
            ns.forger.close()
            ns.db.dispose()
            ns.other.dispose()


class Rollback(Exception):
    """Raised to make a context roll back."""


def rolled_back(dm: DataManager, body: Callable[[Any], T]) -> T:
    """``body(ctx)`` in a context that then rolls back; what it returned."""
    try:
        with dm.context() as ctx:
            result = body(ctx)
            raise Rollback
    except Rollback:
        return result


def token() -> str:
    """A fresh token that names one test's task runs."""
    return uuid.uuid4().hex


def note_exists(env: SimpleNamespace, body: str) -> bool:
    """Whether a committed note with ``body`` exists, seen from outside every context."""
    with env.other.connect() as conn:
        found = conn.execute(text("SELECT count(*) FROM notes WHERE body = :b"), {"b": body})
        return bool(found.scalar_one())


def drain(env: SimpleNamespace) -> None:
    """Wait until everything sent before now has run (one solo worker, one queue)."""
    env.record.delay("drain", "control").get(timeout=WAIT)


# -- tasks run in contexts ---------------------------------------------------


def test_a_task_that_writes_commits(env: SimpleNamespace) -> None:
    """A task that returns commits what it wrote."""
    body = token()
    result = env.write_note.delay(body)
    assert not isinstance(result, PendingResult)  # no context: sent at once
    assert result.get(timeout=WAIT) > 0
    assert note_exists(env, body)


def test_a_task_that_raises_leaves_nothing(env: SimpleNamespace) -> None:
    """A task that raises fails and rolls back what it wrote."""
    body = token()
    result = env.write_then_fail.delay(body)
    with pytest.raises(ValueError, match="failing after writing"):
        result.get(timeout=WAIT)
    assert result.state == "FAILURE"
    assert not note_exists(env, body)


def test_a_task_whose_commit_fails_is_a_failed_task(env: SimpleNamespace) -> None:
    """A body that returns but whose commit fails is a FAILURE, and nothing is kept."""
    key = token()
    result = env.commit_fails.delay(key)
    result.get(timeout=WAIT, propagate=False)
    assert result.state == "FAILURE"
    assert "late_unique" in str(result.result)
    with env.other.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM late_checks WHERE k = :k"), {"k": key})
        assert left.scalar_one() == 0


def test_meta_inside_the_task(env: SimpleNamespace) -> None:
    """A task's meta holds its ids, its retries, the chosen headers and the meta function's keys."""
    result = env.record.delay(token(), "meta")
    meta = result.get(timeout=WAIT)
    assert meta["task_id"] == result.id
    assert meta["task_name"] == "pdtest.record"
    assert meta["retries"] == 0
    assert meta["parent_id"] is None
    assert meta["root_id"] == result.id
    assert meta["eager"] is False
    assert meta["tenant"] is None  # a chosen header that was not sent
    assert meta["hostname"]  # added by the user's meta function


def test_ignore_is_not_a_failure_and_commits(env: SimpleNamespace) -> None:
    """Celery's Ignore commits the run's writes."""
    body = token()
    env.ignore.delay(body)
    drain(env)
    assert note_exists(env, body)


# -- send on commit ----------------------------------------------------------


def test_a_task_sent_in_a_context_that_rolls_back_never_runs(env: SimpleNamespace) -> None:
    """A task sent in a context that rolls back is never sent, and its result says so."""
    tok = token()

    def body(ctx: Any) -> Any:
        ctx.db.execute(text("SELECT 1"))
        return env.record.delay(tok, "rolled back")

    result = rolled_back(env.dm, body)
    assert isinstance(result, PendingResult)
    drain(env)
    assert runs(tok) == []
    assert result.outcome == "discarded"
    with pytest.raises(TaskNotSent, match="never sent: the context that sent it rolled back"):
        result.get(timeout=WAIT)
    assert result.state == "PENDING"
    assert result.ready() is False
    assert result.result is None


def test_a_task_sent_in_a_context_runs_after_the_commit_is_visible(env: SimpleNamespace) -> None:
    """A task sent in a context is sent after the commit, so it sees what the sender wrote."""
    body = token()
    with env.dm.context() as ctx:
        ctx.db.execute(text("INSERT INTO notes (body) VALUES (:b)"), {"b": body})
        result = env.read_note.delay(body)
        assert isinstance(result, PendingResult)
        assert result.outcome == "waiting for commit"
        # Had it been sent already, the solo worker would run it before this
        # control task, and it would not see the uncommitted row.
        env.record.apply_async((token(), "control"), polydatum_immediate=True).get(timeout=WAIT)
        with pytest.raises(TaskNotSent, match="is sent when the context that sent it commits"):
            result.get(timeout=WAIT)
        assert result.ready() is False
        assert result.state == "PENDING"
    assert result.outcome == "sent"
    assert result.get(timeout=WAIT) == body
    assert result.ready() is True
    assert result.state == "SUCCESS"
    assert result.result == body


def test_the_id_is_fixed_up_front(env: SimpleNamespace) -> None:
    """A task sent in a context has its id (chosen or given) before it is sent."""
    chosen = str(uuid.uuid4())
    with env.dm.context():
        early = env.record.delay(token(), "early")
        given = env.record.apply_async((token(), "given"), task_id=chosen)
        stored_id = early.id
    assert given.id == chosen
    assert env.app.AsyncResult(stored_id).get(timeout=WAIT)["task_id"] == stored_id
    assert given.get(timeout=WAIT)["task_id"] == chosen


def test_immediate_send_inside_a_context_that_rolls_back(env: SimpleNamespace) -> None:
    """polydatum_immediate=True and send_immediately() send at once, even from a context that rolls back."""
    tok = token()

    def body(ctx: Any) -> tuple[Any, Any, Any]:
        now = env.record.apply_async((tok, "option"), polydatum_immediate=True)
        with send_immediately():
            block = env.record.delay(tok, "block")
        later = env.record.delay(tok, "deferred")
        # Both already ran while the context is still open.
        now.get(timeout=WAIT)
        block.get(timeout=WAIT)
        return now, block, later

    now, block, later = rolled_back(env.dm, body)
    assert not isinstance(now, PendingResult)
    assert not isinstance(block, PendingResult)
    drain(env)
    assert sorted(r["label"] for r in runs(tok)) == ["block", "option"]
    assert later.outcome == "discarded"


def test_headers_follow_the_context_meta(env: SimpleNamespace) -> None:
    """A task sent from a context carries the meta's chosen headers, unless the call gives its own."""
    with env.dm.context({"tenant": "acme"}):
        inherited = env.record.delay(token(), "inherited")
        explicit = env.record.apply_async((token(), "explicit"), headers={"tenant": "other"})
    assert inherited.get(timeout=WAIT)["tenant"] == "acme"
    assert explicit.get(timeout=WAIT)["tenant"] == "other"


def forged(env: SimpleNamespace, name: str, args: tuple[Any, ...], **options: Any) -> AsyncResult:
    """Send ``name`` from the plain app (no polydatum sending side); its result through the real app."""
    sent = env.forger.send_task(name, args, **options)
    return env.app.AsyncResult(sent.id)


def test_a_forged_header_that_is_valid_reaches_the_meta(env: SimpleNamespace) -> None:
    """A header from a sender without polydatum still reaches the meta when it keeps the rules."""
    tok = token()
    result = forged(env, "pdtest.record", (tok, "forged"), headers={"tenant": "acme", "user": 7})
    meta = result.get(timeout=WAIT)
    assert (meta["tenant"], meta["user"]) == ("acme", 7)


@pytest.mark.parametrize(
    ("header", "value", "problem"),
    [
        ("user", {"id": 1, "admin": True}, "message header 'user' is a dict; only str, int, float and bool"),
        ("user", [1, 2], "message header 'user' is a list"),
        (
            "tenant",
            "x" * 100_000,
            "message header 'tenant' is 100000 characters long; header values have at most 200",
        ),
        ("tenant", "acme\x1b[2J\x00", "message header 'tenant' holds an unprintable character"),
    ],
    ids=["dict", "list", "100-kB-str", "escapes"],
)
def test_a_forged_header_is_refused_before_the_body_runs(
    env: SimpleNamespace, header: str, value: Any, problem: str
) -> None:
    """A message whose header breaks the sending side's rules fails without running the body."""
    tok = token()
    # With a valid value of the other header, which must not save the message either.
    other = "tenant" if header == "user" else "user"
    result = forged(env, "pdtest.record", (tok, "forged"), headers={header: value, other: 1})
    result.get(timeout=WAIT, propagate=False)
    assert result.state == "FAILURE"
    assert isinstance(result.result, InvalidInput)
    message = str(result.result)
    assert message.startswith(f"task pdtest.record refused before it ran: {problem}")
    # The value is never repeated.
    assert "xxxx" not in message
    assert "acme" not in message
    drain(env)
    assert runs(tok) == []


def test_the_sending_side_refuses_what_the_worker_refuses(env: SimpleNamespace) -> None:
    """Headers the worker would refuse fail at delay(), from the meta or given, in a context or not."""
    too_long = "meta 'tenant' is 201 characters long; header values have at most 200: put an id in the meta"
    with env.dm.context({"tenant": "t" * 201}), pytest.raises(ValueError, match=too_long):
        env.record.delay(token(), "never")
    unprintable = "meta 'user' holds an unprintable character"
    with env.dm.context({"user": "ann\n"}), pytest.raises(ValueError, match=unprintable):
        env.record.delay(token(), "never")
    with pytest.raises(TypeError, match="header 'user' is a dict; only str, int, float and bool"):
        env.record.apply_async((token(), "never"), headers={"user": {"id": 1}})
    with env.dm.context(), pytest.raises(ValueError, match="header 'tenant' is 300 characters long"):
        env.record.apply_async((token(), "never"), headers={"tenant": "t" * 300})
    # A header the app did not name is Celery's business, as before.
    assert env.record.apply_async((token(), "other"), headers={"other": "o" * 300}).get(timeout=WAIT)


@pytest.mark.parametrize(
    ("value", "error", "problem"),
    [
        (2**63, ValueError, "is an int beyond 64 bits"),
        (-(2**63) - 1, ValueError, "is an int beyond 64 bits"),
        (float("nan"), ValueError, "is nan; a float header must be finite"),
        (float("-inf"), ValueError, "is -inf; a float header must be finite"),
        (b"bytes", TypeError, "is a bytes; only str, int, float and bool"),
        ("\ud800", ValueError, "holds an unprintable character"),
    ],
    ids=["big-int", "big-negative-int", "nan", "inf", "bytes", "lone-surrogate"],
)
def test_check_header_refuses(value: Any, error: type[Exception], problem: str) -> None:
    """check_header refuses what an AMQP header or a log line cannot take safely."""
    with pytest.raises(error, match=re.escape(f"header 'h' {problem}")):
        check_header("header 'h'", value)


def test_check_header_accepts_the_edges() -> None:
    """check_header lets None, bools, 64-bit ints, finite floats and 200 printable characters through."""
    for value in (None, True, 2**63 - 1, -(2**63), 1.5, "é" * 200, "a b"):
        check_header("header 'h'", value)


def test_a_child_sent_by_a_task_waits_for_the_task_to_commit(env: SimpleNamespace) -> None:
    """A task sent by a task body is sent when that run commits, with its parent and root ids."""
    tok = token()
    parent = env.spawn.delay(tok, False)
    child_id = parent.get(timeout=WAIT)
    child = env.app.AsyncResult(child_id).get(timeout=WAIT)
    assert child["parent_id"] == parent.id
    assert child["root_id"] == parent.id
    assert runs(tok)[0] == {"label": "parent", "child_id": child_id, "pending": True}


def test_a_child_sent_by_a_failing_task_is_never_sent(env: SimpleNamespace) -> None:
    """A task sent by a task body that fails is never sent."""
    tok = token()
    parent = env.spawn.delay(tok, True)
    with pytest.raises(RuntimeError, match="parent fails"):
        parent.get(timeout=WAIT)
    drain(env)
    assert [r["label"] for r in runs(tok)] == ["parent"]


def test_a_canvas_sent_in_a_context_waits_for_the_commit(env: SimpleNamespace) -> None:
    """Chains and groups sent in a context are sent on commit, and not at all on rollback."""
    kept, dropped = token(), token()
    with env.dm.context():
        flow = (env.write_note.si(f"{kept}-a") | env.write_note.si(f"{kept}-b")).apply_async()
        fan = group(env.record.si(kept, "g1"), env.record.si(kept, "g2")).apply_async()
    flow.get(timeout=WAIT)
    fan.get(timeout=WAIT)
    assert note_exists(env, f"{kept}-a")
    assert note_exists(env, f"{kept}-b")
    assert sorted(r["label"] for r in runs(kept)) == ["g1", "g2"]

    def body(ctx: Any) -> None:
        (env.write_note.si(f"{dropped}-a") | env.write_note.si(f"{dropped}-b")).apply_async()
        group(env.record.si(dropped, "g1"), env.record.si(dropped, "g2")).apply_async()

    rolled_back(env.dm, body)
    drain(env)
    assert not note_exists(env, f"{dropped}-a")
    assert runs(dropped) == []


# -- retries -----------------------------------------------------------------


def test_a_retry_gets_a_fresh_context(env: SimpleNamespace) -> None:
    """Each run of a retried task has its own context, and the headers survive the retry."""
    tok = token()
    with env.dm.context({"tenant": "acme"}):
        result = env.retry_once.delay(tok)
    assert result.get(timeout=WAIT) == 1
    first, second = runs(tok)
    assert [first["meta"]["retries"], second["meta"]["retries"]] == [0, 1]
    assert first["meta"]["task_id"] == second["meta"]["task_id"] == result.id
    assert first["meta"]["tenant"] == second["meta"]["tenant"] == "acme"  # the header survives a retry
    assert not note_exists(env, f"{tok}-attempt-0")  # the first run rolled back
    assert note_exists(env, f"{tok}-attempt-1")


def counter(env: SimpleNamespace) -> int:
    """A fresh counters row at 0; its id."""
    row = uuid.uuid4().int % 2_000_000_000
    with env.other.begin() as conn:
        conn.execute(text("INSERT INTO counters (id, value) VALUES (:i, 0)"), {"i": row})
    return row


def counter_value(env: SimpleNamespace, row: int) -> int:
    """The committed value of counters row ``row``."""
    with env.other.connect() as conn:
        return int(conn.execute(text("SELECT value FROM counters WHERE id = :i"), {"i": row}).scalar_one())


def test_a_transient_error_is_retried_in_a_fresh_context(env: SimpleNamespace) -> None:
    """A run that hit SQLSTATE 40001 is rolled back and retried in a fresh context."""
    tok, row = token(), counter(env)
    result = env.conflict.delay(tok, row, 1)  # the first run hits a real SQLSTATE 40001
    assert result.get(timeout=WAIT) == 1
    assert [r["retries"] for r in runs(tok)] == [0, 1]
    assert counter_value(env, row) == 101  # the other transaction's +100, then the retry's +1
    assert not note_exists(env, f"{tok}-attempt-0")
    assert note_exists(env, f"{tok}-attempt-1")


def test_transient_retries_run_out(env: SimpleNamespace) -> None:
    """After retry_transient retries the task fails with the database error, and nothing is kept."""
    tok, row = token(), counter(env)
    result = env.conflict.delay(tok, row, 10)  # retry_transient=2: three runs in all
    result.get(timeout=WAIT, propagate=False)
    assert result.state == "FAILURE"
    assert "could not serialize access" in str(result.result)
    assert [r["retries"] for r in runs(tok)] == [0, 1, 2]
    assert counter_value(env, row) == 300
    assert not any(note_exists(env, f"{tok}-attempt-{n}") for n in range(3))


@pytest.mark.parametrize(
    ("option", "field", "value", "problem"),
    [
        ("parent_id", "parent_id", {"nested": ["x" * 20_000]}, "is a dict"),
        ("root_id", "root_id", "\x1b]0;pwned\x07" + "r" * 50, "holds an unprintable character"),
        ("root_id", "root_id", "r" * 20_010, "is 20010 characters long"),
        ("task_id", "id", "job-\x1b[2J\x1b[31m", "holds an unprintable character"),
    ],
    ids=["parent-dict", "root-escape", "root-20k", "id-escape"],
)
def test_a_forged_task_id_is_refused_before_the_body_runs(
    env: SimpleNamespace, option: str, field: str, value: Any, problem: str
) -> None:
    """A message's own id, parent id and root id go into the meta tasks log: junk in them (from a sender
    without polydatum) fails the task before it runs, naming the field, never echoing the value."""
    tok = token()
    result = forged(env, "pdtest.record", (tok, "forged"), **{option: value})
    result.get(timeout=WAIT, propagate=False)
    assert result.state == "FAILURE"
    assert isinstance(result.result, InvalidInput)
    text = str(result.result)
    assert f"refused before it ran: its message's {field} {problem}" in text
    assert "so it is not a task id" in text
    assert not any(echo in text for echo in ("pwned", "\x1b", "x" * 100))
    drain(env)
    assert runs(tok) == []


@pytest.mark.parametrize("retries", [-20, "0", 1.0, None], ids=["negative", "str", "float", "null"])
def test_a_forged_retries_count_is_refused(env: SimpleNamespace, retries: Any) -> None:
    """A message whose retries is not a count of at least 0 fails before it runs, so it buys no extra runs."""
    tok, row = token(), counter(env)
    result = forged(env, "pdtest.conflict", (tok, row, 100), retries=retries)
    result.get(timeout=WAIT, propagate=False)
    assert result.state == "FAILURE"
    assert isinstance(result.result, InvalidInput)
    assert "refused before it ran: its message's retries is" in str(result.result)
    drain(env)
    assert runs(tok) == []
    assert counter_value(env, row) == 0


def test_a_forged_retries_count_only_lowers_the_runs_left(env: SimpleNamespace) -> None:
    """A message that claims earlier runs gets fewer transient retries, never more than retry_transient."""
    tok, row = token(), counter(env)
    result = forged(env, "pdtest.conflict", (tok, row, 100), retries=1)
    result.get(timeout=WAIT, propagate=False)
    assert "could not serialize access" in str(result.result)
    assert [r["retries"] for r in runs(tok)] == [1, 2]


def test_no_transient_retry_unless_asked(env: SimpleNamespace) -> None:
    """A task without retry_transient is not retried after a transient error."""
    tok, row = token(), counter(env)
    result = env.conflict_no_retry.delay(tok, row, 1)
    result.get(timeout=WAIT, propagate=False)
    assert result.state == "FAILURE"
    assert "could not serialize access" in str(result.result)
    assert [r["retries"] for r in runs(tok)] == [0]


def test_other_database_errors_are_not_retried(env: SimpleNamespace) -> None:
    """A database error that is not transient is not retried."""
    tok = token()
    result = env.divide_by_zero.delay(tok)
    result.get(timeout=WAIT, propagate=False)
    assert result.state == "FAILURE"
    assert "division by zero" in str(result.result)
    assert [r["retries"] for r in runs(tok)] == [0]


# -- errors at the call site -------------------------------------------------


def test_bad_arguments_fail_at_the_call_not_at_commit(env: SimpleNamespace) -> None:
    """Bad arguments, options and meta headers fail at delay(), not in the commit hook."""
    with env.dm.context({"tenant": object()}) as ctx:
        with pytest.raises(TypeError, match="meta 'tenant' is a object; only str, int, float and bool"):
            env.typed.delay(1, 2)
        sent_anyway = env.typed.apply_async((2, 2), headers={"tenant": "given"})
    with env.dm.context() as ctx:
        with pytest.raises(TypeError):
            env.typed.delay(1)
        with pytest.raises(EncodeError):
            env.typed.delay(1, object())
        with pytest.raises(TypeError, match="polydatum_immediate must be True or False"):
            env.typed.apply_async((1, 2), polydatum_immediate="yes")
        sent = env.typed.delay(1, 2)
    assert ctx.get_hook_errors() == []
    assert sent.get(timeout=WAIT) == 3
    assert sent_anyway.get(timeout=WAIT) == 4


def test_a_send_that_fails_at_commit_is_reported(env: SimpleNamespace) -> None:
    """A send that fails at commit is a hook error, and the result raises TaskNotSent with the cause."""
    dm = DataManager()
    app = Celery(
        "polydatum_celery_dead_broker", broker="amqp://guest:guest@127.0.0.1:1//", set_as_current=False
    )
    app.conf.update(
        task_publish_retry=False,
        broker_connection_timeout=1,
        broker_connection_retry=False,
        broker_connection_max_retries=0,
    )
    install(app, dm)

    @app.task(shared=False, name="pdtest.nowhere")
    def nowhere() -> None:  # pragma: no cover - never runs
        pass

    with dm.context() as ctx:
        result = nowhere.delay()
    assert result.outcome == "send failed"
    assert result.send_error is not None
    assert len(ctx.get_hook_errors()) == 1
    with pytest.raises(TaskNotSent, match="could not be sent when its context committed"):
        result.get()


# -- eager mode and direct calls (no worker) ---------------------------------


@pytest.fixture
def eager() -> SimpleNamespace:
    """An eager-mode app (no broker, no worker) with a task that records its context."""
    dm = DataManager()
    app = Celery("polydatum_celery_eager", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, task_store_eager_result=False)
    seen: list[dict[str, Any]] = []

    def meta(task: Any) -> Any:
        # A direct call has no request yet: no kwargs.
        if (task.request.kwargs or {}).get("bad_meta"):
            return ["not", "a", "mapping"]
        return {"who": "eager"}

    install(app, dm, meta=meta)

    @app.task(shared=False, name="pdtest.eager.note")
    def note(label: str, bad_meta: bool = False) -> str:
        ctx = dm.require_active_context()
        seen.append({"label": label, "ctx": ctx, "meta": dict(ctx.meta)})
        return label.upper()

    return SimpleNamespace(dm=dm, app=app, note=note, seen=seen)


def test_eager_mode_runs_on_commit(eager: SimpleNamespace) -> None:
    """In eager mode a task sent in a context runs when it commits, and not at all on rollback."""
    with eager.dm.context():
        result = eager.note.delay("a")
        assert eager.seen == []
    assert result.get() == "A"
    assert result.state == "SUCCESS"
    assert eager.seen[0]["meta"]["eager"] is True
    assert eager.seen[0]["meta"]["who"] == "eager"

    dropped = rolled_back(eager.dm, lambda ctx: eager.note.delay("b"))
    assert [s["label"] for s in eager.seen] == ["a"]
    assert dropped.outcome == "discarded"


def test_the_send_waits_for_the_innermost_context(eager: SimpleNamespace) -> None:
    """A send waits for the innermost context: an inner commit sends even if the outer one rolls back."""

    def body(ctx: Any) -> tuple[Any, Any]:
        with eager.dm.context():
            inner = eager.note.delay("inner")
        assert [s["label"] for s in eager.seen] == ["inner"]  # ran when the inner context committed
        return inner, eager.note.delay("outer")

    inner, outer = rolled_back(eager.dm, body)
    assert inner.outcome == "sent"
    assert outer.outcome == "discarded"
    assert [s["label"] for s in eager.seen] == ["inner"]


def test_direct_calls_join_the_open_context(eager: SimpleNamespace) -> None:
    """Calling a task function directly joins the open context, or opens one when none is open."""
    with eager.dm.context() as ctx:
        assert eager.note("inside") == "INSIDE"
    assert eager.seen[0]["ctx"] is ctx
    assert eager.note("outside") == "OUTSIDE"  # no context open: the call opens one
    assert eager.seen[1]["ctx"] is not ctx
    assert eager.seen[1]["meta"]["task_id"] is None


async def test_a_task_sent_from_an_async_context_waits_for_its_commit(eager: SimpleNamespace) -> None:
    """A task sent from an async context is sent when that context commits."""
    async with eager.dm.context():
        pending = eager.note.delay("async")
        assert eager.seen == []
    assert pending.get() == "ASYNC"


def test_a_meta_function_must_return_a_mapping(eager: SimpleNamespace) -> None:
    """A meta function that returns no mapping fails the task before its body runs."""
    with pytest.raises(TypeError, match="meta\\(task\\) must return a mapping, got list"):
        eager.note.apply(("x",), {"bad_meta": True}).get()
    assert eager.seen == []  # the body never ran


def test_apply_refuses_a_task_id_that_could_not_be_one_and_keeps_a_plain_one(eager: SimpleNamespace) -> None:
    """apply(task_id=...) is checked like a message's: a 201-character id fails before the body; a
    200-character one, and one with non-ASCII letters, reach the meta as they are."""
    with pytest.raises(InvalidInput, match="its message's id is 201 characters long, so it is not a task id"):
        eager.note.apply(("x",), task_id="t" * 201).get()
    assert eager.seen == []
    eager.note.apply(("x",), task_id="t" * 200).get()
    eager.note.apply(("y",), task_id="tâche-7").get()
    ident = uuid.uuid4()
    eager.note.apply(("z",), task_id=ident).get()  # Celery takes a UUID or an int as they are
    eager.note.apply(("w",), task_id=12345).get()
    assert [m["meta"]["task_id"] for m in eager.seen] == ["t" * 200, "tâche-7", str(ident), "12345"]


@pytest.mark.parametrize(
    ("retries", "problem"), [(-1, "negative"), (2**63, "beyond 64 bits"), (True, "a bool")]
)
def test_apply_refuses_a_retries_count_too(eager: SimpleNamespace, retries: Any, problem: str) -> None:
    """apply(retries=...) with no count of earlier runs fails before the body, as a message would."""
    with pytest.raises(
        InvalidInput,
        match=f"task pdtest.eager.note refused before it ran: its message's "
        f"retries is {problem}, not a count",
    ):
        eager.note.apply(("x",), retries=retries).get()
    assert eager.seen == []


def test_retry_if_chooses_what_is_transient() -> None:
    """retry_if chooses which errors are retried, each run in a fresh context, up to the limit."""
    dm = DataManager()
    app = Celery("polydatum_celery_retry_if", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, task_store_eager_result=False)
    install(
        app,
        dm,
        retry_transient=2,
        retry_transient_backoff=0,
        retry_if=lambda exc: isinstance(exc, ConnectionError),
    )
    contexts: list[Any] = []

    @app.task(shared=False, name="pdtest.flaky", bind=True)
    def flaky(self: Any, failures: int, error: str) -> int:
        contexts.append(dm.require_active_context())
        if self.request.retries < failures:
            raise ConnectionError("gone") if error == "connection" else LookupError("not transient")
        return int(self.request.retries)

    assert flaky.apply((2, "connection")).get() == 2
    assert len({id(c) for c in contexts}) == 3  # a context per run
    assert [c.meta.retries for c in contexts] == [0, 1, 2]
    contexts.clear()
    with pytest.raises(ConnectionError, match="gone"):
        flaky.apply((3, "connection")).get()  # three runs in all, then the error
    assert len(contexts) == 3
    contexts.clear()
    with pytest.raises(LookupError):
        flaky.apply((1, "lookup")).get()
    assert len(contexts) == 1
    # Celery's autoretry_for still uses its own limit afterwards (max_retries=3 by default).
    assert "override_max_retries" not in vars(flaky)


def test_celery_autoretry_for_gets_a_fresh_context_per_run() -> None:
    """Celery's autoretry_for retries run in a fresh context each."""
    dm = DataManager()
    app = Celery("polydatum_celery_autoretry", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, task_store_eager_result=False)
    install(app, dm)
    contexts: list[Any] = []

    @app.task(
        shared=False,
        name="pdtest.auto",
        bind=True,
        autoretry_for=(ConnectionError,),
        max_retries=2,
        default_retry_delay=0,
    )
    def auto(self: Any) -> int:
        contexts.append(dm.require_active_context())
        if self.request.retries < 2:
            raise ConnectionError("gone")
        return int(self.request.retries)

    assert auto.apply().get() == 2
    assert [c.meta.retries for c in contexts] == [0, 1, 2]
    assert len({id(c) for c in contexts}) == 3


def test_a_pending_result_pickles_as_a_plain_result(eager: SimpleNamespace) -> None:
    """A PendingResult pickles as a plain AsyncResult of the same id."""
    with eager.dm.context():
        pending = eager.note.delay("p")
        copy = pickle.loads(pickle.dumps(pending))
    assert type(copy) is AsyncResult
    assert copy.id == pending.id


# -- install -----------------------------------------------------------------


def test_install_refuses_bad_input() -> None:
    """install() refuses bad arguments and installs nothing."""
    dm = DataManager()
    app = Celery("polydatum_celery_bad", broker="memory://", set_as_current=False)
    with pytest.raises(TypeError, match=re.escape("needs a celery.Celery app, got object")):
        install(object(), dm)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a polydatum DataManager, got dict"):
        install(app, {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="meta must be a callable or None"):
        install(app, dm, meta=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retry_if must be a callable or None"):
        install(app, dm, retry_if="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="headers must be a sequence of header names"):
        install(app, dm, headers="tenant")
    with pytest.raises(TypeError, match="headers must be non-empty strings"):
        install(app, dm, headers=("",))
    with pytest.raises(ValueError, match="header 'retries' is one Celery uses itself"):
        install(app, dm, headers=("retries",))
    for own in ("task_id", "task_name", "eager", "polydatum_min_position"):
        with pytest.raises(ValueError, match=f"header '{own}' names meta polydatum sets for every task"):
            install(app, dm, headers=(own,))
    with pytest.raises(ValueError, match="retry_transient must be an int of at least 0"):
        install(app, dm, retry_transient=-1)
    with pytest.raises(ValueError, match="retry_transient must be an int of at least 0"):
        install(app, dm, retry_transient=True)
    with pytest.raises(ValueError, match="retry_transient_backoff must be a number of seconds"):
        install(app, dm, retry_transient_backoff=-0.5)
    assert not issubclass(app.Task, PolydatumTask)  # nothing was installed


def test_install_twice() -> None:
    """Installing twice on one app raises AlreadyExistsException."""
    app = Celery("polydatum_celery_twice", broker="memory://", set_as_current=False)
    base = install(app, DataManager())
    assert app.Task is base
    with pytest.raises(AlreadyExistsException, match="already installed"):
        install(app, DataManager())


def test_install_after_tasks_were_made() -> None:
    """install() refuses an app that already made tasks, naming them."""
    app = Celery("polydatum_celery_late", broker="memory://", set_as_current=False)

    @app.task(shared=False, name="pdtest.late.early_bird", lazy=False)
    def early_bird() -> None:  # pragma: no cover - never runs
        pass

    with pytest.raises(RuntimeError, match=re.escape("made tasks pdtest.late.early_bird; call polydatum")):
        install(app, DataManager())


def test_a_bad_task_option_fails_when_the_task_is_made() -> None:
    """A bad retry_transient task option fails when the task is made."""
    app = Celery("polydatum_celery_option", broker="memory://", set_as_current=False)
    install(app, DataManager())
    with pytest.raises(ValueError, match=re.escape("task pdtest.opt.bad: retry_transient must be an int")):

        @app.task(shared=False, name="pdtest.opt.bad", retry_transient=-2, lazy=False)
        def bad() -> None:  # pragma: no cover - never made
            pass


def test_a_polydatum_task_without_install() -> None:
    """A PolydatumTask with no DataManager fails when run or sent, naming install()."""
    app = Celery("polydatum_celery_bare", broker="memory://", set_as_current=False)

    @app.task(shared=False, name="pdtest.bare.lonely", base=PolydatumTask, lazy=False)
    def lonely() -> None:  # pragma: no cover - never runs
        pass

    with pytest.raises(RuntimeError, match=re.escape("no DataManager; wire the app with polydatum.celery")):
        lonely()
    with pytest.raises(RuntimeError, match="no DataManager"):
        lonely.delay()


def test_overlapping_eager_runs_on_two_threads_leave_results_gettable() -> None:
    """Eager runs that overlap on two threads leave ``AsyncResult.get()`` usable afterwards.

    Celery keeps "inside a task" in one process-wide flag that each eager run
    saves and restores; the interleaving below (A starts, B starts, A ends,
    B ends) used to leave it set, and a threaded development server in eager
    mode then failed every later ``.get()`` with "Never call result.get()
    within a task!".
    """
    dm = DataManager()
    app = Celery("polydatum_celery_eager_threads", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, task_store_eager_result=False)
    install(app, dm)
    started = {name: threading.Event() for name in ("a", "b")}
    go = {name: threading.Event() for name in ("a", "b")}

    @app.task(shared=False, name="pdtest.eager.overlap")
    def overlap(name: str) -> str:
        started[name].set()
        assert go[name].wait(10)
        return name

    @app.task(shared=False, name="pdtest.eager.plain")
    def plain() -> int:
        return 7

    def run(name: str) -> None:
        with dm.context():  # sent at commit, the way a request sends it
            overlap.delay(name)

    threads = {name: threading.Thread(target=run, args=(name,)) for name in ("a", "b")}
    try:
        threads["a"].start()
        assert started["a"].wait(10)
        threads["b"].start()
        assert started["b"].wait(10)
        go["a"].set()
        threads["a"].join(10)
        go["b"].set()
        threads["b"].join(10)
        assert plain.delay().get() == 7
    finally:
        for event in go.values():
            event.set()
        for thread in threads.values():
            thread.join(10)
        _state._set_task_join_will_block(False)  # never leak it to later tests

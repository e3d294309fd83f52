"""The notes example and its hand-written twin (benchmarks/twin) do the same work: checked, not timed.

Both apps run in this process on their own fresh PostgreSQL database, Redis
namespace, S3 bucket (moto server) and RabbitMQ queue (no worker: the
messages stay in the queue to be compared). The scripted session of
tests/load/twin_session.py runs against each; then the transcripts
(statuses and bodies), the database rows, the cache entries, the blobs and
the queued Celery messages must be the same.

Normalized, because they must differ: the Celery task ids (random), the
users' ``created`` timestamps, the expiry time inside cached entries, the
random part of blob keys (replaced by their order of appearance), the
cache namespace, the values sent to Redis (random claim tokens, expiry
times) and the digest of the cache's compare-and-set script (the twin's
Lua text is its own). Nothing else.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.pool import NullPool

from tests.load.twin_session import REQUESTS, run_session
from tests.support.s3 import REGION, MotoServer
from tests.support.s3 import moto_server_fixture as moto_server_fixture
from tests.support.sql import fresh_postgres_database

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

TABLES = {
    "users": "SELECT id, name FROM users ORDER BY id",
    "notebooks": "SELECT id, owner_id, name FROM notebooks ORDER BY id",
    "notes": "SELECT id, notebook_id, owner_id, title, text, version FROM notes ORDER BY id",
    "attachments": "SELECT id, note_id, owner_id, name, content_type, size, key FROM attachments ORDER BY id",
    "note_index": "SELECT note_id, version FROM note_index ORDER BY note_id",
    "note_words": "SELECT note_id, word, count FROM note_words ORDER BY note_id, word",
    "polydatum_outbox": "SELECT topic, payload, dead FROM polydatum_outbox ORDER BY id",
}
_UUID_HEX = re.compile(r"[0-9a-f]{32}")


def _environ(stack: ExitStack, request: pytest.FixtureRequest, moto: MotoServer) -> dict[str, str]:
    run = uuid.uuid4().hex[:10]
    return {
        "DATABASE_URL": stack.enter_context(fresh_postgres_database(request.getfixturevalue("postgres_url"))),
        "REDIS_URL": request.getfixturevalue("redis_url"),
        "CACHE_NAMESPACE": f"twin-test-{run}",
        "BLOB_URL": f"s3://{moto.create_bucket(f'twin-{run}')}/notes-app",
        "AWS_ENDPOINT_URL": moto.endpoint_url,
        "CELERY_BROKER_URL": request.getfixturevalue("rabbitmq_url"),
        "CELERY_QUEUE": f"twin-test-{run}",
    }


@pytest.fixture(scope="module")
def credentials() -> Iterator[None]:
    """moto's fake AWS credentials in the environment, where boto3 looks for them."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in (
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", REGION),
        ):
            env.setenv(name, value)
        yield


def _recording(
    stack: ExitStack, app: Any, engine: Any, namespace: str, *, asgi: bool = False
) -> tuple[Any, list[list[tuple[str, ...]]]]:
    """``app`` (WSGI; ASGI with ``asgi``) wrapped to record, per request, what it sends to the servers.

    PostgreSQL, Redis and S3: SQL from the request's threads (with BEGIN/COMMIT/ROLLBACK; not the
    outbox's deleting thread), Redis commands with random values and script
    digests masked, and S3 operations with their (normalized) keys.
    """
    import botocore.client
    import redis

    calls: list[list[tuple[str, ...]]] = []
    main = threading.get_ident()
    keys: dict[str, str] = {}

    def request_thread() -> bool:
        if asgi:  # the event loop's thread and the thread pool's
            return not threading.current_thread().name.endswith("-outbox-deleter")
        return threading.get_ident() == main

    def record(*call: str) -> None:
        if calls:
            calls[-1].append(call)

    def sql(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if request_thread():
            record("sql", " ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", sql)
    for name in ("begin", "commit", "rollback"):
        event.listen(
            engine,
            name,
            lambda conn, name=name: record("sql", name.upper()) if request_thread() else None,
        )

    def mask(arg: Any) -> str:
        if isinstance(arg, bytes):
            return "<bytes>"
        text = str(arg).replace(namespace, "<ns>")
        return _UUID_HEX.sub(lambda m: keys.setdefault(m.group(0), f"<blob {len(keys)}>"), text)

    execute = redis.Redis.execute_command

    def redis_command(client: Any, *args: Any, **options: Any) -> Any:
        if args and args[0] == "SCRIPT LOAD":
            # Whether the server still has a script depends on what ran before (on the
            # shared Redis, in any order): the reload and its failed EVALSHA are not the app's.
            return execute(client, *args, **options)
        shown = ("EVALSHA", "<sha>", *args[2:]) if args and args[0] == "EVALSHA" else args
        call = ("redis", *map(mask, shown))
        record(*call)
        try:
            return execute(client, *args, **options)
        except redis.exceptions.NoScriptError:
            sent = calls[-1]
            del sent[len(sent) - 1 - sent[::-1].index(call)]
            raise

    api = botocore.client.BaseClient._make_api_call

    def s3_call(client: Any, operation: str, params: dict[str, Any]) -> Any:
        record("s3", operation, mask(params.get("Key", "")))
        return api(client, operation, params)

    patch = stack.enter_context(pytest.MonkeyPatch.context())
    patch.setattr(redis.Redis, "execute_command", redis_command)
    patch.setattr(botocore.client.BaseClient, "_make_api_call", s3_call)

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        calls.append([])
        return app(environ, start_response)

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            calls.append([])
        await app(scope, receive, send)

    return (asgi_app if asgi else wsgi), calls


def _run_example(request: pytest.FixtureRequest, moto: MotoServer) -> SimpleNamespace:
    from notes import Settings, build

    with ExitStack() as stack:
        env = _environ(stack, request, moto)
        app = build(Settings.from_env(env))
        stack.callback(app.close)
        app.create_tables()
        stack.callback(_delete_queue, env)
        stack.callback(app.cache.clear)
        wsgi, calls = _recording(stack, app.wsgi(), app.db.engine, env["CACHE_NAMESPACE"])
        transcript = run_session(wsgi)
        statements = [list(c) for c in calls]  # not what the checks below send
        assert app.outbox is not None
        app.outbox.flush()  # the delivered rows' DELETE, batched off the request path
        return SimpleNamespace(transcript=transcript, statements=statements, state=_state(env))


def _run_twin(request: pytest.FixtureRequest, moto: MotoServer) -> SimpleNamespace:
    import twin
    from twin.models import Base

    with ExitStack() as stack:
        env = _environ(stack, request, moto)
        app = twin.wsgi(env)
        stack.callback(app.r.close)
        Base.metadata.create_all(app.r.engine)
        stack.callback(_delete_queue, env)
        stack.callback(_clear_cache, env)
        wsgi, calls = _recording(stack, app, app.r.engine, env["CACHE_NAMESPACE"])
        transcript = run_session(wsgi)
        statements = [list(c) for c in calls]
        app.r.outbox.flush()
        return SimpleNamespace(transcript=transcript, statements=statements, state=_state(env))


def _state(env: dict[str, str]) -> dict[str, Any]:
    """What the app left behind, normalized (see the module docs)."""
    import boto3
    import redis
    from kombu import Connection

    keys: dict[str, str] = {}

    def key(text: str) -> str:  # the random part of a blob key, by order of appearance
        return _UUID_HEX.sub(lambda m: keys.setdefault(m.group(0), f"<blob {len(keys)}>"), text)

    engine = create_engine(env["DATABASE_URL"], poolclass=NullPool)
    with engine.connect() as conn:
        rows = {name: [tuple(r) for r in conn.execute(text(query))] for name, query in TABLES.items()}
    engine.dispose()
    rows["attachments"] = [(*r[:-1], key(r[-1])) for r in rows["attachments"]]

    namespace = env["CACHE_NAMESPACE"]
    client = redis.Redis.from_url(env["REDIS_URL"])
    cache = {}
    for name in client.scan_iter(match=f"{namespace}:*"):
        data = client.get(name)
        if data is not None and data[:1] == b"j":
            value: Any = json.loads(data[1:])
            if isinstance(value, list) and len(value) == 2:
                value = value[1]  # [expires at, value]: the time differs
        else:
            value = data
        cache[name.decode().removeprefix(namespace)] = value
    client.close()

    bucket, _, _prefix = env["BLOB_URL"].removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    blobs = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            got = s3.get_object(Bucket=bucket, Key=obj["Key"])
            blobs[key(obj["Key"])] = (got["ContentType"], got["Body"].read())

    messages = []
    with Connection(env["CELERY_BROKER_URL"]) as conn:
        channel = conn.default_channel
        while (message := channel.basic_get(env["CELERY_QUEUE"], no_ack=True)) is not None:
            args, kwargs, _ = json.loads(message.body)
            messages.append((message.headers["task"], args, kwargs))
    return {"rows": rows, "cache": cache, "blobs": blobs, "messages": messages}


def _delete_queue(env: dict[str, str]) -> None:
    from kombu import Connection

    with Connection(env["CELERY_BROKER_URL"]) as conn:
        conn.default_channel.queue_delete(env["CELERY_QUEUE"])


def _clear_cache(env: dict[str, str]) -> None:
    import redis

    client = redis.Redis.from_url(env["REDIS_URL"])
    for name in client.scan_iter(match=f"{env['CACHE_NAMESPACE']}:*"):
        client.delete(name)
    client.close()


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, credentials: None, moto_server: MotoServer) -> dict[str, Any]:
    """The session run once against each app: transcript and the state left behind."""
    return {"example": _run_example(request, moto_server), "twin": _run_twin(request, moto_server)}


def test_the_twin_answers_the_scripted_session_like_the_example(runs: dict[str, Any]) -> None:
    """The same statuses and bodies, request by request, for the whole scripted session."""
    example, twin = runs["example"].transcript, runs["twin"].transcript
    assert len(example) >= REQUESTS
    for mine, theirs in zip(twin, example, strict=True):
        assert mine == theirs
    statuses = {status for _, _, status, _ in example}
    # The script reaches the success and the error paths.
    assert {200, 201, 204, 400, 401, 404, 409} <= statuses


def test_the_twin_sends_what_the_example_sends(runs: dict[str, Any]) -> None:
    """Request by request, the same SQL (row locks and transactions included), Redis commands and S3 calls."""
    example, twin = runs["example"].statements, runs["twin"].statements
    sent = [" ".join(call) for request in example for call in request]
    assert any("FOR UPDATE" in call for call in sent)
    assert any("FOR KEY SHARE" in call for call in sent)
    assert any(call.startswith("redis EVALSHA") for call in sent)
    assert any(call.startswith("s3 PutObject") for call in sent)
    assert len(twin) == len(example)
    for (method, path, status, _), mine, theirs in zip(
        runs["example"].transcript, twin, example, strict=True
    ):
        assert mine == theirs, f"{method} {path} ({status})"


def test_the_twin_leaves_the_database_as_the_example_does(runs: dict[str, Any]) -> None:
    """The same rows in every table, and no outbox row left behind by either app."""
    example, twin = runs["example"].state["rows"], runs["twin"].state["rows"]
    assert example["notes"]
    assert example["attachments"]
    assert example["polydatum_outbox"] == []
    assert twin == example


def test_the_twin_leaves_the_cache_as_the_example_does(runs: dict[str, Any]) -> None:
    """The same cache keys with the same values (and no claim left over)."""
    example, twin = runs["example"].state["cache"], runs["twin"].state["cache"]
    assert example
    assert twin == example


def test_the_twin_leaves_the_blobs_as_the_example_does(runs: dict[str, Any]) -> None:
    """The same objects in the bucket (content and type): uploads kept, deleted notes' blobs gone."""
    example, twin = runs["example"].state["blobs"], runs["twin"].state["blobs"]
    assert example
    assert twin == example


def test_the_twin_sends_the_celery_messages_the_example_sends(runs: dict[str, Any]) -> None:
    """The same index jobs queued, in the same order (task ids aside)."""
    example, twin = runs["example"].state["messages"], runs["twin"].state["messages"]
    assert example
    assert twin == example

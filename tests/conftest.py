"""Fixtures shared by the whole suite: the real servers tests talk to."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.support.servers import (
    PrivateMemcached,
    PrivatePostgres,
    PrivateRedis,
    missing,
    reachable,
)

SHARED_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SHARED_REDIS = "redis://127.0.0.1:6379/0"
SHARED_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a PostgreSQL server (the shared one, or a private one started here)."""
    if reachable("127.0.0.1", 5432):
        yield SHARED_POSTGRES
        return
    server = PrivatePostgres()
    try:
        server.start()
    except Exception as exc:  # reported through missing()
        server.close()
        missing(
            "PostgreSQL on 127.0.0.1:5432",
            f"start it (pg_ctlcluster 15 main start) or install postgresql ({exc})",
        )
    yield server.url
    server.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis server (the shared one, or a private one started here)."""
    if reachable("127.0.0.1", 6379):
        yield SHARED_REDIS
        return
    server = PrivateRedis().start()
    yield server.url
    server.close()


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """URL of the RabbitMQ broker; there is no private fallback for it."""
    if not reachable("127.0.0.1", 5672):
        missing(
            "RabbitMQ on 127.0.0.1:5672",
            "start it with: rabbitmq-server -detached (apt-get install rabbitmq-server)",
        )
    return SHARED_RABBITMQ


@pytest.fixture(scope="session")
def memcached_address() -> Iterator[str]:
    """``host:port`` of a private memcached started for the session (Debian's ``memcached``)."""
    server = PrivateMemcached().start()
    yield server.address
    server.close()


@pytest.fixture
def private_memcached() -> Iterator[PrivateMemcached]:
    """A memcached of this test's own, for tests that stop it."""
    server = PrivateMemcached().start()
    yield server
    server.close()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of this test's own, for tests that stop or kill it."""
    server = PrivateRedis().start()
    yield server
    server.close()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test's own, for tests that restart it."""
    server = PrivatePostgres().start()
    yield server
    server.close()


# -- logging hygiene ----------------------------------------------------------------------------


def _logging_state() -> dict[str, tuple[object, ...]]:
    """Logging's global state: what a test must leave as it found it.

    pytest's own capture handlers come and go around each phase; they are
    left out. Loggers created during the test are not compared (importing a
    library creates its loggers).
    """
    from _pytest.logging import LogCaptureHandler, _LiveLoggingNullHandler

    def handlers(logger: logging.Logger) -> tuple[int, ...]:
        ours = (LogCaptureHandler, _LiveLoggingNullHandler)
        return tuple(id(h) for h in logger.handlers if not isinstance(h, ours))

    root = logging.getLogger()
    state: dict[str, tuple[object, ...]] = {
        "<disable>": (logging.root.manager.disable,),
        "<root>": (root.level, root.disabled, handlers(root)),
    }
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            state[name] = (logger.level, logger.disabled, logger.propagate, handlers(logger))
    return state


def _check_logging(before: dict[str, tuple[object, ...]], who: str) -> None:
    after = _logging_state()
    changed = {name: (was, after.get(name)) for name, was in before.items() if after.get(name) != was}
    if changed:
        lines = "\n".join(f"  {name}: {was} -> {now}" for name, (was, now) in sorted(changed.items()))
        pytest.fail(
            f"{who} changed logging's global state (level, disabled, propagate, handlers) "
            f"and did not restore it:\n{lines}",
            pytrace=False,
        )


@pytest.fixture(autouse=True, scope="session")
def _logging_left_as_found_by_the_session() -> Iterator[None]:
    """Session-scoped fixtures (servers, workers) leave logging as they found it."""
    before = _logging_state()
    yield
    _check_logging(before, "a session-scoped fixture")


@pytest.fixture(autouse=True, scope="module")
def _logging_left_as_found_by_the_module() -> Iterator[None]:
    """A module's fixtures (a Celery worker started once per module, say) restore logging."""
    before = _logging_state()
    yield
    _check_logging(before, "a module-scoped fixture of this module")


@pytest.fixture(autouse=True)
def _logging_left_as_found() -> Iterator[None]:
    """Fail a test that leaves logging disabled, a level raised or a handler behind.

    Such a test makes later tests that read logs (caplog, or a handler of
    their own) fail or pass by the order they run in.
    """
    before = _logging_state()
    yield
    _check_logging(before, "this test")


@pytest.fixture(autouse=True)
def _celery_join_flag_left_as_found() -> Iterator[None]:
    """Fail a test that leaves Celery's process-wide "inside a task" flag set.

    With it set, every later ``AsyncResult.get()`` in the process raises
    "Never call result.get() within a task!", so such a leak fails some
    unrelated later test, depending on the order. Only checked once Celery
    has been imported; the flag is put back so that one leak fails one test.
    """
    import sys

    state = sys.modules.get("celery._state")
    before = bool(state.task_join_will_block()) if state is not None else False
    yield
    state = sys.modules.get("celery._state")
    if state is not None and state.task_join_will_block() and not before:
        state._set_task_join_will_block(False)
        pytest.fail("this test left Celery's task_join_will_block flag set", pytrace=False)


@pytest.fixture(autouse=True)
def _serializer_registry_left_as_found() -> Iterator[None]:
    """Fail a test that leaves a serializer registered by name.

    The registry is process-wide: a name left behind shows up in every later
    "unknown serializer" message and makes the same name unusable, so such a
    leak fails an unrelated later test depending on the order. The registry
    is put back so that one leak fails one test.
    """
    from polydatum.cache import _serializers

    before = dict(_serializers._SERIALIZERS)
    yield
    left = sorted(set(_serializers._SERIALIZERS) - set(before))
    _serializers._SERIALIZERS.clear()
    _serializers._SERIALIZERS.update(before)
    if left:
        pytest.fail(f"this test left serializers registered: {', '.join(left)}", pytrace=False)

"""A real Celery worker in a thread of the test process, leaving the process as it found it."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery, _state
from celery.contrib.testing.worker import start_worker
from celery.worker import state as worker_state

from tests.support.logs import logging_restored


@contextmanager
def in_thread_worker(app: Any) -> Iterator[Any]:
    """Run a solo worker for ``app`` while the block runs.

    Celery's worker set-up changes process-wide state that outlives it: it
    reconfigures logging (the root logger drops to ERROR) and marks the
    process as a worker, after which ``AsyncResult.get()`` anywhere raises
    "Never call result.get() within a task!". Both are put back when the
    block ends, and the root level right away, so this module's own log
    checks keep working.
    """
    root_level = logging.root.level
    with logging_restored():
        try:
            with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20) as worker:
                logging.root.setLevel(root_level)
                try:
                    yield worker
                finally:
                    _wake_to_stop(app, worker)
        finally:
            _state._set_task_join_will_block(False)


def _wake_to_stop(app: Any, worker: Any) -> None:
    """Ask the worker to stop now instead of at its event loop's next wake-up.

    start_worker() stops the worker by setting a flag its loop checks
    between polls, and with an idle AMQP connection the poll waits for the
    next timer, up to 10 s: every worker's teardown took 10 s. Setting the
    flag first and sending the worker a control message (its pidbox queue
    is on the same connection) makes the poll return at once.
    """
    worker_state.should_terminate = 0
    try:
        app.control.broadcast("ping", destination=[worker.hostname], reply=False)
    except Exception:  # a broker gone by now: the worker stops at its next wake-up
        logging.getLogger(__name__).debug("could not wake the worker", exc_info=True)


def suite_app(name: str, broker: str, backend: str, queue: str, key_prefix: str) -> Celery:
    """A Celery app configured as every test of this suite needs it.

    Its own queue and result-key prefix keep concurrent runs apart; one
    thread-safe result backend serves the test and worker threads, so
    teardown can close its connections; the worker leaves the root logger alone.
    """
    app = Celery(name, broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        result_backend_transport_options={"global_keyprefix": key_prefix},
        result_expires=600,
        result_backend_thread_safe=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_serializer="json",
        result_serializer="json",
    )
    return app


def close_suite_app(app: Celery) -> None:
    """Close ``app`` and its Redis result backend's connections.

    An AsyncResult unsubscribes from its result when it is collected: one
    collected after the backend closed would open a new connection (and leave
    it, a ResourceWarning in whatever later test runs the collector). So the
    results left in reference cycles are collected first, while the connection
    is up, and the backend then forgets what it was subscribed to.
    """
    gc.collect()
    backend = app.backend
    consumer = backend.result_consumer
    consumer.stop()
    consumer.subscribed_to.clear()
    backend.client.connection_pool.disconnect()
    app.close()

"""Background jobs with Celery, through :mod:`polydatum.celery`.

``index_note.delay(note_id)`` called by a service inside a context is *not*
sent at once: it is an outbox row of the context's transaction, sent right
after the commit (or by a relay, if the broker was down), so the worker
always finds the note the request wrote, a request that failed sends
nothing, and a committed one is never lost. The inbox runs a message that
arrives twice once. Each run of the task gets a context of its own (meta:
``task_id``, ``retries``…), committed when the task returns.

Without ``CELERY_BROKER_URL`` the app runs Celery in eager mode: the job
runs in-process, right after the commit of the context that sent it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from celery import Celery

from polydatum import DataManager
from polydatum.celery import install
from polydatum.outbox import Outbox

from notes.config import Settings


def make_celery(
    settings: Settings, dm: DataManager, outbox: Outbox | None = None
) -> tuple[Celery, SimpleNamespace]:
    """The Celery app of ``dm`` and its tasks (``tasks.index_note``)."""
    eager = settings.celery_broker_url is None
    app = Celery("notes", broker=settings.celery_broker_url or "memory://localhost/", set_as_current=False)
    app.conf.update(
        task_always_eager=eager,
        task_store_eager_result=False,
        task_ignore_result=True,
        task_default_queue=settings.celery_queue,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        worker_hijack_root_logger=False,
        # Redelivered if the worker dies mid-job; the job is idempotent.
        task_acks_late=True,
    )
    # Database deadlocks and serialization failures are retried in a fresh context.
    install(app, dm, retry_transient=3, outbox=outbox, inbox=outbox is not None)

    # shared=False: the task belongs to this app (and so to this DataManager) only;
    # a shared task would be added to every Celery app made later in the process.
    @app.task(name="notes.index_note", shared=False)  # type: ignore[untyped-decorator]  # celery is untyped
    def index_note(note_id: int) -> Any:
        """Build the word index of a note (runs in a context of its own)."""
        return dm.require_active_context().dal.notes.build_index(note_id)

    return app, SimpleNamespace(index_note=index_note)

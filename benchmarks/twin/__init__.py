"""A feature-equal hand-written twin of the notes example (examples/notes), for benchmarks/load.py.

The endpoints the load uses, doing the same work as the example with the
same libraries and no polydatum: the same SQL statements and row locks,
the same authorization checks, the same cache reads (a claim, then a
guarded store) and invalidations after the commit, the same blob writes
with cleanup on failure, and the same Celery message after the commit, all
through a hand-written transactional outbox on the same table. See
docs/benchmarks.md ("The hand-written twin") and tests/load/test_twin.py,
which checks that both apps answer a scripted session alike and leave the
same state behind.

Serve it with ``gunicorn 'twin:wsgi()'`` (``benchmarks/`` on the path) in the
example's environment (``DATABASE_URL``, ``REDIS_URL``, ``BLOB_URL``...).
:mod:`twin.asgi` is the same work as a FastAPI app, the counterpart of the
example's ``notes.asgi`` (``uvicorn --factory twin.asgi:create_app``);
tests/load/test_twin_asgi.py checks that pair.
"""

from __future__ import annotations

from collections.abc import Mapping

from twin.resources import Resources
from twin.web import Twin

__all__ = ["Resources", "Twin", "wsgi"]


def wsgi(environ: Mapping[str, str] | None = None) -> Twin:
    """The twin as a WSGI application, configured from ``environ`` (default: ``os.environ``)."""
    return Twin(Resources(environ))

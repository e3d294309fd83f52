"""Fixtures for the example application's tests (examples/notes)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "notes"
# The example is a package of its own; the tests use it from the checkout.
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))


@contextmanager
def serving(wsgi_app: Any) -> Iterator[str]:
    """Serve ``wsgi_app`` with Werkzeug's threaded server on 127.0.0.1, a free port; yield its URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, wsgi_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="notes-test-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

"""Logs as JSON lines, each carrying the request it belongs to (``serve --log-json``).

Every record gets ``request_id`` and ``trace_id``/``span_id`` from the
active context through :class:`polydatum.otel.ContextFilter` (the trace ids
are null unless OpenTelemetry is installed and a span is current). The user
is left out on purpose: it is personal data.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

from polydatum import DataManager
from polydatum.otel import ContextFilter

# Attributes every LogRecord has; anything else was added by a filter or ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the context's ids."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def json_handler(dm: DataManager, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing JSON lines with ``dm``'s context ids to ``stream`` (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines())
    handler.addFilter(ContextFilter(dm))
    return handler


def log_json(dm: DataManager, level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Send every logger's records to one JSON handler on the root logger; returns the handler."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = json_handler(dm, stream)
    root.addHandler(handler)
    root.setLevel(level)
    return handler

"""Logging's global state, kept: for fixtures around code that reconfigures it (Celery's worker)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def logging_restored() -> Iterator[None]:
    """Put every logger's level, flags and handlers back as they were when the block ends.

    Celery's worker set-up lowers the root logger to its log level and
    reconfigures ``celery.*`` loggers for the rest of the process; a test that
    starts one wraps it in this block so later tests see logging unchanged.
    """
    loggers = [logging.root] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    saved = [(lg, lg.level, lg.disabled, lg.propagate, list(lg.handlers)) for lg in loggers]
    disabled = logging.root.manager.disable
    try:
        yield
    finally:
        for lg, level, was_disabled, propagate, handlers in saved:
            lg.setLevel(level)
            lg.disabled = was_disabled
            lg.propagate = propagate
            lg.handlers[:] = handlers
        logging.disable(disabled)

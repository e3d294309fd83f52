"""Run a unit of work again, in a fresh context, after a transient database error."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import DBAPIError

from polydatum.sqlalchemy._database import commit_log

if TYPE_CHECKING:
    from polydatum import DataAccessLayer, DataManager

T = TypeVar("T")

logger = logging.getLogger("polydatum.sqlalchemy")

# serialization_failure, deadlock_detected
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})
_SQLITE_BUSY = 5


def is_transient(exc: BaseException) -> bool:
    """True for errors that a fresh attempt of the same unit of work may not hit.

    That is PostgreSQL's serialization failure (SQLSTATE 40001) and deadlock
    (40P01), and SQLite's "database is locked" (SQLITE_BUSY). The exception and
    its explicit causes (``raise ... from``) are examined.

    .. versionadded:: 2.0
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        orig = current.orig if isinstance(current, DBAPIError) else current
        if (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) in (_TRANSIENT_SQLSTATES):
            return True
        if isinstance(orig, sqlite3.Error):
            code = getattr(orig, "sqlite_errorcode", None)
            if code is None:  # Python 3.10
                return "database is locked" in str(orig)
            return bool(code & 0xFF == _SQLITE_BUSY)
        current = current.__cause__
    return False


def _check(attempts: int, backoff: float, max_backoff: float) -> None:
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        msg = f"attempts must be an int of at least 1, got {attempts!r}"
        raise ValueError(msg)
    if backoff < 0 or max_backoff < 0:
        msg = f"backoff and max_backoff must not be negative, got {backoff!r}, {max_backoff!r}"
        raise ValueError(msg)


def _delay(attempt: int, backoff: float, max_backoff: float) -> float:
    # Exponential, with jitter so that the transactions that collided once do
    # not collide again in lockstep.
    growth: float = 2.0 ** (attempt - 1)
    return min(max_backoff, backoff * growth) * random.uniform(0.5, 1.0)


def _should_retry(
    exc: Exception,
    acknowledged: list[str],
    attempt: int,
    attempts: int,
    retry_if: Callable[[BaseException], bool],
) -> bool:
    if acknowledged or attempt >= attempts or not retry_if(exc):
        return False
    logger.info(
        "retrying a unit of work after %s (attempt %d of %d)", type(exc).__name__, attempt + 1, attempts
    )
    return True


def _finish_attempt(token: Any, acknowledged: list[str]) -> None:
    commit_log.reset(token)
    outer = commit_log.get()
    if outer is not None:
        # A retry() nested in another: the outer one must not repeat our commits.
        outer.extend(acknowledged)


def retry(
    data_manager: DataManager,
    unit_of_work: Callable[[DataAccessLayer], T],
    /,
    *,
    attempts: int = 3,
    backoff: float = 0.05,
    max_backoff: float = 1.0,
    meta: Mapping[str, Any] | None = None,
    retry_if: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Call ``unit_of_work(dal)`` in a new context, again in another one on a transient error.

    Each attempt is a whole context: its transaction middleware commits or
    rolls back, and a failed attempt leaves nothing behind. An attempt after
    which any commit was acknowledged (a nested context, a second database)
    is never repeated: the error is raised instead.

    Args:
        data_manager: opens the contexts.
        unit_of_work: called with the context's DAL; its result is returned.
        attempts: how many times to try in all.
        backoff: seconds to wait before the second attempt, doubling each time
            (with jitter) up to ``max_backoff``.
        max_backoff: the longest wait.
        meta: the meta of every context.
        retry_if: which errors to retry; :func:`is_transient` by default.

    Raises:
        ValueError: ``attempts`` is below 1 or a backoff is negative.
        Exception: the last error, once attempts run out or it is not retryable.

    .. versionadded:: 2.0
    """
    _check(attempts, backoff, max_backoff)
    attempt = 0
    while True:
        attempt += 1
        acknowledged: list[str] = []
        token = commit_log.set(acknowledged)
        try:
            with data_manager.dal(meta) as dal:
                return unit_of_work(dal)
        except Exception as exc:
            if not _should_retry(exc, acknowledged, attempt, attempts, retry_if):
                raise
        finally:
            _finish_attempt(token, acknowledged)
        time.sleep(_delay(attempt, backoff, max_backoff))


async def aretry(
    data_manager: DataManager,
    unit_of_work: Callable[[DataAccessLayer], Awaitable[T]],
    /,
    *,
    attempts: int = 3,
    backoff: float = 0.05,
    max_backoff: float = 1.0,
    meta: Mapping[str, Any] | None = None,
    retry_if: Callable[[BaseException], bool] = is_transient,
) -> T:
    """The asyncio twin of :func:`retry`: awaits ``unit_of_work(dal)`` in ``async with`` contexts.

    .. versionadded:: 2.0
    """
    _check(attempts, backoff, max_backoff)
    attempt = 0
    while True:
        attempt += 1
        acknowledged: list[str] = []
        token = commit_log.set(acknowledged)
        try:
            async with data_manager.dal(meta) as dal:
                return await unit_of_work(dal)
        except Exception as exc:
            if not _should_retry(exc, acknowledged, attempt, attempts, retry_if):
                raise
        finally:
            _finish_attempt(token, acknowledged)
        await asyncio.sleep(_delay(attempt, backoff, max_backoff))

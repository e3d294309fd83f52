"""Commit positions: how far a reader must have caught up to see what a context wrote.

A position is a PostgreSQL WAL location (an LSN), written ``X/X`` in hex as
``pg_current_wal_lsn()`` prints it. The SQL integration records the position
of each database a context committed to; meta ``min_position`` carries the
positions a later context (the next request, a Celery task) must read past.
This module only keeps, merges, encodes and validates them: it imports no
database driver, so the web and Celery integrations can carry positions
without knowing SQLAlchemy.

Encoded form (cookie, header, task header): ``name=X/X`` pairs joined by
``|`` (a comma may not appear in a cookie), e.g. ``db=0/16B3748|reports=1/A0``.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext

__all__ = [
    "MAX_NAMES",
    "META_KEY",
    "committed",
    "decode",
    "encode",
    "from_meta",
    "lsn",
    "record",
    "recorded",
    "required",
]

#: The meta key holding ``{database name: position}``.
META_KEY = "min_position"
#: The most databases one encoded value may name.
MAX_NAMES = 8

# Both halves are 32-bit hex numbers; PostgreSQL prints them without padding.
_LSN = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

# Positions a context committed, by resource name; weak so contexts die freely.
_committed: weakref.WeakKeyDictionary[DataAccessContext, dict[str, str]] = weakref.WeakKeyDictionary()


def lsn(position: str) -> int:
    """The position ``X/X`` as one comparable integer.

    Raises:
        ValueError: ``position`` is not two 1-8 digit hex numbers joined by ``/``.
    """
    if not isinstance(position, str) or _LSN.fullmatch(position) is None:
        shown = repr(position)[:40]
        msg = f"a position is a WAL LSN such as '0/16B3748' (hex/hex), got {shown}"
        raise ValueError(msg)
    high, low = position.split("/")
    return int(high, 16) << 32 | int(low, 16)


def later(a: str | None, b: str) -> str:
    """The later of two positions (``b`` when ``a`` is None)."""
    return b if a is None or lsn(b) > lsn(a) else a


def record(ctx: DataAccessContext, name: str, position: str) -> None:
    """Remember that ``ctx`` committed to database ``name`` up to ``position``."""
    positions = _committed.setdefault(ctx, {})
    positions[name] = later(positions.get(name), position)


def recorded(ctx: DataAccessContext, name: str) -> str | None:
    """The position ``ctx`` committed to database ``name``, or None when it wrote nothing there."""
    positions = _committed.get(ctx)
    return None if positions is None else positions.get(name)


def from_meta(meta: Mapping[str, Any]) -> dict[str, str]:
    """The ``min_position`` of a context's meta, checked.

    Raises:
        TypeError: ``min_position`` is not a mapping of names to strings.
        ValueError: a name or a position is malformed.
    """
    value = meta.get(META_KEY)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        msg = f"meta {META_KEY!r} must be a mapping {{database name: position}}, got {type(value).__name__}"
        raise TypeError(msg)
    for name, position in value.items():
        _check_name(name)
        lsn(position)
    return dict(value)


def committed(ctx: DataAccessContext) -> dict[str, str]:
    """The positions ``ctx`` itself committed, by database name (empty when it wrote nothing)."""
    return dict(_committed.get(ctx, {}))


def required(ctx: DataAccessContext) -> dict[str, str]:
    """What a reader after ``ctx`` must have replayed: its meta's ``min_position`` and its own commits."""
    positions = from_meta(ctx.meta)
    for name, position in _committed.get(ctx, {}).items():
        positions[name] = later(positions.get(name), position)
    return positions


def encode(positions: Mapping[str, str]) -> str:
    """``positions`` as ``name=X/X|...`` (sorted, so equal positions encode equally)."""
    return "|".join(f"{name}={positions[name]}" for name in sorted(positions))


def decode(value: str) -> dict[str, str]:
    """Parse what :func:`encode` made; anything else is refused.

    The value may come from a client (a cookie, a header) or a message, so
    it is checked strictly: at most :data:`MAX_NAMES` pairs, each a name of
    1-64 word characters and an LSN.

    Raises:
        ValueError: the value is malformed; the message never repeats more
            than 40 characters of it.
    """
    if not isinstance(value, str) or not value or len(value) > MAX_NAMES * 84:
        msg = f"a position value is 1 to {MAX_NAMES * 84} characters of name=X/X pairs"
        raise ValueError(msg)
    pairs = value.split("|")
    if len(pairs) > MAX_NAMES:
        msg = f"a position value names at most {MAX_NAMES} databases, got {len(pairs)}"
        raise ValueError(msg)
    positions: dict[str, str] = {}
    for pair in pairs:
        name, sep, position = pair.partition("=")
        if not sep:
            msg = f"a position value is name=X/X pairs joined by '|', got {pair[:40]!r}"
            raise ValueError(msg)
        _check_name(name)
        lsn(position)
        if name in positions:
            msg = f"a position value names {name!r} twice"
            raise ValueError(msg)
        positions[name] = position
    return positions


def _check_name(name: object) -> None:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        shown = repr(name)[:40]
        msg = f"a database name in a position is 1-64 letters, digits or '_' (not first a digit), got {shown}"
        raise ValueError(msg)

"""Page cursors: the sort key of a page's last row, as opaque base64url JSON.

A cursor is ``[order, values]``: the ``order_by`` it was made for (names,
``-`` for descending) and one JSON value per sort column. Plain JSON carries
None, bools, numbers and strings; other types are tagged ``{"tag": "text"}``.
It is opaque to callers but neither secret nor signed: forging one only lets a
caller start a page elsewhere, which filters allow anyway. So everything here
treats a cursor as hostile input: :func:`decode` checks its shape and its tags
and raises :class:`~polydatum.errors.InvalidInput` for anything else; the
caller then checks each value against its column (``_filters``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from polydatum.errors import InvalidInput

# A cursor longer than this was not made by encode() for any sensible sort key
# (a few columns of numbers, dates and short strings); decoding stops early.
MAX_LENGTH = 64 * 1024

GARBLED = "invalid page cursor; pass the next_cursor of a previous page unchanged"

_TAGS: dict[str, Callable[[str], Any]] = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "decimal": Decimal,
    "uuid": uuid.UUID,
    "bytes": lambda s: base64.b64decode(s.encode("ascii"), validate=True),
}


def encode_value(value: Any) -> Any:
    """``value`` as JSON: plain for None, bools, numbers and strings, tagged otherwise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    for tag, kind in (("datetime", dt.datetime), ("date", dt.date), ("time", dt.time)):
        if isinstance(value, kind):
            return {tag: value.isoformat()}
    if isinstance(value, Decimal):
        return {"decimal": str(value)}
    if isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    msg = (
        f"cannot make a page cursor from a {type(value).__name__} value; order by columns "
        "holding numbers, strings, dates, times, decimals, UUIDs, enums or bytes"
    )
    raise TypeError(msg)


def encode(order: Sequence[str], values: Sequence[Any]) -> str:
    """The cursor for a row whose sort key is ``values`` in ``order``."""
    payload = json.dumps([list(order), [encode_value(v) for v in values]], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode(cursor: Any, order: Sequence[str]) -> list[Any]:
    """The sort key a cursor holds, one Python value per name of ``order``.

    Raises:
        InvalidInput: the cursor is not one :func:`encode` made, or was made
            for another order.
    """
    if not isinstance(cursor, str) or len(cursor) > MAX_LENGTH:
        raise InvalidInput(GARBLED)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        payload = json.loads(raw)
    except (ValueError, binascii.Error):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InvalidInput(GARBLED) from None
    except RecursionError:  # "[[[[…" nested deeper than the JSON decoder recurses
        raise InvalidInput(GARBLED) from None
    if not (
        isinstance(payload, list)
        and len(payload) == 2  # [order, values]
        and isinstance(payload[0], list)
        and isinstance(payload[1], list)
        and all(isinstance(name, str) for name in payload[0])
    ):
        raise InvalidInput(GARBLED)
    made_for, values = payload
    if len(values) != len(made_for):
        raise InvalidInput(GARBLED)
    if made_for != list(order):
        msg = (
            f"this cursor was made for order_by {made_for[:10]!r}, not {list(order)!r}; "
            "search with the same filters and order_by as the page it came from"
        )
        raise InvalidInput(msg)
    return [_decode_value(v) for v in values]


def _decode_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((tag, text),) = value.items()
        parse = _TAGS.get(tag)
        if parse is not None and isinstance(text, str):
            try:
                return parse(text)
            except (ValueError, ArithmeticError, binascii.Error):
                pass
    raise InvalidInput(GARBLED)

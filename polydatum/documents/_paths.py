"""Paths into a document (``"customer.city"``) and collection names, checked before any SQL.

A path is rendered into SQL as a literal (an expression index only serves a
query whose expression is the same text, bound parameters included), so what
may reach SQL is narrowed to names of ASCII letters, digits and underscores.
Quotes, ``->>``, ``;``, spaces, ``$`` and everything else are refused.
"""

from __future__ import annotations

import re
from typing import Any

from polydatum.errors import InvalidInput

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_COLLECTION = re.compile(r"[a-z][a-z0-9_]{0,39}")

#: The deepest path an index or a filter may name.
MAX_DEPTH = 8

Path = tuple[str, ...]


def parse(path: Any, *, what: str = "path") -> Path:
    """The names of ``path``, e.g. ``("customer", "city")`` for ``"customer.city"``.

    Raises:
        InvalidInput: ``path`` is not a str of dot-separated names (letters,
            digits and underscores, not starting with a digit), or is too deep.
    """
    if not isinstance(path, str) or len(path) > 300:
        msg = f"{what} must be a str like 'status' or 'customer.city', got {_show(path)}"
        raise InvalidInput(msg)
    names = tuple(path.split("."))
    if len(names) > MAX_DEPTH or not all(_NAME.fullmatch(name) for name in names):
        msg = (
            f"invalid {what} {_show(path)}: a path is up to {MAX_DEPTH} names joined by dots, "
            "each of ASCII letters, digits and underscores, not starting with a digit "
            "(no quotes, operators, spaces or semicolons)"
        )
        raise InvalidInput(msg)
    return names


def check_collection(name: Any) -> str:
    """``name`` if it can name a collection (and, with a prefix, its table).

    Raises:
        ValueError: it is not lowercase ASCII letters, digits and underscores,
            starting with a letter, at most 40 characters.
    """
    if not isinstance(name, str) or not _COLLECTION.fullmatch(name):
        msg = (
            f"a collection name is 1 to 40 lowercase ASCII letters, digits and underscores, "
            f"starting with a letter (it names a table), got {_show(name)}"
        )
        raise ValueError(msg)
    return name


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

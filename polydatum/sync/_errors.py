"""The errors of :mod:`polydatum.sync`.

::

    SyncError                   a sync could not go on
    ├── UnsortedInput           a side's keys are out of order (also a ValueError)
    │   └── DuplicateKey        a side has the same key twice
    ├── FingerprintError        key= or fingerprint= failed on an item
    └── ApplyError              apply failed; its batch was rolled back

.. versionadded:: 2.0
"""

from __future__ import annotations

from typing import Any

from polydatum.errors import PolydatumException


def show_key(key: Any, limit: int = 80) -> str:
    """``repr(key)``, cut short: a key is data and may be long."""
    text = repr(key)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SyncError(PolydatumException):
    """A sync could not go on; the message says what was wrong and what to do.

    .. versionadded:: 2.0
    """


class UnsortedInput(SyncError, ValueError):
    """A side yielded a key that is not greater than the one before it.

    Attributes:
        side: ``"source"`` or ``"target"``.
        key: the key out of order.

    .. versionadded:: 2.0
    """

    def __init__(self, message: str, *, side: str = "", key: Any = None) -> None:
        super().__init__(message)
        self.side = side
        self.key = key


class DuplicateKey(UnsortedInput):
    """A side yielded the same key twice in a row.

    .. versionadded:: 2.0
    """


class FingerprintError(SyncError):
    """The key or fingerprint of an item could not be computed; the cause is chained.

    Attributes:
        side: ``"source"`` or ``"target"``.
        key: the item's key, None when the key itself failed.

    .. versionadded:: 2.0
    """

    def __init__(self, message: str, *, side: str = "", key: Any = None) -> None:
        super().__init__(message)
        self.side = side
        self.key = key


class ApplyError(SyncError):
    """Applying a change failed; the whole batch it was in was rolled back.

    The checkpoint still names the last batch that committed, so running the
    sync again resumes there. The original exception is ``__cause__``.

    Attributes:
        key: the key of the change that failed.
        kind: its kind (``"new"``, ``"changed"`` or ``"deleted"``).

    .. versionadded:: 2.0
    """

    def __init__(self, message: str, *, key: Any = None, kind: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.kind = kind

"""Meta: the read-only data a context carries (current user, request id...)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

__all__ = ["EMPTY_META", "Meta"]


class Meta(Mapping[str, Any]):
    """Read-only meta data of a context (current user, request id...).

    Keys read as attributes, and an absent key reads as ``None``::

        meta = Meta({"user": "ann"})
        meta.user, meta["user"], meta.get("tz", "UTC"), meta.request_id
        # ('ann', 'ann', 'UTC', None)

    Setting or deleting anything raises ``AttributeError`` (attributes) or
    ``TypeError`` (items).
    """

    __slots__ = ("_values",)
    _values: dict[str, Any]

    def __init__(self, opts: Mapping[str, Any] | None = None) -> None:
        try:
            values = dict(opts) if opts else {}
        except (TypeError, ValueError):
            msg = f"meta must be a mapping (a dict of names to values), got {type(opts).__name__}"
            raise TypeError(msg) from None
        object.__setattr__(self, "_values", values)

    def __getattr__(self, key: str) -> Any:
        if key[:2] == "__":
            raise AttributeError(key)
        return self._values.get(key)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def get(self, key: str, default: Any = None) -> Any:
        """The value for ``key``, or ``default``."""
        return self._values.get(key, default)

    def require(self, key: str) -> Any:
        """The value for ``key``.

        Raises:
            ValueError: if the value is absent or empty.
        """
        value = self._values.get(key)
        if not value:
            msg = f"meta {key!r} is empty; pass it when opening the context: dm.context(meta={{{key!r}: …}})"
            raise ValueError(msg)
        return value

    def __setattr__(self, key: str, value: Any) -> NoReturn:
        msg = f"Meta is read-only; cannot set {key!r}. Pass meta when opening the context."
        raise AttributeError(msg)

    def __delattr__(self, key: str) -> NoReturn:
        msg = f"Meta is read-only; cannot delete {key!r}."
        raise AttributeError(msg)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Meta, (self._values,))

    def __str__(self) -> str:
        return json.dumps(self._values, indent=2, default=str)

    def __repr__(self) -> str:
        return f"<Meta {self._values!r}>"


EMPTY_META = Meta()

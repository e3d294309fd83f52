"""A read-only configuration object, and loading one from a module (as in 1.0)."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

__all__ = ["Config", "from_module"]


class Config:
    """Configuration whose keys read as attributes and never change.

    ``items()`` yields the UPPER_CASE keys, as module settings are written.
    """

    def __init__(self, opts: Mapping[str, Any] | None = None) -> None:
        if opts:
            for key, value in opts.items():
                object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: Any) -> NoReturn:
        msg = f"Config keys can not be changed (tried to set {key!r})."
        raise KeyError(msg)

    def get(self, key: str, default: Any = None) -> Any:
        """The value for ``key``, or ``default``."""
        return getattr(self, key, default)

    def require(self, key: str) -> Any:
        """The value for ``key``.

        Raises:
            ValueError: if it is absent or empty.
        """
        value = self.get(key)
        if not value:
            msg = f'"{key}" has not been configured.'
            raise ValueError(msg)
        return value

    def items(self) -> Iterator[tuple[str, Any]]:
        """The UPPER_CASE keys and their values."""
        for key in dir(self):
            if key.isupper():
                yield key, self.get(key)

    def __str__(self) -> str:
        return json.dumps(dict(self.items()), indent=2, default=str)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"


def from_module(module_name: str) -> Config:
    """Import ``module_name`` and return its UPPER_CASE names as a :class:`Config`."""
    module = importlib.import_module(module_name)
    return Config({key: getattr(module, key) for key in dir(module) if key.isupper()})

"""Old spellings of renamed 2.0 names, kept working with a DeprecationWarning.

Two shapes: a keyword renamed on a function (:func:`renamed_keyword`), and a
module attribute renamed (:func:`module_getattr`, for a module's
``__getattr__``). Both point the caller at the new name.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["module_getattr", "renamed_keyword"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keyword(old: str, new: str, *, since: str = "2.0") -> Callable[[F], F]:
    """Accept ``old=`` as a deprecated spelling of the keyword ``new=``.

    The wrapped function keeps its own signature for type checkers, which
    therefore flag the old spelling; at run time it still works and warns.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if old in kwargs:
                if new in kwargs:
                    msg = f"{fn.__qualname__}() got both {new}= and its old name {old}=; pass {new}= only"
                    raise TypeError(msg)
                warnings.warn(
                    f"{fn.__qualname__}({old}=...) is deprecated since {since}; pass {new}=... "
                    f"(or the value first, without a keyword)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]  # same signature as fn

    return decorate


def module_getattr(
    module: str, renamed: Mapping[str, str], namespace: dict[str, Any]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving each old name of ``renamed`` (old -> new) with a warning.

    ``namespace`` is the module's ``globals()``, read when the old name is
    asked for, so the new name may be defined after this call.
    """

    def __getattr__(name: str) -> Any:
        new = renamed.get(name)
        if new is None:
            msg = f"module {module!r} has no attribute {name!r}"
            raise AttributeError(msg)
        warnings.warn(
            f"{module}.{name} is deprecated since 2.0; use {module}.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return namespace[new]

    return __getattr__

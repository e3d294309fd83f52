"""Deprecated spellings kept for a while, each warning once per call with the new one."""

from __future__ import annotations

import warnings
from collections.abc import Awaitable, Callable
from typing import Any


def aping_alias(owner: str, instance: str) -> Callable[[Any], Awaitable[bool]]:
    """An ``aping()`` method for ``owner`` that warns, then awaits its ``ping()``.

    Args:
        owner: the class name the warning names, e.g. ``"AsyncCache"``.
        instance: what the warning calls an instance, e.g. ``"cache"``.
    """
    message = f"{owner}.aping() is deprecated; use `await {instance}.ping()`"

    async def aping(self: Any) -> bool:
        """Deprecated spelling of ``ping()``: use ``await obj.ping()``.

        .. deprecated:: 2.0
        """
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return bool(await self.ping())

    return aping

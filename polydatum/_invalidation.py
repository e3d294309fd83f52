"""The process-wide invalidation counter of the DAL's path cache.

DAL commands remember how their path resolved together with the version they
saw. Registering or replacing a service, nesting one, re-binding a service
attribute that holds a service, or changing the method middleware bumps the
version, and every command resolves again on its next call. Registrations are
rare, so one global counter is cheaper than tracking who depends on what.
"""

from __future__ import annotations

import weakref
from typing import Any

version = 0

# Commands holding a cached resolution; a bump resets them (push, not poll,
# so a DAL call does not pay for a version check).
_cached: weakref.WeakSet[Any] = weakref.WeakSet()


def track(command: Any) -> None:
    """Remember ``command`` so the next :func:`bump` invalidates its cache."""
    _cached.add(command)


def bump() -> None:
    """Invalidate every cached DAL path resolution."""
    global version
    version += 1
    for command in list(_cached):
        command._invalidate()
    _cached.clear()

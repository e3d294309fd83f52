"""Cache models: typed records that live in a cache
====================================================

A cache model is a standard-library dataclass with a primary key (one field
or several), stored as one entry of a :class:`~polydatum.cache.Cache` (memory,
Redis, or any backend) with its own namespace, TTL and serializer::

    from dataclasses import dataclass
    from polydatum.cache import Cache
    from polydatum.cache.models import cache_model

    @cache_model(key=("tenant", "id"), ttl=3600)
    @dataclass
    class Session:
        tenant: str
        id: int
        user: str
        hits: int = 0

    Cache(namespace="myapp").install(dm, name="cache")
    with dm.context() as ctx:
        sessions = ctx.cache.models(Session)
        sessions.create(Session("acme", 1, "ada"))
        sessions.incr(("acme", 1), "hits")
    # written when the context commits; dropped if it raised

Values are validated on every write (a TypeError names the model, the field
and the value's type); a record stored by an older version of the model
loads with defaults for new fields, without removed ones, and with ints
read as floats where the field became a float. A record that cannot be read
any more is a miss, logged once per model. See
``docs/integrations/cache-models.md``.

.. versionadded:: 2.0
"""

# The errors are polydatum.cache's (and polydatum.errors'); importable here too.
from polydatum.cache._errors import RecordExists as RecordExists
from polydatum.cache._errors import RecordMissing as RecordMissing
from polydatum.cache._errors import UpdateConflict as UpdateConflict
from polydatum.cache.models._model import ModelOptions, ModelTTL, Ref, cache_model
from polydatum.cache.models._repo import AsyncModels, Models

__all__ = [
    "AsyncModels",
    "ModelOptions",
    "ModelTTL",
    "Models",
    "Ref",
    "cache_model",
]

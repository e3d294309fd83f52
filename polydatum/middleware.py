"""DAL commands and method middleware (the names polydatum 1.0 code imports).

``dal.users.get`` is a :class:`DalCommand`: a path of :class:`PathSegment`
that is resolved only when it is called. A call becomes a
:class:`DalCommandRequest` that runs through the method middleware chain,
outermost first; the default innermost middleware,
:func:`dal_method_resolver_middleware`, resolves the path to a service method
and :func:`handle_dal_method` calls it.

A method middleware is any callable ``(request, handler) -> result``, called
with both by keyword as in polydatum 1.0, so its parameters carry those names::

    def audit(request, handler):
        log.info("calling %s as %s", request.path_name, request.ctx.meta.user)
        return handler(request)

    dm.register_method_middleware(audit)
"""

from __future__ import annotations

from polydatum._commands import (
    DalCommand,
    DalCommandRequest,
    PathSegment,
    dal_method_resolver_middleware,
    dal_resolver,
    handle_dal_method,
    resolve,
)
from polydatum.errors import DalMethodError

__all__ = [
    "DalCommand",
    "DalCommandRequest",
    "DalMethodError",
    "PathSegment",
    "dal_method_resolver_middleware",
    "dal_resolver",
    "handle_dal_method",
    "resolve",
]

# Documented, pickled and shown under the module users import them from.
for _public in (
    DalCommand,
    DalCommandRequest,
    PathSegment,
    dal_method_resolver_middleware,
    dal_resolver,
    handle_dal_method,
    resolve,
):
    _public.__module__ = __name__
del _public

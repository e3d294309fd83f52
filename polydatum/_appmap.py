"""The map of an application: what ``polydatum inspect`` prints.

:func:`describe` reads a DataManager through its public accessors and
returns plain data (dicts, lists, strings) ready for ``json.dumps``;
:func:`render` turns that into the text a person reads. Nothing is called
but signatures and docstrings: no context is opened, no resource created.

Values are never shown, only where things are defined (a module and a
qualified name): a resource's value or a middleware's repr may hold a URL
with a password.
"""

from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING, Any

from polydatum._factories import Dual, as_factory
from polydatum.resources import ValueResource
from polydatum.services import Service

if TYPE_CHECKING:
    from polydatum.dal import DataManager

__all__ = ["describe", "render"]

# Service's own plumbing is not part of any application's API.
_PLUMBING = frozenset(name for name in dir(Service) if not name.startswith("_"))
# Core modules: what they define is the application's own, not an integration's.
_CORE = frozenset(
    {"config", "context", "dal", "errors", "meta", "middleware", "resources", "services", "types"}
)
# ``collections.abc.Mapping[str, typing.Any]`` reads as ``Mapping[str, Any]``.
_QUALIFIER = re.compile(r"\b(?:[a-z_]\w*\.)+(?=[A-Za-z_])")


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    for line in doc.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _origin(obj: Any) -> Any:
    """The function or class that defines ``obj`` (a bound method's function, an instance's class)."""
    if isinstance(obj, Dual):
        obj = obj.sync
    obj = getattr(obj, "__func__", obj)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return obj
    return type(obj)


def _where(obj: Any) -> str:
    """``module:qualname`` of what defines ``obj``."""
    origin = _origin(obj)
    return f"{getattr(origin, '__module__', '?')}:{getattr(origin, '__qualname__', type(obj).__qualname__)}"


def _integration(obj: Any) -> str | None:
    """``sqlalchemy`` for anything defined in ``polydatum.sqlalchemy...``; None for the application's own."""
    parts = str(getattr(_origin(obj), "__module__", "")).split(".")
    if len(parts) > 1 and parts[0] == "polydatum" and not parts[1].startswith("_") and parts[1] not in _CORE:
        return parts[1]
    return None


def _kind(obj: Any) -> str:
    if isinstance(obj, ValueResource):
        return "value"
    factory = as_factory(obj)
    if factory is None:
        return "unknown"
    if factory.alt is not None:
        return "dual"  # a sync generator in "with", an async one in "async with"
    return "async" if factory.is_async else "generator"


def _signature(method: Any) -> str:
    for eval_str in (True, False):
        try:
            signature = inspect.signature(method, eval_str=eval_str)
        except (NameError, TypeError, ValueError, SyntaxError):
            continue
        params = list(signature.parameters.values())
        if params and params[0].name == "self":
            # A decorator's wrapper that inspect unwrapped to the plain function.
            signature = signature.replace(parameters=params[1:])
        return _QUALIFIER.sub("", str(signature)).replace("~", "")
    return "(...)"


def _methods(service: Any) -> list[dict[str, Any]]:
    methods = []
    cls = type(service)
    for name in sorted(dir(cls)):
        if name.startswith("_") or name in _PLUMBING:
            continue
        static = inspect.getattr_static(cls, name, None)
        if static is None or isinstance(static, (property, type)):
            continue  # reading a property would run application code
        try:
            method = getattr(service, name)
        except Exception:  # a descriptor that needs a context: still not a method we can show
            continue
        if not callable(method):
            continue
        methods.append(
            {
                "name": name,
                "signature": _signature(method),
                "async": inspect.iscoroutinefunction(method),
                "doc": _first_line(method),
            }
        )
    return methods


def _services(dm: DataManager, prefix: str) -> list[dict[str, Any]]:
    tree = []
    for name, service in dm.get_services(prefix).items():
        path = f"{prefix}.{name}" if prefix else name
        tree.append(
            {
                "name": name,
                "path": path,
                "class": _where(service),
                "doc": _first_line(type(service)),
                "methods": _methods(service),
                "services": _services(dm, path),
            }
        )
    return tree


def _part(obj: Any) -> dict[str, Any]:
    return {"defined_by": _where(obj), "kind": _kind(obj), "integration": _integration(obj)}


def describe(dm: DataManager) -> dict[str, Any]:
    """The map of ``dm``: services, resources, middleware and integrations, as plain data.

    .. versionadded:: 2.0
    """
    resources = []
    for name in dm.resource_manager:
        resource = dm.get_resource(name)
        resources.append({"name": name, **_part(resource)})
    context_middleware = [_part(m) for m in (spec.original for spec in dm.wiring.middleware)]
    method_middleware: list[dict[str, Any]] = [
        {"defined_by": _where(m), "integration": _integration(m)} for m in dm.get_method_middleware()
    ]
    integrations: dict[str, dict[str, list[str]]] = {}

    def note(part: dict[str, Any], what: str, name: str) -> None:
        if part["integration"] is not None:
            entry = integrations.setdefault(
                part["integration"], {"resources": [], "context_middleware": [], "method_middleware": []}
            )
            entry[what].append(name)

    for resource in resources:
        note(resource, "resources", resource["name"])
    for part in context_middleware:
        note(part, "context_middleware", part["defined_by"].partition(":")[2])
    for part in method_middleware:
        note(part, "method_middleware", part["defined_by"].partition(":")[2])
    return {
        "data_manager": _where(dm),
        "services": _services(dm, ""),
        "resources": resources,
        "context_middleware": context_middleware,
        # A DataManager overriding get_middleware() picks middleware per context.
        "context_middleware_per_context": dm.wiring.middleware_for is not None,
        "method_middleware": method_middleware,
        "integrations": dict(sorted(integrations.items())),
    }


def _render_services(services: list[dict[str, Any]], depth: int, out: list[str]) -> None:
    pad = "  " * depth
    for service in services:
        doc = f"  # {service['doc']}" if service["doc"] else ""
        out.append(f"{pad}{service['name']}: {service['class']}{doc}")
        for method in service["methods"]:
            prefix = "async " if method["async"] else ""
            doc = f"  # {method['doc']}" if method["doc"] else ""
            out.append(f"{pad}    {prefix}{method['name']}{method['signature']}{doc}")
        _render_services(service["services"], depth + 1, out)


def render(app: dict[str, Any]) -> str:
    """The text form of :func:`describe`'s map, for a person.

    .. versionadded:: 2.0
    """
    name = app.get("target") or app["data_manager"]
    out = [f"{name}: a {app['data_manager'].partition(':')[2]}", "", "services (dal.<path>)"]
    _render_services(app["services"], 1, out)
    if not app["services"]:
        out.append("  (none)")
    out += ["", "resources (ctx.<name>), in registration order"]
    width = max((len(r["name"]) for r in app["resources"]), default=0)
    for resource in app["resources"]:
        out.append(f"  {resource['name']:{width}}  {resource['kind']:9}  {resource['defined_by']}")
    if not app["resources"]:
        out.append("  (none)")
    out += ["", "context middleware, set up in this order and torn down in reverse"]
    if app["context_middleware_per_context"]:
        out.append("  (chosen per context by the DataManager's get_middleware())")
    for number, part in enumerate(app["context_middleware"], 1):
        out.append(f"  {number}. {part['defined_by']}  ({part['kind']})")
    if not app["context_middleware"] and not app["context_middleware_per_context"]:
        out.append("  (none)")
    out += ["", "method middleware around every DAL call, outermost first"]
    for number, part in enumerate(app["method_middleware"], 1):
        out.append(f"  {number}. {part['defined_by']}")
    if not app["method_middleware"]:
        out.append("  (none)")
    out += ["", "integrations installed"]
    width = max((len(name) for name in app["integrations"]), default=0)
    for name, parts in app["integrations"].items():
        shown = [
            f"{label}: {', '.join(parts[key])}"
            for key, label in (
                ("resources", "resources"),
                ("context_middleware", "context middleware"),
                ("method_middleware", "method middleware"),
            )
            if parts[key]
        ]
        out.append(f"  polydatum.{name:{width}}  " + "; ".join(shown))
    if not app["integrations"]:
        out.append("  (none)")
    return "\n".join(out) + "\n"

"""``polydatum`` (or ``python -m polydatum``): commands for an application's developers.

``polydatum inspect package.module:dm`` prints the map of the application
whose DataManager is ``dm`` (see :mod:`polydatum._appmap`); ``--json`` prints
it for tools. ``package.module:make_dm()`` calls a function that returns the
DataManager instead (an application built by a factory).

A target that cannot be used exits with status 2 and one line on stderr
saying what to pass.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from polydatum._appmap import describe, render
from polydatum.dal import DataManager

__all__ = ["TargetError", "load_data_manager", "load_target", "main"]

T = TypeVar("T")

_WHAT_TO_PASS = (
    "pass MODULE:NAME naming a DataManager (e.g. myapp.wiring:dm), "
    "or MODULE:FACTORY() naming a function that returns one"
)


class TargetError(Exception):
    """The target given on the command line does not lead to a DataManager."""


def _kind_of(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"the function {obj.__qualname__}"
    return f"an object of type {type(obj).__qualname__}"


def load_target(target: str, kind: type[T], what_to_pass: str) -> T:
    """Import ``module:name`` (or call ``module:factory()``) and return it, if it is a ``kind``.

    Raises:
        TargetError: one line saying what was wrong and ``what_to_pass``.

    .. versionadded:: 2.0
    """
    module_name, colon, name = target.partition(":")
    call = name.endswith("()")
    if call:
        name = name[:-2]
    if not colon or not module_name or not name:
        raise TargetError(f"{target!r} is not MODULE:NAME; {what_to_pass}")
    # As "python -m" does: the application in the current directory is importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise TargetError(f"no module named {exc.name!r}; {what_to_pass}") from None
        raise TargetError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    except Exception as exc:
        raise TargetError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"{module_name!r} has no attribute {name!r}; {what_to_pass}") from None
    if call:
        if not callable(obj):
            raise TargetError(
                f"{target!r}: {module_name}:{name} is {_kind_of(obj)}, not callable; {what_to_pass}"
            )
        try:
            obj = obj()
        except Exception as exc:
            raise TargetError(f"{target!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, kind):
        raise TargetError(f"{target!r} is {_kind_of(obj)}, not a {kind.__name__}; {what_to_pass}")
    return obj


def load_data_manager(target: str) -> DataManager:
    """Import ``module:name`` (or call ``module:factory()``) and return the DataManager.

    Raises:
        TargetError: one line saying what was wrong and what to pass.

    .. versionadded:: 2.0
    """
    return load_target(target, DataManager, _WHAT_TO_PASS)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polydatum", description="Tools for polydatum applications.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect",
        help="print the map of an application: services, resources, middleware, integrations",
        description=(
            "Print the services tree (each method's signature and the first line of its "
            "docstring), the resources and their kind, the context and method middleware in "
            "order, and the integrations installed. Nothing is called and no context is opened."
        ),
    )
    inspect.add_argument("target", metavar="MODULE:NAME", help="the DataManager, e.g. myapp.wiring:dm")
    inspect.add_argument("--json", action="store_true", help="print JSON, for tools")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a bad target).

    .. versionadded:: 2.0
    """
    args = _parser().parse_args(argv)
    try:
        dm = load_data_manager(args.target)
    except TargetError as exc:
        print(f"polydatum {args.command}: {exc}", file=sys.stderr)
        return 2
    app = {"target": args.target, **describe(dm)}
    if args.json:
        print(json.dumps(app, indent=2))
    else:
        sys.stdout.write(render(app))
    return 0

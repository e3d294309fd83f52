"""The public API: every exported name importable and documented, types shipped (py.typed)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import tomllib

import polydatum

CORE_MODULES = [
    "polydatum",
    "polydatum.config",
    "polydatum.context",
    "polydatum.dal",
    "polydatum.errors",
    "polydatum.middleware",
    "polydatum.resources",
    "polydatum.services",
    "polydatum.types",
]

# polydatum.errors has no __all__: its public names are those DESIGN §1.1 lists, plus the 2.0 ones.
ERRORS = [
    "PolydatumException", "ServiceError", "NotFound", "ConcurrencyConflict", "AlreadyExistsException",
    "NoActiveContextError", "ContextStateError", "DalMethodError", "MiddlewareException",
    "MiddlewareSetupException", "InvalidMiddleware", "ResourceException", "ResourceSetupException",
    "InvalidResource", "ErrorsOnClose",
]


def exported(module: str) -> list[str]:
    names = getattr(importlib.import_module(module), "__all__", None)
    return list(names) if names is not None else ERRORS if module == "polydatum.errors" else []


EXPORTS = [(module, name) for module in CORE_MODULES for name in exported(module)]


def public_members(obj: Any) -> list[tuple[str, Any]]:
    """Public functions, methods and properties a class defines itself."""
    members = []
    for name, value in vars(obj).items():
        if name.startswith("_"):
            continue
        func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
        if inspect.isfunction(func):
            members.append((name, func))
    return members


@pytest.mark.parametrize("module", CORE_MODULES)
def test_module_has_docstring_and_sane_all(module: str) -> None:
    """Each core module documents itself; its __all__ (if any) has no duplicates."""
    mod = importlib.import_module(module)
    assert (mod.__doc__ or "").strip()
    names = getattr(mod, "__all__", [])
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(("module", "name"), EXPORTS)
def test_export_importable_and_documented(module: str, name: str) -> None:
    """Every name in __all__ can be imported and has its own docstring, as do its public methods."""
    namespace: dict[str, Any] = {}
    exec(f"from {module} import {name} as obj", namespace)
    obj = namespace["obj"]
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert (obj.__doc__ or "").strip(), f"{module}.{name} has no docstring"
    if inspect.isclass(obj):
        undocumented = [n for n, f in public_members(obj) if not (f.__doc__ or "").strip()]
        assert undocumented == [], f"{module}.{name}: undocumented {undocumented}"


def test_package_all_matches_design() -> None:
    """polydatum exports DataManager, DataAccessLayer and Service (DESIGN §1.1), and nothing private."""
    for name in ("DataManager", "DataAccessLayer", "Service"):
        assert name in polydatum.__all__
    assert all(not name.startswith("_") for name in polydatum.__all__)
    assert sorted(polydatum.__all__) == polydatum.__all__


def test_package_all_is_complete() -> None:
    """Every public class re-exported by polydatum is listed in __all__."""
    public = {
        name
        for name, value in vars(polydatum).items()
        if not name.startswith("_") and inspect.isclass(value)
    }
    assert public <= set(polydatum.__all__)


def test_version() -> None:
    """polydatum.__version__ is a 2.x version string."""
    assert isinstance(polydatum.__version__, str)
    assert polydatum.__version__.startswith("2.")


def test_py_typed_shipped() -> None:
    """py.typed sits in the package and is declared as package data, so type checkers use our hints."""
    package_dir = Path(polydatum.__file__).parent
    assert (package_dir / "py.typed").is_file()
    pyproject = package_dir.parent / "pyproject.toml"
    config = tomllib.loads(pyproject.read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["polydatum"]


def test_public_callables_are_annotated() -> None:
    """The public functions and methods of polydatum's exports carry return annotations."""
    missing = []
    for name in polydatum.__all__:
        obj = getattr(polydatum, name)
        if not inspect.isclass(obj):
            continue
        for member, func in public_members(obj):
            if "return" not in func.__annotations__:
                missing.append(f"{name}.{member}")
    assert missing == []

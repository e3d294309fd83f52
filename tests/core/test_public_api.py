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
    "polydatum.sync",
    "polydatum.types",
]


def exported(module: str) -> list[str]:
    names = getattr(importlib.import_module(module), "__all__", None)
    return list(names) if names is not None else []


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
    """polydatum exports DataManager, DataAccessLayer and Service (as in 1.0), and nothing private."""
    for name in ("DataManager", "DataAccessLayer", "Service"):
        assert name in polydatum.__all__
    assert all(not name.startswith("_") for name in polydatum.__all__)
    assert sorted(polydatum.__all__) == polydatum.__all__


def test_package_all_is_complete() -> None:
    """Every public class re-exported by polydatum is listed in __all__."""
    public = {
        name for name, value in vars(polydatum).items() if not name.startswith("_") and inspect.isclass(value)
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


# The packages behind the extras; the core must import none of them.
OPTIONAL = (
    "sqlalchemy",
    "redis",
    "boto3",
    "botocore",
    "celery",
    "kombu",
    "werkzeug",
    "msgpack",
    "starlette",
    "fastapi",
    "pytest",
    "aiosqlite",
    "psycopg",
    "opentelemetry",
    "structlog",
)


def test_importing_the_core_loads_no_optional_extra() -> None:
    """``import polydatum`` and its core modules leave every optional package out of sys.modules."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        f"import {', '.join(CORE_MODULES)}\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({OPTIONAL!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def public_modules() -> list[str]:
    """Every public polydatum module (no segment starting with ``_``), and the web signals' ``_web``."""
    import pkgutil

    names = [
        module.name
        for module in pkgutil.walk_packages(polydatum.__path__, "polydatum.")
        if not any(part.startswith("_") for part in module.name.split("."))
    ]
    return ["polydatum._web", *names]


def polydatum_errors() -> dict[str, type[BaseException]]:
    """Every exception class polydatum's modules export (by name), base classes of web signals included."""
    from polydatum import _web

    found: dict[str, type[BaseException]] = {}
    for module in ("polydatum.errors", *public_modules()):
        mod = importlib.import_module(module)
        for name in getattr(mod, "__all__", ()):
            value = getattr(mod, name)
            if inspect.isclass(value) and issubclass(value, BaseException):
                found[name] = value
    assert {"ResponseIncomplete", "RollbackResponse"} <= set(_web.__all__)
    return found


def test_every_error_is_reachable_from_polydatum_errors() -> None:
    """Each error class a polydatum module exports is the same class, same name, in polydatum.errors."""
    import polydatum.errors

    missing = [
        name for name, cls in polydatum_errors().items() if getattr(polydatum.errors, name, None) is not cls
    ]
    assert missing == []


def test_errors_all_lists_every_error_but_the_redis_one() -> None:
    """polydatum.errors.__all__ names every error; only PoolTimeout, which needs redis-py, is left out."""
    import polydatum.errors

    assert set(polydatum_errors()) - set(polydatum.errors.__all__) == {"PoolTimeout"}
    assert sorted(polydatum.errors.__all__) == polydatum.errors.__all__


def test_naming_an_integration_error_imports_only_what_it_needs() -> None:
    """``from polydatum.errors import *`` and naming a blob or cache error import no optional package."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from polydatum.errors import *\n"
        "from polydatum.errors import BlobNotFound, CacheError, RollbackResponse\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({OPTIONAL!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_an_unknown_error_name_is_an_attribute_error() -> None:
    """A name polydatum.errors does not have raises AttributeError naming it."""
    import polydatum.errors

    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        _ = polydatum.errors.Nope  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("module", "defines"),
    [
        ("polydatum._factories", ["ACCEPTED", "Dual", "Factory", "afinish", "as_factory", "astart"]),
        ("polydatum._web", ["Exchange", "Positions", "request_context", "RollbackResponse"]),
    ],
)
def test_internal_all_lists_what_the_module_defines(module: str, defines: list[str]) -> None:
    """The internal modules' __all__ list the public names they define, and nothing they only import."""
    mod = importlib.import_module(module)
    own = {
        name
        for name, value in vars(mod).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", None) == module
    }
    assert own <= set(mod.__all__), own - set(mod.__all__)
    assert set(defines) <= set(mod.__all__)
    imported = [
        n
        for n in mod.__all__
        if (inspect.isclass(getattr(mod, n)) or inspect.isfunction(getattr(mod, n)))
        and getattr(mod, n).__module__ != module
    ]
    assert imported == []


def test_a_data_manager_is_a_resource_registry() -> None:
    """polydatum.ResourceRegistry, what install(dm) takes, is met by a DataManager, not by other objects."""
    from polydatum import DataManager, ResourceRegistry

    assert isinstance(DataManager(), ResourceRegistry)
    assert not isinstance(object(), ResourceRegistry)

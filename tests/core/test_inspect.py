"""The map of an application (`polydatum inspect`): services, resources, middleware, bad targets."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from polydatum import DataAccessContext, DataManager, Service
from polydatum._appmap import describe, render
from polydatum._cli import TargetError, load_data_manager, main
from polydatum.blob import MemoryBlobStore
from polydatum.resources import Dual, ValueResource


class Profiles(Service):
    """Users' public profiles."""

    def get(self, user_id: int) -> str:
        """One profile.

        More text that the map leaves out.
        """
        return str(user_id)


class Users(Service):
    """The people who use the application."""

    def get(self, user_id: int, *, deleted: bool = False) -> dict[str, int]:
        """A user by id."""
        return {"id": user_id}

    async def fetch(self, user_id: int) -> int:
        return user_id

    @property
    def touched(self) -> str:
        raise AssertionError("inspect must not run properties")

    def _private(self) -> None:
        """Never shown."""


def session(ctx: DataAccessContext) -> Iterator[str]:
    yield "session"


async def async_session(ctx: DataAccessContext) -> AsyncIterator[str]:
    yield "async session"


@contextmanager
def client(ctx: DataAccessContext) -> Iterator[str]:
    yield "client"


def first(ctx: DataAccessContext) -> Iterator[None]:
    yield


def second(ctx: DataAccessContext) -> Iterator[None]:
    yield


def outer(request: Any, handler: Any) -> Any:
    return handler(request)


def inner(request: Any, handler: Any) -> Any:
    return handler(request)


def make_dm() -> DataManager:
    dm = DataManager()
    dm.register_services(users=Users().register_services(profile=Profiles()))
    dm.register_resources(
        db=session,
        adb=async_session,
        both=Dual(session, async_session),
        client=client,
        settings=ValueResource({"password": "hunter2"}),
    )
    MemoryBlobStore().install(dm, name="files")
    dm.register_context_middleware(first, second)
    dm.register_method_middleware(inner)
    dm.register_method_middleware(outer, outermost=True)
    return dm


def test_services_tree_has_signatures_and_first_docstring_lines() -> None:
    """Each service lists its public methods with their signature, async flag and first doc line."""
    app = describe(make_dm())
    [users] = app["services"]
    assert users["name"] == "users"
    assert users["class"] == f"{__name__}:Users"
    assert users["doc"] == "The people who use the application."
    methods = {m["name"]: m for m in users["methods"]}
    assert set(methods) == {"get", "fetch"}  # no property, private name or Service plumbing
    assert methods["get"]["signature"] == "(user_id: int, *, deleted: bool = False) -> dict[str, int]"
    assert methods["get"]["doc"] == "A user by id."
    assert methods["fetch"]["async"] is True
    assert methods["get"]["async"] is False
    [profile] = users["services"]
    assert profile["path"] == "users.profile"
    assert profile["methods"] == [
        {"name": "get", "signature": "(user_id: int) -> str", "async": False, "doc": "One profile."}
    ]


def test_resources_have_their_kind_and_no_value() -> None:
    """Resources are listed in registration order with their kind; values are never shown."""
    app = describe(make_dm())
    kinds = {r["name"]: r["kind"] for r in app["resources"]}
    assert kinds == {
        "db": "generator",
        "adb": "async",
        "both": "dual",
        "client": "generator",
        "settings": "value",
        "files": "generator",
    }
    assert [r["name"] for r in app["resources"]] == ["db", "adb", "both", "client", "settings", "files"]
    assert "hunter2" not in json.dumps(app)
    assert "hunter2" not in render(app)


def test_middleware_in_order_and_integrations_by_name() -> None:
    """Context middleware in set-up order, method middleware outermost first, integrations by name."""
    app = describe(make_dm())
    assert [m["defined_by"] for m in app["context_middleware"]] == [f"{__name__}:first", f"{__name__}:second"]
    assert [m["defined_by"] for m in app["method_middleware"]] == [f"{__name__}:outer", f"{__name__}:inner"]
    assert app["integrations"] == {
        "blob": {"resources": ["files"], "context_middleware": [], "method_middleware": []}
    }
    text = render(app)
    assert "  1. tests.core.test_inspect:first  (generator)" in text
    assert "  2. tests.core.test_inspect:second  (generator)" in text
    assert "  polydatum.blob  resources: files" in text
    assert "      async fetch(user_id: int) -> int" in text


def test_an_empty_data_manager_says_none() -> None:
    """Every section of an empty application's map says (none)."""
    text = render(describe(DataManager()))
    assert text.count("(none)") == 5


@pytest.fixture
def app_module(monkeypatch: pytest.MonkeyPatch) -> str:
    """A module ``inspect_target_app`` with a DataManager, a factory and other objects."""
    module = types.ModuleType("inspect_target_app")
    module.dm = make_dm()  # type: ignore[attr-defined]
    module.make_dm = make_dm  # type: ignore[attr-defined]
    module.number = 42  # type: ignore[attr-defined]
    module.broken = lambda: 1 / 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "inspect_target_app", module)
    return "inspect_target_app"


def test_main_prints_the_map_as_text_and_json(app_module: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``inspect module:dm`` prints text, ``--json`` the same map as JSON; a factory() is called."""
    assert main(["inspect", f"{app_module}:dm"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{app_module}:dm: a DataManager\n")
    assert main(["inspect", f"{app_module}:make_dm()", "--json"]) == 0
    app = json.loads(capsys.readouterr().out)
    assert app["target"] == f"{app_module}:make_dm()"
    assert [s["name"] for s in app["services"]] == ["users"]


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("inspect_target_app", "'inspect_target_app' is not MODULE:NAME"),
        (":dm", "':dm' is not MODULE:NAME"),
        ("no.such:thing", "no module named 'no'"),
        ("inspect_target_app:nothing", "'inspect_target_app' has no attribute 'nothing'"),
        ("inspect_target_app:number", "'inspect_target_app:number' is an object of type int, not a"),
        ("inspect_target_app:make_dm", "is the function make_dm, not a DataManager"),
        ("inspect_target_app:number()", "is an object of type int, not callable"),
        ("inspect_target_app:broken()", "'inspect_target_app:broken()' raised ZeroDivisionError"),
    ],
)
def test_a_bad_target_exits_2_with_one_line(
    app_module: str, target: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target that is not a DataManager exits 2 with one line saying what to pass."""
    assert main(["inspect", target]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert says in captured.err
    assert "pass MODULE:NAME" in captured.err or "raised" in captured.err


def test_load_data_manager_raises_target_error(app_module: str) -> None:
    """The loader raises TargetError (the CLI turns it into exit status 2)."""
    assert isinstance(load_data_manager(f"{app_module}:dm"), DataManager)
    with pytest.raises(TargetError, match="not a DataManager"):
        load_data_manager(f"{app_module}:number")

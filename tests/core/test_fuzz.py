"""Fuzzing the two inputs the core takes from the outside: DAL paths and meta.

DAL paths reach the core from strings (``dal["users.get"]``, routing tables,
task names) and meta from request headers. Whatever they hold, the core
either does what the registry says or raises its own documented error; it
never crashes with something else, and it never mutates anything.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from polydatum import DalCommand, DalMethodError, DataAccessLayer, DataManager, Meta, Service


class Profiles(Service):
    def get(self, user_id: int) -> str:
        return f"profile {user_id}"


class Users(Service):
    def __init__(self) -> None:
        super().__init__()
        self.register_services(profiles=Profiles())
        self.limit = 10  # a plain attribute: in a path it is neither service nor method

    def get(self, user_id: int) -> str:
        return f"user {user_id}"


REAL_PATHS = {"users.get": "user 7", "users.profiles.get": "profile 7"}

segment = st.one_of(
    st.sampled_from(["users", "profiles", "get", "limit", "setup", "_ctx", "__class__", "__init__", ""]),
    st.text(min_size=0, max_size=12),
)
dotted = st.lists(segment, min_size=0, max_size=5).map(".".join)


def call(command: Any) -> Any:
    """The result of ``command(7)``, or the DalMethodError it raised (anything else escapes)."""
    try:
        return command(7)
    except DalMethodError as exc:
        return exc


@pytest.fixture(scope="module")
def dm() -> DataManager:
    dm = DataManager()
    dm.register_services(users=Users())
    return dm


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=dotted)
def test_string_paths_resolve_or_raise_dal_method_error(dm: DataManager, path: str) -> None:
    with dm.dal() as dal:
        try:
            command = dal[path]  # a malformed string is refused here already
        except DalMethodError as exc:
            command = exc
        outcome = command if isinstance(command, DalMethodError) else call(command)
    normal = path[4:] if path.startswith("dal.") else path
    if normal in REAL_PATHS:
        assert outcome == REAL_PATHS[normal]
    else:
        assert isinstance(outcome, DalMethodError)
        assert str(outcome)  # says what was wrong
    # The registry is untouched by whatever was tried.
    with dm.dal() as dal:
        assert dal.users.get(1) == "user 1"
        assert dal.users.profiles.get(1) == "profile 1"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(segment.filter(lambda s: s.isidentifier() and s[0] != "_" and s != "path"), max_size=4))
def test_attribute_paths_resolve_or_raise_dal_method_error(dm: DataManager, names: list[str]) -> None:
    # DalCommand's own attributes (the 1.0 ``PathSegment`` class, ``path``)
    # are not path steps, like the DataAccessLayer's own methods.
    assume(not any(hasattr(DalCommand, name) or hasattr(DataAccessLayer, name) for name in names))
    with dm.dal() as dal:
        command: Any = dal
        for name in names:
            command = getattr(command, name)
        if not names:
            return
        outcome = call(command)
    expected = REAL_PATHS.get(".".join(names))
    assert outcome == expected if expected else isinstance(outcome, DalMethodError)


meta_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.text(max_size=15), meta_values, max_size=8), probe=st.text(max_size=15))
def test_meta_reads_like_the_dict_it_was_built_from(values: dict[str, Any], probe: str) -> None:
    meta = Meta(values)
    assert dict(meta) == values
    assert len(meta) == len(values)
    assert list(meta) == list(values)
    assert (probe in meta) == (probe in values)
    assert meta.get(probe, "absent") == values.get(probe, "absent")
    if probe.isidentifier() and not probe.startswith("__") and not hasattr(Meta, probe):
        assert getattr(meta, probe) == values.get(probe)
    if probe in values:
        assert meta[probe] == values[probe]
        if values[probe]:
            assert meta.require(probe) == values[probe]
        else:
            with pytest.raises(ValueError, match="is empty"):
                meta.require(probe)
    else:
        with pytest.raises(KeyError):
            meta[probe]
        with pytest.raises(ValueError, match="is empty"):
            meta.require(probe)
    assert pickle.loads(pickle.dumps(meta)) == meta


@settings(max_examples=200, deadline=None)
@given(values=st.dictionaries(st.text(max_size=10), st.integers(), max_size=5), key=st.text(max_size=10))
def test_meta_refuses_every_mutation(values: dict[str, int], key: str) -> None:
    meta = Meta(values)
    source = dict(values)
    with pytest.raises(TypeError):
        meta[key] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        del meta[key]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="read-only"):
        setattr(meta, key or "x", 1)
    with pytest.raises(AttributeError, match="read-only"):
        delattr(meta, key or "x")
    values[key] = 99  # the caller's dict changing later does not leak in
    assert dict(meta) == source


# -- what the fuzzing found, pinned down ----------------------------------------


@pytest.mark.parametrize(
    "path", ["users._ctx", "users.__class__", "_services", "users.setup", "users.profiles.setup"]
)
def test_private_names_and_setup_are_not_reachable(dm: DataManager, path: str) -> None:
    with dm.dal() as dal, pytest.raises(DalMethodError, match="belong to the framework"):
        dal[path](dm)


def test_a_service_may_still_have_a_sub_service_named_setup_in_the_middle() -> None:
    """Only a *final* setup is refused: it is the framework's hook there."""
    dm = DataManager()
    users = Users()
    users.register_services(setup_steps=Profiles())
    dm.register_services(users=users)
    with dm.dal() as dal:
        assert dal.users.setup_steps.get(1) == "profile 1"


@pytest.mark.parametrize("name", ["_hidden", "register_services", "add_middleware", "replace_service"])
def test_service_names_the_dal_cannot_reach_are_refused(name: str) -> None:
    dm = DataManager()
    with pytest.raises(ValueError, match=f"cannot register a service named '{name}'"):
        dm.register_services(**{name: Users()})
    with pytest.raises(ValueError, match="pick another name"):
        dm.replace_service(name, Users())
    with dm.dal() as dal, pytest.raises(DalMethodError):
        dal.users.get(1)  # nothing was registered along the way

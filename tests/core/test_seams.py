"""The DataManager's public seams: its wiring, service and resource lookups, and what replacing returns."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from polydatum import DataManager, Service


class Users(Service):
    def get(self, user_id: int) -> str:
        return f"user {user_id}"


class Profiles(Service):
    def get(self, user_id: int) -> str:
        return f"profile {user_id}"


def one(ctx: object) -> Iterator[int]:
    yield 1


def two(ctx: object) -> Iterator[int]:
    yield 2


class TestReplacing:
    """replace_service and replace_resource hand back what they replaced."""

    def test_replace_service_returns_the_previous_one(self) -> None:
        """The old service comes back, and the DAL calls the new one from the next call on."""
        dm = DataManager()
        first, second = Users(), Users()
        dm.register_services(users=first)
        assert dm.replace_service("users", second) is first
        assert dm.get_service("users") is second
        assert dm.replace_service("fresh", Users()) is None

    def test_replace_a_nested_service_by_dotted_path(self) -> None:
        """``replace_service("users.profiles", ...)`` swaps the nested service and returns it."""
        dm = DataManager()
        profiles = Profiles()
        dm.register_services(users=Users().register_services(profiles=profiles))

        class Fake(Profiles):
            def get(self, user_id: int) -> str:
                return "fake"

        assert dm.replace_service("users.profiles", Fake()) is profiles
        with dm.dal() as dal:
            assert dal.users.profiles.get(1) == "fake"

    def test_nesting_under_an_unknown_parent_is_refused(self) -> None:
        """A dotted path whose parent is not registered raises LookupError naming it."""
        with pytest.raises(LookupError, match="no service 'users'"):
            DataManager().replace_service("users.profiles", Profiles())

    def test_replace_resource_returns_the_previous_factory(self) -> None:
        """The old factory comes back and new contexts create the new one."""
        dm = DataManager()
        dm.register_resources(n=one)
        assert dm.replace_resource("n", two) is one
        with dm.context() as ctx:
            assert ctx.n == 2


class TestLookups:
    """get_service, get_services and resource_manager read the registry without private access."""

    def test_get_service_and_get_services(self) -> None:
        """Top-level and nested services are found by path; unknown paths give None or {}."""
        dm = DataManager()
        profiles = Profiles()
        users = Users().register_services(profiles=profiles)
        dm.register_services(users=users)
        assert dm.get_service("users.profiles") is profiles
        assert dm.get_service("users.nope") is None
        assert dm.get_service("nope.profiles") is None
        assert dm.get_services() == {"users": users}
        assert dm.get_services("users") == {"profiles": profiles}
        assert dm.get_services("nope") == {}

    def test_resource_manager_lists_the_resources(self) -> None:
        """Iterating the resource manager gives the registered names."""
        dm = DataManager()
        dm.register_resources(a=one, b=two)
        assert sorted(dm.resource_manager) == ["a", "b"]


class TestWiring:
    """Every registration gives the contexts a new, frozen wiring."""

    def test_registration_replaces_the_wiring(self) -> None:
        """The wiring is rebuilt (never changed in place) and lists the resources."""
        dm = DataManager()
        before = dm.wiring
        dm.register_resources(n=one)
        assert dm.wiring is not before
        assert "n" not in before.resources
        assert "n" in dm.wiring.resources
        with pytest.raises(AttributeError):
            dm.wiring.plain = False  # type: ignore[misc]

    def test_a_context_made_before_a_registration_sees_it(self) -> None:
        """Contexts created after a registration, from the same class, use the new resource."""
        dm = DataManager()
        with dm.context():
            pass
        dm.register_resources(n=one)
        with dm.context() as ctx:
            assert ctx.n == 1


class TestDalAttributeCache:
    """``dal.<name>`` keeps commands only for registered names (issue B15: no unbounded growth)."""

    def test_unknown_names_are_not_kept(self) -> None:
        """10,000 distinct unknown names leave no attribute behind on the DAL."""
        dm = DataManager()
        dm.register_services(users=Users())
        dal = dm.get_dal()
        before = len(vars(dal))
        for i in range(10_000):
            getattr(dal, f"unknown_{i}")
        _ = dal.users
        assert len(vars(dal)) == before + 1

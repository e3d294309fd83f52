"""Services (docs/concepts/services.md): nesting, self._ctx and _dal, 1.0 _services, plain objects."""

from __future__ import annotations

from typing import Any

import pytest

from polydatum import DataAccessContext, DataManager, Service
from polydatum.errors import DalMethodError, NoActiveContextError


class Leaf(Service):
    def where(self) -> str:
        return "leaf"

    def context(self) -> DataAccessContext:
        return self._ctx


class Branch(Service):
    def where(self) -> str:
        return "branch"


class Root(Service):
    def where(self) -> str:
        return "root"

    def via_dal(self) -> str:
        # A service calling another through the DAL.
        assert self._dal is not None
        return str(self._dal.root.a.b.c.where())


def tree() -> Root:
    """root -> a -> b -> c (a Leaf), four levels deep."""
    return Root().register_services(a=Branch().register_services(b=Branch().register_services(c=Leaf())))


class TestNesting:
    def test_register_services_returns_self(self) -> None:
        """Service.register_services(**subs) returns the service, for chaining."""
        root = Root()
        assert root.register_services(a=Branch()) is root

    def test_nested_to_any_depth(self) -> None:
        """dal.root.a.b.c.method() reaches a service four levels down."""
        dm = DataManager()
        dm.register_services(root=tree())
        with dm.dal() as dal:
            assert dal.root.where() == "root"
            assert dal.root.a.where() == "branch"
            assert dal.root.a.b.where() == "branch"
            assert dal.root.a.b.c.where() == "leaf"
            assert dal["root.a.b.c.where"]() == "leaf"

    def test_sub_services_are_attributes(self) -> None:
        """A nested service is reachable as a plain attribute of its parent."""
        root = tree()
        assert isinstance(root.a, Branch)
        assert isinstance(root.a.b.c, Leaf)

    def test_registration_sets_up_the_whole_tree(self) -> None:
        """Registering the root binds every nested service to the DataManager."""
        dm = DataManager()
        root = tree()
        leaf = root.a.b.c
        assert leaf._data_manager is None
        dm.register_services(root=root)
        assert leaf._data_manager is dm
        assert leaf._dal is dm.get_dal()

    def test_nesting_after_registration(self) -> None:
        """A service nested into an already registered one is set up and reachable at once."""
        dm = DataManager()
        root = Root()
        dm.register_services(root=root)
        with dm.dal() as dal:
            assert dal.root.where() == "root"
            late = Leaf()
            root.register_services(late=late)
            assert late._data_manager is dm
            assert dal.root.late.where() == "leaf"

    def test_nested_non_service_refused(self) -> None:
        """Service.register_services refuses non-services with a TypeError naming them."""
        with pytest.raises(TypeError, match="service 'bad'"):
            Root().register_services(bad=42)

    def test_self_dal_calls_other_services(self) -> None:
        """Inside a service, self._dal reaches the other services."""
        dm = DataManager()
        dm.register_services(root=tree())
        with dm.dal() as dal:
            assert dal.root.via_dal() == "leaf"

    def test_class_attribute_wins_over_sub_service(self) -> None:
        """A sub-service named like a method does not shadow the method (1.0 precedence)."""
        dm = DataManager()
        root = Root().register_services(where=Leaf())
        dm.register_services(root=root)
        with dm.dal() as dal:
            assert dal.root.where() == "root"
        assert isinstance(root._services["where"], Leaf)


class TestServiceAttributes:
    def test_ctx_is_the_active_context(self) -> None:
        """self._ctx is the innermost active context, also in nested services."""
        dm = DataManager()
        dm.register_services(root=tree())
        with dm.dal() as dal:
            outer = dm.require_active_context()
            assert dal.root.a.b.c.context() is outer
            with dm.context() as inner:
                assert dal.root.a.b.c.context() is inner
            assert dal.root.a.b.c.context() is outer

    def test_ctx_gives_meta_and_resources(self) -> None:
        """Through self._ctx a service reads meta and resources."""

        class Whoami(Service):
            def me(self) -> tuple[Any, Any]:
                return self._ctx.meta.user, self._ctx.greeting

        def greeting(ctx: DataAccessContext) -> Any:
            yield f"hi {ctx.meta.user}"

        dm = DataManager()
        dm.register_resources(greeting=greeting)
        dm.register_services(whoami=Whoami())
        with dm.dal({"user": "ann"}) as dal:
            assert dal.whoami.me() == ("ann", "hi ann")

    def test_dal_and_data_manager(self) -> None:
        """self._dal and self._data_manager are the manager's DAL and the manager."""
        dm = DataManager()
        root = tree()
        dm.register_services(root=root)
        assert root._data_manager is dm
        assert root._dal is dm.get_dal()
        assert root.a.b._dal is dm.get_dal()

    def test_unregistered_service_has_none(self) -> None:
        """Before registration _data_manager and _dal are None."""
        svc = Leaf()
        assert svc._data_manager is None
        assert svc._dal is None

    def test_ctx_outside_a_context(self) -> None:
        """self._ctx outside a context raises NoActiveContextError saying how to open one."""
        dm = DataManager()
        leaf = Leaf()
        dm.register_services(leaf=leaf)
        with pytest.raises(NoActiveContextError, match=r"with dm\.context\(\)") as info:
            leaf.context()
        assert isinstance(info.value, RuntimeError)

    def test_ctx_after_the_context_exited(self) -> None:
        """A method kept from inside a context fails once the context is gone (1.0 test)."""
        dm = DataManager()
        dm.register_services(leaf=Leaf())
        with dm.dal() as dal:
            ctx = dal.leaf.context()
            get_context = dal.leaf.context
        assert isinstance(ctx, DataAccessContext)
        with pytest.raises(RuntimeError):
            get_context()

    def test_ctx_of_unregistered_service(self) -> None:
        """self._ctx on a service never registered says to register it."""
        with pytest.raises(NoActiveContextError, match="register_services"):
            Leaf().context()

    def test_users_may_set_and_delete_attributes(self) -> None:
        """Services are ordinary objects: set and delete attributes freely."""
        dm = DataManager()
        root = tree()
        dm.register_services(root=root)
        root.cache = {"k": 1}
        assert root.cache == {"k": 1}
        del root.cache
        assert not hasattr(root, "cache")
        with dm.dal() as dal:
            root.flag = True
            assert dal.root.where() == "root"
            del root.flag

    def test_users_may_override_setup(self) -> None:
        """A service overriding setup() and calling super() is still bound."""
        seen: list[Any] = []

        class Custom(Leaf):
            def setup(self, data_manager: Any) -> None:
                super().setup(data_manager)
                seen.append(data_manager)

        dm = DataManager()
        dm.register_services(custom=Custom())
        assert seen == [dm]
        with dm.dal() as dal:
            assert dal.custom.where() == "leaf"


class TestLegacyServicesDict:
    def test_services_dict_lists_sub_services(self) -> None:
        """service._services maps names to nested services, as in 1.0."""
        root = tree()
        assert set(root._services) == {"a"}
        assert root._services["a"] is root.a

    def test_filling_services_dict_in_init(self) -> None:
        """1.0 code that fills self._services in __init__ gets working sub-services."""

        class Users(Service):
            def __init__(self) -> None:
                super().__init__()
                self._services["profile"] = Leaf()

        dm = DataManager()
        users = Users()
        dm.register_services(users=users)
        assert users._services["profile"]._data_manager is dm
        with dm.dal() as dal:
            assert dal.users.profile.where() == "leaf"

    def test_replacing_services_dict_without_super_init(self) -> None:
        """A 1.0 subclass that skipped Service.__init__ and set a plain dict still works."""

        class Users(Service):
            def __init__(self) -> None:
                self._services = {"profile": Leaf()}

        dm = DataManager()
        dm.register_services(users=Users())
        with dm.dal() as dal:
            assert dal.users.profile.where() == "leaf"

    def test_service_without_any_init(self) -> None:
        """A subclass whose __init__ never calls super() can still nest services."""

        class Bare(Service):
            def __init__(self, name: str) -> None:
                self.name = name

            def hello(self) -> str:
                return self.name

        dm = DataManager()
        dm.register_services(bare=Bare("x").register_services(leaf=Leaf()))
        with dm.dal() as dal:
            assert dal.bare.hello() == "x"
            assert dal.bare.leaf.where() == "leaf"

    def test_writes_after_registration(self) -> None:
        """Adding to and deleting from _services after registration is seen by the DAL."""
        dm = DataManager()
        root = Root()
        dm.register_services(root=root)
        with dm.dal() as dal:
            leaf = Leaf()
            leaf.setup(dm)
            root._services["extra"] = leaf
            assert dal.root.extra.where() == "leaf"
            del root._services["extra"]
            with pytest.raises(DalMethodError, match="'extra'"):
                dal.root.extra.where()


class TestOneManagerPerService:
    def test_a_service_registered_with_another_manager_is_refused(self) -> None:
        """Registering one instance on a second DataManager raises, and the first keeps working.

        (It used to rebind the service, whose calls through the first manager
        then failed with "no active polydatum context" inside an open one.)
        """
        first, second = DataManager(), DataManager()
        leaf = Leaf()
        first.register_services(leaf=leaf)
        for attempt in (
            lambda: second.register_services(leaf=leaf),
            lambda: second.register_services(root=Root().register_services(leaf=leaf)),
        ):
            with pytest.raises(ValueError, match="registered with another DataManager"):
                attempt()
        with first.dal() as dal:
            assert dal.leaf.where() == "leaf"
        first.replace_service("leaf", leaf)  # the same manager again is fine

    def test_framework_methods_are_not_dal_paths(self) -> None:
        """A path from a string cannot reach register_services (it would nest anything a client names)."""
        dm = DataManager()
        dm.register_services(root=tree())
        with dm.dal() as dal:
            with pytest.raises(DalMethodError, match="register_services\\(\\) belong to the framework"):
                dal["root.register_services"](injected=Leaf())
            with pytest.raises(DalMethodError) as info:
                dal["root"]()
            assert "register_services" not in str(info.value)
        assert "injected" not in dm.get_dal()._services["root"]._services

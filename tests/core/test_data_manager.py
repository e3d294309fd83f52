"""The DataManager registry (docs/concepts/data-manager.md), contexts and the active-context stack."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from polydatum import DataAccessContext, DataAccessLayer, DataManager, Service
from polydatum.errors import (
    AlreadyExistsException,
    ContextStateError,
    InvalidMiddleware,
    InvalidResource,
    NoActiveContextError,
    PolydatumException,
    ResourceException,
)
from polydatum.resources import Resource, ResourceManager, ValueResource


class Greeter(Service):
    def hello(self, name: str) -> str:
        return f"hello {name}"


class Shouter(Service):
    def hello(self, name: str) -> str:
        return f"HELLO {name.upper()}"


def counter_resource(ctx: DataAccessContext) -> Iterator[dict[str, int]]:
    yield {"n": 0}


def noop_middleware(ctx: DataAccessContext) -> Iterator[None]:
    yield


class TestRegisterServices:
    def test_registered_service_is_reachable_through_the_dal(self) -> None:
        """register_services(name=svc) makes dal.name.method() call it."""
        dm = DataManager()
        dm.register_services(greeter=Greeter())
        with dm.dal() as dal:
            assert dal.greeter.hello("ann") == "hello ann"

    def test_several_at_once(self) -> None:
        """Several keyword arguments register several services."""
        dm = DataManager()
        dm.register_services(a=Greeter(), b=Shouter())
        with dm.dal() as dal:
            assert dal.a.hello("x") == "hello x"
            assert dal.b.hello("x") == "HELLO X"

    def test_registration_sets_the_service_up(self) -> None:
        """A registered service knows its DataManager and DAL."""
        dm = DataManager()
        svc = Greeter()
        dm.register_services(greeter=svc)
        assert svc._data_manager is dm
        assert svc._dal is dm.get_dal()

    def test_duplicate_name_refused(self) -> None:
        """Registering a name twice raises AlreadyExistsException pointing to replace_service."""
        dm = DataManager()
        first = Greeter()
        dm.register_services(greeter=first)
        with pytest.raises(AlreadyExistsException, match="replace_service") as info:
            dm.register_services(greeter=Shouter())
        assert "'greeter'" in str(info.value)
        with dm.dal() as dal:
            assert dal.greeter.hello("x") == "hello x"

    def test_duplicate_in_a_batch_registers_nothing(self) -> None:
        """A refused batch leaves the other names unregistered."""
        dm = DataManager()
        dm.register_services(greeter=Greeter())
        with pytest.raises(AlreadyExistsException):
            dm.register_services(other=Shouter(), greeter=Shouter())
        with dm.dal() as dal, pytest.raises(PolydatumException):
            dal.other.hello("x")

    def test_replace_service(self) -> None:
        """replace_service swaps the implementation and sets up the new one."""
        dm = DataManager()
        dm.register_services(greeter=Greeter())
        new = Shouter()
        dm.replace_service("greeter", new)
        assert new._data_manager is dm
        with dm.dal() as dal:
            assert dal.greeter.hello("x") == "HELLO X"

    def test_replace_service_may_add_a_new_name(self) -> None:
        """replace_service of an unknown name registers it."""
        dm = DataManager()
        dm.replace_service("greeter", Greeter())
        with dm.dal() as dal:
            assert dal.greeter.hello("x") == "hello x"

    @pytest.mark.parametrize("bad", [42, "users", None, object()])
    def test_non_service_refused(self, bad: Any) -> None:
        """Anything without setup() raises a TypeError naming the service and the value."""
        dm = DataManager()
        with pytest.raises(TypeError, match=r"service 'bad' must be a polydatum\.Service"):
            dm.register_services(bad=bad)

    def test_service_class_instead_of_instance_refused(self) -> None:
        """Registering the class instead of an instance raises a TypeError saying to instantiate it."""
        dm = DataManager()
        with pytest.raises(TypeError, match=r"service 'greeter' must be a polydatum\.Service") as info:
            dm.register_services(greeter=Greeter)
        assert "Greeter()" in str(info.value)

    def test_non_service_refused_by_replace(self) -> None:
        """replace_service refuses a non-service too, keeping the old one."""
        dm = DataManager()
        dm.register_services(greeter=Greeter())
        with pytest.raises(TypeError, match="'greeter'"):
            dm.replace_service("greeter", 42)
        with dm.dal() as dal:
            assert dal.greeter.hello("x") == "hello x"

    def test_duck_typed_service_accepted(self) -> None:
        """A plain object with setup(data_manager) is a service."""

        class Plain:
            seen: Any = None

            def setup(self, data_manager: Any) -> None:
                self.seen = data_manager

            def ping(self) -> str:
                return "pong"

        dm = DataManager()
        plain = Plain()
        dm.register_services(plain=plain)
        assert plain.seen is dm
        with dm.dal() as dal:
            assert dal.plain.ping() == "pong"


class TestRegisterResources:
    def test_registered_resource_is_a_context_attribute(self) -> None:
        """register_resources(name=factory) makes ctx.name the yielded value."""
        dm = DataManager()
        dm.register_resources(counter=counter_resource)
        with dm.context() as ctx:
            assert ctx.counter == {"n": 0}

    def test_get_resource(self) -> None:
        """get_resource returns the registered factory, or None."""
        dm = DataManager()
        dm.register_resources(counter=counter_resource)
        assert dm.get_resource("counter") is counter_resource
        assert dm.get_resource("missing") is None

    def test_duplicate_name_refused(self) -> None:
        """Registering a resource name twice raises AlreadyExistsException pointing to replace_resource."""
        dm = DataManager()
        dm.register_resources(counter=counter_resource)
        with pytest.raises(AlreadyExistsException, match="replace_resource") as info:
            dm.register_resources(counter=ValueResource(1))
        assert "'counter'" in str(info.value)
        assert dm.get_resource("counter") is counter_resource

    def test_replace_resource(self) -> None:
        """replace_resource swaps the factory for new contexts."""
        dm = DataManager()
        dm.register_resources(counter=counter_resource)
        dm.replace_resource("counter", ValueResource("replaced"))
        with dm.context() as ctx:
            assert ctx.counter == "replaced"

    def test_resource_registered_after_a_context_class_exists(self) -> None:
        """A resource registered after contexts were made is reachable in later contexts."""
        dm = DataManager()
        with dm.context():
            pass
        dm.register_resources(late=ValueResource("late"))
        with dm.context() as ctx:
            assert ctx.late == "late"

    def test_resource_registered_while_a_context_is_open(self) -> None:
        """A resource registered during an open context can be used in that context."""
        dm = DataManager()
        dm.register_resources(counter=counter_resource)
        with dm.context() as ctx:
            ctx.counter
            dm.register_resources(late=ValueResource("late"))
            assert ctx.late == "late"

    @pytest.mark.parametrize(
        "bad",
        [
            42,
            "db",
            None,
            lambda ctx: ctx,  # a plain function, not a generator
            ValueResource,  # the class, not an instance
            object(),
        ],
    )
    def test_non_factory_refused(self, bad: Any) -> None:
        """Anything that is not a generator callable raises InvalidResource (a TypeError)."""
        dm = DataManager()
        with pytest.raises(InvalidResource, match="resource 'bad' must be a generator function") as info:
            dm.register_resources(bad=bad)
        assert isinstance(info.value, TypeError)
        assert isinstance(info.value, ResourceException)
        assert dm.get_resource("bad") is None

    def test_non_factory_refused_by_replace(self) -> None:
        """replace_resource refuses a non-factory and keeps the old one."""
        dm = DataManager()
        dm.register_resources(counter=counter_resource)
        with pytest.raises(InvalidResource):
            dm.replace_resource("counter", 42)
        assert dm.get_resource("counter") is counter_resource

    @pytest.mark.parametrize("name", ["dal", "meta", "data_manager", "on_commit", "__class__"])
    def test_reserved_name_refused(self, name: str) -> None:
        """A name a context already uses cannot be a resource (it could never be reached)."""
        dm = DataManager()
        with pytest.raises(ValueError, match="taken by DataAccessContext"):
            dm.register_resources(**{name: counter_resource})

    def test_accepted_shapes(self) -> None:
        """Generator functions, Resource objects and @contextmanager factories are accepted."""

        @contextmanager
        def managed(ctx: DataAccessContext) -> Iterator[str]:
            yield "managed"

        class Custom(Resource):
            def __call__(self, context: DataAccessContext) -> Iterator[str]:
                yield "custom"

        class HasMethod:
            @contextmanager
            def __call__(self, context: DataAccessContext) -> Iterator[str]:
                yield "method"

        dm = DataManager()
        dm.register_resources(
            gen=counter_resource, managed=managed, custom=Custom(), value=ValueResource(7), meth=HasMethod()
        )
        with dm.context() as ctx:
            assert ctx.gen == {"n": 0}
            assert ctx.managed == "managed"
            assert ctx.custom == "custom"
            assert ctx.value == 7
            assert ctx.meth == "method"

    def test_resource_setup_hook_called_at_registration(self) -> None:
        """The deprecated Resource.setup(data_manager) is still called once at registration."""
        dm = DataManager()
        resource = ValueResource(1)
        dm.register_resources(one=resource)
        assert resource._data_manager is dm

    def test_custom_resource_manager(self) -> None:
        """DataManager(resource_manager=...) registers into and reads from the given manager."""
        manager = ResourceManager(None)
        dm = DataManager(resource_manager=manager)
        dm.register_resources(one=ValueResource(1))
        assert "one" in manager
        assert list(manager) == ["one"]
        assert manager["one"] is dm.get_resource("one")
        with dm.context() as ctx:
            assert ctx.one == 1

    def test_duck_typed_resource_manager(self) -> None:
        """Any object with the ResourceManager protocol (register, replace, [], in) works."""

        class DictResources:
            def __init__(self) -> None:
                self.factories: dict[str, Any] = {}

            def register_resources(self, **resources: Any) -> None:
                self.factories.update(resources)

            def replace_resource(self, key: str, resource: Any) -> None:
                self.factories[key] = resource

            def __getitem__(self, name: str) -> Any:
                return self.factories[name]

            def __contains__(self, name: object) -> bool:
                return name in self.factories

        manager = DictResources()
        dm = DataManager(resource_manager=manager)  # type: ignore[arg-type]
        dm.register_resources(counter=counter_resource)
        assert manager.factories == {"counter": counter_resource}
        assert dm.get_resource("counter") is counter_resource
        with dm.context() as ctx:
            assert ctx.counter == {"n": 0}
            assert "counter" in ctx


class TestRegisterContextMiddleware:
    def test_middleware_runs_around_each_context(self) -> None:
        """Registered middleware is set up on enter and torn down on exit."""
        events: list[str] = []

        def mw(ctx: DataAccessContext) -> Iterator[None]:
            events.append("setup")
            yield
            events.append("teardown")

        dm = DataManager()
        dm.register_context_middleware(mw)
        with dm.context():
            events.append("body")
        assert events == ["setup", "body", "teardown"]

    @pytest.mark.parametrize("bad", [42, None, "mw", lambda ctx: None, object()])
    def test_invalid_middleware_refused(self, bad: Any) -> None:
        """A non-generator callable raises InvalidMiddleware (a TypeError) saying what is accepted."""
        dm = DataManager()
        expected = "context middleware must be a generator function"
        with pytest.raises(InvalidMiddleware, match=expected) as info:
            dm.register_context_middleware(noop_middleware, bad)
        assert isinstance(info.value, TypeError)
        # Nothing from the refused call was registered.
        assert dm.get_middleware(dm.context()) == []

    def test_get_middleware_lists_in_order(self) -> None:
        """get_middleware returns the middleware in registration order."""

        def other(ctx: DataAccessContext) -> Iterator[None]:
            yield

        dm = DataManager()
        dm.register_context_middleware(noop_middleware)
        dm.register_context_middleware(other)
        assert dm.get_middleware(dm.context()) == [noop_middleware, other]

    def test_get_middleware_override_varies_per_context(self) -> None:
        """A subclass may choose middleware per context by overriding get_middleware."""
        events: list[str] = []

        def audited(ctx: DataAccessContext) -> Iterator[None]:
            events.append(f"audit {ctx.meta.user}")
            yield

        class Audited(DataManager):
            def get_middleware(self, context: DataAccessContext) -> list[Any]:
                return [audited] if context.meta.user else []

        dm = Audited()
        with dm.context({"user": "ann"}):
            pass
        with dm.context():
            pass
        assert events == ["audit ann"]


class TestRegisterMethodMiddleware:
    def test_wraps_every_dal_call(self) -> None:
        """register_method_middleware adds (request, handler) middleware around DAL calls."""
        seen: list[str] = []

        def audit(request: Any, handler: Any) -> Any:
            seen.append(request.path_name)
            return handler(request)

        dm = DataManager()
        dm.register_services(greeter=Greeter())
        dm.register_method_middleware(audit)
        with dm.dal() as dal:
            assert dal.greeter.hello("ann") == "hello ann"
        assert seen == ["greeter.hello"]

    def test_non_callable_refused(self) -> None:
        """A non-callable raises InvalidMiddleware naming what it got."""
        dm = DataManager()
        with pytest.raises(InvalidMiddleware, match=r"42 \(int\)"):
            dm.register_method_middleware(42)


class TestDal:
    def test_get_dal_is_the_instance_dal(self) -> None:
        """get_dal() returns dm._dal, a DataAccessLayer, the same every time."""
        dm = DataManager()
        assert isinstance(dm.get_dal(), DataAccessLayer)
        assert dm.get_dal() is dm._dal is dm.get_dal()

    def test_dal_context_manager_yields_the_dal_in_a_new_context(self) -> None:
        """dm.dal(meta) opens a new context with that meta and yields the DAL."""
        dm = DataManager()
        with dm.dal({"user": "ann"}) as dal:
            assert dal is dm.get_dal()
            ctx = dm.require_active_context()
            assert ctx.meta.user == "ann"
        assert dm.get_active_context() is None

    def test_dal_closes_context_on_error(self) -> None:
        """An exception in a dm.dal() block propagates and closes the context."""
        dm = DataManager()
        with pytest.raises(KeyError), dm.dal():
            raise KeyError("boom")
        assert dm.get_active_context() is None

    def test_subclass_overriding_get_dal(self) -> None:
        """A subclass overriding get_dal() gives its contexts that DAL."""

        class Manager(DataManager):
            def get_dal(self) -> DataAccessLayer:
                return self._dal

        dm = Manager()
        dm.register_services(greeter=Greeter())
        with dm.context() as ctx:
            assert ctx.dal is dm.get_dal()
            assert ctx.dal.greeter.hello("x") == "hello x"

    def test_subclass_dal_class(self) -> None:
        """A DataManager subclass may set its own DataAccessLayer class; it is built with the manager."""

        class MyDal(DataAccessLayer):
            made_with: Any = None

            def __init__(self, data_manager: Any) -> None:
                super().__init__(data_manager)
                self.made_with = data_manager

        class MyManager(DataManager):
            DataAccessLayer = MyDal

        dm = MyManager()
        assert isinstance(dm._dal, MyDal)
        assert dm.get_dal() is dm._dal
        assert dm._dal.made_with is dm
        dm.register_services(greeter=Greeter())
        with dm.dal() as dal:
            assert dal is dm._dal
            assert dal.greeter.hello("x") == "hello x"


class TestContexts:
    def test_context_returns_a_new_unentered_context(self) -> None:
        """dm.context(meta) returns a new DataAccessContext for this manager each time."""
        dm = DataManager()
        one, two = dm.context(), dm.context({"user": "ann"})
        assert isinstance(one, DataAccessContext)
        assert one is not two
        assert one.data_manager is dm
        assert one.dal is dm.get_dal()
        assert two.meta.user == "ann"
        assert dm.get_active_context() is None

    def test_get_active_context(self) -> None:
        """get_active_context() is None outside and the innermost context inside."""
        dm = DataManager()
        assert dm.get_active_context() is None
        with dm.context() as outer:
            assert dm.get_active_context() is outer
            with dm.context() as inner:
                assert dm.get_active_context() is inner
            assert dm.get_active_context() is outer
        assert dm.get_active_context() is None

    def test_require_active_context_inside(self) -> None:
        """require_active_context() returns the innermost context."""
        dm = DataManager()
        with dm.context() as ctx:
            assert dm.require_active_context() is ctx

    def test_require_active_context_outside(self) -> None:
        """Outside a context it raises NoActiveContextError (a RuntimeError) saying how to open one."""
        dm = DataManager()
        with pytest.raises(NoActiveContextError, match=r"with dm\.context\(\):") as info:
            dm.require_active_context()
        assert isinstance(info.value, RuntimeError)

    def test_require_active_context_after_exit(self) -> None:
        """After the context exited, require_active_context() raises again."""
        dm = DataManager()
        with dm.context():
            pass
        with pytest.raises(RuntimeError):
            dm.require_active_context()

    def test_inherited_exited_context_is_reported(self) -> None:
        """Code running in a copy of a contextvars.Context whose polydatum context has since
        exited gets a ContextStateError saying so, not a stale context."""
        dm = DataManager()
        with dm.context():
            snapshot = contextvars.copy_context()
        assert snapshot.run(dm.get_active_context) is None
        with pytest.raises(ContextStateError, match="already exited"):
            snapshot.run(dm.require_active_context)

    def test_two_managers_never_see_each_others_contexts(self) -> None:
        """Each DataManager has its own stack."""
        one, two = DataManager(), DataManager()
        with one.context() as ctx:
            assert one.get_active_context() is ctx
            assert two.get_active_context() is None
            with pytest.raises(NoActiveContextError):
                two.require_active_context()
            with two.context() as other:
                assert one.get_active_context() is ctx
                assert two.get_active_context() is other
            assert two.get_active_context() is None

    def test_two_managers_services_are_separate(self) -> None:
        """A service registered on one manager is not on another, and each DAL uses its own context."""
        one, two = DataManager(), DataManager()
        one.register_services(greeter=Greeter())
        two.register_services(greeter=Shouter())
        with one.dal() as dal_one:
            assert dal_one.greeter.hello("x") == "hello x"
            with pytest.raises(NoActiveContextError):
                two.get_dal().greeter.hello("x")

    def test_threads_do_not_share_contexts(self) -> None:
        """A context open in one thread is not active in another."""
        dm = DataManager()
        seen: list[Any] = []
        with dm.context():
            thread = threading.Thread(target=lambda: seen.append(dm.get_active_context()))
            thread.start()
            thread.join()
        assert seen == [None]

    def test_ctx_stack_top(self) -> None:
        """1.0's dm.ctx_stack.top is the active context."""
        dm = DataManager()
        assert dm.ctx_stack.top is None
        with dm.context() as ctx:
            assert dm.ctx_stack.top is ctx


# -- outermost middleware and removing middleware (the seam polydatum.otel installs through) --


def test_outermost_context_middleware_wraps_the_ones_registered_before() -> None:
    """register_context_middleware(outermost=True) sets up first and tears down last."""
    order: list[str] = []

    def named(label: str) -> Any:
        def middleware(ctx: DataAccessContext) -> Iterator[None]:
            order.append(f"{label} in")
            yield
            order.append(f"{label} out")

        return middleware

    dm = DataManager()
    dm.register_context_middleware(named("a"))
    dm.register_context_middleware(named("outer"), outermost=True)
    dm.register_context_middleware(named("b"))
    with dm.context():
        pass
    assert order == ["outer in", "a in", "b in", "b out", "a out", "outer out"]


def test_remove_context_middleware_restores_the_plain_path() -> None:
    """Removing the only context middleware makes contexts plain again; removing it twice is refused."""
    dm = DataManager()
    dm.register_context_middleware(noop_middleware)
    assert not dm.wiring.plain
    dm.remove_context_middleware(noop_middleware)
    assert dm.wiring.plain
    assert dm.get_middleware(dm.context()) == []
    with pytest.raises(ValueError, match="is not registered; nothing to remove"):
        dm.remove_context_middleware(noop_middleware)


def test_outermost_method_middleware_and_removing_it() -> None:
    """register_method_middleware(outermost=True) runs outside earlier ones; once removed, calls skip it."""
    order: list[str] = []

    def named(label: str) -> Any:
        def middleware(request: Any, handler: Any) -> Any:
            order.append(label)
            return handler(request)

        return middleware

    dm = DataManager()
    dm.register_services(greeter=Greeter())
    inner, outer = named("inner"), named("outer")
    dm.register_method_middleware(inner)
    dm.register_method_middleware(outer, outermost=True)
    with dm.dal() as dal:
        dal.greeter.hello("ann")
    assert order == ["outer", "inner"]
    dm.remove_method_middleware(outer)
    dm.remove_method_middleware(inner)
    assert dm.get_dal()._direct
    with dm.dal() as dal:
        assert dal.greeter.hello("bob") == "hello bob"
    assert order == ["outer", "inner"]
    with pytest.raises(ValueError, match="is not registered; nothing to remove"):
        dm.remove_method_middleware(inner)

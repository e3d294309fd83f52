"""Code written for polydatum 1.0 runs unchanged (docs/migrating-from-1.0.md).

The tests below are written the way 1.0 applications and their tests were:
a module-level DataManager, ``dm.dal()`` blocks, services reaching
``self._ctx``, class-based resources and middleware, context subclasses
overriding the ``_setup_hook``/``_teardown_hook``/``_final_hook`` extension
points, and a hand-built ``DataAccessLayer`` with method middleware.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import polydatum.context
import polydatum.dal
import polydatum.errors
import polydatum.middleware
import polydatum.resources
import polydatum.services
from polydatum import DataAccessLayer, DataManager, Service
from polydatum.context import DataAccessContext, Meta
from polydatum.errors import (
    AlreadyExistsException,
    ErrorsOnClose,
    InvalidMiddleware,
    MiddlewareException,
    MiddlewareSetupException,
    NotFound,
    PolydatumException,
    ResourceException,
    ResourceSetupException,
    ServiceError,
)
from polydatum.middleware import DalCommand, DalCommandRequest, DalMethodError, PathSegment, handle_dal_method
from polydatum.resources import Resource, ResourceManager, ValueResource

MODULE_NAMES = {
    "polydatum": ["DataManager", "DataAccessLayer", "Service"],
    "polydatum.dal": ["DataManager", "DataAccessLayer"],
    "polydatum.context": ["DataAccessContext", "Meta", "get_active_context", "current_context"],
    "polydatum.services": ["Service"],
    "polydatum.resources": ["Resource", "ValueResource", "ResourceManager"],
    "polydatum.middleware": [
        "PathSegment",
        "DalCommand",
        "DalCommandRequest",
        "DalMethodError",
        "dal_resolver",
        "resolve",
        "dal_method_resolver_middleware",
        "handle_dal_method",
    ],
    "polydatum.errors": [
        "PolydatumException",
        "ServiceError",
        "NotFound",
        "AlreadyExistsException",
        "MiddlewareException",
        "MiddlewareSetupException",
        "ResourceException",
        "ResourceSetupException",
        "InvalidMiddleware",
        "ErrorsOnClose",
    ],
    "polydatum.config": ["Config", "from_module"],
}


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, names in MODULE_NAMES.items() for n in names])
def test_1_0_names_importable_where_they_were(module: str, name: str) -> None:
    """Every 1.0 public name is importable from its 1.0 module (the table in docs/migrating-from-1.0.md)."""
    __import__(module)
    assert getattr(sys.modules[module], name) is not None


def test_same_objects_across_modules() -> None:
    """Names re-exported in several modules are the same objects."""
    assert polydatum.dal.DataManager is DataManager
    assert polydatum.dal.DataAccessLayer is DataAccessLayer
    assert polydatum.services.Service is Service
    assert polydatum.middleware.DalMethodError is polydatum.errors.DalMethodError


class TestErrors:
    def test_hierarchy(self) -> None:
        """The 1.0 exception hierarchy holds."""
        for exc in (
            ServiceError,
            AlreadyExistsException,
            MiddlewareException,
            ResourceException,
            ErrorsOnClose,
            DalMethodError,
        ):
            assert issubclass(exc, PolydatumException)
        assert issubclass(NotFound, ServiceError)
        assert issubclass(MiddlewareSetupException, MiddlewareException)
        assert issubclass(InvalidMiddleware, MiddlewareException)
        assert issubclass(ResourceSetupException, ResourceException)

    def test_codes(self) -> None:
        """ServiceError is 500 and NotFound 404, on the class and instances."""
        assert ServiceError.code == 500
        assert NotFound.code == 404
        assert NotFound("gone").code == 404

    def test_errors_on_close(self) -> None:
        """ErrorsOnClose(message, exceptions) keeps both and shows them."""
        inner = [ValueError("a")]
        error = ErrorsOnClose("closing failed", inner)
        assert error.message == "closing failed"
        assert error.exceptions is inner
        assert str(error) == "<ErrorsOnClose closing failed: [ValueError('a')]>"


# -- a 1.0-style application ---------------------------------------------------


class StateTestService(Service):
    def ping(self) -> str:
        return "PONG"

    def change_state(self, state: str) -> None:
        self._ctx.store["state"] = state

    def get_state(self) -> str:
        return str(self._ctx.store["state"])

    def get_user(self) -> Any:
        return self._ctx.meta.user


class TestMiddleware:
    """Example context middleware that sets its state at setup and teardown (a class, as in 1.0)."""

    def __call__(self, context: DataAccessContext) -> Iterator[None]:
        context.store["state"] = "setup"
        yield
        context.store["state"] = "torndown"


TestMiddleware.__test__ = False  # type: ignore[attr-defined]  # not a pytest test class


def test_1_0_application_round_trip() -> None:
    """Services, class middleware, ValueResource and dm.dal() work together as in 1.0."""
    data_store: dict[str, str] = {}

    data_manager = DataManager()
    data_manager.register_services(test=StateTestService())
    data_manager.register_context_middleware(TestMiddleware())
    data_manager.register_resources(store=ValueResource(data_store))

    with data_manager.dal() as dal:
        assert dal.test.ping() == "PONG"
        assert dal.test.get_state() == "setup"
        dal.test.change_state("middle")
        assert dal.test.get_state() == "middle"

    assert data_store["state"] == "torndown"


def test_meta_and_unique_contexts() -> None:
    """ctx.dal reaches services; meta is read-only; each dal() block is a new context."""
    user = object()
    dm = DataManager()
    dm.register_services(test=StateTestService())

    with dm.context(meta={"user": user}) as ctx:
        assert ctx.dal.test.get_user() is user
        with pytest.raises(AttributeError):
            ctx.meta.user = "foo"

    with dm.dal():
        context1 = dm.get_active_context()
    with dm.dal():
        context2 = dm.get_active_context()
    assert context1 is not None
    assert context1 != context2


def test_module_get_active_context_still_works() -> None:
    """polydatum.context.get_active_context() returns the active context (with a DeprecationWarning)."""
    dm = DataManager()
    with dm.context() as ctx, pytest.warns(DeprecationWarning, match="deprecated"):
        assert polydatum.context.get_active_context() is ctx


def test_require_active_context_raises_runtime_error() -> None:
    """1.0 callers catching RuntimeError outside a context still catch it."""
    dm = DataManager()
    with pytest.raises(RuntimeError):
        dm.require_active_context()


def test_dal_call_outside_context_raises_assertion_error() -> None:
    """1.0 raised AssertionError for DAL use outside a context; callers catching it still do."""
    dm = DataManager()
    dm.register_services(test=StateTestService())
    with pytest.raises(AssertionError):
        dm.get_dal().test.ping()


class TestResources:
    def test_class_resource_with_deprecated_setup(self) -> None:
        """A Resource subclass gets setup(data_manager) at registration and __call__ per context."""

        class Connection(Resource):
            def __init__(self) -> None:
                self.closed: list[bool] = []

            def __call__(self, context: DataAccessContext) -> Iterator[str]:
                try:
                    yield f"connection for {context.meta.user}"
                finally:
                    self.closed.append(True)

        dm = DataManager()
        conn = Connection()
        dm.register_resources(conn=conn)
        assert conn._data_manager is dm
        with dm.context(meta={"user": "ann"}) as ctx:
            assert ctx.conn == "connection for ann"
            assert "conn" in ctx
        assert conn.closed == [True]

    def test_base_resource_yields_none(self) -> None:
        """The base Resource yields None (1.0 default)."""
        dm = DataManager()
        dm.register_resources(nothing=Resource())
        with dm.context() as ctx:
            assert ctx.nothing is None

    def test_resource_manager_protocol(self) -> None:
        """ResourceManager supports register_resources, replace_resource, [] and in."""
        dm = DataManager()
        manager = ResourceManager(dm)
        value = ValueResource(1)
        manager.register_resources(one=value)
        assert "one" in manager
        assert manager["one"] is value
        with pytest.raises(AlreadyExistsException):
            manager.register_resources(one=ValueResource(2))
        manager.replace_resource("one", ValueResource(3))
        assert manager["one"] is not value

    def test_resource_exit_errors_are_exc_info_triples(self) -> None:
        """get_resource_exit_errors() returns [(type, value, traceback)], as in 1.0."""

        def broken(context: DataAccessContext) -> Iterator[int]:
            yield 1
            raise ValueError("close failed")

        dm = DataManager()
        dm.register_resources(broken=broken)
        with dm.context() as ctx:
            ctx.broken
        ((exc_type, exc_value, tb),) = ctx.get_resource_exit_errors()
        assert exc_type is ValueError
        assert str(exc_value) == "close failed"
        assert tb is not None


class TestMiddlewareErrors:
    def test_middleware_that_does_not_yield(self) -> None:
        """MiddlewareSetupException and the context does not continue."""

        def bogus_middleware(context: DataAccessContext) -> Iterator[None]:
            if False:  # pragma: no cover
                yield

        data_manager = DataManager()
        data_manager.register_context_middleware(bogus_middleware)
        with pytest.raises(MiddlewareSetupException), data_manager.dal():
            pytest.fail("Context should not have continued")  # pragma: no cover

    def test_middleware_that_yields_too_much(self) -> None:
        """Yielding twice raises RuntimeError."""

        def chatty_middleware(context: DataAccessContext) -> Iterator[None]:
            yield
            yield

        data_manager = DataManager()
        data_manager.register_context_middleware(chatty_middleware)
        with pytest.raises(RuntimeError), data_manager.dal():
            pass


class TestLegacyContextHooks:
    """1.0 applications subclassed DataAccessContext and returned it from DataManager.context()."""

    @staticmethod
    def make(events: list[str], fail_teardown: bool = False) -> DataManager:
        class HookedContext(DataAccessContext):
            def _setup_hook(self) -> None:
                active = self.data_manager.get_active_context() is self
                events.append(f"setup hook active={active}")

            def _teardown_hook(self, exception: BaseException | None) -> None:
                events.append(f"teardown hook {type(exception).__name__}")
                if fail_teardown:
                    raise KeyError("teardown hook failed")

            def _final_hook(self, exception: BaseException | None) -> None:
                events.append(f"final hook {type(exception).__name__}")

        class HookedManager(DataManager):
            def context(self, meta: Any = None) -> DataAccessContext:
                return HookedContext(self, meta=meta)

        def mw(context: DataAccessContext) -> Iterator[None]:
            events.append("middleware setup")
            try:
                yield
            finally:
                events.append("middleware teardown")

        def res(context: DataAccessContext) -> Iterator[str]:
            yield "r"
            events.append("resource closed")

        dm = HookedManager()
        dm.register_context_middleware(mw)
        dm.register_resources(res=res)
        return dm

    def test_hook_order_on_success(self) -> None:
        """setup hook after push; teardown hook after middleware; final hook last."""
        events: list[str] = []
        dm = self.make(events)
        with dm.context() as ctx:
            assert type(ctx).__name__ == "HookedContext"
            ctx.res
            ctx.on_commit(events.append, "commit hook")
            events.append("body")
        assert events == [
            "setup hook active=True",
            "middleware setup",
            "body",
            "middleware teardown",
            "teardown hook NoneType",
            "commit hook",
            "resource closed",
            "final hook NoneType",
        ]
        assert dm.get_active_context() is None

    def test_hooks_see_the_exception(self) -> None:
        """Teardown and final hooks get the in-context exception."""
        events: list[str] = []
        dm = self.make(events)

        def run() -> None:
            with dm.context():
                raise LookupError

        with pytest.raises(LookupError):
            run()
        assert "teardown hook LookupError" in events
        assert events[-1] == "final hook LookupError"

    def test_teardown_hook_errors_are_resource_exit_errors(self) -> None:
        """An exception in _teardown_hook is collected as a resource exit error, as in 1.0."""
        events: list[str] = []
        dm = self.make(events, fail_teardown=True)
        with dm.context() as ctx:
            ctx.res
        assert [t for t, _, _ in ctx.get_resource_exit_errors()] == [KeyError]
        assert "resource closed" in events
        assert events[-1] == "final hook NoneType"

    def test_setup_hook_error_leaves_nothing_open(self) -> None:
        """If _setup_hook raises, the error propagates, the body never runs and the stack is clean."""

        class FailingContext(DataAccessContext):
            def _setup_hook(self) -> None:
                raise KeyError("setup hook failed")

        class Manager(DataManager):
            def context(self, meta: Any = None) -> DataAccessContext:
                return FailingContext(self, meta=meta)

        dm = Manager()

        def run() -> Any:
            with pytest.raises(KeyError, match="setup hook failed"), dm.context():
                pytest.fail("body ran")  # pragma: no cover
            leaked = dm.get_active_context()
            if leaked is not None:
                # Close it, so it neither stays active nor warns when collected.
                leaked.__exit__(None, None, None)
            return leaked

        # In a copy of the contextvars context, so a leaked context cannot reach other tests.
        assert contextvars.copy_context().run(run) is None

    def test_final_hook_error_propagates_after_pop(self) -> None:
        """If _final_hook raises, the error propagates and the context is popped anyway."""

        class FailingContext(DataAccessContext):
            def _final_hook(self, exception: BaseException | None) -> None:
                raise KeyError("final hook failed")

        class Manager(DataManager):
            def context(self, meta: Any = None) -> DataAccessContext:
                return FailingContext(self, meta=meta)

        dm = Manager()

        def run() -> None:
            with dm.context():
                pass

        with pytest.raises(KeyError, match="final hook failed"):
            run()
        assert dm.get_active_context() is None

    def test_dal_context_uses_the_subclass(self) -> None:
        """dm.dal() goes through the overridden context() too."""
        events: list[str] = []
        dm = self.make(events)
        with dm.dal():
            pass
        assert events[0] == "setup hook active=True"


class TestHandBuiltDal:
    """1.0 built a DataAccessLayer by hand to test method middleware."""

    def test_method_middleware_order(self) -> None:
        """Instance middleware runs outermost first, a custom default middleware innermost."""

        def fake_method() -> list[str]:
            return ["default-handler-call"]

        class OuterMiddleware:
            def __call__(self, request: DalCommandRequest, handler: Any) -> list[str]:
                return ["outer-in", *handler(request), "outer-out"]

        class SecondMiddleware:
            def __call__(self, request: DalCommandRequest, handler: Any) -> list[str]:
                return ["second-in", *handler(request), "second-out"]

        class DefaultMiddleware:
            def __call__(self, request: DalCommandRequest, handler: Any) -> list[str]:
                request.dal_method = fake_method
                return ["default-in", *handler(request), "default-out"]

        dm = DataManager()
        dal = DataAccessLayer(
            data_manager=dm,
            middleware=[OuterMiddleware(), SecondMiddleware()],
            default_middleware=(DefaultMiddleware(),),
        )
        with dm.context():
            result = dal.fake.service.method()
        assert result == [
            "outer-in",
            "second-in",
            "default-in",
            "default-handler-call",
            "default-out",
            "second-out",
            "outer-out",
        ]

    def test_middleware_abort(self) -> None:
        """Middleware raising prevents the method from being called."""
        calls: list[str] = []

        class SpecificException(Exception):
            pass

        class AuthMiddleware:
            def __call__(self, request: DalCommandRequest, handler: Any) -> Any:
                if request.path[-1].name == "authenticated_method":
                    return handler(request)
                raise SpecificException

        class DefaultMiddleware:
            def __call__(self, request: DalCommandRequest, handler: Any) -> Any:
                request.dal_method = lambda: calls.append("called") or True
                return handler(request)

        dm = DataManager()
        dal = DataAccessLayer(
            data_manager=dm, middleware=[AuthMiddleware()], default_middleware=(DefaultMiddleware(),)
        )
        with dm.context():
            assert dal.fake.authenticated_method()
            assert calls == ["called"]
            with pytest.raises(SpecificException):
                dal.fake.service.method()
        assert calls == ["called"]

    def test_attribute_access_returns_commands(self) -> None:
        """Attributes of a hand-built DAL are DalCommands; set/deleted attributes behave normally."""
        dm = DataManager()
        dal = DataAccessLayer(data_manager=dm)
        dal.real = "real attribute"
        del dal.real
        with dm.context():
            assert isinstance(dal.real, DalCommand)
            assert isinstance(dal.foo.bar.fake, DalCommand)
            assert isinstance(getattr(dal, "random"), DalCommand)  # noqa: B009

    def test_handle_dal_method_outside_context(self) -> None:
        """handle_dal_method works on a request built in a context, after it ended."""
        called: list[Any] = []
        dm = DataManager()
        with dm.context() as ctx:
            request = DalCommandRequest(ctx, (PathSegment(name="x"),), args=["foo"], kwargs={"test": "bar"})
            request.dal_method = lambda *a, **k: called.append((a, k))
        handle_dal_method(request)
        assert called == [(("foo",), {"test": "bar"})]

    def test_dal_subclass_overriding_call(self) -> None:
        """A DAL subclass overriding _call(path, *args, **kwargs) sees every call, by attribute or string."""
        calls: list[str] = []

        class LoggingDal(DataAccessLayer):
            def _call(self, path: tuple[PathSegment, ...], *args: Any, **kwargs: Any) -> Any:
                calls.append(".".join(p.name for p in path))
                return super()._call(path, *args, **kwargs)

        class Manager(DataManager):
            DataAccessLayer = LoggingDal

        dm = Manager()
        dm.register_services(test=StateTestService())
        with dm.dal() as dal:
            assert dal.test.ping() == "PONG"
            assert dal["test.ping"]() == "PONG"
        assert calls == ["test.ping", "test.ping"]

    def test_data_manager_subclass_dal_class(self) -> None:
        """class MyDM(DataManager): DataAccessLayer = MyDAL (1.0 extension point)."""

        class AuditingDal(DataAccessLayer):
            def __init__(self, data_manager: Any) -> None:
                super().__init__(data_manager, middleware=[self.audit])
                self.seen: list[str] = []

            def audit(self, request: DalCommandRequest, handler: Any) -> Any:
                self.seen.append(".".join(p.name for p in request.path))
                return handler(request)

        class MyManager(DataManager):
            DataAccessLayer = AuditingDal

        dm = MyManager()
        dm.register_services(test=StateTestService())
        with dm.dal() as dal:
            assert dal.test.ping() == "PONG"
        assert dm.get_dal().seen == ["test.ping"]  # type: ignore[attr-defined]


def test_meta_class_kept() -> None:
    """Meta(opts) from 1.0 still builds read-only meta with attribute access."""
    meta = Meta({"user": "ann"})
    assert meta.user == "ann"
    assert meta.missing is None
    assert dict(meta.items()) == {"user": "ann"}

"""The DAL (docs/concepts/services.md): commands, string paths, errors, middleware, caching, patching."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest

from polydatum import DataAccessContext, DataAccessLayer, DataManager, Service
from polydatum.errors import DalMethodError, InvalidMiddleware, NoActiveContextError
from polydatum.middleware import (
    DalCommand,
    DalCommandRequest,
    PathSegment,
    dal_method_resolver_middleware,
    dal_resolver,
    handle_dal_method,
    resolve,
)


class Profiles(Service):
    def get(self, user_id: int) -> str:
        return f"profile {user_id}"

    def whose(self) -> Any:
        return self._ctx.meta.user

    limit = 5


class Users(Service):
    def get(self, user_id: int) -> str:
        return f"user {user_id}"

    def create(self, name: str, *, admin: bool = False) -> tuple[str, bool]:
        return name, admin


class OtherUsers(Service):
    def get(self, user_id: int) -> str:
        return f"other {user_id}"


def passthrough(request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
    return handler(request)


def make(with_method_middleware: bool = False) -> tuple[DataManager, Users]:
    dm = DataManager()
    users = Users().register_services(profile=Profiles())
    dm.register_services(users=users)
    if with_method_middleware:
        dm.register_method_middleware(passthrough)
    return dm, users


# Every DAL behaviour is checked both on the plain fast path and through a middleware chain.
CHAIN = pytest.mark.parametrize("chain", [False, True], ids=["direct", "middleware"])


class TestCommands:
    def test_attribute_access_builds_a_deferred_command(self) -> None:
        """dal.a.b.c is a DalCommand with a path of PathSegments; nothing is resolved yet."""
        dm, _ = make()
        with dm.dal() as dal:
            command = dal.no.such.method
            assert isinstance(command, DalCommand)
            assert command.path == (PathSegment("no"), PathSegment("such"), PathSegment("method"))
            assert str(command) == "no.such.method"
            assert repr(command) == "<DalCommand dal.no.such.method>"

    def test_command_outside_a_context_is_built_but_not_callable(self) -> None:
        """A command can be built without a context; calling it there raises NoActiveContextError."""
        dm, _ = make()
        command = dm.get_dal().users.get
        assert isinstance(command, DalCommand)
        with pytest.raises(NoActiveContextError, match=r"dal\.users\.get.*with dm\.context\(\)") as info:
            command(1)
        # 1.0 raised AssertionError here; both still catch it.
        assert isinstance(info.value, AssertionError)
        assert isinstance(info.value, RuntimeError)

    @CHAIN
    def test_call_passes_args_and_kwargs(self, chain: bool) -> None:
        """dal.users.create(*args, **kwargs) calls the method with them and returns its result."""
        dm, _ = make(chain)
        with dm.dal() as dal:
            assert dal.users.create("ann", admin=True) == ("ann", True)
            assert dal.users.profile.get(7) == "profile 7"

    @CHAIN
    def test_string_path(self, chain: bool) -> None:
        """dal["a.b.c"] is the same command as dal.a.b.c; a leading "dal." is ignored."""
        dm, _ = make(chain)
        with dm.dal() as dal:
            command = dal["users.profile.get"]
            assert isinstance(command, DalCommand)
            assert command.path == dal.users.profile.get.path
            assert command(3) == "profile 3"
            assert dal["dal.users.get"](4) == "user 4"

    @pytest.mark.parametrize("path", ["", "dal", "dal.", "users..get", ".users", "users."])
    def test_invalid_string_path(self, path: str) -> None:
        """An empty or malformed string path raises DalMethodError showing it and the expected form."""
        dm, _ = make()
        with pytest.raises(DalMethodError, match=r"expected dotted names like 'users\.get'") as info:
            dm.get_dal()[path]
        assert repr(path) in str(info.value)

    @CHAIN
    def test_command_kept_and_called_in_another_context(self, chain: bool) -> None:
        """A DalCommand kept from one context runs in whichever context is active when called."""
        dm, _ = make(chain)
        with dm.dal({"user": "ann"}) as dal:
            whose = dal.users.profile.whose
            by_name = dal["users.profile.whose"]
            assert whose() == "ann"
        with dm.dal({"user": "bob"}):
            assert whose() == "bob"
            assert by_name() == "bob"
        with pytest.raises(NoActiveContextError):
            whose()

    @CHAIN
    def test_command_kept_survives_nested_contexts(self, chain: bool) -> None:
        """A kept command sees the innermost context."""
        dm, _ = make(chain)
        whose = dm.get_dal().users.profile.whose
        with dm.context({"user": "outer"}):
            with dm.context({"user": "inner"}):
                assert whose() == "inner"
            assert whose() == "outer"

    def test_dal_is_an_ordinary_object(self) -> None:
        """Users may set and delete their own attributes on the DAL; deleted names are commands again."""
        dm, _ = make()
        dal = dm.get_dal()
        dal.real = "real attribute"
        assert dal.real == "real attribute"
        del dal.real
        with dm.context():
            assert isinstance(dal.real, DalCommand)

    def test_dunder_names_are_not_commands(self) -> None:
        """Dunder lookups raise AttributeError (copy, pickle and inspect are not fooled)."""
        dm, _ = make()
        with pytest.raises(AttributeError):
            dm.get_dal().__wrapped__
        with pytest.raises(AttributeError):
            dm.get_dal().users.__wrapped__


class TestDalCommandClass:
    def test_plain_dal_command(self) -> None:
        """DalCommand(handler, path): attributes extend the path; a call runs handler(path, *args)."""
        calls: list[Any] = []
        root = DalCommand(lambda path, *a, **k: calls.append((path, a, k)) or "done", (PathSegment("a"),))
        child = root.b.c
        assert isinstance(child, DalCommand)
        assert child.path == (PathSegment("a"), PathSegment("b"), PathSegment("c"))
        assert root.path == (PathSegment("a"),)
        assert child(1, x=2) == "done"
        assert calls == [(child.path, (1,), {"x": 2})]
        assert str(child) == "a.b.c"
        with pytest.raises(AttributeError):
            child.__wrapped__

    def test_subclass_brings_its_own_segment_type(self) -> None:
        """A DalCommand subclass may set PathSegment to its own segment class."""

        class VersionedSegment(PathSegment):
            def __init__(self, name: str) -> None:
                super().__init__(name, version=2)

        class VersionedCommand(DalCommand):
            PathSegment = VersionedSegment

        command = VersionedCommand(lambda path: path, ()).users.get
        assert isinstance(command, VersionedCommand)
        assert command() == (VersionedSegment("users"), VersionedSegment("get"))
        assert command.path[0].meta == {"version": 2}

    def test_dal_without_manager_cannot_call(self) -> None:
        """A DataAccessLayer built without a DataManager has no context to run in."""
        dal = DataAccessLayer(None)
        with pytest.raises(NoActiveContextError):
            dal.users.get(1)


class TestMoreResolution:
    @CHAIN
    def test_sub_service_attribute_removed(self, chain: bool) -> None:
        """A sub-service set as a plain attribute and later deleted fails cleanly on the next call."""
        dm, users = make(chain)
        helper = Profiles()
        helper.setup(dm)
        users.helper = helper
        with dm.dal() as dal:
            assert dal.users.helper.get(1) == "profile 1"
            del users.helper
            with pytest.raises(DalMethodError, match=r"no 'helper' under 'dal\.users'"):
                dal.users.helper.get(1)

    def test_hand_built_dal_resolves_the_managers_services(self) -> None:
        """A hand-built DataAccessLayer with the default resolver finds the services of the context's DAL."""
        seen: list[str] = []

        def spy(request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
            seen.append(request.path_name)
            return handler(request)

        dm, _ = make()
        dal = DataAccessLayer(dm, middleware=[spy])
        with dm.context():
            assert dal.users.profile.get(1) == "profile 1"
        assert seen == ["users.profile.get"]

    def test_many_string_paths(self) -> None:
        """Thousands of distinct string paths stay correct (the string cache is bounded)."""
        dm, _ = make()
        dal = dm.get_dal()
        commands = [dal[f"users.method_{i}"] for i in range(1500)]
        assert [str(c) for c in commands[:2]] == ["users.method_0", "users.method_1"]
        with dm.context():
            assert dal["users.get"](1) == "user 1"
            assert commands[-1].path[-1] == PathSegment("method_1499")

    def test_async_method_middleware_refuses_sync_calls(self) -> None:
        """With async method middleware, a call in a sync context says it must be awaited in async with."""

        async def audit(request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
            return await handler(request)  # pragma: no cover - never reached from sync code

        dm, _ = make()
        dm.register_method_middleware(audit)
        with dm.dal() as dal, pytest.raises(NoActiveContextError, match="must be awaited"):
            dal.users.get(1)


class TestUnknownPaths:
    @CHAIN
    @pytest.mark.parametrize(
        ("path", "bad", "where", "suggestion"),
        [
            ("user.get", "user", "dal", "users"),
            ("users.gett", "gett", "dal.users", "get"),
            ("users.profil.get", "profil", "dal.users", "profile"),
            ("users.profile.gte", "gte", "dal.users.profile", "get"),
        ],
    )
    def test_unknown_name_is_named_with_nearest(
        self, chain: bool, path: str, bad: str, where: str, suggestion: str
    ) -> None:
        """DalMethodError names the bad step, where it was looked up, and the nearest registered name."""
        dm, _ = make(chain)
        with dm.dal() as dal, pytest.raises(DalMethodError) as info:
            dal[path]()
        message = str(info.value)
        assert f"no {bad!r} under {where!r}" in message
        assert f"did you mean {suggestion!r}?" in message
        assert info.value.path == tuple(PathSegment(n) for n in path.split("."))

    def test_known_names_listed(self) -> None:
        """The error lists the known names at that level (services and methods, not plumbing)."""
        dm, _ = make()
        with dm.dal() as dal, pytest.raises(DalMethodError) as info:
            dal.users.zzzz()
        assert "Known: create, get, profile" in str(info.value)
        assert "did you mean" not in str(info.value)

    def test_nothing_registered(self) -> None:
        """With no services the error says nothing is registered."""
        dm = DataManager()
        with dm.dal() as dal, pytest.raises(DalMethodError, match="nothing registered"):
            dal.users.get()

    @CHAIN
    def test_non_callable_attribute(self, chain: bool) -> None:
        """A path to a plain attribute raises DalMethodError saying it is not a service or method."""
        dm, _ = make(chain)
        expected = r"dal\.users\.profile\.limit is 5 \(int\)"
        with dm.dal() as dal, pytest.raises(DalMethodError, match=expected):
            dal.users.profile.limit()

    def test_failure_is_not_cached(self) -> None:
        """A path that failed works as soon as the service is registered."""
        dm = DataManager()
        with dm.dal() as dal:
            command = dal.late.get
            with pytest.raises(DalMethodError):
                command(1)
            dm.register_services(late=Users())
            assert command(1) == "user 1"
            assert dal.late.get(2) == "user 2"

    def test_dal_method_error_default_message(self) -> None:
        """DalMethodError(path) alone says "Invalid dal method: a.b" (1.0 message)."""
        error = DalMethodError((PathSegment("a"), PathSegment("b")))
        assert str(error) == "Invalid dal method: a.b"
        assert error.path == (PathSegment("a"), PathSegment("b"))


class TestResolution:
    def test_dal_resolver(self) -> None:
        """dal_resolver(ctx, path) returns the object the path names."""
        dm, users = make()
        with dm.context() as ctx:
            assert dal_resolver(ctx, ctx.dal.users.path) is users
            assert dal_resolver(ctx, ctx.dal.users.profile.path) is users.profile
            assert dal_resolver(ctx, ctx.dal.users.get.path)(1) == "user 1"

    def test_dal_resolver_empty_path(self) -> None:
        """An empty path is a DalMethodError (1.0 test), with or without services."""
        dm = DataManager()
        with dm.context() as ctx, pytest.raises(DalMethodError, match="empty DAL path"):
            dal_resolver(ctx, ())
        dm.register_services(users=Users())
        with dm.context() as ctx, pytest.raises(DalMethodError):
            dal_resolver(ctx, ())

    def test_resolve_walks_the_path(self) -> None:
        """resolve(ctx, path) yields (location, object) per step, None after the first miss."""
        dm, users = make()
        path = (PathSegment("users"), PathSegment("nope"), PathSegment("get"))
        with dm.context() as ctx:
            steps = list(resolve(ctx, path))
        assert steps == [(path[:1], users), (path[:2], None), (path, None)]

    @CHAIN
    def test_calling_a_service_itself(self, chain: bool) -> None:
        """Calling a path that ends at a service (not a method) says so and lists its methods."""
        dm, _ = make(chain)
        with dm.dal() as dal:
            with pytest.raises(DalMethodError, match=r"dal.users.profile is a service, not a method.*get"):
                dal.users.profile()
            with pytest.raises(DalMethodError, match=r"dal.users is a service, not a method"):
                dal.users()
            with pytest.raises(DalMethodError, match=r"dal.users is a service"):
                dal["users"]()


class TestPathSegment:
    def test_equality_hash_repr(self) -> None:
        """PathSegments compare by name and meta; repr shows both."""
        assert PathSegment("a") == PathSegment("a")
        assert PathSegment("a") != PathSegment("b")
        assert PathSegment("a", version=2) != PathSegment("a")
        assert PathSegment("a", version=2) == PathSegment("a", version=2)
        assert hash(PathSegment("a")) == hash(PathSegment("a", x=1))
        assert PathSegment("a") != "a"
        assert repr(PathSegment("a", version=2)) == "PathSegment('a', version=2)"
        assert PathSegment(name="a").meta == {}


class TestMethodMiddleware:
    def test_chain_runs_outermost_first(self) -> None:
        """Middleware wraps the call in registration order, outermost first, and unwinds in reverse."""
        events: list[str] = []

        def layer(name: str) -> Callable[..., Any]:
            def mw(request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
                events.append(f"{name} in")
                result = handler(request)
                events.append(f"{name} out")
                return result

            return mw

        class Recording(Users):
            def get(self, user_id: int) -> str:
                events.append("method")
                return super().get(user_id)

        dm = DataManager()
        dm.register_services(users=Recording())
        dm.register_method_middleware(layer("outer"), layer("middle"))
        dm.register_method_middleware(layer("inner"))
        with dm.dal() as dal:
            assert dal.users.get(1) == "user 1"
        assert events == [
            "outer in",
            "middle in",
            "inner in",
            "method",
            "inner out",
            "middle out",
            "outer out",
        ]

    def test_request_fields(self) -> None:
        """The request carries ctx, path, args, kwargs; dal_method is set by the resolver, inside."""
        seen: dict[str, Any] = {}

        def spy(request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
            seen["before"] = request.dal_method
            seen.update(ctx=request.ctx, path=request.path, args=request.args, kwargs=request.kwargs)
            seen["path_name"] = request.path_name
            seen["repr"] = repr(request)
            result = handler(request)
            seen["after"] = request.dal_method
            return result

        dm, users = make()
        dm.register_method_middleware(spy)
        with dm.dal() as dal:
            ctx = dm.require_active_context()
            assert dal.users.create("ann", admin=True) == ("ann", True)
        assert seen["ctx"] is ctx
        assert seen["path"] == (PathSegment("users"), PathSegment("create"))
        assert seen["args"] == ("ann",)
        assert seen["kwargs"] == {"admin": True}
        assert seen["path_name"] == "users.create"
        assert seen["repr"] == "<DalCommandRequest users.create>"
        assert seen["before"] is None
        assert seen["after"] == users.create

    def test_middleware_may_change_arguments(self) -> None:
        """The request is mutable: a middleware may rewrite args and kwargs."""

        def upper(request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
            request.args = tuple(a.upper() for a in request.args)
            request.kwargs = {**request.kwargs, "admin": False}
            return handler(request)

        dm, _ = make()
        dm.register_method_middleware(upper)
        with dm.dal() as dal:
            assert dal.users.create("ann", admin=True) == ("ANN", False)

    def test_middleware_may_short_circuit(self) -> None:
        """A middleware that raises or returns without calling the handler stops the call."""
        called: list[str] = []

        class Denied(Exception):
            pass

        def auth(request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
            if request.ctx.meta.user is None:
                raise Denied(request.path_name)
            if request.path[-1].name == "get":
                return "cached"
            called.append(request.path_name)
            return handler(request)

        dm, _ = make()
        dm.register_method_middleware(auth)
        with dm.dal() as dal, pytest.raises(Denied, match=r"users\.create"):
            dal.users.create("x")
        with dm.dal({"user": "ann"}) as dal:
            assert dal.users.get(1) == "cached"
            assert dal.users.create("x") == ("x", False)
        assert called == ["users.create"]

    def test_middleware_class_is_instantiated(self) -> None:
        """A middleware class is instantiated once; its instance handles every call."""
        instances: list[Any] = []

        class Counting:
            def __init__(self) -> None:
                self.calls = 0
                instances.append(self)

            def __call__(
                self, request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]
            ) -> Any:
                self.calls += 1
                return handler(request)

        dm, _ = make()
        dm.register_method_middleware(Counting)
        with dm.dal() as dal:
            dal.users.get(1)
            dal.users.get(2)
        assert len(instances) == 1
        assert instances[0].calls == 2

    @pytest.mark.parametrize("bad", [42, "mw", True, None, [], object()])
    def test_non_callable_refused(self, bad: Any) -> None:
        """A non-callable raises InvalidMiddleware (a TypeError) naming it."""
        with pytest.raises(InvalidMiddleware, match="must be a callable") as info:
            DataAccessLayer(None, middleware=[bad], default_middleware=None)
        assert isinstance(info.value, TypeError)

    def test_class_without_call_refused(self) -> None:
        """A class whose instances are not callable is refused too (1.0 test)."""

        class NotMiddleware:
            pass

        with pytest.raises(InvalidMiddleware):
            DataAccessLayer(None, middleware=[NotMiddleware])
        with pytest.raises(InvalidMiddleware):
            DataAccessLayer(None, middleware=[NotMiddleware()])

    def test_errors_propagate_through_middleware(self) -> None:
        """An exception raised by the service method reaches the caller through the chain."""
        seen: list[str] = []

        def observe(request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
            try:
                return handler(request)
            except ValueError as exc:
                seen.append(str(exc))
                raise

        class Failing(Service):
            def go(self) -> None:
                raise ValueError("bad input")

        dm = DataManager()
        dm.register_services(failing=Failing())
        dm.register_method_middleware(observe)
        with dm.dal() as dal, pytest.raises(ValueError, match="bad input"):
            dal.failing.go()
        assert seen == ["bad input"]

    def test_unknown_path_through_middleware(self) -> None:
        """With middleware, an unknown path still raises DalMethodError (from the resolver, inside)."""
        dm, _ = make(with_method_middleware=True)
        with dm.dal() as dal, pytest.raises(DalMethodError, match="did you mean 'get'"):
            dal.users.gett()

    def test_custom_default_middleware_and_handler(self) -> None:
        """DataAccessLayer(default_middleware=..., handler=...) replaces the resolver and the final call."""
        events: list[str] = []

        def resolver(request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
            events.append("resolver")
            request.dal_method = lambda *a, **k: ("resolved", a, k)
            return handler(request)

        def final(request: DalCommandRequest) -> Any:
            events.append("handler")
            assert request.dal_method is not None
            return request.dal_method(*request.args, **request.kwargs)

        dm = DataManager()
        dal = DataAccessLayer(dm, default_middleware=(resolver,), handler=final)
        with dm.context():
            assert dal.fake.service.method(1, k=2) == ("resolved", (1,), {"k": 2})
        assert events == ["resolver", "handler"]

    def test_no_resolver_means_unresolved(self) -> None:
        """Without the resolver, the default handler raises DalMethodError saying how to fix the chain."""
        dm = DataManager()
        dm.register_services(users=Users())
        dal = DataAccessLayer(dm, default_middleware=None)
        with dm.context(), pytest.raises(DalMethodError, match="dal_method_resolver_middleware"):
            dal.users.get(1)

    def test_handle_dal_method_calls_resolved(self) -> None:
        """handle_dal_method calls request.dal_method with the request's args and kwargs."""
        dm = DataManager()
        with dm.context() as ctx:
            request = DalCommandRequest(ctx, (PathSegment("x"),), (1, 2), {"k": 3})
        request.dal_method = lambda *a, **k: (a, k)
        assert handle_dal_method(request) == ((1, 2), {"k": 3})

    def test_resolver_middleware_sets_dal_method(self) -> None:
        """dal_method_resolver_middleware resolves a hand-built request and continues."""
        dm, users = make()
        with dm.context() as ctx:
            request = DalCommandRequest(ctx, ctx.dal.users.get.path, (5,), {})
            result = dal_method_resolver_middleware(request, handle_dal_method)
        assert result == "user 5"
        assert request.dal_method == users.get

    def test_middleware_added_after_commands_were_used(self) -> None:
        """Middleware registered later applies to commands already built and called."""
        seen: list[str] = []

        def spy(request: DalCommandRequest, handler: Callable[[DalCommandRequest], Any]) -> Any:
            seen.append(request.path_name)
            return handler(request)

        dm, _ = make()
        with dm.dal() as dal:
            get = dal.users.get
            assert get(1) == "user 1"
            dm.register_method_middleware(spy)
            assert get(2) == "user 2"
            assert dal.users.get(3) == "user 3"
        assert seen == ["users.get", "users.get"]


class TestCachingInvalidation:
    @CHAIN
    def test_replace_service_seen_by_kept_command(self, chain: bool) -> None:
        """A command that already resolved sees replace_service on its next call."""
        dm, _ = make(chain)
        with dm.dal() as dal:
            get = dal.users.get
            by_name = dal["users.get"]
            assert get(1) == "user 1"
            assert by_name(1) == "user 1"
            dm.replace_service("users", OtherUsers())
            assert get(1) == "other 1"
            assert by_name(1) == "other 1"
            assert dal.users.get(1) == "other 1"

    @CHAIN
    def test_replace_nested_service(self, chain: bool) -> None:
        """Nesting a new service under an existing name is seen on the next call."""
        dm, users = make(chain)

        class OtherProfiles(Service):
            def get(self, user_id: int) -> str:
                return f"other profile {user_id}"

        with dm.dal() as dal:
            assert dal.users.profile.get(1) == "profile 1"
            users.register_services(profile=OtherProfiles())
            assert dal.users.profile.get(1) == "other profile 1"

    @CHAIN
    def test_register_new_service_seen(self, chain: bool) -> None:
        """Registering a service makes commands to it work right away."""
        dm, _ = make(chain)
        with dm.dal() as dal:
            assert dal.users.get(1) == "user 1"
            dm.register_services(others=OtherUsers())
            assert dal.others.get(1) == "other 1"

    @CHAIN
    def test_service_replaced_between_contexts(self, chain: bool) -> None:
        """A replacement made between contexts is used by the next one."""
        dm, _ = make(chain)
        with dm.dal() as dal:
            get = dal.users.get
            assert get(1) == "user 1"
        dm.replace_service("users", OtherUsers())
        with dm.dal():
            assert get(1) == "other 1"

    def test_two_managers_resolve_independently(self) -> None:
        """The same path resolves to each manager's own service."""
        one, _ = make()
        two = DataManager()
        two.register_services(users=OtherUsers())
        with one.dal() as dal_one:
            assert dal_one.users.get(1) == "user 1"
        with two.dal() as dal_two:
            assert dal_two.users.get(1) == "other 1"
        with one.dal() as dal_one:
            assert dal_one.users.get(1) == "user 1"


class TestPatching:
    """A method patched on a service instance or class takes effect on the very next DAL call."""

    @staticmethod
    def warm(dal: DataAccessLayer) -> None:
        # Resolve (and cache) every path first, so the patch has to beat the cache.
        assert dal.users.get(1) == "user 1"
        assert dal.users.profile.get(1) == "profile 1"
        assert dal["users.get"](1) == "user 1"

    @CHAIN
    def test_monkeypatch_instance(self, chain: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        """monkeypatch.setattr on the service instance; undo restores the original."""
        dm, users = make(chain)
        with dm.dal() as dal:
            self.warm(dal)
            monkeypatch.setattr(users, "get", lambda user_id: f"patched {user_id}")
            assert dal.users.get(2) == "patched 2"
            assert dal["users.get"](2) == "patched 2"
            monkeypatch.undo()
            assert dal.users.get(3) == "user 3"
            assert dal["users.get"](3) == "user 3"
            assert "get" not in vars(users)

    @CHAIN
    def test_monkeypatch_class(self, chain: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        """monkeypatch.setattr on the service class; undo restores the original."""
        dm, _ = make(chain)
        with dm.dal() as dal:
            self.warm(dal)
            monkeypatch.setattr(Users, "get", lambda self, user_id: f"class patched {user_id}")
            assert dal.users.get(2) == "class patched 2"
            monkeypatch.undo()
            assert dal.users.get(3) == "user 3"

    @CHAIN
    def test_mock_patch_object_instance(self, chain: bool) -> None:
        """unittest.mock.patch.object on the instance, as a context manager."""
        dm, users = make(chain)
        with dm.dal() as dal:
            self.warm(dal)
            with mock.patch.object(users, "get", return_value="mocked") as fake:
                assert dal.users.get(2) == "mocked"
                assert dal["users.get"](2) == "mocked"
            fake.assert_called_with(2)
            assert fake.call_count == 2
            assert dal.users.get(3) == "user 3"

    @CHAIN
    def test_mock_patch_object_class_autospec(self, chain: bool) -> None:
        """mock.patch.object on the class with autospec sees the instance as self."""
        dm, users = make(chain)
        with dm.dal() as dal:
            self.warm(dal)
            with mock.patch.object(Users, "get", autospec=True, return_value="spec") as fake:
                assert dal.users.get(2) == "spec"
            fake.assert_called_once_with(users, 2)
            assert dal.users.get(3) == "user 3"

    @CHAIN
    def test_nested_instance_patch(self, chain: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        """A method patched on a nested service instance is used, then gone after undo."""
        dm, users = make(chain)
        with dm.dal() as dal:
            self.warm(dal)
            monkeypatch.setattr(users.profile, "get", lambda user_id: f"nested {user_id}")
            assert dal.users.profile.get(2) == "nested 2"
            assert dal["users.profile.get"](2) == "nested 2"
            monkeypatch.undo()
            assert dal.users.profile.get(3) == "profile 3"

    @CHAIN
    def test_nested_class_patch(self, chain: bool) -> None:
        """A method patched on a nested service's class is used, then gone after the patch ends."""
        dm, _ = make(chain)
        with dm.dal() as dal:
            self.warm(dal)
            with mock.patch.object(Profiles, "get", lambda self, user_id: f"nested class {user_id}"):
                assert dal.users.profile.get(2) == "nested class 2"
            assert dal.users.profile.get(3) == "profile 3"

    @CHAIN
    def test_nested_service_swapped_on_parent(self, chain: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        """Patching the sub-service attribute itself (users.profile = fake) is used, then undone."""
        dm, users = make(chain)

        class FakeProfiles(Service):
            def get(self, user_id: int) -> str:
                return f"fake profile {user_id}"

        with dm.dal() as dal:
            self.warm(dal)
            monkeypatch.setattr(users, "profile", FakeProfiles())
            assert dal.users.profile.get(2) == "fake profile 2"
            monkeypatch.undo()
            assert dal.users.profile.get(3) == "profile 3"

    @CHAIN
    def test_patch_seen_by_kept_command_in_later_context(self, chain: bool) -> None:
        """A command kept across contexts also sees patches (and their undoing)."""
        dm, _ = make(chain)
        with dm.dal() as dal:
            get = dal.users.profile.get
            assert get(1) == "profile 1"
        with dm.dal(), mock.patch.object(Profiles, "get", return_value="later"):
            assert get(2) == "later"
        with dm.dal():
            assert get(3) == "profile 3"

    @CHAIN
    def test_patch_made_before_first_call(self, chain: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        """A patch made before anything was resolved is used and then undone."""
        dm, users = make(chain)
        monkeypatch.setattr(users, "get", lambda user_id: "early")
        with dm.dal() as dal:
            assert dal.users.get(1) == "early"
            monkeypatch.undo()
            assert dal.users.get(1) == "user 1"

    @pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
    def test_patch_a_service_name_on_the_dal(self, warm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        """monkeypatch/mock on the DAL attribute itself (dal.users = fake) works and is undone."""

        class FakeUsers:
            def get(self, user_id: int) -> str:
                return "fake"

        dm, _ = make()
        with dm.dal() as dal:
            if warm:
                assert dal.users.get(1) == "user 1"
            monkeypatch.setattr(dal, "users", FakeUsers(), raising=False)
            assert dal.users.get(1) == "fake"
            monkeypatch.undo()
            assert dal.users.get(2) == "user 2"
            with mock.patch.object(dal, "users", FakeUsers()):
                assert dal.users.get(1) == "fake"
            assert dal.users.get(3) == "user 3"

    def test_1_0_style_patch_through_dal_resolver(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The 1.0 idiom: find the service with dal_resolver, monkeypatch its method."""
        dm, _ = make()
        with dm.context() as ctx:
            ctx.dal.users.get(1)
            service = dal_resolver(ctx, ctx.dal.users.path)
            monkeypatch.setattr(service, "get", mock.Mock(return_value="mock value"))
            assert ctx.dal.users.get(1) == "mock value"


class TestContextMiddlewareAndDal:
    def test_dal_inside_middleware_setup_and_teardown(self) -> None:
        """Context middleware may call the DAL while the context is being set up and torn down."""
        seen: list[str] = []

        def mw(ctx: DataAccessContext) -> Iterator[None]:
            seen.append(ctx.dal.users.get(1))
            yield
            seen.append(ctx.dal.users.get(2))

        dm, _ = make()
        dm.register_context_middleware(mw)
        with dm.dal():
            pass
        assert seen == ["user 1", "user 2"]

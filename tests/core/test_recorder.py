"""polydatum.recorder: a bounded in-process record of recent contexts and their DAL calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from polydatum import DataAccessContext, DataManager, Service
from polydatum.meta import Meta
from polydatum.recorder import MAX_COUNTERS, UNRESOLVED, ContextRecord, Recorder, context_name


class Boom(Exception):
    """Raised on purpose."""


class Users(Service):
    def get(self, user_id: int) -> dict[str, int]:
        return {"id": user_id}

    def fail(self, secret: str) -> None:
        raise Boom(f"password was {secret}")


class Notes(Service):
    def read(self, note_id: int) -> dict[str, Any]:
        return {"id": note_id, "author": self._dal.users.get(1)}

    async def aread(self, note_id: int) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"id": note_id, "author": await self._dal.users.aget(note_id)}


class AsyncUsers(Users):
    async def aget(self, user_id: int) -> dict[str, int]:
        await asyncio.sleep(0.001)
        return {"id": user_id}


@pytest.fixture(name="dm")
def fixture_dm() -> DataManager:
    dm = DataManager()
    dm.register_services(users=AsyncUsers(), notes=Notes())
    return dm


@pytest.fixture(name="recorder")
def fixture_recorder(dm: DataManager) -> Iterator[Recorder]:
    with Recorder().install(dm) as recorder:
        yield recorder


def fields(record: ContextRecord) -> str:
    """Everything a record holds, as one string (to search for what must not be there)."""
    parts = [repr(getattr(record, name)) for name in ContextRecord.__slots__]
    parts += [repr((c.name, c.error)) for c in record.calls]
    return " ".join(parts)


class TestRecording:
    def test_a_context_is_recorded_with_its_calls_nested(self, dm: DataManager, recorder: Recorder) -> None:
        """A committed context keeps its name, request id, outcome and DAL calls with their depth."""
        with dm.dal(meta={"task_name": "reindex", "request_id": "r-1"}) as dal:
            dal.notes.read(7)
            dal.users.get(2)
        (record,) = recorder.contexts()
        assert (record.name, record.request_id, record.outcome, record.error) == (
            "reindex",
            "r-1",
            "commit",
            None,
        )
        assert [(c.name, c.depth) for c in record.calls] == [
            ("notes.read", 0),
            ("users.get", 1),
            ("users.get", 0),
        ]
        assert all(c.duration is not None and c.duration >= 0 for c in record.calls)
        assert record.calls[1].start >= record.calls[0].start
        assert 0 <= record.ended <= record.duration
        assert recorder.get(record.id) is record

    def test_a_rollback_keeps_the_error_type_but_not_its_message(
        self, dm: DataManager, recorder: Recorder
    ) -> None:
        """A failed call and the context it ends are kept with the exception's type, never its text."""
        with pytest.raises(Boom), dm.dal() as dal:
            dal.users.fail("hunter2")
        (record,) = recorder.contexts()
        assert record.outcome == "rollback"
        assert record.error == f"{__name__}.Boom"
        assert record.calls[0].error == f"{__name__}.Boom"
        assert "hunter2" not in fields(record)

    def test_hook_errors_are_counted(self, dm: DataManager, recorder: Recorder) -> None:
        """Hooks that raise are counted, although they run after the middleware ended."""

        def failing() -> None:
            raise Boom

        with dm.context() as ctx:
            ctx.on_commit(failing)
            ctx.on_commit(failing)
        assert recorder.contexts()[0].hook_errors == 2

    def test_no_meta_value_is_kept_but_the_name_and_request_id(
        self, dm: DataManager, recorder: Recorder
    ) -> None:
        """Meta other than the method, route, task name and request id never reaches a record."""
        meta = {"method": "GET", "route": "/users/{id}", "path": "/users/ann@example.com", "user": "s3cr3t"}
        with dm.context(meta=meta):
            pass
        (record,) = recorder.contexts()
        assert record.name == "GET /users/{id}"
        assert "ann@example.com" not in fields(record)
        assert "s3cr3t" not in fields(record)

    def test_meta_that_cannot_be_shown_never_fails_the_context(
        self, dm: DataManager, recorder: Recorder
    ) -> None:
        """A task name or request id whose str() raises is recorded as missing; the context commits."""

        class Unprintable:
            def __str__(self) -> str:
                raise Boom

        with dm.context(meta={"task_name": Unprintable(), "request_id": Unprintable()}):
            pass
        (record,) = recorder.contexts()
        assert (record.name, record.request_id, record.outcome) == ("context", None, "commit")

    def test_an_unresolved_path_is_not_kept(self, dm: DataManager, recorder: Recorder) -> None:
        """A DAL path that names nothing (it may be anything a client sent) is recorded as <unresolved>."""
        with pytest.raises(Exception, match="no 'x_secret_path'"), dm.dal() as dal:
            dal["users.x_secret_path"]()
        (call,) = recorder.contexts()[0].calls
        assert call.name == UNRESOLVED
        assert call.error is not None
        assert call.error.endswith("DalMethodError")

    def test_counters_count_in_the_active_context_only(self, dm: DataManager, recorder: Recorder) -> None:
        """count() adds to the active recorded context; outside one it does nothing; kinds are bounded."""
        recorder.count("sql")
        with dm.context():
            recorder.count("sql")
            recorder.count("sql", 2)
            for i in range(MAX_COUNTERS + 10):
                recorder.count(f"kind.{i}")
        (record,) = recorder.contexts()
        assert record.counts["sql"] == 3
        assert len(record.counts) == MAX_COUNTERS


class TestBounded:
    def test_ten_thousand_contexts_keep_the_last_two_hundred(
        self, dm: DataManager, recorder: Recorder
    ) -> None:
        """Whatever the rate, only the last `limit` contexts are kept, newest first."""
        for i in range(10_000):
            with dm.dal(meta={"request_id": str(i)}) as dal:
                dal.users.get(i)
        kept = recorder.contexts()
        assert len(kept) == 200
        assert [r.request_id for r in kept[:2]] == ["9999", "9998"]
        assert kept[-1].request_id == "9800"
        assert recorder.get(kept[-1].id - 1) is None

    def test_calls_per_context_are_capped(self, dm: DataManager) -> None:
        """Past max_calls, the calls of a context are only counted."""
        with Recorder(limit=5, max_calls=100).install(dm) as recorder:
            with dm.dal() as dal:
                for i in range(150):
                    dal.notes.read(i)  # two calls each
            (record,) = recorder.contexts()
        assert len(record.calls) == 100
        assert record.calls_dropped == 200

    def test_open_contexts_are_held_weakly(self, dm: DataManager, recorder: Recorder) -> None:
        """A context entered and never exited leaves nothing in the recorder once it is collected."""
        import contextvars
        import gc

        gc.disable()  # collected below, inside pytest.warns, not whenever the collector runs
        try:
            contextvars.Context().run(lambda: dm.context().__enter__())
            assert recorder.running() == 1
            with pytest.warns(ResourceWarning):
                gc.collect()
        finally:
            gc.enable()
        assert recorder.running() == 0
        assert recorder.contexts() == []


class TestConcurrency:
    def test_threads_record_their_own_contexts(self, dm: DataManager, recorder: Recorder) -> None:
        """Contexts running on eight threads at once each keep exactly their own calls."""
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                barrier.wait()
                for i in range(50):
                    with dm.dal(meta={"request_id": f"{n}-{i}"}) as dal:
                        for _ in range(n + 1):
                            dal.users.get(n)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        kept = recorder.contexts()
        assert len(kept) == 200
        for record in kept:
            n = int(str(record.request_id).split("-")[0])
            assert len(record.calls) == n + 1

    async def test_gathered_async_calls_nest_under_their_own_caller(
        self, dm: DataManager, recorder: Recorder
    ) -> None:
        """Async calls gathered in one context each nest under the call that made them."""
        async with dm.dal() as dal:
            await asyncio.gather(dal.notes.aread(1), dal.notes.aread(2), dal.users.aget(3))
        (record,) = recorder.contexts()
        names = sorted((c.name, c.depth) for c in record.calls)
        assert names == [
            ("notes.aread", 0),
            ("notes.aread", 0),
            ("users.aget", 0),
            ("users.aget", 1),
            ("users.aget", 1),
        ]
        assert all(c.duration is not None and c.duration > 0 for c in record.calls)


class TestInstalling:
    def test_uninstall_stops_recording(self, dm: DataManager) -> None:
        """After uninstall(), contexts are no longer recorded, and what was recorded stays."""
        recorder = Recorder().install(dm)
        with dm.context():
            pass
        recorder.uninstall()
        recorder.uninstall()
        with dm.dal() as dal:
            dal.users.get(1)
        assert len(recorder.contexts()) == 1
        assert dm.get_middleware(dm.context()) == []

    def test_a_recorder_is_installed_once(self, dm: DataManager, recorder: Recorder) -> None:
        """Installing a recorder twice is refused with a message naming the fix."""
        with pytest.raises(RuntimeError, match="one Recorder per DataManager"):
            recorder.install(DataManager())

    @pytest.mark.parametrize("value", [0, -1, 2.5, "200", True])
    def test_limits_must_be_positive_integers(self, value: Any) -> None:
        """A limit that is not a positive int is refused, naming the argument."""
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            Recorder(limit=value)
        with pytest.raises(ValueError, match="max_calls must be a positive integer"):
            Recorder(max_calls=value)

    def test_it_is_outermost(self, dm: DataManager) -> None:
        """Installed after other middleware, it still sees the exception they let out as a rollback."""

        def converts(ctx: DataAccessContext) -> Iterator[None]:
            try:
                yield
            except Boom:
                raise KeyError("converted") from None

        dm.register_context_middleware(converts)
        with Recorder().install(dm) as recorder:
            with pytest.raises(KeyError), dm.context():
                raise Boom
            assert recorder.contexts()[0].error == "KeyError"


class TestContextName:
    @pytest.mark.parametrize(
        ("meta", "name"),
        [
            ({"task_name": "notes.index", "method": "GET"}, "notes.index"),
            ({"method": "POST", "route": "/notes"}, "POST /notes"),
            ({"method": "GET", "path": "/notes/42"}, "GET"),
            ({"method": "BREW"}, "HTTP"),
            ({}, "context"),
        ],
    )
    def test_names(self, meta: dict[str, Any], name: str) -> None:
        """The name comes from the task name, else the method and route, never the path."""
        assert context_name(Meta(meta)) == name

    def test_long_names_are_cut(self) -> None:
        """A name longer than 200 characters is cut, so a record's size is bounded."""
        assert len(context_name(Meta({"task_name": "t" * 10_000}))) == 200

"""polydatum.debug: the page of recent contexts, and the SQL statement counts it shows."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from werkzeug.test import Client
from werkzeug.wrappers import Response

from polydatum import DataManager, Service, _telemetry
from polydatum.blob import MemoryBlobStore
from polydatum.cache import Cache
from polydatum.debug import DebugPage
from polydatum.recorder import Recorder
from polydatum.sqlalchemy import AsyncDatabase, Database


class Boom(Exception):
    """Raised on purpose."""


class Notes(Service):
    def count(self) -> int:
        return int(self._ctx.db.execute(text("SELECT 1")).scalar_one()) + int(
            self._ctx.db.execute(text("SELECT 2")).scalar_one()
        )

    def check(self, title: str) -> str:
        return title

    def add(self, title: str) -> str:
        return str(self._dal.notes.check(title))

    def fail(self) -> None:
        raise Boom


def app(environ: Any, start_response: Any) -> Any:
    return Response("the app")(environ, start_response)


@pytest.fixture(name="dm")
def fixture_dm() -> DataManager:
    dm = DataManager()
    dm.register_services(notes=Notes())
    return dm


@pytest.fixture(name="recorder")
def fixture_recorder(dm: DataManager) -> Iterator[Recorder]:
    with Recorder().install(dm) as recorder:
        yield recorder


@pytest.fixture(name="client")
def fixture_client(recorder: Recorder) -> Client:
    return Client(DebugPage(recorder, app))


class TestListPage:
    def test_lists_contexts_with_their_calls_and_outcome(
        self, dm: DataManager, recorder: Recorder, client: Client
    ) -> None:
        """The list shows each context's name, outcome, error type and DAL call names."""
        with dm.dal(meta={"task_name": "notes.import"}) as dal:
            dal.notes.add("a")
        with pytest.raises(Boom), dm.dal(meta={"method": "POST", "route": "/notes"}) as dal:
            dal.notes.fail()
        response = client.get("/_polydatum")
        assert response.status_code == 200
        assert response.mimetype == "text/html"
        page = response.get_data(as_text=True)
        rows = re.findall(r'<tr class="context (\w+)" data-id="(\d+)">', page)
        assert [outcome for outcome, _ in rows] == ["rollback", "commit"]
        assert "notes.import" in page
        assert "POST /notes" in page
        assert '<code class="call-name">notes.add</code>' in page
        assert f"{__name__}.Boom" in page

    def test_every_value_is_escaped_and_no_script_may_run(
        self, dm: DataManager, recorder: Recorder, client: Client
    ) -> None:
        """A `<script>` task name or route is shown as text, and the page forbids scripts anyway."""
        with dm.context(meta={"task_name": "<script>alert(1)</script>"}):
            pass
        with dm.context(meta={"method": "GET", "route": '"><img src=x onerror=alert(2)>'}):
            pass
        response = client.get("/_polydatum")
        page = response.get_data(as_text=True)
        assert "<script>" not in page
        assert "<img" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
        assert "script-src" not in response.headers["Content-Security-Policy"]
        assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
        (record_id,) = [r.id for r in recorder.contexts() if r.name.startswith("<script>")]
        detail = client.get(f"/_polydatum/{record_id}").get_data(as_text=True)
        assert "<script>" not in detail
        assert "&lt;script&gt;" in detail

    def test_an_empty_recorder_says_so(self, client: Client) -> None:
        """Before any context finished, the page says what to do."""
        assert "make a request, then reload" in client.get("/_polydatum/").get_data(as_text=True)

    def test_it_can_reload_itself(self, client: Client) -> None:
        """?refresh=N adds a meta refresh (the page runs no script); a bad value is a 400 saying why."""
        page = client.get("/_polydatum?refresh=5").get_data(as_text=True)
        assert '<meta http-equiv="refresh" content="5">' in page
        assert "http-equiv" not in client.get("/_polydatum").get_data(as_text=True)
        for bad in ("0", "601", "1000", "x", "<script>", "9" * 40, "-1"):
            response = client.get("/_polydatum", query_string={"refresh": bad})
            assert response.status_code == 400, bad
            assert response.get_data(as_text=True) == (
                "refresh must be a number of seconds from 1 to 600, like ?refresh=5\n"
            )

    def test_it_counts_the_running_contexts(self, dm: DataManager, client: Client) -> None:
        """The page says how many recorded contexts are open right now."""
        with dm.context():
            page = client.get("/_polydatum").get_data(as_text=True)
        assert '<span id="running">1</span> running now' in page

    def test_cache_and_blob_counters_are_shown(
        self, dm: DataManager, recorder: Recorder, client: Client
    ) -> None:
        """Cache lookups and blob transfers reported to the recorder appear in their columns."""
        with dm.context():
            recorder.cache_lookup("notes", 2, 1)
            recorder.cache_lookup("notes", True, False)
            recorder.blob_bytes("in", 1000)
            recorder.blob_bytes("in", 24)
            recorder.blob_bytes("out", 5)
        (record,) = recorder.contexts()
        assert record.counts == {
            "cache.hit": 3,
            "cache.miss": 1,
            "blob.in": 2,
            "blob.in.bytes": 1024,
            "blob.out": 1,
            "blob.out.bytes": 5,
        }
        page = client.get("/_polydatum").get_data(as_text=True)
        assert '<td class="num cache">3/1</td>' in page
        assert '<td class="blobs">in 2 (1024 B), out 1 (5 B)</td>' in page

    def test_the_cache_and_blob_integrations_feed_the_counters(
        self, dm: DataManager, recorder: Recorder
    ) -> None:
        """A real cache and blob store report to an installed recorder, with nothing wired by hand."""
        cache = Cache(namespace="recorded")
        blobs = MemoryBlobStore()
        with dm.context():
            assert cache.get("k") is None
            cache.set("k", 1)
            assert cache.get_many(["k", "other"]) == {"k": 1}
            blobs.put("a.txt", b"hello")
            assert blobs.get("a.txt") == b"hello"
        (record,) = recorder.contexts()
        assert record.counts == {
            "cache.hit": 1,
            "cache.miss": 2,
            "blob.in": 1,
            "blob.in.bytes": 5,
            "blob.out": 1,
            "blob.out.bytes": 5,
        }
        recorder.uninstall()
        with dm.context():
            cache.get("k")
        assert _telemetry.sink is None


class TestDetailPage:
    def test_draws_a_waterfall_of_the_calls(
        self, dm: DataManager, recorder: Recorder, client: Client
    ) -> None:
        """A context's page has one SVG bar per DAL call (plus the context's), nested calls indented."""
        with dm.dal(meta={"task_name": "t"}) as dal:
            dal.notes.add("a")
            dal.notes.add("b")
        (record,) = recorder.contexts()
        page = client.get(f"/_polydatum/{record.id}").get_data(as_text=True)
        svg = page[page.index("<svg") : page.index("</svg>")]
        assert svg.count('<g class="row">') == 1 + 4
        assert re.findall(r'<code class="call-name">((?:&nbsp;)*)([\w.]+)</code>', page) == [
            ("", "notes.add"),
            ("&nbsp;&nbsp;", "notes.check"),
            ("", "notes.add"),
            ("&nbsp;&nbsp;", "notes.check"),
        ]
        assert '<dd class="outcome">commit</dd>' in page

    @pytest.mark.parametrize(
        ("path", "status", "says"),
        [
            ("/_polydatum/abc", 404, "no such page; the contexts are at /_polydatum"),
            ("/_polydatum/" + "9" * 19, 404, "no such page"),
            ("/_polydatum/424242", 404, "context #424242 is not kept (only the last 200 are)"),
            ("/_polydatum/%3Cscript%3E", 404, "no such page"),
        ],
    )
    def test_bad_ids_are_404s_that_say_why(self, client: Client, path: str, status: int, says: str) -> None:
        """An id that is not a number, too long, or no longer kept is a 404 saying so (nothing echoed)."""
        response = client.get(path)
        assert response.status_code == status
        assert says in response.get_data(as_text=True)
        assert "<script>" not in response.get_data(as_text=True)

    def test_only_get_is_answered(self, client: Client) -> None:
        """The page refuses other methods with a 405 naming the allowed ones."""
        response = client.post("/_polydatum")
        assert response.status_code == 405
        assert response.headers["Allow"] == "GET, HEAD"


class TestMounting:
    def test_other_paths_go_to_the_app(self, client: Client) -> None:
        """Everything outside the prefix is the wrapped application's."""
        assert client.get("/notes").get_data(as_text=True) == "the app"
        assert client.get("/_polydatumX").get_data(as_text=True) == "the app"

    def test_without_an_app_other_paths_are_404(self, recorder: Recorder) -> None:
        """A page mounted alone answers 404 outside its prefix."""
        assert Client(DebugPage(recorder)).get("/").status_code == 404

    def test_links_follow_the_script_root_and_prefix(self, dm: DataManager, recorder: Recorder) -> None:
        """Links work when the app is mounted under a script root, at another prefix."""
        with dm.context():
            pass
        client = Client(DebugPage(recorder, prefix="/debug/contexts"))
        page = client.get("/debug/contexts", environ_overrides={"SCRIPT_NAME": "/api"}).get_data(as_text=True)
        assert f'href="/api/debug/contexts/{recorder.contexts()[0].id}"' in page

    @pytest.mark.parametrize("prefix", ["_polydatum", "/_polydatum/", ""])
    def test_a_bad_prefix_is_refused(self, recorder: Recorder, prefix: str) -> None:
        """A prefix without a leading slash, or with a trailing one, is refused naming the shape."""
        with pytest.raises(ValueError, match="prefix must start with '/'"):
            DebugPage(recorder, prefix=prefix)


class TestStatements:
    def test_sql_statements_are_counted_per_context(self, tmp_path: Path) -> None:
        """With a polydatum.sqlalchemy database installed first, each context counts its statements."""
        db = Database(f"sqlite:///{tmp_path / 'count.db'}")
        dm = DataManager()
        db.install(dm)
        dm.register_services(notes=Notes())
        try:
            with Recorder().install(dm) as recorder:
                with dm.dal() as dal:
                    dal.notes.count()
                with dm.context():
                    pass
                quiet, busy = recorder.contexts()
                assert quiet.counts == {}
                assert busy.counts["sql"] >= 2
                page = Client(DebugPage(recorder)).get("/_polydatum").get_data(as_text=True)
                assert re.search(r'<td class="num sql">\d+</td>', page)
            # Uninstalled: no listener is left on the engine.
            with dm.dal() as dal:
                dal.notes.count()
            assert len(recorder.contexts()) == 2
        finally:
            db.dispose()

    async def test_async_statements_are_counted_too(self) -> None:
        """An AsyncDatabase's statements count in the async context that sent them."""

        class AsyncNotes(Service):
            async def count(self) -> int:
                session = await self._ctx.aget("db")
                return int((await session.execute(text("SELECT 1"))).scalar_one())

        db = AsyncDatabase("sqlite+aiosqlite:///:memory:")
        dm = DataManager()
        db.install(dm)
        dm.register_services(notes=AsyncNotes())
        try:
            with Recorder().install(dm) as recorder:
                async with dm.dal() as dal:
                    assert await dal.notes.count() == 1
                (record,) = recorder.contexts()
            assert record.counts["sql"] >= 1
            assert [call.name for call in record.calls] == ["notes.count"]
        finally:
            await db.dispose()

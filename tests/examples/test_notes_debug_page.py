"""The example's live page of recent contexts (``serve --debug``), in a real headless Chromium.

The browser test saves its screenshots under the test's tmp dir; with
``POLYDATUM_SCREENSHOTS=1`` it also rewrites the ones in docs/_static/
(commit them), so CI never dirties the tree.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from notes import Settings, build
from notes.app import NotesApp
from notes.cli import debug_warning, parser
from werkzeug.test import Client

from polydatum.recorder import Recorder
from tests.examples.conftest import serving
from tests.support.browser import INSTALL, chromium_page, find_chromium

DOCS_STATIC = Path(__file__).resolve().parents[2] / "docs" / "_static"


@pytest.fixture(name="app")
def fixture_app(tmp_path: Path) -> Iterator[NotesApp]:
    app = build(Settings.from_env({"NOTES_DATA": str(tmp_path)}))
    try:
        app.check()
        app.create_tables()
        yield app
    finally:
        app.close()


def test_the_page_is_off_by_default(app: NotesApp) -> None:
    """Without --debug, /_polydatum is the API's 404 and no recorder is installed."""
    assert parser().parse_args(["serve"]).debug is False
    assert parser().parse_args(["serve", "--debug"]).debug is True
    response = Client(app.wsgi()).get("/_polydatum")
    assert response.status_code == 404
    assert response.json is not None
    assert response.json["status"] == 404
    with app.dm.context() as ctx:
        owners = [getattr(m, "__self__", None) for m in app.dm.get_middleware(ctx)]
    assert not any(isinstance(owner, Recorder) for owner in owners)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "127.0.0.2"])
def test_debug_on_loopback_is_quiet(address: str) -> None:
    """serve --debug on a loopback address prints no warning."""
    assert debug_warning(address) is None


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.168.1.20", "fe80::1%eth0"])
def test_debug_off_loopback_warns(address: str) -> None:
    """serve --debug on any other address warns that the page is open to the network."""
    warning = debug_warning(address)
    assert warning is not None
    assert warning.startswith(f"warning: --debug on {address} shows service paths and timings")


def test_the_page_in_a_real_browser(app: NotesApp, tmp_path: Path) -> None:
    """Requests through the example show up on /_polydatum in Chromium: names, outcomes, calls, a timeline."""
    if find_chromium() is None:
        pytest.fail(f"this test drives a real browser; install Chromium with: {INSTALL}")
    with serving(app.wsgi(debug=True)) as url, httpx.Client(base_url=url, timeout=30) as http:
        user = http.post("/users", json={"name": "ada"}).json()
        headers = {"Authorization": f"Bearer {user['token']}"}
        notebook = http.post("/notebooks", json={"name": "ideas"}, headers=headers).json()
        note = http.post(
            f"/notebooks/{notebook['id']}/notes",
            json={"title": "hello", "text": "a first note"},
            headers=headers,
        ).json()
        assert http.get(f"/notes/{note['id']}", headers=headers).status_code == 200
        assert http.get(f"/users/{user['id']}", headers=headers).status_code == 200
        assert http.get("/notes/999999", headers=headers).status_code == 404

        shots = tmp_path / "screenshots"
        with chromium_page(width=1280, height=720) as page:
            page.goto(f"{url}/_polydatum")
            rows = page.evaluate(
                """[...document.querySelectorAll('#contexts tbody tr')].map(tr => ({
                    name: tr.querySelector('td.name').textContent,
                    outcome: tr.querySelector('td.outcome').textContent,
                    calls: [...tr.querySelectorAll('.call-name')].map(c => c.textContent),
                    sql: tr.querySelector('td.sql').textContent,
                    href: tr.querySelector('td.name a').getAttribute('href'),
                }))"""
            )
            page.screenshot(shots / "polydatum-page.png")
            by_name = {row["name"]: row for row in rows}
            requests = [row["name"] for row in rows if row["name"] != "notes.index_note"]
            assert requests == [
                "GET /notes/{note_id}",
                "GET /users/{user_id}",
                "GET /notes/{note_id}",
                "POST /notebooks/{notebook_id}/notes",
                "POST /notebooks",
                "POST /users",
            ], rows
            # The Celery task (eager) that the note's commit sent ran in a context of its own.
            assert by_name["notes.index_note"]["outcome"] == "commit", rows
            assert rows[0]["outcome"].startswith("rollback")
            assert "NotFound" in rows[0]["outcome"]
            assert rows[1]["outcome"] == rows[2]["outcome"] == "commit"
            added = by_name["POST /notebooks/{notebook_id}/notes"]
            assert added["outcome"] == "commit"
            assert "notes.add" in added["calls"]
            assert int(added["sql"]) >= 2
            assert "users.sign_up" in by_name["POST /users"]["calls"]

            # A user's profile counts their notes: a DAL call inside a DAL call.
            page.goto(url + by_name["GET /users/{user_id}"]["href"])
            timeline = page.evaluate(
                """({
                    bars: document.querySelectorAll('#waterfall g.row').length,
                    calls: [...document.querySelectorAll('#calls .call-name')].map(c => c.textContent.trim()),
                    outcome: document.querySelector('dd.outcome').textContent,
                })"""
            )
            page.screenshot(shots / "polydatum-timeline.png")
        assert timeline["outcome"] == "commit"
        assert timeline["calls"][:2] == ["users.profile", "notes.count_for"]
        assert timeline["bars"] == len(timeline["calls"]) + 1
    for shot in ("polydatum-page.png", "polydatum-timeline.png"):
        assert (shots / shot).read_bytes().startswith(b"\x89PNG")
        if os.environ.get("POLYDATUM_SCREENSHOTS") == "1":
            shutil.copyfile(shots / shot, DOCS_STATIC / shot)

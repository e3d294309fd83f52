"""The example's web pages in a real headless Chromium: the tour of docs/tour.md.

One browser for the module. The test walks what a newcomer does: sign up,
make a note, edit it in two tabs (the second save sees the conflict page),
attach a file, search, and a ``<script>`` title that stays text. It saves a
screenshot of each step under the test's tmp dir; with
``POLYDATUM_SCREENSHOTS=1`` it also rewrites docs/_static/tour-*.png
(commit them), so CI never dirties the tree.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from notes import Settings, build
from notes.app import NotesApp

from tests.examples.conftest import serving
from tests.support.browser import INSTALL, Page, chromium_page, find_chromium

DOCS_STATIC = Path(__file__).resolve().parents[2] / "docs" / "_static"
XSS = '<script>document.title="pwned"</script>'
STEPS = (
    "tour-1-welcome.png",
    "tour-2-signed-up.png",
    "tour-3-notebook.png",
    "tour-4-note.png",
    "tour-5-conflict.png",
    "tour-6-attachment.png",
    "tour-7-search.png",
    "tour-8-escaped.png",
)


@pytest.fixture(name="browser", scope="module")
def fixture_browser() -> Iterator[Page]:
    if find_chromium() is None:
        pytest.fail(f"the tour drives a real browser; install Chromium with: {INSTALL}")
    with chromium_page(width=1024, height=720) as page:
        yield page


@pytest.fixture(name="url")
def fixture_url(tmp_path: Path) -> Iterator[str]:
    app: NotesApp = build(Settings.from_env({"NOTES_DATA": str(tmp_path / "data")}))
    try:
        app.check()
        app.create_tables()
        with serving(app.wsgi()) as url:
            yield url
    finally:
        app.close()


def act(page: Page, script: str, timeout: float = 20.0) -> None:
    """Run ``script`` (a click, a form submit) and wait until the page it leads to has loaded."""
    page.evaluate("window.__tour_old_page = true")
    page.evaluate(script)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if page.evaluate("window.__tour_old_page !== true && document.readyState === 'complete'"):
                return
        except RuntimeError:  # asked while the old page went away
            pass
        if time.monotonic() > deadline:
            msg = f"no new page loaded within {timeout} s after {script!r}"
            raise TimeoutError(msg)
        time.sleep(0.05)


def fill_and_submit(page: Page, form: str, **fields: str) -> None:
    """Type ``fields`` into the form matching the CSS selector ``form`` and submit it."""
    values = json.dumps(fields)
    act(
        page,
        f"""(() => {{
            const form = document.querySelector({json.dumps(form)});
            for (const [name, value] of Object.entries({values})) form.elements[name].value = value;
            form.requestSubmit();
        }})()""",
    )


def text(page: Page, selector: str) -> Any:
    return page.evaluate(f"document.querySelector({json.dumps(selector)})?.textContent")


def test_the_tour(browser: Page, url: str, tmp_path: Path) -> None:
    """Sign up, write, edit in two tabs, attach, search, and a script title that stays text."""
    shots = tmp_path / "screenshots"
    page = browser
    page.goto(f"{url}/app/")
    assert text(page, "h1") == "Notes, on polydatum"
    page.screenshot(shots / STEPS[0])

    fill_and_submit(page, "form[action='/app/sign-up']", name="ada")
    assert text(page, "h1") == "Welcome, ada"
    assert text(page, "#token").startswith("1.")
    # HttpOnly: the page's own scripts cannot read the session cookie.
    assert "notes_session" not in page.evaluate("document.cookie")
    page.screenshot(shots / STEPS[1])

    act(page, "document.querySelector('a.button').click()")
    fill_and_submit(page, "form[action='/app/notebooks']", name="Ideas")
    assert text(page, "h1") == "Ideas"
    fill_and_submit(
        page, "form[action$='/notes']", title="Trip plan", text="Pack the tent and the map.\nBook the train."
    )
    assert text(page, "#title") == "Trip plan"
    page.goto(page.evaluate("location.href").rsplit("/notes/", 1)[0] + "/notebooks/1")
    page.screenshot(shots / STEPS[2])

    page.goto(f"{url}/app/notes/1")
    page.screenshot(shots / STEPS[3])

    # Two tabs open the same note for editing; the first to save wins.
    other = page.open_tab(width=1024, height=720)
    page.goto(f"{url}/app/notes/1/edit")
    other.goto(f"{url}/app/notes/1/edit")
    fill_and_submit(other, "form[action$='/edit']", text="Pack the tent, the map and the stove.")
    assert "stove" in text(other, "#text")
    fill_and_submit(page, "form[action$='/edit']", text="Pack the tent and the map.\nBook the train early!")
    assert text(page, "h1") == "Someone else changed this note"
    assert "early!" in text(page, "#your-text")
    page.screenshot(shots / STEPS[4])
    act(page, "document.querySelector('#reload').click()")
    assert "stove" in page.evaluate("document.querySelector('textarea[name=text]').value")
    fill_and_submit(
        page, "form[action$='/edit']", text="Pack the tent, the map and the stove. Book the train!"
    )
    assert "Book the train!" in text(page, "#text")

    upload = tmp_path / "packing-list.txt"
    upload.write_text("tent\nmap\nstove\n")
    page.set_files("input[type=file]", upload)
    act(page, "document.querySelector('form[enctype] button').click()")
    assert text(page, "#attachments a") == "packing-list.txt"
    # The download, with the browser's own session cookie (a page script cannot read it).
    cookies = {c["name"]: c for c in page.send("Network.getCookies", urls=[f"{url}/app/"])["cookies"]}
    session = cookies["notes_session"]
    assert (session["secure"], session["httpOnly"], session["sameSite"]) == (True, True, "Lax")
    download = httpx.get(
        page.evaluate("document.querySelector('#attachments a').href"),
        cookies={"notes_session": session["value"]},
        timeout=10,
    )
    assert download.content == b"tent\nmap\nstove\n"
    assert download.headers["Content-Disposition"] == "attachment; filename*=UTF-8''packing-list.txt"
    page.screenshot(shots / STEPS[5])

    fill_and_submit(page, "form.search", word="stove")
    assert page.evaluate("[...document.querySelectorAll('#results a')].map(a => a.textContent)") == [
        "Trip plan"
    ]
    page.screenshot(shots / STEPS[6])

    page.goto(f"{url}/app/notebooks/1")
    fill_and_submit(page, "form[action$='/notes']", title=XSS, text=f"text with {XSS} in it")
    shown = page.evaluate(
        """({
            title: document.querySelector('#title').textContent,
            text: document.querySelector('#text').textContent,
            scripts: document.querySelectorAll('script').length,
            tab: document.title,
        })"""
    )
    assert shown == {
        "title": XSS,
        "text": f"text with {XSS} in it",
        "scripts": 0,
        "tab": f"{XSS} · polydatum notes",
    }
    page.goto(f"{url}/app/notebooks/1")
    assert page.evaluate("document.querySelectorAll('script').length") == 0
    assert XSS in page.evaluate("document.querySelector('#notes').textContent")
    page.screenshot(shots / STEPS[7])

    for shot in STEPS:
        assert (shots / shot).read_bytes().startswith(b"\x89PNG")
        if os.environ.get("POLYDATUM_SCREENSHOTS") == "1":
            shutil.copyfile(shots / shot, DOCS_STATIC / shot)

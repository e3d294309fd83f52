"""Headless Chromium driven over the Chrome DevTools Protocol: no driver, no browser download.

Debian's ``chromium`` package is the browser; the protocol runs over one
websocket (the ``websockets`` package the suite already has). Only what
the page tests need: open a URL, wait for it to load, evaluate JavaScript
in it, take a screenshot.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = "apt-get install -y chromium (Debian/Ubuntu), or set CHROMIUM to a Chromium binary"


def find_chromium() -> str | None:
    """The Chromium binary: $CHROMIUM, else the first of BROWSERS on PATH."""
    configured = os.environ.get("CHROMIUM")
    if configured:
        return configured
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One browser tab, spoken to through a flattened CDP session."""

    def __init__(self, socket: ClientConnection, session: str, ids: Iterator[int] | None = None) -> None:
        self._socket = socket
        self._session = session
        self._ids = ids if ids is not None else itertools.count(1000)

    def open_tab(self, width: int = 1280, height: int = 900) -> Page:
        """Another tab of the same browser (same cookies), on about:blank."""
        return _open_tab(self._socket, self._ids, width, height)

    def set_files(self, selector: str, *paths: Path) -> None:
        """Choose ``paths`` in the page's ``<input type=file>`` matching the CSS ``selector``."""
        found = self.send("Runtime.evaluate", expression=f"document.querySelector({json.dumps(selector)})")
        object_id = found["result"].get("objectId")
        if object_id is None:
            msg = f"no element matches {selector!r}"
            raise RuntimeError(msg)
        self.send("DOM.setFileInputFiles", objectId=object_id, files=[str(p) for p in paths])

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call ``method`` in the tab; return its result (events seen meanwhile are dropped)."""
        return _call(self._socket, self._ids, method, params, self._session)

    def wait_for(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        """Wait for the tab's next ``event``; return its params."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                msg = f"Chromium sent no {event} within {timeout} s"
                raise TimeoutError(msg)
            message = json.loads(self._socket.recv(timeout=left))
            if message.get("method") == event and message.get("sessionId") == self._session:
                params: dict[str, Any] = message.get("params", {})
                return params

    def goto(self, url: str) -> None:
        """Open ``url`` and wait until it has loaded."""
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript ``expression`` in the page (JSON-serialisable)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            msg = f"{expression!r} raised in the page: {result['exceptionDetails']}"
            raise RuntimeError(msg)
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """Save the whole page as a PNG at ``path``."""
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))


def _call(
    socket: ClientConnection, ids: Iterator[int], method: str, params: dict[str, Any], session: str | None
) -> dict[str, Any]:
    call_id = next(ids)
    message: dict[str, Any] = {"id": call_id, "method": method, "params": params}
    if session is not None:
        message["sessionId"] = session
    socket.send(json.dumps(message))
    while True:
        reply = json.loads(socket.recv(timeout=30))
        if reply.get("id") == call_id:
            if "error" in reply:
                msg = f"Chromium refused {method}: {reply['error']}"
                raise RuntimeError(msg)
            result: dict[str, Any] = reply["result"]
            return result


def _open_tab(socket: ClientConnection, ids: Iterator[int], width: int, height: int) -> Page:
    target = _call(socket, ids, "Target.createTarget", {"url": "about:blank"}, None)
    session = _call(
        socket, ids, "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, None
    )["sessionId"]
    page = Page(socket, session, ids)  # one counter per socket: replies are matched by id
    page.send("Page.enable")
    page.send(
        "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
    )
    return page


def _devtools_url(profile: Path, process: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    # Chromium writes the port it picked (remote-debugging-port=0) and the
    # browser target's path to this file once it listens.
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"Chromium exited with status {process.returncode} before listening"
            raise RuntimeError(msg)
        lines = port_file.read_text().split() if port_file.exists() else []
        if len(lines) >= 2:
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        time.sleep(0.05)
    msg = f"Chromium did not open its DevTools port within {timeout} s"
    raise TimeoutError(msg)


@contextmanager
def chromium_page(width: int = 1280, height: int = 900) -> Iterator[Page]:
    """A headless Chromium with one tab, closed (and its profile removed) afterwards.

    Raises:
        RuntimeError: no Chromium is installed (the message says what to install).
    """
    binary = find_chromium()
    if binary is None:
        msg = f"the browser tests need Chromium; install it with: {INSTALL}"
        raise RuntimeError(msg)
    # Chromium's helper processes may still write to the profile as it goes: best-effort removal.
    with tempfile.TemporaryDirectory(prefix="polydatum-chromium-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",  # root in CI containers; the page is our own, on loopback
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with connect(_devtools_url(Path(profile), process), max_size=None) as socket:
                yield _open_tab(socket, itertools.count(1), width, height)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

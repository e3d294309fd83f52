"""``python -m polydatum inspect`` on the example application, in a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.examples.conftest import EXAMPLE

TARGET = "notes.app:data_manager()"


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(EXAMPLE), "NOTES_DATA": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "polydatum", "inspect", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_inspect_prints_the_map_of_the_notes_app(tmp_path: Path) -> None:
    """The text map lists the services and methods, resources, middleware and integrations."""
    done = run(tmp_path, TARGET)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "  notes: notes.services:Notes  # Notes: versioned edits" in text
    assert "      find(word: Any, *, limit: int = 50) -> list[dict[str, Any]]  # The caller's notes" in text
    assert "  db      generator  polydatum.sqlalchemy." in text
    assert "  outbox  generator  polydatum.outbox." in text
    assert "  jobs    value " in text
    assert "  1. notes.auth:AuthMiddleware" in text
    assert "  polydatum.sqlalchemy  resources: db; context middleware: " in text


def test_inspect_json_is_for_tools(tmp_path: Path) -> None:
    """``--json`` gives the same map as data."""
    done = run(tmp_path, TARGET, "--json")
    assert done.returncode == 0, done.stderr
    app = json.loads(done.stdout)
    assert [s["name"] for s in app["services"]] == ["users", "notebooks", "notes"]
    assert {r["name"]: r["kind"] for r in app["resources"]} == {
        "db": "generator",
        "outbox": "generator",
        "cache": "generator",
        "blobs": "generator",
        "jobs": "value",
    }
    assert sorted(app["integrations"]) == ["blob", "cache", "outbox", "sqlalchemy"]
    assert app["method_middleware"] == [{"defined_by": "notes.auth:AuthMiddleware", "integration": None}]


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("no.such:thing", "no module named 'no'"),
        ("notes.app:build", "'notes.app:build' is the function build, not a DataManager"),
        ("notes.app", "'notes.app' is not MODULE:NAME"),
    ],
)
def test_a_bad_target_exits_2_saying_what_to_pass(tmp_path: Path, target: str, says: str) -> None:
    """A bad target exits 2 with one line on stderr that says what to pass."""
    done = run(tmp_path, target)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert says in done.stderr
    assert "pass MODULE:NAME naming a DataManager" in done.stderr

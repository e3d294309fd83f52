"""The ``polydatum-notes`` command: --help, seed (with its progress bar), serve in a real process."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from notes import Settings, build
from notes.cli import Progress, main

from tests.examples.conftest import EXAMPLE, serving


@pytest.fixture
def data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("DATABASE_URL", "REDIS_URL", "BLOB_URL", "CELERY_BROKER_URL", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NOTES_DATA", str(tmp_path))
    return tmp_path


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "seed", "check", "worker"):
        assert re.search(rf"^\s+{command}\s+\w", out, re.MULTILINE), out
    assert "DATABASE_URL" in out
    with pytest.raises(SystemExit) as exited:
        main(["seed", "--help"])
    assert "--notes" in capsys.readouterr().out


def test_seed_fills_the_database_with_a_progress_bar(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["seed", "--users", "2", "--notebooks", "2", "--notes", "2500", "--batch", "1000",
                   "--random-seed", "7"])
    out, err = capsys.readouterr()
    assert status == 0, err
    # Not a terminal: one line per tenth of the work, 0% and 100% included.
    bars = err.splitlines()
    assert bars[0].startswith("seeding notes [")
    assert " 0/2500 " in bars[0]
    assert " 100% 2500/2500 " in bars[-1]
    assert len(bars) <= 11
    assert "seeded 2 users, 4 notebooks, 2500 notes" in out
    tokens = re.findall(r"^  \S+: (\d+\.[0-9a-f]{64})$", out, re.MULTILINE)
    assert len(tokens) == 2

    app = build(Settings.from_env({"NOTES_DATA": str(data_dir)}))
    try:
        with serving(app.wsgi()) as url:
            counts = [httpx.get(f"{url}/me", headers={"Authorization": f"Bearer {t}"}).json()["note_count"]
                      for t in tokens]
            assert sum(counts) == 2500
            # Seeded notes come with their word index.
            headers = {"Authorization": f"Bearer {tokens[0]}"}
            notebook = httpx.get(f"{url}/notebooks", headers=headers).json()["notebooks"][0]["id"]
            note = httpx.get(f"{url}/notebooks/{notebook}/notes?limit=1", headers=headers).json()["notes"][0]
            words = httpx.get(f"{url}/notes/{note['id']}/words", headers=headers).json()
            assert words["indexed_version"] == 1
            assert words["words"]
    finally:
        app.close()


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_the_progress_bar_redraws_one_line_on_a_terminal() -> None:
    stream = Terminal()
    bar = Progress(4, "work", stream=stream, width=4)
    for _ in range(4):
        bar.advance()
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\rwork [----]   0% 0/4")
    assert "\rwork [####] 100% 4/4" in text
    assert text.endswith("\n")
    assert text.count("\n") == 1


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_prints_the_url_and_answers_there(tmp_path: Path, stop: signal.Signals) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(EXAMPLE), "NOTES_DATA": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "notes", "serve", "--port", "0"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "open http" in line:
                break
        match = re.search(r"open (http://127\.0\.0\.1:\d+/)", lines[-1])
        assert match, lines
        url = match.group(1)
        assert any(line.split()[:2] == ["database", f"sqlite:///{tmp_path}/notes.db"] for line in lines)
        health = httpx.get(url + "health", timeout=10)
        assert health.status_code == 200
        assert health.json()["ok"] is True
        process.send_signal(stop)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "stopped" in out

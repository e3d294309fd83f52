"""The ``polydatum-notes`` command: --help, seed (with its progress bar), serve in a real process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from notes import Settings, build
from notes.cli import main
from sqlalchemy import text

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
    for command in ("serve", "seed", "check", "migrate", "worker", "sync-attachments"):
        assert re.search(rf"^\s+{command}\s+\w", out, re.MULTILINE), out
    assert "DATABASE_URL" in out
    with pytest.raises(SystemExit) as exited:
        main(["seed", "--help"])
    assert "--notes" in capsys.readouterr().out


def test_seed_fills_the_database_with_a_progress_bar(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [
            "seed",
            "--users",
            "2",
            "--notebooks",
            "2",
            "--notes",
            "2500",
            "--batch",
            "1000",
            "--random-seed",
            "7",
        ]
    )
    out, err = capsys.readouterr()
    assert status == 0, err
    # tqdm's bar, redrawn in place ("\r"): from nothing done to all of it.
    bars = [bar for bar in re.split(r"[\r\n]", err) if bar]
    assert bars[0].startswith("seeding notes:   0%")
    assert " 0/2500 " in bars[0]
    assert bars[-1].startswith("seeding notes: 100%")
    assert " 2500/2500 " in bars[-1]
    assert "seeded 2 users, 4 notebooks, 2500 notes" in out
    tokens = re.findall(r"^  \S+: (\d+\.[0-9a-f]{64})$", out, re.MULTILINE)
    assert len(tokens) == 2

    app = build(Settings.from_env({"NOTES_DATA": str(data_dir)}))
    try:
        with serving(app.wsgi()) as url:
            counts = [
                httpx.get(f"{url}/me", headers={"Authorization": f"Bearer {t}"}).json()["note_count"]
                for t in tokens
            ]
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


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_prints_the_url_and_answers_there(tmp_path: Path, stop: signal.Signals) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(EXAMPLE), "NOTES_DATA": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "notes", "serve", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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


def test_serve_log_json_writes_json_lines_with_the_request_id(tmp_path: Path) -> None:
    """serve --log-json: each log line is a JSON object; a service's line carries its request's id."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(EXAMPLE), "NOTES_DATA": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "notes", "serve", "--port", "0", "--log-json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            match = re.search(r"open (http://127\.0\.0\.1:\d+)/", line)
            if match:
                break
        assert match
        with httpx.Client(base_url=match.group(1), timeout=10) as http:
            token = http.post("/users", json={"name": "logged"}).json()["token"]
            auth = {"Authorization": f"Bearer {token}"}
            notebook = http.post("/notebooks", json={"name": "inbox"}, headers=auth).json()["id"]
            added = http.post(
                f"/notebooks/{notebook}/notes",
                json={"title": "t"},
                headers={**auth, "X-Request-ID": "req-json-1"},
            )
            assert added.status_code == 201
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    entries = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert entries, err
    (added_line,) = [e for e in entries if e["logger"] == "notes.services"]
    assert added_line["message"] == f"note {added.json()['id']} added to notebook {notebook}"
    assert added_line["request_id"] == "req-json-1"
    assert added_line["level"] == "INFO"
    assert {"time", "trace_id", "span_id"} <= added_line.keys()
    assert "user" not in added_line  # personal data stays out of the logs


def test_sync_attachments_reports_then_fixes(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """sync-attachments lists orphan blobs, rows without a blob and wrong sizes; --apply fixes all three."""
    app = build(Settings.from_env({"NOTES_DATA": str(data_dir)}))
    try:
        app.create_tables()
        with app.dm.dal() as dal:
            user = dal.users.sign_up("syncer")
        with app.dm.dal(meta={"user": user["id"]}) as dal:
            notebook = dal.notebooks.add("n")["id"]
            note = dal.notes.add(notebook, "t")["id"]
            kept, lost, resized = (dal.notes.attach(note, f"{n}.txt", n.encode() * 3) for n in "abc")
        with app.dm.dal(meta={"user": user["id"]}) as dal:
            assert len(dal.notes.read(note)["attachments"]) == 3  # now cached
        with app.dm.context() as ctx:
            keys = dict(ctx.db.execute(text("SELECT id, key FROM attachments")).all())
        app.blobs.delete(keys[lost["id"]])
        app.blobs.put(keys[resized["id"]], b"truncated, then longer")
        app.blobs.put(f"notes/{note}/orphan", b"left by a crash")
    finally:
        app.close()

    assert main(["sync-attachments"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in out[1:4]) == ["changed", "deleted", "new"]
    assert f"new      notes/{note}/orphan" in out
    assert "would apply: 1 new, 1 changed, 1 deleted; 1 unchanged" in out
    assert out[-1] == "run again with --apply to fix them"

    # Without --older-than the orphan is too young to be taken for one: kept.
    assert main(["sync-attachments", "--apply"]) == 0
    assert "kept 1 blobs without a row that are younger than 1:00:00" in capsys.readouterr().out
    checkpoint = data_dir / "sync.json"
    assert main(["sync-attachments", "--apply", "--older-than", "0", "--checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "applied: 1 new, 0 changed, 0 deleted; 2 unchanged" in out
    assert not checkpoint.exists()  # a finished run clears it

    app = build(Settings.from_env({"NOTES_DATA": str(data_dir)}))
    try:
        assert not app.blobs.exists(f"notes/{note}/orphan")
        with app.dm.dal(meta={"user": user["id"]}) as dal:
            attachments = dal.notes.read(note)["attachments"]  # the cached read was dropped
        assert {a["name"]: a["size"] for a in attachments} == {"a.txt": 3, "c.txt": 22}
        assert kept["size"] == 3
    finally:
        app.close()
    assert main(["sync-attachments"]) == 0
    assert "would apply: 0 new, 0 changed, 0 deleted; 2 unchanged" in capsys.readouterr().out


def test_sync_attachments_refuses_a_negative_age(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A negative --older-than is a configuration error (exit status 2)."""
    assert main(["sync-attachments", "--older-than", "-1"]) == 2
    assert "--older-than must be a number of seconds" in capsys.readouterr().err

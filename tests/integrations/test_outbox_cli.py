"""The polydatum-relay command: runs a relay, shows the outbox, fails in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from polydatum import DataManager
from polydatum.outbox import Outbox
from polydatum.sqlalchemy import Database
from tests.support.outbox import flush_outboxes  # noqa: F401  # autouse

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 60.0

APP = """
import os, time
from pathlib import Path
from polydatum.outbox import Outbox
from polydatum.sqlalchemy import Database

outbox = Outbox(Database(os.environ["OUTBOX_URL"]), max_attempts=1)
not_an_outbox = 42

@outbox.handler("t")
def record(effect):
    if effect.payload == "slow":
        print("STARTED", flush=True)
        time.sleep(1)
    with open(os.environ["OUTBOX_LOG"], "a") as f:
        f.write(f"{effect.payload}\\n")
"""


@pytest.fixture(name="app")
def fixture_app(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder with an app module defining ``outbox``, and the environment the command runs in."""
    (tmp_path / "relayapp.py").write_text(textwrap.dedent(APP))
    env = dict(
        os.environ,
        OUTBOX_URL=f"sqlite:///{tmp_path / 'app.db'}",
        OUTBOX_LOG=str(tmp_path / "log.txt"),
        PYTHONPATH=str(REPO),
    )
    return tmp_path, env


def fill(tmp_path: Path, *payloads: str, topic: str = "t") -> Outbox:
    """Create the table and commit ``payloads`` (left for a relay)."""
    dm = DataManager()
    db = Database(f"sqlite:///{tmp_path / 'app.db'}").install(dm)
    outbox = Outbox(db, deliver_on_commit=False).install(dm)
    outbox.create_table()
    with dm.context() as ctx:
        for p in payloads:
            ctx.outbox.add(topic, p)
    return outbox


def relay(app: tuple[Path, dict[str, str]], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m polydatum.outbox relayapp:outbox *args`` in the app folder."""
    folder, env = app
    return subprocess.run(
        [sys.executable, "-m", "polydatum.outbox", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )


def test_once_delivers_and_status_counts(app: tuple[Path, dict[str, str]]) -> None:
    """--once delivers what is due and exits 0; --status then shows nothing pending."""
    folder, _ = app
    fill(folder, "a", "b")
    assert relay(app, "relayapp:outbox", "--status").stdout.startswith("pending 2,")
    done = relay(app, "relayapp:outbox", "--once")
    assert done.returncode == 0, done.stderr
    assert (folder / "log.txt").read_text().split() == ["a", "b"]
    assert relay(app, "relayapp:outbox", "--status").stdout.startswith("pending 0,")


def test_dead_lists_and_requeue_puts_back(app: tuple[Path, dict[str, str]]) -> None:
    """--dead lists a dead-lettered row with its error; --requeue puts it back."""
    folder, _ = app
    fill(folder, "x", topic="unknown")
    assert relay(app, "relayapp:outbox", "--once").returncode == 0
    listed = relay(app, "relayapp:outbox", "--dead").stdout
    assert "unknown" in listed
    assert "no handler for topic 'unknown'" in listed
    assert relay(app, "relayapp:outbox", "--requeue").stdout.strip() == "requeued 1"
    assert relay(app, "relayapp:outbox", "--status").stdout.startswith("pending 1,")


def test_sigterm_finishes_the_batch_and_exits_0(app: tuple[Path, dict[str, str]]) -> None:
    """SIGTERM during a delivery lets it finish (the row is delivered and deleted), then exit 0."""
    folder, env = app
    outbox = fill(folder, "slow")
    proc = subprocess.Popen(
        [sys.executable, "-m", "polydatum.outbox", "relayapp:outbox", "--poll", "0.05"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "STARTED"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert (folder / "log.txt").read_text().split() == ["slow"]
    assert outbox.status().pending == 0


def test_missing_table_exits_2_in_one_line(app: tuple[Path, dict[str, str]]) -> None:
    """A database without the outbox table: exit 2 and one line on stderr, no traceback."""
    done = relay(app, "relayapp:outbox", "--once")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
    assert "cannot read the outbox table 'polydatum_outbox'" in done.stderr
    assert "no such table" in done.stderr


def test_unreachable_database_exits_2_in_one_line(app: tuple[Path, dict[str, str]]) -> None:
    """A PostgreSQL server that does not answer: exit 2, one line, the password not shown."""
    folder, env = app
    env = dict(env, OUTBOX_URL="postgresql+psycopg://app:s3cret@127.0.0.1:1/nope")
    done = relay((folder, env), "relayapp:outbox", "--status")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "s3cret" not in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("relayapp", "package.module:attribute"),
        ("no_such_module:outbox", "cannot import 'no_such_module'"),
        ("relayapp:missing", "has no attribute 'missing'"),
        ("relayapp:not_an_outbox", "is a int, not a polydatum.outbox.Outbox"),
    ],
)
def test_bad_target_exits_2(app: tuple[Path, dict[str, str]], target: str, match: str) -> None:
    """A target that is not an importable Outbox: exit 2 with a line saying why."""
    done = relay(app, target, "--status")
    assert done.returncode == 2
    assert match in done.stderr
    assert done.stderr.count("\n") == 1


def test_console_script_is_installed() -> None:
    """pyproject declares the polydatum-relay command."""
    assert 'polydatum-relay = "polydatum.outbox._cli:main"' in (REPO / "pyproject.toml").read_text()

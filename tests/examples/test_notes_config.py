"""Every configuration error of the notes example stops start-up with one line saying what to fix.

Each case runs the real start-up path (``polydatum-notes seed``, which builds
the app, pings every part and creates the tables) with a bad environment
and checks the exit status and the single ``error:`` line on stderr.
Unreachable servers are ports nothing listens on (127.0.0.1:1).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from notes import ConfigError, Settings, build
from notes.cli import EXIT_CONFIG, main

from tests.examples.conftest import EXAMPLE, serving
from tests.support.s3 import REGION, MotoServer
from tests.support.s3 import moto_server_fixture as moto_server_fixture

VARIABLES = (
    "NOTES_DATA",
    "DATABASE_URL",
    "REDIS_URL",
    "CACHE_NAMESPACE",
    "BLOB_URL",
    "AWS_ENDPOINT_URL",
    "CELERY_BROKER_URL",
    "CELERY_QUEUE",
    "SECRET_KEY",
)


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., None]:
    """Set the app's variables for one test: NOTES_DATA in tmp_path, the rest as given."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NOTES_DATA", str(tmp_path / "data"))

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


def start_up_error(capsys: pytest.CaptureFixture[str]) -> str:
    """Run the start-up path; return its one error line (and check there is exactly one)."""
    status = main(["seed", "--users", "1", "--notebooks", "1", "--notes", "1"])
    out, err = capsys.readouterr()
    assert status == EXIT_CONFIG, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert out == ""
    return lines[0]


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"DATABASE_URL": "not a url"}, "DATABASE_URL='not a url' is not a database URL; use e.g."),
        ({"DATABASE_URL": "mysql://app@db/notes"}, "DATABASE_URL uses 'mysql', which this example does not"),
        (
            {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/notes"},
            "cannot use the database at postgresql+psycopg://postgres@127.0.0.1:1/notes: ",
        ),
        (
            {"DATABASE_URL": "sqlite:////proc/no-such-dir/notes.db"},
            "cannot create '/proc/no-such-dir' for the SQLite database",
        ),
        ({"REDIS_URL": "http://cache:6379"}, "REDIS_URL='http://cache:6379' is not a Redis URL"),
        ({"REDIS_URL": "redis://127.0.0.1:port/0"}, "REDIS_URL='redis://127.0.0.1:port/0' is not usable"),
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, "cannot reach Redis at redis://127.0.0.1:1/0; start it"),
        ({"CACHE_NAMESPACE": "notes:"}, "CACHE_NAMESPACE is not usable: namespace must"),
        ({"BLOB_URL": "ftp://files/notes"}, "BLOB_URL='ftp://files/notes' is not supported; use file:///"),
        ({"BLOB_URL": "s3:///prefix"}, "BLOB_URL='s3:///prefix' names no bucket"),
        ({"BLOB_URL": "file://relative/blobs"}, "BLOB_URL='file://relative/blobs' needs an absolute path"),
        ({"BLOB_URL": "file:///proc/no-such-dir/blobs"}, "blob root '/proc/no-such-dir/blobs' cannot be"),
        ({"CELERY_BROKER_URL": "rabbitmq"}, "CELERY_BROKER_URL='rabbitmq' is not a broker URL"),
        ({"CELERY_BROKER_URL": "bogus://broker"}, "cannot reach the Celery broker at bogus://broker: "),
        (
            {"CELERY_BROKER_URL": "amqp://guest:secret@127.0.0.1:1//"},
            "cannot reach the Celery broker at amqp://guest:***@127.0.0.1:1//: ",
        ),
    ],
    ids=lambda v: next(iter(v.items()))[0] + "=" + next(iter(v.items()))[1] if isinstance(v, dict) else "",
)
def test_a_bad_setting_stops_start_up_with_one_line(
    environ: Callable[..., None], capsys: pytest.CaptureFixture[str], variables: dict[str, str], expected: str
) -> None:
    environ(**variables)
    line = start_up_error(capsys)
    assert expected in line
    assert "secret" not in line  # passwords are never printed


def test_a_missing_postgres_database(
    environ: Callable[..., None], capsys: pytest.CaptureFixture[str], postgres_url: str
) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url).set(database=f"missing_{uuid.uuid4().hex[:8]}")
    environ(DATABASE_URL=url.render_as_string(hide_password=False))
    line = start_up_error(capsys)
    assert f'database "{url.database}" does not exist' in line
    assert line.endswith("start it or fix DATABASE_URL")


def test_a_missing_bucket(
    environ: Callable[..., None],
    capsys: pytest.CaptureFixture[str],
    moto_server: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    environ(BLOB_URL="s3://no-such-bucket-here/notes", AWS_ENDPOINT_URL=moto_server.endpoint_url)
    line = start_up_error(capsys)
    assert "BLOB_URL=s3://no-such-bucket-here/notes: " in line
    assert "the bucket does not exist" in line


def test_an_unreachable_s3_endpoint(
    environ: Callable[..., None], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    environ(BLOB_URL="s3://bucket/notes", AWS_ENDPOINT_URL="http://127.0.0.1:1")
    line = start_up_error(capsys)
    assert "S3 at http://127.0.0.1:1 did not answer" in line


def test_bad_seed_arguments(environ: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["seed", "--notes", "0"]) == EXIT_CONFIG
    assert capsys.readouterr().err == "error: --notes must be at least 1\n"


def test_serve_on_a_port_in_use(environ: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert err.strip().endswith("choose another --port")


def test_the_worker_needs_a_broker(environ: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker"]) == EXIT_CONFIG
    assert "the worker needs CELERY_BROKER_URL" in capsys.readouterr().err


def test_check_reports_every_part(environ: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "database"],
        ["ok", "cache"],
        ["ok", "blobs"],
        ["ok", "jobs"],
    ]

    environ(REDIS_URL="redis://127.0.0.1:1/0", CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:1//")
    assert main(["check"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["ok", "FAIL", "ok", "FAIL"]
    assert "cannot reach Redis" in lines[1]
    assert "cannot reach the Celery broker" in lines[3]


def test_settings_accept_platform_postgres_urls() -> None:
    settings = Settings.from_env({"DATABASE_URL": "postgres://app:pw@db:5432/notes"})
    assert settings.database_url == "postgresql+psycopg://app:pw@db:5432/notes"
    assert settings.describe()["database"] == "postgresql+psycopg://app:***@db:5432/notes"


def test_build_refuses_a_missing_driver() -> None:
    with pytest.raises(ConfigError, match=r"DATABASE_URL cannot be used: .*install its driver"):
        build(Settings.from_env({"DATABASE_URL": "postgresql+pg8000://app@db/notes"}))


def test_the_console_entry_point_prints_one_line(tmp_path: Path) -> None:
    """The real command in a fresh process: exit status 2 and one line on stderr."""
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(EXAMPLE),
        "NOTES_DATA": str(tmp_path),
        "REDIS_URL": "redis://127.0.0.1:1/0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "notes", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == EXIT_CONFIG
    assert done.stdout == ""
    assert done.stderr == (
        "error: cannot reach Redis at redis://127.0.0.1:1/0; start it or fix REDIS_URL "
        "(unset REDIS_URL for the in-process cache)\n"
    )


def test_health_is_503_while_a_part_is_down_and_the_api_keeps_working(tmp_path: Path) -> None:
    """Redis down after start-up: /health names it, and the cache degrades to misses."""
    app = build(Settings.from_env({"NOTES_DATA": str(tmp_path), "REDIS_URL": "redis://127.0.0.1:1/0"}))
    try:
        app.create_tables()
        with serving(app.wsgi()) as url:
            health = httpx.get(f"{url}/health", timeout=30)
            assert health.status_code == 503
            parts = health.json()["parts"]
            assert parts["cache"]["ok"] is False
            assert "cannot reach Redis at redis://127.0.0.1:1/0" in parts["cache"]["error"]
            assert parts["database"]["ok"] is True
            user = httpx.post(f"{url}/users", json={"name": "still works"}, timeout=30)
            assert user.status_code == 201
            token = user.json()["token"]
            me = httpx.get(f"{url}/me", headers={"Authorization": f"Bearer {token}"}, timeout=30)
            assert me.json()["note_count"] == 0
    finally:
        app.close()


def test_a_database_that_goes_away_after_start_up_is_a_503(tmp_path: Path) -> None:
    """Built without the start-up check, as if the server died later: requests get 503, not 500."""
    app = build(
        Settings.from_env(
            {"NOTES_DATA": str(tmp_path), "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/notes"}
        )
    )
    try:
        with serving(app.wsgi()) as url:
            response = httpx.post(f"{url}/users", json={"name": "nobody"}, timeout=30)
            assert response.status_code == 503
            assert response.json()["message"] == "the database is unavailable; try again shortly"
            assert httpx.get(f"{url}/health", timeout=30).json()["parts"]["database"]["ok"] is False
    finally:
        app.close()

"""The example's Alembic migrations: ``polydatum-notes migrate`` and ``migrate --check``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from notes import Settings, build
from notes import migrate as migrations
from notes.app import NotesApp
from notes.cli import main
from notes.models import Base
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, inspect, text
from sqlalchemy.engine import Engine

from tests.support.sql import fresh_postgres_database


@pytest.fixture(name="data_dir")
def fixture_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("DATABASE_URL", "DATABASE_REPLICAS", "REDIS_URL", "BLOB_URL", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NOTES_DATA", str(tmp_path))
    return tmp_path


@pytest.fixture(name="app")
def fixture_app(tmp_path: Path) -> Iterator[NotesApp]:
    app = build(Settings.from_env({"NOTES_DATA": str(tmp_path)}))
    try:
        yield app
    finally:
        app.close()


def schema(engine: Engine) -> dict[str, Any]:
    """Every table's columns (name, type, nullable), indexes, unique constraints and foreign keys."""
    found = inspect(engine)
    return {
        table: {
            "columns": sorted((c["name"], str(c["type"]), c["nullable"]) for c in found.get_columns(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"])) for i in found.get_indexes(table)),
            "unique": sorted(tuple(u["column_names"]) for u in found.get_unique_constraints(table)),
            "keys": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"]) for f in found.get_foreign_keys(table)
            ),
        }
        for table in found.get_table_names()
        if table != "alembic_version"
    }


def test_the_first_migration_builds_todays_schema_with_the_outbox(app: NotesApp, tmp_path: Path) -> None:
    """Migrating an empty database gives exactly what create_all made, outbox tables included."""
    before, now = migrations.upgrade(app)
    assert (before, now) == (None, migrations.head())
    made = create_engine(f"sqlite:///{tmp_path / 'create_all.db'}")
    try:
        for metadata in migrations.target_metadata(app):
            metadata.create_all(made)
        assert schema(app.db.engine) == schema(made)
    finally:
        made.dispose()
    assert {"polydatum_outbox", "polydatum_inbox", "notes"} <= set(schema(app.db.engine))
    assert migrations.differences(migrations.target_metadata(app)) == []


def test_the_migrations_run_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    """On PostgreSQL too the migrated schema is the models' (compared by Alembic itself)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with fresh_postgres_database(postgres_url) as url:
        app = build(Settings.from_env({"NOTES_DATA": str(tmp_path), "DATABASE_URL": url}))
        try:
            assert migrations.upgrade(app) == (None, migrations.head())
            assert migrations.upgrade(app) == (migrations.head(), migrations.head())
            with app.db.engine.connect() as connection:
                found = compare_metadata(
                    MigrationContext.configure(connection, opts={"compare_type": True}),
                    migrations.target_metadata(app),  # type: ignore[arg-type]
                )
            assert found == []
        finally:
            app.close()


def test_tables_made_before_migrations_are_stamped_and_kept(app: NotesApp) -> None:
    """A database create_all made earlier is marked as the first migration; its rows stay."""
    for metadata in migrations.target_metadata(app):
        metadata.create_all(app.db.engine)
    with app.db.engine.begin() as connection:
        connection.execute(text("INSERT INTO users (name) VALUES ('ada')"))
    assert migrations.upgrade(app) == (None, migrations.head())
    with app.db.engine.connect() as connection:
        assert connection.scalar(text("SELECT name FROM users")) == "ada"
        assert migrations.current(connection) == migrations.head()


def test_migrate_upgrades_once(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``migrate`` says what it did; a second run says there was nothing to do."""
    assert main(["migrate"]) == 0
    assert capsys.readouterr().out == f"migrated the database from nothing to {migrations.head()}\n"
    assert main(["migrate"]) == 0
    assert capsys.readouterr().out == f"the database is at the newest migration ({migrations.head()})\n"


def test_migrate_check_passes_when_models_and_migrations_agree(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``migrate --check`` exits 0 when the migrations build the models' schema; no database is touched."""
    assert main(["migrate", "--check"]) == 0
    assert capsys.readouterr().out.startswith("ok: the models match the migrations")
    assert (
        not (data_dir / "notes.db").exists()
        or "alembic_version"
        not in inspect(create_engine(f"sqlite:///{data_dir / 'notes.db'}")).get_table_names()
    )


def test_migrate_check_fails_when_a_model_has_no_migration(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table and a column the migrations do not make: exit 1, each difference named, what to do."""
    extra = MetaData()
    Table("tags", extra, Column("id", Integer, primary_key=True))
    changed = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["notes"].append_column(Column("pinned", Integer, nullable=True))
    real = migrations.target_metadata

    def drifted(app: NotesApp) -> list[MetaData]:
        return [changed, *real(app)[1:], extra]

    monkeypatch.setattr(migrations, "target_metadata", drifted)
    assert main(["migrate", "--check"]) == 1
    captured = capsys.readouterr()
    assert "differs: add_table tags\n" in captured.out
    assert "differs: add_column notes.pinned\n" in captured.out
    assert captured.err.startswith("the models and the migrations differ; write a migration with: ")
    assert captured.err.endswith('python -m notes.migrate revision "what changed"\n')


def test_migrate_against_an_unreachable_database_exits_2_with_one_line(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens at the database's address: one ``error:`` line naming it and what to fix."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://notes:secret-pw@127.0.0.1:1/notes")
    assert main(["migrate"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(
        "error: cannot migrate the database at postgresql+psycopg://notes:***@127.0.0.1:1/notes"
    )
    assert lines[0].endswith("; start it or fix DATABASE_URL")
    assert "secret-pw" not in captured.err

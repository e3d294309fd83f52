"""The schema's migrations (Alembic): ``polydatum-notes migrate`` and ``migrate --check``.

One Alembic environment (``notes/migrations``), no ``alembic.ini``: the
application's :class:`~polydatum.sqlalchemy.Database` provides the
connection, and the metadata compared with the migrations is the models'
plus the outbox's tables (``Outbox.metadata``), so the outbox is migrated
like any other table.

- :func:`upgrade` brings a database to the newest migration. A database
  whose tables were made before there were migrations (by ``create_all``)
  is stamped at the first migration, which is that schema, and upgraded
  from there.
- :func:`differences` applies the migrations to a scratch in-memory SQLite
  database and compares the result with the models: a model changed
  without a migration (or the reverse) is a difference. It needs no server.

A new migration, after changing the models::

    .venv/bin/python -m notes.migrate revision "add tags"
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from notes.config import ConfigError
from notes.models import Base

if TYPE_CHECKING:
    from sqlalchemy import Connection, MetaData

    from notes.app import NotesApp

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
FIRST = "0001"  # the schema as create_all made it before there were migrations


def alembic_config(connection: Connection, metadata: list[MetaData]) -> Config:
    """An Alembic configuration running ``notes/migrations`` on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    config.attributes["target_metadata"] = metadata
    return config


def target_metadata(app: NotesApp) -> list[MetaData]:
    """What the migrations must build: the models' tables and the outbox's."""
    return [Base.metadata] + ([app.outbox.metadata] if app.outbox is not None else [])


def head() -> str:
    """The newest migration's revision id."""
    revision = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert revision is not None  # the directory has migrations
    return revision


def current(connection: Connection) -> str | None:
    """The revision the database is at; None before any migration ran."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(app: NotesApp) -> tuple[str | None, str]:
    """Run the migrations the database has not had yet; returns (revision before, revision now).

    Raises:
        ConfigError: the database cannot be reached or refused a statement (one line).
    """
    try:
        with app.db.engine.begin() as connection:
            config = alembic_config(connection, target_metadata(app))
            before = current(connection)
            if before is None and inspect(connection).has_table("notes"):
                # Made by create_all before the migrations existed: that is the first migration.
                command.stamp(config, FIRST)
            command.upgrade(config, "head")
            return before, current(connection) or head()
    except SQLAlchemyError as exc:
        from notes.app import _first_line

        msg = (
            f"cannot migrate the database at {app.settings.describe()['database']}: {_first_line(exc)}; "
            "start it or fix DATABASE_URL"
        )
        raise ConfigError(msg) from None


def differences(metadata: list[MetaData]) -> list[str]:
    """How the models differ from what the migrations build (empty when they agree)."""
    engine = create_engine("sqlite://")
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection, metadata), "head")
            found = compare_metadata(MigrationContext.configure(connection), metadata)  # type: ignore[arg-type]
    finally:
        engine.dispose()
    return [_describe(diff) for diff in found]


def _describe(diff: Any) -> str:
    # compare_metadata gives ("add_table", Table), ("add_column", schema, table, Column), or a
    # list of ("modify_type", schema, table, column, ...) tuples for one column.
    if isinstance(diff, list):
        return "; ".join(_describe(d) for d in diff)
    action, *rest = diff
    names = [getattr(x, "name", None) or (x if isinstance(x, str) else None) for x in rest]
    return f"{action} {'.'.join(n for n in names if n)}"


def revision(app: NotesApp, message: str) -> None:
    """Write a new migration from the difference between the models and the newest migration."""
    engine = create_engine("sqlite://")
    try:
        with engine.begin() as connection:
            config = alembic_config(connection, target_metadata(app))
            command.upgrade(config, "head")
            number = len(list(ScriptDirectory(str(MIGRATIONS)).walk_revisions())) + 1
            command.revision(config, message=message, autogenerate=True, rev_id=f"{number:04d}")
    finally:
        engine.dispose()


if __name__ == "__main__":  # python -m notes.migrate revision "message"
    import tempfile

    from notes.app import build
    from notes.config import Settings

    if len(sys.argv) != 3 or sys.argv[1] != "revision":
        sys.exit('usage: python -m notes.migrate revision "what changed"')
    with tempfile.TemporaryDirectory() as scratch:  # only the metadata is used
        notes_app = build(Settings.from_env({"NOTES_DATA": scratch}))
        try:
            revision(notes_app, sys.argv[2])
        finally:
            notes_app.close()

"""The Alembic environment of the notes schema, run by :mod:`notes.migrate`.

There is no alembic.ini and no URL here: :mod:`notes.migrate` hands over a
connection of the application's :class:`~polydatum.sqlalchemy.Database`
(its engine, its settings) and the metadata to compare with, the models'
and the outbox's, in ``config.attributes``.
"""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=config.attributes["target_metadata"],
    # SQLite alters a table by copying it; batch mode writes migrations that do so.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

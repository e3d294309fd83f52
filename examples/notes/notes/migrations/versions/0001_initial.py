"""The schema as it was before migrations: users, notebooks, notes, attachments, words, the outbox.

Revision ID: 0001
Revises:
Create Date: 2026-12-02

A database whose tables create_all made earlier is stamped at this revision
(``notes.migrate.upgrade``), not migrated.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "notebooks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_notebooks_owner_id"), "notebooks", ["owner_id"], unique=False)

    op.create_table(
        "notes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("notebook_id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["notebook_id"],
            ["notebooks.id"],
        ),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_notes_notebook_id"), "notes", ["notebook_id"], unique=False)
    op.create_index(op.f("ix_notes_owner_id"), "notes", ["owner_id"], unique=False)

    op.create_table(
        "attachments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("note_id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("content_type", sa.String(length=200), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.ForeignKeyConstraint(
            ["note_id"],
            ["notes.id"],
        ),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_index(op.f("ix_attachments_note_id"), "attachments", ["note_id"], unique=False)

    op.create_table(
        "note_index",
        sa.Column("note_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["note_id"],
            ["notes.id"],
        ),
        sa.PrimaryKeyConstraint("note_id"),
    )
    op.create_table(
        "note_words",
        sa.Column("note_id", sa.Integer(), nullable=False),
        sa.Column("word", sa.String(length=100), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["note_id"],
            ["notes.id"],
        ),
        sa.PrimaryKeyConstraint("note_id", "word"),
    )
    op.create_index("ix_note_words_word", "note_words", ["word"], unique=False)

    op.create_table(
        "polydatum_inbox",
        sa.Column("message_id", sa.String(length=200), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("message_id"),
    )
    op.create_index(op.f("ix_polydatum_inbox_received_at"), "polydatum_inbox", ["received_at"], unique=False)

    op.create_table(
        "polydatum_outbox",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("topic", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("available_at", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("dead", sa.Boolean(), nullable=False),
        sa.Column("lease_owner", sa.String(length=100), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_polydatum_outbox_due", "polydatum_outbox", ["dead", "available_at"], unique=False)
    op.create_index("ix_polydatum_outbox_key", "polydatum_outbox", ["key", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_polydatum_outbox_key", "polydatum_outbox")
    op.drop_index("ix_polydatum_outbox_due", "polydatum_outbox")

    op.drop_table("polydatum_outbox")
    op.drop_index(op.f("ix_polydatum_inbox_received_at"), "polydatum_inbox")

    op.drop_table("polydatum_inbox")
    op.drop_index("ix_note_words_word", "note_words")

    op.drop_table("note_words")
    op.drop_table("note_index")
    op.drop_index(op.f("ix_attachments_note_id"), "attachments")

    op.drop_table("attachments")
    op.drop_index(op.f("ix_notes_owner_id"), "notes")
    op.drop_index(op.f("ix_notes_notebook_id"), "notes")

    op.drop_table("notes")
    op.drop_index(op.f("ix_notebooks_owner_id"), "notebooks")

    op.drop_table("notebooks")
    op.drop_table("users")

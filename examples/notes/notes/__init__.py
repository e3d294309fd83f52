"""polydatum notes: the example application of polydatum.

A small multi-user notes service: users, notebooks and notes in SQL,
attachments in a blob store, cached counts and reads, a background job that
indexes each note's words, auth as DAL method middleware and a JSON HTTP
API. It runs with no server at all (SQLite, files, an in-process cache,
eager Celery) or on PostgreSQL, Redis, S3 and a Celery worker, chosen by
environment variables (see :mod:`notes.config`).

Start it with ``polydatum-notes serve``; ``polydatum-notes --help`` lists the
other commands.
"""

from notes.app import NotesApp, build
from notes.config import ConfigError, Settings

__all__ = ["ConfigError", "NotesApp", "Settings", "build"]

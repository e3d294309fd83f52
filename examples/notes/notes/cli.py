"""The ``polydatum-notes`` command: serve, seed, check, worker.

Configuration comes from environment variables (see :mod:`notes.config`);
a configuration that cannot work stops the command with one ``error:``
line saying what to fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import random
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from notes.app import NotesApp, build
from notes.config import ConfigError, Settings

EXIT_CONFIG = 2

_VOCABULARY = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar "
    "papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu milk bread coffee tea "
    "meeting call plan idea draft review budget travel garden book film music recipe list"
)
WORDS = _VOCABULARY.split()


class Progress:
    """A dependency-free progress bar on a stream (stderr by default).

    On a terminal it redraws one line at most ten times a second; elsewhere
    (a log file, CI) it prints a line at every tenth of the work instead.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done = 0
        self.start = time.monotonic()
        self._tty = self.stream.isatty()
        self._last_draw = 0.0
        self._last_tenth = -1
        self._draw(force=True)

    def advance(self, n: int = 1) -> None:
        """Record ``n`` more units of work done."""
        self.done = min(self.total, self.done + n)
        self._draw(force=self.done == self.total)

    def close(self) -> None:
        """End the bar's line."""
        self._draw(force=True)
        if self._tty:
            self.stream.write("\n")
        self.stream.flush()

    def line(self) -> str:
        """The bar as text, e.g. ``notes [#####-----] 50% 500/1000 1.2s``."""
        fraction = self.done / self.total if self.total else 1.0
        filled = int(fraction * self.width)
        elapsed = time.monotonic() - self.start
        bar = "#" * filled + "-" * (self.width - filled)
        return f"{self.label} [{bar}] {fraction:4.0%} {self.done}/{self.total} {elapsed:.1f}s"

    def _draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._tty:
            if force or now - self._last_draw >= 0.1:
                self._last_draw = now
                self.stream.write("\r" + self.line())
                self.stream.flush()
            return
        tenth = (10 * self.done // self.total) if self.total else 10
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            self.stream.write(self.line() + "\n")
            self.stream.flush()


def start(environ: dict[str, str] | None = None) -> NotesApp:
    """Build the app from the environment, check every part, create the tables.

    Raises:
        ConfigError: what to fix, in one line.
    """
    app = build(Settings.from_env(environ))
    try:
        app.check()
        app.create_tables()
    except BaseException:
        app.close()
        raise
    return app


def cmd_serve(args: argparse.Namespace) -> int:
    from werkzeug.serving import make_server

    app = start()
    try:
        # Our own socket: Werkzeug would print its own advice and sys.exit() on a taken port.
        try:
            family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as listener:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((args.host, args.port))
                listener.listen(128)
                server = make_server(args.host, args.port, app.wsgi(), threaded=True, fd=listener.fileno())
        except OSError as exc:
            msg = f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; choose another --port"
            raise ConfigError(msg) from None
        host = args.host if ":" not in args.host else f"[{args.host}]"
        url = f"http://{host}:{server.socket.getsockname()[1]}/"
        for part, using in app.settings.describe().items():
            print(f"  {part:9} {using}")
        print(f"polydatum notes is running: open {url}  (Ctrl-C stops it)", flush=True)
        # SIGTERM (docker stop, systemd) stops it as cleanly as Ctrl-C.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            server.serve_forever()  # Werkzeug's returns on Ctrl-C
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        print("stopped")
    finally:
        app.close()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_check(args: argparse.Namespace) -> int:
    app = build(Settings.from_env())
    try:
        report = app.health()
    finally:
        app.close()
    for part, result in report.items():
        if result["ok"]:
            print(f"ok    {part:9} {result['using']} ({result['ms']} ms)")
        else:
            print(f"FAIL  {part:9} {result['error']}")
    return 0 if all(r["ok"] for r in report.values()) else 1


def cmd_seed(args: argparse.Namespace) -> int:
    for name in ("users", "notebooks", "notes", "batch"):
        if getattr(args, name) < 1:
            msg = f"--{name} must be at least 1"
            raise ConfigError(msg)
    app = start()
    rng = random.Random(args.random_seed)
    try:
        users = []
        stamp = time.strftime("%Y%m%d%H%M%S")
        for i in range(args.users):
            with app.dm.dal() as dal:
                users.append(dal.users.sign_up(f"seed-{stamp}-{rng.randrange(10**6)}-{i}"))
        notebooks = []
        for user in users:
            with app.dm.dal(meta={"user": user["id"]}) as dal:
                notebooks += [(user["id"], dal.notebooks.add(f"notebook {n + 1}")["id"])
                              for n in range(args.notebooks)]
        progress = Progress(args.notes, "seeding notes")
        made = 0
        while made < args.notes:
            user_id, notebook_id = notebooks[(made // args.batch) % len(notebooks)]
            size = min(args.batch, args.notes - made)
            items = [{"title": f"note {made + i + 1}",
                      "text": " ".join(rng.choices(WORDS, k=rng.randrange(5, 40)))} for i in range(size)]
            # One context (one transaction) per batch: a failure loses one batch at most.
            with app.dm.dal(meta={"user": user_id}) as dal:
                dal.notes.add_many(notebook_id, items)
            made += size
            progress.advance(size)
        progress.close()
    finally:
        app.close()
    print(f"seeded {len(users)} users, {len(notebooks)} notebooks, {args.notes} notes. Tokens:")
    for user in users:
        print(f"  {user['name']}: {user['token']}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if settings.celery_broker_url is None:
        msg = "the worker needs CELERY_BROKER_URL (without it, jobs run inside the web process)"
        raise ConfigError(msg)
    app = start()
    try:
        app.celery.worker_main(["worker", "--loglevel", args.loglevel, "--queues", settings.celery_queue])
    finally:
        app.close()
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line parser."""
    top = argparse.ArgumentParser(
        prog="polydatum-notes",
        description="The polydatum example: a multi-user notes service with a JSON API. "
                    "Runs on SQLite, files and an in-process cache by default; set DATABASE_URL, "
                    "REDIS_URL, BLOB_URL (s3://bucket/prefix), AWS_ENDPOINT_URL and "
                    "CELERY_BROKER_URL to use servers instead.",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="serve the HTTP API and print the URL to open")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.set_defaults(run=cmd_serve)
    seed = sub.add_parser("seed", help="fill the database with generated users, notebooks and notes")
    seed.add_argument("--users", type=int, default=3, help="users to create (default 3)")
    seed.add_argument("--notebooks", type=int, default=2, help="notebooks per user (default 2)")
    seed.add_argument("--notes", type=int, default=1000, help="notes in all (default 1000)")
    seed.add_argument("--batch", type=int, default=1000, help="notes per transaction (default 1000)")
    seed.add_argument("--random-seed", type=int, default=None, help="make the generated text repeatable")
    seed.set_defaults(run=cmd_seed)
    check = sub.add_parser("check", help="ping every configured part (database, cache, blobs, broker)")
    check.set_defaults(run=cmd_check)
    worker = sub.add_parser("worker", help="run a Celery worker for the background jobs")
    worker.add_argument("--loglevel", default="info", help="Celery log level (default info)")
    worker.set_defaults(run=cmd_worker)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return status

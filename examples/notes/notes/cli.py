"""The ``polydatum-notes`` command: serve, seed, check, migrate, worker, sync-attachments.

Configuration comes from environment variables (see :mod:`notes.config`);
a configuration that cannot work stops the command with one ``error:``
line saying what to fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import random
import signal
import socket
import sys
import time
from collections.abc import Sequence

from tqdm import tqdm

from notes.app import NotesApp, build
from notes.config import ConfigError, Settings
from notes.logs import log_json

EXIT_CONFIG = 2
_LOG_JSON_HELP = "write logs as JSON lines to stderr, each with its request_id, trace_id and span_id"

_VOCABULARY = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar "
    "papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu milk bread coffee tea "
    "meeting call plan idea draft review budget travel garden book film music recipe list"
)
WORDS = _VOCABULARY.split()


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
    if args.log_json:
        log_json(app.dm)
    try:
        # Our own socket: Werkzeug would print its own advice and sys.exit() on a taken port.
        try:
            family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as listener:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((args.host, args.port))
                listener.listen(128)
                server = make_server(
                    args.host, args.port, app.wsgi(debug=args.debug), threaded=True, fd=listener.fileno()
                )
        except OSError as exc:
            msg = f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; choose another --port"
            raise ConfigError(msg) from None
        host = args.host if ":" not in args.host else f"[{args.host}]"
        url = f"http://{host}:{server.socket.getsockname()[1]}/"
        for part, using in app.settings.describe().items():
            print(f"  {part:9} {using}")
        if args.debug:
            print(f"  debug     recent contexts at {url}_polydatum (development only: no authentication)")
            warning = debug_warning(server.socket.getsockname()[0])
            if warning is not None:
                print(warning, file=sys.stderr)
        print(f"  api       the JSON API at {url}")
        print(f"polydatum notes is running: open {url}app/  (Ctrl-C stops it)", flush=True)
        # SIGTERM (docker stop, systemd) stops it as cleanly as Ctrl-C.
        signal.signal(signal.SIGTERM, _interrupt)
        # Delivers what could not be delivered right after a commit (a service was down).
        relay = app.outbox.relay() if app.outbox is not None else None
        relay_thread = relay.start() if relay is not None else None
        try:
            server.serve_forever()  # Werkzeug's returns on Ctrl-C
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
            if relay is not None and relay_thread is not None:
                relay.stop()
                relay_thread.join(10)
        print("stopped")
    finally:
        app.close()
    return 0


def debug_warning(address: str) -> str | None:
    """The warning ``serve --debug`` prints when it listens on ``address``; None on loopback."""
    try:
        if ipaddress.ip_address(address).is_loopback:
            return None
    except ValueError:  # an IPv6 address with a zone (fe80::1%eth0) is not loopback anyway
        pass
    return (
        f"warning: --debug on {address} shows service paths and timings to the network; serve it on 127.0.0.1"
    )


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
                notebooks += [
                    (user["id"], dal.notebooks.add(f"notebook {n + 1}")["id"]) for n in range(args.notebooks)
                ]
        progress = tqdm(
            total=args.notes, desc="seeding notes", unit=" notes", file=sys.stderr, mininterval=0.2
        )
        made = 0
        while made < args.notes:
            user_id, notebook_id = notebooks[(made // args.batch) % len(notebooks)]
            size = min(args.batch, args.notes - made)
            items = [
                {
                    "title": f"note {made + i + 1}",
                    "text": " ".join(rng.choices(WORDS, k=rng.randrange(5, 40))),
                }
                for i in range(size)
            ]
            # One context (one transaction) per batch: a failure loses one batch at most.
            with app.dm.dal(meta={"user": user_id}) as dal:
                dal.notes.add_many(notebook_id, items)
            made += size
            progress.update(size)
        progress.close()
    finally:
        app.close()
    print(f"seeded {len(users)} users, {len(notebooks)} notebooks, {args.notes} notes. Tokens:")
    for user in users:
        print(f"  {user['name']}: {user['token']}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from notes import migrate

    app = build(Settings.from_env())
    try:
        if args.check:
            found = migrate.differences(migrate.target_metadata(app))
            for difference in found:
                print(f"differs: {difference}")
            if found:
                print(
                    "the models and the migrations differ; write a migration with: "
                    'python -m notes.migrate revision "what changed"',
                    file=sys.stderr,
                )
                return 1
            print(f"ok: the models match the migrations (head {migrate.head()})")
            return 0
        before, now = migrate.upgrade(app)
    finally:
        app.close()
    if before == now:
        print(f"the database is at the newest migration ({now})")
    else:
        print(f"migrated the database from {before or 'nothing'} to {now}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if settings.celery_broker_url is None:
        msg = "the worker needs CELERY_BROKER_URL (without it, jobs run inside the web process)"
        raise ConfigError(msg)
    app = start()
    if args.log_json:
        # Celery sets up its own logging when the worker starts; take it over afterwards.
        from celery.signals import after_setup_logger

        after_setup_logger.connect(lambda **_: log_json(app.dm), weak=False)
    try:
        app.celery.worker_main(["worker", "--loglevel", args.loglevel, "--queues", settings.celery_queue])
    finally:
        app.close()
    return 0


def cmd_sync_attachments(args: argparse.Namespace) -> int:
    from notes.reconcile import sync_attachments

    if args.older_than < 0:
        msg = "--older-than must be a number of seconds, 0 or more"
        raise ConfigError(msg)
    app = start()
    try:
        if not args.apply:
            print("new: a blob with no row; deleted: a row with no blob; changed: their sizes differ")
        report = sync_attachments(
            app,
            apply=args.apply,
            older_than=datetime.timedelta(seconds=args.older_than),
            checkpoint=args.checkpoint,
            out=sys.stdout,
        )
    finally:
        app.close()
    if args.apply:
        print(report)
    elif report.new or report.changed or report.deleted:
        print("run again with --apply to fix them")
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
    serve = sub.add_parser("serve", help="serve the web pages and the JSON API; print the URL to open")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument(
        "--debug",
        action="store_true",
        help="record the recent contexts and show them at /_polydatum (development only: "
        "the page shows service paths and timings to anyone who can reach it)",
    )
    serve.add_argument("--log-json", action="store_true", help=_LOG_JSON_HELP)
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
    migrate = sub.add_parser("migrate", help="bring the database to the newest migration (Alembic)")
    migrate.add_argument(
        "--check",
        action="store_true",
        help="only compare the models with the migrations; exit 1 when they differ (no database needed)",
    )
    migrate.set_defaults(run=cmd_migrate)
    worker = sub.add_parser("worker", help="run a Celery worker for the background jobs")
    worker.add_argument("--loglevel", default="info", help="Celery log level (default info)")
    worker.add_argument("--log-json", action="store_true", help=_LOG_JSON_HELP)
    worker.set_defaults(run=cmd_worker)
    sync = sub.add_parser(
        "sync-attachments",
        help="report blobs that have no attachment row and rows that have no blob; fix them with --apply",
    )
    sync.add_argument("--apply", action="store_true", help="fix what differs (default: only report it)")
    sync.add_argument(
        "--older-than",
        type=float,
        default=3600.0,
        help="delete a blob with no row only once it is this many seconds old (default 3600): "
        "a younger one may be an upload whose request has not committed yet",
    )
    sync.add_argument(
        "--checkpoint",
        default=None,
        help="a file recording how far --apply got, so that a run that stopped resumes there",
    )
    sync.set_defaults(run=cmd_sync_attachments)
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

"""``polydatum-relay package.module:outbox``: run a relay, or look at the outbox."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from polydatum.outbox._core import Outbox

logger = logging.getLogger("polydatum.outbox")

# Exit statuses: 0 done (SIGTERM too), 2 cannot start (bad target, no table, no database).
EXIT_USAGE = 2


class _CannotStart(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polydatum-relay",
        description="Deliver the effects waiting in a polydatum outbox (runs until SIGTERM).",
    )
    parser.add_argument("target", help="where the Outbox is, as package.module:attribute")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="deliver what is due now, then exit")
    mode.add_argument("--status", action="store_true", help="print pending, oldest age and dead, then exit")
    mode.add_argument("--dead", action="store_true", help="list dead-lettered rows, then exit")
    mode.add_argument(
        "--requeue",
        nargs="*",
        type=int,
        metavar="ID",
        help="put dead-lettered rows (all, or these ids) back in the queue, then exit",
    )
    parser.add_argument("--batch", type=int, default=100, help="rows per claim (default 100)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between looks when idle (default 1)")
    return parser


def load(target: str) -> Outbox:
    """The Outbox named by ``package.module:attribute`` (the current folder is importable)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        msg = f"the target must be package.module:attribute, got {target!r}"
        raise _CannotStart(msg)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"cannot import {module_name!r}: {exc}"
        raise _CannotStart(msg) from None
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            msg = f"module {module_name!r} has no attribute {attr!r}"
            raise _CannotStart(msg) from None
    if not isinstance(value, Outbox):
        msg = f"{target} is a {type(value).__name__}, not a polydatum.outbox.Outbox"
        raise _CannotStart(msg)
    return value


def _check(outbox: Outbox) -> None:
    """Read the table once: a missing table or an unreachable database is reported in one line."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        outbox.status()
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        msg = (
            f"cannot read the outbox table {outbox.table.name!r} of {outbox.database!r}: {first}; "
            f"check that the database is up and the table exists (outbox.create_table() or a migration)"
        )
        raise _CannotStart(msg) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        outbox = load(args.target)
        _check(outbox)
        relay = outbox.relay(batch=args.batch, poll=args.poll)
    except (_CannotStart, ValueError) as exc:
        print(f"polydatum-relay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.status:
        m = relay.metrics()
        print(f"pending {m.pending}, oldest {m.oldest_pending_age:.1f} s, dead {m.dead}")
        return 0
    if args.dead:
        for row in outbox.dead(limit=1000):
            error = (row.last_error or "").splitlines()[0] if row.last_error else ""
            print(f"{row.id}\t{row.topic}\t{row.key or '-'}\t{row.attempts}\t{error}")
        return 0
    if args.requeue is not None:
        count = relay.requeue_dead(args.requeue or None)
        print(f"requeued {count}")
        return 0
    if args.once:
        while relay.run_once():
            pass
        m = relay.metrics()
        print(f"delivered {m.delivered}, failed {m.failed}, pending {m.pending}, dead {m.dead}")
        return 0

    def stop(signum: int, frame: Any) -> None:
        logger.info("signal %s: finishing the batch in hand, then exiting", signum)
        relay.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("relay %s delivering %r", relay.name, outbox)
    relay.run_forever()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

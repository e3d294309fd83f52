"""``python -m polydatum.sqlalchemy``: build, check and dump dataset files.

``build-dataset package.module:spec`` builds the file of a
:class:`DatasetSpec` (``package.module:make_spec()`` calls a function that
returns one). ``check-dataset`` exits 1 with a diff when the file's schema
no longer matches the models, so a CI step catches a model changed without
the shipped file being rebuilt. ``dump-dataset SPEC TABLE`` writes a table
as CSV.

Exit status: 0 done; 1 the data, the file or its schema is wrong (one
message, or the diff); 2 the target does not lead to a DatasetSpec (one
line saying what to pass).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from polydatum._cli import TargetError, load_target
from polydatum.errors import DatasetError
from polydatum.sqlalchemy._datasets import DatasetSpec, check, dump

__all__ = ["main"]

PROG = "python -m polydatum.sqlalchemy"
_WHAT_TO_PASS = (
    "pass MODULE:NAME naming a polydatum.sqlalchemy.DatasetSpec (e.g. myapp.data:countries), "
    "or MODULE:FACTORY() naming a function that returns one"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Build, check and dump dataset files.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser(
        "build-dataset",
        help="build the SQLite file of a DatasetSpec from its sources",
        description=(
            "Load the spec's sources into a new SQLite file and rename it into place; a row that "
            "does not fit fails the build, naming the file, the line and the column, and leaves no file."
        ),
    )
    build.add_argument("target", metavar="MODULE:SPEC", help="the DatasetSpec, e.g. myapp.data:countries")
    shown = build.add_mutually_exclusive_group()
    shown.add_argument("--progress", dest="progress", action="store_const", const=True, default=None)
    shown.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    check_ = commands.add_parser(
        "check-dataset",
        help="exit 1 with a diff when the file's schema does not match the models",
        description=(
            "Compare the schema of the spec's file with its models; print a diff and exit 1 if they differ."
        ),
    )
    check_.add_argument("target", metavar="MODULE:SPEC", help="the DatasetSpec, e.g. myapp.data:countries")
    dump_ = commands.add_parser(
        "dump-dataset",
        help="write one table of the spec's file as CSV",
        description="Write a table of the spec's file as CSV, in the form build-dataset reads back.",
    )
    dump_.add_argument("target", metavar="MODULE:SPEC", help="the DatasetSpec, e.g. myapp.data:countries")
    dump_.add_argument("table", help="the table's name")
    dump_.add_argument("--out", "-o", help="the CSV file to write (default: standard output)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (1 bad data or schema, 2 bad target).

    .. versionadded:: 2.0
    """
    args = _parser().parse_args(argv)
    try:
        spec = load_target(args.target, DatasetSpec, _WHAT_TO_PASS)
    except TargetError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "build-dataset":
            loaded = spec.build(progress=args.progress)
            rows = ", ".join(f"{table} {count:,} rows" for table, count in loaded.items()) or "no rows"
            print(f"built {spec.file_name}: {rows}")
            return 0
        if args.command == "check-dataset":
            diff = check(spec.path, spec.models)
            if diff:
                print(diff)
                print(
                    f"{PROG} check-dataset: {spec.file_name} does not match the models; "
                    f"rebuild it with: {PROG} build-dataset {args.target}",
                    file=sys.stderr,
                )
                return 1
            print(f"{spec.file_name} matches the models")
            return 0
        models = spec.model_list()
        model = next((m for m in models if m.__table__.name == args.table), None)  # type: ignore[attr-defined]
        if model is None:
            known = ", ".join(m.__table__.name for m in models)  # type: ignore[attr-defined]
            print(
                f"{PROG} dump-dataset: no table {args.table!r} in the spec; known: {known}", file=sys.stderr
            )
            return 2
        dump(spec.path, model, args.out if args.out is not None else sys.stdout, null=spec.null)
        return 0
    except DatasetError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 1

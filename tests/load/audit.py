"""The audit ending every load and fault scenario: nothing acknowledged lost, nothing refused kept, no leak.

Given the application's database URL, its blob store and the client-side log
of the requests (:class:`tests.load.driver.Record`), :func:`audit` checks:

- **writes**: every create, update, attach and delete the server acknowledged
  with 2xx is in the database exactly once (a note's final version is the
  highest version acknowledged, with that update's text; no version was
  acknowledged twice, which would be a lost update); nothing the server
  refused (4xx) is there. A 5xx or a request that got no response is *in
  doubt* (the server cannot always know whether a COMMIT that lost its
  connection was durable): either outcome is allowed, exactly once, and
  the audit counts those that did commit;
- **blobs**: every attachment row has its blob (with the right size); blobs
  no row references are orphans, which :meth:`BlobStore.sweep_orphans` must
  find and remove (an orphan it cannot account for fails);
- **effects**: with the app's outbox, a relay delivers what waits after the
  load (the index jobs, cache invalidations and blob deletes the faults
  delayed); a row still undelivered is a lost effect, a dead row a problem;
- **resources**: the database connections of the app are back in their pool
  (no session of its database is active or idle in a transaction, and
  there are no more than the pools allow), Redis clients are bounded,
  and the server processes hold no more file descriptors or threads than
  before the load, apart from pooled sockets to the servers (bounded).

``AuditReport.problems`` lists what failed, each saying what and where;
:meth:`AuditReport.check` raises with all of them.
"""

from __future__ import annotations

import datetime
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from polydatum.blob import BlobStore
from tests.load.driver import Record

BLOB_PREFIX = "notes/"


# -- processes: file descriptors, sockets, threads ----------------------------------


def _tcp_table(pid: int) -> dict[str, tuple[int, str]]:
    """socket inode -> (remote port, TCP state) for the network namespace of ``pid``."""
    table: dict[str, tuple[int, str]] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                    table[fields[9]] = (remote_port, fields[3])
        except FileNotFoundError:
            continue
    return table


@dataclass
class ProcessSnapshot:
    """What a process holds: fds (by kind), sockets to each remote port, threads."""

    pid: int
    fds: int
    threads: int
    other_fds: int  # everything but TCP sockets to the servers' ports
    to_port: dict[int, int]
    close_wait: dict[int, int]

    @classmethod
    def take(cls, pid: int, server_ports: Iterable[int] = ()) -> ProcessSnapshot:
        ports = set(server_ports)
        table = _tcp_table(pid)
        to_port: Counter[int] = Counter()
        close_wait: Counter[int] = Counter()
        fds = other = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:  # closed while we looked
                continue
            fds += 1
            if target.startswith("socket:["):
                port, state = table.get(target[8:-1], (0, ""))
                if port in ports:
                    to_port[port] += 1
                    if state == "08":  # CLOSE_WAIT: the server closed, we have not yet
                        close_wait[port] += 1
                    continue
            other += 1
        threads = len(os.listdir(f"/proc/{pid}/task"))
        return cls(pid, fds, threads, other, dict(to_port), dict(close_wait))


# -- the report ----------------------------------------------------------------------


@dataclass
class AuditReport:
    """Numbers and problems found; ``check()`` raises when there is any problem."""

    acked_writes: int = 0
    lost_writes: int = 0
    duplicates: int = 0
    refused_present: int = 0
    in_doubt: int = 0
    in_doubt_committed: int = 0
    committed_despite_error: list[str] = field(default_factory=list)
    orphans: int = 0
    orphans_swept: int = 0
    missing_blobs: int = 0
    pg_connections: int = 0
    pg_busy: int = 0
    redis_clients: int = 0
    leaked_connections: int = 0
    leaked_fds: int = 0
    leaked_threads: int = 0
    effects_delivered_late: int = 0
    effects_undelivered: int = 0
    effects_dead: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def check(self) -> AuditReport:
        if self.problems:
            shown = "\n  ".join(self.problems[:30])
            more = f"\n  ... and {len(self.problems) - 30} more" if len(self.problems) > 30 else ""
            raise AssertionError(f"the audit found {len(self.problems)} problem(s):\n  {shown}{more}")
        return self


# -- writes --------------------------------------------------------------------------


def _marker(note_text: str) -> str | None:
    word = note_text.split(" ", 1)[0]
    return word if word.startswith("u-") else None


def audit_writes(
    report: AuditReport,
    records: Sequence[Record],
    notes: dict[int, tuple[str, int, str]],
    attachments: dict[int, tuple[int, str, str, int]],
) -> None:
    """Hold the database's ``notes`` (id -> title, version, text) and ``attachments`` to the log."""
    by_title: defaultdict[str, list[int]] = defaultdict(list)
    for note_id, (title, _, _) in notes.items():
        by_title[title].append(note_id)
    by_name: defaultdict[str, list[int]] = defaultdict(list)
    for attachment_id, (_, name, _, _) in attachments.items():
        by_name[name].append(attachment_id)

    deleted = {r.note_id for r in records if r.op == "delete" and r.outcome == "acked"}
    maybe_deleted = {r.note_id for r in records if r.op == "delete" and r.outcome in ("failed", "unknown")}
    report.acked_writes = sum(
        r.outcome == "acked" and r.op in ("create", "update", "attach", "delete") for r in records
    )

    def in_doubt(present: bool) -> None:
        report.in_doubt += 1
        report.in_doubt_committed += present
        if present:
            report.committed_despite_error.append(f"{r.op} {r.marker or r.note_id}: {r.error}")

    for r in records:
        if r.op == "create" and r.marker is not None:
            ids = by_title.get(r.marker, [])
            if len(ids) > 1:
                report.duplicates += 1
                report.problem(f"create {r.marker}: {len(ids)} notes {ids} (expected at most one)")
            if r.outcome == "acked":
                if r.note_id in deleted:
                    continue
                if ids != [r.note_id] and r.note_id not in maybe_deleted:
                    report.lost_writes += 1
                    report.problem(f"create {r.marker} acknowledged as note {r.note_id}, database has {ids}")
            elif r.outcome == "refused" and ids:
                report.refused_present += 1
                report.problem(f"create {r.marker} refused with {r.status}, yet notes {ids} exist")
            elif r.outcome in ("failed", "unknown"):
                in_doubt(bool(ids))
        elif r.op == "delete" and r.outcome == "acked" and r.note_id in notes:
            report.lost_writes += 1
            report.problem(f"delete of note {r.note_id} acknowledged, but the note is still there")
        elif (
            r.op == "delete"
            and r.status == 409
            and r.note_id not in notes
            and r.note_id not in deleted
            and r.note_id not in maybe_deleted
        ):
            report.refused_present += 1
            report.problem(f"delete of note {r.note_id} refused with 409, yet the note is gone")
        elif r.op == "delete" and r.outcome in ("failed", "unknown"):
            # Gone after a delete that failed, unless another delete of it was acknowledged.
            in_doubt(r.note_id not in notes and r.note_id not in deleted)
        elif r.op == "attach" and r.marker is not None:
            ids = by_name.get(r.marker, [])
            if len(ids) > 1:
                report.duplicates += 1
                report.problem(f"attachment {r.marker}: {len(ids)} rows {ids}")
            if r.outcome == "acked":
                if r.note_id in deleted or r.note_id in maybe_deleted:
                    continue
                row = attachments.get(r.attachment_id or 0)
                if row is None or row[1] != r.marker or row[3] != r.size:
                    report.lost_writes += 1
                    report.problem(
                        f"attachment {r.marker} acknowledged as {r.attachment_id} "
                        f"({r.size} bytes), database has {row}"
                    )
            elif r.outcome == "refused" and ids:
                report.refused_present += 1
                report.problem(f"attachment {r.marker} refused with {r.status}, yet rows {ids} exist")
            elif r.outcome in ("failed", "unknown"):
                in_doubt(bool(ids))

    updates: defaultdict[int, list[Record]] = defaultdict(list)
    for r in records:
        if r.op == "update" and r.note_id is not None:
            updates[r.note_id].append(r)
    for note_id, attempts in updates.items():
        acked = [r for r in attempts if r.outcome == "acked"]
        doubtful = [r for r in attempts if r.outcome in ("failed", "unknown")]
        refused = {r.marker for r in attempts if r.outcome == "refused"}
        versions = Counter(r.version for r in acked)
        for version, count in versions.items():
            if count > 1:
                report.lost_writes += count - 1
                report.problem(
                    f"note {note_id}: version {version} was acknowledged {count} times (a lost update)"
                )
        if note_id not in notes:
            continue  # deleted: checked with the deletes
        _, version, note_text = notes[note_id]
        marker = _marker(note_text)
        highest = max(acked, key=lambda r: r.version or 0, default=None)
        floor = highest.version if highest is not None and highest.version is not None else 1
        if marker in refused:
            report.refused_present += 1
            report.problem(f"note {note_id}: its text is {marker}, an update the server refused")
        if version < floor:
            report.lost_writes += 1
            report.problem(f"note {note_id} is at version {version}, version {floor} was acknowledged")
        elif version == floor:
            if highest is not None and marker != highest.marker:
                report.lost_writes += 1
                report.problem(f"note {note_id} v{version} has text {marker}, acknowledged {highest.marker}")
        else:
            committed = version - floor
            if committed > len(doubtful) or marker not in {r.marker for r in doubtful}:
                report.problem(
                    f"note {note_id} is at version {version} with text {marker}: "
                    f"{committed} update(s) past the acknowledged v{floor} that no request "
                    "accounts for"
                )


# -- blobs ---------------------------------------------------------------------------


def audit_blobs(
    report: AuditReport, blobs: BlobStore, attachments: dict[int, tuple[int, str, str, int]], referenced: Any
) -> None:
    """Every row has its blob; unreferenced blobs are swept, and none is left over."""
    keys = {row[2]: (attachment_id, row[3]) for attachment_id, row in attachments.items()}
    for key, (attachment_id, size) in keys.items():
        try:
            info = blobs.stat(key)
        except Exception as exc:
            report.missing_blobs += 1
            report.problem(f"attachment {attachment_id}: blob {key} is missing ({type(exc).__name__}: {exc})")
            continue
        if info.size != size:
            report.missing_blobs += 1
            report.problem(
                f"attachment {attachment_id}: blob {key} has {info.size} bytes, the row says {size}"
            )
    stored = set(blobs.list(BLOB_PREFIX))
    orphans = stored - set(keys)
    report.orphans = len(orphans)
    swept = set(blobs.sweep_orphans(referenced, prefix=BLOB_PREFIX, older_than=datetime.timedelta(0)))
    report.orphans_swept = len(swept & orphans)
    wrongly = swept & set(keys)
    if wrongly:
        report.problem(f"sweep_orphans deleted referenced blobs: {sorted(wrongly)[:5]}")
    left = set(blobs.list(BLOB_PREFIX)) - set(keys)
    if left:
        report.problem(f"{len(left)} orphaned blob(s) the sweep did not remove: {sorted(left)[:5]}")


# -- resources -----------------------------------------------------------------------


@dataclass
class Limits:
    """How many pooled connections the app may hold (all its processes together)."""

    pg: int = 15  # SQLAlchemy's QueuePool: pool_size 5 + max_overflow 10
    redis: int = 50  # polydatum.redis' pool
    s3: int = 10  # botocore's max_pool_connections
    fd_slack: int = 4
    thread_slack: int = 0


def audit_resources(
    report: AuditReport,
    database_url: str,
    *,
    redis_url: str | None = None,
    pids: Sequence[int] = (),
    baseline: Sequence[ProcessSnapshot] = (),
    server_ports: Iterable[int] = (),
    limits: Limits | None = None,
    settle: float = 10.0,
) -> list[ProcessSnapshot]:
    """Connections, Redis clients, fds and threads, retried for up to ``settle`` seconds to let work end."""
    limits = limits or Limits()
    processes = max(1, len(pids))
    ports = list(server_ports)
    deadline = time.monotonic() + settle
    while True:
        found = AuditReport()
        snapshots = _resources_once(found, database_url, redis_url, pids, baseline, ports, limits, processes)
        if not found.problems or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    for name in (
        "pg_connections",
        "pg_busy",
        "redis_clients",
        "leaked_connections",
        "leaked_fds",
        "leaked_threads",
    ):
        setattr(report, name, getattr(found, name))
    report.problems.extend(found.problems)
    return snapshots


def _resources_once(
    report: AuditReport,
    database_url: str,
    redis_url: str | None,
    pids: Sequence[int],
    baseline: Sequence[ProcessSnapshot],
    ports: list[int],
    limits: Limits,
    processes: int,
) -> list[ProcessSnapshot]:
    url = make_url(database_url)
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT state, query FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"
                ),
                {"d": url.database},
            ).all()
    finally:
        engine.dispose()
    report.pg_connections = len(rows)
    busy = [(state, query[:80]) for state, query in rows if state not in ("idle", None)]
    report.pg_busy = len(busy)
    if busy:
        report.leaked_connections += len(busy)
        report.problem(f"{len(busy)} session(s) of the app's database are not back in a pool: {busy[:3]}")
    if len(rows) > limits.pg * processes:
        report.leaked_connections += len(rows) - limits.pg * processes
        report.problem(
            f"{len(rows)} sessions on the app's database, more than its pools allow "
            f"({limits.pg} x {processes} processes)"
        )
    if redis_url is not None:
        import redis

        client = redis.Redis.from_url(redis_url)
        try:
            clients = len(client.client_list()) - 1
        finally:
            client.close()
        report.redis_clients = clients
        if clients > limits.redis * processes:
            report.leaked_connections += clients - limits.redis * processes
            report.problem(
                f"{clients} Redis clients, more than the pools allow ({limits.redis} x {processes})"
            )
    snapshots = []
    before = {s.pid: s for s in baseline}
    for pid in pids:
        now = ProcessSnapshot.take(pid, ports)
        snapshots.append(now)
        then = before.get(pid)
        if then is None:
            continue
        extra_fds = now.other_fds - then.other_fds - limits.fd_slack
        if extra_fds > 0:
            report.leaked_fds += extra_fds
            report.problem(
                f"process {pid} holds {now.other_fds} file descriptors besides pooled sockets, "
                f"{then.other_fds} before the load"
            )
        pooled = sum(now.to_port.values())
        bound = limits.pg + limits.redis + limits.s3
        if pooled > bound:
            report.leaked_fds += pooled - bound
            report.problem(
                f"process {pid} holds {pooled} sockets to the servers {now.to_port}, "
                f"more than its pools allow ({bound})"
            )
        extra_threads = now.threads - then.threads - limits.thread_slack
        if extra_threads > 0:
            report.leaked_threads += extra_threads
            report.problem(f"process {pid} runs {now.threads} threads, {then.threads} before the load")
    return snapshots


# -- all of it -------------------------------------------------------------------------


def read_database(
    database_url: str,
) -> tuple[dict[int, tuple[str, int, str]], dict[int, tuple[int, str, str, int]]]:
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            notes = {
                row[0]: (row[1], row[2], row[3])
                for row in conn.execute(text("SELECT id, title, version, text FROM notes"))
            }
            attachments = {
                row[0]: (row[1], row[2], row[3], row[4])
                for row in conn.execute(text("SELECT id, note_id, name, key, size FROM attachments"))
            }
    finally:
        engine.dispose()
    return notes, attachments


def referenced_keys(database_url: str) -> Any:
    """``sweep_orphans``' callback: the keys of a batch that an attachment row still names."""

    def referenced(batch: Sequence[str]) -> list[str]:
        engine = create_engine(database_url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return list(
                    conn.execute(
                        text("SELECT key FROM attachments WHERE key = ANY(:keys)"), {"keys": list(batch)}
                    ).scalars()
                )
        finally:
            engine.dispose()

    return referenced


def audit_effects(report: AuditReport, outbox: Any, settle: float) -> None:
    """Effects (outbox rows) after the load: a relay delivers what waits; none may be lost or dead.

    Rows due within a minute must be delivered by then (those the faults
    delayed); cleanup rows of failed contexts, due after ``orphan_after``,
    are left alone (the blob audit accounts for their blobs).
    """
    from sqlalchemy import false, func, select

    relay = outbox.relay()
    t = outbox.table
    deadline = time.monotonic() + max(settle, 30.0)
    while True:
        report.effects_delivered_late += relay.run_once()
        with outbox.begin() as conn:
            waiting = conn.execute(
                select(func.count())
                .select_from(t)
                .where(t.c.dead == false(), t.c.available_at <= time.time() + 60)
            ).scalar_one()
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    report.effects_undelivered = int(waiting)
    report.effects_dead = outbox.status().dead
    if waiting:
        report.problem(f"effects: {waiting} outbox rows were still undelivered after the load (lost)")
    for row in outbox.dead(limit=5):
        report.problem(f"effects: outbox row {row.id} ({row.topic}) is dead: {row.last_error}")


def audit(
    database_url: str,
    blobs: BlobStore,
    records: Sequence[Record],
    *,
    redis_url: str | None = None,
    pids: Sequence[int] = (),
    baseline: Sequence[ProcessSnapshot] = (),
    server_ports: Iterable[int] = (),
    limits: Limits | None = None,
    settle: float = 10.0,
    outbox: Any = None,
) -> AuditReport:
    """Run every check; see the module documentation. Call it once the load has stopped.

    ``settle``: how long resource checks are retried while requests still finish.
    ``outbox``: the app's :class:`polydatum.outbox.Outbox`; its rows are delivered and counted first.
    """
    report = AuditReport()
    if outbox is not None:
        audit_effects(report, outbox, settle)
    audit_resources(
        report,
        database_url,
        redis_url=redis_url,
        pids=pids,
        baseline=baseline,
        server_ports=server_ports,
        limits=limits,
        settle=settle,
    )
    notes, attachments = read_database(database_url)
    audit_writes(report, records, notes, attachments)
    audit_blobs(report, blobs, attachments, referenced_keys(database_url))
    return report


def server_ports(*urls: str | None) -> list[int]:
    """The TCP ports of server URLs (for :class:`ProcessSnapshot`)."""
    ports = []
    for url in urls:
        if url:
            port = urlsplit(url.replace("+psycopg", "")).port
            if port:
                ports.append(port)
    return ports

"""The load: client threads with keep-alive connections driving the notes API, and the log of what they saw.

Every request is logged as a :class:`Record` with what the client knows of
its outcome: ``acked`` (2xx), ``refused`` (4xx), ``failed`` (5xx) or
``unknown`` (no HTTP response: refused connection, reset, timeout). The
audit (:mod:`tests.load.audit`) holds the database and the blob store to
that log. Every write carries a marker of its own (a create's title, an
update's text, an attachment's name), so the audit can find it or prove it
is absent.

Clients come in pairs sharing one user and one notebook: both edit the same
notes, so optimistic-concurrency conflicts (409) happen for real, besides
the deliberately stale updates of the mix.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

WRITES = ("create", "update", "attach", "delete")
#: The default mix: operation and weight.
MIX: dict[str, int] = {"create": 20, "read": 35, "update": 20, "attach": 10, "fetch": 8, "delete": 7}
STALE = 0.15  # share of updates sent with a version known to be stale


@dataclass
class Record:
    """One request and what the client saw of it."""

    op: str
    start: float  # time.monotonic() when sent
    elapsed: float
    status: int | None  # None: no HTTP response
    error: str = ""  # empty for 2xx; "HTTP 409", "ConnectionRefusedError"...
    note_id: int | None = None
    marker: str | None = None
    version: int | None = None  # the note's version the server acknowledged (create, update)
    attachment_id: int | None = None
    size: int | None = None

    @property
    def outcome(self) -> str:
        if self.status is None:
            return "unknown"
        if 200 <= self.status < 300:
            return "acked"
        if 400 <= self.status < 500:
            return "refused"
        return "failed"

    @property
    def end(self) -> float:
        return self.start + self.elapsed


class Client:
    """One keep-alive HTTP connection (reopened after any transport error)."""

    def __init__(self, base_url: str, timeout: float = 20.0) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None
        self.headers: dict[str, str] = {}

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        """Send one request; raises OSError/HTTPException when no response came."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        all_headers = {**self.headers, **(headers or {})}
        try:
            self.conn.request(method, path, body=body, headers=all_headers)
            response = self.conn.getresponse()
            data = response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, data, dict(response.getheaders())

    def json(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        status, data, _ = self.request(method, path, body, {"Content-Type": "application/json"})
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class Account:
    """A user of the load (shared by a pair of clients) and what they know of their notes."""

    user_id: int
    token: str
    notebook_id: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    notes: dict[int, int] = field(default_factory=dict)  # note id -> last version seen
    attachments: dict[int, int] = field(default_factory=dict)  # attachment id -> size


def sign_up(base_url: str, *, attempts: int = 50) -> Account:
    """A new user with one notebook (retried while the app is still starting)."""
    client = Client(base_url)
    try:
        for attempt in range(attempts):
            try:
                status, user = client.json("POST", "/users", {"name": f"load-{uuid.uuid4().hex[:16]}"})
                if status != 201:
                    raise RuntimeError(f"POST /users answered {status}: {user!r}")
                client.headers["Authorization"] = f"Bearer {user['token']}"
                status, notebook = client.json("POST", "/notebooks", {"name": "load"})
                if status != 201:
                    raise RuntimeError(f"POST /notebooks answered {status}: {notebook!r}")
                return Account(user["id"], user["token"], notebook["id"])
            except (OSError, http.client.HTTPException):
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2)
    finally:
        client.close()
    raise AssertionError("unreachable")


class Load:
    """``clients`` threads (in pairs per user) sending the mix to ``base_url`` and logging every request."""

    def __init__(
        self,
        base_url: str,
        clients: int = 8,
        *,
        mix: dict[str, int] | None = None,
        seed: int = 0,
        attachment_size: tuple[int, int] = (512, 8192),
        timeout: float = 20.0,
    ) -> None:
        self.base_url = base_url
        self.clients = clients
        self.mix = dict(mix or MIX)
        self.seed = seed
        self.attachment_size = attachment_size
        self.timeout = timeout
        self.records: list[Record] = []
        self.accounts: list[Account] = []
        self.threads_errors: list[BaseException] = []
        self._stop = threading.Event()

    # -- set-up and running ----------------------------------------------------

    def setup(self) -> Load:
        """Sign up one user per pair of clients (before any fault)."""
        self.accounts = [sign_up(self.base_url) for _ in range(max(1, (self.clients + 1) // 2))]
        return self

    def run(self, duration: float, during: Callable[[], object] | None = None) -> None:
        """Run the clients for ``duration`` seconds; ``during()`` runs meanwhile in this thread."""
        if not self.accounts:
            self.setup()
        self._stop.clear()
        threads = [
            threading.Thread(target=self._client, args=(i,), name=f"load-client-{i}", daemon=True)
            for i in range(self.clients)
        ]
        deadline = time.monotonic() + duration
        for thread in threads:
            thread.start()
        try:
            if during is not None:
                during()
            remaining = deadline - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(timeout=self.timeout + 10)
        if self.threads_errors:
            raise self.threads_errors[0]

    def _client(self, index: int) -> None:
        account = self.accounts[index // 2 % len(self.accounts)]
        rng = random.Random(self.seed * 100_003 + index)
        client = Client(self.base_url, self.timeout)
        client.headers["Authorization"] = f"Bearer {account.token}"
        ops, weights = list(self.mix), list(self.mix.values())
        try:
            while not self._stop.is_set():
                self.step(client, account, rng.choices(ops, weights)[0], rng)
        except BaseException as exc:  # a bug in the driver, not an error of the app
            self.threads_errors.append(exc)
        finally:
            client.close()

    # -- one operation ---------------------------------------------------------

    def step(
        self,
        client: Client,
        account: Account,
        op: str,
        rng: random.Random,
        note: tuple[int, int] | None = None,
        stale: float = STALE,
    ) -> Record:
        """Do ``op`` for ``account`` through ``client``, log it and return its record.

        ``note`` (id, version) picks the note instead of a random one of the account's.
        """
        with account.lock:
            notes = list(account.notes.items())
            attachments = list(account.attachments.items())
        if note is not None:
            notes = [note]
        if op != "create" and not notes:
            op = "create"
        if op == "fetch" and not attachments:
            op = "read"
        note_id, version = rng.choice(notes) if notes else (None, None)
        record = Record(op, time.monotonic(), 0.0, None, note_id=note_id)
        try:
            if op == "create":
                self._create(client, account, record, rng)
            elif op == "read":
                status, body = client.json("GET", f"/notes/{note_id}")
                record.status = status
                if status == 200:
                    record.version = body["version"]
                elif status == 404:
                    with account.lock:
                        account.notes.pop(note_id, None)
            elif op == "update":
                assert version is not None
                if rng.random() < stale and version > 1:
                    version -= 1
                record.marker = f"u-{uuid.uuid4().hex}"
                status, body = client.json(
                    "PUT", f"/notes/{note_id}", {"version": version, "text": f"{record.marker} edited"}
                )
                record.status = status
                if status == 200:
                    record.version = body["version"]
                    self._saw(account, note_id, body["version"])
                elif status == 409:
                    self._refresh(client, account, note_id)
            elif op == "attach":
                size = rng.randint(*self.attachment_size)
                record.marker, record.size = f"a-{uuid.uuid4().hex}.bin", size
                status, data, _ = client.request(
                    "POST",
                    f"/notes/{note_id}/attachments?name={quote(record.marker)}",
                    rng.randbytes(size),
                    {"Content-Type": "application/octet-stream"},
                )
                record.status = status
                if status == 201:
                    record.attachment_id = json.loads(data)["id"]
                    with account.lock:
                        account.attachments[record.attachment_id] = size
            elif op == "fetch":
                attachment_id, size = rng.choice(attachments)
                record.attachment_id = attachment_id
                status, data, _ = client.request("GET", f"/attachments/{attachment_id}")
                record.status = status
                if status == 200 and len(data) != size:
                    record.error = f"attachment {attachment_id}: {len(data)} bytes, {size} were stored"
                    record.status = 599  # a wrong body counts as a failure, not a success
                elif status == 404:
                    with account.lock:
                        account.attachments.pop(attachment_id, None)
            elif op == "delete":
                status, _ = client.json("DELETE", f"/notes/{note_id}?version={version}")
                record.status = status
                if status in (204, 404):
                    with account.lock:
                        account.notes.pop(note_id, None)
                elif status == 409:
                    self._refresh(client, account, note_id)
            else:
                raise ValueError(f"unknown operation {op!r}")
        except (OSError, http.client.HTTPException) as exc:
            record.status = None
            record.error = type(exc).__name__
        record.elapsed = time.monotonic() - record.start
        if record.status is not None and not record.error and not 200 <= record.status < 300:
            record.error = f"HTTP {record.status}"
        self.records.append(record)
        return record

    def _create(self, client: Client, account: Account, record: Record, rng: random.Random) -> None:
        record.marker = f"n-{uuid.uuid4().hex}"
        words = " ".join(rng.choice(("alpha", "bravo", "delta", "echo", "kilo")) for _ in range(8))
        status, body = client.json(
            "POST", f"/notebooks/{account.notebook_id}/notes", {"title": record.marker, "text": words}
        )
        record.status = status
        if status == 201:
            record.note_id, record.version = body["id"], body["version"]
            self._saw(account, body["id"], body["version"])

    def _saw(self, account: Account, note_id: int, version: int) -> None:
        with account.lock:
            if note_id in account.notes:
                account.notes[note_id] = max(account.notes[note_id], version)
            elif version == 1:
                account.notes[note_id] = version

    def _refresh(self, client: Client, account: Account, note_id: int) -> None:
        # Not logged as a request of the mix: the client's own follow-up after a 409.
        status, body = client.json("GET", f"/notes/{note_id}")
        with account.lock:
            if status == 200:
                account.notes[note_id] = body["version"]
            elif status == 404:
                account.notes.pop(note_id, None)

    # -- afterwards ------------------------------------------------------------

    def check_recovered(self) -> list[Record]:
        """One of each operation per account, right away: the app must answer them all with 2xx."""
        rng = random.Random(self.seed)
        done: list[Record] = []
        for account in self.accounts:
            client = Client(self.base_url, self.timeout)
            client.headers["Authorization"] = f"Bearer {account.token}"
            try:
                created = self.step(client, account, "create", rng)
                done.append(created)
                if created.outcome != "acked":
                    continue
                note = (created.note_id or 0, created.version or 1)
                for op in ("read", "update", "attach"):
                    record = self.step(client, account, op, rng, note, stale=0.0)
                    done.append(record)
                    if record.op == "update" and record.outcome == "acked":
                        note = (note[0], record.version or 0)
                attachment = done[-1].attachment_id
                if attachment is not None:
                    status, _data, _ = client.request("GET", f"/attachments/{attachment}")
                    done.append(
                        Record(
                            "fetch",
                            time.monotonic(),
                            0.0,
                            status,
                            "" if status == 200 else f"HTTP {status}",
                            note[0],
                            attachment_id=attachment,
                        )
                    )
                done.append(self.step(client, account, "delete", rng, note, stale=0.0))
            finally:
                client.close()
        return done

    def stats(self, since: float = 0.0) -> dict[str, Any]:
        """Counts, latency percentiles (ms) and errors by kind of the records after ``since``."""
        records = [r for r in self.records if r.start >= since]
        return summarize(records)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def summarize(records: Iterable[Record]) -> dict[str, Any]:
    records = list(records)
    latencies = sorted(r.elapsed * 1000 for r in records if r.outcome == "acked")
    span = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    errors = Counter(f"{r.op} {r.error}" for r in records if r.error)
    return {
        "requests": len(records),
        "acked": sum(r.outcome == "acked" for r in records),
        "acked_writes": sum(r.outcome == "acked" and r.op in WRITES for r in records),
        "throughput": len(records) / span if span else 0.0,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "errors": dict(errors.most_common()),
        "client_errors": sum(r.outcome in ("failed", "unknown") for r in records),
        "conflicts": sum(r.status == 409 for r in records),
    }


def time_to_recover(records: Iterable[Record], repaired: float) -> float | None:
    """Seconds from ``repaired`` until the first write sent after it was acknowledged (None: never)."""
    ends = [r.end for r in records if r.op in WRITES and r.outcome == "acked" and r.start >= repaired]
    return (min(ends) - repaired) if ends else None

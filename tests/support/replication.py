"""A private PostgreSQL primary with streaming replicas, on loopback, for replica tests.

``ReplicatedPostgres(replicas=2).start()`` runs initdb once, starts the
primary, clones it with ``pg_basebackup -R`` (which writes the standby
configuration) and starts each clone as a hot standby. Every node is a
:class:`~tests.support.servers.PrivatePostgres`, so a test may stop, kill
or promote any of them; the shared server on 5432 is never touched.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.support.servers import PrivatePostgres, _pg_bin, missing, wait_for


class Node(PrivatePostgres):
    """One node of the rig: a PrivatePostgres that can be cloned and promoted."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def url_as(self, application_name: str) -> str:
        """The node's URL, with ``application_name`` so pg_stat_activity tells who connected."""
        return f"{self.url}?application_name={application_name}"

    def clone_from(self, primary: Node) -> None:
        """Fill this node's data directory from ``primary`` with ``pg_basebackup -R``."""
        basebackup = _pg_bin("pg_basebackup")
        assert basebackup is not None
        self._run(
            basebackup,
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            self.data,
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        )

    def kill(self) -> None:
        """Stop the node the way a crash would (immediate shutdown: no checkpoint, clients cut off)."""
        self._ctl("stop", "-m", "immediate")

    def promote(self) -> None:
        """Turn this standby into a primary (``pg_ctl promote``, waiting until it accepts writes)."""
        self._ctl("promote")

    def sql(self, statement: str, **params: Any) -> Any:
        """Run one statement in autocommit on this node and return its first column's first value."""
        engine = create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            with engine.connect() as conn:
                result = conn.execute(text(statement), params)
                return result.scalar() if result.returns_rows else None
        finally:
            engine.dispose()


class ReplicatedPostgres:
    """A primary and ``replicas`` streaming standbys, each on its own free port."""

    def __init__(self, replicas: int = 2) -> None:
        self.primary = Node("primary")
        self.replicas = [Node(f"replica{i + 1}") for i in range(replicas)]

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]

    def start(self) -> ReplicatedPostgres:
        if _pg_bin("pg_basebackup") is None or _pg_bin("initdb") is None:
            missing(
                "PostgreSQL", "install its binaries with: apt-get update && apt-get install -y postgresql"
            )
        self.primary.start()
        # Two clones at once each force a checkpoint, which may recycle the WAL
        # segment the other one's stream still needs ("requested WAL segment
        # ... has already been removed"); keep enough WAL for both.
        self.primary.sql("ALTER SYSTEM SET wal_keep_size = '256MB'")
        self.primary.sql("SELECT pg_reload_conf()")
        # The replicas are cloned and started side by side: most of the time is waiting.
        with ThreadPoolExecutor(max_workers=len(self.replicas) or 1) as pool:
            for future in [pool.submit(self._start_replica, node) for node in self.replicas]:
                future.result()
        self.wait_streaming()
        return self

    def _start_replica(self, node: Node) -> None:
        node.clone_from(self.primary)
        node._ctl("start")
        wait_for(node.port)

    def wait_streaming(self, timeout: float = 15.0) -> None:
        """Wait until every running replica streams from the primary."""
        deadline = time.monotonic() + timeout
        expected = len(self.replicas)
        while time.monotonic() < deadline:
            if (
                self.primary.sql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
                >= expected
            ):
                return
            time.sleep(0.05)
        raise TimeoutError(f"the replicas did not start streaming within {timeout}s")

    def wait_replayed(self, node: Node, lsn: str, timeout: float = 10.0) -> None:
        """Wait until ``node`` has replayed the primary's WAL up to ``lsn``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.sql("SELECT pg_last_wal_replay_lsn() >= CAST(:lsn AS pg_lsn)", lsn=lsn):
                return
            time.sleep(0.02)
        raise TimeoutError(f"{node.name} did not replay up to {lsn} within {timeout}s")

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        for node in self.nodes:
            shutil.rmtree(node.base, ignore_errors=True)

    def log_tail(self, node: Node, lines: int = 20) -> str:
        path = os.path.join(node.base, "log")
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

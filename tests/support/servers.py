"""Real servers for the test suite.

The shared services (PostgreSQL on 5432, Redis on 6379, RabbitMQ on 5672 at
127.0.0.1) are used when they answer. Where one does not, Redis and PostgreSQL
are started privately from the Debian binaries; with ``CI=true`` a server that
is neither running nor startable fails the test run instead of skipping it.

Fault tests never touch the shared services: they start a private instance
(:class:`PrivateRedis`, :class:`PrivatePostgres`) and stop or kill that one.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reachable(host, port, 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def missing(what: str, how: str) -> None:
    """Fail under CI, skip on a developer's machine, saying what to run."""
    msg = f"{what} is not running and could not be started; {how}"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


class PrivateRedis:
    """A redis-server of our own on a free port, safe to stop and kill."""

    def __init__(self, *, persistent: bool = False) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="polydatum-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        # persistent: an append-only file in its folder, so a stop and start
        # keeps the data (a broker's queued messages), as a durable broker would.
        self.persistent = persistent

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        exe = shutil.which("redis-server")
        if exe is None:
            missing("redis-server", "install it with: apt-get install redis-server")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.port)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM) and wait for it to go away."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateMemcached:
    """A memcached of our own on a free loopback port (Debian's ``memcached``), safe to stop."""

    def __init__(self, *, item_size: str = "1m", extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.item_size = item_size
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> PrivateMemcached:
        exe = shutil.which("memcached") or (
            "/usr/bin/memcached" if os.path.exists("/usr/bin/memcached") else None
        )
        if exe is None:
            missing(
                "memcached",
                "install it with: apt-get update && apt-get install -y memcached "
                "(scripts/test does so as root)",
            )
            raise AssertionError  # missing() fails or skips
        argv = [
            exe,
            "-l",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "0",
            "-m",
            "32",
            "-I",
            self.item_size,
            *self.extra,
        ]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # memcached refuses to run as root without -u
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.port)
        return self

    def stop(self) -> None:
        """Stop the server and wait for it to go away (the port stays ours to restart on)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base = tempfile.mkdtemp(prefix="polydatum-pg-")
        self.data = os.path.join(self.base, "data")
        self.user: str | None = None
        if os.geteuid() == 0:
            # initdb and postgres refuse to run as root.
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        cmd = list(argv)
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _ctl(self, *args: str) -> None:
        pg_ctl = _pg_bin("pg_ctl")
        assert pg_ctl is not None
        opts = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(pg_ctl, "-D", self.data, "-o", opts, "-l", os.path.join(self.base, "log"), "-w", *args)

    def start(self) -> PrivatePostgres:
        initdb = _pg_bin("initdb")
        if initdb is None or _pg_bin("pg_ctl") is None:
            missing("PostgreSQL", "install it with: apt-get install postgresql")
        assert initdb is not None
        if not Path(self.data).exists():
            self._run(initdb, "-D", self.data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        self._ctl("start")
        wait_for(self.port)
        return self

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-m", mode)

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")
        wait_for(self.port)

    def close(self) -> None:
        try:
            self._ctl("stop", "-m", "immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.base, ignore_errors=True)

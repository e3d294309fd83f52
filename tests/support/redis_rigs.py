"""Multi-node Redis rigs: a Redis Cluster (3 primaries, 3 replicas) and a Sentinel group.

Every node is a private redis-server on a loopback port of its own, in a
temporary directory, so fault tests may kill any of them. Timeouts are short
(a node is "down" after 1 s) so a failover completes in a few seconds.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.servers import missing, wait_for

NODE_TIMEOUT_MS = 1000


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, both below the ephemeral range.

    A port in the range the kernel gives outgoing connections can be taken
    by one (any client socket of the test run) between this check and the
    server's bind; the server then exits and nothing ever listens. Below
    that range only a listener can take it. No port is handed out twice.
    """
    low, high = 11000, _ephemeral_low() - 10001
    if high - low < 2000:  # a kernel whose ephemeral range starts low: the old range
        low, high = 20000, 45000
    for _ in range(400):
        port = random.randint(low, high)
        if port not in _handed_out and _bindable(port) and _bindable(port + 10000):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _exe(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        missing(name, "install it with: apt-get update && apt-get install -y redis-server")
        raise AssertionError  # missing() fails or skips; this keeps the type checker sure
    return exe


def _until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout}s")


def _cli(port: int, *args: str) -> str:
    out = subprocess.run(
        [_exe("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return out.stdout


class Node:
    """One redis-server process (a cluster node, a primary, a replica or a sentinel)."""

    def __init__(self, port: int, workdir: Path, args: list[str]) -> None:
        self.port = port
        self.dir = workdir / str(port)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Node:
        self.proc = subprocess.Popen(
            [_exe("redis-server"), *self.args],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def cli(self, *args: str) -> str:
        return _cli(self.port, *args)


def _server_args(port: int, *extra: str) -> list[str]:
    return [
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        # A replica's first sync starts at once, not after the default 5 s wait.
        "--repl-diskless-sync-delay",
        "0",
        *extra,
    ]


class RedisClusterRig:
    """Six cluster nodes joined by ``redis-cli --cluster create --cluster-replicas 1``."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="polydatum-cluster-"))
        self.nodes: list[Node] = []

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL naming two of the nodes (any one is enough to start)."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes[:2])

    def start(self) -> RedisClusterRig:
        _exe("redis-server")
        _exe("redis-cli")
        for _ in range(6):
            port = free_cluster_port()
            args = _server_args(
                port,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
            )
            self.nodes.append(Node(port, self.workdir, args).start())
        for node in self.nodes:
            wait_for(node.port)
        out = subprocess.run(
            [
                _exe("redis-cli"),
                "--cluster",
                "create",
                *(n.address for n in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if out.returncode != 0:
            msg = f"redis-cli --cluster create failed: {out.stdout[-2000:]} {out.stderr[-2000:]}"
            raise RuntimeError(msg)
        _until(self.healthy, "the cluster to report cluster_state:ok on every node")
        return self

    def healthy(self) -> bool:
        """Every live node says cluster_state:ok and sees 3 primaries covering all slots."""
        for node in self.nodes:
            if node.alive():
                info = node.cli("cluster", "info")
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
        return True

    def role(self, node: Node) -> str:
        out = node.cli("role")
        return out.split("\n", 1)[0].strip()

    def primaries(self) -> list[Node]:
        return [n for n in self.nodes if n.alive() and self.role(n) == "master"]

    def primary_of(self, key: str) -> Node:
        """The live node serving ``key``'s slot, as the cluster sees it now."""
        slot = int(self.nodes[0].cli("cluster", "keyslot", key).strip() or -1)
        for node in self.primaries():
            for line in node.cli("cluster", "nodes").splitlines():
                fields = line.split()
                if "myself" in fields[2] and "master" in fields[2]:
                    for span in fields[8:]:
                        lo, _, hi = span.partition("-")
                        if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                            return node
        raise LookupError(f"no live primary serves slot {slot}")

    def kill_primary_of(self, key: str) -> Node:
        """Kill the primary serving ``key`` (SIGKILL) and return it."""
        node = self.primary_of(key)
        node.kill()
        return node

    def wait_failover(self, killed: Node, timeout: float = 20.0) -> None:
        """Wait until every live node sees ``killed`` failed and slotless, and all slots served."""

        def taken_over() -> bool:
            for node in self.nodes:
                if not node.alive():
                    continue
                line = next(
                    ln for ln in node.cli("cluster", "nodes").splitlines() if f":{killed.port}@" in ln
                )
                fields = line.split()
                if "fail" not in fields[2].split(",") or len(fields) > 8:
                    return False
            return self.healthy()

        _until(taken_over, "a replica to take over from the killed primary", timeout)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


class RedisSentinelRig:
    """One primary, one replica and three sentinels watching them as ``service``."""

    service = "polydatum"

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="polydatum-sentinel-"))
        self.primary: Node | None = None
        self.replica: Node | None = None
        self.sentinels: list[Node] = []

    @property
    def url(self) -> str:
        """A ``redis+sentinel://`` URL naming every sentinel."""
        return "redis+sentinel://" + ",".join(s.address for s in self.sentinels)

    def start(self) -> RedisSentinelRig:
        _exe("redis-server")
        ports = [free_cluster_port() for _ in range(5)]
        self.primary = Node(ports[0], self.workdir, _server_args(ports[0])).start()
        self.replica = Node(
            ports[1], self.workdir, _server_args(ports[1], "--replicaof", "127.0.0.1", str(ports[0]))
        ).start()
        wait_for(ports[0])
        wait_for(ports[1])
        # Sentinels learn of replicas from the primary's INFO, every 10 s after the
        # first: let the replica attach first so that the first INFO lists it.
        _until(
            lambda: "master_link_status:up" in _cli(ports[1], "info", "replication"),
            "the replica to attach to the primary",
        )
        # Each sentinel is told its peers and the replica up front, instead of
        # finding them through hello messages and INFO over several seconds.
        ids = {port: f"{port:040x}" for port in ports[2:]}
        for port in ports[2:]:
            conf = self.workdir / f"sentinel-{port}.conf"
            peers = "".join(
                f"sentinel known-sentinel {self.service} 127.0.0.1 {other} {ids[other]}\n"
                for other in ports[2:]
                if other != port
            )
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\nsentinel myid {ids[port]}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {ports[0]} 2\n"
                f"sentinel down-after-milliseconds {self.service} {NODE_TIMEOUT_MS}\n"
                f"sentinel failover-timeout {self.service} 10000\n"
                f"sentinel known-replica {self.service} 127.0.0.1 {ports[1]}\n{peers}"
            )
            self.sentinels.append(Node(port, self.workdir, [str(conf), "--sentinel"]).start())
        for node in self.sentinels:
            wait_for(node.port)
        _until(self.watching, "the sentinels to see the replica and each other")
        return self

    def watching(self) -> bool:
        """Every sentinel knows the primary, its replica and the two other sentinels."""
        for sentinel in self.sentinels:
            info = sentinel.cli("info", "sentinel")
            if "status=ok" not in info or "slaves=1" not in info or "sentinels=3" not in info:
                return False
        return True

    def current_primary_port(self) -> int:
        port = self._named_port(self.sentinels[0])
        assert port is not None, "the first sentinel names no primary"
        return port

    def _named_port(self, sentinel: Node) -> int | None:
        out = sentinel.cli("sentinel", "get-master-addr-by-name", self.service).split()
        return int(out[1]) if len(out) > 1 and out[1].isdigit() else None

    def kill_primary(self) -> Node:
        """Kill the node the sentinels call primary now and return it."""
        port = self.current_primary_port()
        node = next(n for n in (self.primary, self.replica) if n is not None and n.port == port)
        node.kill()
        return node

    def wait_failover(self, old_port: int, timeout: float = 20.0) -> None:
        """Wait until every sentinel names the same new primary and it accepts writes.

        Every sentinel, not one: a client asks them in turn, and one that has
        not heard of the switch yet sends it to the dead primary.
        """

        def switched() -> bool:
            named = {self._named_port(s) for s in self.sentinels}
            if len(named) != 1:
                return False
            port = named.pop()
            if port is None:
                return False
            return port != old_port and "role:master" in _cli(port, "info", "replication")

        _until(switched, "the sentinels to promote the replica", timeout)

    def close(self) -> None:
        for node in (*self.sentinels, self.primary, self.replica):
            if node is not None:
                node.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

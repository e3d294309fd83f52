"""A TCP proxy that can be switched off and on: an S3 (or any) server "going away" without losing its data.

Stopping moto's server would lose every object it holds (it keeps them in
memory), so the S3 fault is injected here instead: clients talk to the
proxy, and ``down()`` closes its listening socket and resets every open
connection (clients see ``ECONNRESET``, then ``ECONNREFUSED``) until ``up()``
listens again on the same port.

The proxy runs in a child process (``python -m tests.load.proxy PORT``), so
its sockets and threads never count against the process being audited;
the parent drives it with one-line commands on the child's stdin.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

from tests.support.servers import wait_for

REPO = Path(__file__).resolve().parents[2]


class FaultProxy:
    """Start with ``FaultProxy(upstream_port).start()``; ``port`` is where clients connect."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> FaultProxy:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.load.proxy", str(self.upstream_port)],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("PORT "):
            self.close()
            msg = f"the fault proxy did not start (said {line!r})"
            raise RuntimeError(msg)
        self.port = int(line.split()[1])
        wait_for(self.port)
        return self

    def _command(self, command: str) -> None:
        assert self._process is not None
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        answer = self._process.stdout.readline().strip()
        if answer != "OK":
            msg = f"the fault proxy answered {answer!r} to {command!r}"
            raise RuntimeError(msg)

    def down(self) -> None:
        """Refuse new connections and reset the open ones."""
        self._command("down")

    def up(self) -> None:
        """Accept connections again, on the same port."""
        self._command("up")
        wait_for(self.port)

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


# -- the child process ----------------------------------------------------------

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.port = 0

    def listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self.listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open.update((client, upstream))
            threading.Thread(target=self._pair, args=(client, upstream), daemon=True).start()

    def _pair(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        with self.lock:
            self.open.discard(client)
            self.open.discard(upstream)
        client.close()
        upstream.close()

    def down(self) -> None:
        if self.listener is not None:
            # shutdown() wakes the accept() blocked in the other thread; close() alone does not.
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
            self.listener = None
        with self.lock:
            victims = list(self.open)
        for sock in victims:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _main() -> None:
    proxy = _Proxy(int(sys.argv[1]))
    proxy.listen()
    print(f"PORT {proxy.port}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "down":
            proxy.down()
        elif command == "up" and proxy.listener is None:
            proxy.listen()
        print("OK", flush=True)


if __name__ == "__main__":
    _main()

"""A real S3 endpoint for the tests (moto's server mode, over HTTP), and blob store fixtures.

:class:`MotoServer` runs ``moto.server.ThreadedMotoServer`` on 127.0.0.1 with
a free port in a *child process*, and boto3 talks plain HTTP to it: nothing in
boto3 is patched. The child process matters for two reasons:

- memory tests measure the client side only (moto keeps every object in
  memory; in-process it would count against the blob being streamed);
- the server does not compete with the client for this process's GIL.

The child exits when its stdin closes, so a crashed test run leaves no server
behind. Run ``python -m tests.support.s3`` to start one by hand; it prints its
port on the first line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from polydatum.blob import BlobStore, FileSystemBlobStore, MemoryBlobStore
from tests.support.servers import wait_for

REPO = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


class MotoServer:
    """A moto S3 server in a child process; ``start()``, use ``endpoint_url``, ``stop()``."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self._admin: Any = None
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        """The HTTP URL boto3 clients should use as ``endpoint_url``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0, **environ: str) -> MotoServer:
        """Start the child process and wait until it accepts connections.

        ``port``: 0 for a free one; the previous port to come back after :meth:`stop`
        (an empty server: moto keeps its state in memory). ``environ`` is added to
        the child's environment, e.g. moto's ``INITIAL_NO_AUTH_ACTION_COUNT="1"``
        to check credentials after the first request.
        """
        credentials = {name.upper(): value for name, value in CREDENTIALS.items()}
        env = dict(os.environ, PYTHONPATH=str(REPO), POLYDATUM_MOTO_PORT=str(port), **credentials, **environ)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.s3"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            msg = f"moto server did not start (said {line!r}); is moto[server] installed?"
            raise RuntimeError(msg)
        self.port = int(line.split()[1])
        wait_for(self.port)
        return self

    def client_options(self, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for ``boto3.client("s3", ...)`` or ``S3BlobStore`` for this server."""
        return {"endpoint_url": self.endpoint_url, "region_name": REGION, **CREDENTIALS, **extra}

    def client(self, **config: Any) -> Any:
        """A plain boto3 S3 client for this server (for setup and for checking behind the store)."""
        return boto3.session.Session().client(
            "s3", config=Config(max_pool_connections=32, **config), **self.client_options()
        )

    def create_bucket(self, name: str) -> str:
        """Create a bucket and return its name."""
        if self._admin is None:
            self._admin = self.client()
        self._admin.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        """Stop the server; connections to its port are refused afterwards."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    close = stop

    def snapshot(self) -> dict[str, dict[str, tuple[bytes, str, dict[str, str]]]]:
        """Each object of each bucket (bucket -> key -> body, content type, metadata), for :meth:`restore`."""
        client = self._admin = self._admin or self.client()
        state: dict[str, dict[str, tuple[bytes, str, dict[str, str]]]] = {}
        for bucket in client.list_buckets()["Buckets"]:
            name = bucket["Name"]
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=name)
            keys = [o["Key"] for page in pages for o in page.get("Contents", ())]
            objects = state[name] = {}
            for key in keys:
                got = client.get_object(Bucket=name, Key=key)
                objects[key] = (got["Body"].read(), got["ContentType"], got.get("Metadata") or {})
        return state

    def restore(self, state: dict[str, dict[str, tuple[bytes, str, dict[str, str]]]]) -> None:
        """Put back what :meth:`snapshot` saw, in a server started again (moto forgets on stop).

        Bodies, content types and metadata come back as S3 kept them; only the
        modification times are new (which polydatum does not rely on).
        """
        client = self._admin = self._admin or self.client()  # the same port: the same endpoint
        for name, objects in state.items():
            client.create_bucket(Bucket=name)
            for key, (body, content_type, metadata) in objects.items():
                client.put_object(
                    Bucket=name, Key=key, Body=body, ContentType=content_type, Metadata=metadata
                )


@pytest.fixture(name="moto_server", scope="session")
def moto_server_fixture() -> Iterator[MotoServer]:
    """One moto S3 server for the session; import this fixture into a test module to use it."""
    server = MotoServer().start()
    yield server
    server.stop()


BACKENDS = ["memory", "fs", "s3"]
_CLIENTS: dict[MotoServer, Any] = {}


def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> BlobStore:
    """A fresh, empty store of the given kind ("memory", "fs" or "s3": a new bucket)."""
    if kind == "memory":
        return MemoryBlobStore()
    if kind == "fs":
        return FileSystemBlobStore(tmp_path / "root")
    from polydatum.s3 import S3BlobStore

    server: MotoServer = request.getfixturevalue("moto_server")
    bucket = server.create_bucket(f"test-{uuid.uuid4().hex[:20]}")
    # One client (built by S3BlobStore itself, so with its timeouts and
    # retries) for every store: making a client costs ~0.1 s per test.
    if server not in _CLIENTS:
        _CLIENTS[server] = S3BlobStore("any", **server.client_options()).client
    return S3BlobStore(bucket, client=_CLIENTS[server])


@pytest.fixture(name="store", params=BACKENDS)
def store_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """An empty store, once per backend; import it (with moto_server_fixture) to use it."""
    return make_store(request.param, tmp_path, request)


def _serve() -> None:
    import logging

    from moto import backends
    from moto.server import ThreadedMotoServer

    # Server-side speed-ups only (nothing on the client side is touched): moto
    # lists its own package directory on every request to route it, and
    # werkzeug logs every request line; together about a third of a PUT.
    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules
    logging.getLogger("werkzeug").disabled = True

    port = int(os.environ.get("POLYDATUM_MOTO_PORT", "0"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print(f"PORT {server.get_host_and_port()[1]}", flush=True)
    # Serve until the parent closes our stdin (or dies).
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    _serve()

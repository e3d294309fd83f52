"""Blob stores against plain boto3 and plain file writes: µs per put+get, and the overhead.

Run: .venv/bin/python benchmarks/blob.py [--quick]

One put followed by one get of the same key, for 1 KiB and 8 MiB blobs:

1. ``S3BlobStore`` against moto's server (a child process, real HTTP) vs plain
   boto3 calls on the *same client* (so only polydatum's layer differs):
   ``put_object`` + ``get_object`` (what boto3 users write for bytes), and
   ``upload_fileobj`` + ``get_object`` (what our put uses from the multipart
   threshold on: 8 MiB is one part, three requests).
2. ``FileSystemBlobStore`` (temp file, fsync, rename) vs hand-written code:
   the same atomic write done by hand, and a plain ``open().write()`` with no
   fsync (not crash-safe; shown for scale). ``fsync=False`` is measured too.
3. The same S3 put+get of a new key through a context's unit of work
   (``ctx.blobs``): it adds one HEAD per put, to know whether there is
   something to restore (an overwrite also copies the old blob aside).

Variants are interleaved in rounds and the best round counts, so the noise of
a shared machine hits them alike.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from polydatum import DataManager
from polydatum.blob import FileSystemBlobStore
from polydatum.s3 import S3BlobStore
from tests.support.s3 import MotoServer

QUICK = "--quick" in sys.argv
KiB, MiB = 1024, 1024 * 1024
ROUNDS = 3 if QUICK else 5


def best(variants: dict[str, Callable[[], None]], loops: int) -> dict[str, float]:
    """Best-of-ROUNDS µs per call for each variant, interleaved round by round."""
    for fn in variants.values():
        fn()  # warm up: connections, caches
    results = dict.fromkeys(variants, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(loops):
                fn()
            results[name] = min(results[name], (time.perf_counter() - start) / loops * 1e6)
    return results


def report(title: str, results: dict[str, float], baseline: str) -> None:
    base = results[baseline]
    print(f"\n{title}")
    for name, micros in results.items():
        overhead = "baseline" if name == baseline else f"{(micros / base - 1) * 100:+.1f}%"
        print(f"  {name:<44} {micros:>10.1f} µs/op   {overhead}")


def s3(server: MotoServer) -> None:
    bucket = server.create_bucket(f"bench-{uuid.uuid4().hex[:12]}")
    store = S3BlobStore(bucket, **server.client_options())
    dm = DataManager()
    store.install(dm, name="blobs")
    s3_round(store, dm, KiB, 40 if QUICK else 100)
    s3_round(store, dm, 8 * MiB, 3 if QUICK else 8)


def s3_round(store: S3BlobStore, dm: DataManager, size: int, loops: int) -> None:
    data = os.urandom(size)
    client, bucket = store.client, store.bucket

    def polydatum() -> None:
        store.put("k", data)
        store.get("k")

    def in_context() -> None:
        key = f"new/{uuid.uuid4().hex}"  # the usual case: new content, new key
        with dm.context() as ctx:
            ctx.blobs.put(key, data)
            ctx.blobs.get(key)

    def put_object() -> None:
        client.put_object(Bucket=bucket, Key="k", Body=data,
                          ContentType="application/octet-stream", Metadata={})
        client.get_object(Bucket=bucket, Key="k")["Body"].read()

    def upload_fileobj() -> None:
        client.upload_fileobj(io.BytesIO(data), bucket, "k",
                              ExtraArgs={"ContentType": "application/octet-stream"},
                              Config=store.transfer_config)
        client.get_object(Bucket=bucket, Key="k")["Body"].read()

    results = best({
        "boto3 put_object + get_object": put_object,
        "boto3 upload_fileobj + get_object": upload_fileobj,
        "S3BlobStore.put + get": polydatum,
        "ctx.blobs.put + get, new key (unit of work)": in_context,
    }, loops)
    report(f"S3 (moto over HTTP), {size // KiB} KiB, put+get", results,
           "boto3 put_object + get_object")


def filesystem() -> None:
    root = tempfile.mkdtemp(prefix="polydatum-bench-")
    fs_round(root, KiB, 200 if QUICK else 1000)
    fs_round(root, 8 * MiB, 5 if QUICK else 20)


def fs_round(root: str, size: int, loops: int) -> None:
    data = os.urandom(size)
    store = FileSystemBlobStore(os.path.join(root, "store"))
    fast = FileSystemBlobStore(os.path.join(root, "nofsync"), fsync=False)
    plain_dir = os.path.join(root, "plain")
    os.makedirs(os.path.join(plain_dir, "tmp"), exist_ok=True)
    os.makedirs(os.path.join(plain_dir, "d"), exist_ok=True)
    target = os.path.join(plain_dir, "d", "k")

    def polydatum() -> None:
        store.put("d/k", data)
        store.get("d/k")

    def polydatum_nofsync() -> None:
        fast.put("d/k", data)
        fast.get("d/k")

    def atomic_by_hand() -> None:
        tmp = os.path.join(plain_dir, "tmp", uuid.uuid4().hex)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fd = os.open(os.path.dirname(target), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        with open(target, "rb") as handle:
            handle.read()

    def plain_write() -> None:
        with open(target, "wb") as handle:
            handle.write(data)
        with open(target, "rb") as handle:
            handle.read()

    results = best({
        "atomic write by hand (fsync, rename)": atomic_by_hand,
        "FileSystemBlobStore.put + get": polydatum,
        "plain open().write(), no fsync": plain_write,
        "FileSystemBlobStore(fsync=False)": polydatum_nofsync,
    }, loops)
    report(f"Filesystem, {size // KiB} KiB, put+get", results,
           "atomic write by hand (fsync, rename)")


def main() -> None:
    server = MotoServer().start()
    try:
        s3(server)
    finally:
        server.stop()
    filesystem()


if __name__ == "__main__":
    main()

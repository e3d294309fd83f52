"""Blob stores against plain boto3 and plain file writes: µs per put+get, and the overhead.

Run: .venv/bin/python benchmarks/blob.py [--quick]

Prints, per variant, µs per put+get, MB/s (the blob's size moved up and down)
and the ratio to the plain baseline measured in the same run.

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

Variants are interleaved in short rounds; the overhead is the median of the
per-round ratios to the baseline, so the noise of a shared machine hits every
variant alike and a disturbed round does not decide the result.
"""

from __future__ import annotations

import io
import os
import statistics
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
ROUNDS = 5 if QUICK else 15


class Result:
    """Timings of one variant: µs per op in each round, and its ratio to the baseline per round."""

    def __init__(self) -> None:
        self.micros: list[float] = []
        self.ratios: list[float] = []


def measure(variants: dict[str, Callable[[], None]], loops: int, baseline: str) -> dict[str, Result]:
    """Short rounds, every variant once per round (in a rotating order), ratios taken per round.

    On a shared machine the load changes from second to second; a ratio taken
    within one round compares variants under the same load, and the median of
    the per-round ratios ignores the rounds a neighbour disturbed.
    """
    for fn in variants.values():
        fn()  # warm up: connections, caches
    results = {name: Result() for name in variants}
    names = list(variants)
    for round_number in range(ROUNDS):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(loops):
                fn()
            results[name].micros.append((time.perf_counter() - start) / loops * 1e6)
        base = results[baseline].micros[-1]
        for result in results.values():
            result.ratios.append(result.micros[-1] / base)
    return results


def report(title: str, results: dict[str, Result], baseline: str, size: int) -> None:
    """One line per variant: best and median µs per put+get, MB/s, median ratio to the baseline."""
    print(f"\n{title}  ({ROUNDS} rounds; MB/s = size up + size down per median op)")
    print(f"  {'variant':<44} {'best µs/op':>11} {'median':>10} {'MB/s':>8} {'ratio':>7}  overhead")
    for name, result in results.items():
        median = statistics.median(result.micros)
        ratio = statistics.median(result.ratios)
        overhead = "baseline" if name == baseline else f"{(ratio - 1) * 100:+.1f}%"
        mb_per_s = 2 * size / median  # bytes per µs == MB/s
        print(
            f"  {name:<44} {min(result.micros):>11.1f} {median:>10.1f} {mb_per_s:>8.1f} "
            f"{ratio:>6.3f}x  {overhead}"
        )


def s3(server: MotoServer) -> None:
    bucket = server.create_bucket(f"bench-{uuid.uuid4().hex[:12]}")
    store = S3BlobStore(bucket, **server.client_options())
    dm = DataManager()
    store.install(dm, name="blobs")
    s3_round(store, dm, KiB, 20 if QUICK else 30)
    s3_round(store, dm, 8 * MiB, 2 if QUICK else 3)


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
        client.put_object(
            Bucket=bucket, Key="k", Body=data, ContentType="application/octet-stream", Metadata={}
        )
        client.get_object(Bucket=bucket, Key="k")["Body"].read()

    def upload_fileobj() -> None:
        client.upload_fileobj(
            io.BytesIO(data),
            bucket,
            "k",
            ExtraArgs={"ContentType": "application/octet-stream"},
            Config=store.transfer_config,
        )
        client.get_object(Bucket=bucket, Key="k")["Body"].read()

    results = measure(
        {
            "boto3 put_object + get_object": put_object,
            "boto3 upload_fileobj + get_object": upload_fileobj,
            "S3BlobStore.put + get": polydatum,
            "ctx.blobs.put + get, new key (unit of work)": in_context,
        },
        loops,
        "boto3 put_object + get_object",
    )
    report(f"S3 (moto over HTTP), {size // KiB} KiB, put+get", results, "boto3 put_object + get_object", size)


def filesystem() -> None:
    root = tempfile.mkdtemp(prefix="polydatum-bench-")
    fs_round(root, KiB, 100 if QUICK else 300)
    fs_round(root, 8 * MiB, 3 if QUICK else 8)


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

    results = measure(
        {
            "atomic write by hand (fsync, rename)": atomic_by_hand,
            "FileSystemBlobStore.put + get": polydatum,
            "plain open().write(), no fsync": plain_write,
            "FileSystemBlobStore(fsync=False)": polydatum_nofsync,
        },
        loops,
        "atomic write by hand (fsync, rename)",
    )
    report(f"Filesystem, {size // KiB} KiB, put+get", results, "atomic write by hand (fsync, rename)", size)


def main() -> None:
    server = MotoServer().start()
    try:
        s3(server)
    finally:
        server.stop()
    filesystem()


if __name__ == "__main__":
    main()
